"""The command line (tiny random-weight checkpoints: answers are meaningless, the plumbing is not).

Most tests run the Typer app in-process (CliRunner); a few start `python -m memcli` for what only a
real process shows: signals, streaming, the module entry point.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memcli.app.api import Memcli
from memcli.app.settings import load_settings
from memcli.base.errors import EXIT_INTERRUPTED, EXIT_SKIPPED, EXIT_USAGE
from memcli.base.text import shown
from memcli.cli.backends import CPU_WARNING, ModelNotes
from memcli.cli.inject import interrupted_line
from memcli.cli.interrupts import STOPPING
from memcli.ingest import pipeline
from memcli.store import PoolError, PoolStore
from memcli.wire import Event, InjectInterrupted

from .helpers import (
    ALICE, BROKEN_PAGE, CAROL, DAVE, ISO_Z, assert_one_error, err_lines, info, make_pdf, run, run_without_torch,
    subprocess_env, text_page, write,
)
from .support import fixture_checkpoint


# --------------------------------------------------------------------------- inject
def test_inject_every_kind_then_again_is_idempotent_and_force_reinjects(ck, docs):
    paths = [docs[k] for k in ("txt", "md", "html", "pdf")]
    result = run("inject", *paths, "--pool", "work", "--model", ck)
    assert result.exit_code == 0, result.stderr
    summary = err_lines(result)[-1]
    assert summary.startswith("injected 4 files (4 chunks, ") and "into pool work in" in summary
    first = info("work")
    assert [s["kind"] for s in first["files"]] == ["text", "markdown", "html", "pdf"]
    assert all(s["complete"] for s in first["files"]) and first["chunks"] == 4

    again = run("inject", *paths, "--pool", "work", "--json")
    assert again.exit_code == 0
    report = json.loads(again.stdout)
    assert report["chunks"] == 0 and {f["status"] for f in report["files"]} == {"already"}
    human = run("inject", docs["txt"], "--pool", "work")
    assert "already in the pool" in human.stderr and "nothing injected" in human.stderr
    assert info("work")["chunks"] == 4

    forced = run("inject", docs["txt"], "--pool", "work", "--force", "--json")
    assert forced.exit_code == 0
    assert json.loads(forced.stdout)["files"][0]["status"] == "injected"
    assert info("work")["chunks"] == 5 and info("work")["sources"] == 5


def test_inject_directory_with_glob(ck, tmp_path):
    folder = tmp_path / "notes"
    write(folder / "a.txt", ALICE)
    write(folder / "b.md", CAROL)
    write(folder / "sub" / "c.md", DAVE)
    result = run("inject", folder, "--glob", "*.md", "--pool", "notes", "--model", ck, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [Path(f["path"]).name for f in report["files"]] == ["b.md", "c.md"]
    assert report["model"] == ck and report["interrupted"] is False and report["chunks"] == 2


def test_inject_from_stdin(ck):
    result = run("inject", "-", "--pool", "piped", "--model", ck, "--json", input=ALICE + "\n" + CAROL)
    assert result.exit_code == 0, result.stderr
    [entry] = json.loads(result.stdout)["files"]
    assert entry["path"] == "-" and entry["status"] == "injected" and entry["chunks"] >= 1
    assert info("piped")["files"][0]["kind"] == "stdin"


def test_skipped_inputs_exit_3_with_one_line_reason_each(ck, docs, tmp_path):
    write(tmp_path / "bin.txt", b"\x00\x01\x02binary\x00" * 10)
    write(tmp_path / "empty.txt", b"")
    write(tmp_path / "odd\nname.md", b"")
    result = run("inject", docs["txt"], tmp_path / "missing.txt", tmp_path / "bin.txt", tmp_path / "empty.txt",
                 tmp_path / "odd\nname.md", "--pool", "s", "--model", ck)
    assert result.exit_code == EXIT_SKIPPED
    lines = err_lines(result)
    skipped = {line.split(":", 1)[0].removeprefix("skipped ").rsplit("/", 1)[-1]: line for line in lines if line.startswith("skipped ")}
    assert set(skipped) == {"missing.txt", "bin.txt", "empty.txt", "odd\\nname.md"}
    assert "No such file" in skipped["missing.txt"]
    assert "binary" in skipped["bin.txt"]
    assert "empty" in skipped["empty.txt"] and "empty" in skipped["odd\\nname.md"]
    assert lines[-1].startswith("injected 1 file (1 chunk, ") and "— 4 skipped (2 empty file, " in lines[-1]
    report = json.loads(run("inject", tmp_path / "empty.txt", "--pool", "s", "--json").stdout)
    assert report["files"][0]["status"] == "skipped"


@pytest.mark.parametrize("args, fragment", [
    (["--pool", "a/b"], "invalid pool name"),
    (["--pool", "c", "--chunk-tokens", "0"], "at least 16"),
    (["--pool", "c", "--chunk-tokens", "15"], "at least 16"),
    (["--pool", "c", "--chunk-tokens", "100000"], "longer than"),
])
def test_inject_refusals_are_one_line_errors(ck, docs, args, fragment):
    result = run("inject", docs["txt"], "--model", ck, *args)
    assert_one_error(result, fragment)
    assert not PoolStore().list()


def test_inject_without_paths_is_a_usage_error(ck):
    assert run("inject", "--pool", "p", "--model", ck).exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about machines without CUDA")
def test_cpu_warning_is_said_once(ck, docs, monkeypatch):
    monkeypatch.setattr(ModelNotes, "warned", False)
    first = run("inject", docs["txt"], "--pool", "w", "--model", ck, device=None)
    assert first.stderr.count(CPU_WARNING) == 1
    second = run("inject", docs["md"], "--pool", "w", device=None)
    assert CPU_WARNING not in second.stderr
    monkeypatch.setattr(ModelNotes, "warned", False)
    assert CPU_WARNING not in run("inject", docs["html"], "--pool", "w", device="cpu").stderr


# --------------------------------------------------------------------------- interrupt and resume
def test_interrupted_inject_keeps_committed_chunks_and_resumes(ck, tmp_path):
    rng = random.Random(7)
    words = "the a of train station river Alice Bob met went saw meeting room Friday Paris and to in on at".split()
    big = write(tmp_path / "big.txt", " ".join(rng.choice(words) for _ in range(40000)))
    command = [sys.executable, "-m", "memcli", "--device", "cpu", "inject", str(big), "--pool", "p", "--model", ck]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    store, committed, deadline = PoolStore(), 0, time.monotonic() + 120
    try:
        while committed == 0 and process.poll() is None and time.monotonic() < deadline:
            try:
                committed = store.read_manifest("p")["meta"]["totals"]["chunks"]
            except PoolError:
                pass
            time.sleep(0.02)
        # SIGTERM, not SIGINT: a job started in the background of a non-interactive shell (as CI
        # may run us) inherits SIGINT as ignored, and Python then keeps it ignored
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    # the first SIGTERM (or Ctrl-C) ends the inject once the chunk in progress is committed, as
    # through a server; the report names exactly what the pool holds
    assert STOPPING in stderr and "run the same command again" in stderr
    said = re.search(r"interrupted: kept ([\d,]+) chunks? of ", stderr)
    kept = info("p")  # loads the pool (retention is computed from its state)
    assert said and kept["chunks"] == int(said[1].replace(",", "")) > pipeline.COMMIT_EVERY  # after the first commit
    assert kept["files"][0]["complete"] is False
    verify = run("pool", "verify", "p")
    assert verify.exit_code == 0 and "ok" in verify.stdout

    resumed = run("inject", big, "--pool", "p", "--model", ck, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    [entry] = json.loads(resumed.stdout)["files"]
    assert entry["status"] == "resumed"
    whole = run("inject", big, "--pool", "q", "--model", ck, "--json")
    total = json.loads(whole.stdout)["chunks"]
    assert total > kept["chunks"]
    assert info("p")["chunks"] == info("q")["chunks"] == total
    assert entry["chunks"] == total - kept["chunks"]


def test_interruption_report_names_what_is_kept(ck, docs, tmp_path, monkeypatch):
    """API level: an interruption after a commit reports the committed part of the file in progress."""
    monkeypatch.setattr(pipeline, "COMMIT_EVERY", 2)
    long = write(tmp_path / "long.txt", " ".join([ALICE, CAROL, DAVE] * 8))
    app = Memcli(load_settings(model=ck, device="cpu"))
    commits = []

    def on_event(event):
        if event.kind == "commit":
            commits.append(event)
            if len(commits) == 2:
                raise KeyboardInterrupt

    with pytest.raises(InjectInterrupted) as stop:
        app.inject("i", [str(docs["txt"]), str(long)], on_event=on_event)
    report = stop.value.report
    assert report.interrupted and report.partial is not None
    assert (report.partial.path, report.partial.chunks) == (str(long), 4)
    assert report.to_json()["partial"]["chunks"] == 4
    assert interrupted_line(report) == (
        f"interrupted: kept 1 complete file and 4 chunks of {long}; run the same command again to continue")
    again = app.inject("i", [str(docs["txt"]), str(long)])
    assert [f.status for f in again.files] == ["already", "resumed"]


def test_progress_events_carry_position_file_k_of_n_and_pages(ck, docs, tmp_path):
    """Item 9: every file's position (bytes; pages of a PDF) and "file k of n"."""
    long = write(tmp_path / "long.txt", " ".join([ALICE, CAROL, DAVE] * 8))
    pages = write(tmp_path / "pages.pdf", make_pdf([text_page(ALICE[:60]), text_page(CAROL[:60]), text_page(DAVE[:60])]))
    events = []
    Memcli(load_settings(model=ck, device="cpu", )).inject("e", [str(long), str(docs["html"]), str(pages)],
                                                          on_event=events.append, chunk_tokens=16)
    files = [(e.file_index, e.files_total) for e in events if e.kind == "file"]
    assert files == [(1, 3), (2, 3), (3, 3)]
    text = [e for e in events if e.kind == "chunk" and e.path == str(long)]
    assert len(text) > 2 and all(e.total == long.stat().st_size and e.unit == "bytes" for e in text)
    done = [e.done for e in text]
    assert done == sorted(done) and 0 < done[0] and done[-1] <= long.stat().st_size
    assert all(e.seconds > 0 and e.start == 0 for e in text) and [e.chunks for e in text] == list(range(1, len(text) + 1))
    html = [e for e in events if e.kind == "chunk" and e.path == str(docs["html"])]
    assert html and all(e.total == docs["html"].stat().st_size for e in html)
    pdf = [e for e in events if e.kind == "chunk" and e.path == str(pages)]
    assert pdf and all(e.unit == "pages" and e.total == 3 for e in pdf) and pdf[-1].done == 3


