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

What a file is comes from its content, not its name: a PDF by its `%PDF-` signature, gzip by its
magic bytes (the text inside is read), a man page by its roff requests (rendered with mandoc or
groff), HTML by its suffix or doctype; every other file that decodes as text is text (source code,
CSV, JSON, .rst, .org, .tex, README, LICENSE), in UTF-8, a BOM's encoding, or the encoding
charset-normalizer detects. Inside folders, files whose suffix names a binary format (images,
archives, executables, ...) are ignored without being opened and counted by type.

A source's identity is its absolute, normalized path (`Source.path`).
"""

from __future__ import annotations

import codecs
import errno
import gzip
import hashlib
import html
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import zlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import BinaryIO, Iterable, Iterator

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
# What `--type` can force.
TYPES = ("text", "markdown", "html", "pdf", "man")

# Inside folders: suffixes of binary formats, ignored without opening the file (and counted by
# type in the summary). Named explicitly, such a file is still read (and skipped if binary).
IGNORED_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .icns .webp .tif .tiff .psd .xcf .heic .avif "
    ".zip .tar .tgz .xz .txz .bz2 .tbz2 .zst .lz .lz4 .lzma .7z .rar .cab .jar .war .whl .egg .apk "
    ".deb .rpm .iso .img .dmg .so .o .a .ko .dylib .dll .exe .bin .elf .lib .obj .pyc .pyo .class .wasm "
    ".mp3 .mp4 .m4a .wav .ogg .oga .flac .opus .mkv .avi .mov .webm .mpg .mpeg "
    ".ttf .otf .woff .woff2 .eot .pfb .db .sqlite .sqlite3 .pickle .pkl .pt .pth .safetensors .npy .npz .h5 "
    ".docx .xlsx .pptx .odt .ods .odp .doc .xls .ppt .mo .gmo".split()
)
# Folders that hold tool data, not documents.
IGNORED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".tox", "node_modules"})
# A man page (or gzip member) larger than this is not rendered in memory.
MAN_MAX_BYTES = 16 << 20
RENDER_TIMEOUT_S = 120
# Suffixes of man pages: name.1, name.3pm, name.1ssl, name.n (optionally .gz)
_MAN_SUFFIX = re.compile(r"\.([0-9][a-z]*|n|l)$")
_ROFF = re.compile(rb"^(?:\.TH[ \t]|\.Dd[ \t]|\.SH[ \t]|\.so[ \t]|\.\\\"|'\\\")", re.MULTILINE)

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
    path: str  # absolute, normalized path (the source's identity); "-" for stdin
    kind: str  # "pdf" | "text" | "markdown" | "html" | "man" | "stdin"
    size: int | None  # bytes on disk, None for stdin
    compressed: bool = False  # gzip: the text is inside
    encoding: str | None = None  # forced with --encoding (None: detected)
    forced: bool = False  # --type given: read as `kind` whatever the content looks like


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A file inside a folder left out by its type (a binary format's suffix) or by --glob."""

    path: str
    why: str  # "type" | "glob"
    suffix: str = ""


@dataclass
class Reading:
    """How far iter_text has read a source, for progress: `done` of `total` `unit`s."""

    done: int = 0
    total: int | None = None
    unit: str = "bytes"  # "bytes" | "pages"


