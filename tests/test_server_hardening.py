"""The server and its client attacked as a hostile local user and a hostile client would (issue 17):
a socket that is not this user's server is never sent a byte; every request is bounded before work
starts; one heavy request does not stop the server for everyone; a network client never names a
path on the server's disk; a server that cannot start leaves the command to run in its own
process; the working directory cannot shadow the server's package.

Every case is a row of docs/hardening.md ("Server"); `tests/test_hardening.py::test_case_table_lists_every_test`
keeps the two in sync. Every wait is on an event (a file appearing, a line, a count the server
reports); nothing counts what happens within a time window.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from memcli.server import address as server_address
from memcli.server.client import Client

from .helpers import (DEADLINE, QUESTION, TEXTS, assert_clean_log, env_for_server, err_lines, flip_in_tensor, local,
                      make_pool, run_cli, run_process, served_answer, start_server, streamed, wait_for)
from .support import fixture_checkpoint

NOBODY = 65534
AS_ROOT = os.geteuid() == 0


def uds(path: Path | None = None, timeout: float = DEADLINE) -> httpx.Client:
    """A plain httpx client of the server's socket (no memcli checks: for hostile bodies)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path or server_address.socket_path())),
                        base_url="http://memcli", timeout=timeout)


def one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text[:500]
    message = response.json()["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message and "unexpected" not in message
    return message


# =========================================================================== 1. trust only your own server
class Decoy:
    """A listening Unix socket that keeps every byte any client sends it. `drain()` takes every
    connection made so far (they wait in the backlog: connect() returns before accept) and reads
    what each sent without blocking: sends to a Unix socket are in its buffer once send() returns."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.conns: list[socket.socket] = []
        self.received = b""

    def drain(self) -> bytes:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            conn.setblocking(False)
            self.conns.append(conn)
        for conn in self.conns:
            while True:
                try:
                    data = conn.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    break
                if not data:
                    break
                self.received += data
        return self.received

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


# A listener whose socket file is this user's (bound before the uid changes) but whose process runs
# as nobody when it listens: SO_PEERCRED names the listening process's credentials.
_FOREIGN_LISTENER = r"""
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
os.setgid(65534)
os.setuid(65534)
sock.listen(64)
sock.setblocking(False)
print("ready", flush=True)
sys.stdin.readline()
received, conns = b"", []
while True:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        break
    conns.append(conn)
for conn in conns:
    conn.setblocking(False)
    while True:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, ConnectionResetError):
            break
        if not data:
            break
        received += data
