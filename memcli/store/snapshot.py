"""Snapshot reads: one manifest version and exactly the part files it names, held open.

A snapshot opens the pool folder, its manifest and every part it needs while holding the
store gate shared (so no garbage collection runs in between), then lets the gate go: open
file descriptors keep their files readable whatever commits, renames or removals happen
afterwards. A reader therefore never sees a mix of versions and never needs a retry loop.

Parts are opened relative to their folder's descriptor (.objects, or a format-1 pool's parts/),
opened without following links (folders.py). Their bytes are checked against their sha256 the
first time this process reads that file (integrity.py). The log is streamed, each record bounded
while it streams (`LogReader`): a committed 1 GiB line is refused after reading 1 MiB of it.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from memcli.base.durable import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, new_hash, read_fd
from memcli.base.text import one_line

from . import integrity
from . import safetensors as st
from .errors import PoolCorrupt, PoolError, PoolNotFound, note, repair_hint
from .files import open_regular
from .folders import ancestor_problem, open_dir
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, check_manifest, parse_json

LOG = "log.jsonl"
PARTS_V1 = "parts"
OBJECTS = ".objects"
CONTENT_KEYS = ".content-keys"  # hints: a caller's content key -> the object holding that content (core.py)
PART_SUFFIX = ".safetensors"
MAX_LOG_RECORD_BYTES = 1 << 20
LOG_READ_BYTES = 1 << 20  # the log is streamed in pieces of this size


def open_pool_dir(root: Path, name: str) -> int:
    try:
        return os.open(root / name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        raise PoolNotFound(f"pool {name} not found") from None
    except OSError as exc:
        if os.path.islink(root / name):
            raise PoolCorrupt(f"pool {name} is a symbolic link; refusing") from None
        problem = ancestor_problem(root)
        if problem is not None:
            raise problem from None
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


def part_file_name(m: dict, part_id: str) -> str:
    """The part's file name inside its folder (part_folder)."""
    return f"{part_id}{PART_SUFFIX}" if m["format_version"] == 1 else m["parts"][part_id]["sha256"]


def part_folder(root: Path, name: str, m: dict, pool_fd: int | None = None) -> int | None:
    """A descriptor of the folder holding manifest `m`'s parts (None: it does not exist)."""
    if m["format_version"] == 1:
        own = open_pool_dir(root, name) if pool_fd is None else pool_fd
        try:
            return open_dir(root / name, PARTS_V1, dir_fd=own)
        finally:
            if pool_fd is None:
                os.close(own)
    return open_dir(root, OBJECTS)


def open_part_at(folder_fd: int | None, name: str, m: dict, part_id: str) -> int:
    """Open one part of manifest `m` in its folder (regular file, size as the manifest says)."""
    entry = m["parts"][part_id]
    what = f"pool {name}: part {part_id}"
    if folder_fd is None:
        raise PoolCorrupt(f"{what} is missing; {repair_hint(name)}")
    try:
        fd = open_regular(part_file_name(m, part_id), what, dir_fd=folder_fd)
    except FileNotFoundError:
        raise PoolCorrupt(f"{what} is missing; {repair_hint(name)}") from None
    except PoolCorrupt as exc:  # a link, a FIFO, a folder... in place of the part
        raise PoolCorrupt(f"{exc}; {repair_hint(name)}") from None
    size = os.fstat(fd).st_size
    if size != entry["bytes"]:
        os.close(fd)
        raise PoolCorrupt(f"{what} is damaged (size {size} bytes, manifest says {entry['bytes']}); {repair_hint(name)}")
    return fd


def open_part(root: Path, name: str, m: dict, part_id: str) -> int:
    """Open one part of manifest `m` (regular file, size as the manifest says)."""
    folder = part_folder(root, name, m)
    try:
        return open_part_at(folder, name, m, part_id)
    finally:
        if folder is not None:
            os.close(folder)


def damaged(root: Path, name: str, part_id: str, sha256: str, fd: int) -> PoolCorrupt:
    """The one line of a part whose bytes do not match its name (recorded for pool ls)."""
    integrity.record_damage(root, sha256, os.fstat(fd))
    return PoolCorrupt(f"pool {name}: part {part_id} is damaged (sha256 mismatch); {repair_hint(name)}")


# ------------------------------------------------------------------------------ the log


