"""PoolStore: names, snapshots, commits, renames and removals of pools.

Layout (root = ``paths.pools_dir()``)::

    <root>/<name>/manifest.json    the current version (replaced atomically)
    <root>/<name>/log.jsonl        the pool's append-only log; the manifest names its committed prefix
    <root>/.objects/<sha256>       parts, content-addressed and shared by every pool of the store
    <root>/.locks/                 flock files (see locking.py)
    <root>/.content-keys/<key>     {"sha256", "bytes"}: which object holds the content a caller's key
                                   names (a model's initial memory); only a hint, checked before use
    <root>/.damaged/<sha256>       the identity of an object found damaged (integrity.py): a hint for
                                   pool ls/info, and an object writers never reuse
    <root>/.tmp-*, <root>/.objects/.tmp-*, <root>/.content-keys/.tmp-*, <root>/<name>/.tmp-*
                                   work in progress; leftovers of killed work (recovery.py)

A commit writes its new parts (named by their sha256, so a part that exists is never written
again), appends to the log, then atomically replaces manifest.json: a kill at any point
leaves the old version or the new one. A new pool is built in a staging folder and renamed
into place. Parts no manifest references are deleted only by garbage collection (recovery.py).

Folders inside the root are opened without following links, and files in them relative to the
folder's descriptor (folders.py); a part's bytes are checked against its name where they are
read (integrity.py, snapshot.py). A store that cannot be written raises PoolReadOnly in one line
for every writing call, while every reading call works.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from memcli.base import paths
from memcli.base.clock import now_iso
from memcli.base.durable import (
    O_BINARY, O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK, TMP, file_kind, fsync_dir, hash_fd, new_hash, read_fd, replace_file,
    rmtree_quiet, token, write_all,
)

from . import folders, integrity, locking
from . import safetensors as st
from .errors import PoolBusy, PoolCorrupt, PoolError, PoolExists, PoolNotFound, repair_hint
from .files import open_regular, publish_dir, write_errors
from .manifest import (
    FORMAT_VERSION, MANIFEST, NAME_RE, SHA_RE, is_int, manifest_bytes, parse_json, validate_name, validate_part_id,
)
from .recovery import collect_garbage, collect_pending, recover
from .snapshot import (
    CONTENT_KEYS, LOG, OBJECTS, PARTS_V1, LogReader, Snapshot, fd_stream, open_part, open_part_at, part_file_name,
    part_folder,
)
from .staging import staged_folder

MAX_KEY_ENTRY_BYTES = 4096  # a content key entry is ~100 bytes; anything larger is not one


@dataclass
class PoolInfo:
    name: str
    version: int
    created: str
    updated: str
    bytes_on_disk: int  # manifest + log + parts; a part shared with other pools counts in each
    num_parts: int
    meta: dict = field(default_factory=dict)
    error: str | None = None  # set (and the rest zero/empty) for a damaged pool in list()


def _any_meta(what: str, meta: dict, records: list[dict] | None = None) -> None:
    """The generic store's meta check: any JSON object will do."""


def _no_bound(meta: dict) -> int:
    return 1 << 62


@dataclass(frozen=True)
class MetaChecks:
    """How the store checks the meta of a pool it did not write itself (an import, a fork, an
    export): given by whoever makes the store, which itself knows nothing about models. memcli's
    pools give theirs (memcli.pools.meta.PoolStore); the defaults accept any meta (a generic store).

    check_meta(what, meta, records=None): PoolCorrupt in one line naming `what` and the field
    that is wrong (with the pool log's records when given); max_part_bytes(meta): an upper bound
    on any part of a pool with this meta (an archive declaring more is refused)."""

    check_meta: Callable[..., None] = _any_meta
    max_part_bytes: Callable[[dict], int] = _no_bound


