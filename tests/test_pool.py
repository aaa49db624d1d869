"""Pools: a state saved, reloaded, forked and bound to its model (tiny fixture models)."""

import os
from pathlib import Path

import pytest
import torch

from memcli.pools import meta as pool_meta
from memcli.pools import pool as pools
from memcli.core.engine import Engine
from memcli.loading.checkpoints import initial_state, load_model
from memcli.pools.meta import PoolStore

from .support import fixture_checkpoint


def _setup(variant):
    folder = fixture_checkpoint(variant)
    model, reader = load_model(folder)
    cfg = model.cfg
    binding = pool_meta.Binding(str(folder), cfg.family, cfg.fingerprint(), cfg.num_tokens)
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
    other = pool_meta.Binding("elsewhere", "mplus", "0" * 16)
    with pytest.raises(pool_meta.PoolModelMismatch, match="belongs to model"):
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
    code = ("import sys\nfrom memcli.pools import meta as pool_meta\nfrom memcli.pools.meta import PoolStore\n"
            "s = PoolStore()\nrows = pool_meta.list_rows(s)\ninfo = pool_meta.pool_info(s, 'p')\n"
            "assert rows[0]['chunks'] == 1 and info['retention'][0]['rows_in_stm'] > 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_pools_layer_gives_the_store_its_meta_checks(tmp_path):
    """The store is generic (any meta will do: memcli.store.PoolStore); memcli's pools make theirs
    with the checks of a pool's meta (pools.meta.PoolStore): an export, fork or import of a pool
    whose meta is not a memcli pool's is refused in one line naming the field, before anything is
    written."""
    from memcli.store import PoolCorrupt
    from memcli.store import PoolStore as GenericStore

    generic, ours = GenericStore(), PoolStore()
    assert generic.root == ours.root and ours.checks is pool_meta.POOL_CHECKS
    generic.commit("odd", {"model": "not an object"}, ["base"], {"base": {"w": torch.zeros(2, 2)}}, None)
    generic.export("odd", tmp_path / "odd.tar")  # the generic store checks no meta
    generic.fork("odd", "odd-copy")
    for refused in (lambda: ours.export("odd", tmp_path / "again.tar"), lambda: ours.fork("odd", "copy"),
                    lambda: ours.import_(tmp_path / "odd.tar", "imported")):
        with pytest.raises(PoolCorrupt, match="meta.model is invalid"):
            refused()
    assert not (tmp_path / "again.tar").exists() and not ours.exists("copy") and not ours.exists("imported")
    assert generic.import_(tmp_path / "odd.tar", "imported").name == "imported"


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


# ------------------------------------------------- a model's initial memory, by its content key


@pytest.fixture
def streamed(monkeypatch):
    """The tensor names of every part whose safetensors bytes the store produces, to hash or to
    write: a part missing here was neither hashed nor written."""
    from memcli.store import safetensors as st

    calls = []
    real = st.safetensors_chunks

    def spy(tensors):
        calls.append(sorted(tensors))
        return real(tensors)

    monkeypatch.setattr(st, "safetensors_chunks", spy)
    return calls


def _base(store, name):
    m = store.read_manifest(name)
    return m["parts"][m["meta"]["state"]["stm_base"]]


def _key_entry(store, key):
    import json

    return json.loads((store.root / ".content-keys" / key).read_text())


@pytest.mark.parametrize("variant", ["memoryllm-8b-tiny", "mplus-8b-tiny"])
def test_a_second_pool_of_a_model_never_hashes_its_initial_memory(variant, streamed):
    model, reader, binding = _setup(variant)
    store = PoolStore()
    first = initial_state(reader, model.cfg, seed=1)
    assert first.initial_key is not None
    pools.create(store, "first", binding, first)
    assert ["slots"] in streamed  # the first pool stores the memory (the spy sees it)
    assert _key_entry(store, first.initial_key) == _base(store, "first")
    streamed.clear()
    second = initial_state(reader, model.cfg, seed=2)
    assert second.initial_key == first.initial_key
    pools.create(store, "second", binding, second)
    assert ["slots"] not in streamed and streamed  # the small parts are still stored as before
    assert _base(store, "second") == _base(store, "first")
    _assert_same_state(second, pools.load(store, "second", binding).state)
    assert store.verify("second") == []


def test_only_slots_untouched_since_loading_use_the_key(streamed):
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    pools.create(store, "first", binding, initial_state(reader, model.cfg, seed=1))
    state = initial_state(reader, model.cfg, seed=2)
    clone = state.clone()  # same slots, same version: keeps the key
    assert clone.initial_key == state.initial_key
    streamed.clear()
    pools.create(store, "clone", binding, clone)
    assert ["slots"] not in streamed
    engine = Engine(model)
    engine.update(state, engine.inject(state, torch.arange(16)[None]), origin=0)
    assert state.initial_key is not None and state.version == 1
    streamed.clear()
    pools.create(store, "updated", binding, state)
    assert ["slots"] in streamed
    assert _base(store, "updated") != _base(store, "first")
    _assert_same_state(state, pools.load(store, "updated", binding).state)


def test_a_key_whose_object_was_collected_or_truncated_is_ignored(streamed):
    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=1)
    pools.create(store, "first", binding, state)
    base = _base(store, "first")
    store.remove("first")  # its objects go with garbage collection; the key entry stays
    obj = store.root / ".objects" / base["sha256"]
    assert not obj.exists() and (store.root / ".content-keys" / state.initial_key).exists()
    streamed.clear()
    second = initial_state(reader, model.cfg, seed=2)
    pools.create(store, "second", binding, second)
    assert ["slots"] in streamed  # the entry named nothing: the memory was stored again
    _assert_same_state(second, pools.load(store, "second", binding).state)
    assert _base(store, "second") == base and _key_entry(store, state.initial_key) == base
    os.chmod(obj, 0o600)
    os.truncate(obj, base["bytes"] - 64)  # damaged under the key's feet
    streamed.clear()
    third = initial_state(reader, model.cfg, seed=3)
    pools.create(store, "third", binding, third)
    assert ["slots"] in streamed
    _assert_same_state(third, pools.load(store, "third", binding).state)
    assert store.verify("third") == [] and store.verify("second") == []  # the object was put back whole