class LogReader:
    """The record lines of a committed log prefix, streamed.

    `read(n)` returns the next at most n bytes of the log (b"" at its end); `total` and
    `expect_records` are the committed extent the manifest names. Iterating yields each record's
    line (newline included), each bounded while it streams: a line longer than
    MAX_LOG_RECORD_BYTES is refused once that much of it was read, never read whole. Plausibility
    is checked before reading (no record can be longer than the bound).

    A prefix that ends inside its last record (the file shorter than committed, or no final
    newline: an interrupted append) yields the complete records before it when exactly that last
    one is torn (`torn` is then True, `bytes`/`records` are what is whole); anything else is
    PoolCorrupt. torn_ok=False refuses a torn record too (an archive must be whole)."""

    def __init__(self, read, total: int, what: str, expect_records: int, torn_ok: bool = True):
        self.read, self.total, self.what, self.expect = read, total, what, expect_records
        self.torn_ok = torn_ok
        self.bytes = self.records = 0
        self.torn = False
        if expect_records > total or total > expect_records * (MAX_LOG_RECORD_BYTES + 1):
            raise PoolCorrupt(f"{what}: log.jsonl's committed part ({total} bytes) cannot hold its "
                              f"{expect_records} records (at most {MAX_LOG_RECORD_BYTES} bytes each)")

    def __iter__(self):
        buf = bytearray()
        got = 0
        limit = MAX_LOG_RECORD_BYTES + 1  # a record and its newline
        while got < self.total:
            data = self.read(min(LOG_READ_BYTES, self.total - got))
            if not data:
                break
            got += len(data)
            start = 0
            while start < len(data):
                nl = data.find(b"\n", start)
                end = len(data) if nl < 0 else nl + 1
                if len(buf) + end - start > limit:
                    raise PoolCorrupt(f"{self.what}: log.jsonl record {self.records + 1} is implausibly large "
                                      f"(over {MAX_LOG_RECORD_BYTES} bytes)")
                buf += data[start:end]
                start = end
                if nl >= 0:
                    if self.records == self.expect:
                        raise PoolCorrupt(f"{self.what}: log.jsonl has more records than the manifest says "
                                          f"({self.expect})")
                    line = bytes(buf)
                    buf.clear()
                    self.records += 1
                    self.bytes += len(line)
                    yield line
        if got == self.total and not buf and self.records == self.expect:
            return
        if self.torn_ok and self.records == self.expect - 1:
            self.torn = True
            return
        if got < self.total:
            raise PoolCorrupt(f"{self.what}: log.jsonl is shorter than its manifest says")
        if buf:
            raise PoolCorrupt(f"{self.what}: log.jsonl's committed part does not end with a full line")
        raise PoolCorrupt(f"{self.what}: log.jsonl has {self.records} records, the manifest says {self.expect}")


def parse_record(line: bytes, what: str, number: int) -> dict:
    """One log record (its line, newline included or not): a bounded JSON object."""
    rec = parse_json(line.rstrip(b"\n"), f"{what}: log.jsonl record {number}", max_depth=8)
    if not isinstance(rec, dict):
        raise PoolCorrupt(f"{what}: log.jsonl record {number} is not a JSON object")
    return rec


def fd_stream(fd: int, offset: int = 0):
    """A read(n) over an open file from `offset` (pread: the fd's own offset is untouched)."""
    pos = [offset]

    def read(n: int) -> bytes:
        data = os.pread(fd, n, pos[0])
        pos[0] += len(data)
        return data

    return read


def parse_log(raw: bytes, what: str, expect_records: int) -> list[dict]:
    """The records of a whole committed log prefix held in memory (no torn record allowed)."""
    reader = LogReader(io.BytesIO(raw).read, len(raw), what, expect_records, torn_ok=False)
    return [parse_record(line, what, i) for i, line in enumerate(reader, 1)]


