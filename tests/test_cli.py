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
