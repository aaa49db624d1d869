"""Durable file I/O: how memcli opens, reads, writes, replaces and hashes files.

Every file is written under a temporary name, fsynced, renamed into place and its folder fsynced
(`replace_file`). Every file memcli reads from a place a user or another program can write (the
pool store, a model folder, the converted-copy cache) is opened without following a symbolic link
and without blocking (O_NONBLOCK: a FIFO put in place of a file must not hang a command), and
checked to be a regular file with fstat before a byte is read (`open_regular`).

A leaf module: the store, config, settings, converted copies, the catalog and the log of answers
share it; it knows nothing about any of them. Its refusals are `FileRefused` (a link, not a regular
file, too large) and `FileUnreadable` (the system would not let it be read), one line each.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path

from .errors import FileRefused, FileUnreadable

TMP = ".tmp-"  # every temporary name memcli writes starts with this
CHUNK = 8 << 20  # bytes per write / read / hash step

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_BINARY = getattr(os, "O_BINARY", 0)


def token() -> str:
    """A unique suffix for temporary names: the pid (for people reading a listing) + randomness."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


# ------------------------------------------------------------------------ hashing


def new_hash():
    """memcli's one content hash (sha256): store parts are named by its hex digest."""
    return hashlib.sha256()


def hash_fd(fd: int) -> tuple[str, int]:
    """sha256 hex and size of an open file, read from its start with pread (offset untouched)."""
    h = new_hash()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [buf], offset)
        if not n:
            break
        h.update(view[:n])
        offset += n
    return h.hexdigest(), offset


# ------------------------------------------------------------------------ opening


def open_regular(path: Path | str, what: str, max_bytes: int | None = None, dir_fd: int | None = None) -> int:
    """Open an existing file for reading (`path` relative to `dir_fd` when given); never follows
    a symlink, never blocks, refuses anything but a regular file (and, with max_bytes, anything
    larger): FileRefused naming `what`; FileUnreadable when the system refuses the open. Returns
    the fd. FileNotFoundError passes through (callers decide what a missing file means)."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileRefused(f"{what} is a symbolic link; refusing") from None
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket or a FIFO without writer
            raise FileRefused(f"{what} is not a regular file; refusing") from None
        raise FileUnreadable(f"cannot read {what} ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{what} is not a regular file ({file_kind(st.st_mode)}); refusing")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileRefused(f"{what} is implausibly large ({st.st_size} bytes, at most {max_bytes})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_kind(mode: int) -> str:
    """What a file of this mode is, in words ("a FIFO", "a folder"...)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def read_fd(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from the start of an open regular file."""
    chunks, offset = [], 0
    while offset < limit:
        data = os.pread(fd, min(CHUNK, limit - offset), offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks)


def read_regular(path: Path | str, what: str, max_bytes: int) -> bytes:
    """The bytes of a small file, opened as `open_regular` opens it (at most `max_bytes`)."""
    fd = open_regular(path, what, max_bytes=max_bytes)
    try:
        return read_fd(fd, max_bytes)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ writing


def write_all(fd: int, data) -> None:
    """Write every byte of `data` to `fd`. All bytes memcli saves go through here."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def create_exclusive(path: Path | str, mode: int = 0o600) -> int:
    """A new file opened for writing; FileExistsError if anything is at `path` (never truncates)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY, mode)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - filesystems that cannot fsync folders
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Create `path` (must not exist) holding `data`, fsynced; removed again on failure."""
    fd = create_exclusive(path)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quiet(path)
        raise
    os.close(fd)


def replace_file(folder: Path, name: str, data: bytes) -> None:
    """Atomically make folder/name hold `data` (temp file, fsync, rename, fsync folder)."""
    tmp = folder / f"{TMP}{name}-{token()}"
    write_file(tmp, data)
    try:
        os.replace(tmp, folder / name)
    except BaseException:
        unlink_quiet(tmp)
        raise
    fsync_dir(folder)


def unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def rmtree_quiet(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def is_nospace(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