def _one_line(message: object, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _os_reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    return error.strerror or _one_line(error) or type(error).__name__


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


def discover(
    paths: Iterable[str | os.PathLike[str]],
    glob: str | None = None,
    type: str | None = None,
    encoding: str | None = None,
) -> Iterator[Source | Skipped | Ignored]:
    """Yield a Source per readable document under `paths`, a Skipped with the reason, or an
    Ignored for a file inside a folder that is left out by type or by `glob`.

    Directories are walked recursively in sorted order, following symlinks; a directory
    reached twice (a symlink cycle, or two links to the same tree) is walked once. What a file
    is comes from its first bytes (see the module docstring); `type` forces one of TYPES and
    `encoding` names the text's encoding. Explicitly named files are always read. "-" stands
    for stdin.
    """
    if type is not None and type not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, not {type!r}")
    if encoding is not None:
        try:
            encoding = codecs.lookup(encoding).name
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (--encoding)") from None
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
                yield Source(path, "stdin", None, encoding=encoding, forced=type is not None)
            continue
        path = os.path.abspath(path)  # the identity of a source: absolute and normalized
        try:
            info = os.stat(path)
        except OSError as error:
            yield Skipped(path, _os_reason(error))
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk(path, info, matches, visited_dirs, type, encoding)
        elif not stat.S_ISREG(info.st_mode):
            yield Skipped(path, _special_file_reason(info.st_mode))
        else:
            yield _classify(path, info.st_size, type, encoding)


def _classify(path: str, size: int, forced: str | None, encoding: str | None) -> Source | Skipped:
    """A Source of the kind its first bytes say, or Skipped if it cannot be opened."""
    try:
        with _open_regular(path) as stream:
            head = stream.read(SNIFF_BYTES)
            compressed = head[:2] == b"\x1f\x8b"
            if compressed:
                head = _gunzip_head(stream, head)
    except OSError as error:
        return Skipped(path, _os_reason(error))
    except ExtractError as error:
        return Skipped(path, str(error))
    if forced is not None:
        return Source(path, forced, size, compressed, encoding, forced=True)
    return Source(path, _kind_of(path, head, compressed), size, compressed, encoding)


def _gunzip_head(stream: BinaryIO, head: bytes) -> bytes:
    """The first SNIFF_BYTES of a gzip file's content ("" when it is not valid gzip: then the
    reader reports the problem)."""
    stream.seek(0)
    try:
        with gzip.GzipFile(fileobj=stream) as inner:
            return inner.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error):
        return b""


def _kind_of(path: str, head: bytes, compressed: bool) -> str:
    name = path[:-3] if compressed and path.lower().endswith(".gz") else path
    suffix = os.path.splitext(name)[1].lower()
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if suffix == ".pdf" and _binary_reason(head.decode("latin-1")) is not None:
        return "pdf"  # a damaged PDF: let the PDF reader say what is wrong with it
    if _ROFF.search(head[:4096]) and (_MAN_SUFFIX.search(name) or head.startswith((b".\\\"", b".TH", b"'\\\""))):
        return "man"
    if suffix in (".html", ".htm", ".xhtml"):
        return "html"
    lowered = head[:512].lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "html"
    if suffix in (".md", ".markdown"):
        return "markdown"
    return "text"


def _walk(
    root: str, root_info: os.stat_result, matches, visited_dirs: set[tuple[int, int]],
    forced: str | None, encoding: str | None,
) -> Iterator[Source | Skipped | Ignored]:
    # An explicit stack instead of recursion: deep trees must not hit the recursion limit.
    # Each entry is (path, parts relative to root, sorted names still to visit).
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
        suffix = os.path.splitext(name)[1].lower()
        try:
            info = os.stat(path)
        except OSError as error:
            # a broken link that could not have been a wanted file is noise; loops are reported
            if error.errno == errno.ELOOP or (matches(parts) and suffix not in IGNORED_SUFFIXES):
                reason = "broken symlink" if error.errno == errno.ENOENT and os.path.islink(path) else _os_reason(error)
                yield Skipped(path, reason)
            continue
        if stat.S_ISDIR(info.st_mode):
            if name in IGNORED_DIRS:
                continue
            if (skipped := enter(path, parts, info)) is not None:
                yield skipped
            continue
        if not matches(parts):
            yield Ignored(path, "glob", suffix)
        elif forced is None and suffix in IGNORED_SUFFIXES:
            yield Ignored(path, "type", suffix)
        elif not stat.S_ISREG(info.st_mode):
            yield Skipped(path, _special_file_reason(info.st_mode))
        else:
            yield _classify(path, info.st_size, forced, encoding)


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


