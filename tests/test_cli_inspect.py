"""`atlas-distill inspect` on files and on the database, through the real console script."""

from __future__ import annotations

import json
from collections import Counter

import pytest



def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_inspect_json_counts_match_the_file(cli, trace_file):
    result = cli("inspect", str(trace_file), "--json", "--top", "3")
    assert result.code == 0, result.stderr
    report = result.json()
    rows = records(trace_file)
    assert report["sessions"] == len(rows) == 300
    scores = [r["reward_stats"]["score"] for r in rows if r.get("reward_stats")]
    assert report["no_reward"] == 300 - len(scores) > 0
    assert sum(b["count"] for b in report["reward"]) == len(scores)
    high = next(b for b in report["reward"] if b["label"] == "0.9-1.0")
    assert high["count"] == sum(1 for s in scores if s >= 0.9)
    assert report["reward_mean"] == pytest.approx(sum(scores) / len(scores))
    keys = Counter(r["session_metadata"]["learning_key"] for r in rows)
    assert len(report["learning_keys"]) == 4  # top 3 + the rest grouped
    assert report["learning_keys"][0] == {"label": keys.most_common(1)[0][0], "count": keys.most_common(1)[0][1]}
    assert report["learning_keys"][-1]["label"] == f"({len(keys) - 3} other keys)"
    reviews = Counter(r["review_status"] for r in rows)
    assert {b["label"]: b["count"] for b in report["review_status"]} == dict(reviews)
    assert sum(b["count"] for b in report["turns"]) == 300
    assert sum(b["count"] for b in report["approx_tokens"]) == 300


def test_inspect_tables_and_plot(cli, trace_file, tmp_path):
    result = cli("inspect", str(trace_file), "--plot", "hist.png")
    assert result.code == 0, result.stderr
    for title in ("Reward", "learning_key", "Review status", "Turns per conversation", "Approx. tokens"):
        assert title in result.stdout
    png = (tmp_path / "hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_inspect_filtered_applies_the_profile(cli, trace_file):
    result = cli("inspect", str(trace_file), "--filtered", "--profile", "fast", "--json")
    assert result.code == 0, result.stderr
    rows = records(trace_file)
    expected = [r for r in rows if r["review_status"] == "approved" and (r.get("reward_stats") or {}).get(
        "score", -1) >= 0.7]
    assert result.json()["sessions"] == len(expected)


def test_a_filter_override_without_filtered_is_named_not_silently_ignored(cli, trace_file):
    everything = cli("inspect", str(trace_file), "--json").json()["sessions"]
    result = cli("inspect", str(trace_file), "trainer.min_reward=0.95", "--json")
    assert result.code == 0 and result.json()["sessions"] == everything  # every session is still counted
    assert "Note: trainer.min_reward=0.95 filters only with --filtered" in " ".join(result.stderr.split())
    filtered = cli("inspect", str(trace_file), "trainer.min_reward=0.95", "--filtered", "--json")
    assert filtered.json()["sessions"] < everything and "Note:" not in filtered.stderr
    assert "Note:" not in cli("inspect", str(trace_file), "trainer.max_new_tokens=8").stderr  # not a filter


def test_inspect_the_database(cli, seeded_db):
    result = cli("inspect", "--database-url", seeded_db, "--json")
    assert result.code == 0, result.stderr
    assert result.json()["sessions"] == 300


def test_malformed_line_exit_5_names_the_line(cli, trace_file, tmp_path):
    lines = trace_file.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:4] + ['{"task": "x", "steps": {}}'] + lines[4:10]) + "\n")
    result = cli("inspect", str(bad))
    assert result.code == 5
    assert f"{bad}:5: not an Atlas session: `steps` must be a list or null, got an object" in result.stderr
    assert "--skip-invalid" in result.stderr and "Traceback" not in result.stderr
    skipped = cli("inspect", str(bad), "--skip-invalid", "--json")
    assert skipped.code == 0 and skipped.json()["sessions"] == 10 and skipped.json()["invalid_skipped"] == 1


def test_a_file_of_only_invalid_lines_says_so_with_skip_invalid(cli, tmp_path):
    (tmp_path / "bad.jsonl").write_text('x\n{"task": 1\n[]\n')
    for extra in ([], ["--filtered"]):
        result = cli("inspect", "bad.jsonl", "--skip-invalid", *extra)
        assert result.code == 2 and "Traceback" not in result.stderr
        assert "No valid session in bad.jsonl: all 3 lines were invalid and skipped." in result.stderr
        assert "passed the filters" not in result.stderr


def test_empty_file_exit_2(cli, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = cli("inspect", "empty.jsonl")
    assert result.code == 2 and "is empty" in result.stderr


def test_stdin_and_arc_atlas_file(cli):
    line = {"task": "t", "final_answer": "a", "plan": {}, "steps": [], "session_metadata": {"session_id": 1},
            "drift_alert": True, "brand_new_key": [1]}
    result = cli("inspect", "-", "--json", input=json.dumps(line) + "\n")
    assert result.code == 0, result.stderr
    assert result.json()["sessions"] == 1 and result.json()["no_reward"] == 1


def test_inspect_needs_something(cli):
    result = cli("inspect")
    assert result.code == 1 and "Nothing to inspect" in result.stderr


def test_comment_lines_are_counted_never_an_error(cli, trace_file, tmp_path):
    """The SDK's own trace files open with a `# ...` line: every reader skips such lines and inspect counts them."""
    lines = trace_file.read_text().splitlines()
    commented = tmp_path / "commented.jsonl"
    commented.write_text("\n".join(["# exported by the Atlas SDK", *lines[:10], "  # a note", *lines[10:20]]) + "\n")
    result = cli("inspect", str(commented), "--json")
    assert result.code == 0, result.stderr
    assert result.json()["sessions"] == 20 and result.json()["comment_lines"] == 2
    assert result.json()["invalid_skipped"] == 0
    table = cli("inspect", str(commented))
    assert "20 sessions" in table.stdout and "2 comment lines (#)" in table.stdout
    from atlas_distill.data import load_prepared
    from atlas_distill.traces import TraceFilter

    prepared = load_prepared(traces=str(commented), filters=TraceFilter(min_reward=None, review_status=None),
                             eval_split=0.2)
    assert prepared.stats.sessions == 20  # training reads the same twenty sessions


def test_learning_keys_are_shown_whole_at_80_columns(cli, tmp_path):
    """A sha256 learning key cut with an ellipsis could not be copied into --learning-key; at 80 columns it is
    printed whole and the bars take what width is left."""
    import hashlib
    import json

    from rich.cells import cell_len

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
    lines = [json.dumps({"task": f"t{i}", "final_answer": "a", "learning_key": keys[i % 3]}) for i in range(9)]
    (tmp_path / "sha.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("inspect", "sha.jsonl", env={"COLUMNS": "80"})
    assert result.code == 0, result.stderr
    for key in keys:
        assert f"  {key}  " in result.stdout
    assert max(cell_len(line) for line in result.stdout.splitlines()) <= 80
