"""`memcli ask` warm through a running server against one-shot `--no-server`, side by side in one run.

    python benchmarks/bench_server.py --out benchmarks/results/cpu-server.json   # tiny and medium
    python benchmarks/bench_server.py --scales tiny                              # seconds

Per scale (tiny: examples/tiny-model; medium: width 1024, 4 layers, the real 12,800-row memory,
written once under .bench/ by make_checkpoint.py) it makes a pool with one chunk, then times whole
`memcli ask` processes (wall time, as a user sees it):

  one_shot   `memcli --no-server ask`: imports torch, loads the model, builds the memory K/V, answers
  cold       the first ask through a just-started server (it loads the model and builds the K/V)
  warm       later asks through that server: no torch import, nothing loaded, K/V cached

and the time to first token the answering process measured (`--json`): one-shot includes the memory
K/V build; warm reads the server's cached K/V. Target (issue 11): warm <= 1/5 of one-shot on medium.
Answers must be identical both ways (greedy).
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
BENCH_DIR = REPO / ".bench"

from report import emit  # noqa: E402
TINY = REPO / "examples" / "tiny-model"
QUESTION = "Where did Alice go on Monday?"
TEXT = ("Alice took the train to Paris on Monday and met Bob at the station near the old river bridge. "
        "The meeting with Carol is on Friday at ten in the big room upstairs, next to the kitchen.")
TARGET_RATIO = 0.2


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "note": "CPU, shared 2-core machine under load from other jobs"}


def checkpoint(scale: str) -> Path:
    if scale == "tiny":
        return TINY
    from make_checkpoint import config_like, make_checkpoint

    folder = BENCH_DIR / "medium-default"
    if not (folder / "config.json").exists():
        make_checkpoint(folder, config_like("memoryllm-8b", None, medium=True))
    return folder


def memcli(env: dict, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if check and done.returncode != 0:
        raise SystemExit(f"memcli {' '.join(args)} failed: {done.stderr.strip()}")
    return seconds, done


def ask(env: dict, no_server: bool, tokens: int) -> tuple[float, dict]:
    args = (["--no-server"] if no_server else []) + ["ask", QUESTION, "--pool", "bench", "--max-new-tokens", str(tokens), "--json"]
    seconds, done = memcli(env, *args)
    return seconds, json.loads(done.stdout.splitlines()[-1])  # NDJSON: the last line is the "answer" event


def run_scale(scale: str, repeat: int, tokens: int) -> dict:
    folder = checkpoint(scale)
    home = BENCH_DIR / f"server-home-{scale}"
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, MEMCLI_HOME=str(home), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MEMCLI_SERVER", None)
    doc = home / "note.txt"
    home.mkdir(parents=True)
    doc.write_text(TEXT)
    memcli(env, "--no-server", "--model", str(folder), "inject", str(doc), "--pool", "bench")

    one_shot = [ask(env, True, tokens) for _ in range(repeat)]
    server = subprocess.Popen([sys.executable, "-m", "memcli", "--device", "cpu", "serve", "--keep-alive", "-1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        while subprocess.run([sys.executable, "-c", "import sys; from memcli.server.client import Client; "
                              "sys.exit(0 if Client().health() else 1)"], env=env).returncode != 0:
            if server.poll() is not None or time.perf_counter() - started > 600:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        cold = ask(env, False, tokens)
        warm = [ask(env, False, tokens) for _ in range(repeat)]
    finally:
        memcli(env, "stop", check=False)
        server.wait(120)
    answers = {r["answer"] for _, r in one_shot + [cold] + warm}
    one_wall = statistics.median(s for s, _ in one_shot)
    warm_wall = statistics.median(s for s, _ in warm)
    result = {
        "checkpoint": str(folder.relative_to(REPO)),
        "new_tokens": tokens,
        "repeat": repeat,
        "one_shot_wall_s": [round(s, 3) for s, _ in one_shot],
        "server_cold_wall_s": round(cold[0], 3),
        "server_warm_wall_s": [round(s, 3) for s, _ in warm],
        "warm_over_one_shot": round(warm_wall / one_wall, 4),
        "one_shot_ttft_s": [r["seconds_to_first_token"] for _, r in one_shot],
        "server_cold_ttft_s": cold[1]["seconds_to_first_token"],
        "server_warm_ttft_s_cached_kv": [r["seconds_to_first_token"] for _, r in warm],
        # what the answer itself took inside the answering process (the rest of a wall time is start-up)
        "one_shot_answer_s": [r["seconds"] for _, r in one_shot],
        "server_warm_answer_s": [r["seconds"] for _, r in warm],
        "identical_answers": len(answers) == 1,
    }
    if scale == "medium":
        result["target_warm_over_one_shot"] = TARGET_RATIO
        result["meets_target"] = result["warm_over_one_shot"] <= TARGET_RATIO
    shutil.rmtree(home, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", choices=("tiny", "medium"), default=["tiny", "medium"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"bench": "server", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "scales": {scale: run_scale(scale, args.repeat, args.tokens) for scale in args.scales}}
    emit(report, args.out)


if __name__ == "__main__":
    main()
