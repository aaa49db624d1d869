"""Inject on a busy CPU: memcli-tiny injects a ~300 KB text with 0, 1 and 2 CPU burners beside it,
a baseline revision (default: main before issue 17, b6f0760) and this tree in one run. Prints JSON.

    python benchmarks/bench_threads.py --machine "2-core AMD EPYC VM, shared" \
        --out benchmarks/results/cpu-threads-tiny.json

Each run is a fresh process doing what `memcli --no-server inject FILE --pool P --model memcli-tiny`
does (`Memcli.inject`, the API the CLI calls), in its own MEMCLI_HOME, with OMP_NUM_THREADS,
MEMCLI_THREADS and OMP_WAIT_POLICY removed from its environment: each tree picks its threads as it
would for a user. The baseline is exported with `git archive` into a temporary folder (nothing in the
repository changes) and run from there. A burner is a `while True: pass` process that ends by itself
after the run's deadline (and is killed when the run ends). A run still going at `--deadline`
seconds is stopped and reported with the chunks it made and a projected total
(`startup + all chunks at its measured rate`). `seconds` is the whole process, start to exit (what
a user waits for); `inject_seconds` the inject after the model loaded.

Target (issue 17): this tree with one burner takes no more than 2x its quiet time.

The text is deterministic prose made of memcli-tiny's vocabulary (its tokenizer splits on white
space and knows ~270 words), so it chunks into many 20-token chunks on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from report import emit  # noqa: E402

MAIN_BEFORE_ISSUE_17 = "b6f0760"  # main when issue 17 was filed

DRIVER = r"""
import json, os, sys, time
started = time.perf_counter()
import memcli
try:  # the layered package (issue 18), else the flat one before it (the baseline b6f0760)
    from memcli.app.api import Memcli
    from memcli.app.settings import load_settings
except ModuleNotFoundError:
    from memcli.api import Memcli
    from memcli.settings import load_settings
import torch

app = Memcli(load_settings(model="memcli-tiny", device="cpu"))
app.model()
loaded = time.perf_counter()
print(json.dumps({"event": "loaded", "seconds": loaded - started, "threads": torch.get_num_threads(),
                  "memcli": os.path.dirname(memcli.__file__)}), flush=True)


def on_event(event):
    if event.kind == "chunk" and event.chunks % 10 == 0:
        print(json.dumps({"event": "chunk", "chunks": event.chunks, "seconds": time.perf_counter() - started}),
              flush=True)


report = app.inject("bench", [sys.argv[1]], on_event=on_event)
print(json.dumps({"event": "done", "chunks": report.chunks, "tokens": report.tokens,
                  "seconds": time.perf_counter() - started}), flush=True)
"""


def make_text(target_bytes: int, seed: int = 0) -> str:
    """Sentences of memcli-tiny's words (deterministic for a seed), about `target_bytes` long."""
    vocab = json.loads((REPO / "memcli" / "models" / "memcli-tiny" / "tokenizer.json").read_text())["model"]["vocab"]
    words = [w for w in vocab if w.isalpha() and not w.startswith("<")]
    rng = random.Random(seed)
    out, size = [], 0
    while size < target_bytes:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + " ."
        out.append(sentence)
        size += len(sentence) + 1
    return "\n".join(out) + "\n"


