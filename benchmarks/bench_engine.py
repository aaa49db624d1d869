"""Engine benchmark: prints one JSON object (device, versions, timings, memory, floors).

    python benchmarks/bench_engine.py --scale fixture              # tiny fixture model, CPU, seconds
    python benchmarks/bench_engine.py --scale medium               # width 1024, real 12,800-row memory
    python benchmarks/bench_engine.py --scale real --layers 2      # memoryllm-8b shapes, 2 layers (CPU)
    python benchmarks/bench_engine.py --scale real --device cuda --quant nf4 \
        --out benchmarks/results/$(date +%F)-h100-nf4.json        # all 32 layers on a GPU
    python benchmarks/bench_engine.py --scale medium --compare-main --machine "CPU, shared 2-core" \
        --out benchmarks/results/cpu-medium-0.1-vs-new.json      # version 0.1 and this tree, one run
    python benchmarks/bench_engine.py --scale medium --inject-ask --machine "CPU, shared 2-core" \
        --out benchmarks/results/cpu-medium-inject-ask.json      # main before issue 17 (b6f0760) and this tree

`--inject-ask` (issue 17) compares this tree with `--main-ref` (default for this mode: b6f0760, main
before issue 17) on what an ask right after an inject costs: the time to first token of the ask
after each inject of `--chunks` chunks against a repeated ask's (medians over `--rounds`), whether
both trees answer bitwise alike, and the host peak of a `--peak-chunks`-chunk inject from a session
that has just read the memory (the new engine keeps the memory K/V through it).

`--compare-main` exports the memcli package of `--main-ref` (default: version 0.1, the code the
engine issues measured; any commit works, e.g. `--main-ref b6f0760`) through git archive as `memcli_main` into a temporary
folder and runs both engines on the same checkpoint and the same inputs: update with and without a
warm memory K/V cache, ask after an update, host-side operator calls per decoded token (torch
profiler), decode tokens/s, and the host peak memory of a 64-chunk inject (each engine in a child
process, peak RSS reset just before the inject through /proc/self/clear_refs).

Floors (written into the JSON as `floor_*`, computed from the config, batch 1, bf16 activations):
  inject  : FLOPs = 2 * active params * (c + K + 1) per chunk (q/o/MLP on c rows, k/v on all rows)
            -> at 990 TFLOP/s (H100 bf16 dense) an 8b 512-token chunk is ~8 TFLOP = 8 ms, 64k tok/s.
  ask TTFT: with memory K/V cached, reading the weights once (4-bit ~4.6 GB incl. 16-bit lm_head) plus
            the memory K/V (1.68 GB bf16) at 3.35 TB/s = ~1.9 ms; compute for a 32-token question is
            ~0.5 TFLOP + attention, < 1 ms.
  decode  : per token the same bytes (weights + memory K/V) = ~1.9 ms at 3.35 TB/s.
  update  : 256 rows x 32 layers x 4096 x 2 B = 67 MB moved (slot table), plus K/V for those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

# as memcli/__init__ does before torch loads libgomp (idle threads sleep; the machine is shared)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_checkpoint import config_like, make_checkpoint  # noqa: E402
from report import emit, versions  # noqa: E402

from memcli.core.engine import Engine  # noqa: E402
from memcli.loading.checkpoints import CheckpointReader, check_plan, initial_state, load_model  # noqa: E402
from memcli.core.config import read_config  # noqa: E402

VERSION_0_1 = "b005f41"  # the last commit of version 0.1 (before the engine/store round 2)
MAIN_BEFORE_ISSUE_17 = "b6f0760"  # main when issue 17 was filed (an inject freed the memory K/V)
FIXTURE = REPO.parent / "shared" / "conformance" / "memoryllm-8b-tiny" / "checkpoint"
BENCH_DIR = REPO / ".bench"
PEAKS = {  # dense bf16 FLOP/s, memory bytes/s
    "H100": (990e12, 3.35e12),
    "H200": (990e12, 4.8e12),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device, fn, repeat=1):
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) / repeat, out


def checkpoint_for(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.scale == "fixture":
        return FIXTURE
    layers = args.layers if args.layers else (None if args.scale == "medium" else 32)
    name = f"{args.scale}-{layers or 'default'}"
    folder = BENCH_DIR / name
    if not (folder / "config.json").exists():
        make_checkpoint(folder, config_like("memoryllm-8b", layers, medium=args.scale == "medium"))
    return folder


def active_params_per_token(cfg) -> int:
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size)


# --------------------------------------------------------------------------- main vs this tree
def _export_main(ref: str = "main") -> Path:
    from report import export_tree

    return export_tree(REPO, ref, "memcli_main")[0]


def _packages(which: str):
    if which == "main":
        from report import baseline_modules

        engine_module, loading_module = baseline_modules("memcli_main")
    else:
        from memcli.core import engine as engine_module
        from memcli.loading import checkpoints as loading_module
    return engine_module, loading_module


def _ops_per_token(engine, state, question, new_tokens: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    def count(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(state, question, n)
        return len(prof.events())

    return (count(new_tokens) - count(1)) / (new_tokens - 1)


def _compare_one(which: str, folder: Path, args) -> dict:
    engine_module, loading = _packages(which)
    model, reader = loading.load_model(folder, device="cpu", dtype=torch.float32)
    cfg = model.cfg
    engine = engine_module.Engine(model)
    gen = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size, 32000)
    chunks = [torch.randint(0, vocab, (1, 512), generator=gen) for _ in range(args.chunks)]
    question = torch.randint(0, vocab, (1, 32), generator=gen)
    base = loading.initial_state(reader, cfg, seed=0)
    deltas = [engine.inject(base, ids) for ids in chunks]
    out: dict = {}

    from statistics import median

    # medians over 2 passes of the chunks' deltas: the shared machine's other jobs make means noisy
    # update without a cache: a state this engine has never read
    cold = base.clone()
    times = []
    for delta in deltas * 2:
        t, _ = timed("cpu", lambda: engine.update(cold, delta))
        times.append(t)
    out["update_no_cache_seconds"] = round(median(times), 5)
    # update with a warm cache: the state was read before each update
    warm = base.clone()
    times, asks, warm_asks = [], [], []
    for delta in deltas * 2:
        engine.logits(warm, question, all_rows=False)
        t, _ = timed("cpu", lambda: engine.update(warm, delta))
        times.append(t)
        t, _ = timed("cpu", lambda: engine.generate(warm, question, 1))
        asks.append(t)
        t, _ = timed("cpu", lambda: engine.generate(warm, question, 1))
        warm_asks.append(t)
    out["update_warm_cache_seconds"] = round(median(times), 5)
    out["warm_over_no_cache"] = round(out["update_warm_cache_seconds"] / out["update_no_cache_seconds"], 2)
    out["ask_ttft_after_update_seconds"] = round(median(asks), 4)
    out["ask_ttft_warm_seconds"] = round(median(warm_asks), 4)
    if which == "new":
        out["rotation"] = _rotation_compare(engine, warm)
    # decode: steady-state per token, after one warm-up answer
    n = args.new_tokens
    engine.generate(warm, question, n)
    first, _ = timed("cpu", lambda: engine.generate(warm, question, 1), repeat=2)
    full, answer = timed("cpu", lambda: engine.generate(warm, question, n), repeat=2)
    out["decode_tokens_per_second"] = round((n - 1) / (full - first), 2)
    out["ops_per_decoded_token"] = _ops_per_token(engine, warm, question, min(n, 9))
    out["greedy_tokens"] = answer.tokens
    if which == "new":
        compiled = engine_module.Engine(model, compile_decode=True)
        t0 = time.perf_counter()
        compiled.generate(warm, question, 2)
        out["compiled_decode_first_answer_seconds"] = round(time.perf_counter() - t0, 1)
        first, _ = timed("cpu", lambda: compiled.generate(warm, question, 1), repeat=2)
        full, canswer = timed("cpu", lambda: compiled.generate(warm, question, n), repeat=2)
        out["compiled_decode_tokens_per_second"] = round((n - 1) / (full - first), 2)
        out["compiled_ops_per_decoded_token"] = _ops_per_token(compiled, warm, question, min(n, 9))
        out["compiled_greedy_tokens_equal"] = canswer.tokens == answer.tokens
    return out


def _rotation_compare(engine, state) -> dict:
    """Re-rotating every memory key (what a read after updates needs): cos/sin recomputed per call
    and applied through temporaries (main) against a gather from the precomputed tables, in place."""
    from memcli.core.model import apply_rotary

    model = engine.model
    engine.logits(state, torch.arange(8)[None] + 5, all_rows=False)
    cache = state.derived()[engine._token]

    def recompute():
        for l, kv in enumerate(cache.kv):
            cos, sin = model.rotary.cos_sin(cache.stm_start + state.slot_positions(l), model.dtype)
            kv.k[0, :, cache.stm_start : cache.prefix_rows] = apply_rotary(cache.raw_k[l], cos, sin)

    out = {}
    with torch.inference_mode():
        reference = [kv.k.clone() for kv in cache.kv]
        for name, fn in (("recompute_and_apply", recompute), ("table_gather_in_place", lambda: cache.rotate(state))):
            fn()
            t, _ = timed("cpu", fn, repeat=5)
            out[f"{name}_seconds"] = round(t, 4)
            out[f"{name}_bitwise_equal"] = all(torch.equal(a, kv.k) for a, kv in zip(reference, cache.kv))
    return out


def _inject_peak_child(which: str, folder: Path, chunks: int, main_root: Path) -> dict:
    """Run in a child process: host peak RSS over a `chunks`-chunk inject, against its bound."""
    import subprocess

    code = f"""
