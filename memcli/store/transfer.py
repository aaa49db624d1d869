"""Fork, export and import: pools copied within the store or through one tar file.

A fork writes a manifest (and a copy of the log's committed prefix): parts are shared objects.
An export streams one snapshot into a temporary file created exclusively next to the
destination, then links it into place (renames with --force): an existing file is never
clobbered without --force, and a destination inside the store is refused. An import checks
every member before anything appears in the store: regular members only (no sparse files,
links or devices), at most one per part plus the manifest and the log, sizes as the manifest
says and within a bound from the pool's shape, each part's sha256 and safetensors header, the
log's records. It stages everything in one folder; a rejected archive leaves nothing behind.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

from . import locking
from . import safetensors as st
from .durable import (
    CHUNK, as_pool_error, create_exclusive, fsync_dir, is_nospace, new_hash, now, open_regular, publish_dir,
    replace_file, token, unlink_quiet, write_all, write_errors,
)
from .errors import PoolCorrupt, PoolError, PoolExists, safe_text
from .manifest import FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, check_manifest, manifest_bytes, parse_json, validate_name
from .recovery import EXPORT_RECORD, collect_garbage
from .snapshot import LOG, OBJECTS, parse_log

EXPORT_TMP_SUFFIX = ".memcli-export"
_TAR_PART_RE = re.compile(r"parts/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})\.safetensors")
_SPARSE_TYPES = {getattr(tarfile, "GNUTYPE_SPARSE", b"S")}


# --------------------------------------------------------------------------- fork


def fork(store, src: str, dst: str):
    """Make pool `dst` a copy of the current version of `src`: a new manifest naming the same
    part objects, and a copy of the log's committed prefix."""
    validate_name(src)
    validate_name(dst)
    if src == dst or store.exists(dst):
        raise PoolExists(f"pool {dst} already exists")
    with store.writer(dst):
        if store.exists(dst):
            raise PoolExists(f"pool {dst} already exists")
        with write_errors(f"forking pool {src} to {dst}", f"fork pool {src} to {dst}", "nothing was created"), \
                store.gate.shared():
            with store.snapshot(src, part_ids=()) as snap:
                m = copy.deepcopy(snap.manifest)
                log_data = snap.log_bytes()
            if m["format_version"] == 1:
                for pid in m["parts"]:  # a format-1 source: give its parts their content names
                    store._adopt_v1_part(src, m, pid)
                fsync_dir(store.root / OBJECTS)
                m["log"] = {"bytes": 0, "records": 0}
            for pid, entry in m["parts"].items():
                if not store._object_ok(entry["sha256"], entry["bytes"]):
                    raise PoolCorrupt(f"pool {src}: part {pid} is missing or damaged; not forked")
            with locking.staged_folder(store.root) as stage:
                if log_data:
                    replace_file(stage, LOG, log_data)
                stamp = now()
                meta = m["meta"]
                meta["forked_from"] = {"name": src, "version": m["version"]}
                manifest = {"format_version": FORMAT_VERSION, "name": dst, "version": 1, "created": stamp,
                            "updated": stamp, "parts": m["parts"], "log": m["log"], "meta": meta}
                replace_file(stage, MANIFEST, manifest_bytes(manifest))
                publish_dir(stage, store._dir(dst), dst)
    return store.info(dst)


# --------------------------------------------------------------------------- export


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
        return True
    except ValueError:
        return False


