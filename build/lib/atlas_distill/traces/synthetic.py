"""Realistic synthetic Atlas sessions: CRM contact workflows whose answer is checkable.

Each session: a CRM note to act on, a multi-step plan, step results with judge
evaluations, retried attempts and teacher guidance notes, ~20 trajectory events
(`IntermediateStep` dumps with the actor at payload.metadata.actor), and a final
answer that is one JSON tool call. Rewards spread over 0..1 (wrong answers score
low), some sessions have no reward_stats, learning keys are readable names or
sha256 hex, and every status and review status occurs. Deterministic per seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

FIRST = ["Dana", "Luis", "Priya", "Tomasz", "Aiko", "Grace", "Omar", "Ines", "Kwame", "Sofia", "Noah", "Mei"]
LAST = ["Whitfield", "Moreno", "Raman", "Nowak", "Sato", "Okafor", "Haddad", "Silva", "Mensah", "Rossi", "Berg"]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Health", "Stark Logistics", "Wayne Foods", "Hooli"]
PLACES = ["at the expo", "on a discovery call", "via a webinar signup", "at the partner summit", "by referral"]
WANTS = ["wants a demo next week", "asked for pricing", "needs a follow-up in May", "is evaluating competitors"]
LEARNING_KEYS = ["crm_contact_management", "crm_workflows", "crm_contact_management"] + [
    hashlib.sha256(name.encode()).hexdigest() for name in ("support_triage", "billing_updates")
]
EXTRA_STEPS = [
    ("Log the meeting context as a note on the contact", "crm.add_note"),
    ("Schedule the follow-up task", "crm.create_task"),
    ("Tag the contact with the lead source", "crm.tag_contact"),
    ("Notify the account owner", "crm.notify_owner"),
]


def contact_answer(name: str, email: str, company: str) -> str:
    """The final answer: one JSON tool call (keys sorted, so exact match is fair)."""
    return json.dumps({"arguments": {"company": company, "email": email, "name": name},
                       "tool": "crm.create_contact"}, sort_keys=True)


@dataclass
class SyntheticSession:
    row: dict[str, Any]
    plan: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    guidance: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def _event(rng: random.Random, event_type: str, name: str, actor: str, *, inp: Any = None, out: Any = None,
           tokens: int | None = None) -> dict[str, Any]:
    return {
        "parent_id": "root",
        "function_ancestry": {"function_id": name, "function_name": name, "parent_id": "root"},
        "payload": {
            "event_type": event_type,
            "name": name,
            "metadata": {"actor": actor},
            "data": {"input": inp, "output": out, "chunk": None},
            "usage_info": {"num_llm_calls": 1 if tokens else 0, "completion_tokens": tokens},
            "UUID": str(uuid.UUID(int=rng.getrandbits(128))),
        },
    }


def generate_sessions(count: int, *, seed: int = 0, start: datetime | None = None) -> Iterator[SyntheticSession]:
    rng = random.Random(seed)
    start = start or datetime(2026, 6, 1, tzinfo=timezone.utc)
    for index in range(count):
        yield _session(rng, index, start)


def _session(rng: random.Random, index: int, start: datetime) -> SyntheticSession:
    first, last, company = rng.choice(FIRST), rng.choice(LAST), rng.choice(COMPANIES)
    name = f"{first} {last}"
    email = f"{first.lower()}.{last.lower()}@{company.split()[0].lower()}.example.com"
    note = f"Met {name} ({email}) from {company} {rng.choice(PLACES)}; {rng.choice(WANTS)}."
    task = f"Add the contact from this CRM note to the CRM with one JSON tool call.\nNote: {note}"
    correct = rng.random() < 0.8
    answer = contact_answer(name, email if correct else email.replace("@", "@mail."), company)
    score = round(min(1.0, max(0.0, rng.betavariate(6, 1.5) if correct else rng.betavariate(1.5, 4))), 3)
    created = start + timedelta(minutes=index * 7 + rng.randint(0, 6))
    status = rng.choices(["succeeded", "failed", "running"], [0.85, 0.1, 0.05])[0]
    plan_steps = [
        {"id": 1, "description": "Extract the contact's name, email and company from the note", "tool": None},
        {"id": 2, "description": "Check whether the contact already exists", "tool": "crm.search_contacts",
         "tool_params": {"email": email}},
        {"id": 3, "description": "Create the contact with a JSON tool call", "tool": "crm.create_contact",
         "tool_params": {"name": name, "email": email, "company": company}},
    ]
    for extra_id, (description, tool) in enumerate(rng.sample(EXTRA_STEPS, rng.randint(0, 3)), start=4):
        plan_steps.append({"id": extra_id, "description": description, "tool": tool, "tool_params": {}})
    metadata = {"learning_key": rng.choice(LEARNING_KEYS), "execution_mode": rng.choice(["auto", "paired", "coach"]),
                "source": "synthetic-demo"}
    no_reward = rng.random() < 0.08
    reward = {"score": score, "rationale": "Tool call matches the note." if correct else "Email is wrong.",
              "judges": [{"identifier": "process", "score": score, "rationale": "checked arguments",
                          "principles": [{"name": "faithful", "weight": 1.0}], "samples": [],
                          "escalated": False, "escalation_reason": None}], "raw": {}}
    row = {
        "task": task, "status": status, "metadata": metadata, "final_answer": answer,
        "reward": None if no_reward else reward,
        "reward_stats": None if no_reward else {
            "score": score, "score_mean": score, "score_stddev": round(rng.random() * 0.05, 4), "sample_count": 2,
            "uncertainty_mean": round(rng.random() * 0.2, 4), "uncertainty_stddev": 0.01,
            "best_uncertainty": 0.05, "timestamp": created.isoformat()},
        "reward_audit": None if no_reward else [{"stage": "judge", "model": "judge-large", "score": score}],
        "student_learning": "Copy the email exactly as written in the note.",
        "teacher_learning": "Validate email domains before the create call.",
        "review_status": rng.choices(["approved", "pending", "quarantined"], [0.7, 0.2, 0.1])[0],
        "review_notes": None, "created_at": created, "completed_at": created + timedelta(seconds=rng.randint(5, 90)),
    }
    session = SyntheticSession(row=row, plan={"steps": plan_steps})
    session.events.append(_event(rng, "WORKFLOW_START", "atlas.session", "system", inp=task))
    for step in plan_steps:
        _add_step(rng, session, step, note, answer)
    session.events.append(_event(rng, "WORKFLOW_END", "atlas.session", "system", out=answer))
    return session


def _add_step(rng: random.Random, session: SyntheticSession, step: dict[str, Any], note: str, answer: str) -> None:
    step_id, tool = step["id"], step.get("tool")
    attempts = 2 if rng.random() < 0.2 else 1
    output = answer if tool == "crm.create_contact" else (
        f"Extracted from: {note}" if step_id == 1 else f"{tool or 'step'} completed")
    step_score = round(rng.uniform(0.5, 1.0), 3)
    evaluation = {"reward": {"score": step_score, "rationale": "step achieved its goal",
                             "judges": [{"identifier": "step", "score": step_score}]},
                  "validation": {"valid": True, "rationale": "output well formed"}}
    session.steps.append({"step_id": step_id, "trace": f"thought: {step['description'].lower()}",
                          "output": output, "evaluation": evaluation, "attempts": attempts,
                          "metadata": {"latency_ms": rng.randint(200, 4000)}})
    for attempt in range(1, attempts + 1):
        session.attempts.append({"step_id": step_id, "attempt": attempt,
                                 "evaluation": {"reward": {"score": step_score if attempt == attempts else 0.3}}})
    notes = ["Quote the email exactly as in the note."] if attempts > 1 or rng.random() < 0.3 else []
    for sequence, text in enumerate(notes, start=1):
        session.guidance.append({"step_id": step_id, "sequence": sequence, "note": text})
    session.events.append(_event(rng, "LLM_START", "student.llm", "student", inp=step["description"]))
    session.events.append(_event(rng, "LLM_END", "student.llm", "student", out=output, tokens=rng.randint(20, 90)))
    for text in notes:
        session.events.append(_event(rng, "CUSTOM_END", "teacher.guidance", "teacher", out=text))
    if tool:
        session.events.append(_event(rng, "TOOL_START", tool, "student", inp=step.get("tool_params")))
        session.events.append(_event(rng, "TOOL_END", tool, "student", out={"ok": True}))


def to_record(session: SyntheticSession, session_id: int) -> dict[str, Any]:
    """The session as `export` writes it (the same shaping as rows read from Postgres)."""
    from .postgres import session_payload

    row = session.row
    created, completed = row["created_at"], row["completed_at"]
    guidance: dict[int, list[str]] = {}
    for note in session.guidance:
        guidance.setdefault(note["step_id"], []).append(note["note"])
    attempts: dict[int, list[dict[str, Any]]] = {}
    for attempt in session.attempts:
        attempts.setdefault(attempt["step_id"], []).append(
            {"attempt": attempt["attempt"], "evaluation": attempt["evaluation"]})
    steps = [{**step, "guidance": guidance.get(step["step_id"]), "attempt_details": attempts.get(step["step_id"])}
             for step in session.steps]
    events = [{"id": session_id * 1000 + n, "event": event,
               "created_at": (created + timedelta(seconds=n)).isoformat()} for n, event in enumerate(session.events)]
    return session_payload((session_id, row["task"], row["status"], row["metadata"], row["final_answer"],
                            row["reward"], row["reward_stats"], row["reward_audit"], row["student_learning"],
                            row["teacher_learning"], row["review_status"], row["review_notes"], created.isoformat(),
                            completed.isoformat(), session.plan, steps, events))
