"""Synthetic sessions look like real Atlas data; URL masking hides every password."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from atlas_distill.db import mask_url, scrub
from atlas_distill.traces.conversation import session_to_messages
from atlas_distill.traces import PostgresTraceSource, TraceFilter


def test_synthetic_sessions_cover_what_real_stores_hold(seeded_db):
    sessions = list(PostgresTraceSource(seeded_db, TraceFilter(review_status=None)))
    assert {s.status for s in sessions} == {"succeeded", "failed", "running"}
    assert {s.review_status for s in sessions} == {"approved", "pending", "quarantined"}
    keys = Counter(s.learning_key for s in sessions)
    assert "crm_contact_management" in keys and any(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
    rewards = [s.reward for s in sessions if s.reward is not None]
    assert 0 < len(rewards) < len(sessions)  # some sessions have no reward_stats
    assert min(rewards) < 0.3 and max(rewards) > 0.95
    assert all(len(s.steps) >= 2 for s in sessions)
    mean_events = sum(len(s.trajectory_events) for s in sessions) / len(sessions)
    assert 10 <= mean_events <= 20
    assert any(step["guidance"] for s in sessions for step in s.steps)
    # the recorded actions are real: tool calls with their arguments, and the tools' results
    from atlas_distill.traces.conversation import session_to_conversation

    for s in sessions:
        conversation = session_to_conversation(s)
        actions = [conversation.messages[t]["content"] for t in conversation.targets[:-1]]
        assert actions[0] == ('{"arguments": {"email": "' + s.steps[0]["tool_params"]["email"]
                              + '"}, "tool": "crm.search_contacts"}')
        assert '"tool": "crm.create_contact"' in actions[1] and s.final_answer.split()[2] in \
            [m["content"] for m in conversation.messages if m["role"] == "tool"][1]


def test_conversation_is_chronological_and_ends_with_the_final_answer(seeded_db):
    session = next(iter(PostgresTraceSource(seeded_db, TraceFilter(review_status=None, limit=1))))
    messages = session_to_messages(session)
    assert messages[0]["role"] == "system" and session.task in messages[0]["content"]
    assert messages[-1] == {"role": "assistant", "content": session.final_answer}
    roles = [m["role"] for m in messages[1:]]
    assert all(a != b for a, b in zip(roles, roles[1:])), roles  # user and assistant alternate
    assert messages[1]["role"] == "user"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("postgresql://u:p%40ss@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
        ("host=h user=u password=secret dbname=x", "host=h user=u password=*** dbname=x"),
        ("host=h password='a b c' dbname=x", "host=h password=*** dbname=x"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_scrub_removes_the_password_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "from-the-env")
    text = scrub("failed for pw Hunter2-x and from-the-env", "postgresql://u:Hunter2-x@h/db")
    assert "Hunter2-x" not in text and "from-the-env" not in text
