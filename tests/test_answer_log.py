"""The log of answers (memcli/app/answer_log.py) and `memcli log` (memcli/cli/log.py), issue 20 item 3.

The wiring of ask/chat/server into record() comes later; here the log itself: the API, the command,
the file's mode, concurrent writers, the size bound, damaged files and `pool rm --purge-log`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memcli.app import answer_log as al
from memcli.cli import main as cli
from memcli.app.settings import load_settings

runner = CliRunner()

LAUNCH = {"pool": "work", "question": "When is the Orion launch?", "answer": "The Orion launch is on Friday at ten.",
          "via": "cli", "model": "memcli-tiny", "pool_version": 3, "seconds_to_first_token": 0.25, "seconds": 1.5,
          "prompt_tokens": 40, "new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "seed": 7}
KEY = {"pool": "home", "question": "Where is the spare key?", "answer": "Under the blue flower pot by the back door.",
       "via": "server"}


@pytest.fixture(autouse=True)
def fresh_connection():
    """Each test's MEMCLI_HOME is new: no connection kept by an earlier test is reused (the path
    check would refuse it anyway), and none is left open after the test."""
    al.close()
    yield
    al.close()


def run(*args: str, env: dict | None = None):
    result = runner.invoke(cli.app, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memcli: error: "), lines
    assert "unexpected" not in lines[0] and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def logged(*args: str) -> list[dict]:
    """`memcli log ARGS --json`, parsed."""
    result = run("log", *args, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def record(entry: dict, **kw) -> int:
    problems: list[str] = []
    new_id = al.record(entry, on_error=problems.append, **kw)
    assert problems == [] and new_id is not None, problems
    return new_id


# --------------------------------------------------------------------------- record, list, search, filter
def test_record_then_list_newest_first_with_every_field():
    first = record(LAUNCH)
    second = record({**KEY, "sources": {"sources": [{"source": "/notes/house.md", "mass": 0.4}]},
                     "conversation": "c1", "turn": 2})
    assert second > first
    rows = al.entries()
    assert [r["id"] for r in rows] == [second, first]
    launch = rows[1]
    for key, value in LAUNCH.items():
        assert launch[key] == value, key
    assert launch["sources"] is None and launch["conversation"] is None
    assert launch["time"].endswith("Z") and launch["time"][10] == "T" and len(launch["time"]) == 24
    assert rows[0]["sources"] == {"sources": [{"source": "/notes/house.md", "mass": 0.4}]}
    assert (rows[0]["conversation"], rows[0]["turn"], rows[0]["via"]) == ("c1", 2, "server")
    assert list(rows[0]) == list(al.COLUMNS)
    assert al.count() == 2 and al.count("work") == 1 and al.count("nowhere") == 0


def test_filters_pool_limit_since_and_query():
    ids = [record({**LAUNCH, "time": f"2026-01-0{day}T09:00:00Z"}) for day in (1, 2, 3)]
    key = record({**KEY, "time": "2026-01-04T09:00:00.000Z"})
    assert [r["id"] for r in al.entries(pool="work")] == ids[::-1]
    assert [r["id"] for r in al.entries(limit=2)] == [key, ids[2]]
    assert len(al.entries(limit=0)) == len(al.entries(limit=None)) == 4
    assert [r["id"] for r in al.entries(since="2026-01-03")] == [key, ids[2]]
    assert [r["id"] for r in al.entries(since="2026-01-03T10:00:00+01:00")] == [key, ids[2]]  # 09:00Z
    assert [r["id"] for r in al.entries(query="flower pot")] == [key]
    assert [r["id"] for r in al.entries(query="flower", pool="work")] == []
    assert [r["id"] for r in al.entries(query="orion", pool="work", limit=1)] == [ids[2]]
    with pytest.raises(al.LogError, match="ISO 8601"):
        al.entries(since="yesterday")


def test_q_finds_an_entry_by_a_word_of_its_answer_through_the_command():
    record(LAUNCH)
    key = record(KEY)
    assert [r["id"] for r in logged("-q", "flower")] == [key]  # a word of the answer only
    assert [r["id"] for r in logged("-q", "FLOWER")] == [key]
    assert [r["id"] for r in logged("-q", "flo*")] == [key]  # a prefix
    assert [r["id"] for r in logged("-q", "spare key")] == [key]  # words of the question
    assert logged("-q", "flower Orion") == []  # every word must be there
    assert [r["pool"] for r in logged("--pool", "work")] == ["work"]


SPECIAL = ['"', '""', "'", "*", "**", "NEAR(flower key)", "NEAR", "(", ")", "()", "flower)", "(flower",
           "AND", "OR", "NOT", "flower AND", "OR flower", "question:flower", "answer : x", "^flower", "-flower",
           "+", "{a b}", "flower\"pot", "%", "_", "\\", "\x00", "\u200f", "😀", "NEAR/2", "col*umn", "*flower"]


@pytest.mark.parametrize("fts", [True, False], ids=["fts5", "like"])
def test_special_characters_in_q_never_error(fts, monkeypatch):
    if not fts:  # a sqlite3 build without FTS5: the log is made without the index, searched with LIKE
        monkeypatch.setattr(al, "_fts5_available", lambda conn: False)
    key = record(KEY)
    record({**LAUNCH, "answer": 'It said "100%" of_it (maybe) * NEAR the end.'})
    assert al.status(load_settings())["search"] == ("fts5" if fts else "like")
    for text in SPECIAL:
        result = run("log", "-q", text, "--json")
        assert result.exit_code == 0, (text, result.stderr)
        assert isinstance(json.loads(result.stdout), list)
        al.entries(query=text)
    # a word is found in any case; with FTS5 also inside quotes and operators ("flower""pot" is a phrase)
    for text in ["flower", "FLOWER", "Flower pot"] + (['"flower"', "flower)", "(flower", 'flower"pot'] if fts else []):
        assert key in [r["id"] for r in al.entries(query=text)], text
    assert [r["pool"] for r in al.entries(query="100%")] == ["work"]
    assert [r["pool"] for r in al.entries(query="of_it")] == ["work"]


def test_the_table_escapes_control_characters_and_a_terminal_cut_keeps_rows_one_line():
    record({**KEY, "question": "Who?\x1b]0;owned\x07", "answer": "line one\nline two\x1b[31m red"})
    result = run("log")
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b]0;owned\\x07" in result.stdout and "line one line two\\x1b[31m red" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 2  # header + one row
    rows = logged()
    assert rows[0]["answer"] == "line one\nline two\x1b[31m red"  # JSON keeps the text as it was


def test_log_lists_the_newest_n_and_says_when_there_is_nothing():
    empty = run("log")
    assert empty.exit_code == 0 and empty.stdout == "" and "no answers logged yet" in empty.stderr
    assert logged() == []
    assert not al.path().exists()  # reading never creates the file
    ids = [record({**LAUNCH, "question": f"question {i}"}) for i in range(12)]
    assert [r["id"] for r in logged()] == ids[::-1][:10]  # 10 by default
    assert [r["id"] for r in logged("-n", "3")] == ids[::-1][:3]
    assert [r["id"] for r in logged("-n", "0")] == ids[::-1]
    table = run("log", "-n", "2")
    lines = table.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["id", "time"] and len(lines) == 3
    assert lines[1].split()[0] == str(ids[-1]) and "question 11" in lines[1]
    nothing = run("log", "-q", "zebra")
    assert nothing.exit_code == 0 and "no logged answer matches" in nothing.stderr


def test_path_and_status():
    path = run("log", "path")
    assert path.exit_code == 0 and path.stdout.strip() == str(al.path())
    assert Path(path.stdout.strip()).parent == Path(os.environ["MEMCLI_HOME"]) / "data"
    before = json.loads(run("log", "status", "--json").stdout)
    assert before["enabled"] and not before["exists"] and before["answers"] == 0
    assert before["max_bytes"] == 100 << 20
    record(LAUNCH)
    status = run("log", "status", env={"MEMCLI_LOG_MAX_MB": "7"})
    assert status.exit_code == 0
    text = status.stdout
    assert "on (the default)" in text and str(al.path()) in text and "answers 1" in " ".join(text.split())
    assert "7.0 MiB (MEMCLI_LOG_MAX_MB)" in text and "FTS5" in text


# --------------------------------------------------------------------------- on / off
def test_log_off_stops_recording_and_on_starts_it_again():
    record(LAUNCH)
    off = run("log", "off")
    assert off.exit_code == 0 and "off" in off.stderr
    assert "log = false" in (Path(os.environ["MEMCLI_HOME"]) / "config" / "config.toml").read_text()
    assert not al.enabled(load_settings())
    assert al.record(KEY, on_error=pytest.fail) is None
    assert al.count() == 1
    assert "logging of answers is off" in run("log", "-q", "zebra").stderr
    assert "off (log in " in run("log", "status").stdout
    on = run("log", "on")
    assert on.exit_code == 0 and al.enabled(load_settings())
    assert record(KEY) and al.count() == 2


def test_the_environment_and_explicit_settings_decide(monkeypatch):
    monkeypatch.setenv("MEMCLI_LOG", "0")
    assert al.record(LAUNCH, on_error=pytest.fail) is None and not al.path().exists()
    said = run("log", "on")  # written to the config file, but the environment wins: said so
    assert "MEMCLI_LOG in the environment overrides it" in said.stderr
    assert al.record(LAUNCH, on_error=pytest.fail) is None
    monkeypatch.delenv("MEMCLI_LOG")
    assert al.record(LAUNCH, settings=load_settings(log="false"), on_error=pytest.fail) is None
    assert record(LAUNCH) and al.count() == 1


def test_log_settings_through_memcli_config():
    assert run("config", "set", "log_max_mb", "50").exit_code == 0
    assert "log_max_mb = 50\n" in (Path(os.environ["MEMCLI_HOME"]) / "config" / "config.toml").read_text()
    assert load_settings().log_max_mb == 50 and al.max_bytes(load_settings()) == 50 << 20
    got = json.loads(run("config", "get", "log_max_mb", "--json").stdout)
    assert got == {"key": "log_max_mb", "value": 50, "source": "config file"}
    for bad in ("0", "1.5", "lots", "²"):
        result = run("config", "set", "log_max_mb", bad)
        one_error(result, "log_max_mb must be a whole number >= 1")
    one_error(run("config", "set", "log", "maybe"), "log must be true or false")
    result = run("log", "status", env={"MEMCLI_LOG_MAX_MB": "0"})
    one_error(result, "environment: log_max_mb must be a whole number >= 1")


# --------------------------------------------------------------------------- the file's mode
@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_the_file_is_0600_whatever_the_umask(umask):
    old = os.umask(umask)
    try:
        record(LAUNCH)
        reader = sqlite3.connect(al.path())  # holds the write-ahead files open: they exist while it reads
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM answers").fetchone()
        record(KEY)
        for name in ("log.db", "log.db-wal", "log.db-shm"):
            mode = stat.S_IMODE(os.lstat(al.path().with_name(name)).st_mode)
            assert mode == 0o600, (name, oct(mode))
        reader.close()
    finally:
        os.umask(old)
    assert al.count() == 2


def test_a_looser_mode_is_tightened_with_one_note():
    record(LAUNCH)
    al.close()
    os.chmod(al.path(), 0o644)
    notes: list[str] = []
    assert al.record(KEY, on_error=notes.append) is not None
    assert stat.S_IMODE(os.stat(al.path()).st_mode) == 0o600
    assert len(notes) == 1 and "was readable by others (mode 0644); it is now 0600" in notes[0]
    assert str(al.path()) in notes[0]
    os.chmod(al.path(), 0o604)  # also while a connection is kept: the next record checks the mode
    assert al.record(KEY, on_error=notes.append) is not None
    assert stat.S_IMODE(os.stat(al.path()).st_mode) == 0o600 and len(notes) == 2


def test_a_symlink_or_a_folder_in_its_place_is_refused_in_one_line(tmp_path):
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    al.path().parent.mkdir(parents=True)
    al.path().symlink_to(target)
    notes: list[str] = []
    assert al.record(LAUNCH, on_error=notes.append) is None
    assert len(notes) == 1 and "is a symbolic link; refusing" in notes[0] and "memcli log reset" in notes[0]
    assert target.read_bytes() == b""  # nothing written through the link
    one_error(run("log"), "symbolic link", "memcli log reset")
    moved = run("log", "reset")
    assert moved.exit_code == 0 and not os.path.lexists(al.path()) and target.exists()
    al.path().mkdir()
    one_error(run("log", "status"), "is a folder, not a log database")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file away needs root")
def test_a_file_of_another_user_is_refused():
    record(LAUNCH)
    al.close()
    os.chown(al.path(), 54321, 54321)
    notes: list[str] = []
    assert al.record(KEY, on_error=notes.append) is None
    assert len(notes) == 1 and "belongs to another user (uid 54321)" in notes[0]


# --------------------------------------------------------------------------- concurrent writers
WRITERS, EACH = 4, 50


def _writer(barrier, index: int, errors) -> None:
    barrier.wait(timeout=120)  # every writer starts at once, on a log that does not exist yet
    for i in range(EACH):
        problems: list[str] = []
        if al.record({"pool": f"p{index}", "question": f"w{index} q{i}", "answer": f"answer {index} {i}",
                      "via": "server"}, on_error=problems.append) is None:
            errors.put(f"writer {index} record {i}: {problems}")
    al.close()


def test_concurrent_writers_never_corrupt_it():
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(barrier, i, errors)) for i in range(WRITERS)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=300)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * WRITERS
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []
    conn = sqlite3.connect(al.path())
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.execute("INSERT INTO answers_fts (answers_fts) VALUES ('integrity-check')")  # raises if inconsistent
    assert conn.execute("SELECT count(*) FROM answers").fetchone()[0] == WRITERS * EACH
    questions = [row[0] for row in conn.execute("SELECT question FROM answers")]
    assert sorted(questions) == sorted(f"w{w} q{i}" for w in range(WRITERS) for i in range(EACH))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert al.count("p3") == EACH and len(al.entries(query="answer", limit=0)) == WRITERS * EACH


# --------------------------------------------------------------------------- size
def test_the_size_bound_prunes_the_oldest(monkeypatch):
    import random

    monkeypatch.setenv("MEMCLI_LOG_MAX_MB", "1")
    rng = random.Random(5)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(4000)]
    ids = []
    for i in range(160):  # 160 answers of ~14 KB: about twice the bound in text alone
        answer = f"uniq{i}x " + " ".join(rng.choice(words) for _ in range(1600))
        ids.append(record({**LAUNCH, "question": f"question {i}", "answer": answer}))
        with al._open(create=False, note=pytest.fail) as db:
            assert db.used_bytes() <= 1 << 20
    kept = [r["id"] for r in al.entries(limit=0)]
    assert 0 < len(kept) < len(ids)
    assert kept == ids[::-1][:len(kept)]  # the newest, without a gap: the oldest went first
    assert al.entries(query="uniq0x") == []  # its index entries went with it
    assert [r["id"] for r in al.entries(query="uniq159x")] == [ids[-1]]
    conn = sqlite3.connect(al.path())
    conn.execute("INSERT INTO answers_fts (answers_fts) VALUES ('integrity-check')")
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_huge_questions_and_answers_are_cut_with_a_marker():
    question = "why " * 40_000
    record({**LAUNCH, "question": question, "answer": "é" * 100_000, "sources": ["s" * 100] * 2000})
    [row] = al.entries()
    assert row["question"].startswith("why why") and row["question"].endswith(
        f" [… {len(question) - al.MAX_TEXT_CHARS:,} more characters not logged]")
    assert len(row["question"]) < al.MAX_TEXT_CHARS + 60
    assert row["answer"].endswith("[… 34,464 more characters not logged]")
    assert row["sources"]["truncated"] is True and len(row["sources"]["json"]) == al.MAX_SOURCES_CHARS


def test_text_sqlite_cannot_store_is_stored_escaped():
    record({**LAUNCH, "question": "caf\udce9?"})  # an undecodable byte of a command line
    assert al.entries()[0]["question"] == "caf\\udce9?"


# --------------------------------------------------------------------------- failures never fail an answer
def test_a_garbage_file_is_one_line_naming_it_and_the_fix():
    al.path().parent.mkdir(parents=True)
    al.path().write_bytes(b"this is not a database, it is somebody's shopping list\n" * 200)
    os.chmod(al.path(), 0o600)
    notes: list[str] = []
    assert al.record(LAUNCH, on_error=notes.append) is None
    assert len(notes) == 1
    assert str(al.path()) in notes[0] and "is damaged" in notes[0] and "memcli log reset" in notes[0]
    for args in (["log"], ["log", "-q", "x"], ["log", "status"], ["log", "--json"]):
        one_error(run(*args), str(al.path()), "is damaged", "memcli log reset")
    garbage = al.path().read_bytes()
    moved = run("log", "reset")
    assert moved.exit_code == 0 and "moved the log to" in moved.stderr
    [aside] = al.path().parent.glob("log.db.old-*")
    assert aside.read_bytes() == garbage  # kept, not deleted
    assert record(KEY) and al.count() == 1


def test_by_default_a_failure_is_one_warning_per_process(caplog):
    al._said.clear()
    al.path().parent.mkdir(parents=True)
    al.path().write_bytes(b"\x00garbage" * 1000)
    os.chmod(al.path(), 0o600)
    with caplog.at_level("WARNING", logger="memcli"):
        assert al.record(LAUNCH) is None and al.record(KEY) is None
    assert len(caplog.records) == 1 and "answer not logged:" in caplog.records[0].getMessage()
    al._said.clear()


def test_a_home_where_nothing_can_be_written_skips_logging_with_one_note(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "data").write_text("a file where the data folder should be")
    monkeypatch.setenv("MEMCLI_HOME", str(home))
    notes: list[str] = []
    assert al.record(LAUNCH, on_error=notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("answer not logged: ") and str(home / "data") in notes[0]
    assert run("log").exit_code == 0  # nothing to list: no error


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_home_skips_logging_with_one_note(tmp_path, monkeypatch):
    data = Path(os.environ["MEMCLI_HOME"]) / "data"
    data.mkdir(parents=True)
    data.chmod(0o500)
    try:
        notes: list[str] = []
        assert al.record(LAUNCH, on_error=notes.append) is None
        assert len(notes) == 1 and "cannot write" in notes[0]
    finally:
        data.chmod(0o700)


def test_a_caller_bug_is_reported_not_raised():
    notes: list[str] = []
    assert al.record({**LAUNCH, "via": "carrier pigeon"}, on_error=notes.append) is None
    assert al.record({**LAUNCH, "colour": "blue"}, on_error=notes.append) is None
    assert al.record({**LAUNCH, "seconds": float("nan")}, on_error=notes.append) is None
    assert al.record({"pool": "p", "question": "q"}, on_error=notes.append) is None
    assert [n.split(":")[0] for n in notes] == ["answer not logged"] * 4
    assert "via must be one of cli, server, openai, mcp, llm" in notes[0] and "colour" in notes[1]
    assert "seconds must be a finite number" in notes[2] and "answer" in notes[3]
    assert al.count() == 0


# --------------------------------------------------------------------------- schema versions
def test_an_older_schema_is_migrated_and_a_newer_one_refused(monkeypatch):
    first = record(LAUNCH)
    al.close()

    def v2(conn):
        conn.execute("ALTER TABLE answers ADD COLUMN rating INTEGER")

    monkeypatch.setattr(al, "MIGRATIONS", [*al.MIGRATIONS, v2])
    assert record(KEY) > first  # the version-1 file was migrated on open, its rows kept
    conn = sqlite3.connect(al.path())
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "rating" in [row[1] for row in conn.execute("PRAGMA table_info(answers)")]
    conn.close()
    assert [r["pool"] for r in al.entries()] == ["home", "work"]
    al.close()

    monkeypatch.setattr(al, "MIGRATIONS", al.MIGRATIONS[:1])  # an older memcli reading the new file
    before = al.path().read_bytes()
    notes: list[str] = []
    assert al.record(LAUNCH, on_error=notes.append) is None
    assert len(notes) == 1 and "written by a newer memcli (log schema 2, this one reads up to 1)" in notes[0]
    one_error(run("log"), "newer memcli")
    assert al.path().read_bytes() == before


# --------------------------------------------------------------------------- pool rm
def _make_pool(name: str) -> None:
    import torch

    from memcli.store import PoolStore

    PoolStore().commit(name, {"model": "m"}, ["base"], {"base": {"w": torch.zeros(4, 2)}}, None)


def test_pool_rm_keeps_the_log_and_purge_log_removes_the_pools_answers():
    for name in ("work", "home"):
        _make_pool(name)
    record({**LAUNCH, "answer": "The Orion launch is on Friday, says xylophonic."})
    record(KEY)
    kept = run("pool", "rm", "work", "--yes")
    assert kept.exit_code == 0, kept.stderr
    assert [r["pool"] for r in logged()] == ["home", "work"]  # the log outlives the pool
    record({**KEY, "pool": "home", "question": "And the garage key?"})
    purged = run("pool", "rm", "home", "--yes", "--purge-log")
    assert purged.exit_code == 0, purged.stderr
    assert "removed pool home and 2 logged answers" in purged.stderr
    assert [r["pool"] for r in logged()] == ["work"]
    al.close()
    # gone from the file, not only from the table: overwritten, its index rebuilt, the WAL emptied
    data = b"".join(p.read_bytes() for p in al.path().parent.glob("log.db*"))
    assert b"flower pot" not in data and b"garage" not in data and b"xylophonic" in data
    assert al.purge_pool("nothing-logged") == 0


def test_purge_log_of_a_damaged_log_says_the_pool_went_but_not_its_answers():
    _make_pool("work")
    al.path().parent.mkdir(parents=True, exist_ok=True)
    al.path().write_bytes(b"garbage" * 500)
    os.chmod(al.path(), 0o600)
    one_error(run("pool", "rm", "work", "--yes", "--purge-log"),
              "removed pool work, but not its logged answers", "memcli log reset")
    assert not (Path(os.environ["MEMCLI_HOME"]) / "data" / "pools" / "work").exists()


def test_reset_starts_a_new_log_and_keeps_the_old_one():
    record(LAUNCH)
    assert run("log", "reset").exit_code == 0
    assert al.count() == 0 and run("log", "reset").stderr.startswith("no log at ")
    assert record(KEY) and [r["pool"] for r in al.entries()] == ["home"]
    [old] = al.path().parent.glob("log.db.old-*")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT pool FROM answers").fetchall() == [("work",)]
    conn.close()


def test_memcli_log_on_a_real_log_imports_no_torch(tmp_path):
    from .helpers import run_without_torch

    record(LAUNCH)
    al.close()
    for args in (["log", "-q", "launch", "--json"], ["log", "status"], ["log"]):
        done = run_without_torch(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip().endswith("NO-TORCH"), done.stderr
    assert json.loads(run_without_torch("log", "--json", cwd=tmp_path).stdout)[0]["question"] == LAUNCH["question"]
