"""Text files (plain, Markdown, source code, stdin): bytes decoded block by block into pieces of
newline-normalised, NUL-free text; and gzip, whose content any format's reader reads.

The encoding is the one named (--encoding), else a BOM's, else UTF-8 when the start of the file is
valid UTF-8, else what charset-normalizer detects (decoded leniently: a guess may not cover every
byte). A decoding error names the byte offset where it happened and how to name the encoding.
"""

from __future__ import annotations

import codecs
import gzip
import zlib
from typing import BinaryIO, Iterator

from memcli.ingest.extract.detect import SNIFF_BYTES, binary_reason, detect_bom, detect_encoding, utf8_prefix_valid
from memcli.ingest.extract.pieces import ExtractError, cut_pieces, require_content

# Bytes read from disk at a time; small enough that decoding never holds much at once.
READ_BYTES = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"
# What reading damaged gzip data raises, whichever format is inside.
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def plain_pieces(stream: BinaryIO, empty_reason: str, encoding: str | None = None, forced: bool = False,
                 on_read=None) -> Iterator[str]:
    """The text of `stream` in pieces; ExtractError(`empty_reason`) when it has no bytes, and
    "only whitespace" when it has no text."""
    pieces = cut_pieces(decoded_blocks(stream, empty_reason, encoding, forced, on_read))
    return require_content(pieces, "only whitespace, no text")


def read_at_least(stream: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, or fewer only at EOF (pipes return short reads)."""
    data = bytearray()
    while len(data) < size:
        block = stream.read(size - len(data))
        if not block:
            break
        data += block
    return bytes(data)


def decoded_blocks(stream: BinaryIO, empty_reason: str, encoding: str | None = None, forced: bool = False,
                   on_read=None) -> Iterator[str]:
    """Decode a byte stream block by block into newline-normalised, NUL-free text.

    The encoding: `encoding` if given, else a BOM's, else UTF-8 when the start of the file is
    valid UTF-8, else what charset-normalizer detects (decoded leniently: a guess may not
    cover every byte). `forced` (--type text) reads even what looks binary, leniently.
    `on_read` is called after every read (progress).
    """
    head = read_at_least(stream, SNIFF_BYTES)
    if on_read is not None:
        on_read()
    if not head:
        raise ExtractError(empty_reason)
    errors = "replace" if forced else "strict"
    bom_encoding, bom_length = detect_bom(head)
    if encoding is None and bom_length:
        encoding = bom_encoding
    else:
        bom_length = 0 if encoding is not None and not encoding.startswith("utf") else bom_length
        if encoding is None:
            encoding = "utf-8"
    sample = head[bom_length:].decode(encoding, errors="ignore") if bom_length else head.decode("latin-1")
    if not forced and (reason := binary_reason(sample)) is not None:
        raise ExtractError(reason)
    if encoding == "utf-8" and not bom_length and not utf8_prefix_valid(head):
        detected = detect_encoding(head)
        if detected is None:
            raise ExtractError("no text encoding fits the content (binary?); use --encoding to name one")
        encoding, errors = detected, "replace"

    decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
    label = encoding.upper().replace("_", "-")
    offset = bom_length  # file offset of the next byte handed to the decoder
    carriage_return_pending = False  # a "\r" ending one block may pair with "\n" opening the next
    block = head[bom_length:]
    while True:
        final = not block
        buffered = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as error:
            position = offset - buffered + error.start
            if final:
                raise ExtractError(f"invalid {label}: incomplete character at end of file (byte {position})") from None
            raise ExtractError(f"invalid {label} at byte {position}; name the file's encoding with --encoding "
                               f"(e.g. --encoding latin-1) or convert it to UTF-8") from None
        offset += len(block)
        if carriage_return_pending:
            text = "\r" + text
        carriage_return_pending = text.endswith("\r") and not final
        if carriage_return_pending:
            text = text[:-1]
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
        if text:
            yield text
        if final:
            return
        block = stream.read(READ_BYTES)
        if on_read is not None:
            on_read()


def gunzip(stream: BinaryIO) -> BinaryIO:
    """The content of the gzip data `stream` holds, as a stream (damage shows as GZIP_ERRORS
    while it is read)."""
    return gzip.GzipFile(fileobj=stream)


def gunzip_head(stream: BinaryIO) -> bytes:
    """The first SNIFF_BYTES of the content of the gzip file `stream` (seekable; read from its
    start), or b"" when it is not valid gzip: then the reader reports the problem."""
    stream.seek(0)
    try:
        with gunzip(stream) as inner:
            return inner.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error):
        return b""
