"""Tests for memcli.store: the durable, content-addressed pool store.

Every test runs against its own MEMCLI_HOME (tests/conftest.py). These tests use the store
alone, generic (PoolStore() checks no meta: MetaChecks' defaults); pools made by memcli are in
test_pool.py, test_store_compat.py and test_hardening.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from memcli.base import paths
from memcli.store import (
    InvalidPoolName, PoolBusy, PoolCorrupt, PoolError, PoolExists, PoolNotFound, PoolStore, validate_name,
)
from memcli.base import durable
from memcli.base.text import one_line

from .helpers import read_only_home

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------- helpers


@pytest.fixture
def store() -> PoolStore:
    s = PoolStore()
    assert s.root == paths.pools_dir()
    assert "memcli-home" in str(s.root)  # never the real user folder
    return s


def tensors(seed: int, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, 8, generator=g),
        "idx": torch.arange(seed, seed + n, dtype=torch.int64),
        "h": torch.randn(3, n, generator=g).to(torch.bfloat16),
    }


def make_pool(store: PoolStore, name: str = "p") -> dict:
    return store.commit(name, {"model": "m1", "log": [1, 2]}, ["base", "patch-1"],
                        {"base": tensors(1, 256), "patch-1": tensors(2)}, None)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def object_path(store: PoolStore, name: str, pid: str) -> Path:
    return store.root / ".objects" / store.read_manifest(name)["parts"][pid]["sha256"]


def objects(store: PoolStore) -> set[str]:
    d = store.root / ".objects"
    return set(os.listdir(d)) if d.exists() else set()


def referenced(store: PoolStore) -> set[str]:
    return {e["sha256"] for info in store.list() if not info.error
            for e in store.read_manifest(info.name)["parts"].values()}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (lock files excluded): 'bit-identical' means equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and ".locks" not in p.parts}


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")] if root.exists() else []


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 5 if offset is None else offset] ^= 0xFF
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


def run_py(code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, **kw)


class Holder:
    """A subprocess that runs `code` (with `store` bound) and then waits for stdin to close."""

    def __init__(self, root: Path, code: str):
        script = "import sys\nfrom memcli.store import PoolStore\nstore = PoolStore(%r)\n%s" % (
            str(root), textwrap.dedent(code))
        self.proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


LOCK_HOLDER = """
with store.writer("p"):
    print("ready", flush=True)
    sys.stdin.read()
