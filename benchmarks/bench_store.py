"""Benchmark the pool store: what creating, forking, committing and `pool info` cost.

Floors (what an ideal implementation cannot beat, and what memcli.store should hit):
  * create: a pool of a model whose initial memory the store already holds writes its
            manifest (and the few-KB state of its drop generator), not the memory: parts are
            content-addressed and the initial memory is one object per store. It does not hash
            the memory either: the store finds its object by the memory's content key
            (MemoryState.initial_key). Timed beside the old way (no key: the memory is hashed
            to find its object); floor: the manifest write, timed as a manifest-only commit.
  * fork:   one small manifest (a new folder renamed into place); no part is copied or linked.
  * commit: bytes of the new parts + the manifest; parts the new version shares with the old
            are never rewritten, so a 67 MB patch to a 1 GB pool writes ~67 MB.
  * pool info: reads manifests, the log and the per-row origin tables, never the memory rows:
            its time on a 1 GB pool should be within 1.5x of a tiny pool's. The old way (load
            the whole state to count origins) is timed beside it.
  * first open: every part's bytes are checked against their sha256 the first time a process
            reads that file (loading hashes them in the same pass that reads them), then never
            again for the same file identity. Timed side by side: a load that checks (the cache of
            checked files emptied first: a process's first open) and one that does not (the files
            remembered: what a warm server pays, and what loading cost before the check), and the
            same for fork (which hashes without loading). Floor of the difference: sha256 of the
            pool's bytes (`hash_only_s`, the same bytes hashed alone). The files are in the page
            cache in every run: this is CPU, not disk.

Usage:  python benchmarks/bench_store.py [--root DIR] [--keep] [--small] [--only-first-open]
Prints one JSON object (--out FILE also writes it). The pools of the pool benchmarks have the
shapes of the medium test model (benchmarks/make_checkpoint.py --medium: 32 layers x 12,800
rows x width 1024, fp32 = 1.68 GB of memory); --small shrinks them to 1/16 for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from memcli.pools import pool as pools  # noqa: E402
from memcli.pools import meta as pool_meta  # noqa: E402
from memcli.core.state import MemoryState, new_generator  # noqa: E402
from memcli.pools.meta import PoolStore  # noqa: E402
from memcli.store import safetensors as store_safetensors  # noqa: E402
from memcli.base.durable import new_hash  # noqa: E402
from report import emit  # noqa: E402

MiB = 1 << 20
PATCH_BYTES = 67 * MiB


def proc_io() -> dict[str, int]:
    """Bytes this process passed to write() (wchar) and sent to storage (write_bytes)."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def written(fn) -> tuple[float, int]:
    io0, t0 = proc_io(), time.perf_counter()
    fn()
    seconds, io1 = time.perf_counter() - t0, proc_io()
    return seconds, (io1.get("wchar", 0) - io0.get("wchar", 0))


def objects(store: PoolStore) -> dict[str, int]:
    folder = store.root / ".objects"
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.exists() else {}


def memory_state(layers: int, rows: int, width: int, seed: int, keyed: bool = True) -> MemoryState:
    """A checkpoint-like initial state (same memory for every seed, as a model's is), with the
    content key loading.initial_state gives a checkpoint's memory (keyed=False: none)."""
    slots = torch.arange(layers * rows * width, dtype=torch.float32).remainder_(4093).view(layers, rows, width)
    key = new_hash()
    key.update(f"bench_store memory {layers}x{rows}x{width} float32".encode())
    return MemoryState(slots=slots, order=torch.arange(rows).repeat(layers, 1), initialized=True,
                       origin=torch.full((layers, rows), -1, dtype=torch.int64), generator=new_generator(seed),
                       initial_key=key.hexdigest() if keyed else None)


class Streamed:
    """Counts the bytes of parts the store produces (to hash, to write or both): the memory's
    1.68 GB appear here whenever the store hashes it."""

    def __init__(self):
        self.bytes = 0
        self._real = store_safetensors.safetensors_chunks

    def __enter__(self):
        def counted(tensors):
            for chunk in self._real(tensors):
                self.bytes += len(chunk)
                yield chunk

        store_safetensors.safetensors_chunks = counted
        return self

    def __exit__(self, *exc):
        store_safetensors.safetensors_chunks = self._real


