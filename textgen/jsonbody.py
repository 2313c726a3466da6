"""Request bodies read as JSON, the one way every route reads them.

Python converts a decimal integer of at most `sys.get_int_max_str_digits()` digits
(4300 unless PYTHONINTMAXSTRDIGITS says otherwise) and raises a bare ValueError beyond
that: `json.loads` raised it mid-parse, naming no field. Here such an integer is read as
a placeholder, never converted, and the body is refused with an error that names where
it sits (`BodyError.loc`), the digits it has and the limit. A limit of 0 (no limit) is
Python's choice and kept.
"""

from __future__ import annotations

import json
import sys
from typing import Any

SETTING = "PYTHONINTMAXSTRDIGITS"  # raises Python's limit, and so the one here


class BodyError(ValueError):
    """The body is not JSON, or holds an integer too long to read. `loc` is the path to
    the offending value (empty: the body itself)."""

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc

    @property
    def param(self) -> str | None:
        return ".".join(str(part) for part in self.loc) or None


class _LongInteger:
    """Stands in for an integer Python would refuse to convert."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def digits_limit() -> int:
    """Python's limit on the digits of an integer read from text (0: none)."""
    return sys.get_int_max_str_digits()


def too_long(digits: int, field: str, what: str = "an integer") -> str | None:
    """The message for `what` of `digits` digits at `field`, when that is over the limit."""
    limit = digits_limit()
    if not limit or digits <= limit:
        return None
    return f"{field}: {what} of {digits} digits; integers have at most {limit} digits ({SETTING})"


def loads(raw: bytes | bytearray | str) -> Any:
    """The body as Python values; BodyError when it is not JSON or holds a too-long integer."""
    found = False
    limit = digits_limit()

    def parse_int(text: str) -> int | _LongInteger:
        nonlocal found
        digits = len(text) - text.startswith("-")
        if limit and digits > limit:
            found = True
            return _LongInteger(digits)
        return int(text)

    try:
        data = json.loads(raw, parse_int=parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BodyError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BodyError("request body is nested too deeply") from None
    if found:
        loc, placeholder = _first_long_integer(data)
        field = ".".join(str(part) for part in loc) or "body"
        raise BodyError(str(too_long(placeholder.digits, field)), loc)
    return data


def _first_long_integer(data: Any) -> tuple[tuple[str | int, ...], _LongInteger]:
    """The path to the first placeholder in document order (depth-first, no recursion:
    the body's depth is the client's)."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, _LongInteger):
            return loc, value
        if isinstance(value, dict):
            children: list[tuple[str | int, Any]] = list(value.items())
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            continue
        stack.extend(((*loc, key), child) for key, child in reversed(children))
    raise AssertionError("a placeholder was made but is not in the body")
