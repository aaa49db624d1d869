"""Locks, all of them flock(2): the kernel releases a lock when its holder dies, so a lock
left by a dead process (on this host or any other, after a reboot, a container restart...)
never blocks anybody, and there is nothing to take over or judge stale.

  <root>/.locks/<name>.lock   one per pool name: its writer (exclusive). The file's content
                              only names the holder for the busy message; it is never trusted.
  <root>/.locks/gate          the store gate. Shared by every reader while it opens a snapshot's
                              parts and by every writer while it has parts or temporary files
                              that no manifest references yet; exclusive for garbage collection
                              and recovery, which therefore never remove what somebody uses.

Lock files are never deleted (deleting a flock'd file races with the next locker).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from memcli.base.clock import now_iso
from memcli.base.durable import O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK, file_kind, write_all
from memcli.base.jsonbound import load_json
from memcli.base.text import one_line

from .errors import PoolBusy, PoolError, note
from .folders import is_read_only, open_dir, read_only

LOCKS = ".locks"
GATE = "gate"


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    head = os.path.basename(argv[0]) or "python"
    return one_line(" ".join([head, *argv[1:]]), 80)


def open_lock_file(locks: Path, fname: str, create: bool = True, mode: str = "read") -> int | None:
    """An fd of a lock file in the store's .locks folder (opened relative to that folder, which is
    never a symbolic link). A lock path that is not a regular file is repaired when that loses
    nothing (an empty folder, a symlink, a FIFO, a socket) or named with the fix.

    mode "read" (a reader's gate): None when the file is absent and create=False, or when it
    cannot be made or opened for writing (a read-only store: an existing file is opened read-only,
    which still takes a flock), or when .locks is not a usable folder (nobody can write or collect
    then either). Mode "write" (a writer): PoolReadOnly on a read-only store, the .locks problem
    named with the fix. Mode "try" (collection, recovery): None instead of those errors."""
    root = locks.parent
    try:
        dfd = open_dir(root, locks.name, create=create)
    except PoolError:
        if mode == "write":
            raise
        return None
    if dfd is None:
        return None
    try:
        for _attempt in range(3):
            try:
                return os.open(fname, os.O_RDWR | (os.O_CREAT if create else 0) | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC,
                               0o644, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if is_read_only(exc):
                    if mode == "write":
                        raise read_only(root, exc) from None
                    if mode == "try":
                        return None
                    try:  # read-only store: a shared/read lock still works on an existing file
                        return os.open(fname, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, dir_fd=dfd)
                    except OSError:
                        return None
                if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.EOPNOTSUPP):
                    raise
                _repair_lock_path(locks / fname, dfd)
        raise PoolError(f"cannot open the lock file {locks / fname}")
    finally:
        os.close(dfd)


def _repair_lock_path(path: Path, dfd: int) -> None:
    try:
        st = os.lstat(path.name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        return
    kind = file_kind(st.st_mode)
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path.name, dir_fd=dfd)  # only when empty: a folder with content is somebody's
        else:
            os.unlink(path.name, dir_fd=dfd)  # a link, FIFO or socket: removing it loses nothing
        note(f"replaced {path} ({kind}) with a lock file")
    except OSError:
        raise PoolError(f"{path} is {kind}, not a lock file; remove it (rm -r '{path}') and try again") from None


def try_flock(fd: int, mode: int) -> bool:
    """flock without waiting: True when taken, False when somebody else holds it."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


@dataclass
class _Held:
    fd: int
    count: int
    thread: int


_HELD: dict[tuple[str, str], _Held] = {}
_GUARD = threading.Lock()


class WriterLock:
    """The exclusive writer lock of one pool name (re-entrant within a thread)."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.key = (os.path.realpath(root), name)

    def held_here(self) -> bool:
        with _GUARD:
            held = _HELD.get(self.key)
            return held is not None and held.thread == threading.get_ident()

    def acquire(self, wait: bool | float = False) -> None:
        me = threading.get_ident()
        with _GUARD:
            held = _HELD.get(self.key)
            if held is not None and held.thread == me:
                held.count += 1
                return
        locks = self.root / LOCKS
        fd = open_lock_file(locks, f"{self.name}.lock", mode="write")
        if fd is None:  # pragma: no cover - "write" raises instead
            raise PoolError(f"cannot write to the pool store {self.root}")
        deadline = None if wait is True else time.monotonic() + (0 if wait in (False, None) else float(wait))
        delay = 0.01
        try:
            while not try_flock(fd, fcntl.LOCK_EX):
                if deadline is not None and time.monotonic() >= deadline:
                    raise PoolBusy(self._busy_message(fd))
                time.sleep(delay)
                delay = min(delay * 1.5, 0.2)
            # Ours now: say who holds it (for the busy message of others; never trusted).
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                                 "started": now_iso()}).encode()
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                write_all(fd, holder)
        except BaseException:
            os.close(fd)  # closing releases the flock
            raise
        with _GUARD:
            _HELD[self.key] = _Held(fd, 1, me)

    def release(self) -> None:
        with _GUARD:
            held = _HELD[self.key]
            held.count -= 1
            if held.count:
                return
            del _HELD[self.key]
        with contextlib.suppress(OSError):
            os.ftruncate(held.fd, 0)
        os.close(held.fd)

    def _busy_message(self, fd: int) -> str:
        try:
            info = load_json(os.pread(fd, 4096, 0), max_depth=2)
            pid, host, cmd = int(info["pid"]), str(info["host"]), str(info.get("command") or "memcli")
            since = datetime.fromisoformat(str(info["started"]).replace("Z", "+00:00")).astimezone().strftime("%H:%M")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
            return f"pool {self.name} is being written by another process; try again later"
        where = "" if host == socket.gethostname() else f" on {host}"
        return f"pool {self.name} is being written by process {pid}{where} ({cmd}) since {since}; try again later"

    @contextlib.contextmanager
    def held(self, wait: bool | float = False):
        self.acquire(wait)
        try:
            yield self
        finally:
            self.release()


class Gate:
    """The store gate (see the module docstring). Every use opens its own fd, so threads and
    nested uses in one process exclude each other exactly as processes do.

    `on_release` is called after each shared use lets the gate go: the store passes the
    collection a writer could not run while the gate was taken (recovery.collect_pending), so
    garbage goes as soon as nobody holds the gate."""

    def __init__(self, root: Path, on_release=None):
        self.root = root
        self.on_release = on_release

    @contextlib.contextmanager
    def shared(self, create: bool = True):
        fd = open_lock_file(self.root / LOCKS, GATE, create=create)
        if fd is None:  # no gate yet (nobody ever wrote here) or a read-only store: nothing collects
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a collection in progress (brief)
            yield
        finally:
            os.close(fd)
            if self.on_release is not None:
                self.on_release()

    @contextlib.contextmanager
    def exclusive(self, wait_s: float = 0.0):
        """Yields True when held, False when readers or writers are active (then the caller
        simply does not collect this time), None when the store cannot be written (read-only,
        or no usable .locks folder): nothing can be collected there."""
        fd = open_lock_file(self.root / LOCKS, GATE, mode="try")
        if fd is None:
            yield None
            return
        try:
            deadline = time.monotonic() + wait_s
            got = try_flock(fd, fcntl.LOCK_EX)
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
                got = try_flock(fd, fcntl.LOCK_EX)
            yield got
        finally:
            os.close(fd)