def export(store, name: str, file: Path, force: bool = False) -> None:
    """Write pool `name` as one uncompressed tar (manifest.json, log.jsonl, parts/*), hash-
    checking every part on the way out."""
    validate_name(name)
    file = Path(os.path.abspath(file))
    if _inside(file, store.root) or _inside(file.parent, store.root):
        raise PoolError(f"refusing to export to {file}: it is inside the pool store; choose a path outside {store.root}")
    if os.path.lexists(file):
        if not os.path.isfile(file) or os.path.islink(file):
            raise PoolError(f"{file} exists and is not a regular file; refusing to replace it")
        if not force:
            raise PoolExists(f"{file} already exists; use --force to replace it")
    if not os.path.isdir(file.parent):
        raise PoolError(f"cannot export to {file}: its folder does not exist")
    store.recover_once()
    tmp = file.parent / f".{file.name[:100]}.{token()}{EXPORT_TMP_SUFFIX}"
    record = store.root / f"{EXPORT_RECORD}{token()}"
    record_fd = None
    snap = None
    try:
        with write_errors(f"exporting pool {name} to {file}", f"export pool {name} to {file}"):
            with store.gate.shared():
                snap = store.snapshot(name)
                try:  # the record lets recovery remove `tmp` if this process is killed
                    record_fd = os.open(record, os.O_RDWR | os.O_CREAT | os.O_EXCL | locking.O_NOFOLLOW, 0o600)
                    write_all(record_fd, json.dumps({"tmp": str(tmp)}).encode())
                    os.fsync(record_fd)
                    locking.fcntl.flock(record_fd, locking.fcntl.LOCK_EX)
                except OSError:
                    if record_fd is not None:
                        os.close(record_fd)
                        record_fd = None
                    unlink_quiet(record)
                fd = create_exclusive(tmp)
            with snap:
                _write_tar(snap, fd)
            if force:
                os.replace(tmp, file)
            else:
                try:
                    os.link(tmp, file)  # never replaces: fails if FILE appeared meanwhile
                    unlink_quiet(tmp)
                except FileExistsError:
                    raise PoolExists(f"{file} already exists; use --force to replace it") from None
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                        raise
                    if os.path.lexists(file):  # no hard links here (FAT, some network filesystems)
                        raise PoolExists(f"{file} already exists; use --force to replace it") from None
                    os.rename(tmp, file)
            fsync_dir(file.parent)
    except BaseException:
        unlink_quiet(tmp)
        raise
    finally:
        if snap is not None:
            snap.close()
        if record_fd is not None:
            unlink_quiet(record)
            os.close(record_fd)


class _HashingReader:
    def __init__(self, fd: int):
        self.fd, self.offset, self.sha = fd, 0, new_hash()

    def read(self, n: int = -1) -> bytes:
        data = os.pread(self.fd, n if n >= 0 else CHUNK, self.offset)
        self.offset += len(data)
        self.sha.update(data)
        return data


def _write_tar(snap, fd: int) -> None:
    import io

    m = snap.manifest
    with os.fdopen(fd, "wb", buffering=CHUNK) as out:
        mtime = int(time.time())
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = CHUNK

            def info(arcname: str, size: int) -> tarfile.TarInfo:
                ti = tarfile.TarInfo(arcname)
                ti.size, ti.mode, ti.mtime, ti.type = size, 0o644, mtime, tarfile.REGTYPE
                return ti

            data = manifest_bytes(m)
            tar.addfile(info(MANIFEST, len(data)), io.BytesIO(data))
            log = snap.log_bytes()
            if log:
                tar.addfile(info(LOG, len(log)), io.BytesIO(log))
            for pid, entry in m["parts"].items():
                reader = _HashingReader(snap.fd(pid))
                tar.addfile(info(f"parts/{pid}.safetensors", entry["bytes"]), reader)
                if reader.sha.hexdigest() != entry["sha256"]:
                    raise PoolCorrupt(f"pool {snap.name}: part {pid} is damaged (sha256 mismatch); not exported")
        out.flush()
        os.fsync(out.fileno())


# --------------------------------------------------------------------------- import


def _check_member(where: str, member: tarfile.TarInfo) -> None:
    shown = safe_text(member.name)[:80]
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.type in _SPARSE_TYPES \
            or getattr(member, "sparse", None) or any(k.startswith("GNU.sparse") for k in member.pax_headers):
        raise PoolCorrupt(f"{where}: entry {shown!r} is not a plain regular file (link, device or sparse); refusing")


