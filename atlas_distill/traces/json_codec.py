"""JSON in and out of traces, fast (orjson) and lossless (the standard library where orjson is not).

orjson reads integers beyond 64 bits as floats and refuses to write them; such
documents (and any orjson rejects) go through the json module instead, so no
value is ever changed. Exports are compact JSON (no spaces after separators).
Whatever either parser cannot read is a JSONDecodeError (or a UnicodeDecodeError
for bytes that are not UTF-8), never a RecursionError or a string that cannot be
written back.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import orjson

# A run of 19 digits may be an integer beyond 64 bits. Mapping every digit to "0"
# and searching for the run is ~10x faster than a regular expression here.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def loads(text: bytes | str) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    if raw.translate(_DIGITS_TO_ZERO).find(_LONG_RUN) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the json module gives the precise message (or accepts what orjson will not: NaN, a BOM)
    return _json_loads(raw)


def _json_loads(raw: bytes) -> Any:
    """The json module, held to what can be written back: strict UTF-8, no lone surrogate, within its limits."""
    document = raw.decode("utf-8").removeprefix("\ufeff")  # strict: surrogate bytes are not UTF-8; a BOM is allowed
    try:
        value = json.loads(document)
        if _SURROGATE_ESCAPE.search(document):
            json.dumps(value, ensure_ascii=False).encode()  # an unpaired one (\ud800) cannot be written back
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply (about 1,000 levels of lists or objects)", document,
                                   0) from None
    except UnicodeEncodeError:
        at = _SURROGATE_ESCAPE.search(document)
        raise json.JSONDecodeError("a \\u escape is a lone UTF-16 surrogate, not a character", document,
                                   at.start() if at else 0) from None
    except ValueError:  # int(): longer than sys.get_int_max_str_digits()
        limit = sys.get_int_max_str_digits()
        at = re.search(rf"[0-9]{{{limit + 1}}}", document)
        raise json.JSONDecodeError(f"a number has more than {limit} digits", document,
                                   at.start() if at else 0) from None
    return value


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
