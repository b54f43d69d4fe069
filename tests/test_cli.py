"""The command line as a whole: help, light imports, profiles."""

from __future__ import annotations

import subprocess
import sys

from helpers import startup_hook


def test_help_lists_all_subcommands_and_precedence(cli):
    result = cli("--help")
    assert result.code == 0
    for name in ("export", "inspect", "train", "chain", "compare", "profile", "demo-db"):
        assert name in result.stdout
    assert "defaults < --profile < KEY=VALUE overrides < explicit flags" in " ".join(result.stdout.split())


def test_cli_import_does_not_load_heavy_libraries():
    code = ("import sys, atlas_distill.cli, atlas_distill.export, atlas_distill.inspect; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'matplotlib', 'wandb') "
            "if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_compare_is_available_and_says_what_it_needs(cli):
    result = cli("compare", "--profile", "fast", "trainer.min_reward=0.9")
    assert result.code == 1 and "Nothing to compare" in result.stderr
    assert "--model" in result.stderr and "--traces" in result.stderr  # the fix names what it needs


def test_profile_show_and_list(cli):
    shown = cli("profile", "show", "fast", "trainer.min_reward=0.9", "--json")
    assert shown.code == 0, shown.stderr
    assert shown.json()["trainer"]["min_reward"] == 0.9 and shown.json()["trainer"]["num_train_epochs"] == 1
    text = cli("profile", "show", "high-quality")
    assert "learning_rate: 3.0e-06" in text.stdout
    listed = cli("profile", "list", "--json")
    assert set(listed.json()) >= {"default", "fast", "high-quality", "task-specific"}


def test_profile_show_masks_a_password(cli):
    result = cli("profile", "show", "default", "database.url=postgresql://u:S3cr3t-pw@db:5432/atlas")
    assert result.code == 0
    assert "S3cr3t-pw" not in result.stdout and "postgresql://u:***@db:5432/atlas" in result.stdout


def test_profile_errors_exit_1(cli):
    result = cli("profile", "show", "fsat")
    assert result.code == 1 and "unknown profile `fsat`" in result.stderr and "`fast`" in result.stderr


def test_a_bug_exits_70_with_one_line_and_the_debug_switch_shows_the_traceback(cli, tmp_path):
    """A real exception the code does not expect (injected by a sitecustomize on PYTHONPATH, which Python runs
    before the CLI starts) must end in exit 70 and a short message, never a traceback, unless debugging."""
    env = startup_hook(tmp_path / "hook",
                       "from atlas_distill.traces import jsonl\n"
                       "def broken(self):\n"
                       "    return {}['missing']\n"
                       "jsonl.JsonlTraceSource._open = broken\n")
    (tmp_path / "t.jsonl").write_text('{"task": "x"}\n')
    result = cli("inspect", "t.jsonl", env=env)
    assert result.code == 70, result.stderr
    assert "Internal error: KeyError: 'missing'" in result.stderr and "ATLAS_DISTILL_DEBUG=1" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    debug = cli("inspect", "t.jsonl", env={**env, "ATLAS_DISTILL_DEBUG": "1"})
    assert debug.code == 1 and "Traceback" in debug.stderr and "KeyError: 'missing'" in debug.stderr


def test_the_upstream_imports_work_from_the_package_and_load_lazily():
    code = ("import sys, atlas_distill; assert 'torch' not in sys.modules, 'import atlas_distill loaded torch'; "
            "from atlas_distill import AtlasGKDTrainer, GKDConfig, build_gkd_dataset, compute_baseline_summary; "
            "from atlas_distill import gkd, data, evaluate; "
            "assert (AtlasGKDTrainer, GKDConfig) == (gkd.AtlasGKDTrainer, gkd.GKDConfig); "
            "assert build_gkd_dataset is data.build_gkd_dataset; "
            "assert compute_baseline_summary is evaluate.compute_baseline_summary; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split()[-1] == "ok", done.stderr  # (a library logs to stdout)
    missing = subprocess.run([sys.executable, "-c", "from atlas_distill import Nope"], capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot import name 'Nope'" in missing.stderr


def test_usage_errors_exit_1_with_our_message_fix_and_json_document(cli):
    """Click's usage errors (code 2, which is our "no data") take our format: exit 1, Error + Fix, and under
    --json one error document on stdout."""
    cases = {
        ("train", "--bogus"): ("No such option: --bogus.", "`atlas-distill train --help`"),
        ("export", "--min-rewrd", "0.9"): ("--min-reward", "`atlas-distill export --help`"),  # Click's suggestion
        ("export", "--min-reward", "abc"): ("Invalid value for '--min-reward'", "`atlas-distill export --help`"),
        ("inspect", "x.jsonl", "--top", "0"): ("Invalid value for '--top'", "`atlas-distill inspect --help`"),
        ("train", "--traces"): ("'--traces' requires an argument", "`atlas-distill train --help`"),
        ("nope",): ("No such command 'nope'.",
                    "export, inspect, train, chain, compare, plan, demo-db, profile, teacher-store"),
        ("profile", "nope"): ("No such command 'nope'.", "show, list"),
    }
    for args, (message, fix) in cases.items():
        result = cli(*args)
        assert result.code == 1, (args, result.code, result.stderr)
        error, fix_line = result.stderr.strip().splitlines()
        assert error.startswith("Error: ") and message in error, (args, result.stderr)
        assert fix_line.startswith("Fix: ") and fix in fix_line, (args, result.stderr)
        assert result.stdout == "" and "Usage:" not in result.stderr
        command_first = args[0] in ("train", "export", "inspect")  # `--traces --json` would read --json as a path
        as_json = cli(args[0], "--json", *args[1:]) if command_first else cli(*args, "--json")
        assert as_json.code == 1
        assert as_json.json() == {"error": {"type": "UsageError", "message": error.removeprefix("Error: "),
                                            "fix": fix_line.removeprefix("Fix: ")}, "exit_code": 1}
    bare = cli()
    assert bare.code == 1 and "Commands:" in bare.stderr and bare.stdout == ""  # the help says what to do


def test_version_prints_the_installed_version(cli):
    from importlib.metadata import version

    result = cli("--version")
    assert result.code == 0 and result.stdout.strip() == f"atlas-distill {version('atlas-distill')}"


def test_a_closed_pipe_exits_0_quietly_in_every_command(cli, tmp_path, trace_file):
    """`inspect ... | head` ended with exit 1 (Rich's rule for a closed stdout); one rule for all: exit 0. The
    reader (`true`) is gone before Python has started, so every write meets a closed pipe."""
    import os

    cli_path = os.path.join(os.path.dirname(sys.executable), "atlas-distill")
    for command in (f"inspect '{trace_file}'", f"inspect '{trace_file}' --json", "profile show default",
                    "--help"):
        script = f"'{cli_path}' {command} | true; echo \"rc=${{PIPESTATUS[0]}}\""
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "rc=0", (command, done.stderr)
        assert done.stderr == "", (command, done.stderr)


def test_a_gkd_surface_missing_from_trl_fails_at_import_with_what_to_install():
    """Everything taken from TRL is imported in gkd/trl_surface.py; a TRL without one of those names (here
    `_ForwardRedirection`, a private one, removed before the import) fails there with the pinned version."""
    code = ("import trl.models.utils as u\n"
            "del u._ForwardRedirection\n"
            "import atlas_distill.gkd.trl_surface\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: atlas-distill needs TRL's GKD surface") and "pip install trl==1.16.0" in last


HELP_PAGES = [[], ["export"], ["inspect"], ["train"], ["chain"], ["compare"], ["demo-db"], ["profile"],
              ["profile", "show"], ["profile", "list"], ["plan"], ["teacher-store"], ["teacher-store", "build"]]


def test_every_help_page_is_pinned(cli):
    """`--help` of the tool and of each command, pinned in tests/data/help/ so that a change to them is a deliberate
    one: regenerate with `UPDATE_HELP=1 pytest tests/test_cli.py -k help_page` and review the diff."""
    import os
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "help"
    for command in HELP_PAGES:
        shown = cli(*command, "--help", env={"COLUMNS": "100"})
        assert shown.code == 0, shown.stderr
        pinned = folder / ("-".join(["atlas-distill", *command]) + ".txt")
        if os.environ.get("UPDATE_HELP"):
            folder.mkdir(parents=True, exist_ok=True)
            pinned.write_text(shown.stdout)
        assert pinned.is_file(), f"{pinned} is missing: run UPDATE_HELP=1 pytest tests/test_cli.py -k help_page"
        assert shown.stdout == pinned.read_text(), f"`atlas-distill {' '.join(command)} --help` changed; if " \
            "that is deliberate, run UPDATE_HELP=1 pytest tests/test_cli.py -k help_page and commit the diff"

