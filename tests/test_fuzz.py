"""Fuzzed input (issue 6): trace files, session records and profiles give a result or one of our errors.

Every generated case must end in a valid result or an AtlasDistillError with a message (the
record model's RecordError, which both trace sources turn into InvalidTraceData, is allowed
where AtlasSession.from_json is called directly); any other exception fails the test.
Examples are derandomized and no example database is kept, so CI runs the same cases.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import sys
from datetime import timedelta, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from atlas_distill.config import Profile, known_keys, load_profile, profile_to_yaml
from atlas_distill.data import conversation_row, load_prepared, prepare_conversations, split_of
from atlas_distill.errors import AtlasDistillError, InvalidTraceData, NoTracesFound, ProfileError
from atlas_distill.inspect import inspect_sessions
from atlas_distill.traces.json_codec import loads
from atlas_distill.traces import AtlasSession, JsonlTraceSink, JsonlTraceSource, RecordError, TraceFilter
from atlas_distill.traces.conversation import session_to_messages


def fuzz(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def cli_stack(test):
    """Run the test body with the stack headroom the CLI has (Python's default limit of 1,000 frames).

    Hypothesis raises the recursion limit while a test runs, which hides the RecursionError that a value
    about 1,000 levels deep causes in production.
    """

    @functools.wraps(test)
    def run(*args, **kwargs):
        frame, depth = sys._getframe(), 0
        while frame:
            frame, depth = frame.f_back, depth + 1
        saved = sys.getrecursionlimit()
        sys.setrecursionlimit(depth + 950)
        try:
            return test(*args, **kwargs)
        finally:
            sys.setrecursionlimit(saved)

    return run


def outcome(call, *allowed: type[Exception]):
    """call()'s result, or the allowed error it raised, which must carry a message; anything else fails."""
    try:
        return call()
    except allowed as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return exc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- JSON values and session-shaped objects -------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**40)
           | st.floats() | st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=16)


def mostly(good):
    """The right shape three times out of four, else any JSON value (a wrong type, usually)."""
    return st.one_of(good, good, good, json_values)


def maybe_dict(**fields):
    return mostly(st.fixed_dictionaries({}, optional=fields))


texts = st.text(max_size=40) | st.sampled_from(["", " ", "\n", "\x00", "\u2028", "Done: 4", "ü" * 3])
payloads = maybe_dict(
    event_type=mostly(st.sampled_from(["LLM_START", "LLM_END", "TASK_START", "TASK_END", "CUSTOM_END",
                                       "TOOL_END", "AGENT_ACTION"])),
    name=mostly(texts),
    metadata=maybe_dict(actor=mostly(st.sampled_from(["student", "teacher", "system", ""]))),
    data=maybe_dict(input=mostly(texts), output=mostly(texts)),
)
events = st.one_of(payloads.map(lambda p: {"id": 1, "event": {"payload": p}}), payloads.map(lambda p: {"payload": p}),
                   json_values)
steps = maybe_dict(step_id=json_values, description=mostly(texts), output=mostly(texts),
                   guidance=mostly(st.lists(mostly(texts), max_size=3)), tool=json_values)
sessions = st.fixed_dictionaries(
    {"task": mostly(texts)},
    optional={
        "final_answer": mostly(texts | st.none()),
        "plan": maybe_dict(steps=mostly(st.lists(maybe_dict(description=mostly(texts)), max_size=3))),
        "steps": mostly(st.lists(steps, max_size=4)),
        "trajectory_events": mostly(st.lists(events, max_size=6)),
        "session_metadata": maybe_dict(
            session_id=mostly(st.integers()), learning_key=mostly(texts), status=mostly(texts),
            created_at=mostly(st.datetimes().map(lambda d: d.isoformat()) | texts)),
        "reward_stats": maybe_dict(score=st.floats() | st.integers() | st.integers(min_value=10**308) | json_values),
        "review_status": mostly(st.sampled_from(["approved", "pending", "rejected"])),
        "learning_key": mostly(texts | st.none()),
        "brand_new_key": json_values,
    },
)
any_object = sessions | json_values