import json, sys, torch
sys.path[:0] = [{str(main_root)!r}, {str(REPO)!r}, {str(REPO / 'benchmarks')!r}]
from bench_engine import _inject_peak
print(json.dumps(_inject_peak({which!r}, {str(folder)!r}, {chunks})))
"""
    # a fixed mmap threshold makes glibc return freed large blocks to the system at once, so the
    # peak RSS counts live memory rather than what the allocator keeps for later
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _warm_up_library(loading, engine_module) -> None:
    """Run the bundled tiny model once (inject, update, ask): the pages of torch's kernels and the
    allocator's arenas that a first forward brings in belong to the process, not to an inject, so
    they are in the baseline the peak is measured from. Nothing of the tiny model stays."""
    import gc

    model, reader = loading.load_model(REPO / "memcli" / "models" / "memcli-tiny", device="cpu", dtype=torch.float32)
    engine = engine_module.Engine(model)
    state = loading.initial_state(reader, model.cfg, seed=0)
    for seed in range(2):
        ids = torch.randint(0, model.cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(seed))
        engine.update(state, engine.inject(state, ids))
    engine.generate(state, torch.arange(8)[None] + 5, 4)
    del model, reader, engine, state
    gc.collect()


def _inject_peak(which: str, folder: str, chunks: int) -> dict:
    """Host peak memory of a `chunks`-chunk inject, against the issue's bound.

    Bound = state (slots + order + origin) + 2 deltas + weights (the distinct storages of the
    model's state_dict); the model's other buffers (cos/sin tables) are reported beside it. Peak =
    VmHWM (the process high-water mark, anonymous and file-backed pages: the fp32 weights are mapped
    from the checkpoint) less VmRSS before loading anything, after the library has run once (the
    bundled tiny model: torch's code pages and arenas are the process's). Each chunk's token ids are
    made when it is injected, as the CLI streams them. The inject starts from a session that has
    just read the memory (a warm memory K/V cache); the high-water mark is reset before the first
    chunk and again after it, so both the whole inject and the steady chunks are shown (the new
    engine releases the cache in its first chunk)."""
    engine_module, loading = _packages(which)
    _warm_up_library(loading, engine_module)
    process_before_load = _status_kib("VmRSS") * 1024  # interpreter + torch, run once; no model
    model, reader = loading.load_model(Path(folder), device="cpu", dtype=torch.float32)
    cfg = model.cfg
    engine = engine_module.Engine(model)
    state = loading.initial_state(reader, cfg, seed=0)
    engine.logits(state, torch.arange(8)[None] + 10, all_rows=False)  # a warm memory K/V cache, as in a session
    weights = _unique_bytes(model.state_dict().values())
    persistent = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    buffers = _unique_bytes(t for t in model.buffers() if t.untyped_storage().data_ptr() not in persistent)
    state_bytes = sum(getattr(state, f).numel() * getattr(state, f).element_size() for f in ("slots", "order", "origin"))
    cache = state.__dict__.get("_derived", {}).get(getattr(engine, "_token", 0)) or getattr(engine, "_prefix", None)
    cache_bytes = sum(t.numel() * t.element_size() for kv in cache.kv for t in (kv.k, kv.v)) + cache.raw_k.numel() * cache.raw_k.element_size() if cache else 0
    del cache
    gen = torch.Generator().manual_seed(1)
    vocab = min(cfg.vocab_size, 32000)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS") * 1024
    delta_bytes = 0
    first_chunk_peak = 0
    for i in range(chunks):
        delta = engine.inject(state, torch.randint(0, vocab, (1, 512), generator=gen))
        delta_bytes = delta.numel() * delta.element_size()
        engine.update(state, delta)
        del delta
        # main keeps a copy of every delta until the next save (`unsaved_patches`); this tree keeps a
        # dirty-slot mask ([L, N] bool). A commit clears either: clear it here for both, as a commit would
        if hasattr(state, "unsaved_patches"):
            patches = len(state.unsaved_patches)
            state.unsaved_patches.clear()
        else:
            patches = 0
            state.dirty = None
        if i == 0:
            first_chunk_peak = _status_kib("VmHWM") * 1024
            Path("/proc/self/clear_refs").write_text("5")
    steady_peak = _status_kib("VmHWM") * 1024
    rest = _status_kib("VmRSS") * 1024
    kept = state.__dict__.get("_derived", {}).get(getattr(engine, "_token", 0))
    kept_bytes = (sum(t.numel() * t.element_size() for kv in kept.kv for t in (kv.k, kv.v))
                  + kept.raw_k.numel() * kept.raw_k.element_size()) if kept is not None and kept.kv is not None else 0
    peak = max(first_chunk_peak, steady_peak)
    bound = state_bytes + 2 * delta_bytes + weights
    return {
        "chunks": chunks,
        "rss_before_inject_bytes": before,
        "peak_rss_during_inject_bytes": peak,
        "growth_during_inject_bytes": peak - before,
        "unsaved_patches": f"main: cleared after each update ({patches} kept at a time); this tree: a dirty-slot mask",
        "state_bytes": state_bytes,
        "delta_bytes": delta_bytes,
        "weights_bytes": weights,
        "model_buffers_bytes": buffers,
        "memory_kv_cache_before_inject_bytes": cache_bytes,
        "memory_kv_cache_kept_through_inject": kept_bytes > 0,
        "memory_kv_cache_after_inject_bytes": kept_bytes,
        "bound_bytes": bound,
        "bound": "state + 2 deltas + weights (state_dict); peaks are VmHWM less VmRSS before loading",
        # the whole process at its peak, less what it held before loading anything
        "peak_over_process_baseline_bytes": peak - process_before_load,
        "first_chunk_peak_over_process_baseline_bytes": first_chunk_peak - process_before_load,
        "chunks_2_on_peak_over_process_baseline_bytes": steady_peak - process_before_load,
        # between chunks: what stays (weights, state, tables); the peak less this is one chunk's forward
        "after_inject_over_process_baseline_bytes": rest - process_before_load,
        "one_chunk_transient_bytes": steady_peak - rest,
        "chunks_2_on_within_bound": steady_peak - process_before_load <= bound,
        "chunks_2_on_within_bound_plus_model_buffers": steady_peak - process_before_load <= bound + buffers,
        "peak_over_process_baseline_within_bound_plus_cache": peak - process_before_load <= bound + cache_bytes,
    }


def compare(args) -> None:
    folder = checkpoint_for(args)
    main_root = _export_main(args.main_ref)
    sys.path.insert(0, str(main_root))
    result = {
        "benchmark": "engine main vs this tree",
        "machine": args.machine,
        "checkpoint": str(folder),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "main_ref": args.main_ref,
    }
    cfg = read_config(folder)
    result["model"] = {"family": cfg.family, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                       "memory_rows": cfg.memory_rows, "vocab": cfg.vocab_size}
    for which in ("main", "new"):
        result[which] = _compare_one(which, folder, args)
        result[which]["inject_64"] = _inject_peak_child(which, folder, 64, main_root)
    old, new = result["main"], result["new"]
    result["checks"] = {
        "warm_cache_update_within_2x_of_no_cache": new["warm_over_no_cache"] <= 2.0,
        "ops_per_decoded_token_ratio_main_over_new_eager": round(old["ops_per_decoded_token"] / new["ops_per_decoded_token"], 2),
        "ops_per_decoded_token_ratio_main_over_new_compiled": round(old["ops_per_decoded_token"] / new["compiled_ops_per_decoded_token"], 2),
        "decode_not_slower_eager": new["decode_tokens_per_second"] >= 0.95 * old["decode_tokens_per_second"],
        "decode_not_slower_compiled": new["compiled_decode_tokens_per_second"] >= 0.95 * old["decode_tokens_per_second"],
        "inject_64_growth_within_bound": new["inject_64"]["growth_during_inject_bytes"] <= new["inject_64"]["bound_bytes"],
        "inject_64_peak_over_process_baseline_within_bound_plus_memory_kv":
            new["inject_64"]["peak_over_process_baseline_within_bound_plus_cache"],
        "inject_64_chunks_2_on_within_bound": new["inject_64"]["chunks_2_on_within_bound"],
        "inject_64_chunks_2_on_within_bound_plus_model_buffers":
            new["inject_64"]["chunks_2_on_within_bound_plus_model_buffers"],
        "same_greedy_tokens": old["greedy_tokens"] == new["greedy_tokens"],
    }
    emit(result, args.out)


def _inject_ask_one(which: str, folder: Path, args) -> tuple[dict, torch.Tensor, list[int]]:
    """One tree: a session reads the memory, then `rounds` times injects `chunks` chunks and asks
    twice (the ask right after the inject, then the same ask repeated); times to first token."""
    import gc
    from statistics import median

    engine_module, loading = _packages(which)
    model, reader = loading.load_model(folder, device="cpu", dtype=torch.float32)
    cfg = model.cfg
    engine = engine_module.Engine(model)
    gen = torch.Generator().manual_seed(0)  # the same chunks and question for both trees
    vocab = min(cfg.vocab_size, 32000)
    question = torch.randint(0, vocab, (1, 32), generator=gen)
    state = loading.initial_state(reader, cfg, seed=0)  # the same drops for both trees
    engine.generate(state, question, 1)  # a session that has read the memory
    engine.generate(state, question, 1)
    injects, after, repeated = [], [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.chunks):
            engine.update(state, engine.inject(state, torch.randint(0, vocab, (1, 512), generator=gen)))
        injects.append((time.perf_counter() - start) / args.chunks)
        t, _ = timed("cpu", lambda: engine.generate(state, question, 1))
        after.append(t)
        t, _ = timed("cpu", lambda: engine.generate(state, question, 1))
        repeated.append(t)
    logits, _ = engine.logits(state, question, all_rows=False)
    tokens = engine.generate(state, question, args.new_tokens).tokens
    out = {
        "threads": torch.get_num_threads(),
        "inject_seconds_per_chunk": round(median(injects), 4),
        "ask_ttft_right_after_inject_seconds": round(median(after), 4),
        "ask_ttft_repeated_seconds": round(median(repeated), 4),
        "after_inject_over_repeated": round(median(after) / median(repeated), 2),
        "ask_ttft_right_after_inject_all_seconds": [round(t, 4) for t in after],
        "ask_ttft_repeated_all_seconds": [round(t, 4) for t in repeated],
        "greedy_tokens": tokens,
    }
    del model, reader, engine, state
    gc.collect()
    return out, logits, tokens


def inject_ask(args) -> None:
    """Issue 17: the ask right after an inject against a repeated ask, main and this tree."""
    folder = checkpoint_for(args)
    main_root = _export_main(args.main_ref)
    sys.path.insert(0, str(main_root))
    cfg = read_config(folder)
    result = {
        "benchmark": "ask right after an inject vs a repeated ask; inject peak with the memory K/V kept",
        "machine": args.machine,
        "checkpoint": str(folder),
        "versions": versions(),
        "main_ref": args.main_ref,
        "model": {"family": cfg.family, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "memory_rows": cfg.memory_rows, "vocab": cfg.vocab_size},
        "chunks_per_inject": args.chunks,
        "rounds": args.rounds,
    }
    # both trees compute on the threads this tree picks for the model (main leaves torch's default):
    # the comparison is of the memory K/V path, and only equal thread counts can agree bitwise
    from memcli.core import threads as compute_threads

    result["threads"] = compute_threads.configure(cfg).threads
    logits = {}
    try:
        for which in ("main", "new"):
            result[which], logits[which], _ = _inject_ask_one(which, folder, args)
        for which in ("main", "new"):
            result[which]["inject_peak"] = _inject_peak_child(which, folder, args.peak_chunks, main_root)
    finally:
        import shutil

        shutil.rmtree(main_root, ignore_errors=True)  # the exported tree
    result["checks"] = inject_ask_checks(result, bool(torch.equal(logits["main"], logits["new"])))
    emit(result, args.out)


def inject_ask_checks(result: dict, same_logits: bool) -> dict:
    """The --inject-ask verdicts, from the result's own figures."""
    old, new = result["main"], result["new"]
    peak = new["inject_peak"]
    kept = peak["memory_kv_cache_after_inject_bytes"]
    extra = peak["peak_over_process_baseline_bytes"] - old["inject_peak"]["peak_over_process_baseline_bytes"]
    return {
        "new_ask_after_inject_within_1_5x_repeated": new["after_inject_over_repeated"] <= 1.5,
        "main_ask_after_inject_over_repeated": old["after_inject_over_repeated"],
        "new_ask_after_inject_over_main": round(new["ask_ttft_right_after_inject_seconds"]
                                                / old["ask_ttft_right_after_inject_seconds"], 2),
        "same_logits_bitwise": same_logits,
        "same_greedy_tokens": old["greedy_tokens"] == new["greedy_tokens"],
        "new_keeps_memory_kv_through_inject": peak["memory_kv_cache_kept_through_inject"],
        "main_keeps_memory_kv_through_inject": old["inject_peak"]["memory_kv_cache_kept_through_inject"],
        "new_inject_peak_over_process_baseline_bytes": peak["peak_over_process_baseline_bytes"],
        "main_inject_peak_over_process_baseline_bytes": old["inject_peak"]["peak_over_process_baseline_bytes"],
        "new_inject_peak_within_bound_plus_memory_kv": peak["peak_over_process_baseline_within_bound_plus_cache"],
        # what keeping the memory K/V costs the inject's peak, against the cache it keeps
        "new_inject_peak_over_main_bytes": extra,
        "new_inject_peak_over_main_within_kept_memory_kv": extra <= kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=("fixture", "medium", "real"), default="fixture")
    parser.add_argument("--checkpoint")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--quant", default=None)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out")
    parser.add_argument("--compare-main", action="store_true", help="today's main and this tree side by side (CPU)")
    parser.add_argument("--inject-ask", action="store_true",
                        help="ask right after an inject vs a repeated ask, and the inject peak: main and this tree")
    parser.add_argument("--rounds", type=int, default=5, help="--inject-ask: injects (each followed by two asks)")
    parser.add_argument("--peak-chunks", type=int, default=16, help="--inject-ask: chunks of the inject whose peak is measured")
    parser.add_argument("--main-ref", "--baseline", default=None,
                        help=f"the engine to compare with (default: 0.1 = {VERSION_0_1} for --compare-main, "
                             f"main before issue 17 = {MAIN_BEFORE_ISSUE_17} for --inject-ask; any commit)")
    parser.add_argument("--machine", default=f"CPU, {torch.get_num_threads()} threads")
    args = parser.parse_args()
    if args.inject_ask:
        args.main_ref = args.main_ref or MAIN_BEFORE_ISSUE_17
        inject_ask(args)
        return
    if args.compare_main:
        args.main_ref = args.main_ref or VERSION_0_1
        compare(args)
        return
    device = args.device
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    folder = checkpoint_for(args)
    cfg = read_config(folder)

    reader = CheckpointReader(folder)
    largest = max(
        (torch.Size(s.shape).numel() * (1 if s.dtype == "U8" else torch.finfo(dtype).bits // 8))
        for s in check_plan(reader, cfg)
    )
    baseline_rss = rss_bytes()
    load_seconds, (model, reader) = timed(device, lambda: load_model(folder, device=device, dtype=dtype, quant=args.quant))
    state_seconds, state = timed(device, lambda: initial_state(reader, cfg, device=device, dtype=dtype, seed=0))
    after_rss = rss_bytes()
    peak_rss = peak_rss_bytes()
    cached_load_seconds = None
    if (args.quant or dtype_name) != "fp32":  # the first load wrote a converted copy: time reading it
        cached_load_seconds, _ = timed(device, lambda: load_model(folder, device=device, dtype=dtype, quant=args.quant))
    engine, reference = Engine(model), Engine(model, reference=True)

    limit = int(cfg.raw.get("max_seq_length") or 2 * cfg.num_tokens)
    chunk = min(512, limit)
    question_len = min(32, limit - args.new_tokens)
    gen = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size, 32000)
    chunks = [torch.randint(0, vocab, (1, chunk), generator=gen) for _ in range(args.chunks)]
    question = torch.randint(0, vocab, (1, question_len), generator=gen).to(device)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # memory K/V: first read builds them, later reads reuse them
    kv_build, _ = timed(device, lambda: engine.logits(state, question, all_rows=False))
    warm_logits, _ = timed(device, lambda: engine.logits(state, question, all_rows=False), repeat=3)

    inject_time = update_time = 0.0
    for ids in chunks:
        t_inject, delta = timed(device, lambda: engine.inject(state, ids.to(device)))
        t_update, _ = timed(device, lambda: engine.update(state, delta))
        inject_time += t_inject
        update_time += t_update

    first_token, _ = timed(device, lambda: engine.generate(state, question, 1), repeat=2)
    ref_first_token, _ = timed(device, lambda: reference.generate(state, question, 1), repeat=2)
    ask, cached = timed(device, lambda: engine.generate(state, question, args.new_tokens), repeat=2)
    ref_ask, recomputed = timed(device, lambda: reference.generate(state, question, args.new_tokens), repeat=2)
    decode = (ask - first_token) / max(len(cached.tokens) - 1, 1)

    result = {
        "benchmark": "engine",
        "scale": args.scale,
        "checkpoint": str(folder),
        "model": {"family": cfg.family, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "memory_rows": cfg.memory_rows, "vocab": cfg.vocab_size},
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": dtype_name,
        "quant": args.quant or dtype_name,
        "versions": versions(),
        "load_seconds": round(load_seconds + state_seconds, 3),
        "load_from_converted_seconds": None if cached_load_seconds is None else round(cached_load_seconds, 3),
        "host_rss_before_load_bytes": baseline_rss,
        "host_rss_after_load_bytes": after_rss,
        "host_peak_rss_bytes": peak_rss,
        # what loading needed beyond what stays resident: on a GPU everything beyond the baseline
        "load_host_overhead_bytes": (peak_rss - baseline_rss) if device.startswith("cuda") else max(peak_rss - after_rss, 0),
        "load_bound_bytes": int(1.5 * largest + 2**30),
        "largest_tensor_converted_bytes": largest,
        "memory_kv_build_seconds": round(kv_build - warm_logits, 4),
        "inject_tokens_per_second": round(chunk * len(chunks) / inject_time, 1),
        "inject_chunk_tokens": chunk,
        "update_seconds": round(update_time / len(chunks), 5),
        "ask_ttft_seconds": round(first_token, 4),
        "ask_ttft_reference_seconds": round(ref_first_token, 4),
        "ttft_speedup": round(ref_first_token / first_token, 2),
        "decode_tokens_per_second": round(1 / decode, 2) if decode > 0 else None,
        "repeated_ask_seconds": round(ask, 4),
        "repeated_ask_reference_seconds": round(ref_ask, 4),
        "repeated_ask_speedup": round(ref_ask / ask, 2),
        "repeated_ask_identical_greedy": cached.tokens == recomputed.tokens,
        "floor_inject_flops_per_chunk": 2 * active_params_per_token(cfg) * (chunk + cfg.num_tokens + 1),
    }
    if device.startswith("cuda"):
        result["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated()
        name = result["device"]
        peak = next((v for k, v in PEAKS.items() if k in name), None)
        if peak:
            result["floor_inject_tokens_per_second"] = round(chunk / (result["floor_inject_flops_per_chunk"] / peak[0]), 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
