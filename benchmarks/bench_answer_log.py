"""The log of answers (memcli/app/answer_log.py): what one record costs, and what its size bound costs.

    python benchmarks/bench_answer_log.py [--records 300] [--bound-mb 16] [--out benchmarks/results/cpu-answer-log.json]

Side by side in one run, on fresh logs in a temporary MEMCLI_HOME:
- `record()` of a typical answer (a 60-character question, a 400-character answer): in a process that
  logs one answer and exits (the record and closing the file: what `memcli ask` pays), in a long-lived
  process (a server: its kept connection), and there with the size check taken out (the same code with
  `used_bytes` answering 0): the check's share of a record;
- the check itself (PRAGMA page_count, freelist_count, page_size on an open connection), in µs;
- a log filled to three times a bound (`--bound-mb`) with 2 KB answers: how often pruning ran, how many
  rows it removed and what it cost (delete + FTS5 optimize; the free pages are given back after the
  commit), the slowest record, the pages in use and the file's largest size (database + write-ahead
  file, sampled after each record) as shares of the bound.
Prints one JSON object. No target: a record must stay far below an answer's own time (seconds).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_cli import machine  # noqa: E402
from report import emit  # noqa: E402

WORDS = [w for w in "the a of train station river Alice Bob met went saw meeting room Friday Paris launch Orion "
         "rocket pad crew weather delay budget review notes spare key blue flower pot green house".split()]


def text(rng: random.Random, chars: int) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS) + str(rng.randrange(1000)))
    return " ".join(out)[:chars]


def time_records(al, n: int, rng: random.Random, answer_chars: int, one_shot: bool = False) -> list[float]:
    """Seconds per record() of `n` answers; `one_shot`: each followed by close(), as a CLI process
    that logs one answer and exits pays it."""
    times = []
    for i in range(n):
        entry = {"pool": "bench", "question": text(rng, 60), "answer": text(rng, answer_chars), "via": "cli",
                 "seconds": 1.0, "new_tokens": 100}
        started = time.perf_counter()
        if al.record(entry, on_error=lambda line: sys.exit(f"record failed: {line}")) is None:
            sys.exit("record returned None")
        if one_shot:
            al.close()
        times.append(time.perf_counter() - started)
    return times


def fresh_home(root: Path, name: str) -> None:
    os.environ["MEMCLI_HOME"] = str(root / name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--bound-mb", type=int, default=16)
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.pop("MEMCLI_LOG", None)
    from memcli.app import answer_log as al

    result: dict = {"benchmark": "answer-log", "machine": machine(), "records": args.records}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = random.Random(0)
        os.environ["MEMCLI_LOG_MAX_MB"] = "100"
        # interleaved rounds, so every variant sees the same load on a shared machine
        variants = {"one_shot_process": [], "long_lived_process": [], "long_lived_process_no_size_check": []}
        real_used = al._Db.used_bytes
        for round_ in range(3):
            for name, samples in variants.items():
                al.close()
                fresh_home(root, f"{name}-{round_}")
                if name.endswith("no_size_check"):
                    al._Db.used_bytes = lambda self: 0
                try:
                    samples += time_records(al, args.records // 3, rng, 400, one_shot=name == "one_shot_process")
                finally:
                    al._Db.used_bytes = real_used
        al.close()
        ms = lambda xs: round(1000 * statistics.median(xs), 3)  # noqa: E731
        p90 = lambda xs: round(1000 * sorted(xs)[int(0.9 * len(xs))], 3)  # noqa: E731
        result["record_ms_median"] = {name: ms(xs) for name, xs in variants.items()}
        result["record_ms_p90"] = {name: p90(xs) for name, xs in variants.items()}

        fresh_home(root, "check")
        al.record({"pool": "bench", "question": "q", "answer": "a"})
        db = al._open(create=False, note=print)
        with db:
            n = 20_000
            started = time.perf_counter()
            for _ in range(n):
                db.used_bytes()
            result["size_check_us"] = round(1e6 * (time.perf_counter() - started) / n, 2)

        fresh_home(root, "bounded")
        os.environ["MEMCLI_LOG_MAX_MB"] = str(args.bound_mb)
        bound = args.bound_mb << 20
        prunes: list[tuple[float, int]] = []  # (seconds, rows removed) of each pruning
        real_prune = al._prune

        def timed_prune(db, limit, keep_from):
            started = time.perf_counter()
            removed = real_prune(db, limit, keep_from)
            prunes.append((time.perf_counter() - started, removed))
            return removed

        al._prune = timed_prune
        times, peak_file, peak_used = [], 0, 0
        total = int(3.0 * bound / 2048)  # about three times the bound in answers of 2 KB
        try:
            for i in range(total):
                times += time_records(al, 1, rng, 2048)
                peak_file = max(peak_file, al.file_bytes())
                peak_used = max(peak_used, al._cache.db.used_bytes())
        finally:
            al._prune = real_prune
        result["bounded"] = {
            "bound_mb": args.bound_mb, "answers_written": total, "answers_kept": al.count(),
            "prunings": len(prunes), "rows_removed_per_pruning_median": statistics.median(n for _, n in prunes),
            "pruning_ms_median": ms([s for s, _ in prunes]), "pruning_ms_max": round(1000 * max(s for s, _ in prunes), 1),
            "record_ms_median": ms(times), "slowest_record_ms": round(1000 * max(times), 1),
            "peak_used_share_of_bound": round(peak_used / bound, 3),
            "peak_file_share_of_bound": round(peak_file / bound, 3),
        }
        al.close()
    emit(result, args.out)


if __name__ == "__main__":
    main()