GARBAGE_ENTRIES = {
    "not JSON": b"{not json",
    "not UTF-8": b"\xff\xfe{}",
    "empty": b"",
    "a list": b"[]",
    "no fields": b"{}",
    "sha not hex": b'{"sha256": "xyz", "bytes": 1}',
    "bytes a string": None,  # filled in below (needs the real digest)
    "bytes a bool": None,
    "another size": None,
    "too large": None,
}


@pytest.mark.parametrize("case", [*GARBAGE_ENTRIES, "a folder", "a symlink", "a FIFO"])
def test_a_garbage_key_entry_is_ignored_and_rewritten(case, streamed, tmp_path):
    import json

    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    pools.create(store, "first", binding, initial_state(reader, model.cfg, seed=1))
    base = _base(store, "first")
    state = initial_state(reader, model.cfg, seed=2)
    path = store.root / ".content-keys" / state.initial_key
    path.unlink()
    valid = json.dumps(base).encode()
    data = {
        "bytes a string": json.dumps({"sha256": base["sha256"], "bytes": str(base["bytes"])}).encode(),
        "bytes a bool": json.dumps({"sha256": base["sha256"], "bytes": True}).encode(),
        "another size": json.dumps({"sha256": base["sha256"], "bytes": base["bytes"] + 1}).encode(),
        "too large": valid + b" " * 8192,
    }.get(case, GARBAGE_ENTRIES.get(case))
    if case == "a folder":
        path.mkdir()
    elif case == "a symlink":
        (tmp_path / "entry").write_bytes(valid)
        path.symlink_to(tmp_path / "entry")
    elif case == "a FIFO":
        os.mkfifo(path)
    else:
        path.write_bytes(data)
    streamed.clear()
    pools.create(store, "second", binding, state)
    assert ["slots"] in streamed  # not trusted: hashed as without a key
    _assert_same_state(state, pools.load(store, "second", binding).state)
    assert _base(store, "second") == base
    if case != "a folder":  # a folder cannot be replaced by a file; it stays a hint never used
        assert path.is_file() and not path.is_symlink() and _key_entry(store, state.initial_key) == base


