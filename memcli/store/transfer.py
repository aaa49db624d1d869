"""Fork, export and import: pools copied within the store or through one tar file.

A fork writes a manifest (and a copy of the log's committed prefix): parts are shared objects.
It checks what it copies first: every part's bytes against its name (once per process per file,
integrity.py) and the log, parsed and bounded record by record while it is copied, with the
pool's meta: a fork of a damaged pool fails in one line instead of copying the damage.
An export streams one snapshot into a temporary file created exclusively next to the
destination, then links it into place (renames with --force): an existing file is never
clobbered without --force, and a destination inside the store is refused. Before it writes a
byte it checks what its own import checks (the log's records, the meta with them, each part's
size bound and safetensors header), and each part's sha256 as it streams: an export never
writes an archive that `pool import` refuses. An import checks
every member before anything appears in the store: regular members only (no sparse files,
links or devices), at most one per part plus the manifest and the log, sizes as the manifest
says and within a bound from the pool's shape, each part's sha256 and safetensors header, the
log's records. It stages everything in one folder; a rejected archive leaves nothing behind.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

from memcli.base.clock import now_iso
from memcli.base.durable import (
    CHUNK, O_BINARY, O_CLOEXEC, O_NOFOLLOW, create_exclusive, fsync_dir, is_nospace, new_hash, replace_file,
    unlink_quiet, write_all,
)
from memcli.base.text import one_line

from . import safetensors as st
from . import folders, integrity
from .errors import PoolCorrupt, PoolError, PoolExists
from .files import as_pool_error, open_regular, publish_dir, write_errors
from .manifest import FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, check_manifest, manifest_bytes, parse_json, validate_name
from .recovery import collect_garbage
from .snapshot import LOG, OBJECTS, LogReader, damaged, parse_record
from .staging import export_tmp_path, staged_folder, write_export_record

_TAR_PART_RE = re.compile(r"parts/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})\.safetensors")
_SPARSE_TYPES = {getattr(tarfile, "GNUTYPE_SPARSE", b"S")}


# --------------------------------------------------------------------------- fork


def fork(store, src: str, dst: str):
    """Make pool `dst` a copy of the current version of `src`: a new manifest naming the same
    part objects, and a copy of the log's committed prefix; both checked first (module docstring)."""
    validate_name(src)
    validate_name(dst)
    if src == dst or store.exists(dst):
        raise PoolExists(f"pool {dst} already exists")
    check_meta = store.checks.check_meta
    with store.writer(dst):
        if store.exists(dst):
            raise PoolExists(f"pool {dst} already exists")
        with write_errors(f"forking pool {src} to {dst}", f"fork pool {src} to {dst}", "nothing was created"), \
                store.snapshot(src) as snap:
            m = copy.deepcopy(snap.manifest)
            for pid in m["parts"]:  # the bytes this fork will name, checked (outside the gate: it may take long)
                snap.verify(pid)
            with store.gate.shared(), staged_folder(store.root) as stage:
                ofd = folders.open_dir(store.root, OBJECTS, create=True)
                try:
                    if m["format_version"] == 1:
                        for pid in m["parts"]:  # a format-1 source: give its parts their content names
                            store.adopt_v1_part(src, m, pid, ofd)
                        folders.fsync_fd(ofd)
                    for pid, entry in m["parts"].items():
                        # the object is still the file checked above (and, with the gate held, stays)
                        try:
                            st_ = os.lstat(entry["sha256"], dir_fd=ofd)
                        except FileNotFoundError:
                            st_ = None
                        checked = os.fstat(snap.fd(pid))
                        if st_ is None or integrity.identity(st_) != integrity.identity(checked):
                            if m["format_version"] == 1 and st_ is not None and store.object_ok(
                                    entry["sha256"], entry["bytes"], ofd=ofd):
                                continue  # adopted just now from the checked format-1 file
                            raise PoolCorrupt(f"pool {src}: part {pid} changed while it was forked; try again")
                finally:
                    os.close(ofd)
                log = _copy_log(snap, stage, check_meta, m) if m["format_version"] >= 2 else {"bytes": 0, "records": 0}
                stamp = now_iso()
                meta = m["meta"]
                meta["forked_from"] = {"name": src, "version": m["version"]}
                manifest = {"format_version": FORMAT_VERSION, "name": dst, "version": 1, "created": stamp,
                            "updated": stamp, "parts": m["parts"], "log": log, "meta": meta}
                replace_file(stage, MANIFEST, manifest_bytes(manifest))
                publish_dir(stage, store.pool_dir(dst), dst)
    return store.info(dst)


