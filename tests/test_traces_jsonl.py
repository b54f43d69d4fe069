"""The record model and JSONL files: round trips, arc-atlas files, malformed input."""

from __future__ import annotations

import gzip
import json

import pytest

from atlas_distill.errors import InvalidTraceData, NoTracesFound, OutputError
from atlas_distill.traces import AtlasSession, JsonlTraceSink, JsonlTraceSource, TraceFilter

# As arc-atlas writes it: its own optional keys, plus keys we have never seen.
ARC_ATLAS_LINE = {
    "task": "Summarise the ticket",
    "final_answer": "Done.",
    "plan": {"steps": [{"id": 1, "description": "Read the ticket", "depends_on": []}]},
    "steps": [{"step_id": 1, "description": "Read the ticket", "trace": "t", "output": "read",
               "reward": {"score": 0.9, "judges": [], "rationale": None, "raw": {}}, "tool": None,
               "tool_params": {}, "context": {"prior_results": {}}, "validation": {}, "attempts": 1,
               "guidance": ["be brief"], "metadata": {"raw_evaluation": {"raw": None}}}],
    "session_metadata": {"session_id": 42, "status": "succeeded", "learning_key": "support",
                         "trajectory_events": [{"event": {"payload": {"event_type": "LLM_END"}}}]},
    "review_status": "approved",
    "reward_stats": {"score": 0.91, "score_mean": 0.91},
    "adaptive_summary": {"mode": "coach"},
    "some_future_key": {"nested": [1, 2, {"x": "ü"}]},
}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_arc_atlas_record_round_trips_with_unknown_keys(tmp_path):
    source = write_lines(tmp_path / "arc.jsonl", [ARC_ATLAS_LINE])
    sessions = list(JsonlTraceSource(source))
    assert len(sessions) == 1
    session = sessions[0]
    assert (session.session_id, session.reward, session.learning_key) == (42, 0.91, "support")
    assert (session.status, session.review_status) == ("succeeded", "approved")
    out = tmp_path / "out.jsonl"
    sink = JsonlTraceSink(out)
    sink.write(session)
    sink.commit()
    assert json.loads(out.read_text()) == ARC_ATLAS_LINE  # compact JSON, the same values


def test_gzip_files_are_read_and_written(tmp_path):
    out = tmp_path / "out.jsonl.gz"
    sink = JsonlTraceSink(out)
    for _ in range(3):
        sink.write(AtlasSession.from_json(ARC_ATLAS_LINE))
    sink.commit()
    with gzip.open(out, "rt") as handle:
        assert len(handle.readlines()) == 3
    assert len(list(JsonlTraceSource(out))) == 3


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"task": "x", ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got a list"),
        ('{"final_answer": "x"}', "missing the required key `task`"),
        ('{"task": "x", "steps": "oops"}', "`steps` must be a list or null, got a string"),
        ('{"task": "x", "steps": [3]}', "`steps[0]` must be an object"),
        ('{"task": 7}', "`task` must be a string, got a number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    path = write_lines(tmp_path / "bad.jsonl", [ARC_ATLAS_LINE, line, ARC_ATLAS_LINE])
    with pytest.raises(InvalidTraceData) as caught:
        list(JsonlTraceSource(path))
    assert f"{path}:2:" in str(caught.value) and needle in str(caught.value)
    assert "--skip-invalid" in caught.value.fix
    assert caught.value.exit_code == 5


def test_skip_invalid_skips_and_counts(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [ARC_ATLAS_LINE, "nope", "{}", ARC_ATLAS_LINE])
    source = JsonlTraceSource(path, skip_invalid=True)
    assert len(list(source)) == 2
    assert source.invalid == 2


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(ARC_ATLAS_LINE).encode() + b"\n" + b'{"task": "\xff\xfe"}\n')
    with pytest.raises(InvalidTraceData, match=r"bytes.jsonl:2: not valid UTF-8"):
        list(JsonlTraceSource(path))


def test_empty_file_says_so(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(NoTracesFound, match="is empty"):
        list(JsonlTraceSource(path))


def test_missing_file(tmp_path):
    with pytest.raises(InvalidTraceData, match="does not exist"):
        list(JsonlTraceSource(tmp_path / "nope.jsonl"))


def test_truncated_gzip_is_reported(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for _ in range(200):
            handle.write(json.dumps(ARC_ATLAS_LINE) + "\n")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InvalidTraceData, match="damaged or truncated"):
        list(JsonlTraceSource(path))


def test_null_and_missing_reward_fields_do_not_crash(tmp_path):
    lines = [{"task": "a"}, {"task": "b", "reward_stats": None}, {"task": "c", "reward_stats": {"score": None}},
             {"task": "d", "reward_stats": {"score": "high"}}, {"task": "e", "reward_stats": {"score": 0.95}}]
    path = write_lines(tmp_path / "r.jsonl", lines)
    assert [s.reward for s in JsonlTraceSource(path)] == [None, None, None, None, 0.95]
    kept = list(JsonlTraceSource(path, TraceFilter(min_reward=0.0, review_status=None)))
    assert [s.task for s in kept] == ["e"]


def test_file_filters_match_the_sql_semantics(tmp_path):
    base = dict(ARC_ATLAS_LINE)
    lines = [base | {"review_status": "pending"}, base | {"reward_stats": {"score": 0.5}}, base,
             base | {"learning_key": "other", "session_metadata": {"session_id": 1, "learning_key": "other"}}]
    path = write_lines(tmp_path / "f.jsonl", lines)
    filters = TraceFilter(min_reward=0.8, learning_key="support")
    source = JsonlTraceSource(path, filters)
    assert len(list(source)) == 1 and source.filtered_out == 3
    assert len(list(JsonlTraceSource(path, TraceFilter(review_status=None, limit=2)))) == 2


def test_aborted_sink_leaves_previous_file_and_no_temporary(tmp_path):
    out = tmp_path / "runtime.jsonl"
    out.write_text("previous complete export\n")
    sink = JsonlTraceSink(out)
    sink.write(AtlasSession.from_json(ARC_ATLAS_LINE))
    sink.abort()
    assert out.read_text() == "previous complete export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["runtime.jsonl"]


def test_unwritable_output_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="Cannot write"):
        JsonlTraceSink(blocker / "sub" / "x.jsonl")


def test_values_orjson_cannot_hold_exactly_are_kept_exactly(tmp_path):
    big = {"task": "t", "session_metadata": {"session_id": 123456789012345678901234567890}, "x": -(2**70)}
    path = write_lines(tmp_path / "big.jsonl", [big])
    session = next(iter(JsonlTraceSource(path)))
    assert session.session_id == 123456789012345678901234567890
    assert json.loads(session.to_json_bytes()) == big
