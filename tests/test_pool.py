"""Pools: a state saved, reloaded, forked and bound to its model (tiny fixture models)."""

from pathlib import Path

import pytest
import torch

from memcli import pool as pools
from memcli.config import read_config
from memcli.engine import Engine
from memcli.loading import initial_state, load_model
from memcli.store import PoolStore

from .support import fixture_checkpoint


def _setup(variant):
    folder = fixture_checkpoint(variant)
    model, reader = load_model(folder)
    cfg = model.cfg
    binding = pools.Binding(str(folder), cfg.family, cfg.fingerprint(), cfg.num_tokens)
    return model, reader, binding


def _update_and_save(engine, store, pool, ids, origin=0):
    """One injected chunk, committed as an inject would (under the writer lock)."""
    engine.update(pool.state, engine.inject(pool.state, ids), origin=origin)
    with store.writer(pool.name):
        pools.save(store, pool)


def _assert_same_state(a, b):
    assert torch.equal(a.memory(), b.memory())
    assert torch.equal(a.order, b.order) and torch.equal(a.origin, b.origin)
    assert a.update_count == b.update_count and a.initialized == b.initialized
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    if a.ltm is not None:
        assert torch.equal(a.stm_ages, b.stm_ages)
        la, lb = a.ltm, b.ltm
        assert (la.size, la.cache_start, la.update_step) == (lb.size, lb.cache_start, lb.update_step)
        for l in range(a.num_layers):
            assert torch.equal(la.ids[l], lb.ids[l]) and torch.equal(la.recall[l], lb.recall[l])
            assert torch.equal(la.rows[l, la.ids[l]], lb.rows[l, lb.ids[l]])
        assert torch.equal(la.rows[:, : la.size], lb.rows[:, : lb.size])


@pytest.mark.parametrize("variant", ["memoryllm-8b-tiny", "mplus-8b-tiny", "memoryllm-7b-tiny"])
def test_save_reload_is_exact_and_writes_only_what_changed(variant):
    model, reader, binding = _setup(variant)
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=3)
    pool = pools.create(store, "p", binding, state)
    base_bytes = store.info("p").bytes_on_disk
    engine = Engine(model)
    ids = torch.arange(20)[None] + 5
    for step in range(5):
        _update_and_save(engine, store, pool, ids + step, origin=step)
        _assert_same_state(state, pools.load(store, "p", binding).state)
    manifest = store.read_manifest("p")
    # after five updates the pool is base + patches, not five copies of the memory
    assert any(p.startswith("stm-patch") for p in manifest["parts"])
    assert store.info("p").bytes_on_disk < 3 * base_bytes


def test_patches_compact_into_a_new_base():
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=1)
    pool = pools.create(store, "p", binding, state)
    engine = Engine(model)
    n_updates = state.num_rows // model.cfg.num_tokens + 1
    for step in range(n_updates):
        _update_and_save(engine, store, pool, torch.arange(16)[None] + step)
    parts = store.read_manifest("p")["parts"]
    assert sum(p.startswith("stm-patch") for p in parts) < n_updates
    _assert_same_state(state, pools.load(store, "p", binding).state)


def test_fork_is_independent_and_binding_is_checked():
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=2)
    pools.create(store, "src", binding, state)
    store.fork("src", "dst")
    fork = pools.load(store, "dst", binding)
    engine = Engine(model)
    _update_and_save(engine, store, fork, torch.arange(16)[None])
    _assert_same_state(state, pools.load(store, "src", binding).state)
    assert not torch.equal(pools.load(store, "dst", binding).state.memory(), state.memory())
    other = pools.Binding("elsewhere", "mplus", "0" * 16)
    with pytest.raises(pools.PoolModelMismatch, match="belongs to model"):
        pools.load(store, "src", other)


def test_retention_counts_rows_per_source():
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=4)
    pool = pools.create(store, "p", binding, state)
    engine = Engine(model)
    k = model.cfg.num_tokens
    for chunk in range(3):
        engine.update(state, engine.inject(state, torch.arange(16)[None] + chunk), origin=chunk)
    pool.sources = [{"path": "a.txt", "first_chunk": 0, "chunks": 1}, {"path": "b.txt", "first_chunk": 1, "chunks": 2}]
    report = pools.retention(pool)
    total = sum(r["rows_in_stm"] for r in report)
    assert total == int((state.origin >= 0).sum())
    assert report[1]["rows_written"] == 2 * k * state.num_layers
    assert 0 < report[0]["share_retained"] <= 1


