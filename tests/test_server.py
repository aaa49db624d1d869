"""`memcli serve` end to end, over a real Unix socket (tiny random-weight checkpoints: the answers
are noise, so every comparison is exact equality with the same work done in this process).

Every wait is on an event (a line on the socket, a process exit, `ps` showing a change) with a
generous deadline; nothing counts what happens within a time window.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from memcli.cli import main as cli
from memcli.server import address as server_address
from memcli.app.api import Memcli
from memcli.server.client import Client, ServerError, ServerGone, Upload
from memcli.app.settings import load_settings
from memcli.store import PoolStore

from .support import REPO, fixture_checkpoint

DEADLINE = 180.0  # seconds: a loaded 2-core machine imports torch slowly
TEXTS = [
    "Alice took the train to Paris on Monday and met Bob at the station near the old river bridge.",
    "The meeting with Carol is on Friday at ten in the big room upstairs, next to the kitchen.",
    "Dave keeps the spare key under the blue flower pot by the back door of the green house.",
    "Erin flies to Oslo on the morning plane with her old red suitcase and a map of the fjords.",
]
QUESTION = "Where did Alice go on Monday?"



def logged_sources(pool: str) -> list[dict]:
    """The pool's injection log as committed (manifest + appended log), read without torch."""
    from memcli.pools import meta as pool_meta

    return pool_meta.pool_info(PoolStore(), pool)["sources"]

def many_texts(n: int) -> list[str]:
    words = "red blue green train river house key plane map room station bridge garden lamp".split()
    return [f"Note {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(30)) + f" number {i}." for i in range(n)]


@pytest.fixture
def ck() -> str:
    return str(fixture_checkpoint("memoryllm-8b-chat-tiny"))


def env_for_server(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # no thread setting of its own: the server computes with the same threads as this process, so
    # its results compare bit for bit with in-process ones (float sums depend on how work is split)
    env.pop("MEMCLI_SERVER", None)
    env.update(extra)
    return env


def wait_for(predicate, what: str, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log
        self.client = Client()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.client.stop()
            except Exception:  # noqa: BLE001 - already gone
                self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


def start_server(tmp_path: Path, *args: str, env: dict | None = None) -> Running:
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "memcli", "--device", "cpu", "serve", *args],
                                stdout=out, stderr=out, env=env or env_for_server())
    client = Client()

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): {log.read_text()}")
        return client.health()

    wait_for(ready, "the server to answer")
    client.close()
    return Running(proc, log)


@pytest.fixture
def server(tmp_path):
    running = start_server(tmp_path, "--keep-alive", "-1")
    yield running
    running.stop()
    assert "Traceback" not in running.log.read_text()


def local(ck: str) -> Memcli:
    return Memcli(load_settings(device="cpu", model=ck))


def make_pool(app: Memcli, tmp_path: Path, name: str, texts: list[str]) -> list[Path]:
    files = []
    for i, text in enumerate(texts):
        path = tmp_path / f"{name}-{i}.txt"
        path.write_text(text)
        files.append(path)
    app.inject(name, [str(f) for f in files])
    return files


def upload(path: Path) -> Upload:
    stream = open(path, "rb")
    return Upload(str(path), stream, os.fstat(stream.fileno()).st_size)


def served_answer(client: Client, pool: str, question: str, **kw) -> tuple[str, dict]:
    pieces, done = [], None
    for event in client.ask(pool, question, **kw):
        if event["event"] == "text":
            pieces.append(event["text"])
        elif event["event"] == "answer":
            done = event
    assert done is not None
    assert "".join(pieces) == done["answer"]  # the streamed pieces make the answer
    return done["answer"], done


def streamed(app, pool: str | None, question: str, **kw) -> str:
    """What the command line prints of an in-process answer: its streamed pieces."""
    pieces: list[str] = []
    args = (question,) if pool is None else (pool, question)  # a ChatSession, or a Memcli
    app.ask(*args, on_text=pieces.append, **kw)
    return "".join(pieces)


runner = CliRunner()


