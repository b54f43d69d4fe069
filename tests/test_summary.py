"""The typed run records: what train writes to summary.json reads back equal; older and hand-made files still read."""

import json

import pytest

from atlas_distill.evaluate import baseline_summary
from atlas_distill.runs.summary import BaselineSummary, Figures, RunSummary

AFTER = Figures(success_rate=0.9, avg_tokens=41.5, step_success_rate=0.95, episode_success_rate=0.85)


def full_summary() -> RunSummary:
    baseline = baseline_summary(AFTER, 0.5, 60.0)
    baseline.source = {"success": "measured", "tokens": "profile"}
    return RunSummary(eval=AFTER, eval_loss=0.125, baseline=baseline,
                      teacher_eval=Figures(0.95, 40.0, 0.97, 0.9), student_before=Figures(0.5, 60.0, 0.6, 0.2),
                      run_dir="outputs/gkd/r", final_dir="outputs/gkd/r/final", profile="demo", teacher="t",
                      student="s", teacher_parameters=1000, student_parameters=500,
                      data={"train": 10, "eval": 3, "eval_used": 3}, steps=40, processes=1, seconds=12.5,
                      timings={"train": 10.0}, train_loss=0.5)


def test_a_summary_reads_back_equal_through_json():
    summary = full_summary()
    document = json.loads(json.dumps(summary.to_dict()))
    assert RunSummary.from_dict(document) == summary


def test_the_json_keeps_its_keys_and_drops_only_meets_all_targets():
    document = full_summary().to_dict()
    assert document["eval"] == {"success_rate": 0.9, "step_success_rate": 0.95, "episode_success_rate": 0.85,
                                "avg_tokens": 41.5, "loss": 0.125}
    assert {"run_dir", "final_dir", "profile", "teacher", "student", "teacher_parameters", "student_parameters",
            "data", "teacher_eval", "student_before", "eval", "baseline", "steps", "processes", "seconds",
            "timings", "train_loss"} == set(document)
    baseline = document["baseline"]
    assert "meets_all_targets" not in baseline
    assert baseline["meets_target"] is True and baseline["success_delta_pp"] == pytest.approx(40.0)
    assert baseline["source"] == {"success": "measured", "tokens": "profile"}


def test_an_older_file_with_meets_all_targets_still_reads():
    document = full_summary().to_dict()
    document["baseline"]["meets_all_targets"] = document["baseline"]["meets_target"]
    assert RunSummary.from_dict(document).baseline.meets_target is True


@pytest.mark.parametrize(("success_rate", "meets"), [(0.9, True), (0.55, False)])
def test_meets_target_is_computed_from_the_two_targets(success_rate, meets):
    summary = baseline_summary({"success_rate": success_rate, "avg_tokens": 30.0}, 0.5, 60.0)
    assert isinstance(summary, BaselineSummary) and summary.meets_target is meets
    assert BaselineSummary.from_dict(summary.to_dict()) == summary


def test_a_hand_made_summary_with_only_eval_reads_and_odd_values_read_as_absent():
    summary = RunSummary.from_dict({"eval": {"success_rate": 0.5, "avg_tokens": 3}, "student": 7, "data": [1],
                                    "steps": True, "teacher_eval": {"success_rate": 2.0, "avg_tokens": 1}})
    assert summary.eval == Figures(0.5, 3.0)
    assert (summary.student, summary.data, summary.steps, summary.teacher_eval, summary.baseline) == \
        (None, {}, None, None, None)
