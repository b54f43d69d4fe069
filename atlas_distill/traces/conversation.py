"""An Atlas session as a chat conversation (DESIGN §3).

System message: the task and the plan. Then the exchange in chronological
order: from trajectory events when they carry text (the actor is read from
`payload.metadata.actor`, where the SDK writes it), else from the steps (step
description as the user turn; teacher guidance and step output as assistant
turns). The last turn is the assistant's final answer: the completion the
student learns; everything before it is the prompt.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidTraceData
from .record import AtlasSession

_USER_EVENTS = {"LLM_START", "TASK_START"}
_ASSISTANT_EVENTS = {"LLM_END", "TASK_END", "CUSTOM_END"}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _items(value: Any) -> list[Any]:
    """A list as is, null as none, one value as a list of one: a malformed trace still converts."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _nested_too_deeply(session: AtlasSession) -> InvalidTraceData:
    """json.dumps and str() give up on a value about 1,000 levels deep (orjson reads up to 1,024)."""
    name = f"Session {session.session_id}" if session.session_id is not None else (
        f"The session with task {session.task[:60]!r}")
    return InvalidTraceData(
        f"{name}: a plan step, step or trajectory event holds a value nested too deeply (about 1,000 levels of "
        "lists or objects) to write as conversation text.",
        fix="Flatten that value where the session is stored, or leave the session out.")


def system_prompt(session: AtlasSession) -> str:
    lines = [f"Task: {session.task.strip()}"]
    plan = session.data.get("plan") or {}
    steps = [s for s in _items(plan.get("steps")) if isinstance(s, dict) and s.get("description")]
    if steps:
        lines.append("Plan:")
        try:
            lines += [f"{n}. {step['description']}" for n, step in enumerate(steps, start=1)]
        except RecursionError:
            raise _nested_too_deeply(session) from None
    return "\n".join(lines)


def _event_turn(entry: Any) -> tuple[str, str] | None:
    event = entry.get("event", entry) if isinstance(entry, dict) else None
    payload = event.get("payload") if isinstance(event, dict) else None
    if not isinstance(payload, dict):
        return None
    kind = payload.get("event_type") if isinstance(payload.get("event_type"), str) else None
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    actor = metadata.get("actor")
    if kind in _USER_EVENTS and actor == "student":
        return "user", _text(data.get("input"))
    if kind in _ASSISTANT_EVENTS and actor in ("student", "teacher"):
        text = _text(data.get("output"))
        return "assistant", f"Guidance: {text}" if actor == "teacher" and text else text
    if kind == "TOOL_END":
        return "user", f"Tool {payload.get('name') or 'call'} returned: {_text(data.get('output'))}"
    return None


def _step_turns(steps: list[dict[str, Any]]) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for step in steps:
        turns.append(("user", _text(step.get("description"))))
        turns += [("assistant", f"Guidance: {_text(note)}") for note in _items(step.get("guidance"))]
        turns.append(("assistant", _text(step.get("output"))))
    return turns


def _merge(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for role, text in turns:
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            if text not in messages[-1]["content"].split("\n\n"):
                messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def session_to_messages(session: AtlasSession) -> list[dict[str, str]]:
    """[system, user, assistant, ..., assistant(final answer)]; roles alternate after the system turn."""
    try:
        turns = [t for t in map(_event_turn, session.trajectory_events) if t is not None]
        if not any(role == "assistant" for role, _ in turns):
            turns = _step_turns(session.steps)
    except RecursionError:
        raise _nested_too_deeply(session) from None
    exchange = _merge(turns)
    final = session.final_answer.strip()
    if exchange and exchange[-1]["role"] == "assistant" and final:
        if exchange[-1]["content"].endswith(final):
            exchange[-1]["content"] = exchange[-1]["content"][: -len(final)].rstrip()
        if not exchange[-1]["content"]:
            exchange.pop()
    if exchange and exchange[0]["role"] == "assistant":
        exchange.insert(0, {"role": "user", "content": session.task.strip()})
    if exchange and exchange[-1]["role"] == "assistant":
        exchange.append({"role": "user", "content": "Give your final answer."})
    if not exchange:
        exchange.append({"role": "user", "content": "Give your final answer."})
    return [{"role": "system", "content": system_prompt(session)}, *exchange,
            {"role": "assistant", "content": final}]
