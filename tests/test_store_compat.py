"""Pools written by the format-1 store (memcli before content-addressed parts) keep loading,
and are migrated once, atomically, on their first write.

tests/fixtures/pool-v1/old was written by store.py at commit b005f41 (the last format-1 code)
with the tiny memoryllm-8b fixture model; tests/fixtures/pool-v1-expected.json holds what its
state was when it was written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from memcli.pools import pool as pools
from memcli.pools import meta as pool_meta
from memcli.core.engine import Engine
from memcli.loading.checkpoints import load_model
from memcli.pools.meta import PoolStore

from .support import fixture_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "pool-v1" / "old"
EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "pool-v1-expected.json").read_text())


@pytest.fixture
def store() -> PoolStore:
    s = PoolStore()
    s.root.mkdir(parents=True)
    shutil.copytree(FIXTURE, s.root / "old")
    return s


def _memory_sha(state) -> str:
    return hashlib.sha256(state.memory().contiguous().numpy().tobytes()).hexdigest()


def test_format_1_pool_reads_as_written(store):
    assert store.read_manifest("old")["format_version"] == 1
    pool = pools.load(store, "old", verify=True)
    assert _memory_sha(pool.state) == EXPECTED["memory_sha256"]
    assert pool.state.origin.tolist() == EXPECTED["origin"]
    assert pool.state.update_count == EXPECTED["update_count"]
    assert [s["path"] for s in pool.sources] == ["note0.txt", "note1.txt", "note2.txt"]
    info = pool_meta.pool_info(store, "old")
    assert [r["share_retained"] for r in info["retention"]] == EXPECTED["retained"]
    assert [r["name"] for r in pool_meta.list_rows(store)] == ["old"] and store.verify("old") == []


def test_format_1_pool_is_migrated_once_on_its_first_write(store):
    model, _reader = load_model(fixture_checkpoint("memoryllm-8b-tiny"))
    pool = pools.load(store, "old")
    engine = Engine(model)
    pool.sources.append({"id": 3, "path": "new.txt", "sha256": "%064x" % 3, "chunks": 1, "tokens": 20,
                         "first_chunk": 3, "complete": True})
    engine.update(pool.state, engine.inject(pool.state, torch.arange(20)[None] + 9), origin=3)
    pool.next_chunk += 1
    with store.writer("old"):
        pools.save(store, pool)
    m = store.read_manifest("old")
    assert m["format_version"] == 2 and m["version"] == 5 and "sources" not in m["meta"]
    assert m["log"]["records"] == 4  # the whole old log moved into the pool log, once
    assert sorted(os.listdir(store.root / "old")) == ["log.jsonl", "manifest.json"]  # old parts/ and .lock gone
    again = pools.load(store, "old", verify=True)
    assert torch.equal(again.state.memory(), pool.state.memory())
    assert [s["path"] for s in again.sources] == ["note0.txt", "note1.txt", "note2.txt", "new.txt"]
    assert store.verify("old") == []
    # a second write appends one record only (the log is never rewritten)
    again.sources[-1]["tokens"] = 21
    with store.writer("old"):
        pools.save(store, again)
    assert store.read_manifest("old")["log"]["records"] == 5


def test_format_1_pool_forks_and_exports(store, tmp_path):
    store.fork("old", "copy")
    assert store.read_manifest("copy")["format_version"] == 2
    assert _memory_sha(pools.load(store, "copy", verify=True).state) == EXPECTED["memory_sha256"]
    store.export("old", tmp_path / "old.tar")
    store.import_(tmp_path / "old.tar", "back")
    assert _memory_sha(pools.load(store, "back", verify=True).state) == EXPECTED["memory_sha256"]
    assert [s["path"] for s in pools.load(store, "back").sources] == ["note0.txt", "note1.txt", "note2.txt"]
