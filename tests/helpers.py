"""What the tests share: the command line run in-process, texts, PDFs, a running server and its
client, the memcli-tiny notes, and `FakeBackend` (no weights) for tests of what the command line
shows. Test modules import from here (and fixtures come from conftest.py), never from each other."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from .support import REPO

runner = CliRunner()


# A model's answer may hold any character, "\r" among them (random weights' byte soup; whether
# one does changes from run to run with the pool's random drops). click's Result turns "\r\n"
# into "\n" and subprocess's text mode turns every "\r" into "\n", so what a command printed is
# read here as it was written, or an answer compared with an in-process one fails by chance.
class Printed(Result):
    """click's Result, its stdout and stderr exactly as the command wrote them."""

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(self.runner.charset, "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(self.runner.charset, "replace")


def run_process(cmd: list[str], *, input: str | None = None, **kw) -> subprocess.CompletedProcess:
    """`cmd` in a process of its own, its stdout and stderr as the exact text it wrote (UTF-8)."""
    done = subprocess.run(cmd, input=None if input is None else input.encode(), capture_output=True, **kw)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))

ALICE = "Alice took the train to Paris on Monday and met Bob at the station near the old river bridge."
CAROL = "The meeting with Carol is on Friday at ten in the big room upstairs, next to the kitchen."
DAVE = "Dave keeps the spare key under the blue flower pot by the back door of the green house."
ISO_Z = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"

DEADLINE = 180.0  # seconds: a loaded 2-core machine imports torch slowly
TEXTS = [
    ALICE,
    CAROL,
    DAVE,
    "Erin flies to Oslo on the morning plane with her old red suitcase and a map of the fjords.",
]
QUESTION = "Where did Alice go on Monday?"
TIMINGS = ("seconds", "seconds_to_first_token", "decode_tokens_per_second", "tokens_per_second")


# --------------------------------------------------------------------------- the command line
def cli_app():
    from memcli.cli.main import app

    return app