utc_offsets = st.builds(timezone, st.timedeltas(min_value=-timedelta(hours=23), max_value=timedelta(hours=23)))
filters = st.none() | st.builds(
    TraceFilter,
    min_reward=st.none() | st.floats(-2, 2),
    learning_key=st.none() | texts,
    review_status=st.none() | st.tuples(st.sampled_from(["approved", "pending"])),
    status=st.none() | st.tuples(texts),
    created_after=st.none() | st.datetimes(timezones=st.none() | utc_offsets),
    session_ids=st.none() | st.tuples(st.integers(-3, 3)),
    limit=st.none() | st.integers(1, 5),
)


def dumps(value, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


# --- layer 1: JSONL files ---------------------------------------------------------------------------------

NASTY_LINES = [
    b"\xef\xbb\xbf" + b'{"task": "bom", "final_answer": "a"}',  # a byte order mark
    b'{"task": "nan", "final_answer": "a", "reward_stats": {"score": NaN}}',
    b'{"task": "inf", "final_answer": "a", "reward_stats": {"score": -Infinity}}',
    b'{"task": "big", "final_answer": "a", "reward_stats": {"score": 1e999}}',
    b'{"task": "huge float", "final_answer": "a", "reward_stats": {"score": 1e308}}',
    b'{"task": "\\ud800 lone", "final_answer": "a"}',
    b'{"task": "\xed\xa0\x80 surrogate bytes", "final_answer": "a"}',
    b'{"task": "pair \\ud83d\\ude00", "final_answer": "a"}',
    b'{"task": "latin-1 \xe9", "final_answer": "a"}',
    b'{"task": "x", "session_metadata": {"session_id": ' + b"7" * 5000 + b"}}",
    b'{"task": "x", "session_metadata": {"session_id": ' + b"7" * 30 + b"}}",
    b'{"task": "x", "final_answer": "y", "reward_stats": {"score": ' + b"9" * 400 + b"}}",
    b"[" * 10_000 + b"]" * 10_000,
    b'{"task": "deep", "final_answer": "a", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"task": "deep", "final_answer": "a", "steps": [{"output": ' + b"[" * 1020 + b"]" * 1020 + b"}]}",
    b'{"task": "x"}' + b"\x00",
    b"\x00" + b'{"task": "x"}',
    b'"just a string"',
    b"12345678901234567890123",
    b"null",
    b"\r",
    b"\t  ",
]

def spliced(value, at: int, junk: bytes) -> bytes:
    """A session's JSON with arbitrary bytes (invalid UTF-8, often) inserted at `at`."""
    line = dumps(value, ascii_only=False)
    return (line[:at] + junk + line[at:]).replace(b"\n", b"")


lines = st.one_of(
    st.tuples(sessions, st.booleans()).map(lambda t: dumps(*t)),
    st.tuples(json_values, st.booleans()).map(lambda t: dumps(*t)),
    st.tuples(sessions, st.booleans(), st.integers(0, 300)).map(lambda t: dumps(t[0], t[1])[: t[2]]),  # cut short
    st.builds(spliced, sessions, st.integers(0, 300), st.binary(min_size=1, max_size=3)),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from(NASTY_LINES),
    st.just(b""),
)


@st.composite
def trace_files(draw) -> bytes:
    body = b"\n".join(draw(st.lists(lines, max_size=6))) + draw(st.sampled_from([b"\n", b"", b"\r\n"]))
    how = draw(st.sampled_from(["plain", "plain", "gzip", "truncated gzip", "corrupt gzip"]))
    if how == "plain":
        return body
    packed = gzip.compress(body, mtime=0)
    if how == "truncated gzip":
        return packed[: draw(st.integers(0, len(packed) - 1))]
    if how == "corrupt gzip":
        at = draw(st.integers(10, len(packed) - 1))
        return packed[:at] + bytes([packed[at] ^ draw(st.integers(1, 255))]) + packed[at + 1:]
    return packed


def check_session(session: AtlasSession) -> None:
    """What every consumer relies on, for a session either source gives."""
    assert isinstance(session.data, dict) and isinstance(session.task, str)
    assert isinstance(session.final_answer, str) and isinstance(session.metadata, dict)
    assert session.reward is None or (isinstance(session.reward, float) and abs(session.reward) < float("inf"))
    assert session.learning_key is None or (isinstance(session.learning_key, str) and session.learning_key)
    messages = outcome(lambda: session_to_messages(session), InvalidTraceData)
    if isinstance(messages, list):
        check_messages(messages)


def check_messages(messages: list[dict[str, str]]) -> None:
    """[system, user, assistant, ..., user, assistant(final answer)]: roles alternate after the system turn."""
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "assistant" and len(roles) >= 3
    assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2), roles