def test_initial_key_changes_with_the_memory_files_identity(tmp_path, streamed):
    import shutil

    from safetensors.torch import load_file, save

    from memcli.loading.checkpoints import CheckpointReader

    folder = tmp_path / "ckpt"
    shutil.copytree(fixture_checkpoint("memoryllm-8b-tiny"), folder)
    model, reader = load_model(folder)
    cfg = model.cfg
    binding = pool_meta.Binding(str(folder), cfg.family, cfg.fingerprint(), cfg.num_tokens)

    def key(dtype=torch.float32):
        return initial_state(CheckpointReader(folder), cfg, dtype=dtype).initial_key

    original = key()
    assert original == key() and key(torch.bfloat16) not in (None, original)
    shard = Path(reader._where["memory"])
    os.chmod(shard, 0o644)
    st0 = shard.stat()
    os.utime(shard, ns=(st0.st_atime_ns, st0.st_mtime_ns + 1_000_000_000))  # touched: mtime only
    assert key() != original
    tensors = load_file(str(shard))
    with open(shard, "r+b") as f:  # the same tensors rewritten in place, a longer header: another size
        f.write(save(tensors, metadata={"rewritten": "x" * 100}))
        f.truncate()
    os.utime(shard, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    assert shard.stat().st_ino == st0.st_ino and shard.stat().st_size != st0.st_size and key() != original
    store = PoolStore()
    pools.create(store, "first", binding, initial_state(CheckpointReader(folder), cfg, seed=1))
    # other memory of the same size and mtime in a new file (a copy that kept its times)
    tensors["memory"] = tensors["memory"] + 1
    tmp = folder / "replacement.tmp"
    tmp.write_bytes(save(tensors, metadata={"rewritten": "x" * 100}))
    before = shard.stat()
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert tmp.stat().st_size == before.st_size
    os.replace(tmp, shard)
    changed = initial_state(CheckpointReader(folder), cfg, seed=2)
    assert changed.initial_key not in (None, original)
    streamed.clear()
    pools.create(store, "second", binding, changed)
    assert ["slots"] in streamed  # no false hit: the new memory is stored
    loaded = pools.load(store, "second", binding).state
    assert torch.equal(loaded.slots, tensors["memory"].to(loaded.slots.dtype))
    assert _base(store, "second") != _base(store, "first")


def test_content_keys_are_invisible_to_listing_gc_recovery_and_verify():

    model, reader, binding = _setup("memoryllm-8b-tiny")
    store = PoolStore()
    state = initial_state(reader, model.cfg, seed=1)
    pools.create(store, "first", binding, state)
    pools.create(store, "second", binding, initial_state(reader, model.cfg, seed=2))
    keys = store.root / ".content-keys"
    (keys / ".tmp-deadbeef-1-2").write_bytes(b"{")  # a killed key write
    assert [r["name"] for r in pool_meta.list_rows(store)] == ["first", "second"]
    assert all(r["error"] is None for r in pool_meta.list_rows(store))
    assert store.recover() == [str(keys / ".tmp-deadbeef-1-2")]
    assert store.collect_garbage() == 0
    assert os.listdir(keys) == [state.initial_key]
    assert store.verify("first") == [] and store.verify("second") == []