def run(*args, input: str | None = None, env: dict | None = None, device: str | None = "cpu"):
    """Invoke the app in-process. `--device cpu` keeps stderr free of the no-GPU warning."""
    argv = (["--device", device] if device else []) + [str(a) for a in args]
    result = runner.invoke(cli_app(), argv, input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    result.__class__ = Printed  # the same fields, read exactly
    return result


def err_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_error(result, *fragments: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = err_lines(result)
    assert len(lines) == 1 and lines[0].startswith("memcli: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)  # MEMCLI_HOME, HF_HOME, HF_HUB_OFFLINE from the autouse fixture
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def info(name: str) -> dict:
    result = run("pool", "info", name, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def ndjson_events(stdout: str) -> list[dict]:
    """Output lines as JSON objects, without their timings (which differ from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in stdout.splitlines()]


# --------------------------------------------------------------------------- a process without torch
LIGHT_PROCESS = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        for heavy in {blocked!r}:
            if name == heavy or name.startswith(heavy + "."):
                raise ImportError(heavy + " imported by a light command")
sys.meta_path.insert(0, _Blocked())
sys.argv = ["memcli"] + sys.argv[1:]
from memcli.cli.main import main
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
{report}
sys.exit(code)
"""
TORCH_REPORT = 'print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)'


def run_light(*args: str, cwd: Path, env: dict | None = None, blocked: tuple[str, ...] = ("torch",),
              report: str = TORCH_REPORT) -> subprocess.CompletedProcess:
    """The CLI in a fresh process where importing any of `blocked` raises (a light command must
    still work); `report`: the line of Python that ends its stderr with what it loaded."""
    script = LIGHT_PROCESS.format(blocked=tuple(blocked), report=report)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env or subprocess_env(NO_COLOR="1"),
                          capture_output=True, text=True, timeout=120)


def run_without_torch(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process where importing torch raises: a light command must still work."""
    return run_light(*args, cwd=cwd, env=env)


# --------------------------------------------------------------------------- PDFs (tests/documents.py)
from .documents import BROKEN_PAGE, encrypt_pdf, make_pdf, text_page, write  # noqa: E402,F401


# --------------------------------------------------------------------------- a running server
def env_for_server(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # no thread setting of its own: the server computes with the same threads as this process, so
    # its results compare bit for bit with in-process ones (float sums depend on how work is split)
    env.pop("MEMCLI_SERVER", None)
    env.update(extra)
    return env


def metric_samples(text: str) -> dict[str, list]:
    """A /metrics exposition's samples by name (each a prometheus_client Sample: name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def wait_for(predicate, what: str, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """A `memcli serve` process started by a test, and a client of it."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        from memcli.server.client import Client

        self.proc, self.log = proc, log
        self.client = Client()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.client.stop()
            except Exception:  # noqa: BLE001 - already gone
                self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


def start_server(tmp_path: Path, *args: str, env: dict | None = None) -> Running:
    from memcli.server.client import Client

    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "memcli", "--device", "cpu", "serve", *args],
                                stdout=out, stderr=out, env=env or env_for_server())
    client = Client()

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): {log.read_text()}")
        return client.health()

    wait_for(ready, "the server to answer")
    client.close()
    return Running(proc, log)


def assert_clean_log(log: Path) -> None:
    """A server's log without a traceback (nothing escaped a request)."""
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


def local(ck: str):
    """The library in this process, on the checkpoint `ck` (CPU)."""
    from memcli.app.api import Memcli
    from memcli.app.settings import load_settings

    return Memcli(load_settings(device="cpu", model=ck))


def make_pool(app, tmp_path: Path, name: str, texts: list[str]) -> list[Path]:
    files = []
    for i, text in enumerate(texts):
        path = tmp_path / f"{name}-{i}.txt"
        path.write_text(text)
        files.append(path)
    app.inject(name, [str(f) for f in files])
    return files


def many_texts(n: int) -> list[str]:
    words = "red blue green train river house key plane map room station bridge garden lamp".split()
    return [f"Note {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(30)) + f" number {i}." for i in range(n)]


def logged_sources(pool: str) -> list[dict]:
    """The pool's injection log as committed (manifest + appended log), read without torch."""
    from memcli.pools import meta as pool_meta
    from memcli.store import PoolStore

    return pool_meta.pool_info(PoolStore(), pool)["sources"]


def upload(path: Path):
    """An upload of a text file under its own path (as the client sends a source)."""
    from memcli.server.client import Upload

    return Upload.of_file(str(path), open(path, "rb"))


def inject_params(pool: str, **kw):
    from memcli.wire import InjectParams

    return InjectParams(pool, **kw)


def served_answer(client, pool: str, question: str, history=(), max_new_tokens=None, temperature: float = 0.0,
                  top_p: float = 1.0, seed=None, sources: bool = False) -> tuple[str, dict]:
    """The server's answer through the typed client: (its text, its answer event); the streamed
    pieces make the answer."""
    from memcli.wire import AskRequest, Sampling

    pieces: list[str] = []
    answer = client.ask(AskRequest(pool, question, tuple(history), max_new_tokens, Sampling(temperature, top_p, seed),
                                   sources=sources), on_text=pieces.append)
    assert "".join(pieces) == answer.text
    return answer.text, answer.event()


def flip_in_tensor(path: Path, tensor: str, index: int = 5) -> None:
    """Flip a byte inside one tensor's data (the header stays valid: the file still loads as a
    safetensors file), then give the file another mtime: timestamps are as coarse as a kernel tick,
    and the store remembers a checked file by its identity (size, inode, mtime, ctime)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8:8 + n])[tensor]["data_offsets"][0]
    data[8 + n + start + index] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))
    st_ = os.stat(path)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))


def streamed(app, pool: str | None, question: str, **kw) -> str:
    """What the command line prints of an in-process answer: its streamed pieces."""
    pieces: list[str] = []
    args = (question,) if pool is None else (pool, question)  # a ChatSession, or a Memcli
    app.ask(*args, on_text=pieces.append, **kw)
    return "".join(pieces)


def run_cli(*args: str, env: dict | None = None, input: str | None = None):
    """The app in-process on the CPU (with a server when the test lets commands find one)."""
    return run(*args, env=env, input=input)


# --------------------------------------------------------------------------- memcli-tiny's notes
def tiny_note():
    """Held-out facts (never paired in training), four per 20-token chunk: one chunk, one injection."""
    from memcli.app import facts

    return [facts.Fact(name, relation, value) for name, relation, value in (
        ("Kai", facts.RELATIONS[0], "Turin"),
        ("Mia", facts.RELATIONS[1], "Solvay"),
        ("Ivo", facts.RELATIONS[2], "jukebox"),
        ("Zoe", facts.RELATIONS[3], "cricket"),
    )]


def tiny_run(*args):
    """The app on memcli-tiny (CPU); the command must succeed."""
    result = runner.invoke(cli_app(), ["--model", "memcli-tiny", "--device", "cpu", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def tiny_ask(pool: str, question: str) -> str:
    last = tiny_run("ask", question, "--pool", pool, "--json").stdout.splitlines()[-1]  # NDJSON: the answer event last
    return json.loads(last)["answer"]


def right_answers(pool: str, note) -> int:
    from memcli.app import facts

    return sum(facts.exact_hit(f.value, tiny_ask(pool, f.question)) for f in note)


def loaded_pools() -> dict[str, list[str]]:
    """What the running server has loaded: model -> its pools."""
    from memcli.server.client import Client

    with Client() as client:
        return {m["model"]: [p["pool"] for p in m["pools"]] for m in client.ps()["models"]}


# --------------------------------------------------------------------------- a backend without weights
class FakeBackend:
    """A `memcli.app.backend.Backend` with no model (as simonw/llm's MockModel): the test queues what
    it answers (`enqueue_answer`) and what an inject reports (`enqueue_inject`), or a failure to
    raise; every call is recorded in `calls` as (method, arguments)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.answers: deque = deque()
        self.injects: deque = deque()
        self.pools: dict[str, dict] = {}  # name -> what pool_info returns

    # ------------------------------------------------------------------ what the test queues
    def enqueue_answer(self, text: str, pieces: list[str] | None = None, **facts) -> None:
        """An answer streamed as `pieces` (default: the whole text at once); `facts`: Answer's fields."""
        from memcli.wire import Answer

        answer = Answer(text, facts.pop("prompt_tokens", 5), facts.pop("new_tokens", 3), 0.01, 0.02, None,
                        facts.pop("stopped", True), **facts)
        self.answers.append((answer, pieces if pieces is not None else [text]))

    def enqueue_inject(self, report, events=()) -> None:
        """An inject's outcome: its report (interrupted ones raise InjectInterrupted), or a failure."""
        self.injects.append((report, list(events)))

    def fail(self, error: BaseException) -> None:
        """The next ask raises `error`."""
        self.answers.append((error, []))

    # ------------------------------------------------------------------ the Backend protocol
    def ask(self, pool, question, *, history=(), sampling=None, max_new_tokens=None, sources=False, on_text=None,
            conversation=None, turn=None):
        self.calls.append(("ask", {"pool": pool, "question": question, "history": list(history), "sampling": sampling,
                                   "max_new_tokens": max_new_tokens, "sources": sources, "conversation": conversation,
                                   "turn": turn}))
        answer, pieces = self.answers.popleft()
        if isinstance(answer, BaseException):
            raise answer
        for piece in pieces:
            if on_text is not None:
                on_text(piece)
        answer.pool, answer.question = pool, question
        return answer

    def chat(self, pool, *, sampling=None, max_new_tokens=None):
        from memcli.app.backend import open_session

        return open_session(self, pool, sampling=sampling, max_new_tokens=max_new_tokens)

    def inject(self, pool, found, *, model=None, chunk_tokens=None, force=False, stdin=None, on_event=None, stop=None):
        from memcli.wire import InjectInterrupted

        self.calls.append(("inject", {"pool": pool, "found": list(found), "model": model, "chunk_tokens": chunk_tokens,
                                      "force": force}))
        report, events = self.injects.popleft()
        if isinstance(report, BaseException):
            raise report
        for event in events:
            if on_event is not None:
                on_event(event)
        self.pools.setdefault(pool, {"name": pool})
        if report.interrupted:
            raise InjectInterrupted(report)
        return report

    def pool_info(self, pool):
        self.calls.append(("pool_info", {"pool": pool}))
        self.require_pool(pool)
        return self.pools[pool]

    def list_pools(self):
        return [{"name": name, "error": None} for name in sorted(self.pools)]

    def pool_exists(self, pool):
        return pool in self.pools

    def require_pool(self, pool):
        from memcli.app.pools import pool_not_found_message
        from memcli.store import PoolNotFound

        if pool not in self.pools:
            raise PoolNotFound(pool_not_found_message(pool, sorted(self.pools)))
        return pool

    def hold(self, pool):
        self.calls.append(("hold", {"pool": pool}))

    def close(self):
        pass


# --------------------------------------------------------------------------- a read-only home
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_only_home(monkeypatch, home: Path, err: int = errno.EROFS) -> None:
    """Make every write under `home` fail as the kernel would on a read-only mount (EROFS) or a
    folder without write permission (EACCES). Root ignores permission bits and a test cannot
    always mount, so the kernel's answer is simulated at the os calls (as test_hardening does for
    an unreadable file); a call relative to a folder descriptor is the store's, hence under home."""
    home_s = os.path.realpath(home)

    def under(path, dir_fd=None) -> bool:
        if dir_fd is not None:
            return True
        if isinstance(path, int):
            return False
        p = os.path.realpath(os.fsdecode(path))
        return p == home_s or p.startswith(home_s + os.sep)

    def deny(path):
        raise OSError(err, os.strerror(err), os.fsdecode(path) if not isinstance(path, int) else None)

    real_open = os.open

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if flags & _WRITES and under(path, dir_fd):
            deny(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    for name in ("mkdir", "rmdir", "unlink", "remove", "truncate", "utime", "chmod"):
        real = getattr(os, name)

        def one(path, *args, _real=real, **kw):
            if under(path, kw.get("dir_fd")):
                deny(path)
            return _real(path, *args, **kw)

        monkeypatch.setattr(os, name, one)
    for name in ("rename", "replace", "link", "symlink"):
        real = getattr(os, name)

        def two(src, dst, *args, _real=real, **kw):
            if under(dst, kw.get("dst_dir_fd", kw.get("dir_fd"))) or under(src, kw.get("src_dir_fd")):
                deny(dst)
            return _real(src, dst, *args, **kw)

        monkeypatch.setattr(os, name, two)