"""


# --------------------------------------------------------------------- names / ids

BAD_NAMES = ["/", "..", ".", "a/b", "", "\x00", "a\x00b", "\n", "a\nb", "x" * 65, ".hidden", "a b", "a\\b",
             "caf\u00e9", "/abs", "../up", "tab\t", ".tmp-1-2", ".objects", ".locks"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_pool_names_are_refused_before_touching_disk(store, bad):
    with pytest.raises(InvalidPoolName) as exc:
        validate_name(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "1-64" in msg and "not starting with '.'" in msg
    for call in (
        lambda: store.commit(bad, {}, [], {}, None), lambda: store.read_manifest(bad), lambda: store.info(bad),
        lambda: store.exists(bad), lambda: store.fork(bad, "ok"), lambda: store.fork("ok", bad),
        lambda: store.rename("ok", bad), lambda: store.remove(bad), lambda: store.writer(bad),
        lambda: store.verify(bad), lambda: store.snapshot(bad),
    ):
        with pytest.raises(InvalidPoolName):
            call()
    assert not store.root.exists()


@pytest.mark.parametrize("good", ["ok-name_1.2", "a", "x" * 64, "A-9", "_x", "-y", "v1.0.tar", "objects"])
def test_valid_pool_names(good):
    assert validate_name(good) == good


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_name_rule_property(name):
    import re

    ok = bool(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", name))
    try:
        validate_name(name)
        assert ok
    except InvalidPoolName:
        assert not ok


@pytest.mark.parametrize("bad", ["", ".x", "../x", "a/b", "x" * 129, "a b", "a\x00"])
def test_invalid_part_ids_refused(store, bad):
    with pytest.raises(PoolError):
        store.commit("p", {}, [bad], {bad: tensors(1)}, None)
    assert not store.exists("p")


def test_store_text_is_made_safe_by_the_one_sanitizer():
    assert one_line("a\x1b]0;pwned\x07b\x1b[2J") == "a\\x1b]0;pwned\\x07b\\x1b[2J"
    assert one_line("two\nlines\t x") == "two lines x"
    assert "\x1b" not in str(PoolError("pool \x1b[2J x"))


# --------------------------------------------------------------------- commits & reads


def test_commit_creates_and_reads_back(store):
    m = make_pool(store)
    assert m["version"] == 1 and m["format_version"] == 2 and sorted(m["parts"]) == ["base", "patch-1"]
    assert same(store.read_part("p", "base", verify=True), tensors(1, 256))
    assert same(store.read_part("p", "patch-1"), tensors(2))
    assert store.read_manifest("p")["meta"] == {"model": "m1", "log": [1, 2]}
    # a new pool appears whole, by one rename of a staged folder: nothing else in its folder
    assert sorted(os.listdir(store.root / "p")) == ["manifest.json"]
    assert leftovers(store.root) == []


def test_part_files_are_content_addressed_standard_safetensors(store):
    all_dtypes = {"f64": torch.randn(3, dtype=torch.float64), "f16": torch.randn(2, 2).half(),
                  "bf16": torch.randn(5).bfloat16(), "i32": torch.arange(4, dtype=torch.int32),
                  "i8": torch.arange(3, dtype=torch.int8), "u8": torch.arange(3, dtype=torch.uint8),
                  "b": torch.tensor([True, False]), "empty": torch.empty(0, 4), "scalar": torch.tensor(3.5)}
    store.commit("p", {}, ["x"], {"x": all_dtypes}, None)
    path = object_path(store, "p", "x")
    sha = durable.new_hash()
    sha.update(path.read_bytes())
    assert path.name == sha.hexdigest()  # named by its content
    assert same(load_file(str(path)), all_dtypes)  # readable by the safetensors library itself
    assert same(store.read_part("p", "x"), all_dtypes)


def test_identical_parts_are_one_object_and_unreferenced_ones_are_collected(store):
    make_pool(store, "a")
    store.commit("b", {}, ["same-content"], {"same-content": tensors(1, 256)}, None)
    assert len(objects(store)) == 2  # b's part is a's base
    m = store.commit("a", {"v": 2}, ["base", "patch-2"], {"patch-2": tensors(3)}, 1)
    assert m["version"] == 2
    assert objects(store) == referenced(store)  # patch-1's object went with the commit that dropped it
    assert len(objects(store)) == 2


def test_commit_version_checks(store):
    make_pool(store)
    with pytest.raises(PoolExists):
        store.commit("p", {}, [], {}, None)
    with pytest.raises(PoolBusy, match="changed since it was loaded"):
        store.commit("p", {}, ["base"], {}, 7)
    with pytest.raises(PoolNotFound):
        store.commit("nope", {}, [], {}, 3)
    assert store.commit("p", {}, ["base"], {}, 1)["version"] == 2


def test_commit_caller_bugs_leave_pool_unchanged(store):
    make_pool(store)
    before = tree(store.root)
    for args in (
        ({}, ["base", "base"], {}, 1), ({}, ["x"], {"y": tensors(1)}, 1), ({}, ["x"], {"x": {"a": 3}}, 1),
        ({}, ["x"], {"x": {"a": torch.zeros(2).to_sparse()}}, 1), ({"f": float("nan")}, ["base"], {}, 1),
        ({"f": object()}, ["base"], {}, 1), ({}, ["ghost"], {}, 1), ("meta", ["base"], {}, 1),
        ({}, ["base"], {}, "1"), ({}, ["base"], {}, True),
    ):
        with pytest.raises(PoolError) as exc:
            store.commit("p", *args)
        assert "\n" not in str(exc.value)
    assert tree(store.root) == before


def test_info_and_list(store):
    make_pool(store, "b-pool")
    make_pool(store, "a-pool")
    (store.root / "broken").mkdir()
    (store.root / "broken" / "manifest.json").write_text('{"format_version": 2, "version": "x"}')
    (store.root / ".hidden-thing").mkdir()
    infos = store.list()
    assert [i.name for i in infos] == ["a-pool", "b-pool", "broken"]
    a = infos[0]
    assert a.version == 1 and a.num_parts == 2 and a.error is None and a.meta["model"] == "m1"
    assert a.bytes_on_disk == sum(e["bytes"] for e in store.read_manifest("a-pool")["parts"].values()) + os.path.getsize(
        store.root / "a-pool" / "manifest.json")
    assert infos[2].error and "version" in infos[2].error and "\n" not in infos[2].error



# -------------------------------------------------------------------- content keys

KEY = "ab" * 32


def test_a_content_key_names_its_object_without_producing_its_bytes(store, monkeypatch):
    from memcli.store import safetensors as st

    streamed = []
    real = st.safetensors_chunks
    monkeypatch.setattr(st, "safetensors_chunks", lambda t: streamed.append(sorted(t)) or real(t))
    store.commit("a", {}, ["base"], {"base": tensors(1, 256)}, None, content_keys={"base": KEY})
    entry = store.read_manifest("a")["parts"]["base"]
    assert json.loads((store.root / ".content-keys" / KEY).read_bytes()) == entry
    streamed.clear()
    m = store.commit("b", {}, ["base", "x"], {"base": tensors(1, 256), "x": tensors(2)}, None,
                     probe=["base"], content_keys={"base": KEY})
    assert streamed == [sorted(tensors(2))]  # the keyed part was neither hashed nor written
    assert m["parts"]["base"] == entry and store.verify("b") == []
    assert same(store.read_part("b", "base", verify=True), tensors(1, 256))


def test_content_key_caller_bugs_leave_the_store_unchanged(store):
    make_pool(store)
    before = tree(store.root)
    for keys in ({"base": "AB" * 32}, {"base": "ab"}, {"base": 7}, {"base": "../" + "a" * 61},
                 {"patch-9": KEY}, {"base": KEY}, [("patch-2", KEY)]):  # {"base": ...}: not a new part
        with pytest.raises(PoolError, match="content key") as exc:
            store.commit("p", {}, ["base", "patch-1", "patch-2"], {"patch-2": tensors(3)}, 1, content_keys=keys)
        assert "\n" not in str(exc.value)
    assert tree(store.root) == before


def test_content_keys_are_left_alone_by_listing_gc_recovery_verify_and_export(store, tmp_path):
    store.commit("a", {}, ["base"], {"base": tensors(1, 256)}, None, content_keys={"base": KEY})
    make_pool(store, "b")
    keys = store.root / ".content-keys"
    (keys / ("cd" * 32)).write_bytes(b"{garbage")  # a damaged hint is no store damage
    (keys / ".tmp-x-1-2").write_bytes(b"{")  # a killed key write: a leftover like any other
    assert [i.name for i in store.list()] == ["a", "b"] and all(i.error is None for i in store.list())
    assert store.recover() == [str(keys / ".tmp-x-1-2")]
    assert store.collect_garbage() == 0
    assert sorted(os.listdir(keys)) == [KEY, "cd" * 32]
    assert store.verify("a") == [] and store.verify("b") == []
    store.export("a", tmp_path / "a.tar")
    store.remove("a")  # its object goes (b's base has the same content: it stays), the hint stays
    assert KEY in os.listdir(keys) and objects(store) == referenced(store)
    assert store.import_(tmp_path / "a.tar").name == "a" and store.verify("a") == []


# ------------------------------------------------------------------------ locking


def test_writer_lock_is_reentrant_and_names_its_holder(store):
    with store.writer("p"):
        with store.writer("p"):
            make_pool(store)
        info = json.loads((store.root / ".locks" / "p.lock").read_text())
        assert info["pid"] == os.getpid()
    assert (store.root / ".locks" / "p.lock").read_text() == ""  # released: names nobody


def test_writer_on_new_pool_without_commit_leaves_nothing(store):
    with store.writer("ghost"):
        pass
    assert not store.exists("ghost") and not (store.root / "ghost").exists()


def test_writer_busy_across_processes_and_threads(store):
    make_pool(store)
    holder = Holder(store.root, LOCK_HOLDER)
    try:
        with pytest.raises(PoolBusy) as exc:
            store.commit("p", {}, ["base"], {}, 1)
        assert f"process {holder.proc.pid}" in str(exc.value) and "try again later" in str(exc.value)
        with pytest.raises(PoolBusy):
            store.rename("p", "q")
        with pytest.raises(PoolBusy):
            store.remove("p")
        assert same(store.read_part("p", "base"), tensors(1, 256))  # readers never wait for writers
    finally:
        holder.stop()
    errors = []
    with store.writer("p"):
        t = threading.Thread(target=lambda: errors.append(pytest.raises(PoolBusy, store.commit, "p", {}, [], {}, 1)))
        t.start()
        t.join()
    assert errors
    assert store.commit("p", {}, ["base"], {}, 1)["version"] == 2


def test_a_busy_pool_whose_lock_file_holds_garbage_is_still_one_busy_line(store):
    """The holder's lock file only names it for the message: whatever it holds (deeply nested JSON
    that json.loads cannot parse without a RecursionError, binary) the other writer gets PoolBusy."""
    make_pool(store)
    holder = Holder(store.root, """
        with store.writer("p"):
            (store.root / ".locks" / "p.lock").write_bytes(b"[" * 4000)  # the same file, still flocked
            print("ready", flush=True)
            sys.stdin.read()
    """)
    try:
        with pytest.raises(PoolBusy, match="^pool p is being written by another process; try again later$"):
            store.commit("p", {}, ["base"], {}, 1)
    finally:
        holder.stop()


def test_lock_of_a_killed_writer_never_blocks(store):
    make_pool(store)
    holder = Holder(store.root, LOCK_HOLDER)
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait(timeout=30)
    # its lock file still names it, but the kernel released its flock
    assert json.loads((store.root / ".locks" / "p.lock").read_text())["pid"] == holder.proc.pid
    assert store.commit("p", {}, ["base"], {}, 1)["version"] == 2


def test_lock_file_from_another_host_or_garbage_never_blocks(store):
    make_pool(store)
    lock = store.root / ".locks" / "p.lock"
    for content in ('{"pid": 1, "host": "other-machine", "started": "2020-01-01T00:00:00Z"}', "garbage\x00"):
        lock.write_text(content)
        v = store.read_manifest("p")["version"]
        assert store.commit("p", {}, ["base"], {}, v)["version"] == v + 1


def test_lock_path_that_is_a_folder_is_repaired_or_named_with_the_fix(store, caplog):
    make_pool(store)
    lock = store.root / ".locks" / "p.lock"
    lock.unlink()
    lock.mkdir()
    with caplog.at_level(logging.WARNING, logger="memcli.store"):
        assert store.commit("p", {}, ["base"], {}, 1)["version"] == 2
    assert lock.is_file() and any("lock file" in r.getMessage() for r in caplog.records)
    lock.unlink()
    lock.mkdir()
    (lock / "something").write_text("x")
    with pytest.raises(PoolError) as exc:
        store.commit("p", {}, ["base"], {}, 2)
    assert "not a lock file" in str(exc.value) and "rm -r" in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------- snapshots and gc


def test_snapshot_keeps_reading_its_version_after_commits_and_gc(store):
    make_pool(store)
    with store.snapshot("p") as snap:
        old_patch = object_path(store, "p", "patch-1")
        store.commit("p", {}, ["base", "patch-2"], {"patch-2": tensors(9)}, 1)
        store.collect_garbage()
        assert not old_patch.exists()  # collected: no manifest names it ...
        assert snap.version == 1 and same(snap.read("patch-1"), tensors(2))  # ... but the snapshot holds it
    assert store.read_manifest("p")["version"] == 2


def test_gc_never_runs_while_a_reader_opens_a_snapshot(store):
    make_pool(store)
    patch = object_path(store, "p", "patch-1")
    with store.gate.shared():  # a reader between reading the manifest and opening its parts
        store.commit("p", {}, ["base"], {}, 1)  # patch-1 is garbage now, but may not go yet
        assert store.collect_garbage(wait_s=0) == 0
        assert patch.exists()
    # the collection the commit could not run is run by whoever lets the gate go last: here, this reader
    assert not patch.exists() and objects(store) == referenced(store)
    assert store.collect_garbage() == 0


def test_four_readers_during_200_commits_never_fail_and_see_committed_versions(store):
    """4 reader threads load the pool (full state: every part; and info) in a loop while a
    writer makes 200 commits, each replacing a part: no read fails, every read is one
    committed version (its parts hold exactly that version's content)."""
    store.commit("p", {"v": 1}, ["base", "v-part"], {"base": tensors(1, 256), "v-part": {"v": torch.tensor([1])}}, None)
    done = threading.Event()
    failures, reads = [], [0, 0]

    def reader(kind: int) -> None:
        r = PoolStore()
        while not done.is_set():
            try:
                if kind % 2:
                    info = r.info("p")
                    assert info.meta["v"] == info.version
                else:
                    with r.snapshot("p") as snap:
                        v = snap.version
                        assert snap.manifest["meta"]["v"] == v
                        assert int(snap.read("v-part")["v"]) == v
                        assert same(snap.read("base"), tensors(1, 256))
                reads[kind % 2] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                failures.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 202):
            store.commit("p", {"v": v}, ["base", "v-part"], {"v-part": {"v": torch.tensor([v])}}, v - 1)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    assert reads[0] > 0 and reads[1] > 0
    assert store.read_manifest("p")["version"] == 201
    store.collect_garbage()
    assert objects(store) == referenced(store)  # every superseded part was collected in the end


