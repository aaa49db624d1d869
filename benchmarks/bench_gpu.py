"""Device benchmark on random weights with the published shapes, made directly on the device
(no 39 GB file): load, inject tokens/s, update ms, ask time-to-first-token cold / warm / after an
update, decode ms per token and peak device memory, per variant; one JSON object on stdout.

    python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/gpu-H200.json
    python benchmarks/bench_gpu.py --device cpu             # dry run: 2 layers, width 1024

Variants: 8b-chat NF4, 8b-chat bf16 (memoryllm-8b-chat has memoryllm-8b's shapes), mplus-8b NF4
with a long-term memory of `--ltm-rows` rows per layer. Pools are kept as the CLI keeps them: in
host memory, pinned on CUDA. Targets (issue 10, 8b-chat NF4, full pool): peak device memory
<= 10 GB, warm TTFT <= 50 ms, decode <= 2x its bandwidth floor, inject >= 20,000 tokens/s.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_checkpoint import MEDIUM, config_like  # noqa: E402
from report import emit, versions  # noqa: E402

from memcli.core.config import parse_config  # noqa: E402
from memcli.core.engine import Engine  # noqa: E402
from memcli.loading.checkpoints import build_model, initial_state, weight_plan  # noqa: E402

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, HBM


class RandomWeights:
    """A tensor source with a checkpoint reader's `names/shape/get`, generating each tensor on the
    device when asked (so the benchmark's weights never exist on the host)."""

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, ltm_rows: int, seed: int = 0):
        self.folder = Path("<random>")
        self.plan = {s.name: s for s in weight_plan(cfg, [ltm_rows] * cfg.num_layers if cfg.family == "mplus" else None)}
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def names(self) -> set[str]:
        return set(self.plan)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.plan[name].shape

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        shape = self.plan[name].shape[1:] if index is not None else self.plan[name].shape
        if name == "initialized":
            return torch.ones((), dtype=torch.uint8)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        if name.startswith("ltm_ages"):
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        if name.startswith("ltm_recall_frequencies"):
            return torch.full(shape, 10.0, dtype=torch.float32, device=self.device)
        scale = 1.0 if name in ("memory", "bos_embedding") or name.startswith("ltm.") else 0.02
        return torch.randn(shape, dtype=self.dtype, device=self.device, generator=self.gen) * scale


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn, repeat: int = 1):
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat, out


def _config(like: str, device: torch.device) -> dict:
    if device.type == "cuda":
        return config_like(like)
    config = config_like(like, layers=2, medium=True)  # dry run: every code path, CI-sized
    assert config["hidden_size"] == MEDIUM["hidden_size"]
    return config


