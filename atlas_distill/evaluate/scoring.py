"""Judging one answer against its reference: the scorers (exact, numeric, json for tool calls, contains; auto
picks by the reference's shape)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..gkd.settings import SCORERS

# A number as written in answers: -3, 42.0, .5, 1,200 (thousands groups only), $1,200.50, -$5.
_NUMBER = r"(?<![\w.])(-)?\$?(-)?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_FENCED = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def _normalize(text: str) -> str:
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def _to_float(match: tuple[str, str, str]) -> float:
    value = float(match[2].replace(",", ""))
    return -value if match[0] or match[1] else value


def extract_number(text: str) -> float | None:
    """The GSM8K-style final answer: the number after the last `####`, else the last number in the text."""
    marked = re.findall(r"####\s*" + _NUMBER, text)
    found = marked or re.findall(_NUMBER, text)
    return _to_float(found[-1]) if found else None


def extract_json(text: str, *, embedded: bool = True) -> Any:
    """A JSON value from the whole text, else a ``` fenced block, else (if `embedded`) the first
    {...} or [...] that parses. Returns None when there is none (a JSON `null` is not a match)."""
    candidates = [text.strip(), *(block.strip() for block in _FENCED.findall(text))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    if embedded:
        decoder = json.JSONDecoder()
        for start, char in enumerate(text):
            if char in "{[":
                try:
                    return decoder.raw_decode(text, start)[0]
                except ValueError:
                    continue
    return None


def _as_tool_call(value: Any) -> Any:
    """A tool call (or a list of them) is judged on tool and arguments only; ids and other keys are ignored."""
    if isinstance(value, list):
        return [_as_tool_call(item) for item in value]
    if not (isinstance(value, dict) and "tool" in value):
        return value
    arguments = value.get("arguments") or {}
    if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"tool": value["tool"], "arguments": arguments}


def _same_data(a: Any, b: Any) -> bool:
    """Data equality: key order is irrelevant and 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _is_numeric(text: str) -> bool:
    """A bare number (`42`, `$1,200.50`, `15%`) or a GSM8K answer with `#### n`."""
    if re.search(r"####\s*" + _NUMBER, text):
        return True
    return re.fullmatch(r"\s*" + _NUMBER + r"\s*%?\.?\s*", text) is not None


def resolve_scorer(reference: str, scorer: str = "auto") -> str:
    """The concrete scorer for a reference: `auto` picks json, numeric or exact from its shape."""
    if scorer not in SCORERS:
        raise ValueError(f"Unknown scorer `{scorer}`; valid scorers: {', '.join(SCORERS)}.")
    if scorer != "auto":
        return scorer
    if isinstance(extract_json(reference, embedded=False), (dict, list)):
        return "json"
    return "numeric" if _is_numeric(reference) else "exact"


def score(prediction: str, reference: str, scorer: str = "auto") -> bool:
    """Whether `prediction` answers like `reference` under `scorer` (see SCORERS)."""
    kind = resolve_scorer(reference, scorer)
    if kind == "exact":
        return _normalize(prediction) == _normalize(reference)
    if kind == "contains":
        needle = _normalize(reference)
        return bool(needle) and needle in _normalize(prediction)
    if kind == "numeric":
        got, want = extract_number(prediction), extract_number(reference)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6)
    got, want = extract_json(prediction), extract_json(reference)
    return got is not None and want is not None and _same_data(_as_tool_call(got), _as_tool_call(want))
