"""Garbage collection and recovery: what killed work leaves behind goes, without help.

Both run with the store gate held exclusively (locking.py), which no reader opening a
snapshot and no writer with unreferenced files holds at the same time. Writers run them without
anyone asking: the first writing call of a PoolStore recovers, and every commit that unreferences
a part collects. `memcli pool verify --repair` runs recovery on request.

A collection that finds the gate taken does not wait (readers must never wait for it): it leaves
a mark, <root>/.locks/gc-pending, tries once more (a holder that let go before the mark existed
did not see it), and whoever lets the gate go next (a reader's snapshot, a writer's commit:
Gate.on_release) runs the collection then. A collection clears the mark before it looks, and
looks again when a mark came back while it ran (a part unreferenced meanwhile). So garbage stays
only while somebody holds the gate, and goes once nobody does.

Objects, content keys and damage records are listed and removed relative to their folder's
descriptor, opened without following links (folders.py): a link in place of .objects is refused,
and nothing outside the store is ever deleted. On a store that cannot be written nothing is
collected or recovered; recovery says so in one line when there are leftovers to remove.

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
  * log.jsonl bytes past the committed prefix are cut off (when the pool's writer lock is free);
  * a damage record (integrity.py) whose object is gone or is another file now is stale: dropped
    silently (it is a hint, not a leftover).
Each removal is reported in one line on stderr (the logger "memcli.store").
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from memcli.base.durable import O_CLOEXEC, O_NOFOLLOW, TMP, rmtree_quiet, unlink_quiet

from . import integrity, locking
from .errors import PoolError, note
from .folders import READ_ONLY_ERRNOS, open_dir
from .manifest import MANIFEST, NAME_RE, SHA_RE
from .snapshot import CONTENT_KEYS, LOG, OBJECTS, PARTS_V1, open_pool_dir, read_manifest_at
from .staging import EXPORT_RECORD, drop_export_tmp, holds_flock

PENDING = "gc-pending"  # in <root>/.locks: a collection found the gate taken


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


def _remove(path: Path) -> bool:
    """Remove a file, a link (never what it points to) or a folder; True when it is gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        rmtree_quiet(path)
    else:
        unlink_quiet(path)
    return not os.path.lexists(path)


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
        ofd = open_dir(store.root, OBJECTS)
    except PoolError:
        return []  # a link or a file in place of .objects: never followed (writers name it)
    if ofd is None:
        return []
    removed = []
    try:
        names = os.listdir(ofd)
        referenced = _referenced(store)
        if referenced is None:
            return []
        for fname in names:
            if SHA_RE.fullmatch(fname) and fname not in referenced:
                try:
                    size = os.lstat(fname, dir_fd=ofd).st_size
                    os.unlink(fname, dir_fd=ofd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in READ_ONLY_ERRNOS:
                        break
                    continue
                removed.append((objects / fname, size))
    finally:
        os.close(ofd)
    return removed


def _pending(store, action: str) -> bool:
    """The gc-pending mark: action "test", "set" or "clear"; True when it is there / was set."""
    try:
        dfd = open_dir(store.root, locking.LOCKS)
    except PoolError:
        return False
    if dfd is None:
        return False
    try:
        if action == "test":
            return _exists_at(dfd, PENDING)
        if action == "set":
            os.close(os.open(PENDING, os.O_WRONLY | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644,
                             dir_fd=dfd))
            return True
        os.unlink(PENDING, dir_fd=dfd)
        return False
    except OSError:
        return False
    finally:
        os.close(dfd)


def _exists_at(dfd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False


def collect_garbage(store, wait_s: float = 0.0) -> int:
    """Delete part objects no manifest names (silently: this is normal work). Returns bytes freed.
    It never waits for readers beyond wait_s: when the gate is taken it leaves the gc-pending
    mark, and whoever lets the gate go next collects (module docstring)."""
    freed, marked = 0, False
    for _round in range(4):
        with store.gate.exclusive(0 if marked else wait_s) as got:
            if got is None:  # read-only, or no usable .locks: nothing can be collected
                return freed
            if not got:
                if marked or not _pending(store, "set"):
                    return freed  # the mark is there: the next one to let the gate go collects
                marked = True
                continue  # once more: a holder that let go before the mark existed did not see it
            _pending(store, "clear")
            freed += sum(size for _path, size in _collect_locked(store))
        if not _pending(store, "test"):
            return freed
        marked = False  # a collection that found us holding the gate marked it: look again
    return freed


def collect_pending(store) -> int:
    """The collection a writer left pending (Gate.on_release calls this), if any."""
    if not _pending(store, "test") or not os.access(store.root, os.W_OK):
        return 0
    return collect_garbage(store)


def _drop_stale_damage_records(store) -> None:
    """Damage records whose object is gone or is another file now (integrity.py)."""
    records = integrity.recorded(store.root)
    if not records:
        return
    try:
        ofd = open_dir(store.root, OBJECTS)
    except PoolError:
        return
    try:
        for sha, ident in records.items():
            try:
                st_ = os.lstat(sha, dir_fd=ofd) if ofd is not None else None
            except OSError:
                st_ = None
            if st_ is None or integrity.identity(st_) != ident:
                integrity.drop_record(store.root, sha)
    finally:
        if ofd is not None:
            os.close(ofd)


def _leftover_count(root: Path, entries: list[str]) -> int:
    count = sum(1 for e in entries if e.startswith(TMP))
    with contextlib.suppress(OSError, PoolError):
        ofd = open_dir(root, OBJECTS)
        if ofd is not None:
            try:
                count += sum(1 for n in os.listdir(ofd) if n.startswith(TMP))
            finally:
                os.close(ofd)
    return count


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
        if got is None:
            left = _leftover_count(root, entries) if announce else 0
            if left:
                note(f"the pool store {root} cannot be written: {left} leftover(s) of interrupted work stay "
                     f"until it can")
            return []
        if not got:
            return []
        for entry in entries:
            path = root / entry
            if not entry.startswith(TMP):
                continue
            if not entry.startswith(f"{TMP}rm-") and holds_flock(path):
                continue  # somebody is working in it
            size = _size(path)
            if entry.startswith(EXPORT_RECORD):
                size += drop_export_tmp(path)
            if _remove(path):
                done.append((str(path), size))
        for folder in (OBJECTS, CONTENT_KEYS):
            try:
                dfd = open_dir(root, folder)
            except PoolError:
                if folder == OBJECTS:
                    raise  # a link or a file in place of .objects: named with the fix, never followed
                continue
            if dfd is None:
                continue
            try:
                for fname in os.listdir(dfd):
                    if fname.startswith(TMP):
                        with contextlib.suppress(OSError):
                            size = os.lstat(fname, dir_fd=dfd).st_size
                            os.unlink(fname, dir_fd=dfd)
                            done.append((str(root / folder / fname), size))
            finally:
                os.close(dfd)
        for entry in entries:
            if entry.startswith(".") or not NAME_RE.fullmatch(entry):
                continue
            done.extend(_recover_pool(store, entry))
        _pending(store, "clear")
        done.extend((str(p), n) for p, n in _collect_locked(store))
        _drop_stale_damage_records(store)
    removed = [p for p, _ in done]
    if announce and removed:
        total = sum(n for _, n in done)
        shown = ", ".join(os.path.relpath(p, root) for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        note(f"removed {len(removed)} leftover(s) of interrupted work from the pool store ({total} bytes): {shown}")
    return removed


def _recover_pool(store, name: str) -> list[tuple[str, int]]:
    done = []
    pool_dir = store.root / name
    state = store.dir_state(name)
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
        lock = store.writer_lock(name)
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