# --------------------------------------------------------------------------- ask
def test_ask_json_and_one_line_errors(pool):
    result = run("ask", "Where did Alice go?", "--pool", pool, "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.stderr
    *texts, answer = [json.loads(line) for line in result.stdout.splitlines()]  # NDJSON (item 11)
    assert all(e["event"] == "text" for e in texts) and answer["event"] == "answer"
    assert "".join(e["text"] for e in texts) == answer["answer"]
    assert {"answer", "prompt_tokens", "new_tokens", "seconds_to_first_token", "seconds", "stopped"} <= set(answer)
    assert 1 <= answer["new_tokens"] <= 5 and answer["prompt_tokens"] > 0

    sampled = run("ask", "Where?", "--pool", pool, "--max-new-tokens", "3", "--temperature", "0.8",
                  "--top-p", "0.9", "--seed", "1")
    assert sampled.exit_code == 0 and sampled.stdout.endswith("\n")

    assert_one_error(run("ask", "   ", "--pool", pool), "empty")
    assert_one_error(run("ask", "Where?", "--pool", "nope"), "pool nope not found")
    assert_one_error(run("ask", "word " * 80, "--pool", pool, "--max-new-tokens", "4"), "tokens")


def test_ask_streams_from_a_real_process(pool, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "memcli", "--device", "cpu", "ask", "Where did Alice go?", "--pool", pool,
         "--max-new-tokens", "6"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and done.stdout.endswith("\n")
    assert done.stderr == ""


# --------------------------------------------------------------------------- chat
def _answer(ck: str, pool: str, question: str) -> str:
    """Greedy answer of a freshly loaded model and pool."""
    return Memcli(load_settings(model=ck, device="cpu")).ask(pool, question, max_new_tokens=4).text


def test_chat_driven_through_stdin(ck, pool, docs):
    before = _answer(ck, pool, "Where did Alice go?")
    script = f"Where did Alice go?\n\n/inject {docs['md']}\n/reset\nWhen is the meeting?\n"
    result = run("chat", "--pool", pool, "--max-new-tokens", "4", input=script)
    assert result.exit_code == 0, result.stderr
    assert "injected 1 file (1 chunk" in result.stderr
    assert [Path(s["path"]).name for s in info(pool)["files"]] == ["a.txt", "b.md"]
    # after /reset the second answer is a first turn again, from the memory with b.md in it
    after = _answer(ck, pool, "When is the meeting?")
    assert result.stdout == f"{before}\n{after}\n"

    bad = run("chat", "--pool", pool, "--max-new-tokens", "4", input="/bogus\nWho?\n/quit\nnot read\n")
    assert bad.exit_code == 1  # a failed line makes a scripted session fail
    assert bad.stdout == _answer(ck, pool, "Who?") + "\n"
    assert [l for l in err_lines(bad) if l.startswith("memcli: error: unknown command /bogus")]

    # a pool that does not exist yet: the chat starts it (issue 19), says so, and a question before
    # any /inject is one error naming what to do
    nope = run("chat", "--pool", "nope", input="hi\n")
    assert nope.exit_code == 1 and err_lines(nope)[0].startswith("pool nope is new and empty")
    assert err_lines(nope)[1:] == ["memcli: error: pool nope is still empty: /inject PATH... adds documents to it"]


def test_sigterm_ends_a_chat_with_exit_130(pool, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "memcli", "--device", "cpu", "chat", "--pool", pool, "--max-new-tokens", "3"],
        cwd=tmp_path, env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write(b"Where did Alice go?\n")
        process.stdin.flush()
        assert os.read(process.stdout.fileno(), 4096)  # answered: the model is loaded, chat waits for input
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_INTERRUPTED
    assert stderr.decode().strip() == "memcli: interrupted"


def test_a_kept_open_pool_sees_what_inject_adds(ck, docs):
    """API level: chat's /inject goes through the kept-open pool, so the next answer uses the new state."""
    settings = load_settings(model=ck, device="cpu")
    app = Memcli(settings)
    app.inject("k", [str(docs["txt"])])
    app.keep_open("k")
    kept = app._pools["k"]
    app.inject("k", [str(docs["md"])])
    assert app._pools["k"] is kept and len(kept.sources) == 2 and kept.sources[1]["complete"]
    assert kept.version == PoolStore().info("k").version
    mine = app.ask("k", "When is the meeting?", max_new_tokens=6)
    fresh = Memcli(settings).ask("k", "When is the meeting?", max_new_tokens=6)
    assert mine.tokens == fresh.tokens


# --------------------------------------------------------------------------- pools
def test_pool_commands(pool, tmp_path):
    listed = run("pool", "ls")
    assert listed.exit_code == 0 and "p" in listed.stdout and "updated" in listed.stdout
    [row] = json.loads(run("pool", "ls", "--json").stdout)
    assert row["name"] == "p" and row["sources"] == 1 and row["chunks"] == 1
    assert isinstance(row["bytes_on_disk"], int) and row["tokens"] > 0 and row["updated"].startswith("20")

    human = run("pool", "info", pool)
    assert human.exit_code == 0 and "retained" in human.stdout and "a.txt" in human.stdout
    facts = info(pool)
    [retained] = facts["retention"]
    assert retained["chunks"] == 1 and 0 < retained["share_retained"] <= 1

    assert run("pool", "fork", pool, "p2").exit_code == 0
    assert info("p2")["chunks"] == facts["chunks"]
    assert_one_error(run("pool", "fork", pool, "p2"), "already exists")
    assert run("pool", "rename", "p2", "p3").exit_code == 0
    assert [r["name"] for r in json.loads(run("pool", "ls", "--json").stdout)] == ["p", "p3"]

    tar = tmp_path / "p.tar"
    assert run("pool", "export", pool, tar).exit_code == 0 and tar.stat().st_size > 0
    assert run("pool", "import", tar, "copy").exit_code == 0
    copied = info("copy")
    assert (copied["chunks"], copied["sources"], copied["model"]) == (facts["chunks"], facts["sources"], facts["model"])
    assert run("pool", "verify", "copy").exit_code == 0
    assert_one_error(run("pool", "import", tar, "copy"), "already exists")

    refused = run("pool", "rm", "p3")
    assert_one_error(refused, "--yes")
    assert PoolStore().exists("p3")
    assert run("pool", "rm", "p3", "--yes").exit_code == 0
    assert not PoolStore().exists("p3")
    assert_one_error(run("pool", "rm", "p3", "--yes"), "not found")
    with PoolStore().writer("copy"):
        assert_one_error(run("pool", "rm", "copy", "--yes"), "being written")
    assert PoolStore().exists("copy")
    assert_one_error(run("pool", "info", "a/b"), "invalid pool name")


def test_verify_detects_a_flipped_byte(pool):
    store = PoolStore()
    part = next(iter(store.read_manifest(pool)["parts"]))
    path = store.root / ".objects" / store.read_manifest(pool)["parts"][part]["sha256"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))
    result = run("pool", "verify", pool)
    assert result.exit_code == 1
    assert part in result.stdout
    [line] = err_lines(result)
    assert line.startswith("memcli: error: pool p is damaged")


# --------------------------------------------------------------------------- models, doctor, settings
def _fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """A Hugging Face cache entry, laid out as huggingface_hub writes one (blobs + snapshot links)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in checkpoint.iterdir():
        blob = repo / "blobs" / file.name
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    return snapshot


def test_models_and_offline_pull(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads HF_HOME once, at import: point this process's cache at the test's
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rows = json.loads(run("models", "--json").stdout)
    from memcli.loading.catalog import ALIASES, BUNDLED

    assert [r["name"] for r in rows] == [*BUNDLED, *ALIASES]
    assert {r["name"]: r["status"] for r in rows} == {**dict.fromkeys(BUNDLED, "bundled"),
                                                      **dict.fromkeys(ALIASES, "not downloaded")}
    assert all(r["problem"] is None for r in rows if r["status"] == "bundled")
    snapshot = _fake_hub_cache(cache, "YuWangX/memoryllm-8b", fixture_checkpoint("memoryllm-8b-tiny"))
    rows = {r["name"]: r for r in json.loads(run("models", "--json").stdout)}
    assert rows["memoryllm-8b"]["status"] == "downloaded" and rows["mplus-8b"]["status"] == "not downloaded"
    table = run("models")
    assert table.exit_code == 0 and "downloaded" in table.stdout

    pulled = run("pull", "memoryllm-8b")  # offline, but complete in the cache
    assert pulled.exit_code == 0 and pulled.stdout.strip() == str(snapshot)
    offline = run("pull", "mplus-8b")  # item 6: says why, not "run memcli pull"
    assert_one_error(offline, "cannot download YuWangX/mplus-8b", "HF_HUB_OFFLINE")
    assert "memcli pull" not in offline.stderr
    assert_one_error(run("pull", "not-a-model"), "unknown model")

    (snapshot / "model.safetensors").unlink()
    rows = {r["name"]: r for r in json.loads(run("models", "--json").stdout)}
    assert rows["memoryllm-8b"]["status"] == "partial"


def test_config_file_then_environment_then_flag(memcli_home):
    config = memcli_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('model = "model-a"\ndtype = "bf16"\n')

    def settings(*args, env=None):
        result = run(*args, "doctor", "--json", env=env)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    report = settings()
    assert report["settings"]["model"] == "model-a" and report["settings"]["dtype"] == "bf16"
    assert report["resolved"]["device"] == "cpu" and report["paths"]["config_file"] == str(config)
    assert settings(env={"MEMCLI_MODEL": "model-b"})["settings"]["model"] == "model-b"
    assert settings("--model", "model-c", env={"MEMCLI_MODEL": "model-b"})["settings"]["model"] == "model-c"
    assert {"python", "torch", "cuda", "bitsandbytes", "quant_modes", "disk", "problems"} <= set(report)
    assert report["quant_modes"]["cpu"]["fp32"] is None

    human = run("doctor")
    assert human.exit_code == 0 and "model-a" in human.stdout and "quant" in human.stdout
    assert_one_error(run("--dtype", "fp8", "doctor"), "dtype")
    config.write_text("model = [broken")
    assert_one_error(run("doctor"), "not valid TOML")


# --------------------------------------------------------------------------- output conventions
def test_no_color_is_honoured(docs):
    forced = {"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    coloured = run("pool", "info", "missing", env=forced)
    assert "\x1b[" in coloured.stderr  # the test can see colour when there is some
    plain = run("pool", "info", "missing", env={**forced, "NO_COLOR": "1"})
    assert plain.exit_code == 1 and "\x1b[" not in plain.stderr + plain.stdout
    doctor = run("doctor", env={**forced, "NO_COLOR": "1"})
    assert doctor.exit_code == 0 and "\x1b[" not in doctor.stdout + doctor.stderr


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch):
    from memcli.app import catalog

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(catalog, "list_models", boom)
    result = run("models")
    assert_one_error(result, "unexpected RuntimeError: boom", "MEMCLI_DEBUG=1")
    debug = run("models", env={"MEMCLI_DEBUG": "1"})
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "memcli: error:" in debug.stderr


def test_shown_escapes_odd_characters():
    assert shown("a\nb\x1b[31m\udcff.txt") == "a\\nb\\x1b[31m\\udcff.txt"
    assert shown("naïve résumé.md") == "naïve résumé.md"


def test_python_m_memcli(tmp_path):
    env = subprocess_env(NO_COLOR="1")
    help_ = subprocess.run([sys.executable, "-m", "memcli", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "Usage" in help_.stdout and "inject" in help_.stdout
    assert "--install-completion" in help_.stdout
    version = subprocess.run([sys.executable, "-m", "memcli", "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"memcli {__import__('memcli').__version__}"
    usage = subprocess.run([sys.executable, "-m", "memcli", "ask"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


# =========================================================================== issue 13, item by item
def test_item1_relative_model_path_works_from_anywhere_and_moved_models_rebind(ck, docs, tmp_path, monkeypatch):
    import shutil

    here = tmp_path / "project"
    shutil.copytree(ck, here / "models" / "tiny")
    monkeypatch.chdir(here)
    assert run("inject", docs["txt"], "--pool", "rel", "--model", "models/tiny").exit_code == 0
    assert info("rel")["model"] == str(here / "models" / "tiny")  # stored absolute
    monkeypatch.chdir(tmp_path)
    assert run("ask", "Who?", "--pool", "rel", "--max-new-tokens", "2").exit_code == 0

    (here / "models" / "tiny").rename(here / "moved")
    gone = run("ask", "Who?", "--pool", "rel", "--max-new-tokens", "2")
    assert_one_error(gone, "not on this machine", "memcli pool rebind rel --model")
    # --model (or MEMCLI_MODEL) with the same config serves the run...
    assert run("ask", "Who?", "--pool", "rel", "--max-new-tokens", "2", "--model", here / "moved").exit_code == 0
    assert run("ask", "Who?", "--pool", "rel", "--max-new-tokens", "2",
               env={"MEMCLI_MODEL": str(here / "moved")}).exit_code == 0
    # ... and rebind records it
    rebound = run("pool", "rebind", "rel", "--model", here / "moved", "--json")
    assert rebound.exit_code == 0, rebound.stderr
    assert json.loads(rebound.stdout)["model"] == str(here / "moved")
    assert info("rel")["model"] == str(here / "moved")
    assert run("ask", "Who?", "--pool", "rel", "--max-new-tokens", "2").exit_code == 0
    other = fixture_checkpoint("memoryllm-8b-tiny")
    assert_one_error(run("pool", "rebind", "rel", "--model", other), "belongs to model")
    assert run("pool", "rebind", "rel").exit_code == EXIT_USAGE


def test_item2_ignored_files_are_counted_and_no_match_is_an_error(ck, tmp_path):
    folder = tmp_path / "media"
    write(folder / "a.png", b"\x89PNG" + bytes(200))
    write(folder / "b.zip", b"PK\x03\x04" + bytes(200))
    write(folder / "c.png", b"\x89PNG" + bytes(200))
    only_binaries = run("inject", folder, "--pool", "m", "--model", ck)
    assert_one_error(only_binaries, "nothing to inject", "3 ignored by type (.png 2, .zip 1")
    write(folder / "notes.txt", ALICE)
    mixed = run("inject", folder, "--pool", "m", "--model", ck)
    assert mixed.exit_code == 0 and "3 ignored by type (.png 2, .zip 1)" in err_lines(mixed)[-1]
    assert json.loads(run("inject", folder, "--pool", "m", "--json").stdout)["summary"]["ignored_by_type"] == {".png": 2, ".zip": 1}
    no_match = run("inject", folder, "--pool", "m2", "--model", ck, "--glob", "*.md")
    assert_one_error(no_match, "--glob '*.md' matched none of its")
    assert not PoolStore().exists("m2")


def test_item4_tables_are_not_wrapped_when_piped(ck, docs, tmp_path):
    import shutil

    deep = tmp_path / ("a-very-long-folder-name-" * 4) / "tiny-model-with-a-long-name"
    shutil.copytree(ck, deep)
    assert run("inject", docs["txt"], "--pool", "wide", "--model", deep).exit_code == 0
    listed = run("pool", "ls", env={"COLUMNS": "80"})
    [header, row] = listed.stdout.splitlines()
    assert row.split()[0] == "wide" and str(deep) in row and len(row) > 80
    [info_line] = [line for line in run("pool", "info", "wide").stdout.splitlines() if line.startswith("model")]
    assert str(deep) in info_line


def test_item5_doctor_stderr_is_clean(tmp_path):
    done = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "doctor"], cwd=tmp_path,
                          env=subprocess_env(NO_COLOR="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "quant on cpu" in done.stdout
    assert done.stderr == "", done.stderr


def test_item7_other_model_is_refused_from_its_config_before_any_weights(ck, pool, docs, monkeypatch):
    from memcli.loading import checkpoints as loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loading, "load_model", no_weights)
    monkeypatch.setattr(loading, "resolve_checkpoint", no_weights)
    other = fixture_checkpoint("memoryllm-8b-tiny")
    result = run("inject", docs["md"], "--pool", pool, "--model", other)
    assert_one_error(result, f"pool {pool} belongs to model", str(other))


def test_item8_missing_device_is_named_before_quantization(pool):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = run("ask", "Who?", "--pool", pool, "--quant", "nf4", device=None, env={"MEMCLI_DEVICE": "cuda"})
    assert_one_error(result, "device cuda (MEMCLI_DEVICE) is not available", "--device cpu")
    assert "nf4" not in result.stderr
    doctor = json.loads(run("doctor", "--json", device=None, env={"MEMCLI_DEVICE": "cuda"}).stdout)
    assert any("device cuda (MEMCLI_DEVICE) is not available" in p for p in doctor["problems"])


def test_item9_progress_display_fields():
    from memcli.cli.progress import InjectProgress

    progress = InjectProgress(enabled=False)
    with progress:
        progress(Event("file", "/x/a.txt", file_index=2, files_total=5, total=100))
        task = progress.progress.tasks[0]
        assert task.description == "file 2 of 5: a.txt"
        progress(Event("chunk", "/x/a.txt", chunks=1, tokens=512, done=50, total=100, seconds=10.0, start=0))
        assert task.fields["chunks"] == "1 chunk" and task.fields["rate"] == "51 tok/s"
        assert task.fields["eta"] == "ETA 0:10"  # the file's average: 50 units in 10 s, 50 to go
        # resumed at 40: only the 10 units done by this run count
        progress(Event("chunk", "/x/a.txt", chunks=2, tokens=1024, done=50, total=100, seconds=10.0, start=40))
        assert task.fields["chunks"] == "2 chunks" and task.fields["eta"] == "ETA 0:50"
        progress(Event("chunk", "/x/s.pdf", chunks=1, tokens=10, done=3, total=12, unit="pages", seconds=3.0))
        assert task.total == 12 and task.completed == 3 and task.fields["eta"] == "ETA 0:09"


def test_item10_markdown_named_pdf_is_injected_as_text(ck, tmp_path):
    fake = write(tmp_path / "notes.pdf", "# Notes\n\n" + CAROL + "\n")
    result = run("inject", fake, "--pool", "n", "--model", ck, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["files"][0]["status"] == "injected"
    assert info("n")["files"][0]["kind"] == "text"


def test_item11_json_is_consistent(ck, pool, tmp_path):
    import re

    from memcli.app.settings import Settings

    [row] = json.loads(run("pool", "ls", "--json").stdout)
    facts = info(pool)
    assert isinstance(row["sources"], int) and row["sources"] == facts["sources"] == len(facts["files"])
    for stamp in (row["created"], row["updated"], facts["created"], facts["updated"], facts["files"][0]["time"]):
        assert re.match(ISO_Z, stamp), stamp
    # an empty pool: retention present (and empty)
    Memcli(Settings(model=ck, device="cpu")).open_pool("empty", create=True)
    empty = info("empty")
    assert empty["retention"] == [] and empty["sources"] == 0 and empty["files"] == []
    # --json on verify, fork, rename, export, import
    assert json.loads(run("pool", "verify", pool, "--json").stdout) == {"pool": pool, "ok": True,
                                                                        "parts": PoolStore().info(pool).num_parts, "problems": []}
    assert json.loads(run("pool", "fork", pool, "f", "--json").stdout)["pool"] == "f"
    assert json.loads(run("pool", "rename", "f", "g", "--json").stdout) == {"pool": "g", "from": "f"}
    exported = json.loads(run("pool", "export", "g", tmp_path / "g.tar", "--json").stdout)
    assert exported["bytes"] == (tmp_path / "g.tar").stat().st_size
    assert json.loads(run("pool", "import", tmp_path / "g.tar", "h", "--json").stdout)["pool"] == "h"
    # chat --json: one line per turn; the second turn carries the first in its prompt
    chat = run("chat", "--pool", pool, "--max-new-tokens", "3", "--json", input="Where did Alice go?\nAnd then?\n")
    assert chat.exit_code == 0, chat.stderr
    turns = [json.loads(line) for line in chat.stdout.splitlines()]
    assert [t["event"] for t in turns] == ["turn", "turn"] and [t["turn"] for t in turns] == [1, 2]
    assert turns[0]["turns_in_prompt"] == 0 and turns[1]["turns_in_prompt"] == 1
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]


def test_item11_chat_is_a_conversation_within_the_window(ck, pool):
    """Issue 11 item 7: earlier turns go into the prompt; the oldest are dropped first; reset clears."""
    from memcli.app.settings import Settings

    app = Memcli(Settings(model=ck, device="cpu"))
    # one-token answers: whatever the randomly-dropped tiny pool answers, a turn fits the window
    session = app.chat(pool, max_new_tokens=1)
    first = session.ask("Where did Alice go?")
    assert first.turns_in_prompt == 0 and session.turns == [("Where did Alice go?", first.text.strip())]
    second = session.ask("Who did she meet?")
    assert second.turns_in_prompt == 1 and second.prompt_tokens > first.prompt_tokens
    limit = app.model().max_input_tokens()
    for _ in range(40):  # far more turns than the window holds
        answer = session.ask("Tell me more about the station and the old river bridge, please.")
        assert answer.prompt_tokens + 1 <= limit
    assert answer.turns_in_prompt < len(session.turns) - 1  # the oldest were dropped
    session.reset()
    assert session.ask("Where did Alice go?").tokens == first.tokens


def test_item12_global_options_after_the_command(ck, pool):
    from memcli.cli.app import hoist_global_options

    assert hoist_global_options(["ask", "q", "--pool", "p", "--device", "cpu", "--model=m", "--", "--quant"]) == \
        ["--device", "cpu", "--model=m", "ask", "q", "--pool", "p", "--", "--quant"]
    result = run("ask", "Where?", "--pool", pool, "--device", "cpu", "--model", ck, "--max-new-tokens", "2", device=None)
    assert result.exit_code == 0, result.stderr
    assert run("pool", "info", pool, "--device", "cpu").exit_code == 0


def test_item13_default_pool_from_config(pool):
    assert run("ask", "Where?", "--max-new-tokens", "2").exit_code == EXIT_USAGE
    assert "memcli config set pool" in run("ask", "Where?").stderr
    assert run("config", "set", "pool", pool).exit_code == 0
    assert run("config", "get", "pool").stdout == f"{pool}\n"
    assert run("ask", "Where?", "--max-new-tokens", "2").exit_code == 0
    assert json.loads(run("pool", "info", "--json").stdout)["name"] == pool
    assert run("pool", "verify").exit_code == 0
    assert run("config", "get", "pool", env={"MEMCLI_POOL": "other"}).stdout == "other\n"
    rows = {r["key"]: r for r in json.loads(run("config", "get", "--json", env={"MEMCLI_POOL": "other"}).stdout)}
    assert rows["pool"]["source"] == "environment" and rows["device"]["source"] == "command line"
    assert run("config", "unset", "pool").exit_code == 0
    assert run("config", "get", "pool").stdout == "\n"
    assert run("config", "set", "dtype", "fp8").exit_code == 1
    assert run("config", "get", "colour").exit_code == EXIT_USAGE


def test_item14_every_text_file_is_injected(ck, tmp_path):
    import gzip

    from memcli.ingest.extract.man import man_renderer

    folder = tmp_path / "src"
    texts = {"README": "This project parses the old river bridge logs every Monday morning.",
             "notes.rst": "Release notes\n=============\n\nThe train to Paris leaves on Monday at noon.",
             "plan.org": "* Plan\n** Meet Bob at the station near the old river bridge on Monday",
             "paper.tex": "\\section{Intro} Alice took the train to Paris on Monday and met Bob.",
             "data.csv": "name,city,day\nAlice,Paris,Monday\nBob,Paris,Monday\nCarol,Oslo,Friday\n",
             "conf.json": '{"meeting": "Friday at ten", "room": "upstairs next to the kitchen"}',
             "tool.py": "def greet(name):\n    return f'hello {name}, the meeting is on Friday'\n"}
    for name, text in texts.items():
        write(folder / name, text)
    write(folder / "latin.txt", ("Le comité se réunit à l'hôtel de ville près du marché. " * 3).encode("latin-1"))
    write(folder / "log.txt.gz", gzip.compress((DAVE + "\n").encode()))
    result = run("inject", folder, "--pool", "t", "--model", ck, "--json")
    assert result.exit_code == 0, result.stderr
    statuses = {Path(f["path"]).name: f["status"] for f in json.loads(result.stdout)["files"]}
    assert statuses == dict.fromkeys([*sorted(texts), "latin.txt", "log.txt.gz"], "injected") or \
        set(statuses.values()) == {"injected"}
    man = write(tmp_path / "man" / "foo.1.gz", gzip.compress(
        b".TH FOO 1\n.SH NAME\nfoo \\- keeps the spare key under the blue flower pot\n.SH DESCRIPTION\n"
        b"\\fBfoo\\fR reads the notes of the meeting with Carol on Friday at ten.\n"))
    man_run = run("inject", man, "--pool", "t", "--json")
    if man_renderer() is None:
        assert man_run.exit_code == EXIT_SKIPPED and "no renderer" in man_run.stdout
    else:
        assert man_run.exit_code == 0 and json.loads(man_run.stdout)["files"][0]["status"] == "injected"
        assert info("t")["files"][-1]["kind"] == "man"
    odd = write(tmp_path / "odd.dat", b"\x01\x02\x03\x04" * 20 + ALICE.encode() * 2)
    assert run("inject", odd, "--pool", "t").exit_code == EXIT_SKIPPED
    assert run("inject", odd, "--pool", "t", "--type", "text").exit_code == 0
    far = write(tmp_path / "far.txt", b"word " * 3000 + "déjà vu à l'été".encode("latin-1"))
    assert "--encoding" in run("inject", far, "--pool", "t").stderr
    assert run("inject", far, "--pool", "t", "--encoding", "latin-1").exit_code == 0
    assert_one_error(run("inject", far, "--pool", "t", "--encoding", "klingon"), "unknown encoding")
    assert_one_error(run("inject", far, "--pool", "t", "--type", "word"), "--type")


def test_item15_help_shows_names_not_types_and_examples():
    for command in (["--help"], ["inject", "--help"], ["ask", "--help"], ["chat", "--help"], ["pool", "--help"],
                    ["pool", "ls", "--help"], ["pool", "rebind", "--help"], ["config", "get", "--help"], ["doctor", "--help"]):
        text = run(*command, env={"COLUMNS": "200"}).stdout
        assert "<bool>" not in text and "<list" not in text and "<str>" not in text, command
    assert "Examples" in run("inject", "--help", env={"COLUMNS": "200"}).stdout
    assert "PATH..." in run("inject", "--help", env={"COLUMNS": "200"}).stdout
    assert "Global options" in run("ask", "--help", env={"COLUMNS": "200"}).stdout


def test_item16_sources_are_absolute_paths_and_changed_files_are_injected_again(ck, tmp_path, monkeypatch):
    one = write(tmp_path / "one" / "notes.md", ALICE)
    two = write(tmp_path / "two" / "notes.md", CAROL)
    monkeypatch.chdir(tmp_path / "one")
    assert run("inject", "notes.md", "--pool", "s", "--model", ck).exit_code == 0
    monkeypatch.chdir(tmp_path / "two")
    assert run("inject", "notes.md", "--pool", "s").exit_code == 0
    assert [f["path"] for f in info("s")["files"]] == [str(one), str(two)]
    same = run("inject", str(one), "--pool", "s")
    assert "nothing injected" in same.stderr and "1 already in the pool" in same.stderr
    one.write_text(ALICE + " Later she went home.")
    changed = run("inject", str(one), "--pool", "s", "--json")
    assert changed.exit_code == 0
    report = json.loads(changed.stdout)
    assert report["files"][0]["status"] == "changed" and report["summary"]["changed"] == 1
    files = info("s")["files"]
    assert len(files) == 3 and files[0]["superseded_by"] == files[2]["id"] and files[2]["path"] == str(one)
    human = run("inject", str(two), str(one), "--pool", "s")
    assert "2 already in the pool" in err_lines(human)[-1]


def test_item17_completion_of_pools_models_and_chat_paths(pool, tmp_path):
    from memcli.cli.chat import chat_completer

    def complete(words: str) -> list[str]:
        env = subprocess_env(_MEMCLI_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))
        done = subprocess.run([sys.executable, "-m", "memcli"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        return done.stdout.split()

    assert pool in complete(f"memcli ask --pool {pool[0]}")
    assert "memoryllm-8b-chat" in complete("memcli --model memoryllm-8b-c")
    assert pool in complete("memcli pool info ")
    write(tmp_path / "docs" / "a.md", "x")
    completer = chat_completer(lambda: "/inject " + str(tmp_path / "do"))
    assert completer(str(tmp_path / "do"), 0) == str(tmp_path / "docs") + "/"
    assert chat_completer(lambda: "/re")("/re", 0) == "/reset "


def test_item18_ask_dash_reads_the_question_from_stdin(pool):
    piped = run("ask", "-", "--pool", pool, "--max-new-tokens", "3", "--json", input="Where did Alice go?\n")
    direct = run("ask", "Where did Alice go?", "--pool", pool, "--max-new-tokens", "3", "--json")
    assert piped.exit_code == 0 and piped.stdout.splitlines()[-1].split('"seconds')[0] == \
        direct.stdout.splitlines()[-1].split('"seconds')[0]
    assert run("ask", "-", "--pool", pool, input="  \n").exit_code == EXIT_USAGE


def test_item19_one_wording_for_a_missing_pool_with_a_suggestion(pool):
    run("pool", "fork", pool, "work")
    for args in (["pool", "info", "wrok"], ["ask", "q", "--pool", "wrok"], ["pool", "rm", "wrok", "--yes"],
                 ["pool", "verify", "wrok"], ["pool", "fork", "wrok", "x"]):
        assert_one_error(run(*args, input=""), "pool wrok not found; did you mean work?")
    # chat starts a pool that does not exist yet (issue 19), with the same suggestion in its first line
    chat = run("chat", "--pool", "wrok", input="")
    assert chat.exit_code == 0 and err_lines(chat)[0].endswith("; did you mean work?")
    assert_one_error(run("pool", "info", "zzz"), "pool zzz not found (memcli pool ls lists pools")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about machines without CUDA")
def test_item20_cpu_warning_names_the_config_and_is_silenced_by_it(ck, docs, monkeypatch, memcli_home):
    monkeypatch.setattr(ModelNotes, "warned", False)
    first = run("inject", docs["txt"], "--pool", "w", "--model", ck, device=None)
    assert "memcli config set device cpu" in first.stderr
    assert run("config", "set", "device", "cpu").exit_code == 0
    monkeypatch.setattr(ModelNotes, "warned", False)
    assert CPU_WARNING not in run("inject", docs["md"], "--pool", "w", device=None).stderr


def test_item21_pathological_html_is_injected(ck, tmp_path):
    attributes = " ".join(f'a{i}="{i}"' for i in range(100_000))
    page = write(tmp_path / "tag.html", f"<p>{ALICE}</p><div {attributes}>{CAROL}</div>")
    result = run("inject", page, "--pool", "h", "--model", ck, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["chunks"] >= 1


def test_item22_doctor_checks_host_memory_for_the_cpu_path(monkeypatch):
    from memcli.app import doctor

    monkeypatch.setattr(doctor, "host_memory", lambda: {"total_bytes": 16 * 2**30, "available_bytes": 8 * 2**30,
                                                     "needed_bytes": None})
    report = json.loads(run("doctor", "--json").stdout)
    assert report["memory"]["needed_bytes"] > 24 * 2**30  # 8B in fp32
    [problem] = [p for p in report["problems"] if "GiB of memory" in p]
    assert "memoryllm-8b-chat" in problem and "--offline" in problem and "--model memcli-tiny" in problem
    assert "the model needs about" in run("doctor").stdout


LIGHT_COMMANDS = [["--help"], ["--version"], ["models"], ["models", "--json"], ["config", "get"],
                  ["config", "get", "model"], ["config", "set", "pool", "work"], ["inject", "--help"], ["pool", "--help"]]
LIGHT_COMMANDS += [["log"], ["log", "--json", "-q", "x"], ["log", "status"], ["log", "path"], ["log", "off"]]  # issue 20


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=" ".join)
def test_item23_light_commands_never_import_torch(args, tmp_path):
    done = run_without_torch(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("NO-TORCH")


def test_item23_completion_never_imports_torch(tmp_path):
    env = subprocess_env(_MEMCLI_COMPLETE="complete_bash", COMP_WORDS="memcli --model mem", COMP_CWORD="2")
    done = run_without_torch(cwd=tmp_path, env=env)
    assert "memoryllm-8b" in done.stdout and done.stderr.strip().endswith("NO-TORCH"), done.stderr


@pytest.mark.parametrize("args", [["pool", "ls"], ["pool", "ls", "--json"], ["pool", "info", "p"], ["pool", "verify", "p"]],
                         ids=" ".join)
def test_item23_pool_commands_never_import_torch(pool, args, tmp_path):
    """Fails until the store and pool metadata are torch-free (the store branch, issue 9): the
    traceback in the message names the module that imports torch."""
    done = run_without_torch(*args, cwd=tmp_path, env=subprocess_env(NO_COLOR="1", MEMCLI_DEBUG="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().endswith("NO-TORCH")


# --------------------------------------------------------------------------- the progress display on a terminal
@pytest.mark.skipif(not __import__("shutil").which("tmux"), reason="tmux is not installed")
def test_tty_progress_shows_file_k_of_n_and_leaves_no_stale_line(ck, tmp_path):
    """Items 3 and 9 in a real terminal (tmux): while it runs the display says "file k of n"; when
    inject ends, the screen holds the summary and nothing of the display (no "loading ..." line)."""
    rng = random.Random(3)
    words = "the a of train station river Alice Bob met went saw meeting room Friday Paris and to in on at".split()
    big = write(tmp_path / "docs" / "big.txt", " ".join(rng.choice(words) for _ in range(6000)))
    write(tmp_path / "docs" / "small.md", CAROL)
    socket, gate, raw = tmp_path / "tmux.sock", tmp_path / "go", tmp_path / "raw.log"
    env = subprocess_env()
    env.pop("TMUX", None)
    inner = (f"while [ ! -e {gate} ]; do sleep 0.05; done; "
             f"{sys.executable} -m memcli inject {big.parent} --pool tty --model {ck} --device cpu; "
             f"echo MEMCLI-EXIT=$?; sleep 600")
    tmux = ["tmux", "-S", str(socket), "-f", "/dev/null"]
    subprocess.run(tmux + ["new-session", "-d", "-x", "160", "-y", "40", "-s", "t", "sh", "-c", inner],
                   env=env, check=True, timeout=30)
    try:
        subprocess.run(tmux + ["pipe-pane", "-o", "-t", "t", f"cat > {raw}"], env=env, check=True, timeout=30)
        gate.touch()
        deadline = time.monotonic() + 300
        screen = ""
        while "MEMCLI-EXIT=" not in screen:  # wait for the command to end (an event, not a time window)
            assert time.monotonic() < deadline, screen
            time.sleep(0.2)
            screen = subprocess.run(tmux + ["capture-pane", "-p", "-t", "t"], env=env, capture_output=True,
                                    text=True, timeout=30).stdout
    finally:
        subprocess.run(tmux + ["kill-server"], env=env, timeout=30)
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    assert lines[-1] == "MEMCLI-EXIT=0", lines
    assert len(lines) == 2 and lines[0].startswith("injected 2 files ("), lines  # nothing stale above it
    recorded = raw.read_bytes().decode("utf-8", "replace")
    assert "file 1 of 2: big.txt" in recorded and "file 2 of 2: small.md" in recorded
    assert "chunks" in recorded and "tok/s" in recorded


def test_log_warnings_are_one_line_each_through_the_cli(ck, tmp_path):
    """An unreadable PDF page is logged by extract; the CLI says it as one line (through the live
    display's console while one is shown: the class of item 3)."""
    pdf = write(tmp_path / "half.pdf", make_pdf([text_page(ALICE[:70]), BROKEN_PAGE]))
    result = run("inject", pdf, "--pool", "w", "--model", ck)
    assert result.exit_code == 0, result.stderr
    [warning] = [line for line in err_lines(result) if line.startswith("memcli: warning: ")]
    assert "skipping unreadable page 2" in warning
