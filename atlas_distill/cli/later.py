"""Subcommands whose issues have not landed yet: they say so and exit 1, never pretend."""

from __future__ import annotations

import typer

from ..errors import UsageError
from ._common import reporting_errors

_LATER = {
    "train": "One GKD training run with baseline comparison",
    "chain": "Multi-stage teacher -> student distillation chain",
    "compare": "Baseline metrics of runs side by side",
}


def not_yet(name: str):
    def command(ctx: typer.Context) -> None:
        with reporting_errors():
            raise UsageError(f"`atlas-distill {name}` ({_LATER[name]}) is not yet available in this version.",
                             fix="Use `export` and `inspect` meanwhile; see README.md for the roadmap.")

    command.__doc__ = f"{_LATER[name]} (not yet available)."
    return command