def iter_text(source: Source, stdin: BinaryIO | None = None, reading: Reading | None = None) -> Iterator[str]:
    """Yield the text of `source` in pieces of at most PIECE_CHARS characters.

    Newlines are normalised to "\\n" and NUL characters removed. Raises ExtractError when
    the source cannot be read as text. The error can come after some pieces were already
    yielded (invalid UTF-8 deep into a big file, a file that becomes unreadable), so a
    caller that must not act on half a document has to read it through first. `reading`,
    if given, is kept up to date with how far the file has been read (for progress).
    """
    reading = reading if reading is not None else Reading()
    if source.kind == "stdin":
        try:
            yield from _plain_pieces(stdin if stdin is not None else sys.stdin.buffer, "empty input",
                                     source.encoding, source.forced)
        except OSError as error:
            raise ExtractError(f"cannot read input: {_os_reason(error)}") from None
        return
    reading.total, reading.unit = source.size, "bytes"
    try:
        with _open_regular(source.path) as raw:
            def on_read() -> None:
                try:
                    reading.done = raw.tell()
                except (OSError, ValueError, AttributeError):  # progress only: never fails a read
                    pass

            stream: BinaryIO = raw
            if source.compressed:
                stream = gzip.GzipFile(fileobj=raw)
            try:
                if source.kind == "pdf":
                    yield from _pdf_pieces(stream, source.path, reading)
                elif source.kind == "html":
                    yield from _html_pieces(stream, source.encoding, source.forced, on_read)
                elif source.kind == "man":
                    yield from _man_pieces(stream, on_read)
                else:
                    yield from _plain_pieces(stream, "empty file", source.encoding, source.forced, on_read)
            except (EOFError, zlib.error, gzip.BadGzipFile) as error:
                raise ExtractError(f"damaged gzip data: {_one_line(error) or type(error).__name__}") from None
    except OSError as error:
        raise ExtractError(f"cannot read file: {_os_reason(error)}") from None


def _plain_pieces(stream: BinaryIO, empty_reason: str, encoding: str | None = None, forced: bool = False,
                  on_read=None) -> Iterator[str]:
    pieces = _cut_pieces(_decoded_blocks(stream, empty_reason, encoding, forced, on_read))
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


def _utf8_prefix_valid(head: bytes) -> bool:
    """Whether `head` is UTF-8, allowing a character cut off at its end."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


# Among single-byte encodings that charset-normalizer finds about as plausible as its best guess,
# the Western European one is by far the most common in files (and latin-1 text is cp1252 text):
# on a few hundred bytes of French it otherwise names cp775 or cp1250 first.
_PREFERRED_ENCODINGS = ("cp1252", "latin_1", "iso8859_15")
_PLAUSIBILITY_MARGIN = 0.1


def _detect_encoding(head: bytes) -> str | None:
    """The encoding charset-normalizer finds most plausible for `head`, or None."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(head))
    if not matches:
        return None
    best = matches[0]
    for match in matches:
        if match.encoding in _PREFERRED_ENCODINGS and match.chaos <= best.chaos + _PLAUSIBILITY_MARGIN:
            return match.encoding
    return best.encoding


def _decoded_blocks(stream: BinaryIO, empty_reason: str, encoding: str | None = None, forced: bool = False,
                    on_read=None) -> Iterator[str]:
    """Decode a byte stream block by block into newline-normalised, NUL-free text.

    The encoding: `encoding` if given, else a BOM's, else UTF-8 when the start of the file is
    valid UTF-8, else what charset-normalizer detects (decoded leniently: a guess may not
    cover every byte). `forced` (--type text) reads even what looks binary, leniently.
    """
    head = _read_at_least(stream, SNIFF_BYTES)
    if on_read is not None:
        on_read()
    if not head:
        raise ExtractError(empty_reason)
    errors = "replace" if forced else "strict"
    bom_encoding, bom_length = _detect_bom(head)
    if encoding is None and bom_length:
        encoding = bom_encoding
    else:
        bom_length = 0 if encoding is not None and not encoding.startswith("utf") else bom_length
        if encoding is None:
            encoding = "utf-8"
    sample = head[bom_length:].decode(encoding, errors="ignore") if bom_length else head.decode("latin-1")
    if not forced and (reason := _binary_reason(sample)) is not None:
        raise ExtractError(reason)
    if encoding == "utf-8" and not bom_length and not _utf8_prefix_valid(head):
        detected = _detect_encoding(head)
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


