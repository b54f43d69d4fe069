"""RunDir: the checks before a run, resume, and the records it keeps, on real directories."""

import json

import pytest

from atlas_distill.config import Profile
from atlas_distill.errors import UsageError
from atlas_distill.evaluate import baseline_summary
from atlas_distill.runs.layout import RunDir, checkpoint_step
from atlas_distill.runs.summary import Figures, RunSummary


def events():
    said = []
    return said, lambda kind, data: said.append((kind, data))


def test_a_new_run_checks_without_making_anything_and_refuses_a_used_directory(tmp_path):
    profile = Profile(output_dir=str(tmp_path / "out"), run_name="r")
    run = RunDir.for_profile(profile, "fast")
    assert run.path == tmp_path / "out/r"
    said, emit = events()
    assert run.prepare(resume=False, emit=emit) is None and not (tmp_path / "out").exists()
    run.path.mkdir(parents=True)
    (run.path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="already holds a run"):
        run.prepare(resume=False, emit=emit)
    assert RunDir.for_profile(Profile(output_dir=str(tmp_path)), "profiles/fast.yaml").name.startswith("fast-")


def test_resume_takes_the_newest_whole_checkpoint_and_drops_torn_ones(tmp_path):
    run = RunDir(tmp_path / "r")
    for step in (1, 2, 3):
        (run.path / f"checkpoint-{step}").mkdir(parents=True)
    for step in (1, 2):
        (run.path / f"checkpoint-{step}/trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run.path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    said, emit = events()
    checkpoint = run.prepare(resume=True, emit=emit)
    assert checkpoint == run.path / "checkpoint-2" and checkpoint_step(checkpoint) == 2
    assert not (run.path / "checkpoint-3").exists() and "checkpoint-3" in said[0][1]
    assert [json.loads(line)["step"] for line in (run.path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(UsageError, match="holds no checkpoint"):
        RunDir(tmp_path / "empty").prepare(resume=True, emit=emit)


def test_before_training_figures_are_reused_only_under_the_same_key(tmp_path):
    run = RunDir(tmp_path)
    teacher, student = Figures(0.9, 10.0, 0.95, 0.8), Figures(0.1, 12.0, 0.2, 0.0)
    run.save_before_training({"teacher": "t", "sessions": [1, 2]}, teacher, student)
    assert run.before_training({"teacher": "t", "sessions": [1, 2]}) == (teacher, student)
    assert run.before_training({"teacher": "t", "sessions": [1, 3]}) is None


def test_a_run_is_complete_only_with_its_final_model_and_summary(tmp_path):
    run = RunDir(tmp_path)
    after = Figures(0.5, 3.0)
    summary = RunSummary(eval=after, baseline=baseline_summary(after, 0.25, None))
    run.write_summary(summary)
    assert run.finished_summary() is None  # no final/ model yet
    run.final.mkdir()
    (run.final / "config.json").write_text("{}")
    (run.final / "model.safetensors").write_bytes(b"x")
    assert run.finished_summary() == summary == run.read_summary()
    run.summary_path.write_text("{not json")
    assert run.finished_summary() is None