def fill(store: PoolStore, pool: pools.Pool, sources: int, k: int) -> None:
    """`sources` injected files of one chunk each: k rows per layer rewritten per chunk."""
    state = pool.state
    for i in range(sources):
        slots = torch.arange(i * k, (i + 1) * k).remainder_(state.num_rows).repeat(state.num_layers, 1)
        state.slots[torch.arange(state.num_layers)[:, None], slots] = float(i)
        state.origin[torch.arange(state.num_layers)[:, None], slots] = i
        state.mark_dirty(slots)
        pool.sources.append({"path": f"doc-{i}.txt", "sha256": "%064x" % i, "first_chunk": i, "chunks": 1,
                             "tokens": 512, "complete": True})
        pool.next_chunk += 1
    with store.writer(pool.name):
        pools.save(store, pool)


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def create_pool(store: PoolStore, name: str, binding, state: MemoryState) -> dict:
    """Time pools.create of `state` (built beforehand: a checkpoint read is not the store's cost)."""
    before = objects(store)
    with Streamed() as streamed:
        seconds, nbytes = written(lambda: pools.create(store, name, binding, state))
    new = {k: v for k, v in objects(store).items() if k not in before}
    return {"seconds": round(seconds, 3), "bytes_written": nbytes, "bytes_hashed_or_written": streamed.bytes,
            "new_part_bytes": sum(new.values()), "manifest_bytes": (store.root / name / "manifest.json").stat().st_size}


def manifest_only_commit(store: PoolStore, name: str) -> dict:
    """The floor of a new pool: a commit that writes a manifest naming parts the store holds."""
    m = store.read_manifest(name)
    seconds, nbytes = written(lambda: store.commit(name, m["meta"], list(m["parts"]), {}, m["version"]))
    return {"seconds": round(seconds, 4), "bytes_written": nbytes,
            "manifest_bytes": (store.root / name / "manifest.json").stat().st_size}


def bench_pools(store: PoolStore, layers: int, rows: int, width: int) -> dict:
    binding = pool_meta.Binding("medium-test-model", "memoryllm", "0" * 16, num_tokens=256)
    first = create_pool(store, "first", binding, memory_state(layers, rows, width, 1))
    # a second pool, the old way and the new way in one run: without the memory's content key
    # (the store hashes the memory to find its object) and with it; own seeds, so that each
    # writes its own generator part
    probe = create_pool(store, "second-by-hash", binding, memory_state(layers, rows, width, 2, keyed=False))
    keyed = create_pool(store, "second", binding, memory_state(layers, rows, width, 3))
    floor = manifest_only_commit(store, "second-by-hash")
    create = {
        "memory_bytes": layers * rows * width * 4,
        "first_pool": {"seconds": first["seconds"], "bytes_written": first["bytes_written"],
                       "bytes_hashed_or_written": first["bytes_hashed_or_written"]},
        "second_pool": keyed,
        "second_pool_old_way_hashing_the_memory": probe,
        "speedup": round(probe["seconds"] / keyed["seconds"], 1) if keyed["seconds"] else None,
        "floor": {"what": "a manifest-only commit (the manifest write)", **floor},
        "floor_bytes": keyed["manifest_bytes"],
    }
    fork_s, fork_bytes = written(lambda: store.fork("first", "fork"))
    fork = {"seconds": round(fork_s, 4), "bytes_written": fork_bytes,
            "manifest_bytes": (store.root / "fork" / "manifest.json").stat().st_size}

    big = pools.load(store, "first")
    fill(store, big, 40, 256)  # 40 x 256 rows per layer: under N, so a patch (no new base)
    tiny = pools.create(store, "tiny", pool_meta.Binding("tiny-test-model", "memoryllm", "1" * 16, num_tokens=4),
                        memory_state(2, 64, 32, 3))
    fill(store, tiny, 50, 4)
    info = {
        "big_pool_bytes": store.info("first").bytes_on_disk,
        "tiny_pool_bytes": store.info("tiny").bytes_on_disk,
        "big_s": round(timed(lambda: pool_meta.pool_info(store, "first")), 4),
        "tiny_s": round(timed(lambda: pool_meta.pool_info(store, "tiny")), 4),
        "old_way_big_s": round(timed(lambda: pools.retention(pools.load(store, "first")), repeat=1), 3),
    }
    info["ratio_big_to_tiny"] = round(info["big_s"] / info["tiny_s"], 2)
    # the whole command, as a person runs it (process start and imports included)
    home = store.root.parent.parent
    env = dict(os.environ, MEMCLI_HOME=str(home), PYTHONPATH=str(REPO))

    def cli(name: str) -> None:
        subprocess.run([sys.executable, "-m", "memcli", "pool", "info", name, "--json"], env=env, check=True,
                       stdout=subprocess.DEVNULL)

    info["cli_big_s"] = round(timed(lambda: cli("first"), repeat=3), 3)
    info["cli_tiny_s"] = round(timed(lambda: cli("tiny"), repeat=3), 3)
    info["cli_ratio_big_to_tiny"] = round(info["cli_big_s"] / info["cli_tiny_s"], 2)
    info["target_ratio"] = 1.5
    assert pool_meta.pool_info(store, "first")["retention"] == pools.retention(pools.load(store, "first"))
    return {"create": create, "fork": fork, "pool_info": info}


