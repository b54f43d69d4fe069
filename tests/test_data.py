"""Sessions -> GKD datasets: conversation shape, stable split, truncation counts, both sources alike."""

from __future__ import annotations


import pytest

from atlas_distill.data import build_gkd_dataset, load_prepared, prepare_conversations, split_of
from atlas_distill.errors import NoTracesFound
from atlas_distill.traces import AtlasSession, JsonlTraceSink, PostgresTraceSource, TraceFilter
from atlas_distill.traces.conversation import session_to_messages


def session(sid, **extra):
    return AtlasSession.from_json({"task": f"task {sid}", "final_answer": f"answer {sid}",
                                   "session_metadata": {"session_id": sid}, **extra})


def event(kind, actor, *, inp=None, out=None, name="x"):
    return {"id": 1, "event": {"payload": {"event_type": kind, "name": name, "metadata": {"actor": actor},
                                           "data": {"input": inp, "output": out}}}}


def test_split_is_a_fixed_function_of_the_session_id():
    sessions = [session(i) for i in range(2000)]
    first = {s.session_id: split_of(s, 0.15) for s in sessions}
    assert 0.12 < sum(v == "eval" for v in first.values()) / 2000 < 0.18
    more = [session(i) for i in range(5000)]  # the database grew
    assert all(split_of(s, 0.15) == first[s.session_id] for s in more[:2000])


def test_growing_data_never_moves_an_eval_session_into_training():
    small = prepare_conversations([session(i) for i in range(300)], source="x")
    large = prepare_conversations([session(i) for i in range(900)], source="x")
    small_eval = {r["session_id"] for r in small.eval}
    assert small_eval <= {r["session_id"] for r in large.eval}
    assert not small_eval & {r["session_id"] for r in large.train}


def test_events_give_the_chronological_exchange_with_the_actor_from_the_payload_metadata():
    events = [event("LLM_START", "student", inp="Look up the account"),
              event("LLM_END", "student", out="Account 42 found"),
              event("CUSTOM_END", "teacher", out="Check the email"),
              event("TOOL_END", "student", out={"ok": True}, name="crm.search"),
              event("LLM_END", "student", out="Done: answer 1")]
    s = session(1, trajectory_events=events, steps=[{"step_id": 1, "description": "ignored", "output": "no"}])
    messages = session_to_messages(s)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "Account 42 found\n\nGuidance: Check the email"
    assert messages[3]["content"] == 'Tool crm.search returned: {"ok": true}'
    assert messages[-1] == {"role": "assistant", "content": "answer 1"}
    assert messages[-2]["content"] == "Give your final answer."  # "Done:" is kept as context, answer stripped


def test_actor_in_the_wrong_place_is_not_read():
    """Upstream looked for the actor outside payload.metadata and silently fell back; we read it where it is."""
    misplaced = {"id": 1, "event": {"metadata": {"actor": "student"},
                                    "payload": {"event_type": "LLM_END", "data": {"output": "from events"}}}}
    steps = [{"step_id": 1, "description": "Step one", "output": "from steps", "guidance": ["hint"]}]
    messages = session_to_messages(session(1, trajectory_events=[misplaced], steps=steps))
    assert [m["content"] for m in messages[1:]] == ["Step one", "Guidance: hint\n\nfrom steps",
                                                    "Give your final answer.", "answer 1"]


def test_rows_carry_evaluation_fields_and_task_prompt_mode():
    s = session(7, reward_stats={"score": 0.9}, learning_key="crm")
    prepared = prepare_conversations([s], source="x", eval_split=0.0)
    row = prepared.train[0]
    assert (row["session_id"], row["learning_key"], row["reward"], row["reference"]) == ("7", "crm", 0.9, "answer 7")
    task = prepare_conversations([s], source="x", eval_split=0.0, prompt="task").train[0]["messages"]
    assert [m["role"] for m in task] == ["system", "user", "assistant"] and task[1]["content"] == "task 7"


def test_truncation_is_counted_and_overlong_answers_dropped(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    long_prompt = AtlasSession.from_json({"task": "word " * 300, "final_answer": "short",
                                          "session_metadata": {"session_id": 1}})
    long_answer = AtlasSession.from_json({"task": "t", "final_answer": "word " * 300,
                                          "session_metadata": {"session_id": 2}})
    empty = AtlasSession.from_json({"task": "t", "final_answer": "", "session_metadata": {"session_id": 3}})
    prepared = prepare_conversations([long_prompt, long_answer, empty, session(4)], source="x", eval_split=0.0,
                                     tokenizer=tokenizer, max_length=128)
    stats = prepared.stats
    assert (stats.sessions, stats.train, stats.truncated, stats.dropped_too_long, stats.dropped_no_answer) == \
        (4, 2, 1, 1, 1)


def test_postgres_and_jsonl_give_identical_datasets(seeded_db, tmp_path):
    path = tmp_path / "all.jsonl"
    sink = JsonlTraceSink(path)
    for s in PostgresTraceSource(seeded_db, TraceFilter(review_status=None, min_reward=None)):
        sink.write(s)
    sink.commit()
    from_db = build_gkd_dataset(db_url=seeded_db, min_reward=0.7, learning_key="crm_contact_management")
    from_file = build_gkd_dataset(traces=str(path), min_reward=0.7, learning_key="crm_contact_management")
    for a, b in zip(from_db, from_file, strict=True):
        assert a.to_list() == b.to_list()
    assert len(from_db[0]) > 10 and set(from_db[0].column_names) == {
        "messages", "targets", "session_id", "learning_key", "reward", "reference"}
    final_db = build_gkd_dataset(db_url=seeded_db, min_reward=0.7, learning_key="crm_contact_management",
                                 targets="final")
    final_file = build_gkd_dataset(traces=str(path), min_reward=0.7, learning_key="crm_contact_management",
                                   targets="final")
    for a, b in zip(final_db, final_file, strict=True):
        assert a.to_list() == b.to_list() and "targets" not in a.column_names


def test_nothing_left_raises_no_traces_found_with_the_funnel(seeded_db):
    with pytest.raises(NoTracesFound) as caught:
        load_prepared(db_url=seeded_db, filters=TraceFilter(learning_key="nope"))
    assert "learning_key = 'nope': 0" in caught.value.message and "--min-reward" in caught.value.fix
