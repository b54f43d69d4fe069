"""PostgresTraceSource against a real server: one query, the arc-atlas shape, every filter."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from atlas_distill.db import connect
from atlas_distill.traces import JsonlTraceSink, JsonlTraceSource, PostgresTraceSource, TraceFilter
from atlas_distill.traces.seed import create_schema
from helpers import db_ids

ALL = TraceFilter(review_status=None)


def ids(sessions):
    return [s.session_id for s in sessions]


@pytest.mark.parametrize("limit", [3, None])
def test_one_streaming_query_whatever_the_session_count(seeded_db, monkeypatch, limit):
    statements = []
    for method in ("execute", "stream"):
        original = getattr(psycopg.Cursor, method)

        def counting(self, query, *args, _original=original, _method=method, **kwargs):
            statements.append((_method, str(query)))
            return _original(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, method, counting)
    sessions = list(PostgresTraceSource(seeded_db, TraceFilter(review_status=None, limit=limit), fetch_size=17))
    assert len(sessions) == (limit or 300)
    # SET LOCAL jit, one count for the funnel, one streamed query for every session, step and event
    assert [m for m, _ in statements] == ["execute", "execute", "stream"]
    assert "trajectory_events" in statements[2][1] and "OFFSET" not in statements[2][1].upper()


def test_records_hold_steps_guidance_attempts_and_chronological_events(seeded_db):
    sessions = {s.session_id: s for s in PostgresTraceSource(seeded_db, ALL)}
    with connect(seeded_db) as conn:
        steps = dict(conn.execute("SELECT session_id, count(*) FROM step_results GROUP BY 1").fetchall())
        notes = conn.execute("SELECT session_id, step_id, note FROM guidance_notes ORDER BY 1, 2, sequence").fetchall()
        events = conn.execute("SELECT session_id, array_agg(id ORDER BY id) FROM trajectory_events GROUP BY 1").fetchall()
        retried = conn.execute("SELECT session_id, step_id FROM step_attempts WHERE attempt = 2 LIMIT 1").fetchone()
    assert all(len(sessions[sid].steps) == n for sid, n in steps.items())
    for sid, step_id, note in notes:
        step = next(s for s in sessions[sid].steps if s["step_id"] == step_id)
        assert note in step["guidance"]
    for sid, event_ids in events:
        got = [e["id"] for e in sessions[sid].trajectory_events]
        assert got == event_ids  # all of them, in insertion (chronological) order
        actors = {e["event"]["payload"]["metadata"]["actor"] for e in sessions[sid].trajectory_events}
        assert "student" in actors
    step = next(s for s in sessions[retried[0]].steps if s["step_id"] == retried[1])
    assert step["attempts"] == 2 and [a["attempt"] for a in step["metadata"]["attempt_details"]] == [1, 2]
    one = sessions[1].data
    assert {"task", "final_answer", "plan", "steps", "session_metadata"} <= set(one)
    assert one["session_metadata"]["session_id"] == 1 and one["session_metadata"]["created_at"].startswith("20")
    assert one["steps"][0]["description"] == one["plan"]["steps"][0]["description"]
    assert one["steps"][1]["context"]["prior_results"] == {"1": one["steps"][0]["output"]}


def test_min_reward_on_reward_stats_score_and_null_never_passes(seeded_db):
    got = ids(PostgresTraceSource(seeded_db, TraceFilter(min_reward=0.0, review_status=None)))
    assert got == db_ids(seeded_db, "reward_stats IS NOT NULL")
    assert len(got) < 300
    high = ids(PostgresTraceSource(seeded_db, TraceFilter(min_reward=0.9, review_status=None)))
    assert high == db_ids(seeded_db, "(reward_stats->>'score')::float >= 0.9")


def test_default_review_filter_is_approved_and_other_filters(seeded_db):
    assert ids(PostgresTraceSource(seeded_db, TraceFilter())) == db_ids(seeded_db, "review_status = 'approved'")
    two = TraceFilter(review_status=("approved", "pending"))
    assert ids(PostgresTraceSource(seeded_db, two)) == db_ids(seeded_db, "review_status IN ('approved', 'pending')")
    failed = TraceFilter(review_status=None, status=("failed",))
    assert ids(PostgresTraceSource(seeded_db, failed)) == db_ids(seeded_db, "status = 'failed'")
    key = TraceFilter(review_status=None, learning_key="crm_workflows")
    assert ids(PostgresTraceSource(seeded_db, key)) == db_ids(seeded_db, "metadata->>'learning_key' = 'crm_workflows'")
    moment = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
    after = TraceFilter(review_status=None, created_after=moment)
    assert ids(PostgresTraceSource(seeded_db, after)) == db_ids(seeded_db, "created_at > %s", (moment,))
    chosen = TraceFilter(review_status=None, session_ids=(5, 9, 250))
    assert ids(PostgresTraceSource(seeded_db, chosen)) == [5, 9, 250]
    assert ids(PostgresTraceSource(seeded_db, TraceFilter(review_status=None, limit=7))) == list(range(1, 8))


def test_keyset_resume_after_an_id(seeded_db):
    source = PostgresTraceSource(seeded_db, TraceFilter(review_status=None, limit=5), after_id=120)
    assert ids(source) == [121, 122, 123, 124, 125]


def test_funnel_counts_what_each_filter_leaves(seeded_db):
    source = PostgresTraceSource(seeded_db, TraceFilter(min_reward=0.8, learning_key="crm_workflows", limit=3))
    assert len(list(source)) == 3
    labels = [stage.label for stage in source.funnel]
    assert labels[0] == "sessions in database" and source.funnel[0].remaining == 300
    assert labels[1:4] == ["review_status in ['approved']", "learning_key = 'crm_workflows'", "reward >= 0.8"]
    expected = db_ids(seeded_db, "review_status = 'approved' AND metadata->>'learning_key' = 'crm_workflows' "
                                 "AND (reward_stats->>'score')::float >= 0.8")
    assert source.funnel[3].remaining == len(expected)
    assert source.funnel[-1].label == "limit 3" and source.expected == 3


def test_injection_in_a_learning_key_is_plain_data(seeded_db):
    evil = "x'; DROP TABLE sessions; --"
    assert list(PostgresTraceSource(seeded_db, TraceFilter(learning_key=evil, review_status=None))) == []
    assert len(db_ids(seeded_db)) == 300


def test_malformed_reward_values_do_not_break_the_query(empty_db):
    with connect(empty_db) as conn:
        create_schema(conn)
        conn.execute("INSERT INTO sessions (task, review_status, reward_stats) VALUES "
                     "('a', 'approved', '{\"score\": \"high\"}'), ('b', 'approved', '[1, 2]'), "
                     "('c', 'approved', '{\"score\": 0.95}'), ('d', 'approved', NULL), ('e', 'approved', 'null')")
        conn.commit()
    got = list(PostgresTraceSource(empty_db, TraceFilter(min_reward=0.5)))
    assert [s.task for s in got] == ["c"]
    everything = list(PostgresTraceSource(empty_db, TraceFilter(min_reward=None)))
    assert [s.task for s in everything] == ["a", "b", "c", "d", "e"]
    assert everything[0].steps == [] and everything[0].trajectory_events == []


def test_postgres_and_file_paths_give_the_same_sessions(seeded_db, tmp_path):
    filters = TraceFilter(min_reward=0.7, learning_key="crm_contact_management")
    from_db = list(PostgresTraceSource(seeded_db, filters))
    sink = JsonlTraceSink(tmp_path / "all.jsonl")
    for session in PostgresTraceSource(seeded_db, TraceFilter(review_status=None, min_reward=None)):
        sink.write(session)
    sink.commit()
    from_file = list(JsonlTraceSource(tmp_path / "all.jsonl", filters))
    assert [s.data for s in from_file] == [s.data for s in from_db]
    assert len(from_db) > 10


@pytest.mark.parametrize("limit", [1, 299, 300, 1000])
def test_limit_boundaries(seeded_db, limit):
    assert len(list(PostgresTraceSource(seeded_db, TraceFilter(review_status=None, limit=limit)))) == min(limit, 300)


def test_a_reward_is_read_from_the_first_field_that_has_one_in_postgres_and_files_alike(empty_db, tmp_path, cli):
    """reward_stats.score first (the column), then session_reward.score (the reward column), then reward_summary
    (the runtime writes it into metadata), each at the top level before session_metadata; a score that is not a
    number falls through to the next field. The SQL filter and the file filter agree, and inspect names the fields."""
    rows = [  # task, reward_stats, reward, metadata
        ("a", '{"score": 0.9}', None, None),
        ("b", None, '{"score": 0.85}', None),
        ("c", None, None, '{"reward_summary": {"score": 0.95}}'),
        ("d", '{"score": 0.2}', '{"score": 0.99}', None),
        ("e", None, None, '{"reward_stats": {"score": 0.9}, "session_reward": {"score": 0.1}}'),
        ("f", '{"score": "high"}', '{"score": 0.9}', None),
        ("g", None, '{"rationale": "no score"}', '{"reward_summary": {"average": 0.9}}'),
    ]
    with connect(empty_db) as conn:
        create_schema(conn)
        for task, stats, reward, metadata in rows:
            conn.execute("INSERT INTO sessions (task, review_status, reward_stats, reward, metadata) "
                         "VALUES (%s, 'approved', %s, %s, %s)", (task, stats, reward, metadata))
        conn.commit()
    high = TraceFilter(min_reward=0.8)
    assert [s.task for s in PostgresTraceSource(empty_db, high)] == ["a", "b", "c", "e", "f"]
    sink = JsonlTraceSink(tmp_path / "all.jsonl")
    for session in PostgresTraceSource(empty_db, TraceFilter(min_reward=None)):
        sink.write(session)
    sink.commit()
    from_file = list(JsonlTraceSource(tmp_path / "all.jsonl", TraceFilter(min_reward=None)))
    assert {s.task: s.reward_source() for s in from_file} == {
        "a": (0.9, "reward_stats.score"), "b": (0.85, "session_reward.score"), "c": (0.95, "reward_summary.score"),
        "d": (0.2, "reward_stats.score"), "e": (0.9, "session_metadata.reward_stats.score"),
        "f": (0.9, "session_reward.score"), "g": (None, None)}
    assert [s.task for s in JsonlTraceSource(tmp_path / "all.jsonl", high)] == ["a", "b", "c", "e", "f"]
    report = cli("inspect", str(tmp_path / "all.jsonl"), "--json").json()
    assert {b["label"]: b["count"] for b in report["reward_fields"]} == {
        "reward_stats.score": 2, "session_reward.score": 2, "reward_summary.score": 1,
        "session_metadata.reward_stats.score": 1}
    assert report["no_reward"] == 1
    text = cli("inspect", str(tmp_path / "all.jsonl")).stdout
    assert "Reward (read from reward_stats.score: 2, session_reward.score: 2" in " ".join(text.split())


def test_export_lifts_every_key_the_sdk_exporter_lifts_from_metadata(empty_db):
    """A session as the SDK's runtime leaves it (atlas/core _collect_session_insights writes these into the
    metadata column; the learning columns may be empty), exported with the top-level keys the SDK's own exporter
    (atlas/cli/jsonl_writer.py) writes for it, including its two fallbacks."""
    import json

    metadata = {
        "learning_key": "crm", "triage_dossier": {"summary": "lookup", "risks": []},
        "adaptive_summary": {"adaptive_mode": "coach", "confidence": 0.7}, "token_usage": {"total_tokens": 90},
        "session_reward": {"score": 0.9}, "reward_summary": {"score": 0.9}, "learning_history": {"count": 2},
        "teacher_notes": ["check the email"], "drift": {"drift_alert": True, "z": 3.1},
        "student_learning": "verify emails first", "teacher_learning": "ask for the id"}
    with connect(empty_db) as conn:
        create_schema(conn)
        conn.execute("INSERT INTO sessions (task, review_status, metadata) VALUES ('t', 'approved', %s)",
                     (json.dumps(metadata),))
        conn.execute("INSERT INTO sessions (task, review_status, metadata) VALUES ('u', 'approved', %s)",
                     (json.dumps({"execution_mode": "auto", "adaptive_summary": {"adaptive_mode": "coach"},
                                  "drift_alert": False, "drift": {"drift_alert": True}}),))
        conn.commit()
    first, second = (s.data for s in PostgresTraceSource(empty_db, TraceFilter(min_reward=None)))
    expected = {"execution_mode": "coach", "adaptive_summary": metadata["adaptive_summary"],
                "triage_dossier": metadata["triage_dossier"], "learning_history": {"count": 2},
                "teacher_notes": ["check the email"], "reward_summary": {"score": 0.9}, "drift": metadata["drift"],
                "drift_alert": True, "learning_key": "crm", "student_learning": "verify emails first",
                "teacher_learning": "ask for the id"}
    assert {key: first.get(key) for key in expected} == expected
    assert first["session_metadata"]["token_usage"] == {"total_tokens": 90}  # the rest stays in session_metadata
    assert (second["execution_mode"], second["drift_alert"]) == ("auto", False)  # given values win over fallbacks
