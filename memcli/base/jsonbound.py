"""memcli's one bounded JSON parser: the pool store's documents, model config files, the catalog's
config reads and the server's request bodies all go through `load_json`.

The text must be UTF-8; brackets may nest at most `max_depth` deep, checked before parsing and
without recursion (a 1 MB document of "[" cannot exhaust the stack); NaN and Infinity are refused
unless asked for. A refusal is a `JsonRefused` whose `reason` completes a sentence about the text
("... nests deeper than 32 levels"), for the caller to name what it was parsing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import MemcliError

MAX_DEPTH = 32
_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


class JsonRefused(MemcliError, ValueError):
    """Why `load_json` refused a JSON text: `reason` completes a sentence about it ("... nests
    deeper than 32 levels"); `key` is the top-level key the problem was found under, when known.
    str() is that sentence about "the JSON text" (callers name the text themselves). A bad value
    like json's own errors (a ValueError too)."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(f"{key or 'the JSON text'} {reason}")
        self.reason, self.key = reason, key


def _too_deep(raw: bytes, max_depth: int) -> tuple[bool, str | None]:
    """Whether brackets nest deeper than `max_depth` (outside strings), found without recursion and
    stopping at the first level too deep; with the top-level object's key it happened under."""
    depth = 0
    key = None
    for m in _BRACKETS.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True, key
        elif c in (b"]", b"}"):
            depth -= 1
        elif depth == 1:
            key = c[1:-1].decode("utf-8", "replace")[:64]  # a key, or a string value (a key comes next)
    return False, None


def load_json(raw: bytes, max_depth: int = MAX_DEPTH, constants: bool = False) -> Any:
    """Parse `raw`: UTF-8, nesting at most `max_depth` deep checked before parsing (no recursion),
    NaN/Infinity refused unless `constants` (then they parse as floats, for the caller's field
    checks to name). Raises JsonRefused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonRefused("is not UTF-8 text") from None
    deep, key = _too_deep(raw, max_depth)
    if deep:
        raise JsonRefused(f"nests deeper than {max_depth} levels", key)

    def no_constants(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return json.loads(text, parse_constant=float if constants else no_constants)
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise JsonRefused(f"is not valid JSON ({exc})") from None
