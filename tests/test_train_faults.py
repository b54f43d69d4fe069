"""`train` when things go wrong: killed mid-run, a non-finite loss, an unwritable or full output disk.

Real runs of the console script on tiny models (bundled demo traces, no database). Exit codes: 6 output
error, 7 training failed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from helpers import startup_hook

CLI = Path(sys.executable).with_name("atlas-distill")
TINY = ["trainer.max_new_tokens=4", "trainer.eval_max_sessions=2", "trainer.max_length=192", "data.prompt=task",
        "trainer.report_to=[]", "trainer.lmbda=0", "trainer.logging_steps=1", "trainer.eval_steps=100",
        "trainer.per_device_train_batch_size=2"]


def models(make_tiny_model) -> list[str]:
    return ["--teacher", str(make_tiny_model(seed=2)), "--student", str(make_tiny_model(seed=1))]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "PGPASSWORD")}


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def trainer_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def counting_evaluations(directory: Path) -> dict[str, str]:
    """A startup hook that appends a line to $ATLAS_TEST_COUNT each time a model is evaluated by generation;
    returns the environment that installs it."""
    return startup_hook(directory,
                        "import contextlib, os, sys\n"
                        "with contextlib.redirect_stdout(sys.stderr):  # importing prints; stdout holds the JSON\n"
                        "    from atlas_distill.gkd import trainer\n"
                        "evaluate_model = trainer.AtlasGKDTrainer.evaluate_model\n"
                        "def counted(self, *args, **kwargs):\n"
                        "    with open(os.environ['ATLAS_TEST_COUNT'], 'a') as handle:\n"
                        "        handle.write('evaluated\\n')\n"
                        "    return evaluate_model(self, *args, **kwargs)\n"
                        "trainer.AtlasGKDTrainer.evaluate_model = counted\n")


def evaluations(path: Path) -> int:
    return path.read_text().count("evaluated") if path.exists() else 0


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_the_last_whole_checkpoint(cli, make_tiny_model, tmp_path):
    command = ["train", *models(make_tiny_model), *TINY, "--max-steps", "8", "trainer.save_steps=1",
               "trainer.learning_rate=1e-2", "--run-name", "killed"]
    run_dir = tmp_path / "outputs/gkd/killed"
    victim = subprocess.Popen([str(CLI), *command], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint-2").is_dir():
            assert victim.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint-2"
            time.sleep(0.05)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    kept = max((p for p in run_dir.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    kept_step = trainer_step(kept)
    assert kept_step >= 2 and not (run_dir / "summary.json").exists()
    # What a kill in the middle of a save leaves with transformers' in-place writes: a newer checkpoint
    # directory without trainer_state.json (written last). It must not be resumed from.
    torn = run_dir / f"checkpoint-{kept_step + 1}"
    shutil.copytree(kept, torn, dirs_exist_ok=True)
    (torn / "trainer_state.json").unlink()
    # With ours, a kill mid-save leaves the copy under .checkpoint-staging/; and a step may have been logged
    # after the last checkpoint (transformers logs, then saves), its line possibly cut short. (The kill itself may
    # have come in the middle of that save and left the staged copy already.)
    (run_dir / ".checkpoint-staging" / f"checkpoint-{kept_step + 1}").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"step": kept_step + 1, "train/loss": 9.9}) + '\n{"step": ')

    hook = counting_evaluations(tmp_path / "hook")
    before_training = (run_dir / "before_training.json").read_bytes()
    started = time.monotonic()
    resumed = subprocess.Popen([str(CLI), *command, "--resume", "--json"], cwd=tmp_path,
                               env=env() | hook | {"ATLAS_TEST_COUNT": str(tmp_path / "resumed")},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_step_after, lines = None, []
    for line in resumed.stderr:
        lines.append(line)
        step = re.match(r"\s*Step (\d+): loss=", line)
        if step and first_step_after is None and int(step.group(1)) > kept_step:
            first_step_after = time.monotonic() - started
    stdout = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, "".join(lines)
    stderr = "".join(lines)
    print(f"resume: command start to first new step {first_step_after:.1f} s")
    assert f"Removed the incomplete checkpoint {torn.name}" in stderr
    assert f"Removed the incomplete checkpoint .checkpoint-staging/checkpoint-{kept_step + 1}" in stderr
    assert f"Resuming from {kept.name} (step {kept_step} of 8)" in stderr
    assert f"Step {kept_step}: loss=" not in stderr  # nothing before the checkpoint is redone
    summary = json.loads(stdout)
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    assert {"eval", "baseline", "teacher_eval", "student_before", "train_loss"} <= set(summary)
    assert trainer_step(run_dir / "checkpoint-8") == 8 and (run_dir / "final/model.safetensors").is_file()
    assert not (run_dir / ".checkpoint-staging").exists()

    # The same command never interrupted: same steps, same losses (lmbda 0; resume restores data order and RNG).
    whole = cli(*[a if a != "killed" else "whole" for a in command], "--json",
                env=hook | {"ATLAS_TEST_COUNT": str(tmp_path / "whole")})
    assert whole.code == 0, whole.stderr
    # teacher, student before, student after; the resumed run read the first two back from before_training.json
    assert evaluations(tmp_path / "whole") == 3 and evaluations(tmp_path / "resumed") == 1
    assert (run_dir / "before_training.json").read_bytes() == before_training
    for key in ("teacher_eval", "student_before"):
        assert summary[key] == whole.json()[key]
    interrupted, uninterrupted = train_losses(run_dir), train_losses(tmp_path / "outputs/gkd/whole")
    assert list(interrupted) == list(uninterrupted) == list(range(1, 9))
    assert interrupted == pytest.approx(uninterrupted, rel=1e-5)
    assert whole.json()["steps"] == summary["steps"]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli, make_tiny_model, tmp_path):
    # lr 1e30: the first update blows the weights up, a later forward pass overflows to nan/inf.
    result = cli("train", *models(make_tiny_model), *TINY, "--max-steps", "6", "trainer.save_steps=1",
                 "trainer.learning_rate=1e30", "--run-name", "nan", "--json")
    assert result.code == 7, result.stderr
    error = result.json()["error"]
    assert error["type"] == "TrainingError" and "learning_rate" in error["fix"] and "Traceback" not in result.stderr
    step = int(re.search(r"The loss became (?:nan|inf|-inf) at step (\d+) \(of 6\)", error["message"]).group(1))
    assert step >= 2, error["message"]
    run_dir = tmp_path / "outputs/gkd/nan"
    last_good = run_dir / f"checkpoint-{step - 1}"
    assert f"The last good checkpoint is outputs/gkd/nan/{last_good.name}" in error["message"]
    assert trainer_step(last_good) == step - 1
    assert (last_good / "model.safetensors").is_file() and (last_good / "optimizer.pt").is_file()
    assert sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))[-1] == step - 1
    assert max(train_losses(run_dir)) == step - 1  # the failed step logged nothing
    # Documented: a failed run has no summary.json and no final/ (compare and chain read only finished runs).
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final").exists()


def test_unwritable_output_directory_is_exit_6_before_any_model_loads(cli, make_tiny_model, tmp_path):
    # Root ignores permission bits, so the unwritable place is a path under a regular file (ENOTDIR).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should go")
    result = cli("train", *models(make_tiny_model), *TINY, "--output-dir", str(blocker / "runs"), "--run-name", "x")
    assert result.code == 6, result.stderr
    message = " ".join(result.stderr.split())
    assert f"Cannot write the output directory {blocker / 'runs'}: {blocker} is not a directory." in message
    assert "Fix: Choose a writable output_dir (--output-dir)" in result.stderr
    assert "Loaded datasets" not in result.stderr and "Traceback" not in result.stderr


def test_too_little_free_disk_space_fails_before_training(monkeypatch, make_tiny_model, tmp_path):
    from atlas_distill.config import load_profile
    from atlas_distill.errors import OutputError
    from atlas_distill.training import run_training

    profile = load_profile("default", [*TINY, f"teacher_model_name_or_path={make_tiny_model(seed=2)}",
                                       f"model.model_name_or_path={make_tiny_model(seed=1)}",
                                       f"output_dir={tmp_path / 'runs'}", "run_name=full"], {})
    total = 10 * 2**30
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: types.SimpleNamespace(total=total, used=total - 500_000, free=500_000))
    lines = []
    with pytest.raises(OutputError) as caught:
        run_training(profile, on_event=lambda kind, data: lines.append((kind, data)))
    error = caught.value
    assert error.exit_code == 6
    # 791,120 float32 parameters: 3.2 MB of weights, 9.5 MB per checkpoint with AdamW's moments, + final/.
    assert error.message.startswith(f"Not enough free disk space in {tmp_path / 'runs' / 'full'}: 500.0 KB free, "
                                    "the run needs about 12.7 MB (one checkpoint: 9.5 MB")
    assert "--output-dir" in error.fix
    assert not (tmp_path / "runs/full").exists()  # no run started, so no run directory
    assert ("stage", "Training") not in lines


@pytest.mark.parametrize("exc, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     "the write failed ([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534)"),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device"),
])
def test_write_failures_of_torch_safetensors_and_os_become_output_errors(exc, reason, tmp_path):
    """What torch.save, safetensors and plain writes raise on a full disk (seen on a full tmpfs)."""
    from atlas_distill.outputs import write_failure

    error = write_failure(exc, tmp_path / "checkpoint-2" / "optimizer.pt")
    assert error.exit_code == 6 and f"failed: {reason} (" in error.message and "free there" in error.message
    assert write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), tmp_path) is None


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs: room for the run's first checkpoint (~10 MB with the tokenizer and CompactAdamW's bf16
    moments), not for a second, and more than the 12.7 MB the check before training asks for (which counts the
    moments in fp32)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"This test fills a small disk, a 16 MB tmpfs, and could not mount one: "
                    f"{done.stderr.decode().strip()}. Run the suite as root or with CAP_SYS_ADMIN (as CI does).")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_is_exit_6(cli, make_tiny_model, small_disk):
    result = cli("train", *models(make_tiny_model), *TINY, "--max-steps", "4", "trainer.save_steps=1",
                 "trainer.save_total_limit=3", "--output-dir", str(small_disk), "--run-name", "full")
    assert result.code == 6, result.stderr
    assert re.search(r"Error: Writing .*/\.checkpoint-staging/checkpoint-2 failed: No space left on device "
                     r"\([\d.]+ [KM]?B free there\)\.", result.stderr), result.stderr
    assert "Traceback" not in result.stderr and "Internal error" not in result.stderr
    # before training it warned that three checkpoints (plus the one being written) would not fit
    assert re.search(rf"Warning: [\d.]+ MB free in {re.escape(str(small_disk / 'full'))}; keeping 3 checkpoints "
                     r"\(trainer.save_total_limit\) needs up to [\d.]+ MB\.", " ".join(result.stderr.split()))
    run_dir = small_disk / "full"
    assert trainer_step(run_dir / "checkpoint-1") == 1  # the checkpoint before is whole
    assert not (run_dir / "checkpoint-2").exists() and not (run_dir / ".checkpoint-staging").exists()