def _copy_log(snap, stage: Path, check_meta, m: dict) -> dict:
    """Copy the source's log into the staged folder record by record, each parsed and bounded as
    it streams (a torn last record is left out); the meta checked with the records. Returns the
    copy's extent."""
    fd = None
    try:
        def write(line: bytes) -> None:
            nonlocal fd
            if fd is None:
                fd = os.open(stage / LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600)
            write_all(fd, line)

        records = snap.log_records(copy_to=write)
        check_meta(f"pool {snap.name}", m["meta"], records)
        if fd is not None:
            os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)
    return dict(snap.log_extent)


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
    check_meta, max_part_bytes = store.checks.check_meta, store.checks.max_part_bytes
    tmp = export_tmp_path(file)
    record = record_fd = None
    snap = None
    fd = None
    try:
        with write_errors(f"exporting pool {name} to {file}", f"export pool {name} to {file}"):
            snap = store.snapshot(name)
            log = _check_for_export(snap, check_meta, max_part_bytes)  # before a byte is written
            with store.gate.shared():
                record, record_fd = write_export_record(store.root, tmp)  # recovery removes `tmp` if we are killed
                fd = create_exclusive(tmp)
            with snap:
                owned, fd = fd, None
                _write_tar(snap, owned, log)  # closes it
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
        if fd is not None:
            os.close(fd)
        unlink_quiet(tmp)
        raise
    finally:
        if snap is not None:
            snap.close()
        if record_fd is not None:
            unlink_quiet(record)
            os.close(record_fd)


def _check_for_export(snap, check_meta, max_part_bytes) -> dict:
    """What `pool import` will check, checked on the pool before its archive is written: the log
    (records bounded, parsed; a torn last record left out), the meta with those records, each
    part's size bound and safetensors header. Returns the log extent the archive will hold and
    the sha256 of those bytes ({"bytes", "records", "sha256"})."""
    where = f"pool {snap.name}"
    h = new_hash()
    records = snap.log_records(copy_to=h.update)
    check_meta(where, snap.manifest["meta"], records)
    bound = max_part_bytes(snap.manifest["meta"])
    for pid, entry in snap.manifest["parts"].items():
        if entry["bytes"] > bound:
            raise PoolCorrupt(f"{where}: part {pid} has {entry['bytes']} bytes, more than a pool of this shape can "
                              f"hold ({bound}); not exported")
        try:
            st.parse_header(st.fd_reader(snap.fd(pid)), entry["bytes"])
        except st.HeaderError as exc:
            if not integrity.verify_fd(snap.fd(pid), entry["sha256"]):
                raise damaged(snap.root, snap.name, pid, entry["sha256"], snap.fd(pid)) from None
            raise PoolCorrupt(f"{where}: part {pid} is not a valid safetensors file ({exc}); not exported") from None
    return {**snap.log_extent, "sha256": h.hexdigest()}


class _HashingReader:
    def __init__(self, fd: int):
        self.fd, self.offset, self.sha = fd, 0, new_hash()

    def read(self, n: int = -1) -> bytes:
        data = os.pread(self.fd, n if n >= 0 else CHUNK, self.offset)
        self.offset += len(data)
        self.sha.update(data)
        return data


class _LogReader(_HashingReader):
    """The checked part of the log (`limit` bytes), hashed as it goes into the archive."""

    def __init__(self, fd: int, limit: int):
        super().__init__(fd)
        self.limit = limit

    def read(self, n: int = -1) -> bytes:
        left = self.limit - self.offset
        return super().read(left if n < 0 else min(n, left)) if left > 0 else b""


def _write_tar(snap, fd: int, log: dict) -> None:
    m = dict(snap.manifest, log={"bytes": log["bytes"], "records": log["records"]})
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
            if log["bytes"]:
                reader = _LogReader(snap.log_fd, log["bytes"])
                tar.addfile(info(LOG, log["bytes"]), reader)
                if reader.sha.hexdigest() != log["sha256"]:
                    raise PoolCorrupt(f"pool {snap.name}: log.jsonl changed while it was exported; try again")
            for pid, entry in m["parts"].items():
                reader = _HashingReader(snap.fd(pid))
                before = os.fstat(reader.fd)
                tar.addfile(info(f"parts/{pid}.safetensors", entry["bytes"]), reader)
                if reader.sha.hexdigest() != entry["sha256"]:
                    raise damaged(snap.root, snap.name, pid, entry["sha256"], snap.fd(pid))
                integrity.remember(before, os.fstat(reader.fd), entry["sha256"])
        out.flush()
        os.fsync(out.fileno())


