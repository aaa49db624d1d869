"""Crash and concurrency tests for memcli.store.

A writer runs in a child process and is killed with SIGKILL; afterwards the next writing
command (a fresh PoolStore taking a writer lock, which recovers) runs, and the pool must read
back (manifest + every part, sha256-verified) as exactly one committed version: the one before
the kill or a newer one, with no leftover on disk. Version v's content is a pure function of
v, so the test knows what every version must contain. Kills are placed by what the child
reports (commits done, durable steps counted), never by how long it has run.

Starting a Python that imports torch costs ~1.5 s, too much for dozens of kills, so the
children come from a "zygote": one `sys.executable -c ...` process that imports torch and
the store once and then os.fork()s a fresh worker per trial and reaps it (a reaped pid is
dead, which is what makes its lock stale).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from memcli import store as store_mod
from memcli.store import PoolStore

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")

REPO = Path(__file__).resolve().parent.parent

BASE_ELEMS = (3 << 20) // 4  # 3 MB int32 base part
PATCH_ELEMS = (3 << 20) // 8  # 1.5 MB int32 patch part


# ------------------------------------------------------------ deterministic versions


@functools.lru_cache(maxsize=None)
def expected_sha256(pid: str) -> str:
    """sha256 of part `pid` as the store writes it (the layout is deterministic)."""
    h = hashlib.sha256()
    for chunk in store_mod.safetensors_chunks(part_tensors(pid)):
        h.update(chunk)
    return h.hexdigest()


def part_tensors(pid: str) -> dict[str, torch.Tensor]:
    kind, k = pid.rsplit("-", 1)
    k = int(k)
    if kind == "base":
        return {"slots": torch.arange(BASE_ELEMS, dtype=torch.int32).add_(k * 7919), "k": torch.tensor([k])}
    return {"rows": torch.arange(PATCH_ELEMS, dtype=torch.int32).mul_(3).add_(k), "k": torch.tensor(k)}


def plan(v: int) -> tuple[list[str], dict]:
    """Part ids and meta of version v: a base replaced every 5 versions, the newest two patches."""
    ids = [f"base-{(v // 5) * 5}", f"patch-{v}"] + ([f"patch-{v - 1}"] if v >= 2 else [])
    return ids, {"counter": v, "note": f"version {v}", "log": list(range(v % 7))}


def commit_version(store: PoolStore, name: str, v: int, have: set[str]) -> dict:
    ids, meta = plan(v)
    new = {pid: part_tensors(pid) for pid in ids if pid not in have}
    return store.commit(name, meta, ids, new, (v - 1) or None)


def check_pool(store: PoolStore, name: str, v_min: int = 1, forked_from: dict | None = None) -> int:
    """The pool reads back as exactly one deterministic version >= v_min; returns it."""
    m = store.read_manifest(name)
    v = m["version"] if forked_from is None else forked_from["version"]
    assert v >= v_min, (v, v_min)
    ids, meta = plan(v)
    if forked_from is not None:
        assert m["version"] == 1
        meta = {**meta, "forked_from": forked_from}
    assert m["name"] == name
    assert m["meta"] == meta
    assert sorted(m["parts"]) == sorted(ids)
    for pid in ids:
        # the bytes are exactly the deterministic content of that part ...
        assert m["parts"][pid]["sha256"] == expected_sha256(pid), pid
        # ... and the file on disk matches the manifest and loads
        got = store.read_part(name, pid, verify=True)
        assert int(got["k"].reshape(-1)[0]) == int(pid.rsplit("-", 1)[1])
        big = got["slots" if pid.startswith("base") else "rows"]
        assert big.dtype == torch.int32 and big.numel() in (BASE_ELEMS, PATCH_ELEMS)
    pool_dir = store.root / name
    assert sorted(os.listdir(pool_dir)) == ["manifest.json"]  # no temp file left
    return v


def next_writing_command(store: PoolStore) -> None:
    """What any writing command does first: a fresh store object recovers on its first lock."""
    with PoolStore(store.root).writer("unrelated"):
        pass


def no_leftovers(store: PoolStore, export_dir: Path | None = None) -> None:
    assert [p for p in store.root.rglob(".tmp-*")] == []
    objects = set(os.listdir(store.root / ".objects")) if (store.root / ".objects").exists() else set()
    named = {e["sha256"] for info in store.list() for e in store.read_manifest(info.name)["parts"].values()}
    assert objects == named  # no orphaned part
    if export_dir is not None:
        assert [n for n in os.listdir(export_dir) if n.endswith(".memcli-export")] == []


# ------------------------------------------------------------------ zygote / workers

_EVENTS = ("fsync", "replace", "rename", "unlink", "link", "mkdir", "rmdir")


def _install_crash_hooks(crash_at: int) -> None:
    """SIGKILL ourselves right before the crash_at-th durable-write event."""
    from memcli.base import durable
    from memcli.store import core, folders, locking, staging, transfer

    count = [0]

    def wrap(fn):
        def hooked(*args, **kwargs):
            count[0] += 1
            if count[0] == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return hooked

    for ev in _EVENTS:
        setattr(os, ev, wrap(getattr(os, ev)))
    hooked_write = wrap(durable.write_all)
    for mod in (durable, core, folders, locking, staging, transfer):
        mod.write_all = hooked_write
    shutil.rmtree = wrap(shutil.rmtree)


def _worker(cmd: dict) -> None:
    store = PoolStore(Path(cmd["root"]))
    op = cmd["op"]
    if cmd.get("crash_at"):
        _install_crash_hooks(cmd["crash_at"])
    if op == "loop":  # commit versions forever, until killed
        m = store.read_manifest("p")
        v, have = m["version"], set(m["parts"])
        while True:
            v += 1
            have = set(commit_version(store, "p", v, have)["parts"])
            print(json.dumps({"committed": v}), flush=True)  # progress the test kills by
    elif op == "commit":
        m = store.read_manifest("p")
        commit_version(store, "p", m["version"] + 1, set(m["parts"]))
    elif op == "create":
        commit_version(store, "q", 1, set())
    elif op == "fork":
        store.fork("p", "f")
    elif op == "rename":
        store.rename("r1", "r2")
    elif op == "remove":
        store.remove("victim")
    elif op == "import":
        store.import_(Path(cmd["file"]), "imp")
    elif op == "export":
        store.export("p", Path(cmd["out"]))
    elif op == "recover":
        store.recover()
    else:
        raise ValueError(op)


def _zygote_main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(cmd)
            except BaseException as exc:  # reported through the exit code + stderr
                print(f"worker error: {exc!r}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"killed": os.WIFSIGNALED(status), "code": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    def __init__(self):
        code = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from tests.test_store_crash import _zygote_main
            _zygote_main()
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )

    def _next(self, key: str) -> dict:
        """The next message carrying `key` (a worker's progress lines may come first)."""
        while True:
            line = self.proc.stdout.readline()
            assert line, "zygote died"
            msg = json.loads(line)
            if key in msg:
                return msg
            self.progress.append(msg)

    def start(self, **cmd) -> int:
        self.progress: list[dict] = []
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._next("pid")["pid"]

    def wait_commits(self, n: int) -> int:
        """Block until the worker reported n more commits; returns the last version reported."""
        while sum("committed" in m for m in self.progress) < n:
            self.progress.append(self._next("committed"))
        return [m for m in self.progress if "committed" in m][-1]["committed"]

    def finish(self) -> dict:
        """Wait until the zygote reaped the worker: after this its pid is dead."""
        return self._next("killed")

    def run(self, **cmd) -> dict:
        self.start(**cmd)
        return self.finish()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


# -------------------------------------------------------------------------- tests


def test_sigkill_at_random_moments_during_continuous_commits(zygote, tmp_path):
    """Each trial: the child commits in a loop and reports every commit; after a random number
    (1-3) of reported commits it is killed at a random point of the next ones. Whatever the
    machine's speed, the kill lands mid-stream, and the pool has at least the reported versions."""
    store = PoolStore(tmp_path / "pools")
    commit_version(store, "p", 1, set())
    v_prev = check_pool(store, "p")
    rng = random.Random(1234)
    for _trial in range(40):
        pid = zygote.start(op="loop", root=str(store.root))
        reported = zygote.wait_commits(rng.randint(1, 3))
        # a random point inside the commit(s) under way: the child may be anywhere in them
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
        status = zygote.finish()
        assert status["killed"], status  # the loop never ends on its own
        next_writing_command(store)
        v = check_pool(store, "p", v_min=max(v_prev, reported))
        no_leftovers(store)
        v_prev = v
    assert store.verify("p") == []


def _setup_for(op: str, store: PoolStore, tmp_path: Path) -> None:
    for name in ("q", "f", "r1", "r2", "victim", "imp"):
        if store.exists(name):
            store.remove(name)
    if op == "rename":
        store.fork("p", "r1")
    elif op == "remove":
        store.fork("p", "victim")


def _check_after(op: str, store: PoolStore, v_before: int, completed: bool, out: Path) -> int:
    next_writing_command(store)
    no_leftovers(store, out.parent)
    if op == "commit":
        v = check_pool(store, "p", v_min=v_before)
        assert v in (v_before, v_before + 1)
        assert v == v_before + 1 or not completed
        return v
    assert check_pool(store, "p", v_min=v_before) == v_before  # the source never changes
    fork = {"name": "p", "version": v_before}
    if op == "create":
        if store.exists("q") or completed:
            check_pool(store, "q")
        else:
            assert not (store.root / "q").exists()
    elif op == "fork":
        if store.exists("f") or completed:
            check_pool(store, "f", forked_from=fork)
        else:
            assert not (store.root / "f").exists()
    elif op == "rename":
        present = [n for n in ("r1", "r2") if store.exists(n)]
        assert len(present) == 1 and (present == ["r2"] or not completed)
        check_pool(store, present[0], forked_from=fork)
    elif op == "remove":
        if store.exists("victim"):
            assert not completed
            check_pool(store, "victim", forked_from=fork)
        else:
            assert not (store.root / "victim").exists()
    elif op == "import":
        if store.exists("imp") or completed:
            check_pool(store, "imp")
        else:
            assert not (store.root / "imp").exists()
    elif op == "export":
        if out.exists():  # a complete archive, or none
            with tarfile.open(out) as tar:
                assert len(tar.getnames()) == 1 + len(store.read_manifest("p")["parts"])
            out.unlink()
        else:
            assert not completed
    pools = sorted(n for n in os.listdir(store.root) if not n.startswith("."))
    assert pools == sorted(n for n in ("p", "q", "f", "r1", "r2", "victim", "imp") if store.exists(n))
    return v_before


@pytest.mark.parametrize("op", ["commit", "create", "fork", "rename", "remove", "import", "export"])
def test_sigkill_before_every_durable_step(zygote, tmp_path, op):
    """Kill the writer right before its 1st, 2nd, 3rd ... fsync/rename/replace/unlink/
    link/mkdir/write, until the operation completes: every intermediate state recovers."""
    store = PoolStore(tmp_path / "pools")
    export = tmp_path / "q.tar"
    out = tmp_path / "exports" / "p.tar"
    out.parent.mkdir()
    if op == "import":
        commit_version(store, "q", 1, set())
        store.export("q", export)
        store.remove("q")
    m = {}
    for v in range(1, 6):  # version 5 brings a new base: the next commit replaces the old one
        m = commit_version(store, "p", v, set(m.get("parts", ())))
    v = 5
    crash_at, completed = 1, False
    while not completed:
        _setup_for(op, store, tmp_path)
        status = zygote.run(op=op, root=str(store.root), crash_at=crash_at, file=str(export), out=str(out))
        completed = not status["killed"]
        assert completed or status["code"] == -signal.SIGKILL, status
        assert status["code"] in (0, -signal.SIGKILL), status
        v = _check_after(op, store, v, completed, out)
        crash_at += 1
        assert crash_at < 400
    assert crash_at > 3  # the hooks did see the operation's steps
    print(f"{op}: recovered from a kill before each of {crash_at - 2} steps")


def test_recovery_itself_can_be_killed(zygote, tmp_path):
    """A crash inside recovery (removing leftovers of a crash) is recovered by the next one."""
    store = PoolStore(tmp_path / "pools")
    commit_version(store, "p", 1, set())
    crash_at, completed = 1, False
    while not completed:
        # leftovers of a killed commit of version 2 (parts placed, manifest not replaced)
        zygote.start(op="commit", root=str(store.root), crash_at=6)
        zygote.finish()
        status = zygote.run(op="recover", root=str(store.root), crash_at=crash_at)
        completed = not status["killed"]
        next_writing_command(store)
        no_leftovers(store)
        v = check_pool(store, "p")
        if v == 2:  # the commit got through: start again from a version-1 pool
            store.remove("p")
            commit_version(store, "p", 1, set())
        crash_at += 1
        assert crash_at < 200


COUNTER_CHILD = """
import sys, time
from memcli.store import PoolStore, PoolBusy
store, mode = PoolStore(sys.argv[1]), sys.argv[2]
done = 0
while done < 20:
    if mode == "lock":
        with store.writer("c", wait=True):
            m = store.read_manifest("c")
            store.commit("c", {"counter": m["meta"]["counter"] + 1}, [], {}, m["version"])
        done += 1
    else:  # optimistic: no explicit lock; a conflict is PoolBusy, so reload and retry
        m = store.read_manifest("c")
        try:
            store.commit("c", {"counter": m["meta"]["counter"] + 1}, [], {}, m["version"])
            done += 1
        except PoolBusy:
            time.sleep(0.001)
"""


@pytest.mark.parametrize("mode", ["lock", "optimistic"])
def test_two_processes_incrementing_a_counter(tmp_path, mode):
    store = PoolStore(tmp_path / "pools")
    store.commit("c", {"counter": 0}, [], {}, None)
    # a lock file left by a process of another host: it names a holder, but nobody holds it
    (store.root / ".locks" / "c.lock").write_text(json.dumps(
        {"pid": 1, "host": "another-machine", "started": "2020-01-01T00:00:00Z"}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", COUNTER_CHILD, str(store.root), mode], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    m = store.read_manifest("c")
    assert m["meta"]["counter"] == 40
    assert m["version"] == 41
    assert store.verify("c") == []
    assert sorted(os.listdir(store.root / "c")) == ["manifest.json"]