print(json.dumps({"connections": len(conns), "bytes": len(received)}), flush=True)
"""


class ForeignListener:
    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _FOREIGN_LISTENER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.received = b""

    def drain(self) -> bytes:
        out, _ = self.proc.communicate("drain\n", timeout=DEADLINE)
        self.received = b"x" * json.loads(out.strip().splitlines()[-1])["bytes"]
        return self.received

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _foreign(case: str, tmp_path: Path, monkeypatch):
    """Set up a socket that is not this user's server where the client looks for its server; the
    listener that records what it is sent, and the path the refusal must name."""
    run = server_address.runtime_dir()
    sock = server_address.socket_path()
    run.mkdir(parents=True, mode=0o700)
    os.chmod(run, 0o700)
    if case == "symlink":
        decoy = Decoy(tmp_path / "decoy.sock")
        os.symlink(decoy.path, sock)
        return decoy, sock
    if case == "open_folder":
        os.chmod(run, 0o777)
        return Decoy(sock), run
    if case == "foreign_folder":
        decoy = Decoy(sock)
        if AS_ROOT:
            os.chown(run, NOBODY, NOBODY)
        else:  # this process plays another user: the folder and socket are not "its"
            real = os.getuid()
            monkeypatch.setattr(os, "getuid", lambda: real + 1)
        return decoy, run
    if case == "foreign_socket":
        if not AS_ROOT:
            pytest.skip("needs root to give a socket to another user")
        decoy = Decoy(sock)
        os.chown(sock, NOBODY, NOBODY)
        return decoy, sock
    if case == "foreign_peer":
        if not AS_ROOT:
            pytest.skip("needs root to run a listener as another user")
        return ForeignListener(sock), sock
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["symlink", "open_folder", "foreign_folder", "foreign_socket", "foreign_peer"])
def test_a_socket_that_is_not_yours_is_never_sent_a_byte(ck, tmp_path, monkeypatch, case):
    """`memcli ask` and `memcli inject` through the real command line: the decoy gets no byte; the
    command says in one line which path it refused and the fix, then runs in its own process with
    the same result as MEMCLI_SERVER=0."""
    app = local(ck)
    make_pool(app, tmp_path, "p", TEXTS[:1])
    expected = streamed(app, "p", QUESTION)
    note = tmp_path / "more.txt"
    note.write_text(TEXTS[2])
    listener, named = _foreign(case, tmp_path, monkeypatch)
    monkeypatch.delenv("MEMCLI_SERVER")
    try:
        asked = run_cli("ask", QUESTION, "--pool", "p")
        injected = run_cli("inject", str(note), "--pool", "p")
        ps = run_cli("ps")
        received = listener.drain()
    finally:
        listener.close()
    assert received == b"", received[:200]
    assert asked.exit_code == 0 and asked.stdout == expected + "\n", asked.stderr
    assert injected.exit_code == 0, injected.stderr
    assert [s["path"] for s in app.pool_info("p")["files"]][-1] == str(note)  # injected, in this process
    for result in (asked, injected):
        lines = [line for line in result.stderr.splitlines() if "memcli server" in line]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("memcli: not using the memcli server: ") and str(named) in lines[0]
        assert "running in this process" in lines[0]
        assert ("rm " in lines[0]) or ("MEMCLI_HOME" in lines[0])  # the fix
    # ps has nothing to run in-process: it refuses with the same line, and a non-zero exit
    assert ps.exit_code == 1 and str(named) in ps.stderr and len(ps.stderr.strip().splitlines()) == 1
    assert not server_address.lock_held()  # no server was started beside it


@pytest.mark.parametrize("case", ["symlink_folder", "open_folder", "foreign_folder"])
def test_the_server_refuses_a_folder_it_cannot_trust(tmp_path, monkeypatch, case):
    run = server_address.runtime_dir()
    run.parent.mkdir(parents=True, exist_ok=True)
    if case == "symlink_folder":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        os.symlink(elsewhere, run)
    else:
        run.mkdir(mode=0o700)
        if case == "open_folder":
            os.chmod(run, 0o777)
        elif AS_ROOT:
            os.chown(run, NOBODY, NOBODY)
        else:
            real = os.getuid()
            monkeypatch.setattr(os, "getuid", lambda: real + 1)
    before = stat.S_IMODE(os.lstat(run).st_mode)
    env = env_for_server()
    if case == "foreign_folder" and not AS_ROOT:
        pytest.skip("the server runs in its own process: needs root to give the folder to another user")
    proc = subprocess.Popen([sys.executable, "-m", "memcli", "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:  # it exits; were it to serve, its socket would appear
        wait_for(lambda: proc.poll() is not None or os.path.lexists(server_address.socket_path()), "the server to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and str(run) in lines[0], err
    assert stat.S_IMODE(os.lstat(run).st_mode) == before  # never chmodded
    assert not os.path.lexists(server_address.socket_path()) or case == "symlink_folder"
    assert not (tmp_path / "elsewhere" / "server.sock").exists()


def test_own_leftovers_are_repaired(ck, tmp_path, monkeypatch):
    """A folder of ours that others could only enter is closed and used; a dead socket of ours (a
    killed server's) is replaced by a fresh server, with one line."""
    app = local(ck)
    make_pool(app, tmp_path, "p", TEXTS[:1])
    run = server_address.runtime_dir()
    run.mkdir(parents=True, mode=0o700)
    os.chmod(run, 0o755)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(server_address.socket_path()))
    dead.close()  # bound, never listening: what a killed server leaves
    monkeypatch.delenv("MEMCLI_SERVER")
    env = env_for_server()
    try:
        asked = run_process([sys.executable, "-m", "memcli", "--device", "cpu", "ask", QUESTION, "--pool", "p"],
                            env=env, timeout=DEADLINE)
        assert asked.returncode == 0 and asked.stdout == streamed(app, "p", QUESTION) + "\n", asked.stderr
        assert [line for line in asked.stderr.splitlines() if "server" in line] == [
            "the memcli server ended without stopping; its pools are at their last commit — starting a fresh server"]
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
        with Client() as client:
            assert client.health()["pid"] != os.getpid()
    finally:
        subprocess.run([sys.executable, "-m", "memcli", "stop"], env=env, capture_output=True, timeout=DEADLINE)