# --------------------------------------------------------------------------- import


def _check_member(where: str, member: tarfile.TarInfo) -> None:
    shown = one_line(member.name, 80)
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.type in _SPARSE_TYPES \
            or getattr(member, "sparse", None) or any(k.startswith("GNU.sparse") for k in member.pax_headers):
        raise PoolCorrupt(f"{where}: entry {shown!r} is not a plain regular file (link, device or sparse); refusing")


def import_(store, file: Path, name: str | None = None):
    """Create a pool from an export file; see the module docstring for what is checked."""
    check_meta, max_part_bytes = store.checks.check_meta, store.checks.max_part_bytes
    file = Path(file)
    where = one_line(file.name)
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
        store.check_writable()  # a read-only store: said in one line before anything is read further
        folders.make_root(store.root)
        free = shutil.disk_usage(store.root).free
        if need > free:
            raise PoolError(f"not enough space to import {where}: it needs {need} bytes, {free} are free")
        taking = store.writer_lock(target)
        taking.acquire()  # PoolBusy (another process imports or writes that name), PoolReadOnly
        lock = taking
        store.recover_once()
        if store.exists(target):
            raise PoolExists(f"pool {target} already exists")
        with store.gate.shared(), staged_folder(store.root, "import-") as stage:
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
                    _stage_log(tar, member, stage / "pool", where, m, check_meta)
                    continue
                match = _TAR_PART_RE.fullmatch(mname)
                if not match:
                    raise PoolCorrupt(f"{where} has an entry {one_line(mname, 80)!r} that no pool export holds; refusing")
                pid = match.group(1)
                entry = m["parts"].get(pid)
                if entry is None or pid in seen:
                    raise PoolCorrupt(f"{where}: part {pid} is not in its manifest or appears twice; refusing")
                if member.size != entry["bytes"]:
                    raise PoolCorrupt(f"{where}: part {pid} has {member.size} bytes, manifest says {entry['bytes']}")
                seen.add(pid)
                if entry["sha256"] in staged or store.object_ok(entry["sha256"], entry["bytes"]):
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
            ofd = folders.open_dir(store.root, OBJECTS, create=True)
            try:
                for digest, path in staged.items():
                    if not store.object_ok(digest, os.path.getsize(path), ofd=ofd):  # absent, or found damaged
                        os.replace(path, digest, dst_dir_fd=ofd)
                        integrity.drop_record(store.root, digest)
                folders.fsync_fd(ofd)
            finally:
                os.close(ofd)
            m.update(format_version=FORMAT_VERSION, name=target)
            replace_file(stage / "pool", MANIFEST, manifest_bytes(m))
            publish_dir(stage / "pool", store.pool_dir(target), target)
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


def _stage_log(tar, member, folder: Path, where: str, m: dict, check_meta) -> None:
    """Stage the archive's log as it streams: every record bounded and parsed on the way (never a
    whole 1 GiB line in memory), then the meta checked with the records."""
    try:
        src = tar.extractfile(member)
    except (tarfile.TarError, EOFError, OSError):
        raise PoolCorrupt(f"{where} is truncated or damaged") from None

    def read(n: int) -> bytes:
        try:
            return src.read(n)
        except (tarfile.TarError, EOFError, OSError):
            raise PoolCorrupt(f"{where} is truncated or damaged") from None

    fd = os.open(folder / LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600)
    try:
        records = []
        reader = LogReader(read, m["log"]["bytes"], where, m["log"]["records"], torn_ok=False)
        for i, line in enumerate(reader, 1):
            records.append(parse_record(line, where, i))
            write_all(fd, line)
        check_meta(where, m["meta"], records)
        os.fsync(fd)
    finally:
        os.close(fd)


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
            raise PoolCorrupt(f"{where}: {one_line(member.name, 80)} is longer than declared")
        yield chunk


def _skip_member(tar, member, where, entry, pid) -> None:
    h, got = new_hash(), 0
    for chunk in _chunks(tar, member, where, entry["bytes"]):
        h.update(chunk)
        got += len(chunk)
    if got != entry["bytes"] or h.hexdigest() != entry["sha256"]:
        raise PoolCorrupt(f"{where}: part {pid} is damaged (sha256 mismatch); refusing")


def _stage_part(tar, member, dst: Path, where, entry, pid) -> None:
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
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
