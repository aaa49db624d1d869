"""Garbage collection and recovery: what killed work leaves behind goes, without help.

Both run with the store gate held exclusively (locking.py), which no reader opening a
snapshot and no writer with unreferenced files holds at the same time; when the gate is busy
they simply do not run this time (a later writer runs them). Writers run them without anyone
asking: the first writing call of a PoolStore recovers, and every commit that unreferences a
part collects. `memcli pool verify --repair` runs recovery on request.

Rules:
  * a part object is garbage when no pool's manifest names its sha256. If any manifest cannot
    be read, nothing is collected (its parts cannot be told apart from garbage);
  * <root>/.tmp-rm-*: a removal's trash, finished;
  * any other <root>/.tmp-* (staged pools, imports, export records): its creator holds a flock
    on it while it works; one nobody holds is a leftover (an export record also names the
    temporary export file it was writing, which goes with it);
  * <root>/.objects/.tmp-*, <root>/.content-keys/.tmp-* and <pool>/.tmp-*: written only by
    writers holding the gate shared, so with the gate held exclusively every one is a leftover;
  * <root>/.content-keys/<key> entries are hints (checked before each use), never garbage: an
    entry whose object was collected is simply not used;
  * a format-1 pool folder that never got a manifest (".creating") goes; a pool already in
    format 2 loses its old parts/ folder, .lock and .creating files;
  * log.jsonl bytes past the committed prefix are cut off (when the pool's writer lock is free).
Each removal is reported in one line on stderr (the logger "memcli.store").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path

from . import locking
from .durable import TMP, rmtree_quiet, unlink_quiet
from .errors import PoolError, safe_text
from .manifest import MANIFEST, NAME_RE, SHA_RE
from .snapshot import CONTENT_KEYS, LOG, OBJECTS, PARTS_V1, open_pool_dir, read_manifest_at

log = logging.getLogger("memcli.store")
EXPORT_RECORD = f"{TMP}export-"


def note(text: str) -> None:
    """One line on stderr (through logging: the CLI and a library user both see one line)."""
    log.warning("memcli: %s", safe_text(text))


def _size(path: Path) -> int:
    total = 0
    try:
        st_ = os.lstat(path)
    except OSError:
        return 0
    if stat.S_ISDIR(st_.st_mode):
        for folder, _dirs, files in os.walk(path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, f)).st_size
        return total
    return st_.st_size


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        rmtree_quiet(path)
    else:
        unlink_quiet(path)


def _referenced(store) -> set[str] | None:
    """sha256 of every part some pool's manifest names; None when a manifest is unreadable."""
    shas: set[str] = set()
    try:
        entries = os.listdir(store.root)
    except OSError:
        return shas
    for entry in entries:
        if entry.startswith(".") or not NAME_RE.fullmatch(entry):
            continue
        path = store.root / entry
        if not os.path.isdir(path) or os.path.islink(path) or not os.path.lexists(path / MANIFEST):
            continue
        try:
            m = _manifest(store, entry)
        except PoolError:
            return None
        shas.update(e["sha256"] for e in m["parts"].values())
        if m["format_version"] >= 2:  # migrated: what the format-1 layout kept beside it goes
            _drop_v1_leftovers(path)
    return shas


def _manifest(store, name: str) -> dict:
    """Pool `name`'s manifest read directly (recovery and GC run under the exclusive gate, where a
    snapshot, which takes it shared, cannot be opened)."""
    fd = open_pool_dir(store.root, name)
    try:
        return read_manifest_at(fd, name)
    finally:
        os.close(fd)


def _drop_v1_leftovers(pool_dir: Path) -> list[tuple[str, int]]:
    """Remove what the format-1 layout kept in a migrated pool's folder: (path, bytes) removed."""
    done = []
    for old in (PARTS_V1, ".lock", ".creating"):
        if os.path.lexists(pool_dir / old):
            done.append((str(pool_dir / old), _size(pool_dir / old)))
            _remove(pool_dir / old)
    return done


def _collect_locked(store) -> list[tuple[Path, int]]:
    objects = store.root / OBJECTS
    try:
        names = os.listdir(objects)
    except OSError:
        return []
    referenced = _referenced(store)
    if referenced is None:
        return []
    removed = []
    for fname in names:
        if SHA_RE.fullmatch(fname) and fname not in referenced:
            path = objects / fname
            size = _size(path)
            unlink_quiet(path)
            removed.append((path, size))
    return removed


