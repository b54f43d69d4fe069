"""The `atlas-distill` command line: one module per subcommand, assembled here."""

from __future__ import annotations

import typer

from . import chain, compare, demo_db, export, inspect, plan, profile, teacher_store, train
from ..errors import UsageError
from ._common import PRECEDENCE, quiet_closed_pipe, show_error

app = typer.Typer(
    name="atlas-distill",
    help="Distill a teacher model into a smaller student with GKD, trained on Atlas SDK traces in Postgres.\n\n"
    + PRECEDENCE,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would show database URLs with passwords
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"atlas-distill {version('atlas-distill')}")
        raise typer.Exit(0)


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    pass


app.command("export")(export.export)
app.command("inspect")(inspect.inspect)
app.command("train")(train.train)
app.command("chain")(chain.chain)
app.command("compare")(compare.compare)
app.command("plan")(plan.plan)
app.add_typer(profile.app, name="profile")
app.add_typer(teacher_store.app, name="teacher-store")
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
    sys.exit(_run(args))


def _run(args: list[str]) -> int:
    """Run the app; usage errors take our format and exit 1 (Click's 2 is our "no data"), a closed pipe exits 0."""
    try:
        code = app(args=args, standalone_mode=False)
    except typer.TyperException as exc:  # Click's usage errors (Typer vendors Click) derive from it
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `atlas-distill` or group: the help says it all
            exc.show()
            return 1
        show_error(_usage_error(exc, args), json_mode="--json" in args[:args.index("--") if "--" in args else None])
        return 1
    except typer.Abort:
        return 130
    except BrokenPipeError:
        quiet_closed_pipe()
    except SystemExit as exc:  # Rich and Click turn a closed stdout into exit 1
        if exc.code and isinstance(exc.__context__, BrokenPipeError):
            quiet_closed_pipe()
        raise
    return code if isinstance(code, int) else 0


def _usage_error(exc: typer.TyperException, args: list[str]) -> UsageError:
    """Click's usage error as ours: its message, and a fix that points at the right --help."""
    ctx = getattr(exc, "ctx", None)
    # Some parser errors carry no context; the command is then the first word that is not an option.
    command = next((arg for arg in args if not arg.startswith("-")), "") if ctx is None else ""
    path = ctx.command_path if ctx else f"atlas-distill {command}".strip()
    message = exc.format_message().strip()
    fix = f"Run `{path} --help` for its options and arguments."
    if ctx and message.startswith("No such command") and hasattr(ctx.command, "list_commands"):
        fix = f"Use one of: {', '.join(ctx.command.list_commands(ctx))}; `{path} --help` describes each."
    return UsageError(message if message.endswith((".", "?")) else message + ".", fix=fix)