# ------------------------------------------------------------------------ recovery


def test_next_write_removes_leftovers_with_one_stderr_line(store):
    make_pool(store)
    root = store.root
    (root / ".tmp-123-abc").mkdir()  # a staged folder nobody holds
    (root / ".tmp-123-abc" / "manifest.json").write_text("{}")
    (root / ".tmp-rm-9-xyz").mkdir()  # a removal's trash
    (root / ".objects" / ".tmp-1-2").write_bytes(b"x" * 100)
    (root / ".objects" / ("ab" * 32)).write_bytes(b"orphan")  # an object no manifest names
    (root / "p" / ".tmp-manifest.json-1-2").write_text("{")
    (root / "p" / "log.jsonl").write_bytes(b'{"uncommitted": 1}\n')
    (root / "old-creation").mkdir()  # a format-1 creation that never committed
    (root / "old-creation" / ".creating").write_bytes(b"")
    before = store.read_manifest("p")
    code = "from memcli.store import PoolStore\nPoolStore().commit('p', {}, ['base'], {}, 1)"
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "removed" in lines[0] and "leftover" in lines[0], out.stderr
    assert leftovers(root) == [] and not (root / "old-creation").exists()
    assert objects(store) == referenced(store)
    assert not (root / "p" / "log.jsonl").exists() or (root / "p" / "log.jsonl").read_bytes() == b""
    assert store.read_manifest("p")["version"] == before["version"] + 1 and store.verify("p") == []
    out = run_py(code.replace("1)", "2)"))  # nothing left: nothing said
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_recovery_spares_work_in_progress(store):
    make_pool(store)
    holder = Holder(store.root, """
        import os, fcntl
        from memcli.store import staging
        os.makedirs(store.root, exist_ok=True)
        os.mkdir(store.root / ".tmp-live-1")
        fd = staging.flock_entry(store.root / ".tmp-live-1")
        print("ready", flush=True)
        sys.stdin.read()
    """)
    try:
        assert store.recover() == []
        assert (store.root / ".tmp-live-1").exists()
    finally:
        holder.stop()
    assert store.recover() == [str(store.root / ".tmp-live-1")]


