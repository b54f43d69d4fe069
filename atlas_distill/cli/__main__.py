"""`python -m atlas_distill.cli`: the console script as a module, for launchers that take one
(`torchrun -m atlas_distill.cli train ...`, `accelerate launch -m atlas_distill.cli train ...`)."""

from . import main

if __name__ == "__main__":
    main()
