"""One Atlas session in the arc-atlas JSONL format.

The record keeps the exported JSON object as it is (unknown keys included, so a
file written by arc-atlas round-trips through our reader and writer value for
value) and offers typed access to the fields this tool uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .json_codec import dumps

# Keys with a fixed JSON type when present; anything else is kept unchecked.
_EXPECTED_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "final_answer": (str, type(None)),
    "plan": (dict, type(None)),
    "steps": (list, type(None)),
    "session_metadata": (dict, type(None)),
    "reward_stats": (dict, type(None)),
    "session_reward": (dict, type(None)),
    "trajectory_events": (list, type(None)),
    "review_status": (str, type(None)),
    "learning_key": (str, type(None)),
}
_JSON_NAMES = {str: "a string", dict: "an object", list: "a list", type(None): "null"}


class RecordError(ValueError):
    """The JSON value is not an Atlas session record; the message says which key is wrong."""


def _type_name(value: Any) -> str:
    for kind, name in _JSON_NAMES.items():
        if isinstance(value, kind):
            return name
    return {bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# Where a session's reward is read, in order: the judges' aggregate (the sessions.reward_stats column), the
# session reward (sessions.reward, exported as session_reward), then the runtime's reward_summary.
REWARD_FIELDS = ("reward_stats", "session_reward", "reward_summary")


def _score(value: Any) -> float | None:
    """A finite number as a float; anything else (NaN, Infinity, an integer beyond any float) is no score."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        score = float(value)
    except OverflowError:
        return None
    return score if math.isfinite(score) else None


@dataclass(frozen=True, slots=True)
class AtlasSession:
    """A session as exported by arc-atlas; `data` is the JSON object, untouched."""

    data: dict[str, Any]

    @classmethod
    def from_json(cls, value: Any) -> AtlasSession:
        if not isinstance(value, dict):
            raise RecordError(f"a session must be a JSON object, got {_type_name(value)}")
        if "task" not in value:
            raise RecordError("missing the required key `task`")
        for key, kinds in _EXPECTED_TYPES.items():
            if key in value and not isinstance(value[key], kinds):
                wanted = " or ".join(_JSON_NAMES[k] for k in kinds)
                raise RecordError(f"`{key}` must be {wanted}, got {_type_name(value[key])}")
        for index, step in enumerate(value.get("steps") or []):
            if not isinstance(step, dict):
                raise RecordError(f"`steps[{index}]` must be an object, got {_type_name(step)}")
        return cls(value)

    def to_json_bytes(self) -> bytes:
        return dumps(self.data)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.data.get("session_metadata") or {}

    @property
    def session_id(self) -> Any:
        """The id as exported (a number, usually); a list or object there is no id."""
        value = self.metadata.get("session_id")
        return None if isinstance(value, dict | list) else value

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def final_answer(self) -> str:
        return self.data.get("final_answer") or ""

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.data.get("steps") or []

    @property
    def trajectory_events(self) -> list[Any]:
        return self.data.get("trajectory_events") or []

    @property
    def reward(self) -> float | None:
        """The value min_reward filters on (see reward_source); None when the session has none."""
        return self.reward_source()[0]

    def reward_source(self) -> tuple[float | None, str | None]:
        """(score, the field it came from): the first numeric `score` in REWARD_FIELDS order, each field read at
        the top level first, then inside session_metadata (where the SDK's runtime also writes them)."""
        for name in REWARD_FIELDS:
            for where, prefix in ((self.data, ""), (self.metadata, "session_metadata.")):
                value = where.get(name)
                if isinstance(value, dict) and (score := _score(value.get("score"))) is not None:
                    return score, f"{prefix}{name}.score"
        return None, None

    @property
    def learning_key(self) -> str | None:
        key = self.data.get("learning_key") or self.metadata.get("learning_key")
        return key if isinstance(key, str) and key else None

    @property
    def status(self) -> str | None:
        status = self.metadata.get("status")
        return status if isinstance(status, str) else None

    @property
    def review_status(self) -> str | None:
        return self.data.get("review_status")
