"""The `atlas-distill` command line: one module per subcommand, assembled here."""

from __future__ import annotations

import typer

from . import chain, compare, demo_db, export, inspect, profile, train
from ._common import PRECEDENCE

app = typer.Typer(
    name="atlas-distill",
    help="Distill a teacher model into a smaller student with GKD, trained on Atlas SDK traces in Postgres.\n\n"
    + PRECEDENCE,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would show database URLs with passwords
    rich_markup_mode=None,
)

app.command("export")(export.export)
app.command("inspect")(inspect.inspect)
app.command("train")(train.train)
app.command("chain")(chain.chain)
app.command("compare")(compare.compare)
app.add_typer(profile.app, name="profile")
app.command("demo-db")(demo_db.demo_db)


def main() -> None:
    import os
    import warnings

    # Library deprecation notices and hub progress bars are noise for operators; errors are still ours to show.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*experimental.*")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sys

    from ..db import masked_argv

    args = sys.argv[1:]
    sys.argv[1:] = masked_argv(args)  # W&B records sys.argv in its run files; a URL's password must not go there
    app(args=args)
