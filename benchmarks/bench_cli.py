"""Wall time of the light CLI commands as a ratio to `memcli --version` (issue 13, item 23; issue 19, item 12).

    python benchmarks/bench_cli.py [--repeat 7] [--baseline main] [--out benchmarks/results/cpu-cli-light-<machine>.json]

Each command runs as a fresh process (`python -m memcli ...`), as a user's shell runs it, `--repeat`
times (interleaved); the median counts. Bytecode caching is on, as for a user (PYTHONDONTWRITEBYTECODE
is removed from the commands' environment, and every command runs once untimed first, so each tree's
__pycache__ is written before the timed runs). The same commands of the `--baseline` git revision run
in the same run, side by side (its tree is extracted with `git archive` into a temporary folder), so
old and new are measured under the same load. A pool made with the tiny fixture model gives
`pool ls`/`pool info` something to read. Target: every light command within 2x of `--version`.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(os.environ.get("MEMCLI_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance")) / \
    "memoryllm-8b-chat-tiny" / "checkpoint"
COMMANDS = {
    "--version": ["--version"],
    "pool ls": ["pool", "ls"],
    "pool info": ["pool", "info", "bench"],
    "models": ["models"],
    "config get": ["config", "get"],
}
TARGET_RATIO = 2.0


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"name": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "load_average_1m": load,
            "python": platform.python_version(), "note": "CPU, shared 2-core machine under load from other jobs"}


def wall(code: Path, args: list[str], env: dict) -> float | str:
    """Seconds the command took, or why it failed (the baseline may lack a command)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "memcli", *args], cwd=code, env={**env, "PYTHONPATH": str(code)},
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return seconds


def measure(code: Path, env: dict, repeat: int) -> dict:
    for args in COMMANDS.values():  # untimed: writes the tree's bytecode cache, as a user's first run does
        wall(code, args, env)
    times: dict[str, list] = {name: [] for name in COMMANDS}
    for _ in range(repeat):  # interleaved, so a burst of load hits every command alike
        for name, args in COMMANDS.items():
            times[name].append(wall(code, args, env))
    base = statistics.median(times["--version"])
    rows = {}
    for name, values in times.items():
        failed = [v for v in values if isinstance(v, str)]
        if failed:
            rows[name] = {"error": failed[0]}
            continue
        median = statistics.median(values)
        rows[name] = {"median_s": round(median, 4), "ratio_to_version": round(median / base, 2),
                      "runs_s": [round(t, 4) for t in values]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--baseline", default="main", help="git revision to compare with ('' for none)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "MEMCLI_HOME": str(scratch / "home"), "HF_HOME": str(scratch / "hf"),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "MEMCLI_SERVER": "0"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode caching on, as for a user
        notes = scratch / "notes.txt"
        notes.write_text("Alice took the train to Paris on Monday and met Bob at the station near the river.")
        subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "--model", str(FIXTURE), "inject",
                        str(notes), "--pool", "bench"], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                       check=True, capture_output=True, timeout=600)
        sys.path.insert(0, str(REPO))
        from memcli import __version__

        result = {"benchmark": "cli-light-commands", "memcli": __version__, "machine": machine(),
                  "repeat": options.repeat, "statistic": "median", "bytecode_cache": True,
                  "target_ratio_to_version": TARGET_RATIO, "new": measure(REPO, env, options.repeat)}
        if options.baseline:
            old = scratch / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", options.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            result["baseline"] = options.baseline
            result["old"] = measure(old, env, options.repeat)
        result["meets_target"] = all(row.get("ratio_to_version", float("inf")) <= TARGET_RATIO
                                     for row in result["new"].values())
    emit(result, options.out)


if __name__ == "__main__":
    main()
