"""An Atlas session as a chat conversation (DESIGN §3).

Two shapes, chosen by `data.targets`:

- `all` (`session_to_conversation`): the agent's episode turn by turn. System: the
  task and the plan. Then, per step, a user turn (the step description, and the
  teacher's guidance as "Teacher guidance: ..."), the agent's action as an
  assistant turn (a tool call as one JSON object {"tool", "arguments"}, else the
  step's output text) and the tool's result as a `tool` turn; last the final
  answer. Every assistant turn is a target: the student learns each action.
- `final` (`session_to_messages`): the older shape, one target (the final answer),
  everything before it prompt; guidance and outputs are assistant text there.

Both read trajectory events when they carry the agent's output (the actor is read
from `payload.metadata.actor`, where the SDK writes it), else the steps (export
files, and the SDK's own captures whose step holds `step: {id, description, tool,
tool_params}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


# ---- targets: all -------------------------------------------------------------------------------------------

GUIDANCE_PREFIX = "Teacher guidance: "
FINAL_PROMPT = "Give your final answer."


@dataclass
class Conversation:
    """Messages and the indices of the assistant turns the student learns (the last one is the final answer)."""

    messages: list[dict[str, str]]
    targets: list[int] = field(default_factory=list)


def tool_call_text(tool: Any, arguments: Any) -> str:
    """A tool call as the agent's action: one JSON object, keys sorted, so equal calls are equal text."""
    arguments = {} if arguments is None else arguments
    return json.dumps({"arguments": arguments, "tool": tool}, ensure_ascii=False, sort_keys=True)


def _payload(entry: Any) -> tuple[str | None, str | None, dict[str, Any], Any]:
    """(event type, actor, data, name) of a stored trajectory event; (None, None, {}, None) when unreadable."""
    event = entry.get("event", entry) if isinstance(entry, dict) else None
    payload = event.get("payload") if isinstance(event, dict) else None
    if not isinstance(payload, dict):
        return None, None, {}, None
    kind = payload.get("event_type") if isinstance(payload.get("event_type"), str) else None
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    return kind, metadata.get("actor"), data, payload.get("name")


def _event_episode(events: list[Any]) -> list[tuple[str, str]]:
    """(kind, text) turns from trajectory events; kind is user, action or tool.

    A tool call (TOOL_START) is the action of its step: the LLM_END text just before it in the same step (the
    model's message that carries the call) is replaced by the call, so one step gives one action; calls made
    one after another (parallel tool calls) stay separate actions."""
    turns: list[tuple[str, str]] = []
    message_turn: int | None = None  # the LLM_END action of this step that a tool call may replace
    for entry in events:
        kind, actor, data, name = _payload(entry)
        if kind in _USER_EVENTS and actor == "student":
            turns.append(("user", _text(data.get("input"))))
            message_turn = None
        elif kind in _ASSISTANT_EVENTS and actor == "teacher":
            text = _text(data.get("output"))
            turns.append(("user", GUIDANCE_PREFIX + text if text else ""))
        elif kind in _ASSISTANT_EVENTS and actor == "student":
            turns.append(("action", _text(data.get("output"))))
            message_turn = len(turns) - 1 if kind == "LLM_END" else None
        elif kind == "TOOL_START":
            call = ("action", tool_call_text(name or "call", data.get("input")))
            if message_turn is not None:
                turns[message_turn] = call
            else:
                turns.append(call)
            message_turn = None
        elif kind == "TOOL_END":
            turns.append(("tool", _text(data.get("output"))))
            message_turn = None
    return turns


def _step_fields(step: dict[str, Any]) -> dict[str, Any]:
    """An export step, or an SDK capture's step (its description and tool under `step`)."""
    inner = step.get("step") if isinstance(step.get("step"), dict) else {}
    pick = lambda key: step.get(key) if step.get(key) is not None else inner.get(key)  # noqa: E731
    return {"description": pick("description"), "tool": pick("tool"), "tool_params": pick("tool_params"),
            "guidance": step.get("guidance"), "output": step.get("output")}


def _step_episode(steps: list[dict[str, Any]]) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for step in steps:
        fields = _step_fields(step)
        turns.append(("user", _text(fields["description"])))
        turns += [("user", GUIDANCE_PREFIX + _text(note)) for note in _items(fields["guidance"]) if _text(note)]
        if fields["tool"]:
            turns.append(("action", tool_call_text(fields["tool"], fields["tool_params"])))
            turns.append(("tool", _text(fields["output"])))
        else:
            turns.append(("action", _text(fields["output"])))
    return turns


def session_to_conversation(session: AtlasSession) -> Conversation:
    """The episode with every action and the final answer as targets (`data.targets: all`).

    Consecutive user-side texts (a step description and its guidance) are one user turn; an action
    repeated in the next assistant turn is kept once; an empty action or result is left out. Roles after
    the system turn: user, then assistant or tool, in the recorded order; the last turn is the final answer.
    """
    try:
        turns = _event_episode(session.trajectory_events)
        if not any(kind == "action" and text for kind, text in turns):
            turns = _step_episode(session.steps)
    except RecursionError:
        raise _nested_too_deeply(session) from None
    final = session.final_answer.strip()
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(session)}]
    targets: list[int] = []
    for kind, text in turns:
        if not text:
            continue
        last = messages[-1]
        if kind == "user":
            if last["role"] == "user":
                if text not in last["content"].split("\n\n"):
                    last["content"] += "\n\n" + text
            else:
                messages.append({"role": "user", "content": text})
        elif kind == "tool":
            messages.append({"role": "tool", "content": text})
        elif not (last["role"] == "assistant" and last["content"] == text):
            if last["role"] == "system":
                messages.append({"role": "user", "content": session.task.strip()})
            elif last["role"] == "assistant":  # two actions with no observation between: the agent went on
                messages.append({"role": "user", "content": "Continue."})
            messages.append({"role": "assistant", "content": text})
            targets.append(len(messages) - 1)
    if targets and messages[-1]["role"] == "assistant" and messages[-1]["content"] == final:
        return Conversation(messages, targets)  # the last action was the answer
    if messages[-1]["role"] in ("system", "assistant"):
        messages.append({"role": "user", "content": session.task.strip() if messages[-1]["role"] == "system"
                         else FINAL_PROMPT})
    messages.append({"role": "assistant", "content": final})
    targets.append(len(messages) - 1)
    return Conversation(messages, targets)
