"""The one way memcli makes text safe to show: every string that came from a file, a manifest, an
archive, a model or a request goes through here before it reaches a terminal or a one-line error,
so nothing can clear a screen, retitle a terminal or break a line apart."""

from __future__ import annotations


def shown(text: object) -> str:
    """`text` with every non-printable character escaped as repr() writes it (newlines, escapes,
    NUL, bidi controls, undecodable bytes); printable text is left as it is."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def one_line(text: object, limit: int | None = None) -> str:
    """`text` as one harmless line: whitespace runs become one space, the rest as `shown`; cut to
    `limit` characters (an ellipsis marks the cut) when given."""
    line = shown(" ".join(str(text).split()))
    if limit is not None and len(line) > limit:
        return line[: max(limit - 1, 0)] + "…"
    return line
