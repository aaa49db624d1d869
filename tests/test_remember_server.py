"""The remember-tests through a running `memcli serve`: the same commands, routed to the resident
server (which loads memcli-tiny once), give the same right answers."""

from __future__ import annotations

import json

import pytest

from memcli.app import facts
from memcli.loading.checkpoints import BUNDLED

from .helpers import loaded_pools, right_answers, tiny_note, tiny_run as run

pytestmark = pytest.mark.skipif(not (BUNDLED["memcli-tiny"] / "model.safetensors").is_file(),
                                reason="memcli-tiny not shipped")
NOTE = tiny_note()


def test_injected_facts_are_answered_through_the_server(served, note):
    run("inject", note, "--pool", "p")
    assert right_answers("p", NOTE) == 4
    assert "p" in loaded_pools()["memcli-tiny"]  # the answers came from the resident server


def test_ask_sources_with_a_server_running_names_the_note(served, note):
    """--sources goes through the server too (the attribution is computed where the pool is)."""
    run("inject", note, "--pool", "p")
    lines = run("ask", NOTE[0].question, "--pool", "p", "--sources").stdout.splitlines()
    assert facts.exact_hit(NOTE[0].value, lines[0])
    assert lines[1].startswith("sources, ranked by their share") and str(note) in lines[2]
    assert lines[2].split()[0] == "1."
    assert "p" in loaded_pools()["memcli-tiny"]


def test_fork_export_import_keep_the_facts_through_the_server(served, note, tmp_path):
    run("inject", note, "--pool", "p")
    run("pool", "fork", "p", "p2")
    archive = tmp_path / "p.tar"
    run("pool", "export", "p", archive)
    run("pool", "rm", "p", "--yes")
    run("pool", "import", archive, "p3")
    assert right_answers("p2", NOTE) == 4
    assert right_answers("p3", NOTE) == 4
    assert {"p2", "p3"} <= set(loaded_pools()["memcli-tiny"])


def test_a_question_about_another_note_is_not_answered_from_this_one(served, note, tmp_path):
    """Control through the server: a pool holding other facts does not know these."""
    world = facts.FactWorld(seed=5, split="any")
    other = tmp_path / "other.txt"
    other.write_text(facts.note_text(world.chunk(world.names(4, exclude={f.name for f in NOTE}))))
    run("inject", other, "--pool", "other")
    assert right_answers("other", NOTE) <= 1
    info = json.loads(run("pool", "info", "other", "--json").stdout)
    assert info["sources"] == 1