class _VisibleText:
    """Lays out the text a browser would show, roughly as it would.

    Whitespace inside text collapses to single spaces (as HTML renders it), block elements
    start new lines, paragraph-like ones leave a blank line, and runs of blank lines
    collapse to one. Output accumulates in `self.out` for the caller to drain.
    """

    HIDDEN = frozenset({"noscript", "template"})  # script and style are skipped by the lexer
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
    VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "area", "base", "col", "embed", "source"})

    def __init__(self) -> None:
        self.out: list[str] = []
        self._hidden_depth = 0
        self._preserved_depth = 0
        self._pending_newlines = 0
        self._pending_space = False
        self._at_start = True

    def tag(self, name: str, closing: bool, self_closing: bool) -> None:
        if self_closing or name in self.VOID:
            self._break_for(name)  # no content, so nothing to hide or preserve
            return
        step = -1 if closing else 1
        if name in self.HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth + step)
            return
        if name in self.PRESERVED:
            self._preserved_depth = max(0, self._preserved_depth + step)
        self._break_for(name)

    def _break_for(self, tag: str) -> None:
        if self._hidden_depth:
            return
        if tag == "br":
            self._pending_newlines = min(2, self._pending_newlines + 1)
        elif tag in self.PARAGRAPH:
            self._pending_newlines = 2
        elif tag in self.LINE:
            self._pending_newlines = max(1, self._pending_newlines)

    def data(self, data: str) -> None:
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


_TAG_START = re.compile(r"<(?:(/?)([A-Za-z][^\s/>]{0,63})|(!--)|([!?/]))")
_TAG_END_OR_QUOTE = re.compile(r">|=\s*([\"'])")
_RAW_TEXT = frozenset({"script", "style"})
_PARTIAL_ENTITY = re.compile(r"&#?[A-Za-z0-9]{0,32}$")


class _HtmlLexer:
    """A streaming HTML lexer for visible text, linear in the input's size.

    Every character is looked at a bounded number of times: text runs up to the next "<",
    tags are skipped to their ">" (quoted attribute values jumped over in one search), comments
    to "-->", script and style bodies to their end tag. Only a tag's name is kept, so a tag of
    any length costs memory for 64 characters (html.parser keeps re-scanning a tag that spans
    many reads: quadratic time). What it cannot complete at the end of a block it carries to
    the next, and that carry never holds more than a few dozen characters outside a text run.
    """

    def __init__(self, sink: _VisibleText) -> None:
        self.sink = sink
        self.buffer = ""
        self.state = "text"  # "text" | "tag" | "quoted" | "comment" | "decl" | "raw"
        self.quote = ""
        self.tag_name = ""
        self.closing = False
        self.last_tag_char = ""  # "/" before ">" makes a self-closing tag
        self.raw_end: re.Pattern | None = None

    def feed(self, text: str, final: bool = False) -> None:
        buf = self.buffer + text
        self.buffer = ""
        i, n = 0, len(buf)
        while i < n:
            if self.state == "text":
                m = _TAG_START.search(buf, i)
                if not final and (m is None or n - m.start() < 4 or (m.group(2) and m.end() == n)):
                    # the block may end inside a tag's start or an entity: carry that over
                    if m is not None:
                        keep = m.start()
                    else:
                        lt = buf.rfind("<", max(i, n - 3))
                        keep = lt if lt >= 0 else n
                    if (entity := _PARTIAL_ENTITY.search(buf, max(i, keep - 34), keep)) is not None:
                        keep = entity.start()
                    self._data(buf[i:keep])
                    self.buffer = buf[keep:]
                    return
                if m is None:
                    self._data(buf[i:])
                    return
                self._data(buf[i:m.start()])
                if m.group(2):
                    self.closing, self.tag_name = bool(m.group(1)), m.group(2).lower()
                    self.last_tag_char = ""
                    self.state = "tag"
                elif m.group(3):
                    self.state = "comment"
                else:
                    self.state = "decl"
                i = m.end()
            elif self.state == "tag":
                m = _TAG_END_OR_QUOTE.search(buf, i)
                if m is None:
                    # keep a trailing "=" and spaces: the quote may come in the next block
                    tail = buf[i:]
                    stripped = tail.rstrip()
                    if stripped.endswith("="):
                        self.buffer = "="
                    self.last_tag_char = stripped[-1:] or self.last_tag_char
                    return
                if m.group(0) == ">":
                    self.last_tag_char = buf[m.start() - 1] if m.start() > i else self.last_tag_char
                    self._end_tag()
                    i = m.end()
                else:
                    self.quote, self.state, i = m.group(1), "quoted", m.end()
            elif self.state == "quoted":
                j = buf.find(self.quote, i)
                if j < 0:
                    return
                self.state, self.last_tag_char, i = "tag", "", j + 1
            elif self.state == "comment":
                j = buf.find("-->", i)
                if j < 0:
                    self.buffer = buf[max(i, n - 2):]
                    return
                self.state, i = "text", j + 3
            elif self.state == "decl":
                j = buf.find(">", i)
                if j < 0:
                    return
                self.state, i = "text", j + 1
            else:  # raw text of script/style: up to its end tag
                m = self.raw_end.search(buf, i)
                if m is None:
                    self.buffer = buf[max(i, n - 10):]
                    return
                self.state, self.closing, self.tag_name, self.last_tag_char = "tag", True, m.group(1).lower(), ""
                i = m.end()

    def _end_tag(self) -> None:
        name, self.state = self.tag_name, "text"
        if name in _RAW_TEXT:
            if not self.closing and self.last_tag_char != "/":
                self.state = "raw"
                self.raw_end = re.compile(r"</(" + name + r")\b", re.IGNORECASE)
            return
        self.sink.tag(name, self.closing, self.last_tag_char == "/")

    def _data(self, text: str) -> None:
        if text:
            self.sink.data(html.unescape(text) if "&" in text else text)


