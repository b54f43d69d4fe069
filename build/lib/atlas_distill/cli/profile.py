"""`atlas-distill profile`: list profiles and print one fully resolved."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import load_profile, profile_paths, profile_to_yaml
from ._common import OverridesArg, PRECEDENCE, JsonOpt, out, print_json, reporting_errors

app = typer.Typer(help="List profiles and print a resolved one.", no_args_is_help=True)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Profile name or YAML path.")] = "default",
    overrides: OverridesArg = None,
    json_out: JsonOpt = False,
) -> None:
    """Print a profile with every default filled in and the overrides applied."""
    with reporting_errors(json_out):
        config = load_profile(name, overrides)
    if json_out:
        import yaml

        print_json(yaml.safe_load(profile_to_yaml(config)))
        return
    out.print(f"# profile {name}; {PRECEDENCE}", markup=False)
    out.print(profile_to_yaml(config), markup=False, end="")


@app.command("list")
def list_profiles(json_out: JsonOpt = False) -> None:
    """List the profiles --profile can name, and where each comes from."""
    found = profile_paths()
    if json_out:
        print_json({name: str(path) for name, path in found})
        return
    for name, path in found:
        out.print(f"{name:<16} {path}", markup=False)
