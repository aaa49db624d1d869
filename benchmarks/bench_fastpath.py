"""memcli.core.fastpath against a baseline revision and against the reference model alone, timings interleaved.

    python benchmarks/bench_fastpath.py --baseline main --machine "CPU, shared 2-core" \
        --out benchmarks/results/cpu-medium-fastpath-vs-main.json

Three engines in one process on the medium model (width 1024, 4 layers, 12,800 memory rows, fp32,
the checkpoint `bench_engine.py --scale medium` makes): the baseline's memcli package (exported
with git archive as `memcli_baseline`), this tree as the loader makes it (fast path installed), and
this tree's reference model (`fastpath.install` left out). Every round runs the same work on each
engine, in an order that rotates per round, so a load that changes during the run (the machine is
shared) spreads over all three alike: a chunk inject, the update after it (no memory K/V cache),
the ask right after it, a warm ask, decode seconds per token (between the tokens streamed from one
n-token answer), and an update with a warm cache. Medians over the rounds with their min and max
as the noise; the ratios fast/baseline are given for the medians and for the best rounds.
Operator calls per decoded token (torch profiler, all events) are counted, not timed; the compiled
step likewise. At the end the three memories (every update of the run) must be bitwise equal and
the greedy tokens the same. The inject's host peak is `bench_engine.py --compare-main`'s (each
engine in its own process).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("MKL_CBWR", "AUTO")  # as memcli sets it, before any BLAS call

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from make_checkpoint import config_like, make_checkpoint  # noqa: E402
from report import baseline_modules, emit, export_tree, versions  # noqa: E402


def export(ref: str) -> tuple[Path, str]:
    return export_tree(REPO, ref, "memcli_baseline")


def engines(folder: Path, root: Path) -> dict:
    """name -> (engine module, loading module, model, reader)."""
    sys.path.insert(0, str(root))
    base_engine, base_loading = baseline_modules("memcli_baseline")

    from memcli.core import engine
    from memcli.core import fastpath
    from memcli.loading import checkpoints as loading

    out = {"baseline": (base_engine, base_loading, *base_loading.load_model(folder))}
    out["fast"] = (engine, loading, *loading.load_model(folder))
    install = fastpath.install
    fastpath.install = lambda model: model
    try:
        out["reference"] = (engine, loading, *loading.load_model(folder))
    finally:
        fastpath.install = install
    assert type(out["reference"][2]).__name__ == "Transformer" and type(out["fast"][2]).__name__ == "FastTransformer"
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def decode_seconds(engine, state, question, n: int, expected: list[int] | None = None) -> float:
    """Seconds per decode step within one answer. A token is streamed right after the step that
    follows it is run, and the last one after no step: stamps 0..n-2 bracket n-2 steps."""
    stamps = []
    answer = engine.generate(state, question, n, on_token=lambda token: stamps.append(time.perf_counter()))
    assert expected is None or answer.tokens == expected, "the compiled answer differs"
    return (stamps[-2] - stamps[0]) / (len(stamps) - 2)


def ops_per_token(engine, state, question, n: int = 9) -> float:
    from torch.profiler import ProfilerActivity, profile

    def count(tokens):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(state, question, tokens)
        return len(prof.events())

    return (count(n) - count(1)) / (n - 1)


def summary(values: list[float], digits: int = 5) -> dict:
    return {"median": round(median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--checkpoint", help="default: the medium checkpoint under .bench/ (made if missing)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compiled-rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--machine", default="CPU")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(args.checkpoint) if args.checkpoint else REPO / ".bench" / "medium-default"
    if not (folder / "config.json").exists():
        make_checkpoint(folder, config_like("memoryllm-8b", None, medium=True))
    root, commit = export(args.baseline)
    runs = engines(folder, root)
    cfg = runs["fast"][2].cfg
    gen = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size, 32000)
    chunks = [torch.randint(0, vocab, (1, 512), generator=gen) for _ in range(2 * args.rounds)]
    question = torch.randint(0, vocab, (1, 32), generator=gen)
    n = args.new_tokens

    states, eng, times = {}, {}, {}
    for name, (engine_module, loading, model, reader) in runs.items():
        eng[name] = engine_module.Engine(model)
        states[name] = loading.initial_state(reader, model.cfg, seed=0)
        eng[name].generate(states[name], question, 2)  # warm-up: first-call costs belong to no round
        times[name] = {k: [] for k in ("inject_seconds", "update_no_cache_seconds", "ask_ttft_after_update_seconds",
                                       "ask_ttft_warm_seconds", "decode_seconds_per_token",
                                       "update_warm_cache_seconds")}
    names = list(runs)
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in names[r % 3:] + names[: r % 3]:
                engine, state, t = eng[name], states[name], times[name]
                seconds, delta = timed(lambda: engine.inject(state, chunks[2 * r]))
                t["inject_seconds"].append(seconds)
                later = engine.inject(state, chunks[2 * r + 1])  # made before the read: a warm-cache update
                t["update_no_cache_seconds"].append(timed(lambda: engine.update(state, delta))[0])
                t["ask_ttft_after_update_seconds"].append(timed(lambda: engine.generate(state, question, 1))[0])
                t["ask_ttft_warm_seconds"].append(timed(lambda: engine.generate(state, question, 1))[0])
                t["decode_seconds_per_token"].append(decode_seconds(engine, state, question, n))
                t["update_warm_cache_seconds"].append(timed(lambda: engine.update(state, later))[0])

    result = {
        "benchmark": "fast path vs baseline vs reference model, interleaved",
        "machine": args.machine,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "baseline_ref": args.baseline,
        "baseline_commit": commit,
        "checkpoint": str(folder),
        "model": {"family": cfg.family, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "intermediate": cfg.intermediate_size, "memory_rows": cfg.memory_rows, "vocab": cfg.vocab_size},
        "rounds": args.rounds,
        "new_tokens": n,
        "engines": {},
    }
    answers = {}
    for name in names:
        engine, state = eng[name], states[name]
        out = {k: summary(v) for k, v in times[name].items()}
        out["decode_tokens_per_second"] = summary([1 / s for s in times[name]["decode_seconds_per_token"]], 2)
        out["ops_per_decoded_token"] = ops_per_token(engine, state, question)
        answers[name] = engine.generate(state, question, n).tokens
        out["greedy_tokens"] = answers[name]
        result["engines"][name] = out

    # the compiled step (inductor's C++ kernels on the CPU): first answer, operator calls, tokens/s
    compiled = {name: runs[name][0].Engine(runs[name][2], compile_decode=True) for name in names}
    rates = {name: [] for name in names}
    for name in names:
        seconds, _ = timed(lambda: compiled[name].generate(states[name], question, 2))
        result["engines"][name]["compiled_first_answer_seconds"] = round(seconds, 1)
    for r in range(args.compiled_rounds):
        for name in names[r % 3:] + names[: r % 3]:
            rates[name].append(1 / decode_seconds(compiled[name], states[name], question, n, answers[name]))
    for name in names:
        result["engines"][name]["compiled"] = compiled[name].compiled
        result["engines"][name]["compiled_decode_tokens_per_second"] = summary(rates[name], 2)
        result["engines"][name]["compiled_ops_per_decoded_token"] = ops_per_token(compiled[name], states[name], question)

    base, fast, ref = (result["engines"][k] for k in names)
    # below 1 is faster for times, above 1 for tokens/s; "best" compares the least disturbed rounds
    for label, stat, rate_stat in (("medians", "median", "median"), ("best", "min", "max")):
        ratio = {key: round(fast[key][stat] / base[key][stat], 3) for key in times["fast"]}
        for key in ("decode_tokens_per_second", "compiled_decode_tokens_per_second"):
            ratio[key] = round(fast[key][rate_stat] / base[key][rate_stat], 3)
        result[f"fast_over_baseline_{label}"] = ratio
    result["checks"] = {
        "memory_bitwise_equal": all(torch.equal(states["fast"].slots, states[k].slots) for k in names),
        "same_greedy_tokens": answers["fast"] == answers["baseline"] == answers["reference"],
        "ops_per_decoded_token_fast_le_baseline": fast["ops_per_decoded_token"] <= base["ops_per_decoded_token"],
        "ops_per_decoded_token_reference_over_fast": round(ref["ops_per_decoded_token"] / fast["ops_per_decoded_token"], 2),
        "compiled_ops_per_decoded_token_fast_le_baseline":
            fast["compiled_ops_per_decoded_token"] <= base["compiled_ops_per_decoded_token"],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
