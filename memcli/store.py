"""Durable on-disk store for memory pools.

A pool is somebody's memory: losing or corrupting one is the worst thing memcli can do.
This module is generic (it knows nothing about models). A pool is a JSON manifest plus a
set of immutable *parts*; a part is one safetensors file with a few named tensors,
identified by a caller-chosen id, whose content never changes once written.

Layout (root = ``paths.pools_dir()``)::

    <root>/<name>/manifest.json              current version (replaced atomically)
    <root>/<name>/parts/<part_id>.safetensors immutable parts
    <root>/<name>/.lock                       writer lock {pid, host, started, ...}
    <root>/<name>/.creating                   marker: pool being created (no manifest yet)
    <root>/.tmp-*  <root>/<name>/.tmp-*  <root>/<name>/parts/.tmp-*
                                              leftovers of interrupted writes (cleanup())

Crash safety: every file is written under a temporary name, fsynced, renamed into place
and the directory fsynced. A commit first puts its new parts in place (they are not
referenced yet), then atomically replaces manifest.json, then deletes the parts the new
manifest no longer references. A SIGKILL at any point therefore leaves either the old
manifest with all its parts, or the new one with all of its parts. Parts are never
modified in place, which is what makes hard-link forks safe.

Readers never lock. Writers hold an exclusive lock: ``fcntl.flock`` on the pool folder
(released by the kernel when a process dies, so two processes can never both hold it)
plus a ``.lock`` file that tells others who holds it (and is taken over when stale).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from memcli import paths

try:  # POSIX only; without it the .lock file alone is the lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "PoolError",
    "PoolNotFound",
    "PoolExists",
    "PoolBusy",
    "PoolCorrupt",
    "InvalidPoolName",
    "PoolInfo",
    "PoolStore",
    "validate_name",
    "validate_part_id",
]

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
PARTS = "parts"
LOCK = ".lock"
CREATING = ".creating"
TMP = ".tmp-"
PART_SUFFIX = ".safetensors"

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_PART_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_TAR_PART_RE = re.compile(r"parts/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})\.safetensors")

_CHUNK = 8 << 20  # bytes per write / read / hash step
_MAX_MANIFEST_BYTES = 256 << 20

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_FICLONE = 0x40049409  # Linux ioctl: reflink a whole file (btrfs, xfs, ...)

_HOST = socket.gethostname()


# --------------------------------------------------------------------------- errors


class PoolError(Exception):
    """A pool operation failed; str() is a one-line message for humans."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class PoolNotFound(PoolError):
    """No pool of that name."""


class PoolExists(PoolError):
    """A pool of that name already exists."""


class PoolBusy(PoolError):
    """Another process is writing the pool, or it changed since it was loaded."""


class PoolCorrupt(PoolError):
    """The pool (or an export file) on disk is damaged or not ours."""


class InvalidPoolName(PoolError):
    """The name cannot be used as a pool name."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    """Return `name` if it is a valid pool name, else raise InvalidPoolName.

    Rule: 1-64 characters from letters, digits, '-', '_' and '.', not starting with '.'.
    Never touches the disk.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = repr(name)
        if isinstance(name, str) and len(name) > 64:
            shown = f"{repr(name[:20])[:-1]}...' ({len(name)} characters)"
        raise InvalidPoolName(
            f"invalid pool name {shown}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return name


def validate_part_id(part_id: str) -> str:
    """Part ids become file names: [A-Za-z0-9._-]{1,128}, not starting with '.'."""
    if not isinstance(part_id, str) or not _PART_RE.fullmatch(part_id):
        raise PoolError(
            f"invalid part id {part_id!r:.60}: use 1-128 letters, digits, '-', '_' or '.', "
            "not starting with '.'"
        )
    return part_id


# ------------------------------------------------------------------------- PoolInfo


@dataclass
class PoolInfo:
    name: str
    version: int
    created: str
    updated: str
    bytes_on_disk: int  # part files + manifest; a hard-linked part counts in every pool
    num_parts: int
    meta: dict = field(default_factory=dict)
    error: str | None = None  # set (and the rest zero/empty) for a broken pool in list()


# ------------------------------------------------------------------ low-level helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rand() -> str:
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def _write_all(fd: int, data) -> None:
    """Write every byte of `data` to `fd`. All bytes the store saves go through here."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path | str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:  # pragma: no cover - platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _create_file(path: Path, mode: int = 0o600) -> int:
    return os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY, mode
    )


def _write_file_durably(path: Path, data: bytes) -> None:
    """Create `path` (must not exist) with `data`, fsynced. Removes it on failure."""
    fd = _create_file(path)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(path)
        raise
    os.close(fd)


def _unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _rmtree_quiet(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_nospace(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _as_pool_error(exc: BaseException, while_doing: str, could_not: str, outcome: str = "") -> PoolError | None:
    """The one-line PoolError for an OS failure of a write (disk full said plainly); None for
    anything else, which the caller re-raises unchanged (PoolErrors, KeyboardInterrupt, bugs)."""
    if isinstance(exc, PoolError) or not isinstance(exc, OSError):
        return None
    tail = f"; {outcome}" if outcome else ""
    if _is_nospace(exc):
        return PoolError(f"no space left on device while {while_doing}{tail}")
    return PoolError(f"could not {could_not} ({exc.strerror or exc}){tail}")


def _hash_file(path: Path) -> tuple[str, int]:
    """sha256 hex and size of a file, never following a symlink."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> tuple[str, int]:
    """sha256 hex and size of an open file, read from its start (the offset is untouched)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [buf], offset) if hasattr(os, "preadv") else _pread_into(fd, buf, offset)
        if not n:
            break
        h.update(view[:n])
        offset += n
    return h.hexdigest(), offset


def _pread_into(fd: int, buf: bytearray, offset: int) -> int:  # pragma: no cover - no preadv
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)


def _pid_start_time(pid: int) -> str | None:
    """Start time of a process (Linux /proc), to tell a reused pid from the lock holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to somebody else
    except OSError:
        return True
    return True


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    head = os.path.basename(argv[0]) or "python"
    if head in ("-c", "-m", "-", ""):
        head = "python " + head
    text = " ".join([head, *argv[1:]])
    text = _one_line(text)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------- safetensors, streamed

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _attr, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _attr):
        _DTYPES[getattr(torch, _attr)] = _code