class StoreCore:
    """The pools under one root folder. Cheap to construct; creates nothing until a write.
    `checks`: how pools this store did not write are checked (MetaChecks; generic by default)."""

    def __init__(self, root: Path | None = None, checks: MetaChecks = MetaChecks()):
        self.root = Path(root) if root is not None else paths.pools_dir()
        self.checks = checks
        self.gate = locking.Gate(self.root, on_release=self._collect_pending)
        self._recovered = False

    # ---------------------------------------------------------------- names & folders

    def pool_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def _objects(self) -> Path:
        return self.root / OBJECTS

    def writer_lock(self, name: str) -> locking.WriterLock:
        return locking.WriterLock(self.root, validate_name(name))

    def dir_state(self, name: str) -> str:
        """'absent', 'symlink', 'notdir', 'ok' (has a manifest), 'leftover' (a folder of an
        old-format creation that never committed) or 'broken' (anything else: damaged)."""
        p = self.pool_dir(name)
        try:
            st_ = os.lstat(p)
        except FileNotFoundError:
            return "absent"
        except NotADirectoryError:  # the root, or a folder above it, is a file
            folders.check_root(self.root)
            return "absent"
        if stat.S_ISLNK(st_.st_mode):
            return "symlink"
        if not stat.S_ISDIR(st_.st_mode):
            return "notdir"
        if os.path.lexists(p / MANIFEST):
            return "ok"
        # No manifest: an old-format creation that never committed (".creating", or nothing
        # but a lock, temp files and an empty parts folder) is a leftover; else it is damaged.
        try:
            names = set(os.listdir(p))
            parts = os.listdir(p / PARTS_V1) if PARTS_V1 in names else []
        except OSError:
            return "broken"
        if ".creating" in names:
            return "leftover"
        rest = {n for n in names if not n.startswith(TMP)} - {".lock", ".creating", PARTS_V1}
        return "leftover" if not rest and not any(n.endswith(".safetensors") for n in parts) else "broken"

    def _refuse_odd(self, name: str, state: str) -> None:
        if state == "symlink":
            raise PoolCorrupt(f"pool {name} is a symbolic link; refusing")
        if state == "notdir":
            raise PoolCorrupt(f"pool {name} is not a folder; refusing")
        if state == "broken":
            raise PoolCorrupt(f"pool {name} has no manifest.json (damaged); refusing")

    def exists(self, name: str) -> bool:
        """True when the name is taken (a pool, or something damaged that would be in the way)."""
        return self.dir_state(name) not in ("absent", "leftover")

    # ------------------------------------------------------------------------ reading

    def snapshot(self, name: str, part_ids=None) -> Snapshot:
        """The current version of pool `name` with its parts (all, or `part_ids`: ids, or a
        function of the manifest returning them) held open."""
        validate_name(name)
        state = self.dir_state(name)
        if state in ("absent", "leftover"):
            raise PoolNotFound(f"pool {name} not found")
        self._refuse_odd(name, state)
        with self.gate.shared():
            return Snapshot(self.root, name, part_ids if part_ids is None or callable(part_ids) else list(part_ids))

    def read_manifest(self, name: str) -> dict:
        with self.snapshot(name, part_ids=()) as snap:
            return snap.manifest

    def read_part(self, name: str, part_id: str, verify: bool = False) -> dict:
        """The tensors of one part of the current version; verify=True checks its sha256."""
        validate_part_id(part_id)
        with self.snapshot(name, part_ids=[part_id]) as snap:
            return snap.read(part_id, recheck=verify)  # checked once per file anyway; verify: again

    def info(self, name: str, manifest: dict | None = None) -> PoolInfo:
        m = manifest if manifest is not None else self.read_manifest(name)
        total = sum(e["bytes"] for e in m["parts"].values()) + (m.get("log") or {}).get("bytes", 0)
        with contextlib.suppress(OSError):
            total += os.lstat(self.pool_dir(name) / MANIFEST).st_size
        return PoolInfo(name, m["version"], m["created"], m["updated"], total, len(m["parts"]), m["meta"])

    def list(self) -> list[PoolInfo]:
        """Every pool, sorted by name. A damaged pool is listed with `error` set: its manifest
        cannot be read, or a part is missing, has the wrong size or was found damaged
        (part_problems: nothing is hashed)."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            folders.check_root(self.root)  # names the file in the way, with the fix
            return []
        records = integrity.recorded(self.root)
        out: list[PoolInfo] = []
        for entry in entries:
            if entry.startswith(".") or not NAME_RE.fullmatch(entry):
                continue
            try:
                if self.dir_state(entry) in ("absent", "leftover"):
                    continue
                m = self.read_manifest(entry)
                info = self.info(entry, m)
                problems = self.part_problems(entry, m, records)
                if problems:
                    info.error = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                out.append(info)
            except PoolNotFound:
                continue
            except PoolError as exc:
                out.append(PoolInfo(entry, 0, "", "", 0, 0, {}, error=str(exc)))
        return out

    def part_problems(self, name: str, manifest: dict | None = None, records: dict | None = None) -> list[str]:
        """What can be told about pool `name`'s parts without reading them: each one missing, not a
        regular file, of the wrong size, or found damaged before (a damage record naming that very
        file). One line each, ending with the `pool verify --repair` hint."""
        m = manifest if manifest is not None else self.read_manifest(name)
        records = integrity.recorded(self.root) if records is None else records
        hint = repair_hint(name)
        try:
            folder = part_folder(self.root, name, m)
        except PoolError as exc:
            return [f"{exc}"]
        problems = []
        try:
            for pid, entry in sorted(m["parts"].items()):
                what = f"pool {name}: part {pid}"
                try:
                    st_ = os.lstat(part_file_name(m, pid), dir_fd=folder) if folder is not None else None
                except FileNotFoundError:
                    st_ = None
                if st_ is None:
                    problems.append(f"{what} is missing; {hint}")
                elif not stat.S_ISREG(st_.st_mode):
                    problems.append(f"{what} is not a regular file ({file_kind(st_.st_mode)}); {hint}")
                elif st_.st_size != entry["bytes"]:
                    problems.append(f"{what} is damaged (size {st_.st_size} bytes, manifest says {entry['bytes']}); {hint}")
                elif integrity.is_recorded(records, entry["sha256"], st_):
                    problems.append(f"{what} is damaged (sha256 mismatch); {hint}")
        finally:
            if folder is not None:
                os.close(folder)
        return problems

    def verify(self, name: str) -> list[str]:
        """Check the manifest, the log and the full sha256 and safetensors header of every
        part (hashed again, whatever this process checked before). Returns the problems found
        (empty = healthy). PoolNotFound if absent. A part found damaged is recorded (pool ls marks
        every pool naming it); a record whose file turns out whole is dropped."""
        validate_name(name)
        try:
            snap = self.snapshot(name, part_ids=())
        except PoolNotFound:
            raise
        except PoolError as exc:
            return [str(exc)]
        problems = []
        hint = f"; {repair_hint(name)}"
        with snap:
            m = snap.manifest
            try:
                snap.log_records(quiet=True)
                if snap.log_extent != {k: (m.get("log") or {}).get(k, 0) for k in ("bytes", "records")}:
                    problems.append(f"log.jsonl ends inside its last record (an interrupted append): record "
                                    f"{snap.log_extent['records'] + 1} is lost; --repair cuts it off")
            except PoolError as exc:
                problems.append(str(exc))
        records = integrity.recorded(self.root)
        for pid, entry in sorted(m["parts"].items()):
            try:
                with self.gate.shared(create=False):
                    fd = open_part(self.root, name, m, pid)
            except PoolError as exc:
                problems.append(str(exc).removesuffix(hint))
                continue
            try:
                if not integrity.verify_fd(fd, entry["sha256"], recheck=True):
                    integrity.record_damage(self.root, entry["sha256"], os.fstat(fd))
                    problems.append(f"part {pid} is damaged (sha256 mismatch)")
                    continue
                if entry["sha256"] in records:
                    integrity.drop_record(self.root, entry["sha256"])  # whole after all (or replaced)
                st.parse_header(st.fd_reader(fd), entry["bytes"])
            except st.HeaderError as exc:
                problems.append(f"part {pid}: {exc}")
            except OSError as exc:
                problems.append(f"part {pid} cannot be read ({exc.strerror})")
            finally:
                os.close(fd)
        return problems

    def repair(self, name: str) -> list[str]:
        """What `pool verify --repair` does to pool `name` beyond removing leftovers; returns one
        line per action. Lost bytes cannot be made again, so a damaged part object (wrong bytes,
        wrong size, or something else in its place) is removed from the store, so that no commit,
        content key or import ever reuses it, and the next time the same content is stored (an
        import of an export holding it; for a model's initial memory, any new pool of that model)
        it is whole again for every pool that names it. A torn last log record is cut off (a
        manifest-only commit). PoolReadOnly on a read-only store."""
        validate_name(name)
        done: list[str] = []
        with self.writer(name):
            try:
                m = self.read_manifest(name)
            except PoolError:
                return done  # a damaged manifest: nothing here can be repaired (verify says what)
            if m["format_version"] >= 2:
                removed = self._remove_damaged_objects(name, m)
                if removed:
                    users = self._pools_naming(set(removed.values()))
                    for pid, sha in sorted(removed.items()):
                        named = ", ".join(sorted(users.get(sha, []))) or name
                        done.append(f"removed the damaged object of part {pid} ({sha[:12]}...) so that nothing reuses "
                                    f"it; pools {named} name it and stay damaged until the same content is stored "
                                    f"again (an import of an export holding it; for a model's initial memory, any "
                                    f"new pool of that model) or they are removed")
            try:
                with self.snapshot(name, part_ids=()) as snap:
                    snap.log_records(quiet=True)
                    torn = snap.log_extent != {k: (m.get("log") or {}).get(k, 0) for k in ("bytes", "records")}
            except PoolError:
                torn = False
            if torn:
                self.commit(name, m["meta"], list(m["parts"]), {}, m["version"])
                done.append(f"cut the torn last record off pool {name}'s log.jsonl")
        return done

    def _remove_damaged_objects(self, name: str, m: dict) -> dict[str, str]:
        """Remove each object of `m` whose bytes do not match its name (held exclusively: no
        reader opening it, no writer referencing it meanwhile). Returns part id -> sha256."""
        removed: dict[str, str] = {}
        with self.gate.exclusive(wait_s=10.0) as got:
            if got is None:
                raise PoolError(f"cannot take the gate of the pool store {self.root}")
            if not got:
                raise PoolBusy("the pool store is busy (a commit or a read in progress); try again")
            ofd = folders.open_dir(self.root, OBJECTS)
            if ofd is None:
                return removed
            try:
                for pid, entry in sorted(m["parts"].items()):
                    sha = entry["sha256"]
                    if sha in removed.values():
                        removed[pid] = sha
                        continue
                    try:
                        st_ = os.lstat(sha, dir_fd=ofd)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st_.st_mode):
                        with contextlib.suppress(OSError):
                            os.rmdir(sha, dir_fd=ofd)  # only an empty one: a folder with content is somebody's
                            removed[pid] = sha
                        continue
                    if stat.S_ISREG(st_.st_mode) and st_.st_size == entry["bytes"]:
                        fd = os.open(sha, os.O_RDONLY | O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC, dir_fd=ofd)
                        try:
                            if integrity.verify_fd(fd, sha, recheck=True):
                                continue
                            if integrity.identity(os.fstat(fd)) != integrity.identity(os.lstat(sha, dir_fd=ofd)):
                                continue  # replaced meanwhile (cannot be, under the gate): leave it
                        finally:
                            os.close(fd)
                    os.unlink(sha, dir_fd=ofd)  # damaged bytes, a wrong size, a link, a FIFO...
                    integrity.drop_record(self.root, sha)
                    removed[pid] = sha
                if removed:
                    folders.fsync_fd(ofd)
            finally:
                os.close(ofd)
        return removed

    def _pools_naming(self, shas: set[str]) -> dict[str, list[str]]:
        """sha256 -> the pools whose manifest names it (unreadable manifests skipped)."""
        out: dict[str, list[str]] = {}
        for info in self.list():
            try:
                m = self.read_manifest(info.name)
            except PoolError:
                continue
            for entry in m["parts"].values():
                if entry["sha256"] in shas and info.name not in out.setdefault(entry["sha256"], []):
                    out[entry["sha256"]].append(info.name)
        return out

    # ------------------------------------------------------------------------ locking

    def writer(self, name: str, wait: bool | float = False):
        """Exclusive writer lock on pool `name` (re-entrant within a thread of this process).

        wait=False: raise PoolBusy at once if another process (or thread) holds it; a number:
        wait up to that many seconds; True: as long as it takes. Readers never lock. Taking
        it on a pool that does not exist yet is allowed (to create it with commit)."""
        lock = self.writer_lock(name)

        @contextlib.contextmanager
        def held():
            with lock.held(wait):
                self.recover_once()
                yield lock

        return held()

    def _holds(self, name: str) -> bool:
        return self.writer_lock(name).held_here()

    def recover_once(self) -> None:
        """Recovery (recovery.py) by the first writing call of this store object."""
        if not self._recovered:
            recover(self, announce=True)  # a link or a file in place of .objects: named, and again next time
            self._recovered = True

    # ------------------------------------------------------------------------ objects

    def _put_object(self, tensors: dict, probe: bool, placed: list[str], key: str | None, ofd: int,
                    records: dict) -> dict:
        """Store one part's tensors as an object in the objects folder open as `ofd`; returns
        its manifest entry.

        key: the caller's content key for these tensors (see `commit`). When its entry names an
        object that is there with its size (and not found damaged), that object is the part:
        nothing is hashed or written. Otherwise the part is stored as without a key and the entry
        (re)written. probe=True hashes first and writes nothing when the object exists."""
        if key is not None:
            known = self._keyed_object(key, ofd, records)
            if known is not None:
                return known
        entry = self._store_object(tensors, probe, placed, ofd, records)
        if key is not None:
            self._remember_key(key, entry)
        return entry

    def _store_object(self, tensors: dict, probe: bool, placed: list[str], ofd: int, records: dict) -> dict:
        if probe:
            h, size = new_hash(), 0
            for chunk in st.safetensors_chunks(tensors):
                h.update(chunk)
                size += len(chunk)
            if self.object_ok(h.hexdigest(), size, records, ofd):
                return {"sha256": h.hexdigest(), "bytes": size}
        tmp = f"{TMP}{token()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600, dir_fd=ofd)
        placed.append(tmp)
        try:
            h, size = new_hash(), 0
            for chunk in st.safetensors_chunks(tensors):
                h.update(chunk)
                write_all(fd, chunk)
                size += len(chunk)
            os.fsync(fd)
            digest = h.hexdigest()
            if self.object_ok(digest, size, records, ofd):
                os.unlink(tmp, dir_fd=ofd)
            else:  # absent, or damaged: the good bytes take its place (for every pool naming it)
                os.replace(tmp, digest, src_dir_fd=ofd, dst_dir_fd=ofd)
                if digest in records:
                    integrity.drop_record(self.root, digest)
                st_ = os.fstat(fd)  # this process wrote exactly these bytes: verified
                integrity.remember(st_, st_, digest)
            placed.remove(tmp)
        finally:
            os.close(fd)
        return {"sha256": digest, "bytes": size}

    def _keyed_object(self, key: str, ofd: int, records: dict) -> dict | None:
        """The entry a content key names, if its object is there with its size; None for no
        entry, a malformed one (size, JSON, types: it is only a hint) or a missing object."""
        try:
            kfd = folders.open_dir(self.root, CONTENT_KEYS)
        except PoolError:
            return None
        if kfd is None:
            return None
        try:
            fd = open_regular(key, f"content key {key}", max_bytes=MAX_KEY_ENTRY_BYTES, dir_fd=kfd)
        except (OSError, PoolError):
            return None
        finally:
            os.close(kfd)
        try:
            entry = parse_json(read_fd(fd, MAX_KEY_ENTRY_BYTES), f"content key {key}")
        except (OSError, PoolError):
            return None
        finally:
            os.close(fd)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and SHA_RE.fullmatch(entry["sha256"])
                and is_int(entry.get("bytes"))):
            return None
        if not self.object_ok(entry["sha256"], entry["bytes"], records, ofd):
            return None  # collected, truncated, replaced or found damaged since: hashed as without a key
        return {"sha256": entry["sha256"], "bytes": entry["bytes"]}

    def _remember_key(self, key: str, entry: dict) -> None:
        """Record which object holds a key's content. Best effort: a hint that cannot be
        written costs the next commit a hash, never this one its save."""
        data = json.dumps({"sha256": entry["sha256"], "bytes": entry["bytes"]}, sort_keys=True).encode("ascii")
        with contextlib.suppress(OSError, PoolError):
            kfd = folders.open_dir(self.root, CONTENT_KEYS, create=True)
            try:
                folders.replace_at(kfd, key, data)
            finally:
                os.close(kfd)

    def object_ok(self, digest: str, size: int, records: dict | None = None, ofd: int | None = None) -> bool:
        """The object `digest` is there, a regular file of `size` bytes, not found damaged."""
        own = ofd is None
        if own:
            ofd = folders.open_dir(self.root, OBJECTS)
            if ofd is None:
                return False
        try:
            st_ = os.lstat(digest, dir_fd=ofd)
        except FileNotFoundError:
            return False
        finally:
            if own:
                os.close(ofd)
        if not stat.S_ISREG(st_.st_mode) or st_.st_size != size:
            return False
        records = integrity.recorded(self.root) if records is None else records
        return not integrity.is_recorded(records, digest, st_)

    def adopt_v1_part(self, name: str, m: dict, pid: str, ofd: int) -> None:
        """Make the object of a format-1 part exist: hard-link (else copy) the pool's own
        file after checking its sha256, so a damaged file never gets a content name."""
        entry = m["parts"][pid]
        if self.object_ok(entry["sha256"], entry["bytes"], ofd=ofd):
            return
        folder = part_folder(self.root, name, m)
        try:
            fd = open_part_at(folder, name, m, pid)
        except BaseException:
            if folder is not None:
                os.close(folder)
            raise
        try:
            digest, size = hash_fd(fd)
            if (digest, size) != (entry["sha256"], entry["bytes"]):
                integrity.record_damage(self.root, entry["sha256"], os.fstat(fd))
                raise PoolCorrupt(f"pool {name}: part {pid} is damaged (sha256 mismatch); {repair_hint(name)}")
            tmp = f"{TMP}{token()}"
            try:
                os.link(part_file_name(m, pid), tmp, src_dir_fd=folder, dst_dir_fd=ofd, follow_symlinks=False)
            except OSError:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600,
                              dir_fd=ofd)
                try:
                    offset = 0
                    while data := os.pread(fd, 8 << 20, offset):
                        write_all(out, data)
                        offset += len(data)
                    os.fsync(out)
                finally:
                    os.close(out)
            os.replace(tmp, digest, src_dir_fd=ofd, dst_dir_fd=ofd)
        finally:
            os.close(fd)
            os.close(folder)

    # ------------------------------------------------------------------------ commits

    def commit(self, name: str, meta: dict, part_ids: list[str], new_parts: dict[str, dict],
               expect_version: int | None, log_append: list[dict] | None = None,
               probe: Iterable[str] = (), content_keys: dict[str, str] | None = None) -> dict:
        """Save a new version of pool `name` and return its manifest.

        The new version references exactly `part_ids`; `new_parts` holds the tensors of parts
        that are new. `log_append` records are appended to the pool's log. `probe` names new
        parts that probably exist in the store already (hashed first, written only if not).
        `content_keys` maps new parts to the caller's key for their content (64 hex digits,
        the same key only ever for the same tensors): a part whose key the store has seen
        before is the object it was stored as, without hashing its tensors again.
        `expect_version` is the version the caller loaded; None or 0 means "create a new pool"
        (PoolExists if it exists). Another current version raises PoolBusy. Takes the writer
        lock unless this thread holds it."""
        validate_name(name)
        if not isinstance(part_ids, (list, tuple)):
            raise PoolError("commit: part_ids must be a list of part ids")
        part_ids = list(part_ids)
        for pid in part_ids:
            validate_part_id(pid)
        if len(set(part_ids)) != len(part_ids):
            raise PoolError(f"commit to pool {name}: part_ids lists a part twice")
        new_parts = dict(new_parts or {})
        for pid, tensors in new_parts.items():
            validate_part_id(pid)
            if pid not in part_ids:
                raise PoolError(f"commit to pool {name}: new part {pid} is not in part_ids")
            st.check_tensors(f"part {pid}", tensors)
        if not isinstance(content_keys, (dict, type(None))):
            raise PoolError(f"commit to pool {name}: content keys must be a dict of part ids to keys")
        content_keys = dict(content_keys or {})
        for pid, key in content_keys.items():
            if pid not in new_parts:
                raise PoolError(f"commit to pool {name}: content key for part {pid}, which is not a new part")
            if not isinstance(key, str) or not SHA_RE.fullmatch(key):
                raise PoolError(f"commit to pool {name}: content key of part {pid} is not 64 lowercase hex digits")
        if not isinstance(meta, dict):
            raise PoolError(f"commit to pool {name}: meta must be a dict")
        try:
            meta = json.loads(json.dumps(meta, allow_nan=False))
            records = [json.dumps(r, ensure_ascii=False, allow_nan=False, separators=(",", ":")) for r in log_append or []]
        except (TypeError, ValueError) as exc:
            raise PoolError(f"commit to pool {name}: meta or log is not JSON-serialisable ({exc})") from None
        if any(not isinstance(r, dict) for r in log_append or []):
            raise PoolError(f"commit to pool {name}: log records must be dicts")
        if expect_version is not None and (type(expect_version) is not int or expect_version < 0):
            raise PoolError(f"commit to pool {name}: expect_version must be None or an int >= 0")
        with self.writer(name):
            manifest, dropped = self._commit_locked(name, meta, part_ids, new_parts, expect_version, records,
                                                    set(probe), content_keys)
        if dropped:
            collect_garbage(self)
        return copy.deepcopy(manifest)

    def _commit_locked(self, name, meta, part_ids, new_parts, expect_version, records_out, probe, content_keys):
        pool_dir = self.pool_dir(name)
        state = self.dir_state(name)
        self._refuse_odd(name, state)
        old = None
        if state == "ok":
            old = self.read_manifest(name)
            if not expect_version:
                raise PoolExists(f"pool {name} already exists")
            if old["version"] != expect_version:
                raise PoolBusy(f"pool {name} changed since it was loaded (version {expect_version} -> "
                               f"{old['version']}); reload and retry")
        elif expect_version:
            raise PoolNotFound(f"pool {name} not found (it was expected at version {expect_version})")
        placed: list[str] = []
        ofd = None
        try:
            with write_errors(f"saving pool {name}", f"save pool {name}", "the pool is unchanged"), \
                    self.gate.shared(), contextlib.ExitStack() as stack:
                ofd = folders.open_dir(self.root, OBJECTS, create=True)
                records = integrity.recorded(self.root)
                entries = {}
                for pid in part_ids:
                    if pid in new_parts:
                        entries[pid] = self._put_object(new_parts[pid], pid in probe, placed, content_keys.get(pid),
                                                        ofd, records)
                    elif old is not None and pid in old["parts"]:
                        if old["format_version"] == 1:
                            self.adopt_v1_part(name, old, pid, ofd)
                        elif not self.object_ok(old["parts"][pid]["sha256"], old["parts"][pid]["bytes"], records, ofd):
                            raise PoolCorrupt(f"pool {name}: part {pid} is missing or damaged; {repair_hint(name)}")
                        entries[pid] = dict(old["parts"][pid])
                    else:
                        raise PoolError(f"commit to pool {name}: part {pid} is neither new nor in the pool")
                if new_parts or (old is not None and old["format_version"] == 1):
                    folders.fsync_fd(ofd)
                stamp = now_iso()
                if old is None:
                    folders.make_root(self.root)
                    target, committed = stack.enter_context(staged_folder(self.root)), {"bytes": 0, "records": 0}
                else:
                    target, committed = pool_dir, old.get("log") or {"bytes": 0, "records": 0}
                log = self._append_log(target, name, committed, records_out)
                manifest = {
                    "format_version": FORMAT_VERSION, "name": name,
                    "version": old["version"] + 1 if old else 1,
                    "created": old["created"] if old else stamp, "updated": stamp,
                    "parts": entries, "log": log, "meta": meta,
                }
                replace_file(target, MANIFEST, manifest_bytes(manifest))
                if old is None:
                    publish_dir(target, pool_dir, name)
        except BaseException:
            for tmp in placed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=ofd)
            raise
        finally:
            if ofd is not None:
                os.close(ofd)
        dropped = old is not None and (
            old["format_version"] == 1
            or {e["sha256"] for e in old["parts"].values()} - {e["sha256"] for e in entries.values()}
        )
        return manifest, bool(dropped)

    def _append_log(self, folder: Path, name: str, committed: dict, records: list[str]) -> dict:
        """Append records after the committed prefix of folder/log.jsonl (bytes past it are a
        killed writer's, cut off first); returns the new committed extent. A committed prefix
        whose last record is torn (snapshot.LogReader) continues from its whole part."""
        if not records and not committed["bytes"]:
            return dict(committed)
        fd = os.open(folder / LOG, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0o600)
        try:
            st_ = os.fstat(fd)
            if not stat.S_ISREG(st_.st_mode):
                raise PoolCorrupt(f"pool {name}: log.jsonl is damaged (not a regular file)")
            base = committed
            torn = st_.st_size < committed["bytes"] or (
                committed["bytes"] > 0 and os.pread(fd, 1, committed["bytes"] - 1) != b"\n")
            if torn:
                reader = LogReader(fd_stream(fd), committed["bytes"], f"pool {name}", committed["records"])
                for _line in reader:  # PoolCorrupt unless only the last record is torn
                    pass
                base = {"bytes": reader.bytes, "records": reader.records}
            if not records and not torn:
                return dict(committed)
            if st_.st_size != base["bytes"]:
                os.ftruncate(fd, base["bytes"])
            data = "".join(r + "\n" for r in records).encode("utf-8")
            os.lseek(fd, base["bytes"], os.SEEK_SET)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"bytes": base["bytes"] + len(data), "records": base["records"] + len(records)}

    # ------------------------------------------------------------------ rename/remove

    def rename(self, old: str, new: str) -> None:
        """Rename pool `old` to `new` (one rename of its folder). Refused while `old` is being
        written or if `new` exists."""
        validate_name(old)
        validate_name(new)
        if old == new or self.exists(new):
            raise PoolExists(f"pool {new} already exists")
        self.read_manifest(old)  # exists, readable, not a symlink
        if self._holds(old):
            raise PoolBusy(f"pool {old} is being written by this process; finish writing before renaming it")
        with self.writer(old), self.writer_lock(new).held():
            if os.path.lexists(self.pool_dir(new)):
                raise PoolExists(f"pool {new} already exists")
            try:
                os.rename(self.pool_dir(old), self.pool_dir(new))
                fsync_dir(self.root)
            except OSError as exc:
                raise PoolError(f"could not rename pool {old} to {new} ({exc.strerror})") from None

    def remove(self, name: str) -> None:
        """Delete a pool: its folder goes in one rename, its parts at the next garbage
        collection. Refused (PoolBusy) while somebody is writing it."""
        validate_name(name)
        state = self.dir_state(name)
        if state in ("absent", "leftover"):
            raise PoolNotFound(f"pool {name} not found")
        p = self.pool_dir(name)
        if state == "symlink":
            with self.writer(name), write_errors(f"removing pool {name}", f"remove pool {name}"):
                os.unlink(p)  # only the link; never what it points to
            return
        if state == "notdir":
            raise PoolCorrupt(f"pool {name} is not a folder; refusing")
        if self._holds(name):
            raise PoolBusy(f"pool {name} is being written by this process; finish writing before removing it")
        with self.writer(name):
            trash = self.root / f"{TMP}rm-{token()}"
            try:
                os.rename(p, trash)
                fsync_dir(self.root)
            except OSError as exc:
                raise PoolError(f"could not remove pool {name} ({exc.strerror})") from None
        rmtree_quiet(trash)
        collect_garbage(self)

    # ------------------------------------------------------------------ read-only, gc

    def check_writable(self) -> None:
        """Before a writing command does any work: PoolReadOnly on a store that cannot be
        written, or the problem of a .locks path that is not a folder, named with the fix."""
        os.close(locking.open_lock_file(self.root / locking.LOCKS, locking.GATE, mode="write"))

    def _collect_pending(self) -> None:
        """Run the garbage collection a writer could not (the gate was taken), if one is pending
        (Gate.on_release). Never fails the reader that lets the gate go."""
        with contextlib.suppress(PoolError, OSError):
            collect_pending(self)