@pytest.mark.skipif(not AS_ROOT, reason="needs root to connect as another user")
def test_the_server_closes_a_connection_from_another_user(server, tmp_path):
    """Only root could reach the 0600 socket in its 0700 folder anyway; a peer of another uid that
    does is closed before a request is read (a Unix-socket request always comes from this user)."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="memcli-peer-"))  # under the temp dir: nobody can reach it
    os.chmod(shared, 0o777)
    link = shared / "s.sock"
    sock = server_address.socket_path()
    mode = stat.S_IMODE(os.stat(sock).st_mode)
    os.link(sock, link)  # the same socket, reachable by nobody
    os.chmod(link, 0o666)
    code = ("import os, socket, sys\nos.setgid(65534)\nos.setuid(65534)\ns = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\ntry:\n    s.sendall(b'GET /api/health HTTP/1.1\\r\\nhost: m\\r\\n\\r\\n')\n"
            "    print('closed' if s.recv(4096) == b'' else 'answered')\n"
            "except (BrokenPipeError, ConnectionResetError):\n    print('closed')\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(link)], capture_output=True, text=True, timeout=DEADLINE)
    finally:
        os.chmod(sock, mode)
        shutil.rmtree(shared, ignore_errors=True)
    assert out.returncode == 0 and out.stdout.strip() == "closed", out.stdout + out.stderr
    assert "refused a connection from uid 65534" in server.log.read_text()
    with Client() as client:
        assert client.health()["ok"] is True


# =========================================================================== 2. every request bounded
def _deep(prefix: bytes, depth: int = 100_000, suffix: bytes = b"}") -> bytes:
    return prefix + b"[" * depth + b"]" * depth + suffix


def _messages(n: int) -> list[dict]:
    """n messages (n odd), numbered from the newest: the newest ones are the same whatever n is."""
    out = []
    for i in reversed(range(n // 2)):
        out += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return out + [{"role": "user", "content": "and the last one?"}]


def _history(n: int) -> list[tuple[str, str]]:
    """n turns, numbered from the newest."""
    return [(f"question {i}?", f"answer {i}.") for i in reversed(range(n))]


ASK = b'"pool": "ok", "question": "q"'
CHAT = b'"model": "ok", "messages": [{"role": "user", "content": "q"}]'
BIG = "x" * (256 * 1024 + 1)
HOSTILE = {
    # name: (endpoint, body bytes, status, words the one-line message must hold)
    "ask_deep_body": ("/api/ask", b"[" * 100_000 + b"]" * 100_000, 400, "the request body nests deeper than 16"),
    "ask_deep_history": ("/api/ask", _deep(b'{' + ASK + b', "history": '), 400, "history nests deeper than 16"),
    "chat_deep_messages": ("/v1/chat/completions", _deep(b'{"model": "ok", "messages": '), 400,
                           "messages nests deeper than 16"),
    "chat_deep_content": ("/v1/chat/completions", _deep(b'{"model": "ok", "messages": [{"role": "user", "content": ',
                                                        suffix=b"}]}"), 400, "messages nests deeper than 16"),
    "ask_temperature_nan": ("/api/ask", b'{' + ASK + b', "temperature": NaN}', 400, "temperature must be a finite number"),
    "chat_temperature_nan": ("/v1/chat/completions", b'{' + CHAT + b', "temperature": NaN}', 400,
                             "temperature must be a finite number"),
    "ask_top_p_infinity": ("/api/ask", b'{' + ASK + b', "temperature": 1, "top_p": Infinity}', 400,
                           "top_p must be a finite number"),
    "chat_temperature_overflow": ("/v1/chat/completions", b'{' + CHAT + b', "temperature": 1e999}', 400,
                                  "temperature must be a finite number"),
    "chat_temperature_over_2": ("/v1/chat/completions", b'{' + CHAT + b', "temperature": 2.5}', 400,
                                "temperature must be >= 0 and <= 2"),
    "ask_temperature_bool": ("/api/ask", b'{' + ASK + b', "temperature": true}', 400, "temperature must be a number"),
    "ask_seed_huge": ("/api/ask", b'{' + ASK + b', "seed": ' + str(2**70).encode() + b'}', 400, "seed must be between"),
    "chat_seed_bool": ("/v1/chat/completions", b'{' + CHAT + b', "seed": true}', 400, "seed must be an integer"),
    "ask_int_of_5000_digits": ("/api/ask", b'{' + ASK + b', "seed": ' + b"9" * 5000 + b'}', 400,
                               "the request body is not valid JSON"),
    "ask_max_new_tokens_huge": ("/api/ask", b'{' + ASK + b', "max_new_tokens": ' + str(10**30).encode() + b'}', 400,
                                "max_new_tokens must be <= 1048576"),
    "chat_max_tokens_float": ("/v1/chat/completions", b'{' + CHAT + b', "max_tokens": 1.5}', 400,
                              "max_tokens must be an integer"),
    "ask_history_over_100k_turns": ("/api/ask", json.dumps({"pool": "ok", "question": "q", "history": [["", ""]] * 100_001},
                                                           separators=(",", ":")).encode(), 400,
                                    "history holds 100001 turns; at most 100000"),
    "chat_over_100k_messages": ("/v1/chat/completions",
                                json.dumps({"model": "ok", "messages": [{"role": "user", "content": "q"}] * 100_001},
                                           separators=(",", ":")).encode(), 400,
                                "messages holds 100001 items; at most 100000"),
    "ask_question_oversize": ("/api/ask", json.dumps({"pool": "ok", "question": BIG}).encode(), 400,
                              "question is 262145 characters; at most 262144"),
    "ask_history_item_oversize": ("/api/ask", json.dumps({"pool": "ok", "question": "q", "history": [["a", BIG]]}).encode(),
                                  400, "history[0][1] is 262145 characters"),
    "chat_content_oversize": ("/v1/chat/completions", json.dumps({"model": "ok", "messages": [
        {"role": "system", "content": BIG}, {"role": "user", "content": "q"}]}).encode(), 400,
                              "messages[0].content is 262145 characters"),
    "chat_stop_oversize": ("/v1/chat/completions", b'{' + CHAT + b', "stop": ["' + b"s" * 300 + b'"]}', 400,
                           "stop[0] is 300 characters; at most 256"),
    "inject_chunk_tokens_huge": ("/api/inject?pool=ok&chunk_tokens=" + "9" * 30, b"", 400, "chunk_tokens must be an integer"),
    "inject_chunk_tokens_over_range": ("/api/inject?pool=ok&chunk_tokens=2000000", b"", 400, "chunk_tokens must be <= 1048576"),
    "inject_encoding_oversize": ("/api/inject?pool=ok", b'{"path": "a.txt", "size": 0, "kind": "text", "encoding": "'
                                 + b"t" * 100 + b'"}\n', 400, "an upload's encoding is 100 characters"),
    "inject_kind_unknown": ("/api/inject?pool=ok", b'{"path": "a.txt", "size": 0, "kind": "exe"}\n', 400,
                            "an upload's kind must be one of"),
    "inject_deep_file_header": ("/api/inject?pool=ok", b"[" * 50_000 + b"\n", 400,
                                "an upload's file header nests deeper than 4"),
}


def test_hostile_bodies_are_one_line_4xx_naming_the_field(ck, tmp_path, server):
    """Each body is refused before work starts (a 4xx whose one line names the field), never a 500;
    the server keeps answering, and its log holds no traceback."""
    app = local(ck)
    make_pool(app, tmp_path, "ok", TEXTS[:1])
    with uds() as http:
        for name, (endpoint, body, status, words) in HOSTILE.items():
            message = one_line_error(http.post(endpoint, content=body), status)
            assert words in message, (name, message)
        assert http.get("/api/health").json()["ok"] is True
    assert served_answer(server.client, "ok", QUESTION)[0] == app.ask("ok", QUESTION).text


def test_a_tiny_temperature_decodes_greedily_in_the_server_and_in_the_command(ck, tmp_path, server, monkeypatch):
    """temperature 1e-300 (below the 0.01 floor) is greedy decoding, everywhere: the same answer
    as temperature 0 from /api/ask, /v1/chat/completions and the in-process `memcli ask`; NaN is
    refused by the command line too, in one line, before any model loads."""
    app = local(ck)
    make_pool(app, tmp_path, "ok", TEXTS[:1])
    greedy = app.ask("ok", QUESTION, max_new_tokens=8).text
    with Client() as client:
        assert served_answer(client, "ok", QUESTION, max_new_tokens=8, temperature=1e-300)[0] == greedy
    with uds() as http:
        done = http.post("/v1/chat/completions", json={"model": "ok", "messages": [{"role": "user", "content": QUESTION}],
                                                       "max_tokens": 8, "temperature": 1e-300}).json()
    assert done["choices"][0]["message"]["content"] == greedy
    here = run_cli("--no-server", "ask", QUESTION, "--pool", "ok", "--max-new-tokens", "8", "--temperature", "1e-300")
    assert here.exit_code == 0 and here.stdout == greedy + "\n", here.stderr
    monkeypatch.delenv("MEMCLI_SERVER")
    for value in ("nan", "-1"):  # the option's own range check (a usage error)
        refused = run_cli("ask", QUESTION, "--pool", "ok", "--temperature", value)
        assert refused.exit_code == 2 and "--temperature" in refused.stderr
    refused = run_cli("ask", QUESTION, "--pool", "ok", "--temperature", "1000")
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        "memcli: error: --temperature must be >= 0 and <= 100, not 1000.0"], refused.stderr
    refused = run_cli("ask", QUESTION, "--pool", "ok", "--temperature", "0.5", "--seed", str(2**70))
    assert refused.exit_code == 2 and "--seed must be between" in refused.stderr


def test_huge_histories_and_conversations_are_fitted_from_their_newest_end(ck, tmp_path, server):
    """A 100k-turn history and a 50k-message conversation are answered (they fit the body limit):
    only the newest turns that fit the window are read, the same as in-process."""
    from memcli.app.asking import conversation_prompt

    app = local(ck)
    make_pool(app, tmp_path, "ok", TEXTS[:1])
    history = _history(100_000)
    expected = app.ask("ok", "q?", max_new_tokens=1, history=history)
    with Client() as client:
        text, done = served_answer(client, "ok", "q?", max_new_tokens=1, history=history)
    assert text == expected.text and done["turns_in_prompt"] == expected.turns_in_prompt
    assert done["prompt_tokens"] == expected.prompt_tokens
    messages = _messages(50_000)
    ids, dropped = conversation_prompt(app.model(ck), messages, 6)
    with uds() as http:
        done = http.post("/v1/chat/completions", json={"model": "ok", "messages": messages, "max_tokens": 6}).json()
    assert done["usage"]["prompt_tokens"] == len(ids) and dropped > 49_000


def _old_conversation_prompt(loaded, messages, max_new_tokens):
    """The fitting as it was (drop the oldest, re-tokenize everything, repeat): the reference."""
    from memcli.app.asking import DEFAULT_ANSWER_TOKENS, messages_ids

    limit = loaded.max_input_tokens()
    reserve = min(DEFAULT_ANSWER_TOKENS if max_new_tokens is None else max_new_tokens, limit // 2)
    kept, dropped = list(messages), 0
    while True:
        ids = messages_ids(loaded.tokenizer, kept)
        if len(ids) + reserve <= limit or len(kept) == 1:
            return ids, dropped
        turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        kept.pop(turns[0] if turns else 0)
        dropped += 1


@pytest.mark.parametrize("variant", ["memoryllm-8b-chat-tiny", "memoryllm-8b-tiny"])
def test_fitting_work_does_not_grow_with_the_dropped_turns(monkeypatch, variant):
    """Counted in prompts built (events, not time): fitting 50k messages or a 100k-turn history
    builds as many prompts, of as many messages, as fitting a couple of thousand; the result is
    the one the old drop-the-oldest loop gives (system messages dropped last). With the fixture's
    own window (72 / 64 tokens) and with a 4000-token one (the real models' size: many turns kept),
    on the fixture's real tokenizer (a chat template, and none)."""
    from types import SimpleNamespace

    from memcli.app import asking
    from memcli.app.api import Memcli
    from memcli.app.asking import answer_prompt
    from memcli.app.settings import load_settings
    from memcli.loading import prompts

    real = Memcli(load_settings(device="cpu")).model(str(fixture_checkpoint(variant)))
    built: list[int] = []
    real_conversation, real_turns = asking.messages_ids, prompts.conversation_ids

    def counting_conversation(tokenizer, messages):
        built.append(len(messages))
        return real_conversation(tokenizer, messages)

    def counting_turns(tokenizer, turns, question):
        built.append(len(turns))
        return real_turns(tokenizer, turns, question)

    for window in (real.max_input_tokens(), 4000):
        loaded = SimpleNamespace(tokenizer=real.tokenizer, name=real.name, max_input_tokens=lambda w=window: w)
        monkeypatch.setattr(asking, "messages_ids", counting_conversation)
        monkeypatch.setattr(prompts, "conversation_ids", counting_turns)
        work, prompts_of = {}, {}
        for n in (2_001, 50_001):
            messages = _messages(n)
            messages[1:1] = [{"role": "system", "content": "Be brief."}]
            built.clear()
            prompts_of[n], dropped = asking.conversation_prompt(loaded, messages, 8)
            work[n] = (len(built), sum(built))
            assert 0 < len(messages) - dropped < 1_000
        assert work[2_001] == work[50_001], work
        assert prompts_of[2_001] == prompts_of[50_001]
        turns_work = {}
        for n in (1_000, 100_000):
            history = _history(n)
            built.clear()
            ids, _, kept = answer_prompt(loaded, "q?", history, 8)
            turns_work[n] = (len(built), sum(built))
            assert kept < 500 and ids == real_turns(loaded.tokenizer, history[n - kept:], "q?")
            assert len(real_turns(loaded.tokenizer, history[n - kept - 1:], "q?")) + 8 > window  # one more: too long
            assert kept > 0 or window < 100
        assert turns_work[1_000] == turns_work[100_000], turns_work
        monkeypatch.setattr(asking, "messages_ids", real_conversation)
        monkeypatch.setattr(prompts, "conversation_ids", real_turns)
        small = _messages(301 if window > 100 else 21)
        small[0:0] = [{"role": "system", "content": f"rule {i}." * 3} for i in range(20)]
        small[-1:-1] = [{"role": "system", "content": "x " * 30}]
        for reserve in (8, None):
            assert asking.conversation_prompt(loaded, small, reserve) == _old_conversation_prompt(loaded, small, reserve)
        system_heavy = [{"role": "system", "content": f"rule {i}."} for i in range(3000)] + _messages(3)
        ids, dropped = asking.conversation_prompt(loaded, system_heavy, 8)
        assert dropped > 2000  # the oldest system messages go once no other turn is left


# =========================================================================== 3. fair under load
def _heavy_chat(pool: str, events: list, n: int = 50_001, max_tokens: int = 30) -> threading.Thread:
    """A streamed /v1/chat/completions of n messages, its SSE data lines appended to `events`."""
    body = {"model": pool, "messages": _messages(n), "max_tokens": max_tokens, "stream": True}

    def run():
        try:
            with uds() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as err:
            events.append(f"gone: {type(err).__name__}")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _device(client: Client) -> dict:
    return client.ps()["device"]


def _held(pause: Path, worker: threading.Thread, events: list) -> None:
    """Wait until the paused server's request holds the device at a slice boundary; fail at once
    if the request ended first."""
    reached = Path(str(pause) + ".reached")

    def ready():
        if not reached.exists() and not worker.is_alive():
            raise AssertionError(f"the request ended before it held the device: {events[-3:]}")
        return reached.exists()

    wait_for(ready, "the request to hold the device at a slice boundary")


def test_a_heavy_request_does_not_hold_the_device_while_others_wait(ck, tmp_path, paused_server):
    """A 50k-message conversation is decoding; an ask on another pool is answered after at most a
    couple of the heavy one's slices (one token each) per turn it waited for, counted by the server;
    ps and health answer while the heavy request holds the device."""
    app = local(ck)
    make_pool(app, tmp_path, "heavy", TEXTS[:1])
    make_pool(app, tmp_path, "light", TEXTS[1:2])
    expected = app.ask("light", QUESTION, max_new_tokens=8).text
    paused_server.pause.write_text("token")
    events: list = []
    heavy = _heavy_chat("heavy", events)
    _held(paused_server.pause, heavy, events)
    with Client() as client:
        assert client.health()["ok"] is True  # no device needed
        holding = [r for r in _device(client)["requests"] if r["kind"] == "chat"]
        assert holding and holding[0]["state"] == "running" and holding[0]["pool"] == "heavy"
        light: dict = {}

        def ask_light():
            with Client() as other:
                light["answer"] = served_answer(other, "light", QUESTION, max_new_tokens=8)[0]

        asker = threading.Thread(target=ask_light)
        asker.start()
        wait_for(lambda: _device(client)["waiting"] >= 1, "the light ask to wait for the device")
        paused_server.pause.unlink()  # the heavy request goes on, one slice at a time
        asker.join(DEADLINE)
        heavy.join(DEADLINE)
        assert light["answer"] == expected
        ended = {r["kind"]: r for r in _device(client)["ended"]}
    assert ended["ask"]["state"] == "done" and ended["ask"]["slices"] >= 2
    assert ended["ask"]["waited_slices_max"] <= 2, ended  # a few slices of the heavy one, never its whole answer
    assert ended["chat"]["state"] == "done" and events[-1] == "[DONE]"


def test_stop_answers_while_a_heavy_request_holds_the_device(ck, tmp_path, paused_server, monkeypatch):
    """`memcli stop` while a 50k-message request holds the device (paused inside its slice): the stop
    is answered, the heavy request ends at its slice boundary, told why, and the server exits 0."""
    app = local(ck)
    make_pool(app, tmp_path, "heavy", TEXTS[:1])
    paused_server.pause.write_text("token")
    events: list = []
    heavy = _heavy_chat("heavy", events)
    _held(paused_server.pause, heavy, events)
    monkeypatch.delenv("MEMCLI_SERVER")
    assert "memcli server pid" in run_cli("ps").stderr  # ps does not wait for the device either
    stopped = run_cli("stop")
    assert stopped.exit_code == 0 and "stopped the memcli server" in stopped.stderr
    assert paused_server.proc.wait(DEADLINE) == 0
    heavy.join(DEADLINE)
    assert any("the server stopped before this request was complete" in e for e in events), events[-3:]
    assert paused_server.pause.exists()  # it ended by the stop, not by the pause being lifted


@pytest.mark.parametrize("endpoint", ["ask", "chat"])
def test_a_client_that_goes_away_cancels_its_work_at_the_next_slice(ck, tmp_path, paused_server, endpoint):
    """The client disconnects while its request holds the device (a streamed ask, a non-streamed
    chat completion): the work stops at its next slice boundary, cancelled, and the device is free."""
    app = local(ck)
    make_pool(app, tmp_path, "p", TEXTS[:1])
    paused_server.pause.write_text("token")
    if endpoint == "ask":
        path, body = "/api/ask", {"pool": "p", "question": QUESTION, "max_new_tokens": 20}
    else:
        path, body = "/v1/chat/completions", {"model": "p", "messages": _messages(2_001), "max_tokens": 20}
    raw = json.dumps(body).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(server_address.socket_path()))
    conn.sendall(f"POST {path} HTTP/1.1\r\nhost: m\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(raw)}\r\n\r\n".encode() + raw)
    answer: list = []

    def read():
        while data := conn.recv(65536):
            answer.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    _held(paused_server.pause, reader, answer)
    conn.shutdown(socket.SHUT_RDWR)  # the client goes away
    reader.join(DEADLINE)
    conn.close()
    with Client() as client:
        wait_for(lambda: any(r["kind"] == endpoint for r in _device(client)["ended"]), "the work to stop")
        ended = [r for r in _device(client)["ended"] if r["kind"] == endpoint][0]
        assert ended["state"] == "cancelled" and ended["slices"] <= 2, ended
        assert _device(client)["requests"] == []
    paused_server.pause.unlink()
    assert served_answer(Client(), "p", QUESTION, max_new_tokens=4)[0] == app.ask("p", QUESTION, max_new_tokens=4).text