def check_written(sessions: list[AtlasSession], path: Path) -> None:
    """What the reader accepts, the sink writes (or refuses with InvalidTraceData) and the reader reads back."""
    sink = JsonlTraceSink(path)
    for session in sessions:
        if isinstance(outcome(lambda s=session: sink.write(s), InvalidTraceData), AtlasDistillError):
            sink.abort()
            return
    sink.commit()
    if sessions:
        assert [s.data.keys() for s in JsonlTraceSource(path)] == [s.data.keys() for s in sessions]


def read(path: Path, trace_filter: TraceFilter | None = None, skip_invalid: bool = False):
    source = JsonlTraceSource(path, trace_filter, skip_invalid=skip_invalid)
    return source, outcome(lambda: list(source), InvalidTraceData, NoTracesFound)


@fuzz(500)
@given(content=trace_files(), trace_filter=filters, skip_invalid=st.booleans())
@cli_stack
def test_any_trace_file_reads_or_raises_invalid_trace_data(workdir, content, trace_filter, skip_invalid):
    path = workdir / "fuzzed.jsonl"
    path.write_bytes(content)
    source, result = read(path, trace_filter, skip_invalid)
    if isinstance(result, AtlasDistillError):
        assert str(path) in result.message and result.fix
        line = re.match(rf"{re.escape(str(path))}:(\d+): ", result.message)
        assert line is None or 1 <= int(line.group(1)) <= source.read_lines
        return
    assert skip_invalid or source.invalid == 0
    assert len(result) <= source.valid - source.filtered_out
    if not content.startswith(b"\x1f\x8b") and (trace_filter is None or trace_filter.limit is None):
        # every non-blank line is a session, an invalid line or a comment (`#`), counted once
        lines = [line for line in content.split(b"\n") if line.strip()]
        assert source.valid + source.invalid + source.comments == len(lines)
        assert source.comments == sum(line.lstrip().startswith(b"#") for line in lines)
    for session in result:
        assert trace_filter is None or trace_filter.matches(session)
        check_session(session)
    check_written(result, workdir / "written.jsonl")


ANSWERED = {"task": "t", "final_answer": "a"}
DEEP_HOLDERS = {  # where a deeply nested value goes ("DEEP" is replaced by it)
    "line": "DEEP",
    "task": {"task": "DEEP"},
    "unknown key": ANSWERED | {"x": "DEEP"},
    "step output": ANSWERED | {"steps": [{"description": "d", "output": "DEEP"}]},
    "event output": ANSWERED | {"trajectory_events": [{"event": {"payload": {
        "event_type": "LLM_END", "metadata": {"actor": "student"}, "data": {"output": "DEEP"}}}}]},
    "plan step": ANSWERED | {"plan": {"steps": [{"description": "DEEP"}]}},
    "session_id": ANSWERED | {"session_metadata": {"session_id": "DEEP"}},
    "reward": ANSWERED | {"reward_stats": {"score": "DEEP"}},
}


