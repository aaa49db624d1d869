"""What every format's reader shares: the pieces of text it yields, the one error it raises, and the
progress it reports.

Pieces are at most `PIECE_CHARS` characters, cut at whitespace where possible (the whitespace
starts the next piece), so tokenizing them one by one gives almost the same tokens as tokenizing
the whole text, and a 200 MB single-line file costs a few MB of memory.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Iterable, Iterator

from memcli.base.text import one_line

# Upper bound on the characters in one piece from iter_text ("about 1 MiB of text").
PIECE_CHARS = 1 << 20
# The longest reason an ExtractError gives (a library's message can be a page long).
REASON_CHARS = 300

_WHITESPACE_CUTS = (" ", "\n", "\t")


class ExtractError(Exception):
    """A file that cannot be read as text. str(e) is a one-line, human reason."""

    def __init__(self, reason: object) -> None:
        super().__init__(one_line(reason, REASON_CHARS))


@dataclass
class Reading:
    """How far iter_text has read a source, for progress: `done` of `total` `unit`s."""

    done: int = 0
    total: int | None = None
    unit: str = "bytes"  # "bytes" | "pages"


def os_reason(error: OSError) -> str:
    """Why a system call failed, as a user reads it ("Permission denied", "symlink loop ...")."""
    if error.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    return error.strerror or one_line(error, REASON_CHARS) or type(error).__name__


def cut_pieces(texts: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cut a stream of text into pieces of at most `limit` characters.

    A cut goes before the last whitespace within the limit, so the word after it keeps its
    leading space (as a BPE tokenizer would see it in running text); text without
    whitespace is hard-cut at the limit.
    """
    buffer = ""
    for text in texts:
        buffer += text
        while len(buffer) > limit:
            cut = max(buffer.rfind(char, 1, limit + 1) for char in _WHITESPACE_CUTS)
            if cut <= 0:
                cut = limit
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def require_content(pieces: Iterable[str], reason: str) -> Iterator[str]:
    """Drop leading whitespace-only pieces; raise ExtractError(reason) if nothing else ever comes.

    Checking as we go keeps the stream bounded: a whitespace-only file is rejected without
    holding it, and leading blank space carries nothing worth injecting.
    """
    seen_text = False
    for piece in pieces:
        if not seen_text:
            if piece.isspace():
                continue
            seen_text = True
        yield piece
    if not seen_text:
        raise ExtractError(reason)
