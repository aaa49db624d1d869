"""The store's side of durable file I/O (memcli.base.durable, which does the opening, writing,
renaming and hashing): the same operations with the store's errors, and the staged-folder rename.

A file the store refuses to read is PoolCorrupt (a link, not a regular file, too large) or
PoolError (the system would not let it be read), one line each; an OS failure of a write is one
PoolError line saying what could not be done (disk full said plainly) and what was kept.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from memcli.base import durable
from memcli.base.durable import fsync_dir, is_nospace
from memcli.base.errors import FileRefused, FileUnreadable

from .errors import PoolCorrupt, PoolError, PoolExists


def open_regular(path: Path | str, what: str, max_bytes: int | None = None, dir_fd: int | None = None) -> int:
    """`memcli.base.durable.open_regular` with the store's errors: PoolCorrupt for a file that is not
    what it must be, PoolError for one that cannot be read (same one-line messages)."""
    try:
        return durable.open_regular(path, what, max_bytes, dir_fd)
    except FileUnreadable as exc:
        raise PoolError(str(exc)) from None
    except FileRefused as exc:
        raise PoolCorrupt(str(exc)) from None


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