def collect_garbage(store, wait_s: float = 0.0) -> int:
    """Delete part objects no manifest names (silently: this is normal work). Returns bytes freed.
    By default it tries once: while readers open snapshots it does not wait, a later writer collects."""
    with store.gate.exclusive(wait_s) as got:
        if not got:
            return 0
        return sum(size for _path, size in _collect_locked(store))


def recover(store, announce: bool = False, wait_s: float = 0.5) -> list[str]:
    """Remove every leftover of killed work (module docstring). Returns what was removed,
    and with announce=True also says it in one line on stderr."""
    done: list[tuple[str, int]] = []
    root = store.root
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    with store.gate.exclusive(wait_s) as got:
        if not got:
            return []
        for entry in entries:
            path = root / entry
            if not entry.startswith(TMP):
                continue
            if not entry.startswith(f"{TMP}rm-") and locking.holds_flock(path):
                continue  # somebody is working in it
            size = _size(path)
            if entry.startswith(EXPORT_RECORD):
                size += _drop_export_tmp(path)
            _remove(path)
            done.append((str(path), size))
        for folder in (OBJECTS, CONTENT_KEYS):
            with contextlib.suppress(OSError):
                for fname in os.listdir(root / folder):
                    if fname.startswith(TMP):
                        path = root / folder / fname
                        done.append((str(path), _size(path)))
                        unlink_quiet(path)
        for entry in entries:
            if entry.startswith(".") or not NAME_RE.fullmatch(entry):
                continue
            done.extend(_recover_pool(store, entry))
        done.extend((str(p), n) for p, n in _collect_locked(store))
    removed = [p for p, _ in done]
    if announce and removed:
        total = sum(n for _, n in done)
        shown = ", ".join(os.path.relpath(p, root) for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        note(f"removed {len(removed)} leftover(s) of interrupted work from the pool store ({total} bytes): {shown}")
    return removed


def _drop_export_tmp(record: Path) -> int:
    """The temporary export file an export record names, if it is still there and ours."""
    try:
        fd = os.open(record, os.O_RDONLY | locking.O_NOFOLLOW | locking.O_NONBLOCK)
        try:
            info = json.loads(os.read(fd, 65536).decode("utf-8"))
        finally:
            os.close(fd)
        tmp = Path(info["tmp"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return 0
    from .transfer import EXPORT_TMP_SUFFIX

    try:
        st_ = os.lstat(tmp)
    except OSError:
        return 0
    if stat.S_ISREG(st_.st_mode) and tmp.name.endswith(EXPORT_TMP_SUFFIX):
        unlink_quiet(tmp)
        return st_.st_size
    return 0


def _recover_pool(store, name: str) -> list[tuple[str, int]]:
    done = []
    pool_dir = store.root / name
    state = store._dir_state(name)
    if state == "leftover":
        done.append((str(pool_dir), _size(pool_dir)))
        rmtree_quiet(pool_dir)
        return done
    if state != "ok":
        return done
    try:
        names = os.listdir(pool_dir)
    except OSError:
        return done
    for fname in names:
        if fname.startswith(TMP):
            done.append((str(pool_dir / fname), _size(pool_dir / fname)))
            unlink_quiet(pool_dir / fname)
    try:
        m = _manifest(store, name)
    except PoolError:
        return done  # damaged: never touch it
    if m["format_version"] >= 2:
        done.extend(_drop_v1_leftovers(pool_dir))
        committed = m["log"]["bytes"]
        lock = store._lock(name)
        with contextlib.suppress(PoolError, OSError):
            lock.acquire(wait=False)
            try:
                path = pool_dir / LOG
                if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) > committed:
                    extra = os.path.getsize(path) - committed
                    os.truncate(path, committed)
                    done.append((f"{path} (last {extra} bytes, uncommitted)", extra))
            finally:
                lock.release()
    elif os.path.lexists(pool_dir / ".creating"):
        done.append((str(pool_dir / ".creating"), 0))
        unlink_quiet(pool_dir / ".creating")
    return done
