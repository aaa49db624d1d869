"""Staging entries: the `<root>/.tmp-*` entries that work in progress makes, and how recovery tells a
live one from a leftover.

Whoever makes a staging entry (a pool being created, an import, an export's record) flocks it while
it works; recovery removes only entries whose flock is free, so it never touches live work and
always removes what a killed process left. An export writes its archive outside the store, beside
the destination, so it leaves a record in the store naming that temporary file: recovery removes
the file with the record. transfer.py makes these entries, recovery.py removes them; both read
their names and formats here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from pathlib import Path

from memcli.base.durable import O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK, TMP, rmtree_quiet, token, unlink_quiet, write_all
from memcli.base.jsonbound import load_json

from .locking import try_flock

EXPORT_RECORD = f"{TMP}export-"  # <root>/.tmp-export-<token>: {"tmp": the export's temporary file}
EXPORT_TMP_SUFFIX = ".memcli-export"  # the export's temporary file ends with this
MAX_RECORD_BYTES = 65536


def holds_flock(path: Path) -> bool:
    """True when some live process holds a flock on `path` (a file or folder); False when
    nobody does or it is gone. Used on staging entries, whose creators flock them."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    except OSError:
        return False
    try:
        return not try_flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(root: Path, label: str = ""):
    """A new staging folder `<root>/<TMP><label><token>`, flocked while we work in it (recovery
    removes only staging entries whose lock is free, so a live one is never touched) and removed on
    the way out unless it was published (renamed into place) meanwhile."""
    path = root / f"{TMP}{label}{token()}"
    os.mkdir(path, 0o700)
    fd = None
    try:
        fd = flock_entry(path)
        yield path
    finally:
        rmtree_quiet(path)  # a published folder is gone already: nothing to do
        if fd is not None:
            os.close(fd)


def flock_entry(path: Path) -> int:
    """Open and exclusively flock a staging entry this process just made; close to release."""
    fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# ------------------------------------------------------------------------ export records


def export_tmp_path(file: Path) -> Path:
    """The temporary file an export to `file` writes first, beside it."""
    return file.parent / f".{file.name[:100]}.{token()}{EXPORT_TMP_SUFFIX}"


def write_export_record(root: Path, tmp: Path) -> tuple[Path, int | None]:
    """Record in the store that an export writes `tmp` (so recovery removes it if this process is
    killed), flocked while the export runs. Returns the record's path and its fd (close it, then
    unlink the record, when the export is done); fd None where the store cannot be written: the
    export goes on without its record."""
    record = root / f"{EXPORT_RECORD}{token()}"
    fd = None
    try:
        fd = os.open(record, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
        write_all(fd, json.dumps({"tmp": str(tmp)}).encode())
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        if fd is not None:
            os.close(fd)
            fd = None
        unlink_quiet(record)
    return record, fd


def drop_export_tmp(record: Path) -> int:
    """Remove the temporary export file a leftover export record names, if it is still there and
    one (a regular file with the export suffix); returns the bytes freed."""
    try:
        fd = os.open(record, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
        try:
            info = load_json(os.read(fd, MAX_RECORD_BYTES), max_depth=2)
        finally:
            os.close(fd)
        tmp = Path(info["tmp"])
    except (OSError, ValueError, KeyError, TypeError):  # JsonRefused is a ValueError
        return 0
    try:
        st_ = os.lstat(tmp)
    except OSError:
        return 0
    if stat.S_ISREG(st_.st_mode) and tmp.name.endswith(EXPORT_TMP_SUFFIX):
        unlink_quiet(tmp)
        return st_.st_size
    return 0
