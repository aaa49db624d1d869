"""Benchmark the pool store: fork cost and commit write amplification.

Floors (what an ideal implementation cannot beat, and what memcli.store should hit):
  * fork:   O(#parts) metadata operations -- two mkdirs, one hard link per part, one small
            manifest (write + fsync), a rename and a few directory fsyncs. Independent of the
            pool's size in bytes; the only new disk bytes are the fork's manifest.
  * commit: bytes of the new parts + the manifest (+ a ~300-byte lock file). Parts the new
            version shares with the old one are never rewritten, so adding a 67 MB patch to
            a 1 GB pool writes ~67 MB, not 1 GB.

Usage:  python benchmarks/bench_store.py [--max-gb 1] [--root DIR] [--keep]
Prints one JSON object. Pools are single-part (one big tensor filled with a cheap
repeating pattern, not random: generating random gigabytes would dominate the run).
The >= 1 GiB case runs by default when the disk has room (checked with shutil.disk_usage);
--max-gb 0.1 limits the largest pool, --max-gb 0 keeps only the small cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from memcli.store import PoolStore  # noqa: E402

MiB = 1 << 20
PATCH_BYTES = 67 * MiB


def pattern_tensor(nbytes: int) -> torch.Tensor:
    """nbytes of a cheap, non-constant pattern (int32 0..4095 repeated)."""
    n = nbytes // 4
    t = torch.empty(n, dtype=torch.int32)
    row = torch.arange(4096, dtype=torch.int32)
    full = n // 4096 * 4096
    if full:
        t[:full].view(-1, 4096).copy_(row.expand(full // 4096, 4096))
    t[full:] = row[: n - full]
    return t


def proc_io() -> dict[str, int]:
    """Bytes this process passed to write() (wchar) and sent to storage (write_bytes)."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def tree_files(path: Path) -> list[os.stat_result]:
    return [os.lstat(p) for p in path.rglob("*") if p.is_file()]


def extra_bytes(src: Path, dst: Path) -> dict[str, int]:
    """Disk cost of dst beyond src: files whose inode src does not share."""
    shared = {(s.st_dev, s.st_ino) for s in tree_files(src)}
    new = [s for s in tree_files(dst) if (s.st_dev, s.st_ino) not in shared]
    return {
        "new_files": len(new),
        "new_file_bytes": sum(s.st_size for s in new),
        "new_disk_bytes": sum(getattr(s, "st_blocks", 0) * 512 for s in new),
    }


def bench_size(store: PoolStore, label: str, nbytes: int) -> dict:
    t = pattern_tensor(nbytes)
    t0 = time.perf_counter()
    store.commit(f"src-{label}", {"bench": label}, ["base"], {"base": {"slots": t}}, None)
    create_s = time.perf_counter() - t0
    del t
    t0 = time.perf_counter()
    store.fork(f"src-{label}", f"fork-{label}")
    fork_s = time.perf_counter() - t0
    extra = extra_bytes(store.root / f"src-{label}", store.root / f"fork-{label}")
    return {
        "pool_bytes": store.info(f"src-{label}").bytes_on_disk,
        "create_s": round(create_s, 4),
        "create_MBps": round(nbytes / MiB / create_s, 1),
        "fork_s": round(fork_s, 5),
        "fork_extra": extra,
    }


def bench_commit_patch(store: PoolStore, label: str) -> dict:
    name = f"src-{label}"
    m = store.read_manifest(name)
    patch = {"rows": pattern_tensor(PATCH_BYTES), "index": torch.arange(1024)}
    parts_before = {p.name for p in (store.root / name / "parts").iterdir()}
    io0 = proc_io()
    t0 = time.perf_counter()
    store.commit(name, {**m["meta"], "patched": True}, [*m["parts"], "patch-1"], {"patch-1": patch}, m["version"])
    commit_s = time.perf_counter() - t0
    io1 = proc_io()
    new_parts = [p for p in (store.root / name / "parts").iterdir() if p.name not in parts_before]
    out = {
        "pool": name,
        "pool_bytes_before": sum(e["bytes"] for e in m["parts"].values()),
        "patch_part_bytes": sum(p.stat().st_size for p in new_parts),
        "manifest_bytes": (store.root / name / "manifest.json").stat().st_size,
        "commit_s": round(commit_s, 4),
    }
    if io0:
        out["write_syscall_bytes"] = io1["wchar"] - io0["wchar"]
        out["storage_write_bytes"] = io1["write_bytes"] - io0["write_bytes"]
    t0 = time.perf_counter()
    problems = store.verify(name)
    out["verify_s"] = round(time.perf_counter() - t0, 3)
    out["verify_ok"] = problems == []
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-gb", type=float, default=1.0, help="largest pool in GiB (default 1; 0 = small cases only)")
    ap.add_argument("--root", type=Path, default=None, help="where to create the pools (default: a temp folder in .bench/)")
    ap.add_argument("--keep", action="store_true", help="keep the pools afterwards")
    args = ap.parse_args(argv)

    base = args.root or REPO / ".bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="store-", dir=base))
    store = PoolStore(work / "pools")
    sizes = [("3MB", 3 * MiB), ("100MB", 100 * MiB)]
    big = int(args.max_gb * 1024) * MiB
    result: dict = {"root": str(work), "platform": platform.platform(), "torch": torch.__version__, "sizes": {}}
    skipped = {}
    if big > 100 * MiB:
        free = shutil.disk_usage(work).free
        need = big + PATCH_BYTES + 512 * MiB  # the pool, the patch, a margin (forks add ~0)
        if free >= need:
            sizes.append((f"{big / (1024 * MiB):g}GB", big))
        else:
            skipped[f"{args.max_gb:g}GB"] = f"needs {need} bytes free, {free} available"
    result["skipped"] = skipped
    try:
        for label, nbytes in sizes:
            result["sizes"][label] = bench_size(store, label, nbytes)
        result["commit_67MB_patch"] = bench_commit_patch(store, sizes[-1][0])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