# =========================================================================== 4. models the server knows
def test_a_model_field_naming_a_server_path_is_refused_without_opening_it(ck, tmp_path):
    """Over TCP, "model": "/etc", a folder whose config.json is a FIFO, or an unknown hub id are
    refused (400, one line) before anything is opened: a writer on the FIFO is never met by a
    reader. Over the owner's Unix socket, folder models keep working (tests/test_server_answers.py)."""
    app = local(ck)
    make_pool(app, tmp_path, "ok", TEXTS[:1])
    folder = tmp_path / "probe"
    folder.mkdir()
    fifo = folder / "config.json"
    os.mkfifo(fifo)
    met = threading.Event()

    def writer():  # returns once anything opens the FIFO for reading
        fd = os.open(fifo, os.O_WRONLY)
        met.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = start_server(tmp_path, "--port", str(port))
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE)
        for model in ("/etc", str(folder), str(folder) + "/", "../" + folder.name, "~", "etc/ssl", "a/../b"):
            body = {"pool": "ok", "question": "q", "model": model, "model_explicit": True}
            message = one_line_error(http.post("/api/ask", json=body), 400)
            assert "over TCP a request names an alias" in message, message
            message = one_line_error(http.post("/api/inject", params={"pool": "ok", "model": model},
                                               content=b'{"path": "a.txt", "size": 1}\nx'), 400)
            assert "over TCP a request names an alias" in message
        # what the server knows is accepted: the model it loaded (a folder), named as ps names it
        recorded = app.store.read_manifest("ok")["meta"]["model"]["model"]
        assert one_line_error(http.post("/api/ask", json={"pool": "ok", "question": "q", "model": recorded}), 400)
        assert http.post("/api/ask", json={"pool": "ok", "question": QUESTION, "max_new_tokens": 4}).status_code == 200
        with Client() as client:
            assert [m["model"] for m in client.ps()["models"]] == [recorded]
        answer = http.post("/api/ask", json={"pool": "ok", "question": QUESTION, "max_new_tokens": 4, "model": recorded})
        assert answer.status_code == 200 and '"event": "answer"' in answer.text, answer.text
        http.close()
    finally:
        running.stop()
        assert_clean_log(running.log)
    assert not met.is_set()  # nothing opened the FIFO
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # release the writer
    thread.join(DEADLINE)
    os.close(fd)
    assert met.is_set()  # (the writer does notice a reader: the check above could fail)