def import_(store, file: Path, name: str | None = None):
    """Create a pool from an export file; see the module docstring for what is checked."""
    check_meta, max_part_bytes = store.meta_checks()
    file = Path(file)
    where = safe_text(file.name)
    if name is not None:
        validate_name(name)
        if store.exists(name):
            raise PoolExists(f"pool {name} already exists")
    try:
        fd = open_regular(file, str(file))
    except FileNotFoundError:
        raise PoolError(f"{file} not found") from None
    archive_bytes = os.fstat(fd).st_size
    fh = os.fdopen(fd, "rb", buffering=CHUNK)
    lock = None
    try:
        try:
            tar = tarfile.open(fileobj=fh, mode="r|")
            members = iter(tar)
            first = next(members, None)
        except (tarfile.TarError, EOFError, OSError):
            raise PoolCorrupt(f"{where} is not a memcli pool export (not a tar archive)") from None
        if first is None or first.name != MANIFEST:
            raise PoolCorrupt(f"{where} is not a memcli pool export (its first entry is not manifest.json)")
        _check_member(where, first)
        if first.size > MAX_MANIFEST_BYTES:
            raise PoolCorrupt(f"{where}: manifest.json is implausibly large ({first.size} bytes)")
        try:
            raw = tar.extractfile(first).read()
        except (tarfile.TarError, EOFError, OSError):
            raise PoolCorrupt(f"{where} is truncated") from None
        m = check_manifest(parse_json(raw, f"{where}: manifest.json"), where)
        if m["format_version"] != FORMAT_VERSION:
            m.setdefault("log", {"bytes": 0, "records": 0})
        check_meta(where, m["meta"])
        target = name if name is not None else m["name"]
        try:
            validate_name(target)
        except PoolError as exc:
            raise PoolCorrupt(f"{where}: {exc}") from None
        # a tar holds every byte of its (non-sparse) members: nothing may declare more than that
        bound = min(archive_bytes, max_part_bytes(m["meta"]))
        if m["log"]["bytes"] > archive_bytes:
            raise PoolCorrupt(f"{where}: log.jsonl declares more bytes than the archive holds; refusing")
        for pid, entry in m["parts"].items():
            if entry["bytes"] > bound:
                raise PoolCorrupt(f"{where}: part {pid} declares {entry['bytes']} bytes, more than the archive or "
                                  f"a pool of this shape can hold ({bound}); refusing")
        need = sum(e["bytes"] for e in m["parts"].values()) + m["log"]["bytes"]
        store.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        free = shutil.disk_usage(store.root).free
        if need > free:
            raise PoolError(f"not enough space to import {where}: it needs {need} bytes, {free} are free")
        lock = store._lock(target)
        lock.acquire()
        store.recover_once()
        if store.exists(target):
            raise PoolExists(f"pool {target} already exists")
        with store.gate.shared(), locking.staged_folder(store.root, "import-") as stage:
            os.mkdir(stage / "objects", 0o700)
            os.mkdir(stage / "pool", 0o700)
            staged: dict[str, Path] = {}  # sha256 -> staged file
            seen: set[str] = set()
            log_seen = False
            for count, member in enumerate(_members(members, where), 1):
                if count > len(m["parts"]) + 1:
                    raise PoolCorrupt(f"{where} has more entries than its manifest lists; refusing")
                _check_member(where, member)
                mname = member.name
                if mname == LOG:
                    if log_seen or member.size != m["log"]["bytes"]:
                        raise PoolCorrupt(f"{where}: log.jsonl is repeated or not the size its manifest says")
                    log_seen = True
                    data = _read_member(tar, member, where, m["log"]["bytes"])
                    parse_log(data, where, m["log"]["records"])
                    check_meta(where, m["meta"], parse_log(data, where, m["log"]["records"]))
                    replace_file(stage / "pool", LOG, data)
                    continue
                match = _TAR_PART_RE.fullmatch(mname)
                if not match:
                    raise PoolCorrupt(f"{where} has an entry {safe_text(mname)[:80]!r} that no pool export holds; refusing")
                pid = match.group(1)
                entry = m["parts"].get(pid)
                if entry is None or pid in seen:
                    raise PoolCorrupt(f"{where}: part {pid} is not in its manifest or appears twice; refusing")
                if member.size != entry["bytes"]:
                    raise PoolCorrupt(f"{where}: part {pid} has {member.size} bytes, manifest says {entry['bytes']}")
                seen.add(pid)
                if entry["sha256"] in staged or store._object_ok(entry["sha256"], entry["bytes"]):
                    _skip_member(tar, member, where, entry, pid)
                    continue
                dst = stage / "objects" / entry["sha256"]
                _stage_part(tar, member, dst, where, entry, pid)
                staged[entry["sha256"]] = dst
            missing = sorted(set(m["parts"]) - seen)
            if missing:
                raise PoolCorrupt(f"{where} is incomplete: part {missing[0]} is missing")
            if m["log"]["bytes"] and not log_seen:
                raise PoolCorrupt(f"{where} is incomplete: log.jsonl is missing")
            if not m["log"]["bytes"]:
                check_meta(where, m["meta"], [])
            # everything checked: only now does anything enter the store
            os.makedirs(store.root / OBJECTS, mode=0o700, exist_ok=True)
            for digest, path in staged.items():
                if not store._object_ok(digest, os.path.getsize(path)):
                    os.replace(path, store.root / OBJECTS / digest)
            fsync_dir(store.root / OBJECTS)
            m.update(format_version=FORMAT_VERSION, name=target)
            replace_file(stage / "pool", MANIFEST, manifest_bytes(m))
            publish_dir(stage / "pool", store._dir(target), target)
    except BaseException as exc:
        error = as_pool_error(exc, f"importing {where}", f"import {where}", "nothing was created")
        if error is not None:
            raise error from None
        if isinstance(exc, (UnicodeError, ValueError, tarfile.TarError, EOFError)) and not isinstance(exc, PoolError):
            raise PoolCorrupt(f"{where} is damaged ({type(exc).__name__}); nothing was created") from None
        raise
    finally:
        fh.close()
        if lock is not None:
            lock.release()
            collect_garbage(store)  # objects placed by an import that failed at its last step
    return store.info(target)