def test_recovery_removes_a_killed_exports_record_and_file_whatever_the_record_holds(store, tmp_path):
    """An export killed midway leaves its record in the store and its temporary file beside the
    destination: recovery removes both. A record that is not ours (any bytes, JSON nested past what
    json.loads can parse) is removed as a leftover; nothing it names is touched."""
    from memcli.store import staging

    make_pool(store)
    tmp = staging.export_tmp_path(tmp_path / "out.tar")
    tmp.write_bytes(b"half an archive")
    record, fd = staging.write_export_record(store.root, tmp)
    os.close(fd)  # as the kernel does for a killed process: the record's flock is released
    keep = tmp_path / "keep.memcli-export"
    keep.write_bytes(b"somebody's")
    odd = [store.root / ".tmp-export-odd1", store.root / ".tmp-export-odd2"]
    odd[0].write_bytes(b"[" * 60000)
    odd[1].write_bytes(json.dumps({"tmp": str(tmp_path)}).encode())  # a folder: never removed
    assert sorted(store.recover()) == sorted(map(str, [record, *odd]))
    assert not tmp.exists() and keep.exists() and tmp_path.is_dir()


def test_verify_finds_damage_and_repair_does_not_touch_it(store):
    make_pool(store)
    flip_byte(object_path(store, "p", "patch-1"))
    problems = store.verify("p")
    assert problems == ["part patch-1 is damaged (sha256 mismatch)"]
    assert store.recover() == []  # damage is reported, never removed
    os.unlink(object_path(store, "p", "base"))
    assert any("base is missing" in p for p in store.verify("p"))


# --------------------------------------------------------------- fork/rename/remove


def test_fork_writes_a_manifest_only_and_is_independent(store):
    make_pool(store, "a")
    before = objects(store)
    info = store.fork("a", "b")
    assert info.name == "b" and info.version == 1 and objects(store) == before
    mb = store.read_manifest("b")
    assert mb["meta"]["forked_from"] == {"name": "a", "version": 1}
    assert mb["parts"] == store.read_manifest("a")["parts"]
    store.commit("b", {}, ["base", "new"], {"new": tensors(5)}, 1)
    assert same(store.read_part("a", "patch-1"), tensors(2))  # a is untouched
    store.remove("a")
    assert same(store.read_part("b", "base"), tensors(1, 256)) and store.verify("b") == []
    with pytest.raises(PoolExists):
        store.fork("b", "b")
    with pytest.raises(PoolNotFound):
        store.fork("nope", "c")


def test_rename_and_remove(store):
    make_pool(store, "old")
    store.rename("old", "new")
    assert not store.exists("old") and store.read_manifest("new")["name"] == "new"
    make_pool(store, "other")
    with pytest.raises(PoolExists):
        store.rename("new", "other")
    store.remove("new")
    assert not store.exists("new") and objects(store) == referenced(store)
    with pytest.raises(PoolNotFound):
        store.remove("new")
    assert leftovers(store.root) == []


# ------------------------------------------------------------------- export/import


def _reg(name: str, data: bytes, **attrs) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def _tar_with(path: Path, members, fmt=tarfile.PAX_FORMAT) -> None:
    import io

    with tarfile.open(path, "w", format=fmt) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)


def test_export_import_round_trip(store, tmp_path):
    make_pool(store, "a")
    f = tmp_path / "a.tar"
    store.export("a", f)
    with tarfile.open(f) as tar:
        assert tar.getnames() == ["manifest.json", "parts/base.safetensors", "parts/patch-1.safetensors"]
    info = store.import_(f, "b")
    assert info.name == "b" and store.verify("b") == []
    for pid in ("base", "patch-1"):
        assert same(store.read_part("b", pid), store.read_part("a", pid))
    store.remove("a")
    store.remove("b")
    info = store.import_(f)  # under its exported name, into a store without its objects
    assert info.name == "a" and store.verify("a") == []
    with pytest.raises(PoolExists):
        store.import_(f)


def _archive_members(store, tmp_path):
    make_pool(store, "keep")
    f = tmp_path / "good.tar"
    store.export("keep", f)
    with tarfile.open(f) as tar:
        m = json.loads(tar.extractfile("manifest.json").read())
        base = tar.extractfile("parts/base.safetensors").read()
        patch = tar.extractfile("parts/patch-1.safetensors").read()
    m["name"] = "imp"
    return m, base, patch