def test_mplus_bank_compaction_is_saved_and_old_segments_are_dropped():
    model, reader, binding = _setup("mplus-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=6)
    pool = pools.create(store, "p", binding, state)
    engine = Engine(model)
    for step in range(24):
        _update_and_save(engine, store, pool, torch.arange(16)[None] + step, origin=step)
    assert state.ltm.epoch > 0
    _assert_same_state(state, pools.load(store, "p", binding).state)
    banks = [p for p in store.read_manifest("p")["parts"] if p.startswith("ltm-bank")]
    assert len(banks) < 24  # segments of rows nobody refers to are gone


def _objects(store) -> dict[str, int]:
    folder = store.root / ".objects"
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.exists() else {}


def test_a_new_pool_shares_its_models_initial_memory_and_writes_a_manifest_only():
    model, reader, binding = _setup("mplus-8b-tiny")
    store = PoolStore()
    pools.create(store, "first", binding, initial_state(reader, model.cfg, seed=1))
    before = _objects(store)
    pools.create(store, "second", binding, initial_state(reader, model.cfg, seed=2))
    new = {k: v for k, v in _objects(store).items() if k not in before}
    # the memory, its tables and the M+ bank are the first pool's objects; only the drop
    # generator's state (its own seed) is new
    assert len(new) == 1 and sum(new.values()) < 6000, new
    m1, m2 = store.read_manifest("first"), store.read_manifest("second")
    base = lambda m: m["parts"][m["meta"]["state"]["stm_base"]]["sha256"]  # noqa: E731
    assert base(m1) == base(m2)


@pytest.mark.parametrize("variant", ["memoryllm-8b-tiny", "mplus-8b-tiny"])
def test_pool_info_counts_retention_from_the_small_tables_only(variant, monkeypatch):
    from memcli import pool_meta
    from memcli.store.snapshot import Snapshot

    model, reader, binding = _setup(variant)
    store = PoolStore()
    pool = pools.create(store, "p", binding, initial_state(reader, model.cfg, seed=4))
    engine = Engine(model)
    for chunk in range(30):
        if chunk % 10 == 0:
            pool.sources.append({"path": f"f{chunk}.txt", "first_chunk": chunk, "chunks": 0, "complete": False})
        pool.sources[-1]["chunks"] += 1
        _update_and_save(engine, store, pool, torch.arange(16)[None] + chunk, origin=chunk)
    expected = pools.retention(pools.load(store, "p"))

    def no_tensor_reads(self, *a, **k):
        raise AssertionError("pool info read a tensor part with torch")

    monkeypatch.setattr(Snapshot, "read", no_tensor_reads)
    info = pool_meta.pool_info(store, "p")
    assert info["retention"] == expected and info["chunks"] == 30 and len(info["sources"]) == 3
    with store.snapshot("p") as snap:  # pools saved before the census: the origin tables count the same
        assert pool_meta.retention_from_tables(snap, binding, info["sources"]) == expected


def test_metadata_commands_import_no_torch():
    import subprocess
    import sys

    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    pool = pools.create(store, "p", binding, initial_state(reader, model.cfg, seed=4))
    pool.sources.append({"path": "a.txt", "first_chunk": 0, "chunks": 1, "complete": True})
    engine = Engine(model)
    _update_and_save(engine, store, pool, torch.arange(16)[None])
    code = ("import sys\nfrom memcli import pool_meta\nfrom memcli.store import PoolStore\n"
            "s = PoolStore()\nrows = pool_meta.list_rows(s)\ninfo = pool_meta.pool_info(s, 'p')\n"
            "assert rows[0]['chunks'] == 1 and info['retention'][0]['rows_in_stm'] > 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_injection_log_is_appended_not_rewritten():
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    pool = pools.create(store, "p", binding, initial_state(reader, model.cfg, seed=4))
    engine = Engine(model)
    sizes = []
    for i in range(12):
        pool.sources.append({"path": f"file-{i}.txt", "sha256": "%064x" % i, "first_chunk": i, "chunks": 1,
                             "tokens": 16, "complete": True})
        _update_and_save(engine, store, pool, torch.arange(16)[None] + i, origin=i)
        sizes.append((store.root / "p" / "log.jsonl").stat().st_size)
    steps = {b - a for a, b in zip(sizes, sizes[1:])}
    assert max(steps) - min(steps) <= 4  # one record per commit: the log grows linearly
    m = store.read_manifest("p")
    assert m["log"]["records"] == 12 and "sources" not in m["meta"]
    assert [s["path"] for s in pools.load(store, "p").sources] == [f"file-{i}.txt" for i in range(12)]


def test_a_slot_rewritten_twice_between_saves_is_saved_once():
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=5)
    pool = pools.create(store, "p", binding, state)
    engine = Engine(model)
    for step in range(3):
        engine.update(state, engine.inject(state, torch.arange(16)[None] + step), origin=step)
    dirty = int(state.dirty.sum())
    assert dirty <= 3 * model.cfg.num_tokens * state.num_layers
    with store.writer("p"):
        pools.save(store, pool)
    assert state.dirty is None
    patch = store.read_manifest("p")["meta"]["state"]["stm_patches"][-1]
    assert store.read_part("p", patch)["index"].numel() == dirty
    _assert_same_state(state, pools.load(store, "p", binding).state)
