"""The remember-tests through a running `memcli serve`: the same commands, routed to the resident
server (which loads memcli-tiny once), give the same right answers."""

from __future__ import annotations

import json

import pytest

from memcli.app import facts
from memcli.server.client import Client

from . import test_remember as remember
from .test_server import start_server

pytestmark = remember.pytestmark


@pytest.fixture
def served(tmp_path, monkeypatch):
    running = start_server(tmp_path, "--keep-alive", "-1")
    monkeypatch.delenv("MEMCLI_SERVER")  # the autouse fixture keeps other tests in-process
    yield running
    running.stop()
    assert "Traceback" not in running.log.read_text()


def loaded_pools() -> dict[str, list[str]]:
    client = Client()
    try:
        return {m["model"]: [p["pool"] for p in m["pools"]] for m in client.ps()["models"]}
    finally:
        client.close()


def test_injected_facts_are_answered_through_the_server(served, note):
    remember.run("inject", note, "--pool", "p")
    assert remember.right_answers("p", remember.NOTE) == 4
    assert "p" in loaded_pools()["memcli-tiny"]  # the answers came from the resident server


def test_ask_sources_with_a_server_running_names_the_note(served, note):
    remember.run("inject", note, "--pool", "p")
    lines = remember.run("ask", remember.NOTE[0].question, "--pool", "p", "--sources").stdout.splitlines()
    assert facts.exact_hit(remember.NOTE[0].value, lines[0])
    assert lines[1].startswith("sources, ranked by their share") and str(note) in lines[2]
    assert lines[2].split()[0] == "1."


def test_fork_export_import_keep_the_facts_through_the_server(served, note, tmp_path):
    remember.run("inject", note, "--pool", "p")
    remember.run("pool", "fork", "p", "p2")
    archive = tmp_path / "p.tar"
    remember.run("pool", "export", "p", archive)
    remember.run("pool", "rm", "p", "--yes")
    remember.run("pool", "import", archive, "p3")
    assert remember.right_answers("p2", remember.NOTE) == 4
    assert remember.right_answers("p3", remember.NOTE) == 4
    assert {"p2", "p3"} <= set(loaded_pools()["memcli-tiny"])


def test_a_question_about_another_note_is_not_answered_from_this_one(served, note, tmp_path):
    """Control through the server: a pool holding other facts does not know these."""
    world = facts.FactWorld(seed=5, split="any")
    other = tmp_path / "other.txt"
    other.write_text(facts.note_text(world.chunk(world.names(4, exclude={f.name for f in remember.NOTE}))))
    remember.run("inject", other, "--pool", "other")
    assert remember.right_answers("other", remember.NOTE) <= 1
    info = json.loads(remember.run("pool", "info", "other", "--json").stdout)
    assert info["sources"] == 1


note = remember.note