def _header_bomb() -> bytes:
    import struct

    head = json.dumps({"x": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(head)) + head + b"\x00" * 16


@pytest.mark.parametrize("case", [
    "evil-dotdot", "absolute", "symlink", "hardlink", "dir", "device", "fifo-member", "sparse", "extra",
    "not-in-manifest", "missing-part", "future-format", "not-tar", "truncated", "bad-json", "deep-json",
    "manifest-not-first", "bad-name", "dup", "size-lie", "header-bomb", "member-count-bomb", "control-chars",
    "wrong-types",
])
def test_import_refuses_bad_archives(store, tmp_path, case):
    m, base, patch = _archive_members(store, tmp_path)
    good_manifest = json.dumps(m).encode()
    good = [_reg("manifest.json", good_manifest), _reg("parts/base.safetensors", base),
            _reg("parts/patch-1.safetensors", patch)]
    bad = tmp_path / "bad.tar"

    def with_manifest(m2, rest=None):
        _tar_with(bad, [_reg("manifest.json", json.dumps(m2).encode())] + (good[1:] if rest is None else rest))

    if case == "evil-dotdot":
        _tar_with(bad, good + [_reg("../evil", b"x")])
    elif case == "absolute":
        _tar_with(bad, good + [_reg("/etc/evil", b"x")])
    elif case in ("symlink", "hardlink", "dir", "device", "fifo-member"):
        ti = tarfile.TarInfo("parts/base.safetensors")
        ti.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE,
                   "device": tarfile.CHRTYPE, "fifo-member": tarfile.FIFOTYPE}[case]
        ti.linkname = "/etc/passwd"
        _tar_with(bad, [good[0], (ti, None), good[2]])
    elif case == "sparse":
        # a PAX "GNU sparse" member: a few bytes in the archive that would expand on extraction
        ti, data = _reg("parts/base.safetensors", base)
        ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(2 << 30)}
        _tar_with(bad, [good[0], (ti, data), good[2]])
    elif case == "extra":
        _tar_with(bad, good + [_reg("parts/x.pickle", b"x")])
    elif case == "not-in-manifest":
        _tar_with(bad, good + [_reg("parts/zzz.safetensors", b"x")])
    elif case == "missing-part":
        _tar_with(bad, good[:2])
    elif case == "future-format":
        with_manifest(dict(m, format_version=9))
    elif case == "not-tar":
        bad.write_bytes(b"hello, this is not a tar file" * 100)
    elif case == "truncated":
        _tar_with(bad, good)
        bad.write_bytes(bad.read_bytes()[: 1024 + len(good_manifest) + 2000])
    elif case == "bad-json":
        _tar_with(bad, [_reg("manifest.json", b"{oops")] + good[1:])
    elif case == "deep-json":
        _tar_with(bad, [_reg("manifest.json", b"[" * 100_000 + b"]" * 100_000)] + good[1:])
    elif case == "manifest-not-first":
        _tar_with(bad, good[1:] + good[:1])
    elif case == "bad-name":
        with_manifest(dict(m, name="../../etc"))
    elif case == "dup":
        _tar_with(bad, good + [good[1]])
    elif case == "size-lie":
        m4 = json.loads(good_manifest)
        m4["parts"]["base"]["bytes"] = 10**15
        with_manifest(m4)
    elif case == "header-bomb":
        bomb = _header_bomb()
        digest = durable.new_hash()
        digest.update(bomb)
        m5 = json.loads(good_manifest)
        m5["parts"]["base"] = {"sha256": digest.hexdigest(), "bytes": len(bomb)}
        with_manifest(m5, [_reg("parts/base.safetensors", bomb), good[2]])
    elif case == "member-count-bomb":
        _tar_with(bad, good + [_reg("parts/base.safetensors", base)] * 10_000)
    elif case == "control-chars":
        with_manifest(dict(m, updated="\x1b[2J\x1b]0;pwned\x07"))
    elif case == "wrong-types":
        with_manifest(dict(m, parts={"base": {"sha256": 3, "bytes": "x"}}))
    names_before = sorted(os.listdir(store.root))
    objects_before = objects(store)
    with pytest.raises(PoolError) as exc:
        store.import_(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "\x1b" not in msg and "unexpected" not in msg
    assert not store.exists("imp")
    assert sorted(os.listdir(store.root)) == names_before and objects(store) == objects_before
    assert leftovers(store.root) == []
    assert not (tmp_path / "evil").exists() and not (store.root.parent / "evil").exists()


def test_import_of_a_fifo_or_folder_is_refused_without_blocking(store, tmp_path):
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    signal.alarm(30)
    try:
        with pytest.raises(PoolError, match="not a regular file"):
            store.import_(fifo)
        with pytest.raises(PoolError, match="not a regular file"):
            store.import_(tmp_path)
    finally:
        signal.alarm(0)


def test_export_never_clobbers(store, tmp_path):
    make_pool(store, "a")
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    user_tmp = tmp_path / "x.tar.tmp"
    user_tmp.write_text("the user's own file")
    existing = tmp_path / "x.tar"
    existing.write_text("precious")
    with pytest.raises(PoolExists, match="--force"):
        store.export("a", existing)
    assert existing.read_text() == "precious" and user_tmp.read_text() == "the user's own file"
    store.export("a", existing, force=True)
    assert tarfile.is_tarfile(existing) and user_tmp.read_text() == "the user's own file"
    assert sorted(os.listdir(tmp_path)) == ["x.tar", "x.tar.tmp"]
    manifest = store.root / "a" / "manifest.json"
    before = tree(store.root)
    for inside in (manifest, object_path(store, "a", "base"), store.root / "new.tar", store.root / "a" / "x.tar"):
        with pytest.raises(PoolError, match="inside the pool store"):
            store.export("a", inside, force=True)
    assert tree(store.root) == before and store.verify("a") == []
    with pytest.raises(PoolError, match="not a regular file"):
        store.export("a", tmp_path, force=True)


def test_export_refuses_damaged_pool_and_leaves_no_file(store, tmp_path):
    make_pool(store, "a")
    flip_byte(object_path(store, "a", "base"))
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    f = tmp_path / "a.tar"
    with pytest.raises(PoolCorrupt, match="base"):
        store.export("a", f)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- damaged pools


def test_truncated_part_detected_without_hashing(store):
    make_pool(store)
    path = object_path(store, "p", "base")
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(PoolCorrupt, match="size"):
        store.read_part("p", "base")


def test_manifest_future_format_garbage_and_wrong_types(store):
    make_pool(store)
    mp = store.root / "p" / "manifest.json"
    good = json.loads(mp.read_text())
    cases = {
        "format_version": dict(good, format_version=99), "version": dict(good, version="7"),
        "updated": dict(good, updated="\x1b[2J"), "'parts'": dict(good, parts=["a"]),
        "part base": dict(good, parts={"base": {"sha256": "x", "bytes": -1}}), "'meta'": dict(good, meta=[]),
        "'log'": dict(good, log={"bytes": "x"}),
    }
    for field, m in cases.items():
        mp.write_text(json.dumps(m))
        with pytest.raises(PoolCorrupt) as exc:
            store.read_manifest("p")
        assert field in str(exc.value) and "manifest.json" in str(exc.value) and "\n" not in str(exc.value)
    for raw in (b"{oops", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"a": NaN}'):
        mp.write_bytes(raw)
        with pytest.raises(PoolCorrupt) as exc:
            store.read_manifest("p")
        assert "manifest.json" in str(exc.value)
    assert [i.name for i in store.list() if i.error] == ["p"]


@pytest.mark.parametrize("what", ["manifest", "part", "log"])
def test_fifo_in_place_of_a_file_never_blocks(store, what):
    store.commit("p", {}, ["base"], {"base": tensors(1)}, None, log_append=[{"a": 1}])
    make_pool(store, "other")
    target = {"manifest": store.root / "p" / "manifest.json", "part": object_path(store, "p", "base"),
              "log": store.root / "p" / "log.jsonl"}[what]
    target.unlink()
    os.mkfifo(target)
    signal.alarm(30)
    try:
        for call in (lambda: store.snapshot("p").close(), lambda: store.read_part("p", "base"),
                     lambda: store.export("p", Path(str(store.root) + "-out.tar"))):
            with pytest.raises(PoolCorrupt) as exc:
                call()
            assert "not a regular file" in str(exc.value)
        assert any("not a regular file" in p or "FIFO" in p for p in store.verify("p"))
        # list() marks p whatever was replaced (a part without reading it: it is not a regular file)
        assert [i.name for i in store.list() if not i.error] == ["other"]
        assert [i.name for i in store.list() if i.error] == ["p"]
    finally:
        signal.alarm(0)


def test_symlinked_pool_folder_manifest_or_part_refused(store, tmp_path):
    make_pool(store, "real")
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "link").symlink_to(store.root / "real")
    with pytest.raises(PoolCorrupt, match="symbolic link"):
        store.read_manifest("link")
    store.remove("link")  # removes the link only
    assert store.verify("real") == []
    part = object_path(store, "real", "base")
    os.replace(part, outside / "part")
    part.symlink_to(outside / "part")
    with pytest.raises(PoolCorrupt, match="symbolic link"):
        store.read_part("real", "base")


# ------------------------------------------------------------------------ disk full


@pytest.mark.parametrize("where", [1, 2, 3])
def test_disk_full_during_commit_leaves_pool_unchanged(store, monkeypatch, where):
    make_pool(store)
    before = store.read_manifest("p")
    before_tree = tree(store.root / "p")
    calls = [0]
    real = durable.write_all

    def failing(fd, data):
        calls[0] += 1
        if calls[0] >= where:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    from memcli.store import core

    monkeypatch.setattr(core, "write_all", failing)
    monkeypatch.setattr(durable, "write_all", failing)
    with pytest.raises(PoolError) as exc:
        store.commit("p", {"v": 2}, ["base", "n1", "n2"], {"n1": tensors(7), "n2": tensors(8)}, 1,
                     log_append=[{"x": 1}])
    assert "no space left on device" in str(exc.value) and "unchanged" in str(exc.value)
    monkeypatch.undo()
    assert store.read_manifest("p") == before and tree(store.root / "p") == before_tree
    assert leftovers(store.root) == []
    assert store.verify("p") == []


