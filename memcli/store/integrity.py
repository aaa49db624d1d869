"""Part integrity: a part's bytes are checked against its sha256 name where they are read.

Every reader of a part's bytes (loading a pool, `pool info`'s small tables, fork, export) checks
them against the sha256 the manifest names, the first time this process opens that file: a
damaged part is refused with one line naming the pool, the part and `memcli pool verify --repair`,
never loaded (so an inject can never commit bad bytes again under new, correct names). Loading
hashes the bytes in the same pass that reads them (safetensors.read_tensors), so what is checked
is exactly what is used.

Verified once per process per file identity: (device, inode, size, mtime_ns, ctime_ns) of the
file when it was hashed, and again when hashing ended (a file that changed meanwhile is not
remembered). Any write to the file, a copy, a restore or a replacement gives another identity
(ctime cannot be set by a user), so a warm server pays for a part once and a changed file is
checked again. The cache is in memory only. A persisted "verified" marker was considered and
left out: it would spare a one-shot command the hash, but an identity cannot see damage that
does not go through a write (a disk's bit rot, a damaged filesystem, a restored raw image), which
is the damage this check exists for; in memory that blind spot lasts one process, on disk it
would last for ever. A marker is also one more file a reader would have to write (a read-only
home) and one more file a hostile or buggy tool could forge.

Damage found is recorded, best effort, in ``<root>/.damaged/<sha256>``: the identity of the
damaged file and when it was found. It is a hint that can only make a pool look damaged, never
whole: `pool ls` and `pool info` (which never hash) mark the pools that name it while the file
has that identity; a writer does not reuse the object for new content (it writes the good bytes,
which replace the damaged file and so repair every pool that names it); `pool verify` rehashes
and drops a record whose file turns out whole; records whose file is gone or changed are stale
and ignored (recovery drops them).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from memcli.base.clock import now_iso
from memcli.base.durable import hash_fd, read_fd

from .errors import PoolError
from .files import open_regular
from .folders import open_dir, replace_at
from .manifest import SHA_RE, parse_json

DAMAGED = ".damaged"
MAX_REMEMBERED = 1 << 16
MAX_RECORD_BYTES = 4096

_GOOD: "OrderedDict[tuple, str]" = OrderedDict()
_GUARD = threading.Lock()


def identity(st_: os.stat_result) -> tuple:
    return (st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns)


def known_good(st_: os.stat_result, sha256: str) -> bool:
    """True when this process hashed exactly this file (same identity) and found `sha256`."""
    key = identity(st_)
    with _GUARD:
        if _GOOD.get(key) == sha256:
            _GOOD.move_to_end(key)
            return True
    return False


def remember(before: os.stat_result, after: os.stat_result, sha256: str) -> None:
    """Remember a file hashed whole, if it did not change while it was hashed."""
    if identity(before) != identity(after):
        return
    with _GUARD:
        _GOOD[identity(after)] = sha256
        _GOOD.move_to_end(identity(after))
        while len(_GOOD) > MAX_REMEMBERED:
            _GOOD.popitem(last=False)


def forget() -> None:
    """Forget every verification (benchmarks and tests measure a first open)."""
    with _GUARD:
        _GOOD.clear()


def verify_fd(fd: int, sha256: str, recheck: bool = False) -> bool:
    """Whether the open file's bytes hash to `sha256` (remembered; recheck=True hashes anyway)."""
    before = os.fstat(fd)
    if not recheck and known_good(before, sha256):
        return True
    digest, _size = hash_fd(fd)
    if digest != sha256:
        return False
    remember(before, os.fstat(fd), sha256)
    return True


# ---------------------------------------------------------------- damage records


def record_damage(root: Path, sha256: str, st_: os.stat_result) -> None:
    """Best effort: note that the file with this identity, named `sha256`, is damaged."""
    data = json.dumps({"identity": list(identity(st_)), "found": now_iso()}).encode("ascii")
    with contextlib.suppress(OSError, PoolError):
        dfd = open_dir(root, DAMAGED, create=True)
        try:
            replace_at(dfd, sha256, data)
        finally:
            os.close(dfd)


def recorded(root: Path) -> dict[str, tuple]:
    """sha256 -> identity of every damage record (unreadable records are skipped)."""
    out: dict[str, tuple] = {}
    try:
        dfd = open_dir(root, DAMAGED)
    except PoolError:
        return out
    if dfd is None:
        return out
    try:
        for name in os.listdir(dfd):
            if not SHA_RE.fullmatch(name):
                continue
            try:
                fd = open_regular(name, f"damage record {name}", MAX_RECORD_BYTES, dir_fd=dfd)
            except (OSError, PoolError):
                continue
            try:
                entry = parse_json(read_fd(fd, MAX_RECORD_BYTES), f"damage record {name}")
                ident = tuple(entry["identity"])
                if len(ident) == 5 and all(type(v) is int for v in ident):
                    out[name] = ident
            except (OSError, PoolError, KeyError, TypeError):
                continue
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    return out


def is_recorded(records: dict[str, tuple], sha256: str, st_: os.stat_result | None) -> bool:
    """True when `sha256` has a damage record naming the file `st_` describes."""
    return st_ is not None and records.get(sha256) == identity(st_)


def drop_record(root: Path, sha256: str) -> None:
    with contextlib.suppress(OSError, PoolError):
        dfd = open_dir(root, DAMAGED)
        if dfd is None:
            return
        try:
            os.unlink(sha256, dir_fd=dfd)
        finally:
            os.close(dfd)