def _html_pieces(stream: BinaryIO, encoding: str | None = None, forced: bool = False, on_read=None) -> Iterator[str]:
    def visible_text() -> Iterator[str]:
        sink = _VisibleText()
        lexer = _HtmlLexer(sink)
        for block in _decoded_blocks(stream, "empty file", encoding, forced, on_read):
            lexer.feed(block)
            if sink.out:
                yield "".join(sink.out)
                sink.out.clear()
        lexer.feed("", final=True)
        if sink.out:
            yield "".join(sink.out)

    return _require_content(_cut_pieces(visible_text()), "no visible text in HTML (only scripts, styles or markup)")


# --------------------------------------------------------------------------- man pages


def man_renderer() -> list[str] | None:
    """The command that renders a man page's roff to plain text here, or None."""
    if mandoc := shutil.which("mandoc"):
        return [mandoc, "-T", "utf8"]
    if groff := shutil.which("groff"):
        return [groff, "-t", "-mandoc", "-Tutf8", "-P-c", "-P-b", "-P-u"]
    return None


_OVERSTRIKE = re.compile(r".\x08")
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def _man_pieces(stream: BinaryIO, on_read=None) -> Iterator[str]:
    command = man_renderer()
    if command is None:
        raise ExtractError("a man page, and no renderer is installed (install mandoc or groff, "
                           "or read the roff source with --type text)")
    roff = stream.read(MAN_MAX_BYTES + 1)
    if on_read is not None:
        on_read()
    if len(roff) > MAN_MAX_BYTES:
        raise ExtractError(f"man page over {MAN_MAX_BYTES >> 20} MiB; not rendered")
    try:
        done = subprocess.run(command, input=roff, capture_output=True, timeout=RENDER_TIMEOUT_S,
                              env={**os.environ, "LC_ALL": "C.UTF-8", "GROFF_NO_SGR": "1", "MANWIDTH": "80"})
    except subprocess.TimeoutExpired:
        raise ExtractError(f"rendering the man page took over {RENDER_TIMEOUT_S} s") from None
    except OSError as error:
        raise ExtractError(f"cannot run {os.path.basename(command[0])}: {_os_reason(error)}") from None
    text = done.stdout.decode("utf-8", errors="replace")
    if not text.strip() and done.returncode != 0:
        first = done.stderr.decode("utf-8", errors="replace").strip().splitlines()[:1]
        raise ExtractError(f"cannot render the man page: {first[0] if first else 'renderer failed'}")
    text = _SGR.sub("", _OVERSTRIKE.sub("", text)).replace("\r", "").replace("\x00", "")
    return _require_content(_cut_pieces([text]), "man page without text (only an include of another page?)")


# --------------------------------------------------------------------------- PDF


def _pdf_pieces(stream: BinaryIO, display_path: str, reading: Reading | None = None) -> Iterator[str]:
    """One piece per page that has text (cut further only if a page is huge).

    pypdf is handed the open file rather than the path: given a path it reads the whole
    file into memory. Any exception from pypdf means a damaged file; it raises many kinds.
    """
    import pypdf  # only PDFs need it (its import is not free)

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
    if reading is not None:
        reading.done, reading.total, reading.unit = 0, page_count, "pages"

    failures: list[str] = []
    pages_with_text = 0
    for index in range(page_count):
        if reading is not None:
            reading.done = index + 1
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
