"""Paths to named byte streams: what a user names on the command line, turned into the documents a
pool can ingest, before any of them is read (so every file can be reported on first).

`discover(paths, glob, type, encoding, stdin)` walks the named paths and yields, in order:
* a `Source` for every readable document: its `name` (the label a pool logs it under: the
  absolute, normalized path for a file, "-" for stdin), `kind` (what its content is: see
  `memcli.ingest.extract.detect`), `size`, and `open()`, a binary stream of its bytes (a file is
  opened without ever blocking on a FIFO and refused if it is no longer a regular file; stdin's
  stream is the one given, never closed by a reader). Whoever reads a Source needs nothing else:
  `memcli.ingest.extract.iter_text(source)` reads it, and a client can send `open()`'s bytes under
  `name`;
* a `Skipped` with a one-line reason (missing, unreadable, a FIFO, socket or device, a symlink
  loop, a directory reached twice);
* an `Ignored` for a file inside a folder left out by --glob or by a binary format's suffix
  (images, archives, executables, ...: not opened, counted by type in the summary). Named
  explicitly, such a file is still read.

Directories are walked in sorted order, following symlinks, and each is walked once (what ends
symlink cycles); nothing that is not a regular file is ever opened.

Sources from elsewhere: a server that received a client's files as uploaded copies makes their
Sources with `Source.from_file(copy, name=the client's name, type=..., encoding=...)` (the kind is
detected from the copy's content and the name's suffix, as `discover` does) and
`Source.from_stdin(stream)`, so everything downstream sees the client's names and nothing relabels.
A Source's `path` is where its bytes are on this machine (for a discovered file, its name).
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import BinaryIO, Iterable, Iterator

from memcli.ingest.extract.detect import SNIFF_BYTES, TYPES, kind_of
from memcli.ingest.extract.pieces import ExtractError, os_reason
from memcli.ingest.extract.text import GZIP_MAGIC, gunzip_head

STDIN_PATH = "-"

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


@dataclass(frozen=True)
class Source:
    """One document to read: where its bytes are (`path`), what it is called (`name`) and is."""

    path: str  # where the bytes are: an absolute, normalized path; "-" for stdin
    kind: str  # "pdf" | "text" | "markdown" | "html" | "man" | "stdin"
    size: int | None  # bytes on disk, None for stdin
    compressed: bool = False  # gzip: the text is inside
    encoding: str | None = None  # forced with --encoding (None: detected)
    forced: bool = False  # --type given: read as `kind` whatever the content looks like
    name: str = ""  # the label a pool logs it under (default: `path`)
    stream: BinaryIO | None = field(default=None, compare=False, repr=False)  # stdin's bytes (None: sys.stdin)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.path)

    def open(self) -> BinaryIO:
        """A binary stream of the source's bytes: a file opened anew (without blocking, refused
        with ExtractError if it is no longer a regular file; OSError if it cannot be opened), or
        stdin's stream (the same one every time: it can be read once; the caller does not close it)."""
        if self.kind == "stdin":
            return self.stream if self.stream is not None else sys.stdin.buffer
        return _open_regular(self.path)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], name: str | None = None, type: str | None = None,
                  encoding: str | None = None) -> Source | Skipped:
        """The Source of the regular file at `path`, labelled `name` (default: its absolute path),
        its kind detected as `discover` detects it (from the content, and the name's suffix), or a
        Skipped labelled `name` when it cannot be read. ValueError names a bad `type`/`encoding`."""
        encoding = _checked_options(type, encoding)
        path = os.path.abspath(os.fspath(path))
        name = name or path
        try:
            info = os.stat(path)
        except OSError as error:
            return Skipped(name, os_reason(error))
        if not stat.S_ISREG(info.st_mode):
            return Skipped(name, _special_file_reason(info.st_mode))
        return _classify(path, info.st_size, type, encoding, name)

    @classmethod
    def from_stdin(cls, stream: BinaryIO | None = None, type: str | None = None,
                   encoding: str | None = None) -> Source:
        """The Source "-" reading `stream` (default: this process's stdin when read)."""
        encoding = _checked_options(type, encoding)
        return cls(STDIN_PATH, "stdin", None, encoding=encoding, forced=type is not None, stream=stream)


@dataclass(frozen=True)
class Skipped:
    """A named path that is not read, and why (one line)."""

    path: str  # as the Source would have been named
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A file inside a folder left out by its type (a binary format's suffix) or by --glob."""

    path: str
    why: str  # "type" | "glob"
    suffix: str = ""


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
    stdin: BinaryIO | None = None,
) -> Iterator[Source | Skipped | Ignored]:
    """Yield a Source per readable document under `paths`, a Skipped with the reason, or an
    Ignored for a file inside a folder that is left out by type or by `glob`.

    Directories are walked recursively in sorted order, following symlinks; a directory
    reached twice (a symlink cycle, or two links to the same tree) is walked once. What a file
    is comes from its first bytes (see the module docstring); `type` forces one of TYPES and
    `encoding` names the text's encoding. Explicitly named files are always read. "-" stands
    for stdin (`stdin`, or this process's when None), once.
    """
    encoding = _checked_options(type, encoding)
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
                yield Source(path, "stdin", None, encoding=encoding, forced=type is not None, stream=stdin)
            continue
        path = os.path.abspath(path)  # the identity of a source: absolute and normalized
        try:
            info = os.stat(path)
        except OSError as error:
            yield Skipped(path, os_reason(error))
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk(path, info, matches, visited_dirs, type, encoding)
        elif not stat.S_ISREG(info.st_mode):
            yield Skipped(path, _special_file_reason(info.st_mode))
        else:
            yield _classify(path, info.st_size, type, encoding)


def _classify(path: str, size: int, forced: str | None, encoding: str | None,
              name: str | None = None) -> Source | Skipped:
    """A Source of the kind its first bytes (and its name's suffix) say, or Skipped if it cannot
    be opened."""
    name = name or path
    try:
        with _open_regular(path) as stream:
            head = stream.read(SNIFF_BYTES)
            compressed = head[:2] == GZIP_MAGIC
            if compressed:
                head = gunzip_head(stream)
    except OSError as error:
        return Skipped(name, os_reason(error))
    except ExtractError as error:
        return Skipped(name, str(error))
    if forced is not None:
        return Source(path, forced, size, compressed, encoding, forced=True, name=name)
    return Source(path, kind_of(name, head, compressed), size, compressed, encoding, name=name)


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
                reason = "broken symlink" if error.errno == errno.ENOENT and os.path.islink(path) else os_reason(error)
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
        return Skipped(path, os_reason(error))


def _checked_options(type: str | None, encoding: str | None) -> str | None:
    """`encoding`'s canonical name; ValueError for a `type` not in TYPES or an unknown encoding."""
    if type is not None and type not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, not {type!r}")
    if encoding is not None:
        try:
            encoding = codecs.lookup(encoding).name
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (--encoding)") from None
    return encoding
