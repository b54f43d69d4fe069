"""Realistic synthetic Atlas sessions: CRM contact workflows an agent runs step by step, checkably.

Each session is an agent's episode on a CRM note: a plan, then steps whose recorded
action is the real one (a JSON tool call with its arguments, or a short text), the
tool's result, teacher guidance on some steps, and a final answer that follows from
the steps (the id the create call returned). The data hides a rule a base model does
not know, learnt only from the traces: the CRM's lead-source tag for where the contact
was met (`SOURCE_TAGS`); and the email is copied exactly (wrong sessions rewrite it and
score low). Rewards spread over 0..1,
some sessions have no reward_stats, learning keys are readable names or sha256 hex,
every status and review status occurs, and ~14 trajectory events per session are
`IntermediateStep` dumps with the actor at payload.metadata.actor. Deterministic per seed.
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
# The hidden rule: where the contact was met -> the CRM's lead-source tag.
SOURCE_TAGS = {"at the expo": "event", "on a discovery call": "outbound", "via a webinar signup": "inbound",
               "at the partner summit": "partner", "by referral": "referral"}
PLACES = list(SOURCE_TAGS)
WANTS = ["wants a demo next week", "asked for pricing", "needs a follow-up in May", "is evaluating competitors"]
LEARNING_KEYS = ["crm_contact_management", "crm_workflows", "crm_contact_management"] + [
    hashlib.sha256(name.encode()).hexdigest() for name in ("support_triage", "billing_updates")
]
EXTRA_STEPS = ["tag", "follow-up"]
GUIDANCE = {"crm.create_contact": "Copy the email exactly.", "crm.tag_contact": "Tag where you met them.",
            None: "Use the note's words."}


def tool_call(tool: str, arguments: dict[str, Any]) -> str:
    """A recorded action: one JSON tool call (keys sorted, so exact match is fair)."""
    return json.dumps({"arguments": arguments, "tool": tool}, sort_keys=True)


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


def _plan(rng: random.Random, name: str, email: str, company: str, place: str, want: str,
          contact_id: str) -> list[dict[str, Any]]:
    """The plan's steps, each with its action (tool and arguments, or the text it outputs) and its result."""
    steps = [
        {"description": "Search for the contact", "tool": "crm.search_contacts",
         "tool_params": {"email": email}, "result": {"matches": 0}},
        {"description": "Create the contact", "tool": "crm.create_contact",
         "tool_params": {"company": company, "email": email, "name": name}, "result": {"contact_id": contact_id}},
    ]
    for extra in rng.sample(EXTRA_STEPS, rng.randint(0, 2)):
        if extra == "tag":
            steps.append({"description": "Tag the lead source", "tool": "crm.tag_contact",
                          "tool_params": {"contact_id": contact_id, "tag": SOURCE_TAGS[place]},
                          "result": {"ok": True}})
        else:
            steps.append({"description": "Write down the follow-up", "tool": None, "output": want})
    return [{"id": n, **step} for n, step in enumerate(steps, start=1)]


def _session(rng: random.Random, index: int, start: datetime) -> SyntheticSession:
    first, last, company = rng.choice(FIRST), rng.choice(LAST), rng.choice(COMPANIES)
    place, want = rng.choice(PLACES), rng.choice(WANTS)
    name = f"{first} {last}"
    email = f"{first.lower()}.{last.lower()}@{company.split()[0].lower()}.com"
    note = f"Met {name} ({email}) from {company} {place}; {want}."
    task = f"Add the contact in this CRM note.\nNote: {note}"
    correct = rng.random() < 0.8
    contact_id = f"C-{rng.randint(1000, 9999)}"
    answer = f"Created contact {contact_id} for {name}."
    score = round(min(1.0, max(0.0, rng.betavariate(6, 1.5) if correct else rng.betavariate(1.5, 4))), 3)
    created = start + timedelta(minutes=index * 7 + rng.randint(0, 6))
    status = rng.choices(["succeeded", "failed", "running"], [0.85, 0.1, 0.05])[0]
    plan_steps = _plan(rng, name, email if correct else email.replace("@", "@mail."), company, place, want,
                       contact_id)
    if not correct:
        plan_steps[0]["tool_params"]["email"] = email  # the search quoted the note; the create call did not
    metadata = {"learning_key": rng.choice(LEARNING_KEYS), "execution_mode": rng.choice(["auto", "paired", "coach"]),
                "source": "synthetic-demo"}
    no_reward = rng.random() < 0.08
    reward = {"score": score, "rationale": "Every call matches the note." if correct else "Email is wrong.",
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
    plan = {"steps": [{k: step[k] for k in ("id", "description", "tool", "tool_params") if k in step}
                      for step in plan_steps]}
    session = SyntheticSession(row=row, plan=plan)
    session.events.append(_event(rng, "WORKFLOW_START", "atlas.session", "system", inp=task))
    for step in plan_steps:
        _add_step(rng, session, step)
    session.events.append(_event(rng, "WORKFLOW_END", "atlas.session", "system", out=answer))
    return session


def _add_step(rng: random.Random, session: SyntheticSession, step: dict[str, Any]) -> None:
    """The step's records: its result row (output: the tool's result, or the text the agent wrote), attempts,
    guidance notes, and its events: LLM_START, guidance, LLM_END (the action), TOOL_START and TOOL_END."""
    step_id, tool = step["id"], step.get("tool")
    action = tool_call(tool, step["tool_params"]) if tool else step["output"]
    output = json.dumps(step["result"], sort_keys=True) if tool else step["output"]
    attempts = 2 if rng.random() < 0.2 else 1
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
    notes = [GUIDANCE[tool]] if tool in GUIDANCE and (attempts > 1 or rng.random() < 0.3) else []
    for sequence, text in enumerate(notes, start=1):
        session.guidance.append({"step_id": step_id, "sequence": sequence, "note": text})
    session.events.append(_event(rng, "LLM_START", "student.llm", "student", inp=step["description"]))
    for text in notes:
        session.events.append(_event(rng, "CUSTOM_END", "teacher.guidance", "teacher", out=text))
    session.events.append(_event(rng, "LLM_END", "student.llm", "student", out=action, tokens=rng.randint(20, 90)))
    if tool:
        session.events.append(_event(rng, "TOOL_START", tool, "student", inp=step["tool_params"]))
        session.events.append(_event(rng, "TOOL_END", tool, "student", out=step["result"]))


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