@fuzz(120)
@given(depth=st.integers(1, 20_000) | st.integers(950, 1030), bracket=st.sampled_from(["[]", "{}"]),
       where=st.sampled_from(sorted(DEEP_HOLDERS)))
@example(depth=10_000, bracket="[]", where="line")
@example(depth=1_010, bracket="[]", where="event output")
@example(depth=1_010, bracket="[]", where="step output")
@example(depth=1_010, bracket="[]", where="plan step")
@example(depth=1_010, bracket="{}", where="session_id")
@cli_stack
def test_deep_nesting_is_invalid_trace_data_never_a_recursion_error(workdir, depth, bracket, where):
    opening, closing = bracket
    deep = ('{"k": ' if opening == "{" else "[") * depth + "1" + closing * depth
    path = workdir / "deep.jsonl"
    path.write_text(json.dumps(DEEP_HOLDERS[where]).replace('"DEEP"', deep) + "\n")
    source, result = read(path)
    if isinstance(result, AtlasDistillError):
        assert f"{path}:1:" in result.message
        assert depth > 500 or where in ("line", "task"), result  # shallow values are read
        return
    for session in result:
        check_session(session)
    check_written(result, workdir / "written.jsonl")
    outcome(lambda: inspect_sessions(result, source=str(path)), InvalidTraceData)
    for prompt in ("conversation", "task"):
        outcome(lambda: prepare_conversations(result, source=str(path), prompt=prompt), InvalidTraceData)