def test_pool_verify_repair_removes_leftovers_in_one_line(store, caplog):
    """(In-process, pytest's log capture takes the line that a real run prints on stderr.)"""
    from typer.testing import CliRunner

    from memcli.cli import main as cli

    make_pool(store)
    (store.root / ".tmp-5-dead").mkdir()
    (store.root / ".objects" / ".tmp-5-half").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="memcli.store"):
        result = CliRunner().invoke(cli.app, ["pool", "verify", "p", "--repair"])
    assert result.exit_code == 0, result.output
    lines = [r.getMessage() for r in caplog.records if r.name == "memcli.store"]
    assert len(lines) == 1 and "removed 2 leftover(s)" in lines[0], lines
    assert leftovers(store.root) == [] and "ok" in result.stdout


# ============================================================ issue 17: damage where it is read

from memcli.store import PoolReadOnly, integrity  # noqa: E402
from memcli.store import snapshot as snapshot_module  # noqa: E402


def damage(path: Path, offset: int | None = None) -> None:
    """Flip one byte of `path` in place, as a bad write or a disk would. Its mtime is then set to
    another second: file timestamps are as coarse as a kernel tick, so a file written and damaged
    within one tick could keep its identity (a test that reads, damages and reads again at once)."""
    flip_byte(path, offset)
    st_ = os.stat(path)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))


