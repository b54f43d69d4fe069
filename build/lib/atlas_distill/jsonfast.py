"""JSON in and out of traces, fast (orjson) and lossless (the standard library where orjson is not).

orjson reads integers beyond 64 bits as floats and refuses to write them; such
documents (and any orjson rejects) go through the json module instead, so no
value is ever changed. Exports are compact JSON (no spaces after separators).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# A run of 19 digits may be an integer beyond 64 bits. Mapping every digit to "0"
# and searching for the run is ~10x faster than a regular expression here.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def loads(text: bytes | str) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    if raw.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the json module gives the precise message (or accepts what orjson will not)
    return json.loads(raw)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