@fuzz(12)
@given(size=st.integers(0, 5_000_000), kind=st.sampled_from(["string", "digits", "fraction", "keys", "lines"]))
@example(size=5_000_000, kind="string")
@example(size=100_000, kind="digits")
@cli_stack
def test_huge_values_read_or_raise_invalid_trace_data(workdir, size, kind):
    path = workdir / "huge.jsonl"
    head = b'{"task": "t", "final_answer": "a", '
    if kind == "string":
        path.write_bytes(b'{"task": "' + b"x" * size + b'", "final_answer": "' + b"y" * size + b'"}\n')
    elif kind == "digits":
        path.write_bytes(head + b'"session_metadata": {"session_id": 1' + b"0" * size + b"}}\n")
    elif kind == "fraction":
        path.write_bytes(head + b'"reward_stats": {"score": 0.' + b"9" * size + b"}}\n")
    elif kind == "keys":
        keys = ",".join(f'"k{i}": {i}' for i in range(size // 10))
        path.write_text('{"task": "t", "final_answer": "a"' + (", " + keys if keys else "") + "}\n")
    else:
        path.write_bytes(b'{"task": "t", "final_answer": "a"}\n' * (size // 100) + b"\n" * (size // 100))
    source, result = read(path)
    if isinstance(result, AtlasDistillError):
        assert str(path) in result.message
        return
    for session in result[:3]:
        check_session(session)


# --- layer 2: records, conversations, datasets -----------------------------------------------------------


@fuzz(500)
@given(value=any_object)
@example(value={"task": "", "trajectory_events": [{"event": {"payload": {"event_type": []}}}]})  # unhashable
@example(value={"task": "t", "steps": [{"description": "d", "guidance": 3}]})  # not a list of notes
@example(value={"task": "t", "plan": {"steps": 3}})
@example(value={"task": "t", "reward_stats": {"score": 10**400}})  # beyond any float
@example(value={"task": "t", "reward_stats": {"score": float("nan")}})
@cli_stack
def test_any_json_value_is_a_session_or_a_record_error(value):
    session = outcome(lambda: AtlasSession.from_json(value), RecordError)
    if isinstance(session, RecordError):
        return
    check_session(session)
    assert isinstance(loads(session.to_json_bytes()), dict)  # what export writes can be read back
    assert split_of(session, 0.15) in ("eval", "train")
    row = conversation_row(session, "task")
    check_messages(row["messages"])
    assert row["reference"] == session.final_answer.strip()


def valid_sessions(values: list) -> list[AtlasSession]:
    return [s for s in (outcome(lambda v=v: AtlasSession.from_json(v), RecordError) for v in values)
            if isinstance(s, AtlasSession)]


@fuzz(250)
@given(values=st.lists(sessions, max_size=6), eval_split=st.floats(0, 1, exclude_max=True),
       prompt=st.sampled_from(["conversation", "task"]))
@cli_stack
def test_prepare_conversations_and_inspect_on_any_sessions(values, eval_split, prompt):
    batch = valid_sessions(values)
    prepared = outcome(lambda: prepare_conversations(batch, source="fuzz", eval_split=eval_split, prompt=prompt),
                       InvalidTraceData)
    if isinstance(prepared, AtlasDistillError):
        return
    stats = prepared.stats
    assert stats.sessions == len(batch) == stats.train + stats.eval + stats.dropped_no_answer
    for row in prepared.train + prepared.eval:
        check_messages(row["messages"])
        assert row["messages"][-1]["content"] == row["reference"] != ""
        assert row["reward"] is None or isinstance(row["reward"], float)
    report = outcome(lambda: inspect_sessions(batch, source="fuzz"), InvalidTraceData)
    if not isinstance(report, AtlasDistillError):
        assert report.sessions == len(batch) and sum(b.count for b in report.reward) + report.no_reward == len(batch)


@fuzz(200)
@given(content=trace_files(), min_reward=st.none() | st.floats(0, 1), eval_split=st.floats(0, 0.9),
       skip_invalid=st.booleans())
@cli_stack
def test_load_prepared_on_any_trace_file(workdir, content, min_reward, eval_split, skip_invalid):
    path = workdir / "prepared.jsonl"
    path.write_bytes(content)
    prepared = outcome(lambda: load_prepared(traces=str(path), filters=TraceFilter(min_reward=min_reward,
                                                                                   review_status=None),
                                             eval_split=eval_split, skip_invalid=skip_invalid),
                       InvalidTraceData, NoTracesFound)
    if isinstance(prepared, NoTracesFound):
        assert str(path) in prepared.message, prepared.message
        return
    if isinstance(prepared, InvalidTraceData):
        # a bad line is named by path and line number (and is skipped, never raised, with skip_invalid);
        # a value too deep to render is named by its session
        # and a damaged gzip stream by path
        line = re.match(re.escape(str(path)) + r":(\d+): ", prepared.message)
        assert ((line and not skip_invalid) or "nested too deeply" in prepared.message
                or prepared.message.startswith(f"{path}: cannot be read to the end")), prepared.message
        return
    assert prepared.stats.train > 0
    for row in prepared.train + prepared.eval:
        check_messages(row["messages"])
        assert min_reward is None or row["reward"] >= min_reward


# --- layer 3: profiles -------------------------------------------------------------------------------------

KEYS = known_keys()
yaml_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.dates()
                | st.datetimes())
yaml_values = st.recursive(yaml_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
dotted_keys = st.one_of(
    st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k[:-1]),  # a typo
    st.sampled_from(KEYS).map(lambda k: k + ".deeper"),
    st.sampled_from(["trainer", "data", "model.lora", "database"]),  # a section given a scalar
    st.text(max_size=12),
)


def tree_of(pairs: list[tuple[str, object]]) -> dict:
    tree: dict = {}
    for dotted, value in pairs:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        node[leaf] = value
    return tree


NASTY_YAML = [
    b"", b"---\n", b"- a\n- b\n", b"just text\n", b"42\n", b"~\n", b"\xef\xbb\xbftrainer:\n  min_reward: 0.9\n",
    b"trainer:\n  min_reward: \xff\xfe\n", b"trainer: [\n", b"trainer:\n\t lmbda: 1\n", b"{{{{\n",
    b"trainer:\n  seed: " + b"1" * 5000 + b"\n", b"trainer:\n  learning_rate: 1.0e+999\n",
    b"trainer:\n  min_reward: .nan\n", b"data:\n  created_after: 2024-13-45\n",
    b"data:\n  created_after: 2024-02-30 25:61:61\n", b"data:\n  session_ids: [" + b"9" * 5000 + b"]\n",
    b"trainer: " + b"[" * 5000 + b"]" * 5000 + b"\n", b"trainer: " + b"{a: " * 2000 + b"1" + b"}" * 2000 + b"\n",
    b"a: &a [*a]\n", b"x: &x {y: 1}\ntrainer: *x\n", b"? [a, b]\n: 1\n", b"!!python/object:os.system {}\n",
    b"trainer: !!binary aGVsbG8=\n", b"trainer:\n  report_to: !!set {a, b}\n", b"1: 2\nnull: 3\n",
    b"model:\n  model_name_or_path: " + b"x" * 100_000 + b"\n", b"\x00\x01\x02\n", b"%YAML 9.9\n---\na: 1\n",
]

profile_files = st.one_of(
    st.tuples(st.lists(st.tuples(dotted_keys, yaml_values), max_size=6), st.booleans()).map(
        lambda t: yaml.safe_dump(tree_of(t[0]), allow_unicode=t[1]).encode("utf-8")),
    st.text(max_size=80).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=80),
    st.sampled_from(NASTY_YAML),
)


def check_profile_result(result) -> None:
    if isinstance(result, ProfileError):
        assert result.problems and all(isinstance(p, str) and p.strip() for p in result.problems)
        return
    assert isinstance(result, Profile)
    profile_to_yaml(result)  # the resolved profile written next to every run


@fuzz(400)
@given(content=profile_files)
@example(content=b"trainer: " + b"[" * 5000 + b"]" * 5000 + b"\n")
@example(content=b"data:\n  created_after: 2024-13-45\n")
@example(content=b"trainer:\n  seed: " + b"1" * 5000 + b"\n")
@cli_stack
def test_any_profile_file_loads_or_raises_profile_error(workdir, content):
    path = workdir / "fuzzed.yaml"
    path.write_bytes(content)
    result = outcome(lambda: load_profile(str(path)), ProfileError)
    check_profile_result(result)
    if isinstance(result, Profile):
        again = workdir / "again.yaml"
        again.write_text(profile_to_yaml(result), encoding="utf-8")
        assert isinstance(load_profile(str(again)), Profile)  # what we write, we read back


override_values = st.one_of(
    yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.text(max_size=20),
    st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]), max_size=10),  # as argv decodes bad bytes
    st.sampled_from(["", "null", "[", "]", "{a: [", "2024-13-45", "1" * 5000, "[" * 5000, "{a: " * 3000,
                     ".nan", "-.inf", "1e999", "!!python/name:os.system", "&a [*a]", "\x00", "a=b=c"]),
)
overrides = st.one_of(
    st.tuples(dotted_keys, override_values).map(lambda t: f"{t[0]}={t[1]}"),
    st.tuples(st.sampled_from(["", "+", " ", ".", "a..b", "trainer.", ".seed"]), override_values).map(
        lambda t: f"{t[0]}={t[1]}"),
    st.text(max_size=30),
)
flag_sets = st.dictionaries(st.sampled_from(["--min-reward", "--learning-key", "--epochs", "--limit", "--output"]),
                            st.tuples(st.sampled_from(KEYS), yaml_values), max_size=3)