def run_cli(*args: str, env: dict | None = None, input: str | None = None):
    result = runner.invoke(cli.app, ["--device", "cpu", *args], env=env, input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# --------------------------------------------------------------------------- results equal in-process
def test_ask_through_server_equals_in_process(ck, tmp_path, server, monkeypatch):
    app = local(ck)
    make_pool(app, tmp_path, "notes", TEXTS[:2])
    expected = app.ask("notes", QUESTION)
    sampled = app.ask("notes", QUESTION, sampling=__import__("memcli.core.engine", fromlist=["Sampling"]).Sampling(0.8, 0.9, 7))

    with Client() as client:
        text, done = served_answer(client, "notes", QUESTION)
        assert text == expected.text
        assert done["new_tokens"] == len(expected.tokens)
        assert done["prompt_tokens"] == expected.prompt_tokens
        again, _ = served_answer(client, "notes", QUESTION)  # from the cached memory K/V
        assert again == expected.text
        text, _ = served_answer(client, "notes", QUESTION, temperature=0.8, top_p=0.9, seed=7)
        assert text == sampled.text

    # the command line finds the running server and prints the same answer
    monkeypatch.delenv("MEMCLI_SERVER")
    result = run_cli("ask", QUESTION, "--pool", "notes")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == streamed(app, "notes", QUESTION) + "\n"
    # --json: the same NDJSON events as in-process (timings aside)
    served = ndjson_events(run_cli("ask", QUESTION, "--pool", "notes", "--json").stdout)
    here = ndjson_events(run_cli("--no-server", "ask", QUESTION, "--pool", "notes", "--json").stdout)
    assert served == here
    assert served[-1]["event"] == "answer" and served[-1]["answer"] == expected.text
    assert "".join(e["text"] for e in served if e["event"] == "text") == expected.text

    # a missing pool: the same one-line error
    missing = run_cli("ask", QUESTION, "--pool", "note")
    assert missing.exit_code == 1 and missing.stderr.strip() == "memcli: error: pool note not found; did you mean notes?"
    assert run_cli("--no-server", "ask", QUESTION, "--pool", "note").stderr == missing.stderr
    # chat starts a pool that does not exist yet (issue 19): the same lines through the server and here
    chat = run_cli("chat", "--pool", "note", input="hi?\n")
    assert chat.exit_code == 1 and chat.stderr == run_cli("--no-server", "chat", "--pool", "note", input="hi?\n").stderr
    assert chat.stderr.splitlines()[0].endswith("; did you mean notes?")
    assert chat.stderr.splitlines()[1] == "memcli: error: pool note is still empty: /inject PATH... adds documents to it"
    for command in (["ask", QUESTION, "--pool"], ["chat", "--pool"], ["pool", "info"]):  # the store's one line
        invalid = run_cli(*command, "bad/name", input="hi?\n")
        assert invalid.exit_code == 1 and "invalid pool name" in invalid.stderr, invalid.stderr
        assert run_cli("--no-server", *command, "bad/name", input="hi?\n").stderr == invalid.stderr

    # --model (here after the command) of another model: refused from its config, as in-process, unloaded
    other = str(fixture_checkpoint("memoryllm-8b-tiny"))
    refused = run_cli("ask", QUESTION, "--pool", "notes", "--model", other)
    assert refused.exit_code == 1 and "belongs to model" in refused.stderr
    assert run_cli("--no-server", "ask", QUESTION, "--pool", "notes", "--model", other).stderr == refused.stderr
    with Client() as client:
        assert [m["model"] for m in client.ps()["models"]] == [ck]


TIMINGS = ("seconds", "seconds_to_first_token", "decode_tokens_per_second", "tokens_per_second")


def ndjson_events(stdout: str) -> list[dict]:
    """Output lines as JSON objects, without their timings (which differ from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in stdout.splitlines()]


def test_inject_through_server_equals_in_process(ck, tmp_path, server, monkeypatch):
    app = local(ck)
    files = []
    for i, text in enumerate(TEXTS):
        path = tmp_path / "docs" / (f"n{i}.md" if i % 2 else f"n{i}.txt")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        files.append(path)
    # both start from one state (a new pool draws its own random drop generator)
    make_pool(app, tmp_path, "here", ["The first note is about a small boat on a long grey lake in the north."])
    PoolStore().fork("here", "there")
    report_here = app.inject("here", [str(tmp_path / "docs"), str(tmp_path / "missing.txt")])

    monkeypatch.delenv("MEMCLI_SERVER")
    result = run_cli("inject", str(tmp_path / "docs"), str(tmp_path / "missing.txt"), "--pool", "there", "--json")
    assert result.exit_code == 3, result.stderr  # one input skipped, as in-process
    report_there = json.loads(result.stdout)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_second", "pool")}  # noqa: E731
    assert strip(report_there) == strip(report_here.to_json())

    import torch

    from memcli.pools import pool as pools

    store = PoolStore()
    a, b = pools.load(store, "here"), pools.load(store, "there")
    # the log names the client's files (the server only opened its own copies)
    assert [(s["path"], s["sha256"], s["tokens"]) for s in a.sources] == \
        [(s["path"], s["sha256"], s["tokens"]) for s in b.sources]
    assert torch.equal(a.state.slots, b.state.slots) and torch.equal(a.state.order, b.state.order)
    assert app.ask("here", QUESTION).text == app.ask("there", QUESTION).text

    # stdin: the client sends what it reads
    import io

    piped_text = "Frank sails to Bergen on a windy Tuesday with three friends and a large basket of bread."
    app.inject("here", ["-"], stdin=io.BytesIO(piped_text.encode()))
    piped = run_cli("inject", "-", "--pool", "there", "--json", input=piped_text)
    assert piped.exit_code == 0, piped.stderr
    a, b = pools.load(store, "here"), pools.load(store, "there")
    assert torch.equal(a.state.slots, b.state.slots)
    assert logged_sources("there")[-1]["path"] == "-"

    # a changed file, a type the folder ignores, --encoding: the same report as in-process
    (tmp_path / "docs" / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "docs" / "n0.txt").write_text(TEXTS[0] + " It rained all day long.")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Zoë drinks café au lait on the façade's terrace, naïvely.".encode("latin-1"))
    report_here = app.inject("here", [str(tmp_path / "docs"), str(latin)], encoding="latin-1")
    result = run_cli("inject", str(tmp_path / "docs"), str(latin), "--pool", "there", "--encoding", "latin-1", "--json")
    assert result.exit_code == 0, result.stderr
    assert strip(json.loads(result.stdout)) == strip(report_here.to_json())
    summary = report_here.summary()
    assert summary["changed"] == 1 and summary["already"] == 3 and summary["injected"] == 1
    assert summary["ignored_by_type"] == {".png": 1}
    human = run_cli("inject", str(tmp_path / "docs"), "--pool", "there")  # the summary line names them
    assert human.exit_code == 0 and "1 ignored by type (.png 1)" in human.stderr and "4 already in the pool" in human.stderr

    # --type and the progress events ("file k of n", positions) as in-process
    events_here: list = []
    app.inject("here", [str(latin), str(files[1])], force=True, type="text", encoding="latin-1", on_event=events_here.append)
    with Client() as client:
        served_events = [e for e in client.inject("there", [upload(latin), upload(files[1])], force=True, type="text",
                                                  encoding="latin-1") if "event" in e]
    drop = ("seconds",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in served_events] == \
        [{"event": e.kind, **{k: v for k, v in vars(e).items() if k not in drop + ("kind",)}} for e in events_here]
    assert [(e["file_index"], e["files_total"]) for e in served_events if e["event"] == "file"] == [(1, 2), (2, 2)]
    a, b = pools.load(store, "here"), pools.load(store, "there")
    assert torch.equal(a.state.slots, b.state.slots)

    # nothing to send: the command runs in-process and says what it would have said there
    assert run_cli("inject", str(tmp_path / "nope.txt"), "--pool", "there").exit_code == 3
    bad = run_cli("inject", str(tmp_path / "nope.txt"), "--pool", "bad/name")
    assert bad.exit_code == 1 and "invalid pool name" in bad.stderr

    # pool info goes through the server too, and says the same
    info = run_cli("pool", "info", "there", "--json")
    assert json.loads(info.stdout) == app.pool_info("there")


def test_openai_client_streams_and_completes_from_a_pool(ck, tmp_path, server):
    import openai

    app = local(ck)
    make_pool(app, tmp_path, "work", TEXTS)
    expected = app.ask("work", QUESTION, max_new_tokens=12)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server_address.socket_path())))
    oa = openai.OpenAI(base_url="http://memcli/v1", api_key="unused", http_client=http)

    assert "work" in [m.id for m in oa.models.list().data]
    assert oa.models.retrieve("work").id == "work"
    messages = [{"role": "user", "content": QUESTION}]
    done = oa.chat.completions.create(model="work", messages=messages, max_tokens=12)
    assert done.choices[0].message.content == expected.text
    assert done.usage.prompt_tokens == expected.prompt_tokens
    assert done.usage.completion_tokens == len(expected.tokens)
    assert done.usage.total_tokens == expected.prompt_tokens + len(expected.tokens)
    assert done.choices[0].finish_reason == ("stop" if expected.stopped else "length")

    pieces, usage, finish = [], None, None
    for chunk in oa.chat.completions.create(model="work", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == expected.text and usage.completion_tokens == len(expected.tokens) and finish

    # a stop string ends the answer before it: three characters that first occur at index 3 or later
    # (the tiny model's random answer may repeat itself, and its pool's drops are random)
    at = next(i for i in range(3, len(expected.text) - 2) if expected.text.find(expected.text[i : i + 3]) == i)
    stop = expected.text[at : at + 3]
    cut = oa.chat.completions.create(model="work", messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == expected.text[:at]
    assert cut.choices[0].finish_reason == "stop"

    # seed and temperature are honoured: same seed, same sample
    one = oa.chat.completions.create(model="work", messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    two = oa.chat.completions.create(model="work", messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert one.choices[0].message.content == two.choices[0].message.content

    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-pool", messages=messages)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="work", messages=messages, temperature=-1)
    http.close()


def test_conversation_keeps_earlier_turns_within_the_window(ck, tmp_path, server):
    from memcli.server.resident import conversation_prompt

    app = local(ck)
    make_pool(app, tmp_path, "talk", TEXTS[:1])
    loaded = app.model(ck)
    limit = loaded.max_input_tokens()
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i} about trains?"}, {"role": "assistant", "content": f"answer {i}."}]
    turns.append({"role": "user", "content": "and the last one?"})
    ids, dropped = conversation_prompt(loaded, turns, 8)
    assert dropped > 0 and len(ids) + 8 <= limit
    kept = turns[dropped:]
    from memcli.loading.prompts import chat_prompt_ids

    assert ids == chat_prompt_ids(loaded.tokenizer, kept)  # the oldest went first, the newest stayed
    short = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello."}, {"role": "user", "content": "and?"}]
    assert conversation_prompt(loaded, short, 8) == (chat_prompt_ids(loaded.tokenizer, short), 0)

    with Client() as client:
        events = list(client.chat("talk", turns, max_tokens=8))
    usage = [e["usage"] for e in events if e.get("usage")][-1]
    assert usage["prompt_tokens"] == len(ids)


# --------------------------------------------------------------------------- concurrency
def test_two_clients_on_different_pools_at_once(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "a", TEXTS[:2])
    make_pool(app, tmp_path, "b", TEXTS[2:])
    expected = {"a": app.ask("a", QUESTION).text, "b": app.ask("b", QUESTION).text}
    results: dict[str, list[str]] = {"a": [], "b": []}
    errors = []
    start = threading.Barrier(2)

    def worker(pool: str) -> None:
        try:
            with Client() as client:
                start.wait()
                for _ in range(3):
                    results[pool].append(served_answer(client, pool, QUESTION)[0])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    assert results == {"a": [expected["a"]] * 3, "b": [expected["b"]] * 3}


def test_ask_during_inject_answers_from_the_last_commit(ck, tmp_path, server):
    """One file per commit: what an ask answers must be exactly the in-process answer after the
    files committed by then, never a half-injected state."""
    app = local(ck)
    texts = many_texts(24)
    make_pool(app, tmp_path, "live", TEXTS[:1])
    PoolStore().fork("live", "ref")
    files = []
    for i, text in enumerate(texts):
        path = tmp_path / "many" / f"f{i:02}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        files.append(path)
    store = PoolStore()
    start_version = store.read_manifest("live")["version"]
    reference = {0: app.ask("ref", QUESTION).text}  # files committed -> the answer then
    for i, path in enumerate(files, 1):
        app.inject("ref", [str(path)])
        reference[i] = app.ask("ref", QUESTION).text

    seen = []
    finished = threading.Event()
    with Client() as injector, Client() as asker:
        events = injector.inject("live", [upload(p) for p in files])
        for event in events:
            if event.get("event") == "chunk":
                break
        # the inject is under way: ask while it runs (the server gives it the device between chunks)

        def drain():
            for event in events:
                if "report" in event:
                    finished.set()

        reader = threading.Thread(target=drain)
        reader.start()
        while not finished.is_set() and len(seen) < 50:
            text, done = served_answer(asker, "live", QUESTION)
            seen.append((done["pool_version"] - start_version, text))
        reader.join(DEADLINE)
    assert finished.is_set()
    assert store.read_manifest("live")["version"] - start_version == len(files)
    assert seen and any(committed < len(files) for committed, _ in seen), seen  # asked during the inject
    for committed, text in seen:
        assert text == reference[committed]


def test_client_leaving_mid_inject_cancels_it(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "cut", TEXTS[:1])
    files = []
    for i, text in enumerate(many_texts(30)):
        path = tmp_path / "cut" / f"f{i:02}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        files.append(path)
    with Client() as client:
        events = client.inject("cut", [upload(p) for p in files])
        for event in events:
            if event.get("event") == "commit" or event.get("event") == "file" and event["path"].endswith("f02.txt"):
                break
        events.close()  # the client goes away
    with Client() as client:
        wait_for(lambda: all(m["active_requests"] == 0 for m in client.ps()["models"]), "the inject to stop")
        # the writer lock is free again and the pool is whole: another inject goes through
        for event in client.inject("cut", [upload(files[-1])]):
            pass
    sources = logged_sources("cut")
    assert 1 < len(sources) < 1 + len(files)  # stopped part-way; committed files kept
    assert PoolStore().verify("cut") == []


def test_sigkill_mid_inject_leaves_the_last_commit_and_the_next_command_works(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "k", TEXTS[:1])
    files = []
    for i, text in enumerate(many_texts(30)):
        path = tmp_path / "k" / f"f{i:02}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        files.append(path)
    with Client() as client:
        with pytest.raises(ServerGone):
            for event in client.inject("k", [upload(p) for p in files]):
                if event.get("event") == "file" and event["path"].endswith("f03.txt"):
                    os.kill(server.proc.pid, signal.SIGKILL)
                    server.proc.wait(DEADLINE)
    store = PoolStore()
    assert store.verify("k") == []
    committed = logged_sources("k")
    assert 1 < len(committed) < 1 + len(files) and all(s["complete"] for s in committed)

    # the next command says so in one line, starts a fresh server and answers
    env = env_for_server()
    ask = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "ask", QUESTION, "--pool", "k"],
                         capture_output=True, text=True, env=env, timeout=DEADLINE)
    try:
        assert ask.returncode == 0, ask.stderr
        notes = [line for line in ask.stderr.splitlines() if "ended without stopping" in line]
        assert len(notes) == 1 and "last commit" in notes[0]
        assert ask.stdout == streamed(app, "k", QUESTION) + "\n"
        # and an inject through the fresh server resumes: every file ends up in once
        again = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "inject", *map(str, files), "--pool", "k"],
                               capture_output=True, text=True, env=env, timeout=DEADLINE)
        assert again.returncode == 0, again.stderr
        sources = logged_sources("k")
        assert sorted(s["path"] for s in sources[1:]) == sorted(map(str, files))
    finally:
        subprocess.run([sys.executable, "-m", "memcli", "stop"], env=env, timeout=DEADLINE, capture_output=True)


def test_sigterm_mid_inject_stops_at_the_last_commit(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "term", TEXTS[:1])
    files = []
    for i, text in enumerate(many_texts(40)):
        path = tmp_path / "term" / f"f{i:02}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        files.append(path)
    done = None
    with Client() as client:
        for event in client.inject("term", [upload(p) for p in files]):
            if event.get("event") == "file" and event["path"].endswith("f03.txt"):
                server.proc.send_signal(signal.SIGTERM)
            if "report" in event:
                done = event
    assert server.proc.wait(DEADLINE) == 130  # memcli's exit code for SIGTERM, after a clean shutdown
    assert done["interrupted"] is True  # the client is told what was kept
    store = PoolStore()
    assert store.verify("term") == []
    assert 1 < len(logged_sources("term")) < 1 + len(files)  # the inject was cancelled
    assert not server_address.socket_path().exists()


def test_inject_command_continues_on_a_fresh_server_after_a_sigkill(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "again", TEXTS[:1])
    folder = tmp_path / "again-docs"
    folder.mkdir()
    for i, text in enumerate(many_texts(60)):
        (folder / f"f{i:02}.txt").write_text(text)
    env = env_for_server()
    store = PoolStore()
    command = subprocess.Popen([sys.executable, "-m", "memcli", "--device", "cpu", "inject", str(folder), "--pool", "again"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: len(logged_sources("again")) >= 2, "a first commit")
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(DEADLINE)
        out, err = command.communicate(timeout=DEADLINE)
        assert command.returncode == 0, err
        notes = [line for line in err.splitlines() if "server" in line]
        assert len(notes) == 1 and "keeps its last commit" in notes[0] and "fresh server" in notes[0], err
        assert "Traceback" not in err
        paths = [s["path"] for s in logged_sources("again")[1:]]
        assert sorted(paths) == sorted(str(p) for p in folder.iterdir())  # each file once: resumed, not redone
        assert store.verify("again") == []
    finally:
        if command.poll() is None:
            command.kill()
        subprocess.run([sys.executable, "-m", "memcli", "stop"], env=env, timeout=DEADLINE, capture_output=True)


@pytest.fixture
def paused_server(tmp_path):
    """A server whose work waits at a slice boundary while the file `pause` exists (MEMCLI_TEST_PAUSE:
    the file names which boundary; the server creates pause.reached when it waits there)."""
    pause = tmp_path / "pause"
    running = start_server(tmp_path, "--keep-alive", "-1", env=env_for_server(MEMCLI_TEST_PAUSE=str(pause)))
    running.pause = pause
    yield running
    pause.unlink(missing_ok=True)
    running.stop()
    assert "Traceback" not in running.log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_a_routed_inject_reports_what_was_kept(ck, tmp_path, paused_server, sig):
    """The first Ctrl-C (or SIGTERM) asks the server to stop at its next chunk boundary; the command then shows
    the in-process report of what was kept (line, --json report, exit 130), and the pool holds
    exactly that. The signal lands mid-inject on any machine: the server waits before the second
    file (a test-only pause), and the command installs its own handlers (it works when the tests
    run with SIGINT ignored, as under nohup)."""
    app = local(ck)
    make_pool(app, tmp_path, "int", TEXTS[:1])
    folder = tmp_path / "int-docs"
    folder.mkdir()
    for i, text in enumerate(many_texts(80)):
        (folder / f"f{i:02}.txt").write_text(text)
    env = env_for_server()
    pause = paused_server.pause
    pause.write_text("file:2")  # after the first file is committed
    command = subprocess.Popen([sys.executable, "-m", "memcli", "--device", "cpu", "inject", str(folder), "--pool", "int",
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: Path(str(pause) + ".reached").exists() or command.poll() is not None, "the second file")
        command.send_signal(sig)
        out, err = command.communicate(timeout=DEADLINE)
    finally:
        pause.unlink(missing_ok=True)
        if command.poll() is None:
            command.kill()
    assert command.returncode == 130, err
    assert "Traceback" not in err and "memcli: interrupted" not in err
    report = json.loads(out)
    assert report["interrupted"] is True and report["pool"] == "int"
    kept = [f for f in report["files"] if f["status"] == "injected"]
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert lines == [cli.interrupted_line(_report_of(report))], err
    assert lines[0].startswith(f"interrupted: kept {len(kept)} complete file")
    # the pool holds exactly what the report says: those files, whole, and the committed chunks of
    # the file it stopped in (the server commits the chunk it made before it stops)
    sources = logged_sources("int")[1:]
    assert [(s["path"], s["chunks"]) for s in sources if s["complete"]] == [(f["path"], f["chunks"]) for f in kept]
    partial = report["partial"]
    assert [(s["path"], s["chunks"]) for s in sources if not s["complete"] and s["chunks"]] == \
        ([(partial["path"], partial["chunks"])] if partial else [])
    assert 1 <= len(kept) < 80
    assert PoolStore().verify("int") == []
    with Client() as client:  # the server is idle again and still serving
        wait_for(lambda: all(m["active_requests"] == 0 for m in client.ps()["models"]), "the inject to end")

    # "run the same command again to continue": every file ends up in once
    again = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "inject", str(folder), "--pool", "int"],
                           capture_output=True, text=True, env=env, timeout=DEADLINE)
    assert again.returncode == 0, again.stderr
    assert f"{len(kept)} already in the pool" in again.stderr
    assert ("1 resumed" in again.stderr) == (partial is not None), again.stderr
    paths = [s["path"] for s in logged_sources("int")[1:]]
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())


def test_a_stopped_inject_commits_the_chunk_it_made_and_reports_it(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "half", TEXTS[:1])
    PoolStore().fork("half", "whole")  # the same memory and drop generator
    path = tmp_path / "half-long.txt"
    path.write_text("\n".join(many_texts(40)))  # one file of many chunks
    with Client() as client:
        events = client.inject("half", [upload(path)])
        done = []
        for event in events:
            if event.get("event") == "chunk" and event["chunks"] == 1:
                assert client.stop_inject(events.id)["ok"] is True
            if "report" in event:
                done.append(event)
    assert len(done) == 1 and done[0]["interrupted"] is True
    report = done[0]["report"]
    assert report["interrupted"] is True and report["files"] == []
    partial = report["partial"]
    assert partial["path"] == str(path) and partial["status"] == "partial" and partial["chunks"] >= 1
    logged = logged_sources("half")[1:]
    assert [(s["path"], s["complete"], s["chunks"], s["tokens"]) for s in logged] == \
        [(str(path), False, partial["chunks"], partial["tokens"])]
    assert PoolStore().verify("half") == []
    # the next inject of it resumes after the kept chunks, and the result equals one whole run
    with Client() as client:
        for event in client.inject("half", [upload(path)]):
            if "report" in event:
                assert event["report"]["files"][0]["status"] == "resumed"
    app.inject("whole", [str(path)])
    store = PoolStore()
    import torch

    from memcli.pools import pool as pools

    assert torch.equal(pools.load(store, "half").state.slots, pools.load(store, "whole").state.slots)


def test_ctrl_c_with_no_server_to_take_the_stop_quits_keeping_the_last_commit(tmp_path, capsys):
    """The stop request finds no server: the command quits as before (the KeyboardInterrupt goes on
    to `memcli: interrupted`), saying that the pool keeps its last commit."""
    from memcli.cli.serve import _Stop

    class Events:  # a stream the server has named
        id = "0123456789abcdef"

        def __iter__(self):
            yield {"event": "file", "path": "a.txt"}
            threading.Event().wait()  # the server says nothing more

    def handle(event):
        raise KeyboardInterrupt  # Ctrl-C while an event is shown

    gone = type("Gone", (), {"path": tmp_path / "no-server.sock"})()
    with pytest.raises(KeyboardInterrupt):
        _Stop(gone, Events(), "p").run(handle)
    err = capsys.readouterr().err
    assert "the server did not take the stop; pool p keeps its last commit" in err


def test_a_second_ctrl_c_quits_at_once(tmp_path, capsys, monkeypatch):
    """The first Ctrl-C asks for the stop (the server took it) and reading goes on; the second one
    is not swallowed: it goes on to `memcli: interrupted`."""
    from memcli.server import client as client_module
    from memcli.cli.serve import _Stop

    asked = []
    monkeypatch.setattr(client_module.Client, "stop_inject", lambda self, inject_id: asked.append(inject_id) or {"ok": True})

    class Events:
        id = "0123456789abcdef"

        def __iter__(self):
            yield {"event": "file", "path": "a.txt"}
            yield {"event": "chunk", "path": "a.txt"}
            threading.Event().wait()  # the report would come later

    shown = []

    def handle(event):
        shown.append(event["event"])
        raise KeyboardInterrupt  # Ctrl-C while each event is shown

    with pytest.raises(KeyboardInterrupt):
        _Stop(type("C", (), {"path": tmp_path / "s.sock"})(), Events(), "p").run(handle)
    assert shown == ["file", "chunk"] and asked == ["0123456789abcdef"]  # one stop request, then the quit
    err = capsys.readouterr().err
    assert err.count("stopping once the chunk in progress is committed") == 1 and "did not take" not in err


def test_ctrl_c_during_the_upload_asks_for_the_stop_once_the_server_names_the_inject(tmp_path, capsys, monkeypatch):
    from memcli.server import client as client_module
    from memcli.cli.serve import _Stop

    asked = []
    monkeypatch.setattr(client_module.Client, "stop_inject", lambda self, inject_id: asked.append(inject_id) or {"ok": True})
    main = threading.main_thread().ident

    class Events:
        id = None

        def __iter__(self):
            signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the files are still being sent
            wait_for(lambda: stop.wanted, "the Ctrl-C to be seen")
            self.id = "0123456789abcdef"  # the server's first line
            yield {"event": "file", "path": "a.txt"}
            yield {"done": True, "report": {}}

    seen = []
    stop = _Stop(type("C", (), {"path": tmp_path / "s.sock"})(), Events(), "p")
    # Ctrl-C's own handler, as `memcli.cli.main.main` installs it: this works when the tests run with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop.run(seen.append)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert asked == ["0123456789abcdef"] and seen == [{"event": "file", "path": "a.txt"}, {"done": True, "report": {}}]


def _report_of(data: dict):
    from memcli.app.api import FileResult, InjectReport

    fields = {k: v for k, v in data.items() if k in InjectReport.__dataclass_fields__ and k not in ("files", "partial")}
    return InjectReport(**fields, files=[FileResult(**f) for f in data["files"]],
                        partial=FileResult(**data["partial"]) if data["partial"] else None)


def test_stopping_an_unknown_or_finished_inject_is_a_404(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "fin", TEXTS[:1])
    path = tmp_path / "fin-more.txt"
    path.write_text(TEXTS[1])
    with Client() as client:
        with pytest.raises(ServerError) as unknown:
            client.stop_inject("0123456789abcdef")
        assert unknown.value.status == 404 and "no inject '0123456789abcdef' is running" in str(unknown.value)
        events = client.inject("fin", [upload(path)])
        done = [event for event in events if "report" in event]
        assert events.id and done and done[0]["interrupted"] is False
        with pytest.raises(ServerError) as finished:
            client.stop_inject(events.id)
        assert finished.value.status == 404
        assert client.health() is not None  # no crash


# --------------------------------------------------------------------------- keep-alive
def test_keep_alive_expiry_unloads_the_model(ck, tmp_path):
    app = local(ck)
    make_pool(app, tmp_path, "ka", TEXTS[:1])
    running = start_server(tmp_path, "--keep-alive", "2s")
    try:
        with Client() as client:
            served_answer(client, "ka", QUESTION)
            ps = client.ps()
            assert ps["keep_alive_seconds"] == 2.0
            # loaded after the request (unless already expired), then unloaded: wait for the unload
            wait_for(lambda: client.ps()["unloads"] == 1 and client.ps()["models"] == [], "the model to unload")
            served_answer(client, "ka", QUESTION)  # loads again on demand
            wait_for(lambda: client.ps()["unloads"] == 2, "the second unload")
    finally:
        running.stop()


def test_keep_alive_zero_unloads_after_each_request_and_forever_keeps(ck, tmp_path, monkeypatch):
    app = local(ck)
    make_pool(app, tmp_path, "z", TEXTS[:1])
    monkeypatch.setenv("MEMCLI_KEEP_ALIVE", "0")  # the environment sets it when --keep-alive is not given
    running = start_server(tmp_path, env=env_for_server())
    try:
        with Client() as client:
            assert client.ps()["keep_alive_seconds"] == 0
            served_answer(client, "z", QUESTION)
            wait_for(lambda: client.ps()["models"] == [] and client.ps()["unloads"] == 1, "the unload")
    finally:
        running.stop()
    assert server_address.parse_keep_alive("-1") is None
    assert server_address.parse_keep_alive("5m") == 300 and server_address.parse_keep_alive(0) == 0
    with pytest.raises(ValueError):
        server_address.parse_keep_alive("soon")


def test_a_server_started_by_a_command_stops_when_idle(ck, tmp_path):
    app = local(ck)
    make_pool(app, tmp_path, "idle", TEXTS[:1])
    running = start_server(tmp_path, "--keep-alive", "1s", "--exit-when-idle")
    try:
        with Client() as client:
            served_answer(client, "idle", QUESTION)
        assert running.proc.wait(DEADLINE) == 0  # unloaded after 1 s, then stopped after 1 s idle
        assert not server_address.socket_path().exists()
    finally:
        running.stop()


def test_config_server_false_runs_in_process(ck, tmp_path, monkeypatch):
    from memcli.base import paths

    app = local(ck)
    make_pool(app, tmp_path, "inproc", TEXTS[:1])
    paths.config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.config_file().write_text('server = false\nkeep_alive = 600\n')
    assert load_settings().server is False and load_settings().keep_alive == "600"
    monkeypatch.delenv("MEMCLI_SERVER")
    result = run_cli("ask", QUESTION, "--pool", "inproc")
    assert result.exit_code == 0 and result.stdout == streamed(app, "inproc", QUESTION) + "\n"
    assert not server_address.socket_path().exists() and not server_address.lock_held()


# --------------------------------------------------------------------------- transport and access
def test_socket_and_its_folder_are_owner_only(server):
    folder = server_address.runtime_dir()
    info = os.stat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    sock = os.stat(server_address.socket_path())
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) & 0o077 == 0 and sock.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(server_address.info_path()).st_mode) == 0o600


def test_an_open_runtime_folder_is_closed_before_use(tmp_path):
    folder = server_address.runtime_dir()
    folder.mkdir(parents=True)
    os.chmod(folder, 0o755)
    server_address.ensure_runtime_dir()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_tcp_beyond_loopback_needs_a_token(monkeypatch):
    from memcli.server.http import check_tcp

    monkeypatch.delenv("MEMCLI_TOKEN", raising=False)
    with pytest.raises(server_address.AddressError, match="MEMCLI_TOKEN"):
        check_tcp("0.0.0.0", 8000, None)
    with pytest.raises(server_address.AddressError):
        check_tcp("192.168.1.20", None, "")
    assert check_tcp(None, 8000, None) == ("127.0.0.1", 8000)  # --port alone: loopback
    assert check_tcp("0.0.0.0", 8000, "secret") == ("0.0.0.0", 8000)
    assert check_tcp(None, None, None) is None
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "8000")  # refused before anything listens
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "MEMCLI_TOKEN" in lines[0] and "Traceback" not in result.stderr
    assert not server_address.socket_path().exists()


def test_tcp_requests_without_the_bearer_token_get_401(ck, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = start_server(tmp_path, "--port", str(port), env=env_for_server(MEMCLI_TOKEN="s3cret"))
    try:
        url = f"http://127.0.0.1:{port}/api/health"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).json()["ok"] is True
        assert running.client.health()["ok"] is True  # the owner-only Unix socket needs no token
    finally:
        running.stop()


def test_every_memcli_process_asks_mkl_for_reproducible_sums():
    """A server and a one-shot command answer alike only if MKL takes one code path in both
    (by default it picks kernels by memory alignment): importing memcli asks for that, and a
    value the user set is kept."""
    code = "import os, memcli; print(os.environ.get('MKL_CBWR'))"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env["PYTHONPATH"] = str(REPO)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "AUTO"
    env["MKL_CBWR"] = "COMPATIBLE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "COMPATIBLE"


def test_client_imports_no_torch(server, tmp_path, ck):
    code = ("import sys, memcli.server.client, memcli.cli.main, memcli.cli.serve; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env_for_server(), timeout=DEADLINE)
    app = local(ck)
    make_pool(app, tmp_path, "light", TEXTS[:1])
    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "memcli", "--device", "cpu", "ask", QUESTION,
                             "--pool", "light"], capture_output=True, text=True, env=env_for_server(), timeout=DEADLINE)
    assert traced.returncode == 0 and traced.stdout == streamed(app, "light", QUESTION) + "\n"
    imported = [line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")]
    assert "httpx" in imported and not [m for m in imported if m.split(".")[0] == "torch"]
    chat = subprocess.run([sys.executable, "-X", "importtime", "-m", "memcli", "--device", "cpu", "chat", "--pool", "light"],
                          input=QUESTION + "\n", capture_output=True, text=True, env=env_for_server(), timeout=DEADLINE)
    assert chat.returncode == 0 and chat.stdout == streamed(app, "light", QUESTION) + "\n", chat.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in chat.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in imported if m.split(".")[0] == "torch"]


# --------------------------------------------------------------------------- bad input
def test_bad_requests_get_one_line_errors_and_the_server_survives(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "ok", TEXTS[:1])
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server_address.socket_path())), base_url="http://m")

    def error(response, status):
        assert response.status_code == status, response.text
        message = response.json()["error"]["message"]
        assert message and "\n" not in message and "Traceback" not in message
        return message

    assert "pool nope not found" in error(http.post("/api/ask", json={"pool": "nope", "question": "q"}), 404)
    error(http.get("/api/pools/nope"), 404)
    error(http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "q"}]}), 404)
    error(http.get("/no/such/endpoint"), 404)
    error(http.post("/api/ask", content=b"{not json"), 400)
    error(http.post("/api/ask", json=["a", "list"]), 400)
    error(http.post("/api/ask", json={"pool": "ok", "question": 3}), 400)
    error(http.post("/api/ask", json={"pool": "../etc", "question": "q"}), 400)
    error(http.post("/api/ask", json={"pool": "ok", "question": "q", "max_new_tokens": 0}), 400)
    error(http.post("/api/ask", json={"pool": "ok", "question": "q", "temperature": "hot"}), 400)
    for body in ({"model": "ok", "messages": []}, {"model": "ok", "messages": [{"role": "robot", "content": "x"}]},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "top_p": 0},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "n": 2},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "stop": [1]},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10**6}):
        error(http.post("/v1/chat/completions", json=body), 400)
    error(http.post("/api/ask", content=b"x" * (5 * 1024**2)), 413)
    error(http.post("/api/inject?pool=ok", content=b'{"path": "a.txt", "size": 100}\nshort'), 400)
    error(http.post("/api/inject?pool=ok", content=b"no header at all"), 400)
    error(http.post("/api/inject", content=b""), 400)
    # an error found after the stream started is its last line, one line
    with Client() as client, pytest.raises(ServerError, match="reads at most"):
        list(client.ask("ok", "word " * 500))
    assert http.get("/api/health").json()["ok"] is True
    assert served_answer(Client(), "ok", QUESTION)[0] == app.ask("ok", QUESTION).text
    http.close()
    assert "Traceback" not in server.log.read_text()


def test_ps_and_stop_commands(ck, tmp_path, server, monkeypatch):
    app = local(ck)
    make_pool(app, tmp_path, "shown", TEXTS[:1])
    served_answer(server.client, "shown", QUESTION)
    monkeypatch.delenv("MEMCLI_SERVER")
    ps = json.loads(run_cli("ps", "--json").stdout)
    assert ps["running"] and ps["models"][0]["model"] == ck and ps["models"][0]["forever"]
    assert [p["pool"] for p in ps["models"][0]["pools"]] == ["shown"] and ps["models"][0]["pool_bytes"] > 0
    assert ps["models"][0]["weights_bytes"] > 0
    human = run_cli("ps")
    assert human.exit_code == 0 and "shown (v" in human.stdout and "forever" in human.stdout
    result = run_cli("stop")
    assert result.exit_code == 0 and "stopped the memcli server" in result.stderr
    server.proc.wait(DEADLINE)
    assert not server_address.socket_path().exists()
    assert "no memcli server is running" in run_cli("ps").stderr


# --------------------------------------------------------------------------- the device queue and the budget
def test_device_queue_serves_clients_round_robin():
    from memcli.server.resident import Cancelled, DeviceQueue

    queue = DeviceQueue()
    order = []
    held = queue.acquire("a")
    threads = []

    def take(client: str, name: str) -> None:
        ticket = queue.acquire(client)
        order.append(name)
        queue.release(ticket)

    for client, name in (("b", "b1"), ("b", "b2"), ("b", "b3"), ("c", "c1"), ("c", "c2")):
        thread = threading.Thread(target=take, args=(client, name))
        thread.start()
        threads.append(thread)
        wait_for(lambda n=len(threads): queue.waiting() == n, "the ticket to queue")
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):  # a client that left gives its place up
        queue.acquire("d", cancelled)
    queue.release(held)
    for thread in threads:
        thread.join(DEADLINE)
    assert order == ["b1", "c1", "b2", "c2", "b3"]


def test_pool_states_stay_within_the_memory_budget(ck, tmp_path):
    from memcli.app.api import answer_prompt, decode_answer
    from memcli.server.resident import Resident

    app = local(ck)
    make_pool(app, tmp_path, "one", TEXTS[:1])
    make_pool(app, tmp_path, "two", TEXTS[1:2])
    resident = Resident(load_settings(device="cpu"), keep_alive=None, budget_bytes=1)
    try:
        model = resident.use_model(ck)
        loaded = model.app.model(ck)
        for name in ("one", "two"):
            state = resident.pool_state(model, name)
            ids, budget, _ = answer_prompt(loaded, QUESTION, None, 8)
            assert decode_answer(loaded, state.state, ids, budget).text == app.ask(name, QUESTION, max_new_tokens=8).text
        pools_kept = [p["pool"] for m in resident.snapshot()["models"] for p in m["pools"]]
        assert pools_kept == ["two"]  # the least recently used went out
        resident.done_with(model)
        resident2 = Resident(load_settings(device="cpu"), keep_alive=None, budget_bytes=10**9)
        model2 = resident2.use_model(ck)
        first = resident2.pool_state(model2, "one")
        assert resident2.pool_state(model2, "one") is first  # same version: kept
        app.inject("one", [str(tmp_path / "one-0.txt")], force=True)
        assert resident2.pool_state(model2, "one") is not first  # a new commit: a new state
        resident2.done_with(model2)
        resident2.close()
    finally:
        resident.close()


def test_an_ask_after_a_served_inject_reads_the_memory_kv_the_inject_kept(ck, tmp_path, monkeypatch):
    """The server keeps the state its inject committed as the pool's resident state: the next ask
    reads the memory K/V the inject updated (nothing is rebuilt) and answers what an in-process
    ask on the committed pool answers, token for token."""
    from memcli.app.api import answer_prompt, decode_answer
    from memcli.core.prefix import PrefixCache
    from memcli.server.resident import Resident

    app = local(ck)
    make_pool(app, tmp_path, "kept", TEXTS[:1])
    extra = tmp_path / "extra.txt"
    extra.write_text(TEXTS[2] * 3)
    resident = Resident(load_settings(device="cpu"), keep_alive=None, budget_bytes=10**9)
    try:
        model = resident.use_model(ck)
        loaded = model.app.model(ck)
        ids, budget, _ = answer_prompt(loaded, QUESTION, None, 8)
        decode_answer(loaded, resident.pool_state(model, "kept").state, ids, budget)  # builds the K/V once
        job = resident.job("test")
        with job:  # as the server injects: its resident state handed over, kept once committed
            model.app.inject("kept", [str(extra)], model=ck, take_loaded=lambda: resident.take_state(ck, "kept", job))
        builds = []
        original = PrefixCache.build
        monkeypatch.setattr(PrefixCache, "build", lambda self, state: (builds.append(1), original(self, state)))
        state = resident.pool_state(model, "kept")
        assert state.version == PoolStore().read_manifest("kept")["version"]
        got = decode_answer(loaded, state.state, ids, budget)
        assert builds == []  # the inject's K/V, updated row by row, answered
        assert got.tokens == app.ask("kept", QUESTION, max_new_tokens=8).tokens
        assert builds  # the in-process ask opened the pool afresh and built them (the counter counts)
        resident.done_with(model)
    finally:
        resident.close()


def test_an_answer_stops_at_the_next_token_once_its_client_left(ck, tmp_path):
    from memcli.app.api import answer_prompt, decode_answer
    from memcli.server.resident import Cancelled, Job, DeviceQueue, Resident

    app = local(ck)
    make_pool(app, tmp_path, "gone", TEXTS[:1])
    resident = Resident(load_settings(device="cpu"), keep_alive=None)
    try:
        model = resident.use_model(ck)
        loaded = model.app.model(ck)
        state = resident.pool_state(model, "gone")
        job = Job(DeviceQueue(), "c")
        pieces = []

        def on_text(text):
            pieces.append(text)
            job.cancelled.set()  # the client disconnects after the first piece

        with job, pytest.raises(Cancelled):
            decode_answer(loaded, state.state, answer_prompt(loaded, QUESTION, None, 30)[0], 30, on_text=on_text,
                          checkpoint=job.check_cancelled)
        assert len(pieces) == 1
        assert job.queue.acquire("next") is not None  # the device was given back
        resident.done_with(model)
    finally:
        resident.close()


def test_chat_through_the_server_is_a_conversation(ck, tmp_path, server, monkeypatch):
    """The same conversation through the server and in-process: the same answers (the second turn
    carries the first, /reset forgets both), the same --json lines."""
    app = local(ck)
    make_pool(app, tmp_path, "conv", TEXTS[:2])
    monkeypatch.delenv("MEMCLI_SERVER")
    lines = "first question?\nsecond question?\n/reset\nfirst question?\n"
    args = ["chat", "--pool", "conv", "--max-new-tokens", "6"]
    served = run_cli(*args, input=lines)
    here = run_cli("--no-server", *args, input=lines)
    assert served.exit_code == 0 and here.exit_code == 0, served.stderr + here.stderr
    assert served.stdout == here.stdout and served.stderr == here.stderr
    session = app.chat("conv", max_new_tokens=6)
    first, second = [streamed(session, None, q) for q in ("first question?", "second question?")]
    assert served.stdout == f"{first}\n{second}\n{first}\n"

    served_json = ndjson_events(run_cli(*args, "--json", input=lines).stdout)
    assert served_json == ndjson_events(run_cli("--no-server", *args, "--json", input=lines).stdout)
    assert [(e["event"], e.get("turn")) for e in served_json] == [("turn", 1), ("turn", 2), ("reset", None), ("turn", 1)]
    # the second turn's prompt carried the first as far as the window holds it (the random tiny
    # model's answer may not fit; test_cli shows a turn that does), the turn after /reset none
    fresh = app.chat("conv", max_new_tokens=6)
    fresh.ask("first question?")
    carried = fresh.ask("second question?").turns_in_prompt
    assert [e.get("turns_in_prompt") for e in served_json] == [0, carried, None, 0]
    assert served_json[0]["prompt_tokens"] == served_json[3]["prompt_tokens"]

    # /inject mid-conversation: the same report line and the next answer reads it
    PoolStore().fork("conv", "conv2")
    note = tmp_path / "later.txt"
    note.write_text(TEXTS[3])
    lines = f"first question?\n/inject {note} {tmp_path / 'gone.txt'}\nfirst question?\n"
    served_json = ndjson_events(run_cli("chat", "--pool", "conv", "--max-new-tokens", "6", "--json", input=lines).stdout)
    here_json = ndjson_events(run_cli("--no-server", "chat", "--pool", "conv2", "--max-new-tokens", "6", "--json",
                                      input=lines).stdout)
    unpooled = lambda events: [{k: v for k, v in e.items() if k != "pool"} for e in events]  # noqa: E731
    assert unpooled(served_json) == unpooled(here_json)
    assert [e["event"] for e in served_json] == ["turn", "inject", "turn"]
    assert served_json[1]["summary"]["injected"] == 1 and served_json[1]["summary"]["skipped"] == 1

    # earlier turns reach the server's prompt as they reach the in-process one
    history = [("first question?", "yes.")]
    expected = local(ck).ask("conv", "second question?", max_new_tokens=6, history=history)  # conv's last commit
    assert expected.turns_in_prompt == 1
    with Client() as client:
        text, done = served_answer(client, "conv", "second question?", max_new_tokens=6, history=history)
    assert text == expected.text and done["turns_in_prompt"] == 1 and done["prompt_tokens"] == expected.prompt_tokens
