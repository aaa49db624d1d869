"""Text out of a named byte stream, as a stream: `iter_text(source)` yields the text of one source
(a `memcli.ingest.discover.Source`, or anything with its fields and `open()`) in pieces of at most
`PIECE_CHARS` characters, dispatching by the source's kind; `sha256_of(source)` hashes its raw bytes.

Anything that cannot be read as text raises `ExtractError`, whose message is one line meant for the
user; the error can come after some pieces were already yielded (invalid UTF-8 deep into a big
file), so a caller that must not act on half a document reads it through first.

One module per format: `text` (plain text, Markdown, source code, stdin; gzip around any of them),
`html` (a linear lexer for the visible text), `pdf`, `man` (rendered by mandoc or groff); `detect`
says what a file is from its content, `pieces` holds what every format shares.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Iterator

from memcli.base.text import one_line
from memcli.ingest.extract.detect import TYPES
from memcli.ingest.extract.html import html_pieces
from memcli.ingest.extract.man import man_pieces
from memcli.ingest.extract.pdf import pdf_pieces
from memcli.ingest.extract.pieces import PIECE_CHARS, REASON_CHARS, ExtractError, Reading, os_reason
from memcli.ingest.extract.text import GZIP_ERRORS, READ_BYTES, gunzip, plain_pieces

__all__ = ["ExtractError", "PIECE_CHARS", "Reading", "TYPES", "iter_text", "sha256_of"]


def sha256_of(source) -> str | None:
    """Hex SHA-256 of the source's raw bytes, read in blocks; None for stdin (it can be read once:
    its caller hashes the text it kept)."""
    if source.kind == "stdin":
        return None
    digest = hashlib.sha256()
    try:
        with source.open() as stream:
            while block := stream.read(READ_BYTES):
                digest.update(block)
    except OSError as error:
        raise ExtractError(f"cannot read file: {os_reason(error)}") from None
    return digest.hexdigest()


def iter_text(source, stdin: BinaryIO | None = None, reading: Reading | None = None) -> Iterator[str]:
    """Yield the text of `source` in pieces of at most PIECE_CHARS characters.

    Newlines are normalised to "\\n" and NUL characters removed. Raises ExtractError when
    the source cannot be read as text. `stdin` (for a stdin source) overrides the stream the
    source carries. `reading`, if given, is kept up to date with how far the file has been read
    (for progress).
    """
    reading = reading if reading is not None else Reading()
    if source.kind == "stdin":
        try:
            yield from plain_pieces(stdin if stdin is not None else source.open(), "empty input",
                                    source.encoding, source.forced)
        except OSError as error:
            raise ExtractError(f"cannot read input: {os_reason(error)}") from None
        return
    reading.total, reading.unit = source.size, "bytes"
    try:
        with source.open() as raw:
            def on_read() -> None:
                try:
                    reading.done = raw.tell()
                except (OSError, ValueError, AttributeError):  # progress only: never fails a read
                    pass

            stream: BinaryIO = gunzip(raw) if source.compressed else raw
            try:
                if source.kind == "pdf":
                    yield from pdf_pieces(stream, source.name, reading)
                elif source.kind == "html":
                    yield from html_pieces(stream, source.encoding, source.forced, on_read)
                elif source.kind == "man":
                    yield from man_pieces(stream, on_read)
                else:
                    yield from plain_pieces(stream, "empty file", source.encoding, source.forced, on_read)
            except GZIP_ERRORS as error:
                raise ExtractError(f"damaged gzip data: {one_line(error, REASON_CHARS) or type(error).__name__}") from None
    except OSError as error:
        raise ExtractError(f"cannot read file: {os_reason(error)}") from None