@fuzz(400)
@given(profile=st.sampled_from(["default", "fast", "demo", None]), texts=st.lists(overrides, max_size=5),
       flags=flag_sets)
@example(profile="default", texts=["trainer.seed=" + "1" * 5000], flags={})
@example(profile="default", texts=["data.created_after=2024-13-45"], flags={})
@example(profile="default", texts=["trainer.report_to=" + "[" * 5000], flags={})
@example(profile="default", texts=["trainer.learning_key=\udcff\udcfe"], flags={})
@cli_stack
def test_any_overrides_and_flags_load_or_raise_profile_error(profile, texts, flags):
    result = outcome(lambda: load_profile(profile, texts, flags), ProfileError)
    check_profile_result(result)


@fuzz(300)
@given(name=st.one_of(st.text(max_size=30), st.text(max_size=30).map(lambda s: s + ".yaml"),
                      st.sampled_from(["a" * 5000 + ".yaml", "x/" * 3000, "\x00.yaml", "/", ".yaml", "fastt",
                                       "profiles/../profiles/fast.yaml", "/dev/null.yaml"])))
@example(name="a" * 5000 + ".yaml")
@cli_stack
def test_any_profile_name_resolves_or_raises_profile_error(name):
    check_profile_result(outcome(lambda: load_profile(name), ProfileError))


