"""Turn the paths a user names into text, safely and as a stream.

Two steps, kept apart so the caller can report on every file before reading any:

* `discover` walks the named paths and yields a `Source` for every readable document, or a
  `Skipped` with a one-line reason. It never opens anything that is not a regular file
  (opening a FIFO blocks forever) and terminates on symlink cycles.
* `iter_text` streams one source's text in pieces of at most `PIECE_CHARS` characters, so a
  200 MB single-line file costs a few MB of memory. Anything that cannot be read as text
  raises `ExtractError`, whose message is one line meant for the user.

Text pieces are cut at whitespace where possible (the whitespace starts the next piece), so
tokenizing them one by one gives almost the same tokens as tokenizing the whole text.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import logging
import os
import stat
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from html.parser import HTMLParser
from typing import BinaryIO, Iterable, Iterator

import pypdf

logger = logging.getLogger(__name__)

_KIND_BY_SUFFIX = {
    ".pdf": "pdf",
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_KIND_BY_SUFFIX)

STDIN_PATH = "-"

# Upper bound on the characters in one piece from iter_text ("about 1 MiB of text").
PIECE_CHARS = 1 << 20
# Bytes read from disk at a time; small enough that decoding never holds much at once.
READ_BYTES = 1 << 16
# How much of the start of a file is looked at to tell text from binary.
SNIFF_BYTES = 8192
# Share of control characters above which a file is taken to be binary. Real text has
# almost none besides tabs and newlines; binary formats have plenty.
CONTROL_SHARE_LIMIT = 0.10
# Control characters that do occur in text files: backspace, tab, newlines, form feed, ESC
# (terminal colour codes in saved logs).
_TEXT_CONTROLS = frozenset("\b\t\n\v\f\r\x1b")

# Checked longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

_WHITESPACE_CUTS = (" ", "\n", "\t")


class ExtractError(Exception):
    """A file that cannot be read as text. str(e) is a one-line, human reason."""

    def __init__(self, reason: object) -> None:
        super().__init__(_one_line(reason))


@dataclass(frozen=True)
class Source:
    path: str  # display path as given / found ("-" for stdin); used in messages and logs
    kind: str  # "pdf" | "text" | "markdown" | "html" | "stdin"
    size: int | None  # bytes on disk, None for stdin


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def _one_line(message: object, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _os_reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    return error.strerror or _one_line(error) or type(error).__name__


def _suffix_kind(name: str) -> str | None:
    return _KIND_BY_SUFFIX.get(os.path.splitext(name)[1].lower())


def _unsupported_reason(name: str) -> str:
    suffix = os.path.splitext(name)[1]
    what = f"'{suffix}'" if suffix else "(no extension)"
    return f"unsupported file type {what}; supported: {', '.join(SUPPORTED_SUFFIXES)}"


def _special_file_reason(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        what = "a FIFO"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    else:
        what = "a special file"
    return f"not a regular file ({what})"


# --------------------------------------------------------------------------- discovery


def _glob_matcher(pattern: str | None):
    """A predicate on a file's path relative to the directory it was found under.

    A pattern without "/" matches the file name at any depth ("*.md"); one with "/" matches
    the whole relative path, where "**" stands for any number of directories ("**/*.txt",
    "notes/**/*.md").
    """
    if pattern is None:
        return lambda parts: True
    pattern_parts = [p for p in pattern.removeprefix("./").split("/") if p]
    if len(pattern_parts) <= 1:
        name_pattern = pattern_parts[0] if pattern_parts else "*"
        return lambda parts: fnmatchcase(parts[-1], name_pattern)
    return lambda parts: _match_parts(parts, pattern_parts)


def _match_parts(parts: list[str], patterns: list[str]) -> bool:
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_match_parts(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], patterns[0]) and _match_parts(parts[1:], patterns[1:])


def _open_regular(path: str) -> BinaryIO:
    """Open a file for reading without ever blocking.

    O_NONBLOCK makes opening a FIFO return at once (a blocking open waits for a writer
    forever); the fstat check then refuses anything that is not a regular file, which
    catches a path that was swapped for a FIFO or device after discovery. (O_NONBLOCK has
    no effect on reading regular files.)
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ExtractError(_special_file_reason(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_readable(path: str) -> str | None:
    """None if the file can be opened for reading, else the reason it cannot.

    Permission bits alone are not enough (ACLs, root, network file systems), so try it.
    """
    try:
        _open_regular(path).close()
    except OSError as error:
        return _os_reason(error)
    except ExtractError as error:
        return str(error)
    return None


def discover(paths: Iterable[str | os.PathLike[str]], glob: str | None = None) -> Iterator[Source | Skipped]:
    """Yield a Source per readable document under `paths`, or a Skipped with the reason.

    Directories are walked recursively in sorted order, following symlinks; a directory
    reached twice (a symlink cycle, or two links to the same tree) is walked once. Inside
    directories only files with a supported suffix that match `glob` are taken, and others
    are ignored silently; explicitly named files are always taken, or Skipped if their type
    is not supported. "-" stands for stdin.
    """
    matches = _glob_matcher(glob)
    visited_dirs: set[tuple[int, int]] = set()
    stdin_taken = False
    for given in paths:
        path = os.fspath(given)
        if path == STDIN_PATH:
            if stdin_taken:
                yield Skipped(path, "stdin was already named once")
            else:
                stdin_taken = True
                yield Source(path, "stdin", None)
            continue
        try:
            info = os.stat(path)
        except OSError as error:
            yield Skipped(path, _os_reason(error))
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk(path, info, matches, visited_dirs)
        elif not stat.S_ISREG(info.st_mode):
            yield Skipped(path, _special_file_reason(info.st_mode))
        elif (kind := _suffix_kind(path)) is None:
            yield Skipped(path, _unsupported_reason(path))
        elif (reason := _check_readable(path)) is not None:
            yield Skipped(path, reason)
        else:
            yield Source(path, kind, info.st_size)


def _walk(
    root: str, root_info: os.stat_result, matches, visited_dirs: set[tuple[int, int]]
) -> Iterator[Source | Skipped]:
    # An explicit stack instead of recursion: deep trees must not hit the recursion limit.
    # Each entry is (display path, parts relative to root, sorted names still to visit).
    stack: list[tuple[str, list[str], Iterator[str]]] = []

    def enter(path: str, parts: list[str], info: os.stat_result) -> Skipped | None:
        key = (info.st_dev, info.st_ino)
        if key in visited_dirs:  # what ends symlink cycles
            return Skipped(path, "directory already visited (symlink loop or duplicate)")
        visited_dirs.add(key)
        names = _list_dir(path)
        if isinstance(names, Skipped):
            return names
        stack.append((path, parts, iter(names)))
        return None

    if (skipped := enter(root, [], root_info)) is not None:
        yield skipped
    while stack:
        dir_path, rel_parts, pending = stack[-1]
        name = next(pending, None)
        if name is None:
            stack.pop()
            continue
        path = os.path.join(dir_path, name)
        parts = rel_parts + [name]
        kind = _suffix_kind(name)
        wanted = kind is not None and matches(parts)
        try:
            info = os.stat(path)
        except OSError as error:
            # A broken link that could not have been a wanted file is noise; loops are reported.
            if wanted or error.errno == errno.ELOOP:
                reason = "broken symlink" if error.errno == errno.ENOENT and os.path.islink(path) else _os_reason(error)
                yield Skipped(path, reason)
            continue
        if stat.S_ISDIR(info.st_mode):
            if (skipped := enter(path, parts, info)) is not None:
                yield skipped
        elif not wanted:
            continue
        elif not stat.S_ISREG(info.st_mode):
            yield Skipped(path, _special_file_reason(info.st_mode))
        elif (reason := _check_readable(path)) is not None:
            yield Skipped(path, reason)
        else:
            yield Source(path, kind, info.st_size)


def _list_dir(path: str) -> list[str] | Skipped:
    try:
        with os.scandir(path) as entries:
            return sorted(entry.name for entry in entries)
    except OSError as error:
        return Skipped(path, _os_reason(error))


# --------------------------------------------------------------------------- reading


def sha256_of(source: Source) -> str | None:
    """Hex SHA-256 of the file's raw bytes, read in blocks; None for stdin."""
    if source.kind == "stdin":
        return None
    digest = hashlib.sha256()
    try:
        with _open_regular(source.path) as stream:
            while block := stream.read(READ_BYTES):
                digest.update(block)
    except OSError as error:
        raise ExtractError(f"cannot read file: {_os_reason(error)}") from None
    return digest.hexdigest()


def iter_text(source: Source, stdin: BinaryIO | None = None) -> Iterator[str]:
    """Yield the text of `source` in pieces of at most PIECE_CHARS characters.

    Newlines are normalised to "\\n" and NUL characters removed. Raises ExtractError when
    the source cannot be read as text. The error can come after some pieces were already
    yielded (invalid UTF-8 deep into a big file, a file that becomes unreadable), so a
    caller that must not act on half a document has to read it through first.
    """
    if source.kind == "stdin":
        try:
            yield from _plain_pieces(stdin if stdin is not None else sys.stdin.buffer, empty_reason="empty input")
        except OSError as error:
            raise ExtractError(f"cannot read input: {_os_reason(error)}") from None
        return
    try:
        with _open_regular(source.path) as stream:
            if source.kind == "pdf":
                yield from _pdf_pieces(stream, source.path)
            elif source.kind == "html":
                yield from _html_pieces(stream)
            else:
                yield from _plain_pieces(stream, empty_reason="empty file")
    except OSError as error:
        raise ExtractError(f"cannot read file: {_os_reason(error)}") from None


def _plain_pieces(stream: BinaryIO, empty_reason: str) -> Iterator[str]:
    pieces = _cut_pieces(_decoded_blocks(stream, empty_reason))
    return _require_content(pieces, "only whitespace, no text")


def _require_content(pieces: Iterable[str], reason: str) -> Iterator[str]:
    """Drop leading whitespace-only pieces; raise if nothing else ever comes.

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


def _read_at_least(stream: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, or fewer only at EOF (pipes return short reads)."""
    data = bytearray()
    while len(data) < size:
        block = stream.read(size - len(data))
        if not block:
            break
        data += block
    return bytes(data)


def _detect_bom(head: bytes) -> tuple[str, int]:
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def _binary_reason(sample: str) -> str | None:
    """Why `sample` (the start of a file) looks like binary data, or None if it looks like text."""
    if not sample:
        return None
    if "\x00" in sample:
        return "binary content (NUL bytes), not a text file"
    controls = sum(1 for char in sample if (char < " " or char == "\x7f") and char not in _TEXT_CONTROLS)
    if controls / len(sample) > CONTROL_SHARE_LIMIT:
        return "binary content (many control characters), not a text file"
    return None


def _decoded_blocks(stream: BinaryIO, empty_reason: str) -> Iterator[str]:
    """Decode a byte stream block by block into newline-normalised, NUL-free text."""
    head = _read_at_least(stream, SNIFF_BYTES)
    if not head:
        raise ExtractError(empty_reason)
    encoding, bom_length = _detect_bom(head)
    if bom_length == 0:
        # Without a BOM the text must be UTF-8; latin-1 maps each byte to one character,
        # which lets the same check run on raw bytes and on decoded UTF-16/32 text.
        sample = head.decode("latin-1")
    else:
        sample = head[bom_length:].decode(encoding, errors="ignore")
    if (reason := _binary_reason(sample)) is not None:
        raise ExtractError(reason)

    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    label = encoding.upper()
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
            raise ExtractError(f"invalid {label} at byte {position}; convert the file to UTF-8") from None
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


def _cut_pieces(texts: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
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


# --------------------------------------------------------------------------- HTML


class _VisibleTextParser(HTMLParser):
    """Collects the text a browser would show, laid out roughly as it would be.

    Whitespace inside text collapses to single spaces (as HTML renders it), block elements
    start new lines, paragraph-like ones leave a blank line, and runs of blank lines
    collapse to one. Output accumulates in `self.out` for the caller to drain after each
    feed, which keeps memory bounded.
    """

    HIDDEN = frozenset({"script", "style", "noscript", "template"})
    PARAGRAPH = frozenset(
        {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl", "figure", "hr"}
    )
    LINE = frozenset(
        {
            "div", "li", "tr", "dt", "dd", "section", "article", "header", "footer", "nav", "aside", "main",
            "form", "fieldset", "address", "caption", "figcaption", "details", "summary", "title", "body",
        }
    )  # fmt: skip
    PRESERVED = frozenset({"pre", "textarea"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._hidden_depth = 0
        self._preserved_depth = 0
        self._pending_newlines = 0
        self._pending_space = False
        self._at_start = True

    def handle_starttag(self, tag: str, attrs) -> None:
        self._tag_boundary(tag, opening=True)

    def handle_startendtag(self, tag: str, attrs) -> None:
        # <br/>, <hr/>: no content, so nothing to hide or preserve.
        self._break_for(tag)

    def handle_endtag(self, tag: str) -> None:
        self._tag_boundary(tag, opening=False)

    def _tag_boundary(self, tag: str, opening: bool) -> None:
        step = 1 if opening else -1
        if tag in self.HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth + step)
            return
        if tag in self.PRESERVED:
            self._preserved_depth = max(0, self._preserved_depth + step)
        self._break_for(tag)

    def _break_for(self, tag: str) -> None:
        if self._hidden_depth:
            return
        if tag == "br":
            self._pending_newlines = min(2, self._pending_newlines + 1)
        elif tag in self.PARAGRAPH:
            self._pending_newlines = 2
        elif tag in self.LINE:
            self._pending_newlines = max(1, self._pending_newlines)

    def handle_data(self, data: str) -> None:
        if self._hidden_depth or not data:
            return
        if self._preserved_depth:
            self._write(data)
            return
        if data[0].isspace():
            self._pending_space = True
        collapsed = " ".join(data.split())
        if collapsed:
            self._write(collapsed)
        if data[-1].isspace():
            self._pending_space = True

    def _write(self, text: str) -> None:
        if not self._at_start:
            if self._pending_newlines:
                self.out.append("\n" * self._pending_newlines)
            elif self._pending_space:
                self.out.append(" ")
        self.out.append(text)
        self._at_start = False
        self._pending_newlines = 0
        self._pending_space = False


def _html_pieces(stream: BinaryIO) -> Iterator[str]:
    def visible_text() -> Iterator[str]:
        parser = _VisibleTextParser()
        for block in _decoded_blocks(stream, "empty file"):
            yield from _parse_step(parser, parser.feed, block)
        yield from _parse_step(parser, parser.close)

    return _require_content(_cut_pieces(visible_text()), "no visible text in HTML (only scripts, styles or markup)")


def _parse_step(parser: _VisibleTextParser, step, *args) -> Iterator[str]:
    try:
        step(*args)
    except Exception as error:  # html.parser can still trip on malformed input
        raise ExtractError(f"cannot parse HTML: {_one_line(error) or type(error).__name__}") from None
    if parser.out:
        text = "".join(parser.out)
        parser.out.clear()
        yield text


# --------------------------------------------------------------------------- PDF


def _pdf_pieces(stream: BinaryIO, display_path: str) -> Iterator[str]:
    """One piece per page that has text (cut further only if a page is huge).

    pypdf is handed the open file rather than the path: given a path it reads the whole
    file into memory. Any exception from pypdf means a damaged file; it raises many kinds.
    """
    try:
        reader = pypdf.PdfReader(stream, strict=False)
        if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
            raise ExtractError("PDF is encrypted (password protected)")
        page_count = len(reader.pages)
    except ExtractError:
        raise
    except pypdf.errors.DependencyError as error:
        raise ExtractError(f"cannot decrypt PDF: {_one_line(error)}") from None
    except Exception as error:
        raise ExtractError(f"corrupt or truncated PDF: {_one_line(error) or type(error).__name__}") from None
    if page_count == 0:
        raise ExtractError("PDF has no pages")

    failures: list[str] = []
    pages_with_text = 0
    for index in range(page_count):
        try:
            text = reader.pages[index].extract_text()
        except Exception as error:
            reason = _one_line(error) or type(error).__name__
            failures.append(reason)
            logger.warning("%r: skipping unreadable page %d: %s", display_path, index + 1, reason)
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()
        if not text:
            continue
        if pages_with_text:
            text = "\n\n" + text
        pages_with_text += 1
        yield from _cut_pieces([text])
    if len(failures) == page_count:
        raise ExtractError(f"no page of the PDF could be read (first error: {failures[0]})")
    if not pages_with_text:
        raise ExtractError("no extractable text (scanned PDF?)")