# =========================================================================== 5. server start
@pytest.mark.parametrize("case", ["cache_is_a_file", "run_is_a_file", "locks_is_a_file", "read_only_home"])
def test_a_server_that_cannot_start_leaves_the_command_in_its_process(ck, tmp_path, monkeypatch, case):
    """The command says so in one line on stderr and gives the result MEMCLI_SERVER=0 gives."""
    app = local(ck)
    make_pool(app, tmp_path, "p", TEXTS[:1])
    home = Path(os.environ["MEMCLI_HOME"])
    if case == "cache_is_a_file":
        shutil.rmtree(home / "cache", ignore_errors=True)
        (home / "cache").write_text("not a folder")
    elif case == "run_is_a_file":
        (home / "run").write_text("not a folder")
    elif case == "locks_is_a_file":
        locks = app.store.root / ".locks"
        shutil.rmtree(locks, ignore_errors=True)
        locks.write_text("not a folder")
    else:
        if AS_ROOT:
            pytest.skip("root writes through permission bits")
        os.chmod(home, 0o500)
    env = env_for_server()
    try:
        alone = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "--no-server", "ask", QUESTION,
                                "--pool", "p"], capture_output=True, text=True, env=env, timeout=DEADLINE)
        routed = subprocess.run([sys.executable, "-m", "memcli", "--device", "cpu", "ask", QUESTION, "--pool", "p"],
                                capture_output=True, text=True, env=env, timeout=DEADLINE)
    finally:
        if case == "read_only_home":
            os.chmod(home, 0o700)
        subprocess.run([sys.executable, "-m", "memcli", "stop"], env=env, capture_output=True, timeout=DEADLINE)
    notes = [line for line in routed.stderr.splitlines() if "running in this process" in line]
    if case == "locks_is_a_file":
        # readers go on without the store's lock folder (store/folders.py), so the server starts
        # and answers; what it says about the folder is the in-process line, not "Not a directory"
        assert notes == [] and "Not a directory" not in routed.stderr, routed.stderr
    else:
        assert len(notes) == 1 and "memcli server" in notes[0], routed.stderr
    assert routed.returncode == alone.returncode and routed.stdout == alone.stdout
    assert [line for line in routed.stderr.splitlines() if line not in notes] == alone.stderr.splitlines()
    assert "Traceback" not in routed.stderr and "unexpected" not in routed.stderr