# --- the real CLI --------------------------------------------------------------------------------------


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _cli_files() -> dict[str, bytes]:
    """Each holds one good session and something nasty."""
    good = b'{"task": "t", "final_answer": "a", "reward_stats": {"score": 0.5}}'
    packed = gzip.compress((good + b"\n") * 500, mtime=0)
    return {
        "deep.jsonl": good + b"\n" + b"[" * 10_000 + b"]" * 10_000 + b"\n",
        "deep-event.jsonl": good + b'\n{"task": "t", "trajectory_events": [{"event": {"payload": {"event_type": '
                            b'"LLM_END", "metadata": {"actor": "student"}, "data": {"output": ' + b"[" * 1010
                            + b"]" * 1010 + b"}}}}]}\n",
        "scores.jsonl": b"\xef\xbb\xbf" + good + b"\n\n  \n" + b"\n".join(
            good.replace(b"0.5", v) for v in [b"NaN", b"Infinity", b"1e308", b"1e308", b"-1e308", b"9" * 400]) + b"\n",
        "surrogate.jsonl": good + b'\n{"task": "\\udc80"}\n',
        "bytes.jsonl": good + b"\n" + b'{"task": "\xff\xc0\x80"}\n',
        "cut.jsonl.gz": packed[:-30],
        "corrupt.jsonl.gz": packed[:40] + bytes([packed[40] ^ 0xFF]) + packed[41:],
        "digits.jsonl": good + b'\n{"task": "t", "session_metadata": {"session_id": ' + b"1" * 5000 + b"}}\n",
    }


def test_cli_inspect_on_nasty_files_exits_0_or_5_without_a_traceback(cli, tmp_path):
    files = _cli_files()
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        result = cli("inspect", name)
        assert result.code in (0, 5), (name, result.code, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, (name, result.stderr)
        if result.code == 5:
            assert "Error:" in result.stderr and "Fix:" in result.stderr, (name, result.stderr)
    deep = cli("inspect", "deep-event.jsonl", "--skip-invalid")  # read fine; too deep to convert: not skippable
    assert deep.code == 5 and "The session with task 't'" in deep.stderr and "nested too deeply" in deep.stderr
    # The other plain files' lines in one: --skip-invalid skips the bad ones, counts them and reports the rest.
    plain = b"".join(content for name, content in files.items() if name.endswith(".jsonl") and "event" not in name)
    (tmp_path / "all.jsonl").write_bytes(plain)
    result = cli("inspect", "all.jsonl", "--skip-invalid", "--json")
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    report = _strict_json(result.stdout)  # no NaN or Infinity in the output either
    assert (report["sessions"], report["invalid_skipped"]) == (11, 4)  # deep, surrogate, bytes, digits
    assert report["no_reward"] == 3  # NaN, Infinity and a 400-digit score are no score
