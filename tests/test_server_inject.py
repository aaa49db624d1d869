"""Injects through `memcli serve`: the same report, pool and memory as in this process; asking while
one runs (answers from the last commit); a client that leaves, a server that is killed or stopped,
Ctrl-C and SIGTERM on the command (the report of what was kept), the stop request.

Every wait is on an event (a line on the socket, a process exit, `ps` showing a change, a test-only
pause) with a generous deadline; nothing counts what happens within a time window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from memcli.cli.inject import interrupted_line
from memcli.cli.interrupts import STOPPING
from memcli.server import address as server_address
from memcli.server.client import Client, ServerError, ServerGone, Upload
from memcli.store import PoolStore
from memcli.wire import Event, InjectParams, InjectReport

from .helpers import (
    DEADLINE, QUESTION, TEXTS, env_for_server, local, logged_sources, make_pool, many_texts, run_cli, run_process,
    served_answer, streamed, upload, wait_for,
)


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
        uploads = [Upload.of_file(str(path), open(path, "rb"), "text", encoding="latin-1", forced=True)
                   for path in (latin, files[1])]
        served_events = [e for e in client.inject(InjectParams("there", force=True), uploads) if isinstance(e, Event)]
    untimed = lambda events: [replace(e, seconds=0.0) for e in events]  # noqa: E731
    assert untimed(served_events) == untimed(events_here)
    assert [(e.file_index, e.files_total) for e in served_events if e.kind == "file"] == [(1, 2), (2, 2)]
    a, b = pools.load(store, "here"), pools.load(store, "there")
    assert torch.equal(a.state.slots, b.state.slots)

    # nothing readable to send: the server reports the skip as in-process
    nope = run_cli("inject", str(tmp_path / "nope.txt"), "--pool", "there", "--json")
    assert nope.exit_code == 3 and strip(json.loads(nope.stdout)) == \
        strip(app.inject("here", [str(tmp_path / "nope.txt")]).to_json())
    bad = run_cli("inject", str(tmp_path / "nope.txt"), "--pool", "bad/name")
    assert bad.exit_code == 1 and "invalid pool name" in bad.stderr

    # pool info goes through the server too, and says the same
    info = run_cli("pool", "info", "there", "--json")
    assert json.loads(info.stdout) == app.pool_info("there")


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
        events = injector.inject(InjectParams("live"), [upload(p) for p in files])
        for event in events:
            if isinstance(event, Event) and event.kind == "chunk":
                break
        # the inject is under way: ask while it runs (the server gives it the device between chunks)

        def drain():
            for event in events:
                if isinstance(event, InjectReport):
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
        events = client.inject(InjectParams("cut"), [upload(p) for p in files])
        for event in events:
            if isinstance(event, Event) and (event.kind == "commit" or event.kind == "file" and event.path.endswith("f02.txt")):
                break
        events.close()  # the client goes away
    with Client() as client:
        wait_for(lambda: all(m["active_requests"] == 0 for m in client.ps()["models"]), "the inject to stop")
        # the writer lock is free again and the pool is whole: another inject goes through
        for event in client.inject(InjectParams("cut"), [upload(files[-1])]):
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
            for event in client.inject(InjectParams("k"), [upload(p) for p in files]):
                if isinstance(event, Event) and event.kind == "file" and event.path.endswith("f03.txt"):
                    os.kill(server.proc.pid, signal.SIGKILL)
                    server.proc.wait(DEADLINE)
    store = PoolStore()
    assert store.verify("k") == []
    committed = logged_sources("k")
    assert 1 < len(committed) < 1 + len(files) and all(s["complete"] for s in committed)

    # the next command says so in one line, starts a fresh server and answers
    env = env_for_server()
    ask = run_process([sys.executable, "-m", "memcli", "--device", "cpu", "ask", QUESTION, "--pool", "k"],
                      env=env, timeout=DEADLINE)
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
        for event in client.inject(InjectParams("term"), [upload(p) for p in files]):
            if isinstance(event, Event) and event.kind == "file" and event.path.endswith("f03.txt"):
                server.proc.send_signal(signal.SIGTERM)
            if isinstance(event, InjectReport):
                done = event
    assert server.proc.wait(DEADLINE) == 130  # memcli's exit code for SIGTERM, after a clean shutdown
    assert done.interrupted is True  # the client is told what was kept
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


def test_a_stopped_inject_commits_the_chunk_it_made_and_reports_it(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "half", TEXTS[:1])
    PoolStore().fork("half", "whole")  # the same memory and drop generator
    path = tmp_path / "half-long.txt"
    path.write_text("\n".join(many_texts(40)))  # one file of many chunks
    with Client() as client:
        events = client.inject(InjectParams("half"), [upload(path)])
        done = []
        for event in events:
            if isinstance(event, Event) and event.kind == "chunk" and event.chunks == 1:
                assert client.stop_inject(events.id)["ok"] is True
            if isinstance(event, InjectReport):
                done.append(event)
    assert len(done) == 1
    report = done[0]
    assert report.interrupted is True and report.files == []
    partial = report.partial
    assert partial.path == str(path) and partial.status == "partial" and partial.chunks >= 1
    logged = logged_sources("half")[1:]
    assert [(s["path"], s["complete"], s["chunks"], s["tokens"]) for s in logged] == \
        [(str(path), False, partial.chunks, partial.tokens)]
    assert PoolStore().verify("half") == []
    # the next inject of it resumes after the kept chunks, and the result equals one whole run
    with Client() as client:
        for event in client.inject(InjectParams("half"), [upload(path)]):
            if isinstance(event, InjectReport):
                assert event.files[0].status == "resumed"
    app.inject("whole", [str(path)])
    store = PoolStore()
    import torch

    from memcli.pools import pool as pools

    assert torch.equal(pools.load(store, "half").state.slots, pools.load(store, "whole").state.slots)


def test_stopping_an_unknown_or_finished_inject_is_a_404(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "fin", TEXTS[:1])
    path = tmp_path / "fin-more.txt"
    path.write_text(TEXTS[1])
    with Client() as client:
        with pytest.raises(ServerError) as unknown:
            client.stop_inject("0123456789abcdef")
        assert unknown.value.status == 404 and "no inject '0123456789abcdef' is running" in str(unknown.value)
        events = client.inject(InjectParams("fin"), [upload(path)])
        done = [event for event in events if isinstance(event, InjectReport)]
        assert events.id and done and done[0].interrupted is False
        with pytest.raises(ServerError) as finished:
            client.stop_inject(events.id)
        assert finished.value.status == 404
        assert client.health() is not None  # no crash


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
    assert lines == [interrupted_line(InjectReport.from_json(report))], err
    assert err.count(STOPPING) == 1  # the first signal asked for the stop, as in-process
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
