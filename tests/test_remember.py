"""The shipped tiny model remembers: facts injected through the real command line come back, survive
fork, export/import and reload, and are forgotten once distractors have pushed their rows out.

memcli-tiny is a toy trained on synthetic facts (training/); these tests check the product's promise
end to end on it: inject a note, ask, the answer is right.
"""

from __future__ import annotations

import json

import pytest

from memcli.app import facts
from memcli.loading.checkpoints import BUNDLED

from .helpers import right_answers, tiny_note, tiny_run as run

TINY = BUNDLED["memcli-tiny"]

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="memcli-tiny not shipped")

NOTE = tiny_note()  # held-out facts (never paired in training), four per 20-token chunk: one chunk, one injection


def rows_kept(pool: str, path: str) -> int:
    info = json.loads(run("pool", "info", pool, "--json").stdout)
    source = next(s for s in info["retention"] if s["source"].endswith(path))
    return source["rows_in_stm"]


def test_the_note_is_held_out_and_one_chunk():
    assert all(f.held_out for f in NOTE)
    assert len(facts.note_text(NOTE).split()) == 20


def test_injected_facts_are_answered(note):
    run("inject", note, "--pool", "p")
    assert right_answers("p", NOTE) == 4


def test_fork_export_import_and_reload_keep_the_facts(note, tmp_path):
    run("inject", note, "--pool", "p")
    run("pool", "fork", "p", "p2")
    archive = tmp_path / "p.tar"
    run("pool", "export", "p", archive)
    run("pool", "rm", "p", "--yes")
    run("pool", "import", archive, "p3")
    # every ask is a fresh invocation: the state is reloaded from the store each time
    assert right_answers("p2", NOTE) == 4
    assert right_answers("p3", NOTE) == 4


def test_enough_distractors_forget_the_facts(note, tmp_path):
    run("inject", note, "--pool", "p")
    world = facts.FactWorld(seed=3, split="any")
    names = {f.name for f in NOTE}
    distractors = tmp_path / "distractors"
    distractors.mkdir()

    def distractor(i: int):
        path = distractors / f"d{i:03d}.txt"
        path.write_text(facts.note_text(world.chunk(world.names(4, exclude=names))))
        return path

    # Each chunk drops a random K of the N rows per layer: after 32 chunks about 1.4 % of the
    # note's rows are left; then one chunk at a time until none is.
    first = [distractor(i) for i in range(32)]
    run("inject", *first, "--pool", "p")
    for i in range(32, 300):
        if rows_kept("p", "facts.txt") == 0:
            break
        run("inject", distractor(i), "--pool", "p")
    assert rows_kept("p", "facts.txt") == 0
    # nothing of the note is left: at most one lucky guess (chance is about 3 % per question)
    assert right_answers("p", NOTE) <= 1
