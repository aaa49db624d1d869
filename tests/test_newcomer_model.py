"""A newcomer's first hour with the bundled model (issue 19), through the real command line.

- short notes: files of one inject run shorter than the model's minimum are packed into shared
  chunks, each keeping its own source (log, retention, --sources); refused only when nothing can
  be packed with them; re-runs and interrupted runs behave as for any file
- the bundled model names the words it has never seen, and `models` says what it can answer
- `ask --sources` ranks sources by their share (shares + initial memory = 100 %)
- no CPU warning for a model made for the CPU; `pool info` says what the model is, and shows long-term
  memory rows only for M+
- `chat` on a pool that does not exist yet starts it with /inject
- with no model configured, a machine that cannot run the published checkpoints is pointed to
  memcli-tiny and the offline demo, not to a download

memcli-tiny: 160 memory rows per layer, 20 written per chunk (training/README.md); its chunks are 20
tokens, its facts five ("Kai lives in Turin ."), its vocabulary closed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memcli.app import doctor
from memcli.app.api import Memcli
from memcli.cli import main as cli
from memcli.cli.backends import CPU_WARNING, ModelNotes
from memcli.wire import InjectInterrupted
from memcli.app import facts
from memcli.loading.checkpoints import BUNDLED

from .helpers import loaded_pools, tiny_note

runner = CliRunner()
TINY = BUNDLED["memcli-tiny"]
pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="memcli-tiny not shipped")
NOTE = tiny_note()
BASE = ["--model", "memcli-tiny", "--device", "cpu"]


def invoke(*args, base=BASE, input: str | None = None):
    result = runner.invoke(cli.app, [*base, *map(str, args)], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def answer_of(result) -> dict:
    return json.loads(result.stdout.splitlines()[-1])  # NDJSON: the answer event last


def twenty_notes(folder: Path) -> list[tuple[Path, facts.Fact]]:
    """Twenty one-line notes (five tokens each, under memcli-tiny's minimum of 20), about twenty people."""
    world = facts.FactWorld(seed=7, split="any")
    folder.mkdir()
    notes = []
    for i, name in enumerate(world.names(20)):
        fact = world.fact(name)
        path = folder / f"note{i:02d}.txt"
        path.write_text(fact.sentence + "\n")
        notes.append((path, fact))
    return notes


def check_twenty_notes(notes, pool: str, invoke_=invoke) -> None:
    """Inject the notes in one run, then: every source listed with its own rows, answers right."""
    result = invoke_("inject", *[p for p, _ in notes], "--pool", pool, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [f["status"] for f in report["files"]] == ["injected"] * 20
    assert all(f["packed"] for f in report["files"]) and report["summary"]["packed"] == 20
    assert report["chunks"] == 5 and report["tokens"] == 100  # four notes per 20-token chunk

    info = json.loads(invoke_("pool", "info", pool, "--json").stdout)
    assert info["sources"] == 20 and info["chunks"] == 5
    retention = {r["source"]: r for r in info["retention"]}
    assert set(retention) == {str(p) for p, _ in notes}
    for row in retention.values():
        assert row["chunks"] == 1 and len(row["packed"]) == 1
        assert row["rows_written"] == 5 * 2  # a quarter of the chunk's 20 rows, in both layers
    text = invoke_("pool", "info", pool).stdout
    assert all(str(p) in text for p, _ in notes) and "1 shared" in text
    # the last chunk's notes were written last: all their rows are in memory
    full = [(p, f) for p, f in notes if retention[str(p)]["share_retained"] == 1.0]
    assert {str(p) for p, _ in notes[16:]} <= {str(p) for p, _ in full}
    right = 0
    for path, fact in notes:
        result = invoke_("ask", fact.question, "--pool", pool, "--json", "--max-new-tokens", "4")
        ok = facts.exact_hit(fact.value, answer_of(result)["answer"])
        if retention[str(path)]["share_retained"] == 1.0:
            assert ok, (fact.sentence, answer_of(result)["answer"])
        right += ok
    assert right >= 12, right  # older notes lost some rows to later chunks (README: 73 % after 4 chunks)


def test_twenty_one_line_notes_in_one_run_are_packed_and_answered(tmp_path):
    notes = twenty_notes(tmp_path / "notes")
    check_twenty_notes(notes, "notes")
    # the same run again: every note is already in
    result = invoke("inject", tmp_path / "notes", "--pool", "notes")
    assert result.exit_code == 0
    assert result.stderr.count(": already in the pool (use --force") == 20
    assert result.stderr.splitlines()[-1] == "nothing injected into pool notes — 20 already in the pool"
    # retention and attribution count a packed note's rows alike
    path, fact = notes[-1]
    data = answer_of(invoke("ask", fact.question, "--pool", "notes", "--sources", "--json"))
    info = json.loads(invoke("pool", "info", "notes", "--json").stdout)
    in_memory = {r["source"]: r["rows_in_stm"] for r in info["retention"]}
    attributed = {s["source"]: s["rows"] for s in data["attribution"]["sources"]}
    assert attributed == {k: v for k, v in in_memory.items() if v}


def test_twenty_notes_through_a_server(served, tmp_path):
    check_twenty_notes(twenty_notes(tmp_path / "notes"), "served")
    assert "served" in loaded_pools()["memcli-tiny"]  # it was the server that answered
    # the words the model has never seen, named through the server too
    bryn = tmp_path / "bryn.txt"
    bryn.write_text("Bryn lives in Tromso .\n")
    result = invoke("inject", bryn, "--pool", "served")
    assert "memcli-tiny has never seen 2 words of what was read (Bryn, Tromso)" in result.stderr
    assert result.exit_code == 3 and "only 5 tokens and nothing to pack it with" in result.stderr  # alone in its run
    result = invoke("ask", "Where does Bryn live?", "--pool", "served")
    assert "memcli-tiny has never seen 1 word of the question (Bryn)" in result.stderr


def test_an_interrupted_run_of_short_notes_resumes(tmp_path):
    """Ctrl-C while packed chunks go in: the committed ones are kept, the next run adds the rest."""
    from memcli.app.settings import load_settings

    notes = twenty_notes(tmp_path / "notes")
    app = Memcli(load_settings(model="memcli-tiny", device="cpu"))
    seen = []

    def stop_at_the_third_chunk(event):
        if event.kind == "chunk":
            seen.append(event)
            if len(seen) == 3:
                raise KeyboardInterrupt

    with pytest.raises(InjectInterrupted) as stop:
        app.inject("p", [str(p) for p, _ in notes], on_event=stop_at_the_third_chunk)
    kept = [f.path for f in stop.value.report.files if f.status == "injected"]
    assert kept == [str(p) for p, _ in notes[:8]]  # two chunks of four notes were committed
    assert all(f.status != "pending" for f in stop.value.report.files)
    again = app.inject("p", [str(p) for p, _ in notes])
    assert [f.status for f in again.files] == ["already"] * 8 + ["injected"] * 12 and again.chunks == 3
    info = app.pool_info("p")
    assert info["sources"] == 20 and info["chunks"] == 5 and all(f["complete"] for f in info["files"])


def test_a_short_note_alone_is_refused_and_packed_beside_a_longer_file(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Kai lives in Turin .\n")
    result = invoke("inject", short, "--pool", "p")
    assert result.exit_code == 3
    assert "only 5 tokens and nothing to pack it with: memcli-tiny needs at least 20 tokens per chunk" in result.stderr
    # the summary names the reason by its first clause, never cut mid-sentence
    assert result.stderr.splitlines()[-1] == "nothing injected into pool p — 1 skipped (1 only 5 tokens and nothing to pack it with)"
    # with a longer file in the same run, the note goes in after it, filled up with the end of its
    # last chunk (as context: those rows stay the longer file's)
    long = tmp_path / "long.txt"
    long.write_text(facts.note_text(NOTE))
    result = invoke("inject", long, short, "--pool", "p")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[-1].endswith("— 1 too short alone, packed together")
    info = json.loads(invoke("pool", "info", "p", "--json").stdout)
    assert ["packed" in r for r in info["retention"]] == [False, True]
    rows = {r["source"]: r["rows_written"] for r in info["retention"]}
    assert rows == {str(long): (20 + 15) * 2, str(short): 5 * 2}  # the second chunk's 20 rows, shared 15 / 5
    assert info["chunks"] == 2
    assert facts.exact_hit("Turin", answer_of(invoke("ask", "Where does Kai live?", "--pool", "p", "--json"))["answer"])


def test_the_minimum_comes_from_the_model():
    assert json.loads((TINY / "config.json").read_text())["memcli_min_chunk_tokens"] == 20
    result = invoke("inject", "-", "--pool", "p", "--chunk-tokens", "16", input="Kai lives in Turin .")
    assert result.exit_code == 1 and "--chunk-tokens must be at least 20" in result.stderr


# --------------------------------------------------------------------------- what the model knows
def test_inject_and_ask_name_the_words_the_model_has_never_seen(tmp_path):
    note = tmp_path / "bryn.txt"
    note.write_text("Bryn lives in Tromso . Kai lives in Turin . Mia works at Solvay . Ivo owns a kayak .\n")
    result = invoke("inject", note, "--pool", "p", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["unknown_words"] == {"model": "memcli-tiny", "count": 2, "first": ["Bryn", "Tromso"]}
    [line] = [l for l in result.stderr.splitlines() if "never seen" in l]
    assert line.startswith("memcli-tiny has never seen 2 words of what was read (Bryn, Tromso)")
    result = invoke("ask", "Where does Bryn live?", "--pool", "p", "--json")
    assert answer_of(result)["unknown_words"] == {"model": "memcli-tiny", "count": 1, "first": ["Bryn"]}
    assert "memcli-tiny has never seen 1 word of the question (Bryn)" in result.stderr
    # its own words: no such line
    result = invoke("ask", "Where does Kai live?", "--pool", "p")
    assert "never seen" not in result.stderr and facts.exact_hit("Turin", result.stdout)
    assert answer_of(invoke("ask", "Where does Kai live?", "--pool", "p", "--json"))["unknown_words"]["count"] == 0


def test_many_unknown_words_are_counted_and_the_first_few_named(tmp_path):
    note = tmp_path / "foreign.txt"
    note.write_text(" ".join(f"word{i}" for i in range(30)) + " Kai lives in Turin .")
    result = invoke("inject", note, "--pool", "p", "--json")
    unknown = json.loads(result.stdout)["unknown_words"]
    assert unknown["count"] == 30 and unknown["first"] == [f"word{i}" for i in range(20)]
    assert "(word0, word1, word2, word3, word4 and 25 more)" in result.stderr


def test_models_says_what_the_bundled_model_can_answer():
    result = invoke("models", base=[])
    [line] = [l for l in result.stdout.splitlines() if l.startswith("memcli-tiny: ")]
    vocabulary = json.loads((TINY / "tokenizer.json").read_text())["model"]["vocab"]
    words = len([w for w in vocabulary if not w.startswith("<")])
    assert f"knows {words} words" in line and "Where does Kai live?" in line
    rows = json.loads(invoke("models", "--json", base=[]).stdout)
    assert rows[0]["name"] == "memcli-tiny" and f"knows {words} words" in rows[0]["description"]


# --------------------------------------------------------------------------- sources that rank
def test_sources_show_shares_that_sum_to_one_hundred_and_ranks(tmp_path):
    paths = []
    for i, chunk in enumerate((NOTE, facts.FactWorld(seed=4, split="test").chunk(["Lars", "Nia", "Oto", "Pia"]))):
        paths.append(tmp_path / f"n{i}.txt")
        paths[-1].write_text(facts.note_text(chunk))
    assert invoke("inject", *paths, "--pool", "p").exit_code == 0
    data = answer_of(invoke("ask", "Where does Kai live?", "--pool", "p", "--sources", "--json"))["attribution"]
    assert [s["rank"] for s in data["sources"]] == [1, 2]
    assert sorted((s["share"] for s in data["sources"]), reverse=True) == [s["share"] for s in data["sources"]]
    assert abs(sum(s["share"] for s in data["sources"]) + data["initial_memory_share"] - 1) < 1e-4
    text = invoke("ask", "Where does Kai live?", "--pool", "p", "--sources").stdout
    assert "layer" not in text and "ranked by their share" in text
    listed = [line.split() for line in text.splitlines() if line.strip()[:2] in ("1.", "2.")]
    assert [row[0] for row in listed] == ["1.", "2."]
    assert {row[2] for row in listed} == {str(p) for p in paths}


# --------------------------------------------------------------------------- CPU warning, labels
def test_no_cpu_warning_for_a_model_made_for_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(ModelNotes, "warned", False)
    note = tmp_path / "n.txt"
    note.write_text(facts.note_text(NOTE))
    result = invoke("inject", note, "--pool", "p", base=["--model", "memcli-tiny"])  # device auto
    assert result.exit_code == 0 and CPU_WARNING not in result.stderr
    assert json.loads((TINY / "config.json").read_text())["memcli_made_for_cpu"] is True


def test_pool_info_says_what_the_model_is_and_shows_ltm_rows_only_for_mplus(tmp_path):
    note = tmp_path / "n.txt"
    note.write_text(facts.note_text(NOTE))
    invoke("inject", note, "--pool", "p")
    text = invoke("pool", "info", "p").stdout
    [model] = [l for l in text.splitlines() if l.startswith("model")]
    assert "memcli-tiny (toy model, 268 words, for the CPU)" in model and "(8b)" not in model
    assert "rows in STM" in text and "rows in LTM" not in text
    assert json.loads(invoke("pool", "info", "p", "--json").stdout)["retention"][0]["rows_in_ltm"] == 0


def test_pool_info_labels_published_checkpoints_by_family():
    from memcli.loading.catalog import label

    assert label("memoryllm-8b-chat", "8b") == "8b" and label("YuWangX/mplus-8b", "mplus") == "mplus"
    assert label("memcli-tiny", "8b") == "toy model, 268 words, for the CPU"
    assert label("/no/such/folder", "8b") == "8b layout"


def test_a_model_folder_declares_its_properties_and_a_bad_config_declares_nothing(tmp_path):
    import os

    from memcli.loading.catalog import declared, made_for_cpu

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"memcli_made_for_cpu": True, "memcli_label": "mine",
                                                    "hidden_size": 64}))
    assert made_for_cpu(str(folder)) and declared(str(folder)) == {"memcli_made_for_cpu": True, "memcli_label": "mine"}
    assert not made_for_cpu("memoryllm-8b-chat")  # a hub id declares nothing here
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")  # refused without blocking (the store's reader)
    assert declared(str(fifo)) == {}


# --------------------------------------------------------------------------- chat on a new pool
def test_chat_on_a_pool_that_does_not_exist_yet_is_started_by_inject(tmp_path):
    note = tmp_path / "n.txt"
    note.write_text(facts.note_text(NOTE))
    result = invoke("chat", "--pool", "chatp", input=f"Where does Kai live?\n/inject {note}\nWhere does Kai live?\n")
    lines = result.stderr.splitlines()
    assert lines[0] == ("pool chatp is new and empty: /inject PATH... adds documents to it (the first creates "
                        "it, for model memcli-tiny)")
    assert "pool chatp is still empty: /inject PATH... adds documents to it" in result.stderr
    assert result.exit_code == 1  # the question before the inject failed
    assert [l for l in result.stdout.splitlines() if l.strip()] == ["Turin"]
    info = json.loads(invoke("pool", "info", "chatp", "--json").stdout)
    assert info["model"] == "memcli-tiny" and info["sources"] == 1
    # a name close to an existing pool is more likely a typo: the line asks
    typo = invoke("chat", "--pool", "chatq", input="")
    assert typo.exit_code == 0 and typo.stderr.splitlines()[0].endswith("; did you mean chatp?")
    assert [row["name"] for row in json.loads(invoke("pool", "ls", "--json").stdout)] == ["chatp"]


def test_chat_on_a_new_pool_through_a_server(served, tmp_path):
    note = tmp_path / "n.txt"
    note.write_text(facts.note_text(NOTE))
    result = invoke("chat", "--pool", "chats", input=f"/inject {note}\nWhere does Mia work?\n")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("pool chats is new and empty")
    assert facts.exact_hit("Solvay", result.stdout)
    assert "chats" in loaded_pools()["memcli-tiny"]


# --------------------------------------------------------------------------- a default that can run here
@pytest.fixture
def small_machine(monkeypatch):
    """No CUDA GPU and 16 GiB of memory: the published checkpoints cannot run (they need ~36 GiB on the CPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "host_memory", lambda: {"total_bytes": 16 * 2**30, "available_bytes": 8 * 2**30,
                                                     "needed_bytes": None})


@pytest.mark.parametrize("command", ["inject", "chat"])
def test_with_no_model_configured_a_small_machine_is_pointed_to_memcli_tiny(small_machine, tmp_path, command):
    note = tmp_path / "n.txt"
    note.write_text(facts.note_text(NOTE))
    if command == "inject":
        result = invoke("inject", note, "--pool", "work", base=[])
    else:  # the chat starts (a new pool); its first /inject needs the model
        result = invoke("chat", "--pool", "work", base=[], input=f"/inject {note}\n")
    assert result.exit_code == 1
    [line] = [l for l in result.stderr.splitlines() if l.startswith("memcli: error:")]
    assert "memoryllm-8b-chat (the default model) cannot run on this machine: no CUDA GPU" in line
    assert "--model memcli-tiny" in line and "memcli config set model memcli-tiny" in line
    assert "bash examples/demo.sh --offline" in line and "memcli pull" not in result.stderr
    assert not (Path(__file__).parent / "work").exists()


def test_doctor_points_to_the_offline_demo(small_machine):
    report = json.loads(invoke("doctor", "--json", base=[]).stdout)
    [problem] = [p for p in report["problems"] if "GiB of memory" in p]
    assert "bash examples/demo.sh --offline" in problem and "--smoke" not in problem
    assert "--model memcli-tiny" in problem


def test_a_model_named_for_the_run_is_still_refused_in_one_line(small_machine):
    result = invoke("inject", "-", "--pool", "p", base=["--model", "mplus-8b"], input="Kai lives in Turin .")
    assert result.exit_code == 1
    assert "mplus-8b cannot run on this machine" in result.stderr and "(the default model)" not in result.stderr

