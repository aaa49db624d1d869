"""`memcli ask --sources` on the tiny model: the note holding the asked fact is the source the
question read most, for at least 90 % of the right answers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memcli.cli import main as cli
from memcli.app import facts
from memcli.app.api import Memcli
from memcli.app.attribution import INITIAL, for_question
from memcli.loading.checkpoints import BUNDLED
from memcli.app.settings import load_settings

runner = CliRunner()
TINY = BUNDLED["memcli-tiny"]
pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="memcli-tiny not shipped")


@pytest.fixture
def notes(tmp_path):
    """Four notes of four held-out facts each (one chunk each), about 16 different people."""
    world = facts.FactWorld(seed=11, split="test")
    names = world.names(16)
    out = []
    for i in range(4):
        chunk = world.chunk(names[4 * i : 4 * i + 4])
        path = tmp_path / f"note{i}.txt"
        path.write_text(facts.note_text(chunk))
        out.append((path, chunk))
    return out


def test_the_source_holding_the_fact_ranks_first(notes):
    app = Memcli(load_settings(model="memcli-tiny", device="cpu"))
    first_path = notes[0][0]
    app.inject("p", [str(first_path)])
    # keep the pool in memory and seed its drops, so which rows later notes push out is fixed
    app.keep_open("p")
    app.open_pool("p")[1].state.generator.manual_seed(1234)
    for path, _ in notes[1:]:
        app.inject("p", [str(path)])
    right = first = 0
    for path, chunk in notes:
        for fact in chunk:
            answer = app.ask("p", fact.question, max_new_tokens=4)
            if not facts.exact_hit(fact.value, answer.text):
                continue
            right += 1
            ranked = for_question(app, "p", fact.question)["sources"]
            first += ranked[0]["source"] == str(path)
    assert right >= 12  # most answers are right (some rows of the older notes were dropped)
    assert first >= 0.9 * right, (first, right)


def test_sources_in_json_and_text(notes):
    path, chunk = notes[0]
    base = ["--model", "memcli-tiny", "--device", "cpu"]
    assert runner.invoke(cli.app, [*base, "inject", str(path), "--pool", "p"]).exit_code == 0
    result = runner.invoke(cli.app, [*base, "ask", chunk[0].question, "--pool", "p", "--sources", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout.splitlines()[-1])  # NDJSON: text events, then the answer event
    assert data["event"] == "answer"
    sources = {s["source"]: s for s in data["attribution"]["sources"]}
    assert set(sources) == {str(path)}
    assert sources[str(path)]["rows"] == 2 * 20  # one chunk: K rows in each of the two layers
    assert 0 < sources[str(path)]["mass"] <= 1 and 0 <= data["attribution"]["initial_memory_mass"] <= 1
    assert len(data["attribution"]["layer_mass"]) == 2
    # the share and the rank: the note's share and the initial memory's make 100 %
    assert sources[str(path)]["rank"] == 1
    assert abs(sources[str(path)]["share"] + data["attribution"]["initial_memory_share"] - 1) < 1e-4
    result = runner.invoke(cli.app, [*base, "ask", chunk[0].question, "--pool", "p", "--sources"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[1] == "sources, ranked by their share of what the question looked up in memory:"
    assert "layer" not in result.stdout
    share = f"{sources[str(path)]['share']:.1%}"
    assert lines[2].split() == ["1.", share, str(path), "(40", "memory", "rows)"]
    assert INITIAL in lines[3] and f"{data['attribution']['initial_memory_share']:.1%}" in lines[3]
