"""Snapshot reads: one manifest version and exactly the part files it names, held open.

A snapshot opens the pool folder, its manifest and every part it needs while holding the
store gate shared (so no garbage collection runs in between), then lets the gate go: open
file descriptors keep their files readable whatever commits, renames or removals happen
afterwards. A reader therefore never sees a mix of versions and never needs a retry loop.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import safetensors as st
from .durable import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, open_regular, read_fd
from .errors import PoolCorrupt, PoolError, PoolNotFound, safe_text
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, check_manifest, parse_json

LOG = "log.jsonl"
PARTS_V1 = "parts"
OBJECTS = ".objects"
CONTENT_KEYS = ".content-keys"  # hints: a caller's content key -> the object holding that content (core.py)
PART_SUFFIX = ".safetensors"
MAX_LOG_RECORD_BYTES = 1 << 20


def open_pool_dir(root: Path, name: str) -> int:
    try:
        return os.open(root / name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        raise PoolNotFound(f"pool {name} not found") from None
    except OSError as exc:
        if os.path.islink(root / name):
            raise PoolCorrupt(f"pool {name} is a symbolic link; refusing") from None
        if not os.path.isdir(root / name):
            raise PoolCorrupt(f"pool {name} is not a folder; refusing") from None
        raise PoolError(f"cannot read pool {name} ({exc.strerror})") from None


def read_manifest_at(dir_fd: int, name: str) -> dict:
    """Read, parse and check the manifest of the pool folder open as `dir_fd`."""
    what = f"pool {name}"
    try:
        fd = open_regular(MANIFEST, f"{what}: manifest.json", MAX_MANIFEST_BYTES, dir_fd=dir_fd)
    except FileNotFoundError:
        raise PoolCorrupt(f"{what} has no manifest.json (damaged); refusing") from None
    try:
        raw = read_fd(fd, MAX_MANIFEST_BYTES)
    finally:
        os.close(fd)
    m = check_manifest(parse_json(raw, f"{what}: manifest.json"), what)
    m["name"] = name  # the folder name is authoritative (renames do not rewrite the manifest)
    return m


def part_path(root: Path, name: str, m: dict, part_id: str) -> Path:
    if m["format_version"] == 1:
        return root / name / PARTS_V1 / f"{part_id}{PART_SUFFIX}"
    return root / OBJECTS / m["parts"][part_id]["sha256"]


def open_part(root: Path, name: str, m: dict, part_id: str) -> int:
    """Open one part of manifest `m` (regular file, size as the manifest says)."""
    entry = m["parts"][part_id]
    what = f"pool {name}: part {part_id}"
    try:
        fd = open_regular(part_path(root, name, m, part_id), what)
    except FileNotFoundError:
        raise PoolCorrupt(f"{what} is missing") from None
    size = os.fstat(fd).st_size
    if size != entry["bytes"]:
        os.close(fd)
        raise PoolCorrupt(f"{what} is damaged (size {size} bytes, manifest says {entry['bytes']})")
    return fd


def parse_log(raw: bytes, what: str, expect_records: int) -> list[dict]:
    """The records of a committed log prefix: one JSON object per line, each bounded."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif raw:
        raise PoolCorrupt(f"{what}: log.jsonl's committed part does not end with a full line")
    if len(lines) != expect_records:
        raise PoolCorrupt(f"{what}: log.jsonl has {len(lines)} records, the manifest says {expect_records}")
    records = []
    for i, line in enumerate(lines, 1):
        if len(line) > MAX_LOG_RECORD_BYTES:
            raise PoolCorrupt(f"{what}: log.jsonl record {i} is implausibly large")
        rec = parse_json(line, f"{what}: log.jsonl record {i}", max_depth=8)
        if not isinstance(rec, dict):
            raise PoolCorrupt(f"{what}: log.jsonl record {i} is not a JSON object")
        records.append(rec)
    return records


class Snapshot:
    """One committed version of a pool, its files held open. Use as a context manager."""

    def __init__(self, root: Path, name: str, part_ids=None):
        self.root, self.name = root, name
        self._fds: dict[str, int] = {}
        self._log_fd: int | None = None
        dir_fd = open_pool_dir(root, name)
        try:
            self.manifest = read_manifest_at(dir_fd, name)
            wanted = self.manifest["parts"] if part_ids is None else part_ids
            for pid in wanted:
                if pid not in self.manifest["parts"]:
                    raise PoolError(f"pool {name} has no part {safe_text(pid)[:80]}")
                self._fds[pid] = open_part(root, name, self.manifest, pid)
            log = self.manifest.get("log") or {"bytes": 0}
            if log["bytes"]:
                try:
                    fd = os.open(LOG, os.O_RDONLY | O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC, dir_fd=dir_fd)
                except FileNotFoundError:
                    raise PoolCorrupt(f"pool {name}: log.jsonl is missing") from None
                except OSError as exc:
                    raise PoolCorrupt(f"pool {name}: log.jsonl cannot be opened ({exc.strerror})") from None
                self._log_fd = fd
                st_ = os.fstat(fd)
                if not stat.S_ISREG(st_.st_mode):
                    raise PoolCorrupt(f"pool {name}: log.jsonl is not a regular file; refusing")
                if st_.st_size < log["bytes"]:
                    raise PoolCorrupt(f"pool {name}: log.jsonl is shorter than its manifest says")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(dir_fd)

    @property
    def version(self) -> int:
        return self.manifest["version"]

    def size(self, part_id: str) -> int:
        return self.manifest["parts"][part_id]["bytes"]

    def fd(self, part_id: str) -> int:
        if part_id not in self._fds:
            raise PoolError(f"pool {self.name}: part {safe_text(part_id)[:80]} is not in this snapshot")
        return self._fds[part_id]

    def read(self, part_id: str, names=None) -> dict:
        """The tensors of one part (torch), or only those in `names`."""
        try:
            return st.read_tensors(self.fd(part_id), self.size(part_id), names)
        except st.HeaderError as exc:
            raise PoolCorrupt(f"pool {self.name}: part {part_id} is not a readable safetensors file ({exc})") from None

    def read_raw(self, part_id: str, tensor: str) -> tuple[str, list[int], bytes]:
        """One tensor as (dtype code, shape, bytes), without torch."""
        try:
            return st.read_raw(self.fd(part_id), self.size(part_id), tensor)
        except st.HeaderError as exc:
            raise PoolCorrupt(f"pool {self.name}: part {part_id}: {exc}") from None

    def log_records(self) -> list[dict]:
        log = self.manifest.get("log") or {"bytes": 0, "records": 0}
        if not log["bytes"]:
            if log.get("records"):
                raise PoolCorrupt(f"pool {self.name}: log.jsonl is empty but the manifest lists records")
            return []
        raw = read_fd(self._log_fd, log["bytes"])
        return parse_log(raw, f"pool {self.name}", log["records"])

    def log_bytes(self) -> bytes:
        log = self.manifest.get("log") or {"bytes": 0}
        return read_fd(self._log_fd, log["bytes"]) if log["bytes"] else b""

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
