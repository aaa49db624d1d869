"""Pool benchmark: bytes written per inject (STM and, for M+, LTM), and save/load times.

    python benchmarks/bench_pool.py                 # medium 8b and M+ shapes (width 1024, real row counts), CPU
    python benchmarks/bench_pool.py --dtype bf16    # the bytes a GPU session (bf16 state) writes

Floor: an inject changes K rows per layer. STM: K x L x d x bytes (+ K x L slot indices);
M+ LTM: the same K dropped rows with their selector keys (K x L x (d + s)), plus small tables
(order, provenance, ages: L x N x 8 B each) that are rewritten per save. For memoryllm-8b in bf16
that is 67 MB of rows; a whole-pool rewrite would be 3.4 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_checkpoint import config_like, make_checkpoint  # noqa: E402

from memcli.pools import pool as pools  # noqa: E402
from memcli.core.engine import Engine  # noqa: E402
from memcli.loading.checkpoints import initial_state, load_model  # noqa: E402
from memcli.pools.meta import Binding, PoolStore  # noqa: E402

BENCH_DIR = REPO / ".bench"


def part_sizes(store: PoolStore, name: str) -> dict[str, int]:
    return {pid: entry["bytes"] for pid, entry in store.read_manifest(name)["parts"].items()}


def run(like: str, dtype: torch.dtype, injects: int) -> dict:
    folder = BENCH_DIR / f"{like}-medium"
    if not (folder / "config.json").exists():
        make_checkpoint(folder, config_like(like, medium=True))
    model, reader = load_model(folder)
    cfg = model.cfg
    engine = Engine(model)
    with tempfile.TemporaryDirectory() as root:
        store = PoolStore(Path(root))
        state = initial_state(reader, cfg, dtype=dtype, seed=0)
        binding = Binding(str(folder), cfg.family, cfg.fingerprint())
        started = time.perf_counter()
        pool = pools.create(store, "bench", binding, state)
        create_seconds = time.perf_counter() - started
        initial_bytes = sum(part_sizes(store, "bench").values())
        per_inject = []
        ids = torch.randint(0, 32000, (1, 512))
        for step in range(injects):
            engine.update(state, engine.inject(state, ids + step), origin=step)
            before = part_sizes(store, "bench")
            started = time.perf_counter()
            with store.writer("bench"):
                pools.save(store, pool)
            seconds = time.perf_counter() - started
            after = part_sizes(store, "bench")
            new = {pid: size for pid, size in after.items() if pid not in before}
            kinds = {}
            for pid, size in new.items():
                kind = pid.split("-")[0] + "-" + pid.split("-")[1]
                kinds[kind] = kinds.get(kind, 0) + size
            per_inject.append({"seconds": round(seconds, 4), "bytes_by_part": kinds, "bytes": sum(new.values())})
        started = time.perf_counter()
        pools.load(store, "bench", binding)
        load_seconds = time.perf_counter() - started
    row_bytes = torch.finfo(dtype).bits // 8
    return {
        "model": like,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "memory_rows": cfg.memory_rows,
        "state_dtype": str(dtype).replace("torch.", ""),
        "pool_bytes_after_create": initial_bytes,
        "create_seconds": round(create_seconds, 3),
        "floor_rows_bytes_per_inject": cfg.num_tokens * cfg.num_layers * cfg.hidden_size * row_bytes,
        "per_inject": per_inject,
        "load_seconds": round(load_seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--injects", type=int, default=3)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    results = [run(like, dtype, args.injects) for like in ("memoryllm-8b", "mplus-8b")]
    print(json.dumps({"benchmark": "pool", "device": "cpu", "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