def bench_first_open(store: PoolStore, repeat: int = 3) -> dict:
    """Load and fork of the big pool, its parts checked on first open vs remembered (docstring)."""
    from memcli.store import integrity
    from memcli.base.durable import hash_fd

    m = store.read_manifest("first")
    part_bytes = sum(e["bytes"] for e in m["parts"].values())
    pools.load(store, "first")  # page cache filled, every file remembered

    def load_checked() -> None:
        integrity.forget()
        pools.load(store, "first")

    forks = iter(range(10_000))

    def fork(checked: bool):
        def run() -> None:
            if checked:
                integrity.forget()
            store.fork("first", f"fork-{next(forks)}")
        return run

    def hash_only() -> None:
        for entry in m["parts"].values():
            fd = os.open(store.root / ".objects" / entry["sha256"], os.O_RDONLY)
            try:
                hash_fd(fd)
            finally:
                os.close(fd)

    out = {
        "pool_part_bytes": part_bytes,
        "load_first_open_checked_s": round(timed(load_checked, repeat), 3),
        "load_not_checked_s": round(timed(lambda: pools.load(store, "first"), repeat), 3),
        "fork_first_open_checked_s": round(timed(fork(True), repeat), 3),
        "fork_not_checked_s": round(timed(fork(False), repeat), 4),
        "hash_only_s": round(timed(hash_only, repeat), 3),
    }
    extra = out["load_first_open_checked_s"] - out["load_not_checked_s"]
    out["load_extra_s"] = round(extra, 3)
    out["load_ratio"] = round(out["load_first_open_checked_s"] / out["load_not_checked_s"], 2)
    out["sha256_GB_per_s"] = round(part_bytes / out["hash_only_s"] / 1e9, 2)
    return out


def bench_commit_patch(store: PoolStore) -> dict:
    m = store.read_manifest("first")
    rows = torch.arange(PATCH_BYTES // 4, dtype=torch.int32)
    before = objects(store)
    seconds, nbytes = written(lambda: store.commit(
        "first", m["meta"], [*m["parts"], "patch-x"], {"patch-x": {"rows": rows}}, m["version"]))
    new = {k: v for k, v in objects(store).items() if k not in before}
    return {"pool_bytes_before": sum(e["bytes"] for e in m["parts"].values()), "patch_part_bytes": sum(new.values()),
            "manifest_bytes": (store.root / "first" / "manifest.json").stat().st_size,
            "seconds": round(seconds, 3), "bytes_written": nbytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="where to create the pools (default: a temp folder in .bench/)")
    ap.add_argument("--keep", action="store_true", help="keep the pools afterwards")
    ap.add_argument("--small", action="store_true", help="1/16 of the medium model's memory (a quick look)")
    ap.add_argument("--machine", default="", help="words naming the machine, kept in the JSON")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--only-first-open", action="store_true", help="only the first-open check (one pool, load and fork)")
    args = ap.parse_args(argv)
    layers, rows, width = (32, 12_800, 1024) if not args.small else (8, 3_200, 1024)
    base = args.root or REPO / ".bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="store-", dir=base))
    store = PoolStore(work / "home" / "data" / "pools")  # MEMCLI_HOME=work/home for the CLI runs
    need = 2 * layers * rows * width * 4 + PATCH_BYTES + 512 * MiB
    store.root.mkdir(parents=True)
    if shutil.disk_usage(work).free < need:
        print(json.dumps({"skipped": f"needs {need} bytes free in {work}"}))
        return 1
    result: dict = {"machine": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "shape": [layers, rows, width]}
    try:
        if args.only_first_open:
            binding = pool_meta.Binding("medium-test-model", "memoryllm", "0" * 16, num_tokens=256)
            pools.create(store, "first", binding, memory_state(layers, rows, width, 1))
            fill(store, pools.load(store, "first"), 40, 256)  # a base and a patch, as in bench_pools
            result["first_open"] = bench_first_open(store)
        else:
            result.update(bench_pools(store, layers, rows, width))
            result["first_open"] = bench_first_open(store)
            result["commit_67MB_patch"] = bench_commit_patch(store)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
