"""Units in profiles: durations, sizes and rates, as numbers or human strings.

Durations are seconds (`30`, `0.25`) or strings with a unit (`250ms`, `1.5s`, `2m`, `1h`).
Sizes are bytes (`4096`) or strings: `4k`/`4KiB` (1024), `4KB` (1000), `1m`/`1MiB`, `1MB`.
Rates are a size per second: `64KiB/s`, `1MB/s`, or a plain number of bytes per second.

Each parser raises ValueError with the message a user sees after `file:line:col: field:`, so the
message says what was expected and what was given.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like '250ms', '1.5s', '2m', '1h'."""
    if _is_number(value):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a duration of zero or more seconds, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration like '30s' or '250ms', got {value!r}")


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like '4k', '4KiB' (1024), '4KB' (1000), '1MiB', '1MB'."""
    if _is_number(value):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"expected a whole number of bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, prefix, binary, byte = m.groups()
            prefix = prefix.lower()
            if prefix or not binary:  # a bare 'iB' has no prefix to be binary about
                # '4k' and '4KiB' are binary; only an explicit decimal '4KB' means 1000.
                base = 1000 if (prefix and byte and not binary) else 1024
                return int(float(number) * base ** _SIZE_POWERS[prefix])
    raise ValueError(f"expected a size like '4k', '64KiB' or '1MB', got {value!r}")


def parse_rate(value: Any) -> float:
    """Bytes per second from a number or a string like '64KiB/s'."""
    if _is_number(value):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected a rate above zero like '64KiB/s', got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("/s"):
            try:
                rate = parse_size(text[:-2])
            except ValueError:
                pass
            else:
                if rate > 0:
                    return float(rate)
    raise ValueError(f"expected a rate like '64KiB/s' or '1MB/s', got {value!r}")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.3f}s"


_NUMBER_SCHEMA = {"type": "number", "minimum": 0}

# Annotated types for the profile model: the parser gives the one clear message, and the JSON
# Schema says what editors should accept.
class _DurationMarker:
    """Marks a field as a duration so that a time scale can find every one of them."""


DURATION = _DurationMarker()

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    DURATION,
    WithJsonSchema(
        {
            "anyOf": [
                _NUMBER_SCHEMA,
                {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$"},
            ],
            "description": "seconds, or a string like '250ms', '1.5s', '2m', '1h'",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?|\.\d+)\s*([kKmMgGtT]([iI]?[bB])?)?\s*$"},
            ],
            "description": "bytes, or '4k'/'4KiB' (1024), '4KB' (1000), '1m'/'1MiB', '1MB'",
        }
    ),
]
Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": r"/[sS]\s*$"},
            ],
            "description": "bytes per second, or a size per second like '64KiB/s'",
        }
    ),
]