class Snapshot:
    """One committed version of a pool, its files held open. Use as a context manager."""

    def __init__(self, root: Path, name: str, part_ids=None):
        self.root, self.name = root, name
        self._fds: dict[str, int] = {}
        self.log_fd: int | None = None  # log.jsonl, held open (an export streams its checked prefix from it)
        self.log_extent: dict | None = None  # the whole part of the log, once read (log_records)
        folder = None
        dir_fd = open_pool_dir(root, name)
        try:
            self.manifest = read_manifest_at(dir_fd, name)
            if callable(part_ids):  # chosen from this very manifest (no race with a commit)
                part_ids = list(part_ids(self.manifest))
            wanted = self.manifest["parts"] if part_ids is None else part_ids
            for pid in wanted:
                if pid not in self.manifest["parts"]:
                    raise PoolError(f"pool {name} has no part {one_line(pid, 80)}")
            if wanted:
                folder = part_folder(root, name, self.manifest, dir_fd)
            for pid in wanted:
                self._fds[pid] = open_part_at(folder, name, self.manifest, pid)
            log = self.manifest.get("log") or {"bytes": 0}
            if log["bytes"]:
                try:
                    fd = os.open(LOG, os.O_RDONLY | O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC, dir_fd=dir_fd)
                except FileNotFoundError:
                    raise PoolCorrupt(f"pool {name}: log.jsonl is missing") from None
                except OSError as exc:
                    raise PoolCorrupt(f"pool {name}: log.jsonl cannot be opened ({exc.strerror})") from None
                self.log_fd = fd
                st_ = os.fstat(fd)
                if not stat.S_ISREG(st_.st_mode):
                    raise PoolCorrupt(f"pool {name}: log.jsonl is not a regular file; refusing")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(dir_fd)
            if folder is not None:
                os.close(folder)

    @property
    def version(self) -> int:
        return self.manifest["version"]

    def size(self, part_id: str) -> int:
        return self.manifest["parts"][part_id]["bytes"]

    def fd(self, part_id: str) -> int:
        if part_id not in self._fds:
            raise PoolError(f"pool {self.name}: part {one_line(part_id, 80)} is not in this snapshot")
        return self._fds[part_id]

    def verify(self, part_id: str, recheck: bool = False) -> None:
        """Check one part's bytes against its sha256 (once per process per file identity);
        PoolCorrupt naming the pool, the part and `pool verify --repair` when they differ."""
        fd, sha = self.fd(part_id), self.manifest["parts"][part_id]["sha256"]
        if not integrity.verify_fd(fd, sha, recheck):
            raise damaged(self.root, self.name, part_id, sha, fd)

    def read(self, part_id: str, names=None, recheck: bool = False) -> dict:
        """The tensors of one part (torch), or only those in `names`, its bytes checked against
        its sha256 in the same pass (unless this process checked this very file already)."""
        fd, sha = self.fd(part_id), self.manifest["parts"][part_id]["sha256"]
        before = os.fstat(fd)
        digest = None if not recheck and integrity.known_good(before, sha) else new_hash()
        try:
            tensors = st.read_tensors(fd, self.size(part_id), names, digest)
        except st.HeaderError as exc:
            if not integrity.verify_fd(fd, sha):
                raise damaged(self.root, self.name, part_id, sha, fd) from None
            raise PoolCorrupt(f"pool {self.name}: part {part_id} is not a readable safetensors file ({exc}); "
                              f"{repair_hint(self.name)}") from None
        if digest is not None:
            if digest.hexdigest() != sha:
                raise damaged(self.root, self.name, part_id, sha, fd)
            integrity.remember(before, os.fstat(fd), sha)
        return tensors

    def read_raw(self, part_id: str, tensor: str) -> tuple[str, list[int], bytes]:
        """One tensor as (dtype code, shape, bytes), without torch (the part checked first)."""
        self.verify(part_id)
        try:
            return st.read_raw(self.fd(part_id), self.size(part_id), tensor)
        except st.HeaderError as exc:
            raise PoolCorrupt(f"pool {self.name}: part {part_id}: {exc}") from None

    def log_reader(self) -> LogReader | None:
        """A LogReader over the committed log (None: the pool has no log)."""
        log = self.manifest.get("log") or {"bytes": 0, "records": 0}
        if not log["bytes"]:
            if log.get("records"):
                raise PoolCorrupt(f"pool {self.name}: log.jsonl is empty but the manifest lists records")
            return None
        return LogReader(fd_stream(self.log_fd), log["bytes"], f"pool {self.name}", log["records"])

    def log_records(self, copy_to=None, quiet: bool = False) -> list[dict]:
        """The committed log's records, streamed and bounded (a torn last record is left out, with
        one line on stderr unless quiet); `copy_to(line)` is given each whole record's line as it
        is read. Sets `log_extent` to the whole part's {bytes, records}."""
        reader = self.log_reader()
        if reader is None:
            self.log_extent = {"bytes": 0, "records": 0}
            return []
        records = []
        for i, line in enumerate(reader, 1):
            records.append(parse_record(line, f"pool {self.name}", i))
            if copy_to is not None:
                copy_to(line)
        if reader.torn and not quiet:
            note(f"pool {self.name}: log.jsonl ends inside its last record (an interrupted append); that record "
                 f"is left out, and the next write of the pool cuts it off")
        self.log_extent = {"bytes": reader.bytes, "records": reader.records}
        return records

    def log_bytes(self) -> bytes:
        """The whole part of the committed log (checked: log_records)."""
        chunks: list[bytes] = []
        self.log_records(chunks.append)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