class Hashes:
    """Counts the bytes a snapshot read feeds to sha256 (a spy on snapshot.new_hash)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        real = snapshot_module.new_hash
        spy = self

        class Counted:
            def __init__(self):
                self.h = real()

            def update(self, data):
                spy.bytes += len(data)
                self.h.update(data)

            def hexdigest(self):
                return self.h.hexdigest()

        monkeypatch.setattr(snapshot_module, "new_hash", Counted)


def test_a_part_is_checked_once_per_process_per_file_identity(store, monkeypatch):
    make_pool(store)
    integrity.forget()
    hashes = Hashes(monkeypatch)
    size = store.read_manifest("p")["parts"]["base"]["bytes"]
    assert same(store.read_part("p", "base"), tensors(1, 256))
    assert hashes.bytes == size  # hashed in the pass that read it
    assert same(store.read_part("p", "base"), tensors(1, 256))
    assert hashes.bytes == size  # the same file again: not hashed again
    assert same(store.read_part("p", "base", verify=True), tensors(1, 256))
    assert hashes.bytes == 2 * size  # verify=True: whatever was checked before
    path = object_path(store, "p", "base")
    os.utime(path, ns=(0, 10**18))  # another identity (a touched file): checked again
    store.read_part("p", "base")
    assert hashes.bytes == 3 * size


def test_a_damaged_part_is_refused_where_it_is_read_and_marked_for_listing(store):
    make_pool(store, "a")
    store.fork("a", "b")  # shares every part of a
    store.commit("c", {}, ["other"], {"other": tensors(5)}, None)  # shares nothing
    read = store.read_part("a", "patch-1")  # checked and remembered: the damage below is seen anyway
    assert same(read, tensors(2))
    damage(object_path(store, "a", "patch-1"))
    for pool in ("a", "b"):
        with pytest.raises(PoolCorrupt) as exc:
            store.read_part(pool, "patch-1")
        message = str(exc.value)
        assert message == (f"pool {pool}: part patch-1 is damaged (sha256 mismatch); "
                           f"run memcli pool verify {pool} --repair"), message
    assert same(store.read_part("c", "other"), tensors(5))
    listed = {i.name: i.error for i in store.list()}
    assert listed["c"] is None
    for pool in ("a", "b"):  # recorded by the read that found it: listing marks both, hashing nothing
        assert listed[pool] == (f"pool {pool}: part patch-1 is damaged (sha256 mismatch); "
                                f"run memcli pool verify {pool} --repair")
    assert store.part_problems("c") == []


def test_repair_removes_a_damaged_object_and_the_same_content_restores_it(store, tmp_path):
    make_pool(store, "a")
    store.fork("a", "b")
    store.export("a", tmp_path / "a.tar")
    damage(object_path(store, "a", "base"))
    assert store.verify("a") == ["part base is damaged (sha256 mismatch)"]
    # a commit of that very content never reuses the damaged object: the good bytes replace it
    store.commit("c", {}, ["base"], {"base": tensors(1, 256)}, None, probe=["base"])
    assert store.verify("a") == [] and store.verify("b") == [] and [i.error for i in store.list()] == [None] * 3
    store.remove("c")
    damage(object_path(store, "a", "base"))
    assert store.verify("b") == ["part base is damaged (sha256 mismatch)"]
    sha = store.read_manifest("a")["parts"]["base"]["sha256"]
    done = store.repair("a")
    assert len(done) == 1 and "removed the damaged object of part base" in done[0] and "pools a, b name it" in done[0]
    assert sha not in objects(store)
    assert store.recover() == [] and store.repair("a") == []  # nothing more to remove; the rest kept
    for pool in ("a", "b"):
        assert store.verify(pool) == [f"pool {pool}: part base is missing"]
    store.remove("a")
    store.import_(tmp_path / "a.tar", "a")  # an export holding the content puts it back, for b too
    assert store.verify("a") == [] and store.verify("b") == [] and sha in objects(store)


def test_verify_drops_a_damage_record_whose_file_is_whole(store):
    make_pool(store)
    path = object_path(store, "p", "patch-1")
    integrity.record_damage(store.root, path.name, os.stat(path))  # stale, or forged: it can only alarm
    assert store.list()[0].error and "damaged" in store.list()[0].error
    assert store.verify("p") == []
    assert store.list()[0].error is None and not (store.root / ".damaged" / path.name).exists()


# -------------------------------------------------------------- folders never followed


def outside_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: its bytes and mtime (to show nothing was deleted, written or touched)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("folder", [".objects", ".locks", ".content-keys", ".damaged"])
def test_a_symlinked_store_folder_is_never_followed(store, tmp_path, folder):
    """The folder moved outside the store and a link put in its place (with sha-named garbage and
    temporary files beside what it held): no read, commit, collection or recovery deletes, writes or
    changes anything there; writers and readers that need it name it with the fix."""
    store.commit("p", {}, ["base", "patch-1"], {"base": tensors(1, 256), "patch-1": tensors(2)}, None,
                 content_keys={"base": KEY})
    integrity.record_damage(store.root, "cd" * 32, os.stat(object_path(store, "p", "base")))
    (store.root / ".locks" / "gc-pending").write_bytes(b"")  # a collection is due
    outside = tmp_path / "outside"
    shutil.move(str(store.root / folder), str(outside))
    (outside / ("ef" * 32)).write_bytes(b"not the store's")  # garbage by the store's rules, if it followed
    (outside / ".tmp-1-leftover").write_bytes(b"a leftover, by the store's rules")
    os.symlink(outside, store.root / folder)
    before = outside_tree(outside)
    calls = [lambda s: s.commit("p", {}, ["base", "patch-2"], {"patch-2": tensors(3)}, 1),
             lambda s: s.collect_garbage(), lambda s: s.recover(), lambda s: s.read_part("p", "base"),
             lambda s: s.list(), lambda s: s.fork("p", "f"), lambda s: s.remove("p")]
    errors = []
    for call in calls:
        try:
            call(PoolStore())  # each as a new command would
        except PoolError as exc:
            errors.append(str(exc))
    assert outside_tree(outside) == before
    if folder in (".objects", ".locks"):
        assert errors and all(f"{store.root / folder} is a symbolic link" in e and "\n" not in e for e in errors), errors
    if folder == ".objects":
        assert store.list()[0].error.startswith(f"{store.root / folder} is a symbolic link")


@pytest.mark.parametrize("what", [".locks", ".objects", "pools", "data"])
def test_a_file_where_a_store_folder_belongs_is_named_with_the_fix(store, tmp_path, what):
    make_pool(store)
    store.export("p", tmp_path / "p.tar")
    path = {"pools": store.root, "data": store.root.parent}.get(what, store.root / what)
    os.rename(path, str(path) + ".real")
    path.write_text("somebody's file")
    expected = f"{path} is a file where memcli keeps a folder: move it away (mv '{path}' '{path}.moved')"
    for call in (lambda: store.commit("q", {}, ["base"], {"base": tensors(1, 256)}, None), lambda: store.fork("p", "q"),
                 lambda: store.import_(tmp_path / "p.tar", "q"), lambda: PoolStore().remove("p")):
        with pytest.raises(PoolError) as exc:
            call()
        assert str(exc.value).startswith(expected), str(exc.value)
    if what in ("pools", "data"):  # listing names it too (nothing to list otherwise)
        with pytest.raises(PoolError, match="is a file where memcli keeps a folder"):
            store.list()
    elif what == ".locks":  # readers need no lock file: they go on
        assert store.list()[0].error is None and same(store.read_part("p", "base"), tensors(1, 256))
    else:
        assert store.list()[0].error.startswith(expected)
    assert path.read_text() == "somebody's file"


# ------------------------------------------------------------------------ the log


def committed_log(store: PoolStore, name: str) -> bytes:
    m = store.read_manifest(name)
    return (store.root / name / "log.jsonl").read_bytes()[: m["log"]["bytes"]]


@pytest.mark.parametrize("cut", [1, 7, "whole last record"])
def test_a_torn_last_log_record_is_left_out_and_cut_by_the_next_write(store, cut, caplog):
    store.commit("p", {}, ["base"], {"base": tensors(1)}, None, log_append=[{"n": 1}, {"n": 2}])
    store.commit("p", {}, ["base"], {}, 1, log_append=[{"n": 3}])
    log = store.root / "p" / "log.jsonl"
    size = log.stat().st_size
    keep = size - len(b'{"n":3}\n') if cut == "whole last record" else size - cut
    os.truncate(log, keep)
    with caplog.at_level(logging.WARNING, logger="memcli.store"):
        with store.snapshot("p") as snap:
            assert snap.log_records() == [{"n": 1}, {"n": 2}]
    lines = [r.getMessage() for r in caplog.records if r.name == "memcli.store"]
    assert len(lines) == 1 and "interrupted append" in lines[0]
    assert any("interrupted append" in p for p in store.verify("p"))
    store.commit("p", {}, ["base"], {}, 2, log_append=[{"n": 4}])  # the next write continues from the whole part
    assert log.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":4}\n' and store.verify("p") == []
    with store.snapshot("p") as snap:
        assert snap.log_records() == [{"n": 1}, {"n": 2}, {"n": 4}]


def test_a_torn_log_is_cut_by_repair(store):
    store.commit("p", {}, ["base"], {"base": tensors(1)}, None, log_append=[{"n": 1}, {"n": 2}])
    log = store.root / "p" / "log.jsonl"
    os.truncate(log, log.stat().st_size - 3)
    assert store.repair("p") == ["cut the torn last record off pool p's log.jsonl"]
    assert store.verify("p") == [] and log.read_bytes() == b'{"n":1}\n'


def test_more_than_a_torn_record_missing_is_damage(store):
    store.commit("p", {}, ["base"], {"base": tensors(1)}, None, log_append=[{"n": 1}, {"n": 2}, {"n": 3}])
    os.truncate(store.root / "p" / "log.jsonl", 5)
    with pytest.raises(PoolCorrupt, match="shorter than its manifest says"):
        with store.snapshot("p") as snap:
            snap.log_records()


HUGE_LOG = """
import json, os, resource, sys
from memcli.store import PoolStore, PoolCorrupt
store = PoolStore(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    {call}
    print("no error")
except PoolCorrupt as exc:
    print(json.dumps({{"error": str(exc), "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}}))
"""


@pytest.mark.parametrize("how", ["snapshot", "fork", "export"])
def test_a_1_gib_log_record_is_refused_while_it_streams(store, tmp_path, how):
    """A committed log whose first line is 1 GiB (a sparse file: nothing is really written): each
    reader refuses it after 1 MiB of it, in a subprocess whose peak memory grows by a few MiB."""
    store.commit("p", {}, ["base"], {"base": tensors(1)}, None, log_append=[{"n": 1}])
    size = 1 << 30
    log = store.root / "p" / "log.jsonl"
    with open(log, "r+b") as f:
        f.truncate(0)
        f.truncate(size)  # a hole: zeros, no newline until the end
        f.seek(size - 1)
        f.write(b"\n")
    mp = store.root / "p" / "manifest.json"
    m = json.loads(mp.read_text())
    m["log"] = {"bytes": size, "records": 1024}  # plausible on average: 1 MiB a record
    mp.write_text(json.dumps(m))
    call = {"snapshot": "store.snapshot('p').log_records()", "fork": "store.fork('p', 'f')",
            "export": f"store.export('p', {str(tmp_path / 'x.tar')!r})"}[how]
    out = subprocess.run([sys.executable, "-c", HUGE_LOG.format(call=call), str(store.root)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert "log.jsonl record 1 is implausibly large" in result["error"]
    assert result["grew_kib"] < 32 * 1024, result  # never the line whole (a GiB): a few MiB
    assert not store.exists("f") and not (tmp_path / "x.tar").exists() and leftovers(store.root) == []


@pytest.mark.parametrize("damage_kind", ["not JSON", "not an object", "more records", "deep"])
def test_fork_and_export_check_the_log_they_copy(store, tmp_path, damage_kind):
    store.commit("p", {}, ["base"], {"base": tensors(1)}, None, log_append=[{"n": 1}, {"n": 2}])
    log = store.root / "p" / "log.jsonl"
    bad = {"not JSON": b'{"n":1}\n{"n":}\n', "not an object": b'{"n":1}\n[2,3]\n',
           "more records": b'{"n":1}\n{}\n{}\n', "deep": b'{"n":1}\n' + b'{"a":' * 20 + b"1" + b"}" * 20 + b"\n"}
    data = bad[damage_kind]
    log.write_bytes(data)
    mp = store.root / "p" / "manifest.json"
    m = json.loads(mp.read_text())
    m["log"]["bytes"] = len(data)
    mp.write_text(json.dumps(m))
    out = tmp_path / "out"
    out.mkdir()
    for call in (lambda: store.fork("p", "f"), lambda: store.export("p", out / "p.tar")):
        with pytest.raises(PoolCorrupt) as exc:
            call()
        assert "pool p: log.jsonl" in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert not store.exists("f") and os.listdir(out) == [] and leftovers(store.root) == []


def test_an_export_is_always_importable(store, tmp_path):
    """An export of a pool with a torn last log record holds the whole records only, and imports."""
    store.commit("p", {"k": 1}, ["base"], {"base": tensors(1)}, None, log_append=[{"n": 1}, {"n": 2}])
    log = store.root / "p" / "log.jsonl"
    os.truncate(log, log.stat().st_size - 2)
    store.export("p", tmp_path / "p.tar")
    store.import_(tmp_path / "p.tar", "q")
    with store.snapshot("q") as snap:
        assert snap.log_records() == [{"n": 1}] and snap.manifest["log"]["records"] == 1
    assert store.verify("q") == []


# ------------------------------------------------------------------- gc with readers


def test_a_collection_a_reader_held_off_runs_when_the_last_holder_lets_go(store):
    """A reader in another process holds the gate while a commit unreferences a part: that commit's
    collection cannot run; the reader's letting go runs it (nobody calls collect_garbage)."""
    make_pool(store)
    holder = Holder(store.root, """
        with store.gate.shared():
            print("ready", flush=True)
            sys.stdin.read()
    """)
    try:
        store.commit("p", {}, ["base"], {}, 1)  # patch-1 unreferenced; its collection finds the gate taken
        assert objects(store) != referenced(store) and (store.root / ".locks" / "gc-pending").exists()
    finally:
        holder.stop()  # lets the gate go and exits
    assert objects(store) == referenced(store) and not (store.root / ".locks" / "gc-pending").exists()


def test_gc_with_readers_looping_leaves_no_unreferenced_object(store):
    """Readers loop over the pool (each opens a snapshot, holding the gate while it opens it, and
    reads) while a writer makes 40 commits, each unreferencing a part; one reader holds the gate
    across the last commit, so that its collection cannot run. Synchronised by events only. Once
    every reader stopped, no unreferenced object is left, though nobody called collect_garbage."""
    store.commit("p", {"v": 1}, ["base", "v-part"], {"base": tensors(1, 256), "v-part": {"v": torch.tensor([1])}}, None)
    looping = [threading.Event() for _ in range(3)]
    done, holding, release = threading.Event(), threading.Event(), threading.Event()
    failures = []

    def reader(i: int) -> None:
        r = PoolStore()
        while not done.is_set():
            try:
                with r.snapshot("p") as snap:
                    assert int(snap.read("v-part")["v"]) == snap.version
            except Exception as exc:  # noqa: BLE001 - counted
                failures.append(repr(exc))
            looping[i].set()

    def holder() -> None:
        with PoolStore().gate.shared():
            holding.set()
            release.wait(60)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for e in looping:
            assert e.wait(60)
        for v in range(2, 41):
            store.commit("p", {"v": v}, ["base", "v-part"], {"v-part": {"v": torch.tensor([v])}}, v - 1)
        hold = threading.Thread(target=holder)
        hold.start()
        assert holding.wait(60)
        store.commit("p", {"v": 41}, ["base", "v-part"], {"v-part": {"v": torch.tensor([41])}}, 40)
        assert (store.root / ".locks" / "gc-pending").exists()  # the last collection could not run
    finally:
        release.set()
        done.set()
        for t in threads:
            t.join(timeout=60)
        hold.join(timeout=60)
    assert failures == []
    assert objects(store) == referenced(store) and len(objects(store)) == 2


# --------------------------------------------------------------------- read-only stores



@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_a_read_only_store_reads_and_refuses_writes_in_one_line(store, tmp_path, err, caplog):
    make_pool(store, "a")
    make_pool(store, "b")
    store.export("a", tmp_path / "a.tar")
    (store.root / ".tmp-7-killed").mkdir()  # a leftover that recovery cannot remove here
    before = tree(store.root)
    patched = pytest.MonkeyPatch()
    read_only_home(patched, store.root.parent.parent, err)
    fresh = PoolStore()
    with caplog.at_level(logging.WARNING, logger="memcli.store"):
        assert [i.name for i in fresh.list()] == ["a", "b"] and all(i.error is None for i in fresh.list())
        assert same(fresh.read_part("a", "base"), tensors(1, 256)) and fresh.verify("a") == []
        fresh.export("a", tmp_path / "again.tar")  # to a writable place
    lines = [r.getMessage() for r in caplog.records if r.name == "memcli.store"]
    assert len(lines) == 1 and "cannot be written: 1 leftover(s)" in lines[0], lines
    assert (tmp_path / "again.tar").stat().st_size == (tmp_path / "a.tar").stat().st_size
    reason = os.strerror(err)
    for call in (lambda: fresh.commit("a", {}, ["base"], {}, 1), lambda: fresh.fork("a", "c"),
                 lambda: fresh.remove("a"), lambda: fresh.rename("a", "c"), lambda: fresh.import_(tmp_path / "a.tar", "c"),
                 lambda: fresh.repair("a"), lambda: fresh.check_writable()):
        with pytest.raises(PoolReadOnly) as exc:
            call()
        assert str(exc.value).startswith(f"the pool store {store.root} is read-only ({reason})"), str(exc.value)
    patched.undo()
    assert tree(store.root) == before


def test_import_onto_a_name_another_process_writes_says_busy(store, tmp_path):
    make_pool(store, "a")
    store.export("a", tmp_path / "a.tar")
    holder = Holder(store.root, LOCK_HOLDER.replace('"p"', '"c"'))
    try:
        with pytest.raises(PoolBusy, match="pool c is being written by process"):
            store.import_(tmp_path / "a.tar", "c")
    finally:
        holder.stop()
    assert store.import_(tmp_path / "a.tar", "c").name == "c"
