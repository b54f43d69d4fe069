"""`atlas-distill compare` through the real console script: crafted summaries, and tiny models on the spot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


# name: (eval/success_rate, eval/avg_tokens, eval/loss, student_parameters)
RUNS = {"run-a": (0.60, 100.0, 0.5, 134_515_008), "run-b": (0.75, 60.0, 0.25, 99_100_000),
        "run-c": (0.65, 90.0, None, 790_000)}
WIDE = {"COLUMNS": "200"}


MULTI_TURN = {"run-b": {"step_success_rate": 0.9, "episode_success_rate": 0.7}}  # the others: older runs


def write_summary(run_dir: Path, rate: float, tokens: float, loss: float | None, params: int, **extra) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"run_dir": str(run_dir), "teacher": "t", "student": "s", "teacher_parameters": 2 * params,
               "student_parameters": params, "data": {"eval_used": 20},
               "eval": {"success_rate": rate, "avg_tokens": tokens, "loss": loss} | MULTI_TURN.get(run_dir.name, {}),
               "baseline": {"success_delta": 99.0}, **extra}  # the stored baseline is recomputed, never shown
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> list[str]:
    for name, figures in RUNS.items():
        write_summary(tmp_path / "outputs/gkd" / name, *figures)
    return [f"outputs/gkd/{name}" for name in RUNS]


def rows_by_name(document: dict) -> dict[str, dict]:
    return {row["name"]: row for row in document["rows"]}


def test_table_shows_every_run_against_the_first(cli, runs):
    result = cli("compare", *runs, env=WIDE)
    assert result.code == 0, result.stderr
    cells = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
             if line.strip().startswith("run-")}
    assert cells == {
        "run-a": ["60.0%", "—", "+0.0", "pp", "100.0", "+0.0%", "ref", "0.5000", "134.5M"],
        "run-b": ["75.0%", "90.0%", "/", "70.0%", "+15.0", "pp", "60.0", "+40.0%", "✅", "0.2500", "99.1M"],
        "run-c": ["65.0%", "—", "+5.0", "pp", "90.0", "+10.0%", "❌", "—", "790.0K"],
    }
    assert "tokens/s" not in result.stdout  # no row has one: the column is left out
    assert "Reference: success 60.0% (run-a), 100.0 tokens (run-a)." in result.stdout
    assert "success delta >= 10.0 pp, token reduction >= 30.0%" in result.stdout


def test_the_table_fits_80_columns_turned_when_it_must(cli, runs):
    """Ten figures per run do not fit 80 columns: the table is turned (a row per figure, a column per run), and no
    line is wider than the terminal, so nothing wraps or is cut."""
    from rich.cells import cell_len

    result = cli("compare", *runs, env={"COLUMNS": "80"})
    assert result.code == 0, result.stderr
    table = result.stdout.split("Reference:")[0]
    assert max(cell_len(line) for line in table.splitlines()) <= 80, table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert rows["run"] == ["run-a", "run-b", "run-c"] and rows["success"] == ["60.0%", "75.0%", "65.0%"]
    assert rows["params"] == ["134.5M", "99.1M", "790.0K"]


def test_before_adds_each_runs_teacher_and_student_before_as_it_measured_them(cli, tmp_path):
    """`compare RUN --before`: the run's own teacher_eval and student_before as rows (no model is loaded), the
    student before training as the default reference, and only the run itself judged by --fail-on-miss."""
    write_summary(tmp_path / "run", 0.80, 40.0, 0.3, 1_000, teacher_eval={
        "success_rate": 0.95, "step_success_rate": 0.98, "episode_success_rate": 0.95, "avg_tokens": 50.0},
        student_before={"success_rate": 0.10, "step_success_rate": 0.4, "episode_success_rate": 0.05,
                        "avg_tokens": 70.0})
    write_summary(tmp_path / "old", 0.5, 10.0, None, 10)  # a run without before-training figures: just its row
    result = cli("compare", "run", "old", "--before", "--json", "--fail-on-miss", "trainer.baseline_tokens=null")
    rows = rows_by_name(result.json())
    assert list(rows) == ["run (teacher)", "run (before)", "run", "old"]
    teacher, before, after = rows["run (teacher)"], rows["run (before)"], rows["run"]
    assert (teacher["kind"], teacher["success_rate"], teacher["parameters"]) == ("teacher", 0.95, 2_000)
    assert (before["kind"], before["episode_success_rate"], before["parameters"]) == ("before", 0.05, 1_000)
    assert before["reference"] and after["success_delta_pp"] == pytest.approx(70.0)
    assert result.json()["missed"] == [] and result.code == 0  # old: +40 pp; the context rows are not judged
    table = cli("compare", "run", "--before", env=WIDE).stdout
    assert "run (teacher)" in table and "run (before)" in table


def test_before_keeps_the_student_before_of_a_run_that_never_loaded_its_teacher(cli, tmp_path):
    """A run from a teacher store with lmbda 0 never loads the teacher: teacher_eval is null, student_before is not."""
    write_summary(tmp_path / "run", 0.80, 40.0, 0.3, 1_000, teacher_eval=None, student_before={
        "success_rate": 0.10, "step_success_rate": 0.4, "episode_success_rate": 0.05, "avg_tokens": 70.0})
    result = cli("compare", "run", "--before", "--json", "trainer.baseline_tokens=null")
    rows = rows_by_name(result.json())
    assert list(rows) == ["run (before)", "run"] and result.code == 0, result.stderr
    assert rows["run (before)"]["reference"] and rows["run"]["success_delta_pp"] == pytest.approx(70.0)


def test_json_deltas_match_the_hand_computed_ones(cli, runs):
    result = cli("compare", *runs, "--json")
    assert result.code == 0, result.stderr
    document = result.json()
    assert document["reference"] == {"success": 0.6, "tokens": 100.0, "name": "run-a",
                                     "source": {"success": "run-a", "tokens": "run-a"}}
    assert document["targets"] == {"success_delta": 0.10, "token_reduction_pct": 30.0}
    rows = rows_by_name(document)
    assert list(rows) == ["run-a", "run-b", "run-c"]
    a, b, c = rows["run-a"], rows["run-b"], rows["run-c"]
    assert a["reference"] and a["meets_target"] is None and a["success_delta_pp"] == 0.0
    # b: 0.75 - 0.60 = +15 pp; (100 - 60) / 100 = 40 % fewer tokens: both targets met
    assert b["success_delta"] == pytest.approx(0.15) and b["success_delta_pp"] == pytest.approx(15.0)
    assert b["token_reduction_pct"] == pytest.approx(40.0) and b["meets_target"] is True
    # c: +5 pp < 10 pp and 10 % < 30 %: missed
    assert c["success_delta_pp"] == pytest.approx(5.0) and c["token_reduction_pct"] == pytest.approx(10.0)
    assert c["meets_success_target"] is False and c["meets_token_target"] is False and c["meets_target"] is False
    assert (b["eval_loss"], b["parameters"], b["eval_sessions"], b["kind"]) == (0.25, 99_100_000, 20, "run")
    assert b["path"] == "outputs/gkd/run-b/summary.json" and b["tokens_per_second"] is None
    assert (b["step_success_rate"], b["episode_success_rate"], a["step_success_rate"]) == (0.9, 0.7, None)
    assert document["missed"] == ["run-c"] and document["all_meet_targets"] is False


def test_markdown_is_one_table_for_a_pr(cli, runs):
    result = cli("compare", *runs, "--markdown")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("| run | success | step / episode | Δ vs baseline | avg tokens | token reduction | "
                        "meets target | eval loss | parameters | tokens/s |")
    assert lines[1] == "| --- |" + " ---: |" * 9
    assert lines[2:5] == ["| run-a | 60.0% | — | +0.0 pp | 100.0 | +0.0% | ref | 0.5000 | 134.5M | — |",
                          "| run-b | 75.0% | 90.0% / 70.0% | +15.0 pp | 60.0 | +40.0% | ✅ | 0.2500 | 99.1M | — |",
                          "| run-c | 65.0% | — | +5.0 pp | 90.0 | +10.0% | ❌ | — | 790.0K | — |"]
    assert lines[5] == "" and lines[6].startswith("Reference: success 60.0% (run-a)") and len(lines) == 7


def test_baseline_by_name_or_path_and_from_the_profile(cli, runs):
    by_name = cli("compare", *runs, "--baseline", "run-b", "--json").json()
    by_path = cli("compare", *runs, "--baseline", "outputs/gkd/run-b/summary.json", "--json").json()
    assert by_name == by_path and by_name["reference"]["name"] == "run-b"
    rows = rows_by_name(by_name)
    assert rows["run-b"]["reference"] and rows["run-a"]["success_delta_pp"] == pytest.approx(-15.0)
    assert rows["run-a"]["token_reduction_pct"] == pytest.approx((60 - 100) / 60 * 100)
    assert rows["run-c"]["success_delta_pp"] == pytest.approx(-10.0) and by_name["missed"] == ["run-a", "run-c"]

    # The profile's numbers: no row is the reference, every row is checked (+10 pp exactly meets the target).
    profile = cli("compare", *runs, "trainer.baseline_success=0.5", "trainer.baseline_tokens=200", "--json").json()
    assert profile["reference"] == {"success": 0.5, "tokens": 200.0, "name": None,
                                    "source": {"success": "profile", "tokens": "profile"}}
    rows = rows_by_name(profile)
    assert not any(row["reference"] for row in rows.values())
    assert rows["run-a"]["success_delta_pp"] == pytest.approx(10.0) and rows["run-a"]["meets_target"] is True
    assert rows["run-b"]["token_reduction_pct"] == pytest.approx(70.0) and profile["missed"] == []

    # baseline_tokens null: no token target for anyone.
    no_tokens = cli("compare", *runs, "trainer.baseline_success=0.7", "trainer.baseline_tokens=null", "--json").json()
    rows = rows_by_name(no_tokens)
    assert all(row["token_reduction_pct"] is None for row in rows.values())
    assert no_tokens["missed"] == ["run-a", "run-b", "run-c"]  # +5 pp at best

    unknown = cli("compare", *runs, "--baseline", "run-z")
    assert unknown.code == 1 and "`run-z` is none of the compared runs" in unknown.stderr
    assert "`run-a`, `run-b`, `run-c`" in unknown.stderr


def test_fail_on_miss_exits_3_only_when_a_compared_run_misses(cli, runs):
    missed = cli("compare", *runs, "--fail-on-miss", "--json")
    assert missed.code == 3 and "run-c" in missed.stderr
    assert missed.json()["missed"] == ["run-c"]  # stdout is still the one comparison document
    assert cli("compare", *runs).code == 0
    assert cli("compare", "outputs/gkd/run-a", "outputs/gkd/run-b", "--fail-on-miss").code == 0
    # The reference itself is never a miss, even though its delta is 0.
    assert cli("compare", "outputs/gkd/run-c", "--fail-on-miss").code == 0


def test_malformed_or_missing_summary_exits_8_naming_the_file(cli, runs, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/summary.json").write_text('{"eval": {"success_rate": 0.5,')
    result = cli("compare", runs[0], "broken")
    assert result.code == 8 and "broken/summary.json" in result.stderr and "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr

    write_summary(tmp_path / "partial", 1.5, 10.0, None, 5)
    summary = json.loads((tmp_path / "partial/summary.json").read_text())
    del summary["eval"]["avg_tokens"]
    (tmp_path / "partial/summary.json").write_text(json.dumps(summary))
    result = cli("compare", "partial/summary.json", "--json")
    assert result.code == 8
    assert result.json()["error"]["type"] == "InvalidRunSummary" and result.json()["exit_code"] == 8
    message = result.json()["error"]["message"]
    assert "partial/summary.json" in message and "`eval.avg_tokens` is missing" in message
    assert "`eval.success_rate` must be a number in [0, 1], got 1.5" in message

    (tmp_path / "unfinished").mkdir()
    result = cli("compare", "unfinished")
    assert result.code == 8 and "unfinished holds no summary.json" in result.stderr
    assert cli("compare", "no/such/run").code == 8


def test_a_chain_expands_into_its_stages(cli, tmp_path):
    chain = tmp_path / "outputs/chain/smol"
    stage1 = write_summary(chain / "stage-1-smollm2-135m@15L", 0.5, 40.0, 0.3, 70_000_000)
    stage2 = write_summary(chain / "stage-2-smollm2-135m@8L", 0.3, 20.0, 0.6, 40_000_000)
    (chain / "summary.json").write_text(json.dumps({"name": "smol", "stages": [
        {"stage": 1, "run_dir": str(stage1.relative_to(tmp_path)), "success_rate": 0.5},
        {"stage": 2, "run_dir": str(stage2.relative_to(tmp_path)), "success_rate": 0.3}]}))
    expected = ["smol/stage-1-smollm2-135m@15L", "smol/stage-2-smollm2-135m@8L"]
    whole = cli("compare", "outputs/chain/smol", "--json")
    assert whole.code == 0, whole.stderr
    assert [row["name"] for row in whole.json()["rows"]] == expected
    assert [row["kind"] for row in whole.json()["rows"]] == ["stage", "stage"]
    assert whole.json()["rows"][1]["success_delta_pp"] == pytest.approx(-20.0)
    (chain / "summary.json").unlink()  # an interrupted chain: its stage directories are read
    assert [row["name"] for row in cli("compare", "outputs/chain/smol", "--json").json()["rows"]] == expected
    one = cli("compare", str(stage2), "--json").json()["rows"]
    assert [(row["name"], row["kind"]) for row in one] == [("stage-2-smollm2-135m@8L", "stage")]


def test_same_named_runs_are_told_apart_and_plot_is_written(cli, tmp_path):
    write_summary(tmp_path / "old/run", 0.5, 10.0, None, 5)
    write_summary(tmp_path / "new/run", 0.7, 5.0, None, 5)
    result = cli("compare", "old/run", "new/run", "--plot", "cmp.png", "--json")
    assert result.code == 0, result.stderr
    assert [row["name"] for row in result.json()["rows"]] == ["old/run", "new/run"]
    assert result.json()["plot"] == "cmp.png"
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_are_evaluated_on_the_spot_beside_a_run(cli, make_tiny_model, trace_file, runs):
    first, second = str(make_tiny_model(seed=1)), str(make_tiny_model(seed=2))
    result = cli("compare", "outputs/gkd/run-a", "--model", first, "--model", second, "--traces", str(trace_file),
                 "--baseline", first, "trainer.max_new_tokens=4", "trainer.eval_max_sessions=3", "data.prompt=task",
                 "--json")
    assert result.code == 0, result.stderr
    document = result.json()
    rows = rows_by_name(document)
    assert list(rows) == ["run-a", first, second] and document["reference"]["name"] == first
    for name in (first, second):
        row = rows[name]
        assert row["kind"] == "model" and row["eval_sessions"] == 3 and row["parameters"] > 0
        assert 0 <= row["avg_tokens"] <= 4
        assert row["tokens_per_second"] > 0 and row["eval_seconds"] > 0
    assert rows[first]["reference"] and rows[second]["success_delta"] == pytest.approx(
        rows[second]["success_rate"] - rows[first]["success_rate"])


def test_a_model_is_judged_right_exactly_where_its_answers_are_the_references(cli, make_tiny_model, tmp_path):
    """Traces whose answers are what one tiny model itself answers (found with plain transformers): compare
    must find that model right on every session and another model, which answers otherwise, right on none."""
    from helpers import greedy_answers

    first, second = make_tiny_model(seed=1), make_tiny_model(seed=2)
    tasks = [f"Name the code word {n}." for n in range(12)]
    asked = [[{"role": "system", "content": f"Task: {task}"}, {"role": "user", "content": task},
              {"role": "assistant", "content": ""}] for task in tasks]
    own, other = greedy_answers(first, asked, max_new_tokens=4), greedy_answers(second, asked, max_new_tokens=4)
    assert all(own) and all(a != b for a, b in zip(own, other)), (own, other)  # what the test relies on
    lines = [json.dumps({"task": task, "final_answer": answer, "session_metadata": {"session_id": n + 1},
                         "reward_stats": {"score": 1.0}}) for n, (task, answer) in enumerate(zip(tasks, own))]
    (tmp_path / "own.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("compare", "--model", str(first), "--model", str(second), "--traces", "own.jsonl",
                 "data.prompt=task", "data.review_status=null", "trainer.min_reward=null", "data.eval_split=0.5",
                 "trainer.max_new_tokens=4", "trainer.eval_max_sessions=100", "--json")
    assert result.code == 0, result.stderr
    rows = rows_by_name(result.json())
    assert rows[str(first)]["eval_sessions"] == rows[str(second)]["eval_sessions"] >= 3
    assert rows[str(first)]["success_rate"] == 1.0 and rows[str(second)]["success_rate"] == 0.0