def run_variant(name: str, like: str, quant: str, args, device: torch.device) -> dict:
    cfg = parse_config(_config(like, device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ltm_rows = args.ltm_rows if cfg.family == "mplus" else 0
    source = RandomWeights(cfg, device, dtype, ltm_rows)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    load_s, model = _timed(device, lambda: build_model(cfg, source, device, dtype, quant))
    state_s, state = _timed(device, lambda: initial_state(source, cfg, device="cpu", dtype=dtype, seed=0))
    if device.type == "cuda":  # as the CLI keeps pools: host memory, pinned
        state.slots = state.slots.pin_memory()
    engine = Engine(model)
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    question = torch.randint(0, vocab, (1, 32), generator=gen).to(device)
    chunks = [torch.randint(0, vocab, (1, args.chunk_tokens), generator=gen).to(device) for _ in range(args.chunks)]
    ttft_cold, _ = _timed(device, lambda: engine.generate(state, question, 1))
    ttft_warm, _ = _timed(device, lambda: engine.generate(state, question, 1), repeat=3)
    inject_s = update_s = 0.0
    for ids in chunks:
        t, delta = _timed(device, lambda: engine.inject(state, ids))
        inject_s += t
        t, _ = _timed(device, lambda: engine.update(state, delta))
        update_s += t
        state.dirty = None  # what a commit does: the dirty-slot mask is cleared
    ttft_after_update, _ = _timed(device, lambda: engine.generate(state, question, 1))
    engine.generate(state, question, args.new_tokens)  # warm-up of the decode path
    full, answer = _timed(device, lambda: engine.generate(state, question, args.new_tokens))
    first, _ = _timed(device, lambda: engine.generate(state, question, 1))
    decode_ms = 1000 * (full - first) / max(len(answer.tokens) - 1, 1)
    from memcli.core.quant import weight_bytes

    # bytes a decode step reads: every weight but the embedding table (one row of it)
    weights = sum(weight_bytes(m) for m in model.modules() if not list(m.children()) and m is not model.embed_tokens)
    prefix_rows = cfg.prefix_rows
    kv_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * prefix_rows * cfg.head_dim * torch.finfo(dtype).bits // 8
    out = {
        "variant": name,
        "quant": quant,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "memory_rows": cfg.memory_rows,
        "ltm_rows_per_layer": ltm_rows or None,
        "load_seconds": round(load_s + state_s, 2),
        "inject_tokens_per_second": round(args.chunk_tokens * len(chunks) / inject_s, 1),
        "update_ms": round(1000 * update_s / len(chunks), 2),
        "ask_ttft_cold_ms": round(1000 * ttft_cold, 2),
        "ask_ttft_warm_ms": round(1000 * ttft_warm, 2),
        "ask_ttft_after_update_ms": round(1000 * ttft_after_update, 2),
        "decode_ms_per_token": round(decode_ms, 3),
        "decode_bytes_per_token": weights + kv_bytes,
    }
    if device.type == "cuda":
        out["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated()
        bandwidth = next((v for k, v in BANDWIDTH.items() if k in torch.cuda.get_device_name(0)), None)
        if bandwidth:
            out["decode_floor_ms_per_token"] = round(1000 * (weights + kv_bytes) / bandwidth, 3)
            out["decode_over_floor"] = round(decode_ms / out["decode_floor_ms_per_token"], 2)
        if args.compile and name == "8b-chat-nf4":
            compiled = Engine(model, compile_decode=True)
            t0 = time.perf_counter()
            compiled.generate(state, question, 4)
            out["compiled_first_answer_seconds"] = round(time.perf_counter() - t0, 1)
            full, canswer = _timed(device, lambda: compiled.generate(state, question, args.new_tokens))
            first, _ = _timed(device, lambda: compiled.generate(state, question, 1))
            out["compiled_decode_ms_per_token"] = round(1000 * (full - first) / max(len(canswer.tokens) - 1, 1), 3)
            out["compiled_still_compiled"] = compiled.compiled
            out["compiled_same_tokens"] = canswer.tokens == answer.tokens
    del engine, model, state
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--ltm-rows", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode step (CUDA graphs)")
    parser.add_argument("--variants", default="8b-chat-nf4,8b-chat-bf16,mplus-8b-nf4")
    parser.add_argument("--optional-after-s", type=float, default=200,
                        help="skip the optional int8 variant when the run is already this long")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.chunks = args.chunks or (8 if cuda else 1)
    args.new_tokens = args.new_tokens or (64 if cuda else 4)
    args.ltm_rows = args.ltm_rows or (20480 if cuda else 1024)
    table = {"8b-chat-nf4": ("memoryllm-8b", "nf4"), "8b-chat-bf16": ("memoryllm-8b", "bf16"),
             "mplus-8b-nf4": ("mplus-8b", "nf4"), "8b-chat-int8": ("memoryllm-8b", "int8")}
    if not cuda:
        table = {k: (like, "fp32" if q == "bf16" else q) for k, (like, q) in table.items()}
    result = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu dry run ({platform.machine()})",
        "versions": versions(),
        "weights": "random, generated on the device, published shapes" + ("" if cuda else " (dry run: 2 layers, width 1024)"),
        "variants": [],
    }
    started = time.perf_counter()
    for name in args.variants.split(","):
        like, quant = table[name]
        if cuda and name == "8b-chat-int8" and time.perf_counter() - started > args.optional_after_s:
            result["variants"].append({"variant": name, "skipped": "time budget of the 6-minute run"})
            continue
        try:
            result["variants"].append(run_variant(name, like, quant, args, device))
        except Exception as err:  # keep the other variants' numbers
            result["variants"].append({"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
        if cuda:
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - started, 1)
    first = next((v for v in result["variants"] if v.get("variant") == "8b-chat-nf4" and "error" not in v), None)
    if cuda and first:
        result["targets_8b_chat_nf4"] = {
            "peak_device_memory_le_10GB": first["peak_device_memory_bytes"] <= 10e9,
            "warm_ttft_le_50ms": first["ask_ttft_warm_ms"] <= 50,
            "decode_le_2x_floor": first.get("decode_over_floor", 99) <= 2,
            "inject_ge_20k_tokens_per_s": first["inject_tokens_per_second"] >= 20000,
        }
    emit(result, args.out)
    if any("error" in v for v in result["variants"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
