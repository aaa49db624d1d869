"""Durable file I/O: the only way the store opens, writes, renames and hashes files.

Every file is written under a temporary name, fsynced, renamed into place and its folder
fsynced. Every file the store reads is opened without following a symbolic link and without
blocking (O_NONBLOCK: a FIFO put in place of a file must not hang a command), and checked to
be a regular file with fstat before a byte is read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from memcli.base.clock import now_iso

from .errors import PoolCorrupt, PoolError, PoolExists

TMP = ".tmp-"  # every temporary name in the store starts with this
CHUNK = 8 << 20  # bytes per write / read / hash step

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_BINARY = getattr(os, "O_BINARY", 0)


def now() -> str:
    """memcli's one clock format (memcli.base.clock): UTC, milliseconds, 'Z' (2026-12-01T10:22:58.123Z)."""
    return now_iso()


def token() -> str:
    """A unique suffix for temporary names: the pid (for people reading a listing) + randomness."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


# ------------------------------------------------------------------------ hashing


def new_hash():
    """The store's one content hash (sha256); parts are named by its hex digest."""
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
    larger). Returns the fd. FileNotFoundError passes through (callers decide what a missing file
    means)."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PoolCorrupt(f"{what} is a symbolic link; refusing") from None
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket or a FIFO without writer
            raise PoolCorrupt(f"{what} is not a regular file; refusing") from None
        raise PoolError(f"cannot read {what} ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PoolCorrupt(f"{what} is not a regular file ({file_kind(st.st_mode)}); refusing")
        if max_bytes is not None and st.st_size > max_bytes:
            raise PoolCorrupt(f"{what} is implausibly large ({st.st_size} bytes, at most {max_bytes})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_kind(mode: int) -> str:
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


# ------------------------------------------------------------------------ writing


def write_all(fd: int, data) -> None:
    """Write every byte of `data` to `fd`. All bytes the store saves go through here."""
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


def publish_dir(stage: Path, dest: Path, name: str) -> None:
    """The one staged-folder rename: a folder built completely under a temporary name
    appears at `dest` in one step, or not at all (PoolExists if something is there)."""
    fsync_dir(stage)
    if os.path.lexists(dest):
        raise PoolExists(f"pool {name} already exists")
    try:
        os.rename(stage, dest)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise PoolExists(f"pool {name} already exists") from None
        raise
    fsync_dir(dest.parent)


def unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def rmtree_quiet(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def is_nospace(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


@contextmanager
def write_errors(while_doing: str, could_not: str, outcome: str = ""):
    """Turn an OS failure of the writes inside into its one-line PoolError (`as_pool_error`);
    anything else passes unchanged."""
    try:
        yield
    except BaseException as exc:
        error = as_pool_error(exc, while_doing, could_not, outcome)
        if error is not None:
            raise error from None
        raise


def as_pool_error(exc: BaseException, while_doing: str, could_not: str, outcome: str = "") -> PoolError | None:
    """The one-line PoolError for an OS failure of a write (disk full said plainly); None for
    anything else, which the caller re-raises unchanged (PoolErrors, KeyboardInterrupt, bugs)."""
    if isinstance(exc, PoolError) or not isinstance(exc, OSError):
        return None
    tail = f"; {outcome}" if outcome else ""
    if is_nospace(exc):
        return PoolError(f"no space left on device while {while_doing}{tail}")
    return PoolError(f"could not {could_not} ({exc.strerror or exc}){tail}")