def export_tree(ref: str) -> Path:
    """The memcli package of `ref`, exported with git archive into a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="memcli-ref-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "memcli"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def start_burners(n: int, seconds: float) -> list[subprocess.Popen]:
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def run_one(tree: Path, text: Path, burners: int, deadline: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix="memcli-bench-home-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MEMCLI_THREADS", "OMP_WAIT_POLICY",
                                                            "GOMP_SPINCOUNT", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tree), MEMCLI_HOME=str(home), MEMCLI_SERVER="0", HF_HUB_OFFLINE="1")
    load_before = [round(x, 2) for x in os.getloadavg()]  # the shared machine's other work
    hogs = start_burners(burners, deadline + 30)
    events: list[dict] = []
    try:
        began = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", DRIVER, str(text)], env=env, cwd=str(home),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def read():
            for line in child.stdout:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # reaped with wait4 (not Popen.wait) for the child's CPU time
        stopped = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - began > deadline:
                child.kill()
                stopped = True
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.1)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - began
        reader.join(timeout=10)
        stderr = child.stderr.read() if child.stderr else ""
    finally:
        stop(hogs)
        shutil.rmtree(home, ignore_errors=True)
    loaded = next((e for e in events if e["event"] == "loaded"), {})
    done = next((e for e in events if e["event"] == "done"), None)
    chunks = [e for e in events if e["event"] == "chunk"]
    out = {"burners": burners, "load_average_before": load_before, "threads": loaded.get("threads"),
           "memcli": loaded.get("memcli"),
           "startup_seconds": round(loaded.get("seconds", 0.0), 2), "process_wall_seconds": round(wall, 2)}
    if usage is not None:
        out["process_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 2)
    if done is not None:
        # what a user waits for: the whole process, start to exit
        out.update(completed=True, seconds=round(wall, 2), inject_seconds=round(done["seconds"] - loaded["seconds"], 2),
                   chunks=done["chunks"])
    else:
        out.update(completed=False, stopped_at_deadline=stopped, chunks_done=chunks[-1]["chunks"] if chunks else 0)
        if not chunks and not stopped:
            out["error"] = stderr.strip().splitlines()[-1:] or ["no output"]
    if len(chunks) >= 2:
        first, last = chunks[0], chunks[-1]
        rate = (last["chunks"] - first["chunks"]) / max(last["seconds"] - first["seconds"], 1e-9)
        out["chunks_per_second"] = round(rate, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kb", type=int, default=300, help="size of the injected text")
    parser.add_argument("--burners", default="0,1,2")
    parser.add_argument("--deadline", type=float, default=90.0, help="seconds before a run is stopped")
    parser.add_argument("--main-ref", default=MAIN_BEFORE_ISSUE_17)
    parser.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} CPUs")
    parser.add_argument("--out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memcli-bench-threads-"))
    text = work / "prose.txt"
    text.write_text(make_text(args.kb * 1000))
    trees = {"main": export_tree(args.main_ref), "new": REPO}
    runs: dict[str, dict[str, dict]] = {"main": {}, "new": {}}
    try:
        for burners in [int(b) for b in args.burners.split(",")]:
            for which, tree in trees.items():  # interleaved: the shared machine's other load hits both
                result = run_one(tree, text, burners, args.deadline)
                runs[which][f"burners_{burners}"] = result
                print(f"{which} burners={burners}: {json.dumps(result)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(trees["main"], ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    total = next((r["chunks"] for tree in runs.values() for r in tree.values() if r.get("completed")), None)
    for tree in runs.values():
        for r in tree.values():
            if total:
                r["total_chunks"] = total
            if not r.get("completed") and total and r.get("chunks_per_second"):
                r["projected_seconds"] = round(r["startup_seconds"] + total / r["chunks_per_second"], 1)

    result = {
        "benchmark": "inject of a ~300 KB text on memcli-tiny beside CPU burners",
        "machine": args.machine,
        "cpus_in_affinity": len(os.sched_getaffinity(0)),
        "text_bytes": text.stat().st_size if text.exists() else args.kb * 1000,
        "main_ref": args.main_ref,
        "deadline_seconds": args.deadline,
        "python": platform.python_version(),
        "main": runs["main"],
        "new": runs["new"],
    }
    result["checks"] = checks(runs)
    emit(result, args.out)


def checks(runs: dict) -> dict:
    """Verdicts from the runs' own figures: the whole process (what a user waits for; its start,
    importing torch, suffers from the burners too) and the inject alone."""

    def seconds(r):
        return r.get("seconds") or r.get("projected_seconds")

    out = {}
    new, quiet = runs["new"], runs["new"].get("burners_0", {})
    for n in (1, 2):
        run = new.get(f"burners_{n}", {})
        if seconds(run) and seconds(quiet):
            name = "one_burner" if n == 1 else "two_burners"
            out[f"new_{name}_over_quiet"] = round(seconds(run) / seconds(quiet), 2)
            if run.get("inject_seconds") and quiet.get("inject_seconds"):
                out[f"new_{name}_inject_over_quiet"] = round(run["inject_seconds"] / quiet["inject_seconds"], 2)
            if n == 1:
                out["new_one_burner_within_2x_quiet"] = seconds(run) / seconds(quiet) <= 2.0
    for key in new:
        if seconds(runs["main"].get(key, {})) and seconds(new[key]):
            out[f"main_over_new_{key}"] = round(seconds(runs["main"][key]) / seconds(new[key]), 1)
    return out


if __name__ == "__main__":
    main()
