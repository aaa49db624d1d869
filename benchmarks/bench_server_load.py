"""One heavy request against everyone else, through a running server: a baseline revision and this
tree side by side in one run (issue 17).

    python benchmarks/bench_server_load.py [--baseline main] [--messages 10001] [--out benchmarks/results/cpu-server-load.json]

For each tree (the baseline's is extracted with `git archive`), a server on the conformance fixture
memoryllm-8b-chat-tiny (a chat template, a 72-token window) with two pools, then, wall time as a
client sees it:

  fit_alone        a /v1/chat/completions of N messages, max_tokens 1, alone: mostly fitting the
                   conversation to the window (the old code re-tokenized it once per dropped message)
  light_during     an /api/ask (8 tokens) on the other pool, sent once the heavy request is under way
  light_alone      the same ask with nothing else running
  stop_during      `memcli stop` while a heavy request runs, until the server has exited

A measure that does not finish within --timeout seconds is reported as {"timeout": seconds}.
Target: light_during within a few times light_alone (it waits a slice, not the heavy request).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_server import machine  # noqa: E402
from report import emit  # noqa: E402

SHARED = Path(os.environ.get("MEMCLI_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "conformance" / "memoryllm-8b-chat-tiny" / "checkpoint"
TEXT = "Alice took the train to Paris on Monday and met Bob at the station near the old river bridge."


def messages(n: int) -> list[dict]:
    out = []
    for i in reversed(range(n // 2)):
        out += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return out + [{"role": "user", "content": "and the last one?"}]


def run_tree(tree: Path, n: int, timeout: float) -> dict:
    import httpx

    home = Path(tempfile.mkdtemp(prefix="memcli-bench-load-"))
    env = dict(os.environ, PYTHONPATH=str(tree), MEMCLI_HOME=str(home / "h"), HF_HUB_OFFLINE="1",
               HF_HOME=str(home / "hf"), MKL_CBWR="AUTO")
    env.pop("MEMCLI_SERVER", None)
    py = [sys.executable, "-m", "memcli", "--device", "cpu"]
    for pool in ("heavy", "light"):
        (home / f"{pool}.txt").write_text(TEXT)
        subprocess.run(py + ["--no-server", "--model", str(FIXTURE), "inject", str(home / f"{pool}.txt"), "--pool",
                             pool], env=env, check=True, capture_output=True, cwd=tree)
    sock = home / "h" / "run" / "server.sock"
    result: dict = {}

    def start():
        log = open(home / "server.log", "ab")
        proc = subprocess.Popen(py + ["serve", "--keep-alive", "-1"], env=env, stdout=log, stderr=log, cwd=tree)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as probe:
                    if probe.get("http://m/api/health").status_code == 200:
                        return proc
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def client(limit: float = timeout):
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://m", timeout=limit)

    def timed(call) -> dict:
        began = time.perf_counter()
        try:
            call()
        except httpx.TimeoutException:
            return {"timeout": timeout}
        return {"seconds": round(time.perf_counter() - began, 3)}

    heavy_body = {"model": "heavy", "messages": messages(n), "max_tokens": 1}
    light_body = {"pool": "light", "question": "Where did Alice go?", "max_new_tokens": 8}
    proc = start()
    try:
        with client() as http:
            http.post("/api/ask", json=light_body)  # loads the model and both pool states once
            http.post("/api/ask", json={**light_body, "pool": "heavy"})
            result["light_alone"] = timed(lambda: http.post("/api/ask", json=light_body).raise_for_status())
            result["fit_alone"] = timed(lambda: http.post("/v1/chat/completions", json=heavy_body).raise_for_status())
        heavy = threading.Thread(target=lambda: _quiet(lambda: client().post("/v1/chat/completions", json=heavy_body)))
        heavy.start()
        time.sleep(0.5)  # the heavy request is under way (a benchmark, not a test: a pause is fine here)
        with client() as http:
            result["light_during"] = timed(lambda: http.post("/api/ask", json=light_body).raise_for_status())
        heavy.join(timeout)
        heavy = threading.Thread(target=lambda: _quiet(lambda: client().post("/v1/chat/completions", json=heavy_body)))
        heavy.start()
        time.sleep(0.5)
        began = time.perf_counter()
        try:
            subprocess.run(py + ["stop"], env=env, capture_output=True, timeout=timeout, cwd=tree)
            proc.wait(timeout)
            result["stop_during"] = {"seconds": round(time.perf_counter() - began, 3)}
        except subprocess.TimeoutExpired:
            result["stop_during"] = {"timeout": timeout}
        heavy.join(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log = (home / "server.log").read_text(errors="replace")
        result["asgi_exceptions_in_log"] = log.count("Exception in ASGI application")
        shutil.rmtree(home, ignore_errors=True)
    return result


def _quiet(call) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - the heavy request may be cut by the stop
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="main", help="git revision to compare with ('' for none)")
    parser.add_argument("--messages", type=int, default=10_001)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out")
    options = parser.parse_args()
    result = {"machine": machine(), "messages": options.messages, "fixture": "memoryllm-8b-chat-tiny", "runs": {}}
    scratch = Path(tempfile.mkdtemp(prefix="memcli-bench-trees-"))
    try:
        if options.baseline:
            old = scratch / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", options.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            result["runs"][f"baseline ({options.baseline})"] = run_tree(old, options.messages, options.timeout)
        result["runs"]["new"] = run_tree(REPO, options.messages, options.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(result, options.out)


if __name__ == "__main__":
    main()