def test_the_working_directory_cannot_shadow_the_servers_package(ck, tmp_path, monkeypatch):
    """A folder named memcli in the working directory (a checkout beside an install) is not what the
    auto-started server imports: the command is answered by the server, not in its own process."""
    script = Path(sys.executable).parent / "memcli"
    if not script.exists():
        pytest.skip("no installed memcli entry point beside this Python")
    app = local(ck)
    make_pool(app, tmp_path, "p", TEXTS[:1])
    cwd = tmp_path / "checkout"
    (cwd / "memcli").mkdir(parents=True)
    marker = tmp_path / "decoy-imported"
    (cwd / "memcli" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('decoy')\n")
    (cwd / "memcli" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = env_for_server()
    try:
        asked = run_process([str(script), "--device", "cpu", "ask", QUESTION, "--pool", "p"], cwd=cwd, env=env,
                            timeout=DEADLINE)
        assert asked.returncode == 0 and asked.stdout == streamed(app, "p", QUESTION) + "\n", asked.stderr
        assert "running in this process" not in asked.stderr and not marker.exists()
        with Client() as client:
            ps = client.ps()
        assert [p["pool"] for m in ps["models"] for p in m["pools"]] == ["p"]  # answered by the server
    finally:
        subprocess.run([sys.executable, "-m", "memcli", "stop"], env=env, capture_output=True, timeout=DEADLINE)


# =========================================================================== 6. damage found where the server reads it
def test_a_damaged_part_fails_through_the_server_while_another_pool_answers(ck, tmp_path, server, monkeypatch):
    """The server is the default path: a pool one of whose parts was damaged before the server read
    it fails `ask` and `inject` with the store's one line (the pool, the part, `pool verify
    --repair`), passed on by the command; the server writes nothing (no laundering of the bad
    bytes) and goes on answering from another pool."""
    app = local(ck)
    make_pool(app, tmp_path, "p", TEXTS[:1])
    make_pool(app, tmp_path, "q", TEXTS[1:2])
    manifest = app.store.read_manifest("p")
    pid = manifest["meta"]["state"]["stm_meta"]
    objects = app.store.root / ".objects"
    flip_in_tensor(objects / manifest["parts"][pid]["sha256"], "origin")
    before = sorted(os.listdir(objects))
    note = tmp_path / "more.txt"
    note.write_text(TEXTS[2])
    monkeypatch.delenv("MEMCLI_SERVER")
    said = f"memcli: error: pool p: part {pid} is damaged (sha256 mismatch); run memcli pool verify p --repair"
    for args in (("ask", QUESTION, "--pool", "p"), ("inject", str(note), "--pool", "p")):
        result = run_cli(*args)
        assert result.exit_code == 1 and err_lines(result) == [said], (args, result.stderr)
    asked = run_cli("ask", QUESTION, "--pool", "q")
    assert asked.exit_code == 0 and asked.stdout == streamed(app, "q", QUESTION) + "\n", asked.stderr
    with Client() as client:
        assert [p["pool"] for m in client.ps()["models"] for p in m["pools"]] == ["q"]  # the server answered
    assert sorted(os.listdir(objects)) == before
    assert app.store.read_manifest("p")["version"] == manifest["version"]