def _check_tensors(part_id: str, tensors: Any) -> None:
    if not isinstance(tensors, dict):
        raise PoolError(f"part {part_id}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise PoolError(f"part {part_id}: invalid tensor name {key!r:.60}")
        if not isinstance(value, torch.Tensor):
            raise PoolError(f"part {part_id}: {key!r:.60} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise PoolError(f"part {part_id}: tensor {key!r:.60} is not dense ({value.layout})")
        if value.dtype not in _DTYPES:
            raise PoolError(f"part {part_id}: tensor {key!r:.60} has unsupported dtype {value.dtype}")


def safetensors_chunks(tensors: dict[str, torch.Tensor]) -> Iterator[memoryview | bytes]:
    """Yield the bytes of a safetensors file for `tensors`, tensor by tensor, without
    building the whole file in memory (a 3 GB part must not need 3 GB more RAM)."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        from safetensors.torch import save

        yield save(tensors)
        return
    # Same layout as safetensors itself: widest dtypes first so that every tensor is
    # aligned, header padded with spaces to a multiple of 8.
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in order:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    yield struct.pack("<Q", len(head)) + head
    for _key, t in order:
        if t.numel() == 0:
            continue
        flat = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        view = memoryview(flat.numpy())
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]


def _safetensors_header_problem(path: Path, size: int) -> str | None:
    """Cheap structural check of a safetensors file's header; None when it looks fine."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return "too short for a safetensors file"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                return "header length out of range"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable safetensors header ({_one_line(str(exc))[:80]})"
    if not isinstance(header, dict):
        return "safetensors header is not an object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return f"bad safetensors entry {key!r:.40}"
    if 8 + n + end != size:
        return "safetensors data size does not match the file size"
    return None


# -------------------------------------------------------------------- the lock table


@dataclass
class _Held:
    fd: int
    count: int
    thread: int
    token: str


_HELD: dict[tuple[str, str], _Held] = {}
_RETRY: Any = object()  # _try_lock: nothing conclusive happened, look again
_BRIEF_PURPOSES = ("cleanup", "rename", "remove")
_BRIEF_GRACE_S = 5.0
_HELD_GUARD = threading.Lock()


class _FdWriter(io.RawIOBase):
    """Unbuffered file object over an fd whose writes go through _write_all; closes the fd."""

    def __init__(self, fd: int):
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        _write_all(self._fd, data)
        return n

    def fileno(self) -> int:
        return self._fd

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class _HashingReader(io.RawIOBase):
    """File-like wrapper that hashes what is read through it (export streams through it)."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


# ------------------------------------------------------------------------ the store


class PoolStore:
    """The pools under one root folder. Cheap to construct; creates nothing until a write."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.pools_dir()
        self._cache: dict[str, tuple[bytes, dict]] = {}  # name -> (manifest bytes, parsed)
        self._seen: dict[str, tuple[int, frozenset]] = {}  # name -> last read_manifest's (version, parts)

    # ---------------------------------------------------------------- paths & checks

    def _dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def _key(self, name: str) -> tuple[str, str]:
        return (os.path.realpath(self.root), name)

    def _dir_state(self, name: str) -> str:
        """'absent', 'symlink', 'notdir', 'ok' (has manifest), 'leftover' (no manifest and
        either being created or holding no part files), 'broken' (parts but no manifest)."""
        p = self._dir(name)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return "absent"
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        if not stat.S_ISDIR(st.st_mode):
            return "notdir"
        if os.path.lexists(p / MANIFEST):
            return "ok"
        if os.path.lexists(p / CREATING):
            return "leftover"
        try:
            with os.scandir(p / PARTS) as it:
                if any(e.name.endswith(PART_SUFFIX) and not e.name.startswith(".") for e in it):
                    return "broken"
        except OSError:
            pass
        return "leftover"

    def _refuse_odd(self, name: str, state: str) -> None:
        if state == "symlink":
            raise PoolCorrupt(f"pool {name} is a symbolic link; refusing")
        if state == "notdir":
            raise PoolCorrupt(f"pool {name} is not a folder; refusing")
        if state == "broken":
            raise PoolCorrupt(f"pool {name} has no manifest.json (damaged); refusing")

    def _parts_dir(self, name: str) -> Path:
        p = self._dir(name) / PARTS
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return p
        if stat.S_ISLNK(st.st_mode):
            raise PoolCorrupt(f"pool {name}: its parts folder is a symbolic link; refusing")
        if not stat.S_ISDIR(st.st_mode):
            raise PoolCorrupt(f"pool {name}: its parts folder is not a folder")
        return p

    # ------------------------------------------------------------------- manifests

    def _check_manifest(self, name: str, m: Any, where: str = "") -> dict:
        """Validate the structure of a manifest; raise PoolCorrupt with one reason."""
        what = where or f"pool {name}"
        if not isinstance(m, dict):
            raise PoolCorrupt(f"{what}: manifest.json is not a JSON object")
        fv = m.get("format_version")
        if not isinstance(fv, int) or isinstance(fv, bool):
            raise PoolCorrupt(f"{what}: manifest.json has no valid format_version")
        if fv != FORMAT_VERSION:
            newer = "a newer" if fv > FORMAT_VERSION else "an unknown"
            raise PoolCorrupt(
                f"{what} has format_version {fv} ({newer} format) but this memcli reads "
                f"format_version {FORMAT_VERSION}" + ("; upgrade memcli" if fv > FORMAT_VERSION else "")
            )
        v = m.get("version")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PoolCorrupt(f"{what}: manifest.json has an invalid version")
        for key in ("name", "created", "updated"):
            if not isinstance(m.get(key), str):
                raise PoolCorrupt(f"{what}: manifest.json has an invalid {key!r}")
        if not isinstance(m.get("meta"), dict):
            raise PoolCorrupt(f"{what}: manifest.json has an invalid 'meta'")
        parts = m.get("parts")
        if not isinstance(parts, dict):
            raise PoolCorrupt(f"{what}: manifest.json has an invalid 'parts'")
        for pid, entry in parts.items():
            if not _PART_RE.fullmatch(pid):
                raise PoolCorrupt(f"{what}: manifest.json lists an invalid part id {pid!r:.60}")
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not _SHA_RE.fullmatch(entry["sha256"])
                or not isinstance(entry.get("bytes"), int)
                or isinstance(entry.get("bytes"), bool)
                or entry["bytes"] < 0
            ):
                raise PoolCorrupt(f"{what}: manifest.json has an invalid entry for part {pid}")
        return m

    def _load_manifest(self, name: str, shared: bool = False) -> tuple[Path, dict]:
        """Read, parse and check a pool's manifest. shared=True may return a cached dict
        (when the file's bytes are unchanged) that the caller must not modify: reading
        many parts then costs one small read each, not one JSON parse of a large meta."""
        p = self._dir(name)
        state = self._dir_state(name)
        if state in ("absent", "leftover"):
            raise PoolNotFound(f"pool {name} not found")
        self._refuse_odd(name, state)
        try:
            fd = os.open(p / MANIFEST, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
        except FileNotFoundError:  # removed or renamed under our feet
            raise PoolNotFound(f"pool {name} not found") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PoolCorrupt(f"pool {name}: manifest.json is a symbolic link; refusing") from None
            raise PoolError(f"cannot read pool {name}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PoolCorrupt(f"pool {name}: manifest.json is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(_MAX_MANIFEST_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise PoolCorrupt(f"pool {name}: manifest.json is implausibly large")
        cached = self._cache.get(name)
        if shared and cached is not None and cached[0] == raw:
            return p, cached[1]
        try:
            m = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PoolCorrupt(f"pool {name}: manifest.json is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise PoolCorrupt(
                f"pool {name}: manifest.json is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        self._check_manifest(name, m)
        # The folder name is authoritative: a crash inside rename() may leave the old
        # name in the manifest (cleanup() rewrites it).
        m["name"] = name
        if shared:
            self._cache[name] = (raw, m)
        return p, m

    def _manifest_bytes(self, m: dict) -> bytes:
        return (json.dumps(m, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")

    def _write_manifest(self, pool_dir: Path, m: dict) -> None:
        """Write manifest.json atomically and durably (temp file, fsync, replace, fsync dir)."""
        self._replace_manifest(pool_dir, m)
        _fsync_dir(pool_dir)

    def _replace_manifest(self, pool_dir: Path, m: dict) -> None:
        """Temp file, fsync, atomic replace: once this returns, the new version is the
        pool's (the caller still fsyncs the folder to make the rename durable)."""
        data = self._manifest_bytes(m)
        tmp = pool_dir / f"{TMP}manifest-{_rand()}"
        _write_file_durably(tmp, data)
        try:
            os.replace(tmp, pool_dir / MANIFEST)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    # ----------------------------------------------------------------------- reading

    def exists(self, name: str) -> bool:
        """True when the name is taken (a pool, or something damaged that would be in the way)."""
        return self._dir_state(name) not in ("absent", "leftover")

    def read_manifest(self, name: str) -> dict:
        m = self._load_manifest(name)[1]
        self._seen[name] = (m["version"], frozenset(m["parts"]))
        return m

    def _info_from(self, name: str, pool_dir: Path, m: dict) -> PoolInfo:
        total = 0
        with contextlib.suppress(OSError):
            total += os.lstat(pool_dir / MANIFEST).st_size
        parts_dir = pool_dir / PARTS
        for pid in m["parts"]:
            with contextlib.suppress(OSError):
                total += os.lstat(parts_dir / f"{pid}{PART_SUFFIX}").st_size
        return PoolInfo(
            name=name,
            version=m["version"],
            created=m["created"],
            updated=m["updated"],
            bytes_on_disk=total,
            num_parts=len(m["parts"]),
            meta=m["meta"],
        )

    def info(self, name: str) -> PoolInfo:
        pool_dir, m = self._load_manifest(name)
        return self._info_from(name, pool_dir, m)

    def list(self) -> list[PoolInfo]:
        """Every pool, sorted by name. A broken pool is listed with `error` set."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []
        out: list[PoolInfo] = []
        for entry in entries:
            if entry.startswith(".") or not _NAME_RE.fullmatch(entry):
                continue
            state = self._dir_state(entry)
            if state in ("absent", "leftover"):
                continue
            try:
                out.append(self.info(entry))
            except PoolNotFound:
                continue
            except PoolError as exc:
                out.append(PoolInfo(entry, 0, "", "", 0, 0, {}, error=str(exc)))
        return out

    def _part_file(self, name: str, part_id: str) -> Path:
        return self._parts_dir(name) / f"{validate_part_id(part_id)}{PART_SUFFIX}"

    def _missing_part(self, name: str, part_id: str, version: int) -> PoolError:
        """A part file of the manifest we read is gone: a concurrent commit (busy, retry)
        or damage (corrupt)."""
        try:
            now = self.read_manifest(name)
        except PoolError as exc:
            return exc
        if now["version"] != version and part_id not in now["parts"]:
            return PoolBusy(f"pool {name} changed while it was being read (version {version} -> {now['version']}); try again")
        return PoolCorrupt(f"pool {name}: part {part_id} is missing")

    def _open_part(self, name: str, part_id: str, entry: dict, version: int) -> int:
        """Open a part file (never through a symlink) and check its size; returns the fd.
        Once open, a concurrent commit that deletes the file cannot take it away from us."""
        path = self._part_file(name, part_id)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
        except FileNotFoundError:
            raise self._missing_part(name, part_id, version) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(path):
                raise PoolCorrupt(f"pool {name}: part {part_id} is a symbolic link; refusing") from None
            raise PoolError(f"cannot read pool {name}: part {part_id} ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PoolCorrupt(f"pool {name}: part {part_id} is not a regular file")
            if st.st_size != entry["bytes"]:
                raise PoolCorrupt(
                    f"pool {name}: part {part_id} is damaged (size {st.st_size} bytes, manifest says {entry['bytes']})"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_part(self, name: str, part_id: str, verify: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of one part. Always checks the file size against the manifest;
        verify=True also checks the sha256. Any mismatch -> PoolCorrupt. A part that a
        concurrent commit dropped after the caller read the manifest -> PoolBusy (reload)."""
        validate_part_id(part_id)
        _, m = self._load_manifest(name, shared=True)
        entry = m["parts"].get(part_id)
        if entry is None:
            seen = self._seen.get(name)
            if seen and part_id in seen[1] and seen[0] != m["version"]:
                # the caller's manifest listed it; a commit since then dropped it
                raise PoolBusy(
                    f"pool {name} changed since it was loaded (version {seen[0]} -> {m['version']}); reload and retry"
                )
            raise PoolError(f"pool {name} has no part {part_id}")
        fd = self._open_part(name, part_id, entry, m["version"])
        try:
            if verify:
                digest, size = _hash_fd(fd)
                if size != entry["bytes"] or digest != entry["sha256"]:
                    raise PoolCorrupt(f"pool {name}: part {part_id} is damaged (sha256 mismatch)")
            from safetensors.torch import load_file

            # Load exactly the file we checked, even if it is unlinked meanwhile.
            proc_path = f"/proc/self/fd/{fd}"
            path = proc_path if os.path.exists(proc_path) else str(self._part_file(name, part_id))
            try:
                return load_file(path)
            except Exception as exc:  # SafetensorError and friends
                if path != proc_path and not os.path.lexists(path):
                    raise self._missing_part(name, part_id, m["version"]) from None
                raise PoolCorrupt(
                    f"pool {name}: part {part_id} is not a readable safetensors file ({_one_line(str(exc))[:120]})"
                ) from None
        finally:
            os.close(fd)

    def verify(self, name: str) -> list[str]:
        """Check the manifest structure and the full sha256 of every part.
        Returns the problems found (empty list = healthy). PoolNotFound if absent."""
        validate_name(name)
        for _attempt in range(3):
            try:
                _, m = self._load_manifest(name)
            except PoolNotFound:
                raise
            except PoolError as exc:
                return [str(exc)]
            problems: list[str] = []
            changed = False
            try:
                parts_dir = self._parts_dir(name)
            except PoolError as exc:
                return [str(exc)]
            for pid, entry in sorted(m["parts"].items()):
                path = parts_dir / f"{pid}{PART_SUFFIX}"
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    if isinstance(self._missing_part(name, pid, m["version"]), PoolBusy):
                        changed = True
                        break
                    problems.append(f"part {pid} is missing")
                    continue
                if stat.S_ISLNK(st.st_mode):
                    problems.append(f"part {pid} is a symbolic link")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    problems.append(f"part {pid} is not a regular file")
                    continue
                if st.st_size != entry["bytes"]:
                    problems.append(f"part {pid} has {st.st_size} bytes, manifest says {entry['bytes']}")
                    continue
                try:
                    digest, _ = _hash_file(path)
                except OSError as exc:
                    problems.append(f"part {pid} cannot be read ({exc.strerror})")
                    continue
                if digest != entry["sha256"]:
                    problems.append(f"part {pid} is damaged (sha256 mismatch)")
                    continue
                bad = _safetensors_header_problem(path, st.st_size)
                if bad:
                    problems.append(f"part {pid}: {bad}")
            if not changed:
                return problems
        raise PoolBusy(f"pool {name} keeps changing while it is being verified; try again later")

    # ----------------------------------------------------------------------- locking

    def _ensure_dir(self, name: str) -> Path:
        """Make sure pools/<name> exists as a real folder. A new one is born complete
        (with parts/ and the .creating marker) by renaming a staged folder into place,
        so a folder without manifest but with .creating is always a creation leftover."""
        p = self._dir(name)
        state = self._dir_state(name)
        if state not in ("absent",):
            if state in ("symlink", "notdir"):
                self._refuse_odd(name, state)
            return p
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        stage = self.root / f"{TMP}{_rand()}"
        os.mkdir(stage, 0o700)
        try:
            os.mkdir(stage / PARTS, 0o700)
            _write_file_durably(stage / CREATING, b"")
            _fsync_dir(stage)
            try:
                os.rename(stage, p)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
                # somebody else created it at the same moment: fine, use theirs
            else:
                _fsync_dir(self.root)
                return p
        finally:
            if stage.exists():
                _rmtree_quiet(stage)
        return p

    def _lock_info(self, fd: int | None, pool_dir: Path) -> tuple[bytes | None, dict | None]:
        try:
            if fd is not None and os.open in os.supports_dir_fd:
                lfd = os.open(LOCK, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=fd)
            else:
                lfd = os.open(pool_dir / LOCK, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        except OSError:
            return b"", None
        try:
            raw = os.read(lfd, 65536)
        finally:
            os.close(lfd)
        try:
            info = json.loads(raw.decode("utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
                info = None
        except (ValueError, UnicodeDecodeError):
            info = None
        return raw, info

    @staticmethod
    def _lock_stale(info: dict | None, raw: bytes, have_flock: bool, lock_mtime: float | None) -> bool:
        if info is None:
            # Empty/garbled: a holder died between creating and filling the file. With
            # flock we know nobody holds the pool; without it, give a writer time to fill it.
            return have_flock or (lock_mtime is not None and time.time() - lock_mtime > 10)
        if info.get("host") != _HOST:
            return False  # cannot check another machine's processes
        boot = info.get("boot_id")
        if boot and _boot_id() and boot != _boot_id():
            return True  # written before a reboot
        pid = info["pid"]
        if pid == os.getpid():
            return have_flock  # not in our table, so no thread of ours holds it
        if not _pid_alive(pid):
            return True
        started = info.get("pid_start")
        now_started = _pid_start_time(pid)
        if started and now_started and started != now_started:
            return True  # pid was reused by another process
        return False

    def _busy_message(self, name: str, info: dict | None) -> str:
        if not info:
            return f"pool {name} is being written by another process; try again later"
        since = ""
        try:
            started = datetime.fromisoformat(str(info.get("started", "")).replace("Z", "+00:00"))
            since = " since " + started.astimezone().strftime("%H:%M")
        except ValueError:
            pass
        host = "" if info.get("host") == _HOST else f" on {info.get('host')}"
        cmd = info.get("command") or "memcli"
        return f"pool {name} is being written by process {info['pid']}{host} ({cmd}){since}; try again later"

    def _lock_payload(self, token: str, purpose: str) -> bytes:
        pid = os.getpid()
        return json.dumps(
            {
                "pid": pid,
                "host": _HOST,
                "started": _now(),
                "command": _command_line(),
                "purpose": purpose,
                "pid_start": _pid_start_time(pid),
                "boot_id": _boot_id(),
                "token": token,
            }
        ).encode()

    def _acquire(self, name: str, wait: bool | float, create: bool, purpose: str = "write") -> _Held:
        validate_name(name)
        key = self._key(name)
        me = threading.get_ident()
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None and held.thread == me:
                held.count += 1
                return held
        if wait is True:
            deadline = None
        elif wait is False or wait is None:
            deadline = time.monotonic()
        else:
            deadline = time.monotonic() + float(wait)
        delay = 0.005
        p = self._dir(name)
        transient = 0
        grace_end = time.monotonic() + _BRIEF_GRACE_S
        while True:
            info: dict | None = None
            with _HELD_GUARD:
                other_thread = key in _HELD
            if other_thread:
                info = self._lock_info(None, p)[1] or {"pid": os.getpid(), "host": _HOST}
            else:
                try:
                    got, info = self._try_lock(name, p, create, key, me, purpose)
                except OSError as exc:
                    if _is_nospace(exc):
                        raise PoolError(
                            f"no space left on device while saving pool {name}; the pool is unchanged"
                        ) from None
                    raise PoolError(f"cannot lock pool {name} ({exc.strerror or exc})") from None
                if got is not None:
                    return got
                if info is _RETRY:
                    info = None
                    transient += 1
                    if transient < 20:
                        continue  # the folder moved under us: look again at once
            if deadline is not None and time.monotonic() >= deadline:
                # cleanup/rename/remove hold a lock for moments only: worth a short wait
                # even when the caller asked not to wait for a (long) writer
                brief = info is None or info.get("purpose") in _BRIEF_PURPOSES
                if not brief or time.monotonic() >= grace_end:
                    raise PoolBusy(self._busy_message(name, info))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def _try_lock(self, name: str, p: Path, create: bool, key, me, purpose: str) -> tuple[_Held | None, dict | None]:
        """One attempt. Returns (held, None) on success, (None, holder info) when busy."""
        if create:
            self._ensure_dir(name)
        else:
            state = self._dir_state(name)
            if state == "absent":
                raise PoolNotFound(f"pool {name} not found")
            if state in ("symlink", "notdir"):
                self._refuse_odd(name, state)
        try:
            fd = os.open(p, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            if create:
                return None, _RETRY  # removed just now
            raise PoolNotFound(f"pool {name} not found") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PoolCorrupt(f"pool {name} is a symbolic link; refusing") from None
            raise
        ok = False
        have_flock = False
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    have_flock = True
                except BlockingIOError:
                    return None, self._lock_info(fd, p)[1]
                except OSError:
                    have_flock = False  # filesystem without flock: the .lock file alone
            # still the folder we think it is? (not renamed/removed while we waited)
            try:
                st_now = os.lstat(p)
            except FileNotFoundError:
                return None, _RETRY
            st_fd = os.fstat(fd)
            if (st_now.st_ino, st_now.st_dev) != (st_fd.st_ino, st_fd.st_dev):
                return None, _RETRY
            token = secrets.token_hex(8)
            payload = self._lock_payload(token, purpose)
            try:
                lfd = os.open(LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=fd)
            except FileExistsError:
                raw, info = self._lock_info(fd, p)
                if raw is None:
                    return None, _RETRY  # released just now
                try:
                    mtime = os.stat(LOCK, dir_fd=fd, follow_symlinks=False).st_mtime
                except OSError:
                    mtime = None
                if not self._lock_stale(info, raw, have_flock, mtime):
                    return None, info
                # stale: take it over atomically (fresh lock renamed over the old one,
                # after checking it is still the same stale lock)
                tmp = f"{TMP}lock-{_rand()}"
                tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=fd)
                try:
                    _write_all(tfd, payload)
                except BaseException:
                    os.close(tfd)
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=fd)
                    raise
                os.close(tfd)
                raw2, _ = self._lock_info(fd, p)
                if raw2 != raw:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=fd)
                    return None, _RETRY
                os.replace(tmp, LOCK, src_dir_fd=fd, dst_dir_fd=fd)
            else:
                try:
                    _write_all(lfd, payload)
                except BaseException:
                    os.close(lfd)
                    with contextlib.suppress(OSError):
                        os.unlink(LOCK, dir_fd=fd)
                    raise
                os.close(lfd)
            held = _Held(fd=fd, count=1, thread=me, token=token)
            with _HELD_GUARD:
                _HELD[key] = held
            ok = True
            return held, None
        except OSError:
            # could not write a lock (disk full...): a folder made just for this
            # attempt goes again, while the flock still keeps everybody else out
            if create and have_flock:
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.lstat(p), os.fstat(fd)) and self._dir_state(name) == "leftover":
                        self._remove_dir(p)
            raise
        finally:
            if not ok:
                if fcntl is not None:
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _release(self, name: str, held: _Held) -> None:
        key = self._key(name)
        with _HELD_GUARD:
            held.count -= 1
            if held.count > 0:
                return
            _HELD.pop(key, None)
        fd = held.fd
        try:
            try:
                os.stat(MANIFEST, dir_fd=fd, follow_symlinks=False)
                has_manifest = True
            except OSError:
                has_manifest = False
            if not has_manifest:
                # A folder that never got a manifest (creation failed or nothing was
                # committed) disappears together with its lock.
                p = self._dir(name)
                try:
                    same = os.path.samestat(os.lstat(p), os.fstat(fd))
                except OSError:
                    same = False
                if same and self._dir_state(name) == "leftover":
                    try:
                        self._remove_dir(p)
                        return
                    except OSError:
                        pass
            raw, info = self._lock_info(fd, self._dir(name))
            if info is not None and info.get("token") == held.token:
                with contextlib.suppress(OSError):
                    os.unlink(LOCK, dir_fd=fd)
        finally:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, name: str, wait: bool | float = False, create: bool = True, purpose: str = "write"):
        held = self._acquire(name, wait, create, purpose)
        try:
            yield held
        finally:
            self._release(name, held)

    def writer(self, name: str, wait: bool | float = False):
        """Exclusive writer lock on pool `name` (re-entrant within a thread of this process).

        wait=False: raise PoolBusy at once if somebody else holds it; a number: poll up to
        that many seconds; True: wait as long as it takes. Readers never lock.
        Taking it on a pool that does not exist yet is allowed (to create it with commit);
        if nothing gets committed, the empty folder is removed again on exit.
        """
        validate_name(name)
        return self._locked(name, wait, create=True)

    def _holds(self, name: str) -> bool:
        with _HELD_GUARD:
            held = _HELD.get(self._key(name))
            return held is not None and held.thread == threading.get_ident()

    # ----------------------------------------------------------------------- writing

    def _remove_dir(self, p: Path) -> None:
        """Make a folder disappear atomically (rename to .tmp-rm-*), then delete it."""
        trash = self.root / f"{TMP}rm-{_rand()}"
        os.rename(p, trash)
        _fsync_dir(self.root)
        _rmtree_quiet(trash)

    def _write_part(self, parts_dir: Path, tensors: dict[str, torch.Tensor], temps: list[Path]) -> tuple[Path, str, int]:
        tmp = parts_dir / f"{TMP}{_rand()}"
        fd = _create_file(tmp)
        temps.append(tmp)
        h = hashlib.sha256()
        size = 0
        try:
            for chunk in safetensors_chunks(tensors):
                h.update(chunk)
                _write_all(fd, chunk)
                size += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp, h.hexdigest(), size

    def commit(
        self,
        name: str,
        meta: dict,
        part_ids: list[str],
        new_parts: dict[str, dict[str, torch.Tensor]],
        expect_version: int | None,
    ) -> dict:
        """Save a new version of pool `name` and return its manifest.

        The new version references exactly `part_ids`; `new_parts` holds the content of
        parts that may not be on disk yet. Parts are immutable: a part already in the
        pool is not rewritten. `expect_version` is the version the caller loaded; None
        or 0 means "create a new pool" (PoolExists if it exists). A different current
        version raises PoolBusy. Takes the writer lock unless this thread holds it.
        """
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
            _check_tensors(pid, tensors)
        if not isinstance(meta, dict):
            raise PoolError(f"commit to pool {name}: meta must be a dict")
        try:
            meta_copy = json.loads(json.dumps(meta, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise PoolError(f"commit to pool {name}: meta is not JSON-serialisable ({exc})") from None
        if expect_version is not None and (
            not isinstance(expect_version, int) or isinstance(expect_version, bool) or expect_version < 0
        ):
            raise PoolError(f"commit to pool {name}: expect_version must be None or an int >= 0")

        with self._locked(name, wait=False, create=True):
            return self._commit_locked(name, meta_copy, part_ids, new_parts, expect_version)

    def _commit_locked(self, name, meta, part_ids, new_parts, expect_version) -> dict:
        pool_dir = self._dir(name)
        state = self._dir_state(name)
        self._refuse_odd(name, state)
        old: dict | None = None
        if state == "ok":
            _, old = self._load_manifest(name)
            if not expect_version:
                raise PoolExists(f"pool {name} already exists")
            if old["version"] != expect_version:
                raise PoolBusy(
                    f"pool {name} changed since it was loaded (version {expect_version} -> {old['version']}); reload and retry"
                )
        elif expect_version:
            raise PoolNotFound(f"pool {name} not found (it was expected at version {expect_version})")

        temps: list[Path] = []
        placed: list[Path] = []  # new part files renamed into place by this commit
        made_marker = False
        try:
            if old is None and not os.path.lexists(pool_dir / CREATING):
                # an empty leftover folder: mark it so a crash leaves it recognisable
                _write_file_durably(pool_dir / CREATING, b"")
                _fsync_dir(pool_dir)
                made_marker = True
            parts_dir = self._parts_dir(name)
            if not parts_dir.exists():
                os.mkdir(parts_dir, 0o700)
                _fsync_dir(pool_dir)
            old_parts = old["parts"] if old else {}
            entries: dict[str, dict] = {}
            for pid in part_ids:
                target = parts_dir / f"{pid}{PART_SUFFIX}"
                on_disk = os.path.lexists(target)
                if on_disk and os.path.islink(target):
                    raise PoolCorrupt(f"pool {name}: part {pid} is a symbolic link; refusing")
                if pid in old_parts and on_disk:
                    # immutable and already referenced: reuse (cheap size check)
                    size = os.lstat(target).st_size
                    if size != old_parts[pid]["bytes"]:
                        raise PoolCorrupt(
                            f"pool {name}: part {pid} is damaged (size {size} bytes, manifest says {old_parts[pid]['bytes']})"
                        )
                    entries[pid] = dict(old_parts[pid])
                elif pid in new_parts:
                    # new, or an unreferenced leftover of a crashed commit: write it afresh
                    tmp, digest, size = self._write_part(parts_dir, new_parts[pid], temps)
                    os.replace(tmp, target)
                    temps.remove(tmp)
                    placed.append(target)
                    entries[pid] = {"sha256": digest, "bytes": size}
                elif on_disk:
                    digest, size = _hash_file(target)  # unreferenced but complete file
                    entries[pid] = {"sha256": digest, "bytes": size}
                elif pid in old_parts:
                    raise PoolCorrupt(f"pool {name}: part {pid} is missing")
                else:
                    raise PoolError(f"commit to pool {name}: part {pid} is neither new nor in the pool")
            if placed:
                _fsync_dir(parts_dir)
            now = _now()
            manifest = {
                "format_version": FORMAT_VERSION,
                "name": name,
                "version": (old["version"] + 1) if old else 1,
                "created": old["created"] if old else now,
                "updated": now,
                "parts": entries,
                "meta": meta,
            }
            self._replace_manifest(pool_dir, manifest)
        except BaseException as exc:
            for tmp in temps:
                _unlink_quiet(tmp)
            for target in placed:
                _unlink_quiet(target)
            if made_marker:
                _unlink_quiet(pool_dir / CREATING)
            error = _as_pool_error(exc, f"saving pool {name}", f"save pool {name}", "the pool is unchanged")
            if error is not None:
                raise error from None
            raise
        # Committed: from here on nothing may be undone. Make the rename durable, then tidy
        # up (a crash while tidying is repaired by cleanup()).
        try:
            _fsync_dir(pool_dir)
        except OSError as exc:
            raise PoolError(
                f"pool {name} was saved as version {manifest['version']} but flushing it to disk failed ({exc.strerror or exc})"
            ) from None
        with contextlib.suppress(OSError):
            if os.path.lexists(pool_dir / CREATING):
                os.unlink(pool_dir / CREATING)
                _fsync_dir(pool_dir)
        self._drop_unreferenced(pool_dir, manifest)
        return copy.deepcopy(manifest)

    def _drop_unreferenced(self, pool_dir: Path, manifest: dict) -> list[str]:
        removed = []
        parts_dir = pool_dir / PARTS
        try:
            names = os.listdir(parts_dir)
        except OSError:
            return removed
        for fname in names:
            path = parts_dir / fname
            if fname.startswith(TMP):
                _unlink_quiet(path)
                removed.append(str(path))
            elif fname.endswith(PART_SUFFIX) and fname[: -len(PART_SUFFIX)] not in manifest["parts"]:
                if not os.path.isdir(path) or os.path.islink(path):
                    _unlink_quiet(path)
                    removed.append(str(path))
        return removed

    # ------------------------------------------------------------ fork/rename/remove

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
            return
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno not in (
                errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
                errno.ENOSYS, errno.EACCES, errno.EINVAL,
            ):
                raise
        # No hard links here (another device, FAT, too many links): reflink, else copy.
        sfd = os.open(src, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
        try:
            dfd = _create_file(dst)
            try:
                cloned = False
                if fcntl is not None and sys.platform.startswith("linux"):
                    try:
                        fcntl.ioctl(dfd, _FICLONE, sfd)
                        cloned = True
                    except OSError:
                        cloned = False
                if not cloned:
                    while True:
                        data = os.read(sfd, _CHUNK)
                        if not data:
                            break
                        _write_all(dfd, data)
                os.fsync(dfd)
            except BaseException:
                os.close(dfd)
                _unlink_quiet(dst)
                raise
            os.close(dfd)
        finally:
            os.close(sfd)

    def fork(self, src: str, dst: str) -> PoolInfo:
        """Make pool `dst` a copy of the current version of `src`, in O(#parts) metadata
        operations: every part is hard-linked (copied only where links are impossible)."""
        validate_name(src)
        validate_name(dst)
        if src == dst:
            raise PoolExists(f"pool {dst} already exists")
        if self.exists(dst):
            raise PoolExists(f"pool {dst} already exists")
        for _attempt in range(20):
            src_dir, m = self._load_manifest(src)
            src_parts = self._parts_dir(src)
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            stage = self.root / f"{TMP}{_rand()}"
            try:
                os.mkdir(stage, 0o700)
                os.mkdir(stage / PARTS, 0o700)
                try:
                    for pid, entry in m["parts"].items():
                        srcf = src_parts / f"{pid}{PART_SUFFIX}"
                        st = os.lstat(srcf)
                        if not stat.S_ISREG(st.st_mode):
                            raise PoolCorrupt(f"pool {src}: part {pid} is not a regular file; refusing")
                        if st.st_size != entry["bytes"]:
                            raise PoolCorrupt(f"pool {src}: part {pid} is damaged (size {st.st_size} bytes, manifest says {entry['bytes']})")
                        self._link_or_copy(srcf, stage / PARTS / f"{pid}{PART_SUFFIX}")
                except FileNotFoundError:
                    # a commit to src replaced that part meanwhile: start over from its new manifest
                    err = self._missing_part(src, pid, m["version"])
                    if isinstance(err, PoolBusy):
                        _rmtree_quiet(stage)
                        continue
                    raise err from None
                _fsync_dir(stage / PARTS)
                now = _now()
                meta = copy.deepcopy(m["meta"])
                meta["forked_from"] = {"name": src, "version": m["version"]}
                manifest = {
                    "format_version": FORMAT_VERSION,
                    "name": dst,
                    "version": 1,
                    "created": now,
                    "updated": now,
                    "parts": copy.deepcopy(m["parts"]),
                    "meta": meta,
                }
                self._write_manifest(stage, manifest)
                _fsync_dir(stage)
                try:
                    os.rename(stage, self._dir(dst))
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                        raise PoolExists(f"pool {dst} already exists") from None
                    raise
            except BaseException as exc:
                _rmtree_quiet(stage)
                error = _as_pool_error(exc, f"forking pool {src} to {dst}", f"fork pool {src} to {dst}",
                                       "nothing was created")
                if error is not None:
                    raise error from None
                raise
            try:
                _fsync_dir(self.root)
            except OSError as exc:
                raise PoolError(f"pool {dst} was created but flushing it to disk failed ({exc.strerror or exc})") from None
            return self.info(dst)
        raise PoolBusy(f"pool {src} keeps changing while it is being forked; try again later")

    def rename(self, old: str, new: str) -> None:
        """Rename pool `old` to `new`. Refused while `old` is being written or if `new` exists."""
        validate_name(old)
        validate_name(new)
        if old == new:
            raise PoolExists(f"pool {new} already exists")
        self._load_manifest(old)  # exists, readable, not a symlink
        if self.exists(new):
            raise PoolExists(f"pool {new} already exists")
        if self._holds(old):
            raise PoolBusy(f"pool {old} is being written by this process; finish writing before renaming it")
        with self._locked(old, wait=False, create=False, purpose="rename"):
            _, m = self._load_manifest(old)
            try:
                os.rename(self._dir(old), self._dir(new))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise PoolExists(f"pool {new} already exists") from None
                raise PoolError(f"could not rename pool {old} to {new} ({exc.strerror})") from None
            _fsync_dir(self.root)
            # the folder name is authoritative; this only keeps the manifest tidy
            m["name"] = new
            try:
                self._write_manifest(self._dir(new), m)
            except OSError:
                pass  # read_manifest reports the folder name anyway; cleanup() fixes it

    def remove(self, name: str) -> None:
        """Delete a pool. Refused (PoolBusy) while somebody is writing it."""
        validate_name(name)
        state = self._dir_state(name)
        if state in ("absent", "leftover"):
            raise PoolNotFound(f"pool {name} not found")
        p = self._dir(name)
        if state == "symlink":
            os.unlink(p)  # only the link; never what it points to
            return
        if state == "notdir":
            raise PoolCorrupt(f"pool {name} is not a folder; refusing")
        if self._holds(name):
            raise PoolBusy(f"pool {name} is being written by this process; finish writing before removing it")
        trash = None
        with self._locked(name, wait=False, create=False, purpose="remove"):
            trash = self.root / f"{TMP}rm-{_rand()}"
            try:
                os.rename(p, trash)
            except OSError as exc:
                raise PoolError(f"could not remove pool {name} ({exc.strerror})") from None
            _fsync_dir(self.root)
        _rmtree_quiet(trash)

    # ----------------------------------------------------------------- export/import

    def export(self, name: str, file: Path) -> None:
        """Write pool `name` as one uncompressed tar (manifest.json + parts/*), streamed,
        to `file`.tmp then renamed to `file`. Parts are hash-checked on the way out."""
        file = Path(file)
        tmp = file.with_name(file.name + ".tmp")
        for _attempt in range(20):
            _, m = self._load_manifest(name)
            parts_dir = self._parts_dir(name)
            # open every part first: once open, a concurrent commit cannot take it away
            handles = {}
            try:
                try:
                    for pid in m["parts"]:
                        handles[pid] = open(
                            os.open(parts_dir / f"{pid}{PART_SUFFIX}", os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY),
                            "rb",
                        )
                except FileNotFoundError:
                    err = self._missing_part(name, pid, m["version"])
                    if isinstance(err, PoolBusy):
                        continue
                    raise err from None
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise PoolCorrupt(f"pool {name}: part {pid} is a symbolic link; refusing") from None
                    raise PoolError(f"cannot read pool {name} ({exc.strerror})") from None
                self._write_export(name, m, handles, file, tmp)
                return
            finally:
                for f in handles.values():
                    f.close()
        raise PoolBusy(f"pool {name} keeps changing while it is being exported; try again later")

    def _write_export(self, name: str, m: dict, handles: dict, file: Path, tmp: Path) -> None:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY, 0o600)
            with io.BufferedWriter(_FdWriter(fd), buffer_size=_CHUNK) as out:
                mtime = int(time.time())
                with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.copybufsize = _CHUNK

                    def info(arcname: str, size: int) -> tarfile.TarInfo:
                        ti = tarfile.TarInfo(arcname)
                        ti.size, ti.mode, ti.mtime = size, 0o644, mtime
                        ti.type = tarfile.REGTYPE
                        return ti

                    data = self._manifest_bytes(m)
                    tar.addfile(info(MANIFEST, len(data)), io.BytesIO(data))
                    for pid, entry in m["parts"].items():
                        f = handles[pid]
                        size = os.fstat(f.fileno()).st_size
                        if size != entry["bytes"]:
                            raise PoolCorrupt(
                                f"pool {name}: part {pid} is damaged (size {size} bytes, manifest says {entry['bytes']}); not exported"
                            )
                        reader = _HashingReader(f)
                        tar.addfile(info(f"{PARTS}/{pid}{PART_SUFFIX}", size), reader)
                        if reader.sha.hexdigest() != entry["sha256"]:
                            raise PoolCorrupt(f"pool {name}: part {pid} is damaged (sha256 mismatch); not exported")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, file)
            _fsync_dir(file.parent)
        except BaseException as exc:
            _unlink_quiet(tmp)
            error = _as_pool_error(exc, f"exporting pool {name} to {file}", f"export pool {name} to {file}")
            if error is not None:
                raise error from None
            raise

    def import_(self, file: Path, name: str | None = None) -> PoolInfo:
        """Create a pool from an export file. Every member is checked (only manifest.json
        and parts/<id>.safetensors, regular files, sizes as the manifest says) and every
        part's sha256 verified before the pool appears, atomically, under its name."""
        file = Path(file)
        if name is not None:
            validate_name(name)
            if self.exists(name):
                raise PoolExists(f"pool {name} already exists")
        where = f"{file.name}"
        try:
            fh = open(file, "rb")
        except FileNotFoundError:
            raise PoolError(f"{file} not found") from None
        except OSError as exc:
            raise PoolError(f"cannot read {file} ({exc.strerror})") from None
        stage: Path | None = None
        try:
            try:
                tar = tarfile.open(fileobj=fh, mode="r|")
            except (tarfile.TarError, EOFError):
                raise PoolCorrupt(f"{where} is not a memcli pool export (not a tar archive)") from None
            with tar:
                members = iter(tar)
                try:
                    first = next(members, None)
                except (tarfile.TarError, EOFError):
                    raise PoolCorrupt(f"{where} is not a memcli pool export (unreadable tar)") from None
                if first is None or first.name != MANIFEST:
                    raise PoolCorrupt(
                        f"{where} is not a memcli pool export (first entry is {first.name if first else 'nothing'!r:.60}, expected manifest.json)"
                    )
                if not first.isreg() or first.size > _MAX_MANIFEST_BYTES:
                    raise PoolCorrupt(f"{where}: manifest.json is not a plausible regular file")
                try:
                    raw = tar.extractfile(first).read()  # type: ignore[union-attr]
                    m = json.loads(raw.decode("utf-8"))
                except (tarfile.TarError, EOFError, OSError):
                    raise PoolCorrupt(f"{where} is truncated") from None
                except (ValueError, UnicodeDecodeError):
                    raise PoolCorrupt(f"{where}: manifest.json is not valid JSON") from None
                self._check_manifest("", m, where=where)
                target = name if name is not None else m["name"]
                try:
                    validate_name(target)
                except InvalidPoolName as exc:
                    raise PoolCorrupt(f"{where}: {exc}") from None
                if self.exists(target):
                    raise PoolExists(f"pool {target} already exists")
                need = sum(e["bytes"] for e in m["parts"].values())
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                with contextlib.suppress(OSError):
                    free = shutil.disk_usage(self.root).free
                    if need > free:
                        raise PoolError(
                            f"not enough space to import {where}: it needs {need} bytes, {free} are free"
                        )
                stage = self.root / f"{TMP}{_rand()}"
                os.mkdir(stage, 0o700)
                os.mkdir(stage / PARTS, 0o700)
                seen: set[str] = set()
                while True:
                    try:
                        member = next(members, None)
                    except (tarfile.TarError, EOFError, OSError):
                        raise PoolCorrupt(f"{where} is truncated or damaged") from None
                    if member is None:
                        break
                    mname = member.name
                    if mname.startswith("/") or ".." in mname.split("/") or "\\" in mname:
                        raise PoolCorrupt(f"{where} has an unsafe entry {mname!r:.80}; refusing")
                    match = _TAR_PART_RE.fullmatch(mname)
                    if not match:
                        raise PoolCorrupt(f"{where} has an unexpected entry {mname!r:.80}; refusing")
                    if not member.isreg():
                        raise PoolCorrupt(f"{where}: entry {mname!r:.80} is not a regular file; refusing")
                    pid = match.group(1)
                    entry = m["parts"].get(pid)
                    if entry is None:
                        raise PoolCorrupt(f"{where}: part {pid} is not in its manifest; refusing")
                    if pid in seen:
                        raise PoolCorrupt(f"{where}: part {pid} appears twice; refusing")
                    if member.size != entry["bytes"]:
                        raise PoolCorrupt(f"{where}: part {pid} has {member.size} bytes, manifest says {entry['bytes']}")
                    seen.add(pid)
                    src = tar.extractfile(member)
                    dst = stage / PARTS / f"{pid}{PART_SUFFIX}"
                    fd = _create_file(dst)
                    h = hashlib.sha256()
                    got = 0
                    try:
                        while True:
                            try:
                                chunk = src.read(_CHUNK)  # type: ignore[union-attr]
                            except (tarfile.TarError, EOFError, OSError) as exc:
                                if _is_nospace(exc):
                                    raise
                                raise PoolCorrupt(f"{where} is truncated or damaged") from None
                            if not chunk:
                                break
                            h.update(chunk)
                            got += len(chunk)
                            _write_all(fd, chunk)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    if got != entry["bytes"] or h.hexdigest() != entry["sha256"]:
                        raise PoolCorrupt(f"{where}: part {pid} is damaged (sha256 mismatch); refusing")
                missing = sorted(set(m["parts"]) - seen)
                if missing:
                    raise PoolCorrupt(f"{where} is incomplete: part {missing[0]} is missing")
            _fsync_dir(stage / PARTS)
            m["name"] = target
            self._write_manifest(stage, m)
            _fsync_dir(stage)
            try:
                os.rename(stage, self._dir(target))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise PoolExists(f"pool {target} already exists") from None
                raise
            stage = None  # it is the pool now
        except BaseException as exc:
            if stage is not None:
                _rmtree_quiet(stage)
            error = _as_pool_error(exc, f"importing {where}", f"import {where}", "nothing was created")
            if error is not None:
                raise error from None
            raise
        finally:
            fh.close()
        try:
            _fsync_dir(self.root)
        except OSError as exc:
            raise PoolError(f"pool {target} was imported but flushing it to disk failed ({exc.strerror or exc})") from None
        return self.info(target)

    # ----------------------------------------------------------------------- cleanup

    def cleanup(self) -> list[str]:
        """Remove leftovers of interrupted work: <root>/.tmp-* of dead processes,
        temp files inside pools, part files no manifest references, folders of pool
        creations that never committed, and stale locks. Pools that a live process is
        writing are skipped. Returns what was removed/fixed (paths or short notes)."""
        done: list[str] = []
        try:
            entries = sorted(os.listdir(self.root))
        except OSError:
            return done
        for entry in entries:
            path = self.root / entry
            if entry.startswith(TMP):
                if self._tmp_owner_alive(entry):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    _rmtree_quiet(path)
                else:
                    _unlink_quiet(path)
                done.append(str(path))
                continue
            if entry.startswith(".") or not _NAME_RE.fullmatch(entry):
                continue
            if self._dir_state(entry) in ("symlink", "notdir", "absent"):
                continue
            if not self._needs_cleanup(entry):
                continue  # nothing to do: do not even take the lock (it would disturb writers)
            try:
                with self._locked(entry, wait=False, create=False, purpose="cleanup"):
                    done.extend(self._cleanup_pool(entry))
            except PoolError:
                continue  # busy (live writer) or not ours to judge
            if self._dir_state(entry) == "absent":
                done.append(f"{path} (unfinished pool creation)")
        return done

    @staticmethod
    def _tmp_owner_alive(entry: str) -> bool:
        rest = entry[len(TMP):]
        if rest.startswith("rm-"):
            return False  # a removal: always safe to finish
        for prefix in ("manifest-", "lock-"):
            if rest.startswith(prefix):
                rest = rest[len(prefix):]
        pid_text = rest.split("-", 1)[0]
        if not pid_text.isdigit():
            return False
        pid = int(pid_text)
        # this process's own temp folders may be in use by another of its threads
        return pid == os.getpid() or _pid_alive(pid)

    def _needs_cleanup(self, name: str) -> bool:
        """Lock-free look: does this pool folder hold anything cleanup() would remove or fix?"""
        pool_dir = self._dir(name)
        try:
            names = os.listdir(pool_dir)
        except OSError:
            return False
        if any(n.startswith(TMP) or n in (LOCK, CREATING) for n in names) or MANIFEST not in names:
            return True
        try:
            _, m = self._load_manifest(name, shared=True)
            with open(pool_dir / MANIFEST, "rb") as f:
                if json.loads(f.read()).get("name") != name:
                    return True
            parts = os.listdir(pool_dir / PARTS)
        except (PoolError, OSError, ValueError):
            return False  # damaged or changing: nothing cleanup may touch / next time
        for fname in parts:
            if fname.startswith(TMP):
                return True
            if fname.endswith(PART_SUFFIX) and fname[: -len(PART_SUFFIX)] not in m["parts"]:
                return True
        return False

    def _cleanup_pool(self, name: str) -> list[str]:
        done = []
        pool_dir = self._dir(name)
        try:
            names = os.listdir(pool_dir)
        except OSError:
            return done
        for fname in names:
            if fname.startswith(TMP):
                _unlink_quiet(pool_dir / fname)
                done.append(str(pool_dir / fname))
        state = self._dir_state(name)
        if state != "ok":
            if state == "leftover":
                # parts/.tmp-* too; the folder itself goes when the lock is released
                with contextlib.suppress(OSError):
                    for fname in os.listdir(pool_dir / PARTS):
                        if fname.startswith(TMP):
                            _unlink_quiet(pool_dir / PARTS / fname)
            return done
        try:
            _, m = self._load_manifest(name)
        except PoolError:
            return done  # damaged: never delete anything of it
        with contextlib.suppress(OSError):
            if os.path.lexists(pool_dir / CREATING):
                os.unlink(pool_dir / CREATING)
                done.append(str(pool_dir / CREATING))
        done.extend(self._drop_unreferenced(pool_dir, m))
        try:
            with open(pool_dir / MANIFEST, "rb") as f:
                on_disk_name = json.loads(f.read()).get("name")
        except (OSError, ValueError):
            on_disk_name = name
        if on_disk_name != name:
            with contextlib.suppress(OSError):
                self._write_manifest(pool_dir, m)
                done.append(f"{pool_dir / MANIFEST} (name fixed after an interrupted rename)")
        return done