def _members(members, where):
    while True:
        try:
            member = next(members, None)
        except (tarfile.TarError, EOFError, OSError):
            raise PoolCorrupt(f"{where} is truncated or damaged") from None
        if member is None:
            return
        yield member


def _read_member(tar, member, where, size) -> bytes:
    try:
        data = tar.extractfile(member).read(size + 1)
    except (tarfile.TarError, EOFError, OSError):
        raise PoolCorrupt(f"{where} is truncated or damaged") from None
    if len(data) != size:
        raise PoolCorrupt(f"{where}: {safe_text(member.name)[:80]} is truncated")
    return data


def _chunks(tar, member, where, limit):
    src = tar.extractfile(member)
    got = 0
    while True:
        try:
            chunk = src.read(CHUNK)
        except (tarfile.TarError, EOFError, OSError) as exc:
            if is_nospace(exc):
                raise
            raise PoolCorrupt(f"{where} is truncated or damaged") from None
        if not chunk:
            return
        got += len(chunk)
        if got > limit:
            raise PoolCorrupt(f"{where}: {safe_text(member.name)[:80]} is longer than declared")
        yield chunk


def _skip_member(tar, member, where, entry, pid) -> None:
    h, got = new_hash(), 0
    for chunk in _chunks(tar, member, where, entry["bytes"]):
        h.update(chunk)
        got += len(chunk)
    if got != entry["bytes"] or h.hexdigest() != entry["sha256"]:
        raise PoolCorrupt(f"{where}: part {pid} is damaged (sha256 mismatch); refusing")


def _stage_part(tar, member, dst: Path, where, entry, pid) -> None:
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | locking.O_NOFOLLOW | locking.O_CLOEXEC, 0o600)
    h, got = new_hash(), 0
    try:
        for chunk in _chunks(tar, member, where, entry["bytes"]):
            h.update(chunk)
            got += len(chunk)
            write_all(fd, chunk)
        if got != entry["bytes"] or h.hexdigest() != entry["sha256"]:
            raise PoolCorrupt(f"{where}: part {pid} is damaged (sha256 mismatch); refusing")
        try:
            st.parse_header(st.fd_reader(fd), got)
        except st.HeaderError as exc:
            raise PoolCorrupt(f"{where}: part {pid} is not a valid safetensors file ({exc}); refusing") from None
        os.fsync(fd)
    finally:
        os.close(fd)
