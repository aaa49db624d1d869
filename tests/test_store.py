"""Tests for memcli.store: the durable pool store.

Every test runs against its own MEMCLI_HOME (tests/conftest.py)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import memcli.store as store_mod
from memcli import paths
from memcli.store import (
    InvalidPoolName,
    PoolBusy,
    PoolCorrupt,
    PoolError,
    PoolExists,
    PoolInfo,
    PoolNotFound,
    PoolStore,
    validate_name,
)

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
    return store.commit(
        name,
        {"model": "m1", "log": [1, 2]},
        ["base", "patch-1"],
        {"base": tensors(1, 256), "patch-1": tensors(2)},
        None,
    )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def snapshot(store: PoolStore, name: str) -> tuple[dict, dict]:
    """Manifest + every part's tensors (sha-verified): what 'bit-identical' means here."""
    m = store.read_manifest(name)
    return m, {pid: store.read_part(name, pid, verify=True) for pid in m["parts"]}


def assert_same_snapshot(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for pid in a[1]:
        assert same(a[1][pid], b[1][pid]), pid


def tmp_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")] if root.exists() else []


def part_path(store: PoolStore, name: str, pid: str) -> Path:
    return store.root / name / "parts" / f"{pid}.safetensors"


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - 5 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def run_py(code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, **kw)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class LockHolder:
    """A subprocess holding the writer lock of a pool until stopped."""

    def __init__(self, root: Path, name: str, purpose: str = "write"):
        code = textwrap.dedent(
            f"""
            import sys
            from memcli.store import PoolStore
            with PoolStore({str(root)!r})._locked({name!r}, purpose={purpose!r}):
                print("locked", flush=True)
                sys.stdin.read()
            """
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", line

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


# --------------------------------------------------------------------- names / ids

BAD_NAMES = ["/", "..", ".", "a/b", "", "\x00", "a\x00b", "\n", "a\nb", "x" * 65, ".hidden", "a b", "a\\b",
             "caf\u00e9", "/abs", "../up", "tab\t", ".tmp-1-2"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_pool_names_are_refused_before_touching_disk(store, bad):
    with pytest.raises(InvalidPoolName) as exc:
        validate_name(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "1-64" in msg and "not starting with '.'" in msg
    for call in (
        lambda: store.commit(bad, {}, [], {}, None),
        lambda: store.read_manifest(bad),
        lambda: store.info(bad),
        lambda: store.exists(bad),
        lambda: store.fork(bad, "ok"),
        lambda: store.fork("ok", bad),
        lambda: store.rename("ok", bad),
        lambda: store.remove(bad),
        lambda: store.writer(bad),
        lambda: store.verify(bad),
    ):
        with pytest.raises(InvalidPoolName):
            call()
    assert not store.root.exists()


@pytest.mark.parametrize("good", ["ok-name_1.2", "a", "x" * 64, "A-9", "_x", "-y", "v1.0.tar"])
def test_valid_pool_names(good):
    assert validate_name(good) == good


@given(st.text(max_size=70))
@settings(max_examples=300, deadline=None)
def test_name_rule_property(name):
    import re

    ok = re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", name) is not None
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(InvalidPoolName):
            validate_name(name)


@pytest.mark.parametrize("bad", ["", ".x", "../x", "a/b", "x" * 129, "a b", "a\x00"])
def test_invalid_part_ids_refused(store, bad):
    with pytest.raises(PoolError, match="invalid part id"):
        store.commit("p", {}, [bad], {bad: tensors(0)}, None)
    assert not store.exists("p")
    assert tmp_leftovers(store.root) == []
    assert not (store.root / "p").exists()


def test_part_id_128_chars_ok(store):
    pid = "p" * 128
    store.commit("p", {}, [pid], {pid: tensors(0)}, None)
    assert same(store.read_part("p", pid, verify=True), tensors(0))


# -------------------------------------------------------------------- commit/read


def test_commit_creates_and_reads_back(store):
    assert not store.root.exists()  # created lazily
    m = make_pool(store)
    assert m["format_version"] == 1 and m["name"] == "p" and m["version"] == 1
    assert m["created"].endswith("Z") and m["updated"] == m["created"]
    assert m["meta"] == {"model": "m1", "log": [1, 2]}
    assert set(m["parts"]) == {"base", "patch-1"}
    for pid, entry in m["parts"].items():
        data = part_path(store, "p", pid).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert json.loads((store.root / "p" / "manifest.json").read_text()) == m
    assert store.read_manifest("p") == m
    assert same(store.read_part("p", "base"), tensors(1, 256))
    assert same(store.read_part("p", "patch-1", verify=True), tensors(2))
    assert sorted(os.listdir(store.root / "p")) == ["manifest.json", "parts"]  # no lock, no marker
    assert store.exists("p") and not store.exists("q")


def test_part_files_are_standard_safetensors_all_dtypes(store):
    t = {
        "f32": torch.randn(4, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(3).double(),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "i16": torch.tensor([300], dtype=torch.int16),
        "i32": torch.tensor([1 << 30], dtype=torch.int32),
        "i64": torch.tensor([1 << 40]),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "noncontig": torch.arange(12.0).reshape(3, 4).t(),
        "slice": torch.arange(100)[10:20:3],
    }
    store.commit("p", {}, ["a"], {"a": t}, None)
    via_safetensors = load_file(str(part_path(store, "p", "a")))
    assert same(via_safetensors, {k: v.contiguous() for k, v in t.items()})
    assert same(store.read_part("p", "a", verify=True), via_safetensors)


def test_commit_update_reuses_parts_and_drops_unreferenced(store):
    make_pool(store)
    base_ino = os.stat(part_path(store, "p", "base")).st_ino
    m2 = store.commit("p", {"n": 2}, ["base", "patch-2"], {"patch-2": tensors(3), "base": tensors(99)}, 1)
    assert m2["version"] == 2 and m2["meta"] == {"n": 2}
    # immutable: an existing part is never rewritten, even if new_parts carries it
    assert os.stat(part_path(store, "p", "base")).st_ino == base_ino
    assert same(store.read_part("p", "base", verify=True), tensors(1, 256))
    assert sorted(os.listdir(store.root / "p" / "parts")) == ["base.safetensors", "patch-2.safetensors"]
    m3 = store.commit("p", {"n": 3}, ["patch-2"], {}, 2)
    assert m3["version"] == 3 and list(m3["parts"]) == ["patch-2"]
    assert not part_path(store, "p", "base").exists()


def test_commit_version_checks(store):
    make_pool(store)
    with pytest.raises(PoolBusy, match=r"pool p changed since it was loaded \(version 5 -> 1\); reload and retry"):
        store.commit("p", {}, ["base"], {}, 5)
    with pytest.raises(PoolExists, match="pool p already exists"):
        store.commit("p", {}, ["base"], {}, None)
    with pytest.raises(PoolExists):
        store.commit("p", {}, ["base"], {}, 0)
    with pytest.raises(PoolNotFound):
        store.commit("q", {}, [], {}, 3)
    assert not (store.root / "q").exists()
    assert store.read_manifest("p")["version"] == 1
    store.commit("z", {}, [], {}, 0)  # 0 also means "new"
    assert store.info("z").num_parts == 0


def test_commit_caller_bugs_leave_pool_unchanged(store):
    make_pool(store)
    before = snapshot(store, "p")
    with pytest.raises(PoolError, match="neither new nor in the pool"):
        store.commit("p", {}, ["base", "ghost"], {}, 1)
    with pytest.raises(PoolError, match="not in part_ids"):
        store.commit("p", {}, ["base"], {"x-1": tensors(5)}, 1)
    with pytest.raises(PoolError, match="twice"):
        store.commit("p", {}, ["base", "base"], {}, 1)
    with pytest.raises(PoolError, match="JSON"):
        store.commit("p", {"f": object()}, ["base"], {}, 1)
    with pytest.raises(PoolError, match="JSON"):
        store.commit("p", {"f": float("nan")}, ["base"], {}, 1)
    with pytest.raises(PoolError, match="not a tensor"):
        store.commit("p", {}, ["base", "x"], {"x": {"a": [1, 2]}}, 1)
    # a new part written before the bad reference is found is removed again
    with pytest.raises(PoolError, match="neither new nor in the pool"):
        store.commit("p", {}, ["x-2", "ghost"], {"x-2": tensors(6)}, 1)
    assert not part_path(store, "p", "x-2").exists()
    assert_same_snapshot(before, snapshot(store, "p"))
    assert tmp_leftovers(store.root) == []


def test_failed_creation_leaves_nothing(store):
    with pytest.raises(PoolError):
        store.commit("new", {}, ["a", "ghost"], {"a": tensors(0)}, None)
    assert not store.exists("new")
    assert not (store.root / "new").exists()
    assert tmp_leftovers(store.root) == []


def test_info_and_list(store):
    assert store.list() == []  # root does not even exist
    make_pool(store, "b-pool")
    make_pool(store, "a-pool")
    info = store.info("a-pool")
    expected = sum(f.stat().st_size for f in (store.root / "a-pool").rglob("*") if f.is_file())
    assert isinstance(info, PoolInfo)
    assert (info.name, info.version, info.num_parts, info.bytes_on_disk) == ("a-pool", 1, 2, expected)
    assert info.meta == {"model": "m1", "log": [1, 2]} and info.error is None
    assert isinstance(info.created, str) and isinstance(info.bytes_on_disk, int)
    (store.root / ".tmp-123-abc").mkdir()
    (store.root / "broken").mkdir()
    (store.root / "broken" / "manifest.json").write_text("{not json")
    listing = store.list()
    assert [i.name for i in listing] == ["a-pool", "b-pool", "broken"]
    assert listing[2].error and "not valid JSON" in listing[2].error
    assert listing[0].error is None
    with pytest.raises(PoolNotFound, match="pool nope not found"):
        store.info("nope")
    with pytest.raises(PoolNotFound):
        store.read_manifest("nope")
    with pytest.raises(PoolError, match="has no part"):
        store.read_part("a-pool", "nope")


# ------------------------------------------------------------------------ writer


def test_writer_lock_file_reentrant_and_released(store):
    make_pool(store)
    lock = store.root / "p" / ".lock"
    with store.writer("p"):
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"].endswith("Z")
        with store.writer("p"):  # re-entrant
            store.commit("p", {"n": 2}, ["base"], {}, 1)  # commit inside: no self-deadlock
        assert lock.exists()
        store.commit("p", {"n": 3}, ["base"], {}, 2)
    assert not lock.exists()
    assert store.read_manifest("p")["version"] == 3


def test_writer_on_new_pool_without_commit_leaves_nothing(store):
    with store.writer("fresh"):
        assert not store.exists("fresh")
        assert store.list() == []
    assert not (store.root / "fresh").exists()
    with store.writer("fresh"):
        store.commit("fresh", {}, [], {}, None)
    assert store.exists("fresh") and sorted(os.listdir(store.root / "fresh")) == ["manifest.json", "parts"]


def test_writer_busy_across_processes(store):
    make_pool(store)
    holder = LockHolder(store.root, "p")
    try:
        with pytest.raises(PoolBusy) as exc:
            with store.writer("p"):
                pass
        msg = str(exc.value)
        assert f"process {holder.proc.pid}" in msg and "try again later" in msg and "since" in msg
        t0 = time.monotonic()
        with pytest.raises(PoolBusy):
            with store.writer("p", wait=0.3):
                pass
        assert time.monotonic() - t0 >= 0.28
        with pytest.raises(PoolBusy):
            store.commit("p", {}, ["base"], {}, 1)
        with pytest.raises(PoolBusy):
            store.rename("p", "q")
        with pytest.raises(PoolBusy):
            store.remove("p")
        # readers never lock
        assert store.read_manifest("p")["version"] == 1
        store.fork("p", "p2")
        store.export("p", store.root.parent / "p.tar")
        threading.Timer(0.3, holder.stop).start()
        t0 = time.monotonic()
        with store.writer("p", wait=True):
            assert time.monotonic() - t0 > 0.2
            store.commit("p", {}, ["base"], {}, 1)
    finally:
        if holder.proc.poll() is None:
            holder.stop()
    assert store.exists("p")


def test_brief_locks_of_cleanup_rename_remove_are_waited_for(store):
    make_pool(store)
    holder = LockHolder(store.root, "p", purpose="cleanup")
    threading.Timer(0.4, holder.stop).start()
    t0 = time.monotonic()
    store.commit("p", {}, ["base"], {}, 1)  # wait=False, yet not refused for a moment's cleanup
    assert time.monotonic() - t0 > 0.3


def test_cleanup_does_not_lock_a_clean_pool(store):
    make_pool(store)
    entered, leave = threading.Event(), threading.Event()

    def writer_thread():
        with store.writer("p"):
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=writer_thread)
    t.start()
    entered.wait(5)
    try:
        assert store.cleanup() == []  # the live lock is not "stale" and nothing else to do
        assert (store.root / "p" / ".lock").exists()
    finally:
        leave.set()
        t.join()
    lock_free = PoolStore(store.root)
    calls = []
    lock_free._acquire = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("locked"))
    assert lock_free.cleanup() == [] and calls == []


def test_reader_of_an_older_manifest_gets_busy(store):
    make_pool(store)
    m = store.read_manifest("p")
    PoolStore(store.root).commit("p", {}, ["base", "patch-2"], {"patch-2": tensors(3)}, m["version"])
    with pytest.raises(PoolBusy, match=r"changed since it was loaded \(version 1 -> 2\); reload and retry"):
        store.read_part("p", "patch-1")
    with pytest.raises(PoolError, match="has no part"):
        store.read_part("p", "never-existed")


def test_writer_busy_between_threads(store):
    make_pool(store)
    entered = threading.Event()
    leave = threading.Event()

    def hold():
        with store.writer("p"):
            entered.set()
            leave.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    with pytest.raises(PoolBusy):
        with store.writer("p", wait=0.1):
            pass
    threading.Timer(0.2, leave.set).start()
    with store.writer("p", wait=5.0):
        pass
    t.join()


def test_lock_of_a_killed_writer_is_recovered(store):
    make_pool(store)
    holder = LockHolder(store.root, "p")
    holder.proc.kill()  # SIGKILL: no chance to remove its .lock
    holder.proc.wait()
    holder.proc.stdout.close()
    holder.proc.stdin.close()
    assert json.loads((store.root / "p" / ".lock").read_text())["pid"] == holder.proc.pid
    store.commit("p", {"after": "crash"}, ["base"], {}, 1)
    assert store.read_manifest("p")["meta"] == {"after": "crash"}
    assert not (store.root / "p" / ".lock").exists()


def write_lock(store: PoolStore, name: str, **info) -> Path:
    lock = store.root / name / ".lock"
    lock.write_text(json.dumps(info) if info else "")
    return lock


def test_stale_lock_of_dead_process_is_taken_over(store):
    make_pool(store)
    write_lock(store, "p", pid=dead_pid(), host=store_mod._HOST, started="2020-01-01T00:00:00Z")
    with store.writer("p"):
        assert json.loads((store.root / "p" / ".lock").read_text())["pid"] == os.getpid()
    assert not (store.root / "p" / ".lock").exists()
    # empty lock file (holder died between creating and filling it): stale too
    write_lock(store, "p")
    store.commit("p", {}, ["base"], {}, 1)


def test_lock_of_reused_pid_is_stale_and_live_one_is_not(store):
    make_pool(store)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock = write_lock(store, "p", pid=sleeper.pid, host=store_mod._HOST, started="2020-01-01T00:00:00Z",
                          command="memcli inject p notes.pdf")
        with pytest.raises(PoolBusy, match=rf"process {sleeper.pid} \(memcli inject p notes.pdf\)"):
            with store.writer("p"):
                pass
        assert store.cleanup() == [] or lock.exists()
        assert lock.exists()  # a live holder's lock survives cleanup
        if store_mod._pid_start_time(sleeper.pid) is not None:
            write_lock(store, "p", pid=sleeper.pid, host=store_mod._HOST, started="2020-01-01T00:00:00Z",
                       pid_start="1")  # same pid, different process start: reused pid
            with store.writer("p"):
                pass
        write_lock(store, "p", pid=sleeper.pid, host="some-other-host", started="2020-01-01T00:00:00Z")
        with pytest.raises(PoolBusy, match="on some-other-host"):
            store.commit("p", {}, ["base"], {}, 1)
    finally:
        sleeper.kill()
        sleeper.wait()


# -------------------------------------------------------------------------- fork


def test_fork_shares_inodes_and_is_independent(store):
    make_pool(store, "src")
    src_before = snapshot(store, "src")
    info = store.fork("src", "dst")
    assert info.name == "dst" and info.version == 1
    m = store.read_manifest("dst")
    assert m["name"] == "dst" and m["version"] == 1 and m["parts"] == src_before[0]["parts"]
    assert m["meta"] == {**src_before[0]["meta"], "forked_from": {"name": "src", "version": 1}}
    for pid in m["parts"]:
        assert os.stat(part_path(store, "src", pid)).st_ino == os.stat(part_path(store, "dst", pid)).st_ino
    # write to the fork: new part replaces patch-1, base stays
    store.commit("dst", {"n": "fork"}, ["base", "patch-f"], {"patch-f": tensors(7)}, 1)
    assert_same_snapshot(src_before, snapshot(store, "src"))
    assert part_path(store, "src", "patch-1").exists()
    assert os.stat(part_path(store, "src", "base")).st_nlink == 2
    dst_after = snapshot(store, "dst")
    # and the other way round
    store.commit("src", {"n": "src"}, ["patch-s"], {"patch-s": tensors(8)}, 1)
    assert_same_snapshot(dst_after, snapshot(store, "dst"))
    assert store.verify("src") == [] and store.verify("dst") == []
    # removing one keeps the other whole
    store.remove("src")
    assert_same_snapshot(dst_after, snapshot(store, "dst"))


def test_fork_refusals(store):
    make_pool(store, "a")
    make_pool(store, "b")
    with pytest.raises(PoolExists, match="pool b already exists"):
        store.fork("a", "b")
    with pytest.raises(PoolNotFound):
        store.fork("nope", "c")
    assert tmp_leftovers(store.root) == []
    assert [i.name for i in store.list()] == ["a", "b"]


def test_fork_falls_back_to_copy_without_hard_links(store, monkeypatch):
    make_pool(store, "a")

    def no_links(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    store.fork("a", "b")
    for pid in ("base", "patch-1"):
        assert os.stat(part_path(store, "a", pid)).st_ino != os.stat(part_path(store, "b", pid)).st_ino
    assert store.verify("b") == []
    assert same(store.read_part("b", "base"), tensors(1, 256))


def test_fork_retries_when_source_changes_underneath(store, monkeypatch):
    make_pool(store, "a")
    real = PoolStore._link_or_copy
    calls = {"n": 0}

    def racing(self, src, dst):
        calls["n"] += 1
        if calls["n"] == 1:  # a commit lands between reading the manifest and linking
            PoolStore(store.root).commit("a", {"v": 2}, ["patch-9"], {"patch-9": tensors(9)}, 1)
        return real(self, src, dst)

    monkeypatch.setattr(PoolStore, "_link_or_copy", racing)
    store.fork("a", "b")
    m = store.read_manifest("b")
    assert list(m["parts"]) == ["patch-9"] and m["meta"]["forked_from"] == {"name": "a", "version": 2}
    assert tmp_leftovers(store.root) == []


# ---------------------------------------------------------------- rename / remove


def test_rename(store):
    make_pool(store, "old")
    before = snapshot(store, "old")
    store.rename("old", "new")
    assert not store.exists("old") and store.exists("new")
    m, parts = snapshot(store, "new")
    assert m["name"] == "new" and json.loads((store.root / "new" / "manifest.json").read_text())["name"] == "new"
    assert m["version"] == before[0]["version"] and parts.keys() == before[1].keys()
    make_pool(store, "other")
    with pytest.raises(PoolExists):
        store.rename("new", "other")
    with pytest.raises(PoolNotFound):
        store.rename("ghost", "x")
    with store.writer("new"):
        with pytest.raises(PoolBusy):
            store.rename("new", "x")
    assert store.exists("new") and store.exists("other")


def test_interrupted_rename_is_repaired(store):
    make_pool(store, "old")
    os.rename(store.root / "old", store.root / "new")  # crash before the manifest was updated
    assert store.read_manifest("new")["name"] == "new"
    store.cleanup()
    assert json.loads((store.root / "new" / "manifest.json").read_text())["name"] == "new"
    assert store.verify("new") == []


def test_remove(store):
    make_pool(store, "a")
    with store.writer("a"):
        with pytest.raises(PoolBusy):
            store.remove("a")
    store.remove("a")
    assert not store.exists("a") and os.listdir(store.root) == []
    with pytest.raises(PoolNotFound):
        store.remove("a")


# ---------------------------------------------------------------- export / import


def test_export_import_round_trip(store, tmp_path):
    make_pool(store, "a")
    store.commit("a", {"model": "m1", "log": [1, 2, 3]}, ["base", "patch-2"], {"patch-2": tensors(4)}, 1)
    before = snapshot(store, "a")
    f = tmp_path / "a.memcli"
    store.export("a", f)
    assert not Path(str(f) + ".tmp").exists()
    with tarfile.open(f) as tar:
        assert tar.getnames() == ["manifest.json", "parts/base.safetensors", "parts/patch-2.safetensors"]
    info = store.import_(f, "b")
    assert info.name == "b" and info.version == 2
    m, parts = snapshot(store, "b")
    assert m["meta"] == before[0]["meta"] and m["parts"] == before[0]["parts"]
    for pid in parts:
        assert same(parts[pid], before[1][pid])
    with pytest.raises(PoolExists):
        store.import_(f)  # default name "a" exists
    store.remove("a")
    assert store.import_(f).name == "a"
    assert store.verify("a") == []
    with pytest.raises(InvalidPoolName):
        store.import_(f, "../x")
    assert tmp_leftovers(store.root) == []


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _assert_nothing_left(store: PoolStore, names_before: list[str]) -> None:
    assert sorted(os.listdir(store.root)) == names_before
    assert tmp_leftovers(store.root) == []


def test_import_refuses_corrupted_part(store, tmp_path):
    make_pool(store, "a")
    f = tmp_path / "a.tar"
    store.export("a", f)
    store.remove("a")
    names_before = sorted(os.listdir(store.root))
    data = bytearray(f.read_bytes())
    with tarfile.open(f) as tar:
        member = tar.getmember("parts/patch-1.safetensors")
        data[member.offset_data + member.size // 2] ^= 0x01
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(PoolCorrupt, match="patch-1.*sha256") as exc:
        store.import_(bad)
    assert "\n" not in str(exc.value)
    assert not store.exists("a")
    _assert_nothing_left(store, names_before)


@pytest.mark.parametrize(
    "case",
    ["evil-dotdot", "absolute", "symlink", "hardlink", "dir", "extra", "not-in-manifest", "missing-part",
     "future-format", "not-tar", "truncated", "bad-json", "manifest-not-first", "bad-name", "dup", "size-lie"],
)
def test_import_refuses_bad_archives(store, tmp_path, case):
    make_pool(store, "keep")
    f = tmp_path / "good.tar"
    store.export("keep", f)
    with tarfile.open(f) as tar:
        manifest = tar.extractfile("manifest.json").read()
        base = tar.extractfile("parts/base.safetensors").read()
        patch = tar.extractfile("parts/patch-1.safetensors").read()
    m = json.loads(manifest)
    m["name"] = "imp"
    good_manifest = json.dumps(m).encode()
    good = [_reg("manifest.json", good_manifest), _reg("parts/base.safetensors", base),
            _reg("parts/patch-1.safetensors", patch)]
    bad = tmp_path / "bad.tar"
    if case == "evil-dotdot":
        _tar_with(bad, good + [_reg("../evil", b"x")])
    elif case == "absolute":
        _tar_with(bad, good + [_reg("/etc/evil", b"x")])
    elif case in ("symlink", "hardlink"):
        ti = tarfile.TarInfo("parts/base.safetensors")
        ti.type = tarfile.SYMTYPE if case == "symlink" else tarfile.LNKTYPE
        ti.linkname = "/etc/passwd"
        _tar_with(bad, [good[0], (ti, None), good[2]])
    elif case == "dir":
        ti = tarfile.TarInfo("parts/base.safetensors")
        ti.type = tarfile.DIRTYPE
        _tar_with(bad, [good[0], (ti, None), good[2]])
    elif case == "extra":
        _tar_with(bad, good + [_reg("parts/x.pickle", b"x")])
    elif case == "not-in-manifest":
        _tar_with(bad, good + [_reg("parts/zzz.safetensors", b"x")])
    elif case == "missing-part":
        _tar_with(bad, good[:2])
    elif case == "future-format":
        m2 = dict(m, format_version=2)
        _tar_with(bad, [_reg("manifest.json", json.dumps(m2).encode())] + good[1:])
    elif case == "not-tar":
        bad.write_bytes(b"hello, this is not a tar file" * 100)
    elif case == "truncated":
        _tar_with(bad, good)
        bad.write_bytes(bad.read_bytes()[: 1024 + len(good_manifest) + 2000])
    elif case == "bad-json":
        _tar_with(bad, [_reg("manifest.json", b"{oops")] + good[1:])
    elif case == "manifest-not-first":
        _tar_with(bad, good[1:] + good[:1])
    elif case == "bad-name":
        m3 = dict(m, name="../../etc")
        _tar_with(bad, [_reg("manifest.json", json.dumps(m3).encode())] + good[1:])
    elif case == "dup":
        _tar_with(bad, good + [good[1]])
    elif case == "size-lie":
        m4 = json.loads(good_manifest)
        m4["parts"]["base"]["bytes"] = 10**15
        _tar_with(bad, [_reg("manifest.json", json.dumps(m4).encode())] + good[1:])
    names_before = sorted(os.listdir(store.root))
    with pytest.raises(PoolError) as exc:
        store.import_(bad)
    assert isinstance(exc.value, PoolCorrupt) or case == "size-lie"
    assert "\n" not in str(exc.value)
    if case == "future-format":
        assert "format_version 2" in str(exc.value) and "format_version 1" in str(exc.value)
    assert not store.exists("imp")
    _assert_nothing_left(store, names_before)
    assert not (tmp_path / "evil").exists() and not (store.root.parent / "evil").exists()


def test_export_refuses_damaged_pool_and_leaves_no_file(store, tmp_path):
    make_pool(store, "a")
    flip_byte(part_path(store, "a", "base"))
    f = tmp_path / "a.tar"
    with pytest.raises(PoolCorrupt, match="base"):
        store.export("a", f)
    assert not f.exists() and not Path(str(f) + ".tmp").exists()


# ------------------------------------------------------------------ damaged pools


def test_truncated_part_detected_without_hashing(store):
    make_pool(store)
    p = part_path(store, "p", "base")
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(PoolCorrupt, match=r"pool p: part base is damaged \(size"):
        store.read_part("p", "base")
    assert store.verify("p") and "base" in store.verify("p")[0]
    assert same(store.read_part("p", "patch-1"), tensors(2))  # the rest still reads


def test_flipped_byte_found_by_verify(store):
    make_pool(store)
    flip_byte(part_path(store, "p", "patch-1"))
    store.read_part("p", "patch-1")  # same size: the cheap check cannot tell
    with pytest.raises(PoolCorrupt, match=r"pool p: part patch-1 is damaged \(sha256 mismatch\)"):
        store.read_part("p", "patch-1", verify=True)
    problems = store.verify("p")
    assert len(problems) == 1 and "patch-1" in problems[0] and "sha256" in problems[0]


def test_manifest_future_format_and_garbage(store):
    make_pool(store)
    mpath = store.root / "p" / "manifest.json"
    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps(dict(m, format_version=7)))
    with pytest.raises(PoolCorrupt) as exc:
        store.read_manifest("p")
    assert "format_version 7" in str(exc.value) and "format_version 1" in str(exc.value)
    assert "upgrade" in str(exc.value)
    with pytest.raises(PoolCorrupt):
        store.commit("p", {}, [], {}, 1)  # never overwrite what we cannot read
    assert store.verify("p") == [str(exc.value)]
    mpath.write_text('{"format_version": 1, "name": ')
    with pytest.raises(PoolCorrupt, match="not valid JSON"):
        store.info("p")
    mpath.write_text(json.dumps(dict(m, parts={"base": {"sha256": "xyz", "bytes": 1}})))
    with pytest.raises(PoolCorrupt, match="invalid entry for part base"):
        store.read_manifest("p")
    mpath.unlink()
    with pytest.raises(PoolCorrupt, match="no manifest.json"):
        store.read_manifest("p")
    assert store.exists("p")  # damaged, but the name is taken
    with pytest.raises(PoolCorrupt):
        store.commit("p", {}, [], {}, None)
    store.cleanup()
    assert part_path(store, "p", "base").exists()  # cleanup never deletes a damaged pool's data


def test_missing_part_file(store):
    make_pool(store)
    part_path(store, "p", "patch-1").unlink()
    with pytest.raises(PoolCorrupt, match="pool p: part patch-1 is missing"):
        store.read_part("p", "patch-1")
    assert store.verify("p") == ["part patch-1 is missing"]
    with pytest.raises(PoolCorrupt):
        store.commit("p", {}, ["patch-1"], {}, 1)


def test_pool_folder_replaced_by_symlink_is_refused(store, tmp_path):
    make_pool(store, "real")
    elsewhere = tmp_path / "elsewhere"
    os.rename(store.root / "real", elsewhere)
    os.symlink(elsewhere, store.root / "p")
    target_before = sorted(str(p) for p in elsewhere.rglob("*"))
    for call in (
        lambda: store.read_manifest("p"),
        lambda: store.info("p"),
        lambda: store.read_part("p", "base"),
        lambda: store.commit("p", {}, ["base"], {}, 1),
        lambda: store.commit("p", {}, [], {}, None),
        lambda: store.fork("p", "q"),
        lambda: store.export("p", tmp_path / "x.tar"),
        lambda: store.rename("p", "q"),
    ):
        with pytest.raises(PoolCorrupt, match="pool p is a symbolic link; refusing"):
            call()
    with pytest.raises(PoolCorrupt, match="symbolic link"):
        with store.writer("p"):
            pass
    assert store.exists("p")
    assert [i.error for i in store.list()] == ["pool p is a symbolic link; refusing"]
    assert store.verify("p") == ["pool p is a symbolic link; refusing"]
    store.cleanup()
    assert sorted(str(p) for p in elsewhere.rglob("*")) == target_before
    store.remove("p")  # removes the link only
    assert not os.path.lexists(store.root / "p")
    assert sorted(str(p) for p in elsewhere.rglob("*")) == target_before


def test_symlinked_part_or_manifest_refused(store, tmp_path):
    make_pool(store)
    outside = tmp_path / "outside.safetensors"
    os.rename(part_path(store, "p", "patch-1"), outside)
    os.symlink(outside, part_path(store, "p", "patch-1"))
    with pytest.raises(PoolCorrupt, match="symbolic link"):
        store.read_part("p", "patch-1")
    assert "symbolic link" in store.verify("p")[0]
    os.rename(store.root / "p" / "manifest.json", tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", store.root / "p" / "manifest.json")
    with pytest.raises(PoolCorrupt, match="symbolic link"):
        store.read_manifest("p")


def test_cleanup_removes_leftovers_of_crashed_writes(store):
    make_pool(store)
    before = snapshot(store, "p")
    dead = dead_pid()
    root = store.root
    (root / f".tmp-{dead}-aaaa").mkdir()
    (root / f".tmp-{dead}-aaaa" / "parts").mkdir()
    (root / f".tmp-rm-{dead}-bbbb").mkdir()
    (root / f".tmp-rm-{dead}-bbbb" / "junk").write_bytes(b"x" * 100)
    (root / "p" / "parts" / f".tmp-{dead}-cccc").write_bytes(b"half a part")
    (root / "p" / f".tmp-manifest-{dead}-dddd").write_bytes(b"{half")
    (root / "p" / "parts" / "orphan.safetensors").write_bytes(b"unreferenced")
    write_lock(store, "p", pid=dead, host=store_mod._HOST, started="2020-01-01T00:00:00Z")
    # a pool creation that died before its first manifest
    (root / "half").mkdir()
    (root / "half" / ".creating").write_bytes(b"")
    (root / "half" / "parts").mkdir()
    (root / "half" / "parts" / "base.safetensors").write_bytes(b"x")
    write_lock(store, "half", pid=dead, host=store_mod._HOST, started="2020-01-01T00:00:00Z")
    # this process's own temp folder (maybe in use by another thread): kept
    mine = root / f".tmp-{os.getpid()}-eeee"
    mine.mkdir()
    assert not store.exists("half") and [i.name for i in store.list()] == ["p"]
    removed = store.cleanup()
    assert removed
    assert sorted(os.listdir(root)) == sorted(["p", mine.name])
    assert sorted(os.listdir(root / "p")) == ["manifest.json", "parts"]
    assert sorted(os.listdir(root / "p" / "parts")) == ["base.safetensors", "patch-1.safetensors"]
    assert_same_snapshot(before, snapshot(store, "p"))
    assert store.cleanup() == []


def test_cleanup_skips_pool_being_written(store):
    make_pool(store)
    orphan = store.root / "p" / "parts" / "orphan.safetensors"
    orphan.write_bytes(b"x")
    holder = LockHolder(store.root, "p")
    try:
        store.cleanup()
        assert orphan.exists()  # might be a part the live writer is about to reference
    finally:
        holder.stop()
    store.cleanup()
    assert not orphan.exists()


def test_reader_sees_busy_not_corrupt_when_part_replaced_concurrently(store, monkeypatch):
    make_pool(store)
    real = PoolStore._open_part

    def racing(self, name, part_id, entry, version):
        # a concurrent commit drops patch-1 right after the reader read the manifest
        PoolStore(store.root).commit("p", {}, ["base", "patch-2"], {"patch-2": tensors(3)}, 1)
        monkeypatch.setattr(PoolStore, "_open_part", real)
        return real(self, name, part_id, entry, version)

    monkeypatch.setattr(PoolStore, "_open_part", racing)
    with pytest.raises(PoolBusy, match="changed while it was being read"):
        store.read_part("p", "patch-1")


def test_part_opened_before_a_concurrent_delete_still_loads(store, monkeypatch):
    make_pool(store)
    real = PoolStore._open_part

    def racing(self, name, part_id, entry, version):
        fd = real(self, name, part_id, entry, version)
        PoolStore(store.root).commit("p", {}, ["base", "patch-2"], {"patch-2": tensors(3)}, 1)
        assert not part_path(store, "p", "patch-1").exists()
        return fd

    monkeypatch.setattr(PoolStore, "_open_part", racing)
    assert same(store.read_part("p", "patch-1", verify=True), tensors(2))


# ------------------------------------------------------------------------ ENOSPC


class DiskFull:
    """Replacement for store._write_all that fills the disk after `budget` bytes."""

    def __init__(self, real, budget: int):
        self.real, self.budget = real, budget
        self.calls = 0

    def __call__(self, fd, data):
        n = memoryview(data).nbytes
        self.calls += 1
        if n > self.budget:
            self.real(fd, memoryview(data).cast("B")[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n
        self.real(fd, data)


def _part_bytes(t: dict) -> int:
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in store_mod.safetensors_chunks(t))


@pytest.mark.parametrize("where", ["first-part", "second-part", "manifest"])
def test_disk_full_during_commit_leaves_pool_unchanged(store, monkeypatch, where):
    make_pool(store)
    before = snapshot(store, "p")
    files_before = sorted(str(p) for p in store.root.rglob("*"))
    new = {"n-1": tensors(10, 200), "n-2": tensors(11, 200)}
    size1 = _part_bytes(new["n-1"])
    budget = {"first-part": 100, "second-part": size1 + 100, "manifest": 2 * size1 + 50}[where]
    monkeypatch.setattr(store_mod, "_write_all", DiskFull(store_mod._write_all, budget))
    with pytest.raises(PoolError) as exc:
        store.commit("p", {"n": 2}, ["base", "n-1", "n-2"], new, 1)
    assert str(exc.value) == "no space left on device while saving pool p; the pool is unchanged"
    assert type(exc.value) is PoolError
    monkeypatch.undo()
    assert_same_snapshot(before, snapshot(store, "p"))
    assert tmp_leftovers(store.root) == []
    assert sorted(str(p) for p in store.root.rglob("*")) == files_before
    assert store.verify("p") == []
    # and the disk having room again, the same commit works
    assert store.commit("p", {"n": 2}, ["base", "n-1", "n-2"], new, 1)["version"] == 2


def test_disk_full_creating_pool_fork_export(store, monkeypatch, tmp_path):
    make_pool(store, "a")
    monkeypatch.setattr(store_mod, "_write_all", DiskFull(store_mod._write_all, 10))
    with pytest.raises(PoolError, match="no space left on device while saving pool b"):
        store.commit("b", {}, ["x"], {"x": tensors(1)}, None)
    assert not store.exists("b") and not (store.root / "b").exists()
    with pytest.raises(PoolError, match="no space left on device"):
        store.fork("a", "c")
    assert not store.exists("c")
    with pytest.raises(PoolError, match="no space left on device"):
        store.export("a", tmp_path / "a.tar")
    monkeypatch.undo()
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.tmp").exists()
    assert tmp_leftovers(store.root) == []
    assert sorted(os.listdir(store.root)) == ["a"]
    assert store.verify("a") == []


def test_disk_full_during_import(store, monkeypatch, tmp_path):
    make_pool(store, "a")
    f = tmp_path / "a.tar"
    store.export("a", f)
    store.remove("a")
    monkeypatch.setattr(store_mod, "_write_all", DiskFull(store_mod._write_all, 5000))
    with pytest.raises(PoolError, match="no space left on device"):
        store.import_(f)
    monkeypatch.undo()
    assert os.listdir(store.root) == []


def test_error_after_the_commit_point_never_undoes_the_commit(store, monkeypatch):
    """Once manifest.json is replaced the new version is the pool's: a failing folder fsync
    afterwards is reported, but the new parts it references stay."""
    make_pool(store)
    real_replace, real_fsync_dir = os.replace, store_mod._fsync_dir
    replaced = []

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        replaced.append(str(dst).endswith("manifest.json"))

    def fsync_dir(path):
        if any(replaced):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    with pytest.raises(PoolError, match="pool p was saved as version 2 but flushing it to disk failed"):
        store.commit("p", {"n": 2}, ["base", "patch-2"], {"patch-2": tensors(3)}, 1)
    monkeypatch.undo()
    assert store.read_manifest("p")["version"] == 2
    assert same(store.read_part("p", "patch-2", verify=True), tensors(3))
    assert store.verify("p") == []
