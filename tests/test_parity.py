"""Parity (issue 18): every routed command gives the same stdout, the same stderr lines and the same
exit code in this process (MEMCLI_SERVER=0) and through a running server, on the same pool: `ask`
(text, --json, --sources), `chat`, `inject` (its report, and the report of a Ctrl-C), `pool info`,
and their errors. Timings are the one thing allowed to differ: they are masked before comparing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import (
    ALICE, CAROL, DEADLINE, env_for_server, local, make_pool, many_texts, metric_samples, run, start_server, subprocess_env,
    wait_for,
)

TIMING_KEYS = ("seconds", "seconds_to_first_token", "decode_tokens_per_second", "tokens_per_second")
# a duration or a rate as the command line writes it ("in 1.2 s", "0.53 s", "14.2 tok/s", "3.1 chunks/s")
TIMING_TEXT = re.compile(r"\d[\d,]*(\.\d+)?\s*(ms|s|tok/s|tokens/s|chunks/s)\b")


def masked(text: str) -> str:
    """`text` with its timings masked: JSON (a document or lines) field by field, other lines by pattern."""
    try:
        return json.dumps(_masked_json(json.loads(text)), sort_keys=True)
    except ValueError:
        pass
    lines = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict):
            lines.append(json.dumps(_masked_json(data), sort_keys=True))
        else:
            lines.append(TIMING_TEXT.sub("<time>", line))
    return "\n".join(line for line in lines if line.strip())


def _masked_json(data):
    if isinstance(data, dict):
        return {k: ("<time>" if k in TIMING_KEYS else _masked_json(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_masked_json(v) for v in data]
    return data


def outcome(result) -> tuple[int, str, str]:
    return result.exit_code, masked(result.stdout), masked(result.stderr)


@pytest.fixture
def server(tmp_path):
    running = start_server(tmp_path, "--keep-alive", "-1")
    yield running
    running.stop()


def requests_answered(server) -> float:
    """How many requests the server has answered (its /metrics, leaving out the scrapes themselves)."""
    counted = metric_samples(server.client.http.get("/metrics").text).get("memcli_requests_total", [])
    return sum(sample.value for sample in counted if sample.labels["endpoint"] != "/metrics")


def both(monkeypatch, server, *args, input: str | None = None):
    """(in this process, through the server): each command's outcome. The first never reaches the
    server; the second does (a client that quietly ran in its own process would compare equal too)."""
    monkeypatch.setenv("MEMCLI_SERVER", "0")
    before = requests_answered(server)
    here = outcome(run(*args, input=input))
    assert requests_answered(server) == before, args
    monkeypatch.delenv("MEMCLI_SERVER")
    served = outcome(run(*args, input=input))
    assert requests_answered(server) > before, args
    return here, served


def test_reading_commands_are_the_same_in_process_and_through_a_server(ck, tmp_path, server, monkeypatch):
    make_pool(local(ck), tmp_path, "same", [ALICE, CAROL])
    commands = [
        ("ask", "Where did Alice go?", "--pool", "same", "--max-new-tokens", "4"),
        ("ask", "Where did Alice go?", "--pool", "same", "--max-new-tokens", "4", "--json"),
        ("ask", "When is the meeting?", "--pool", "same", "--max-new-tokens", "4", "--sources"),
        ("ask", "When is the meeting?", "--pool", "same", "--max-new-tokens", "4", "--json", "--sources"),
        ("pool", "info", "same"),
        ("pool", "info", "same", "--json"),
        ("ask", "Where?", "--pool", "sme", "--max-new-tokens", "4"),  # a missing pool: did you mean same?
        ("ask", "   ", "--pool", "same"),  # an empty question
        ("pool", "info", "nope"),
    ]
    for args in commands:
        here, served = both(monkeypatch, server, *args)
        assert here == served, args
    # the commands did run: an answer, its sources, and the errors
    assert both(monkeypatch, server, *commands[3])[0][0] == 0
    assert '"attribution"' in both(monkeypatch, server, *commands[3])[0][1]
    assert both(monkeypatch, server, *commands[6])[0][0] != 0 and "same" in both(monkeypatch, server, *commands[6])[0][2]


def test_chat_is_the_same_in_process_and_through_a_server(ck, tmp_path, server, monkeypatch):
    make_pool(local(ck), tmp_path, "talk", [ALICE])
    turns = "Where did Alice go?\nWho did she meet?\n/reset\nWhere did Alice go?\n"
    here, served = both(monkeypatch, server, "chat", "--pool", "talk", "--max-new-tokens", "4", input=turns)
    assert here == served
    assert here[0] == 0 and here[1].strip()
    here, served = both(monkeypatch, server, "chat", "--pool", "talk", "--max-new-tokens", "4", "--json", input=turns)
    assert here == served and here[1].count("\n") >= 2  # a JSON line per turn


def test_inject_is_the_same_in_process_and_through_a_server(ck, tmp_path, server, monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(many_texts(3)):
        (folder / f"n{i}.txt").write_text(text)
    (folder / "empty.txt").write_text("")
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    outcomes = []
    for where in ("served", "here"):  # the server first: the pool it keeps is gone before the second run
        if where == "here":
            monkeypatch.setenv("MEMCLI_SERVER", "0")
        else:
            monkeypatch.delenv("MEMCLI_SERVER", raising=False)
        before = requests_answered(server)
        first = outcome(run("inject", folder, "--pool", "fresh", "--model", ck))
        again = outcome(run("inject", folder, "--pool", "fresh", "--json"))  # every file already in
        assert (requests_answered(server) > before) == (where == "served")
        outcomes.append((first, again))
        removed = run("pool", "rm", "fresh", "--yes")
        assert removed.exit_code == 0, (removed.stdout, removed.stderr)
    assert outcomes[0] == outcomes[1]
    (code, out, err), (code_again, report, _) = outcomes[0]
    assert code == 3 and "empty file" in err  # injected, but a file was skipped: said, and exit 3
    assert code_again == 3 and json.loads(report)["summary"]["already"] == 3


@pytest.fixture
def pause(tmp_path):
    path = tmp_path / "pause"
    yield path
    path.unlink(missing_ok=True)


def _interrupted_inject(folder: Path, pause: Path, env: dict) -> tuple[int, str, str]:
    """`memcli inject FOLDER --json` in its own process, sent Ctrl-C while the work waits before the
    second file (the test-only pause: the same boundary in this process and in a server)."""
    pause.write_text("file:2")
    reached = Path(str(pause) + ".reached")
    reached.unlink(missing_ok=True)
    command = subprocess.Popen([sys.executable, "-m", "memcli", "--device", "cpu", "inject", str(folder), "--pool",
                                "int", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: reached.exists() or command.poll() is not None, "the second file")
        command.send_signal(signal.SIGINT)  # the command installs its own handler (nohup-proof)
        out, err = command.communicate(timeout=DEADLINE)
    finally:
        pause.unlink(missing_ok=True)
        if command.poll() is None:
            command.kill()
    return command.returncode, masked(out), masked(err)


def test_a_ctrl_c_report_is_the_same_in_process_and_through_a_server(ck, tmp_path, pause):
    folder = tmp_path / "int-docs"
    folder.mkdir()
    for i, text in enumerate(many_texts(6)):
        (folder / f"f{i}.txt").write_text(text)
    outcomes = []
    running = start_server(tmp_path, "--keep-alive", "-1", env=env_for_server(MEMCLI_TEST_PAUSE=str(pause)))
    try:
        make_pool(local(ck), tmp_path, "int", [ALICE])
        before = requests_answered(running)
        outcomes.append(_interrupted_inject(folder, pause, env_for_server()))
        assert requests_answered(running) > before  # the inject went to the server
    finally:
        running.stop()
    assert run("pool", "rm", "int", "--yes").exit_code == 0
    make_pool(local(ck), tmp_path, "int", [ALICE])
    outcomes.append(_interrupted_inject(folder, pause, subprocess_env(MEMCLI_SERVER="0", MEMCLI_TEST_PAUSE=str(pause))))
    served, here = outcomes
    assert served == here
    code, out, err = here
    report = json.loads(out)
    assert code == 130 and report["interrupted"] is True
    assert [f["status"] for f in report["files"]] == ["injected"]  # the first file, then the stop
    assert "interrupted: kept 1 complete file" in err
