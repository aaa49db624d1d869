"""Who reaches a server and how: the socket and its folder owner-only, TCP beyond loopback only with
a bearer token, one MKL code path in every process, a client that imports no torch, bad requests
answered with one line while the server goes on."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import httpx
import pytest

from memcli.server import address as server_address
from memcli.server.client import Client, ServerError
from memcli.wire import AskRequest

from .helpers import (DEADLINE, QUESTION, TEXTS, env_for_server, local, make_pool, run_cli, run_process, served_answer,
                      start_server, streamed)
from .support import REPO


# --------------------------------------------------------------------------- transport and access
def test_socket_and_its_folder_are_owner_only(server):
    folder = server_address.runtime_dir()
    info = os.stat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    sock = os.stat(server_address.socket_path())
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) & 0o077 == 0 and sock.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(server_address.info_path()).st_mode) == 0o600


def test_an_open_runtime_folder_is_closed_before_use(tmp_path):
    folder = server_address.runtime_dir()
    folder.mkdir(parents=True)
    os.chmod(folder, 0o755)
    server_address.ensure_runtime_dir()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_tcp_beyond_loopback_needs_a_token(monkeypatch):
    from memcli.server.process import check_tcp

    monkeypatch.delenv("MEMCLI_TOKEN", raising=False)
    with pytest.raises(server_address.AddressError, match="MEMCLI_TOKEN"):
        check_tcp("0.0.0.0", 8000, None)
    with pytest.raises(server_address.AddressError):
        check_tcp("192.168.1.20", None, "")
    assert check_tcp(None, 8000, None) == ("127.0.0.1", 8000)  # --port alone: loopback
    assert check_tcp("0.0.0.0", 8000, "secret") == ("0.0.0.0", 8000)
    assert check_tcp(None, None, None) is None
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "8000")  # refused before anything listens
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "MEMCLI_TOKEN" in lines[0] and "Traceback" not in result.stderr
    assert not server_address.socket_path().exists()


def test_tcp_requests_without_the_bearer_token_get_401(ck, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = start_server(tmp_path, "--port", str(port), env=env_for_server(MEMCLI_TOKEN="s3cret"))
    try:
        url = f"http://127.0.0.1:{port}/api/health"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).json()["ok"] is True
        assert running.client.health()["ok"] is True  # the owner-only Unix socket needs no token
    finally:
        running.stop()


def test_every_memcli_process_asks_mkl_for_reproducible_sums():
    """A server and a one-shot command answer alike only if MKL takes one code path in both
    (by default it picks kernels by memory alignment): importing memcli asks for that, and a
    value the user set is kept."""
    code = "import os, memcli; print(os.environ.get('MKL_CBWR'))"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env["PYTHONPATH"] = str(REPO)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "AUTO"
    env["MKL_CBWR"] = "COMPATIBLE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "COMPATIBLE"


def test_client_imports_no_torch(server, tmp_path, ck):
    code = ("import sys, memcli.server.client, memcli.server.remote, memcli.cli.main, memcli.wire; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env_for_server(), timeout=DEADLINE)
    app = local(ck)
    make_pool(app, tmp_path, "light", TEXTS[:1])
    traced = run_process([sys.executable, "-X", "importtime", "-m", "memcli", "--device", "cpu", "ask", QUESTION,
                          "--pool", "light"], env=env_for_server(), timeout=DEADLINE)
    assert traced.returncode == 0 and traced.stdout == streamed(app, "light", QUESTION) + "\n"
    imported = [line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")]
    assert "httpx" in imported and not [m for m in imported if m.split(".")[0] == "torch"]
    chat = run_process([sys.executable, "-X", "importtime", "-m", "memcli", "--device", "cpu", "chat", "--pool", "light"],
                       input=QUESTION + "\n", env=env_for_server(), timeout=DEADLINE)
    assert chat.returncode == 0 and chat.stdout == streamed(app, "light", QUESTION) + "\n", chat.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in chat.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in imported if m.split(".")[0] == "torch"]


# --------------------------------------------------------------------------- bad input
def test_bad_requests_get_one_line_errors_and_the_server_survives(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "ok", TEXTS[:1])
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server_address.socket_path())), base_url="http://m")

    def error(response, status):
        assert response.status_code == status, response.text
        message = response.json()["error"]["message"]
        assert message and "\n" not in message and "Traceback" not in message
        return message

    assert "pool nope not found" in error(http.post("/api/ask", json={"pool": "nope", "question": "q"}), 404)
    error(http.get("/api/pools/nope"), 404)
    error(http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "q"}]}), 404)
    error(http.get("/no/such/endpoint"), 404)
    error(http.post("/api/ask", content=b"{not json"), 400)
    error(http.post("/api/ask", json=["a", "list"]), 400)
    error(http.post("/api/ask", json={"pool": "ok", "question": 3}), 400)
    error(http.post("/api/ask", json={"pool": "../etc", "question": "q"}), 400)
    error(http.post("/api/ask", json={"pool": "ok", "question": "q", "max_new_tokens": 0}), 400)
    error(http.post("/api/ask", json={"pool": "ok", "question": "q", "temperature": "hot"}), 400)
    for body in ({"model": "ok", "messages": []}, {"model": "ok", "messages": [{"role": "robot", "content": "x"}]},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "top_p": 0},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "n": 2},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "stop": [1]},
                 {"model": "ok", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10**6}):
        error(http.post("/v1/chat/completions", json=body), 400)
    error(http.post("/api/ask", content=b"x" * (5 * 1024**2)), 413)
    error(http.post("/api/inject?pool=ok", content=b'{"path": "a.txt", "size": 100}\nshort'), 400)
    error(http.post("/api/inject?pool=ok", content=b"no header at all"), 400)
    error(http.post("/api/inject", content=b""), 400)
    # an error found after the stream started is its last line, one line
    with Client() as client, pytest.raises(ServerError, match="reads at most"):
        client.ask(AskRequest("ok", "word " * 500))
    assert http.get("/api/health").json()["ok"] is True
    assert served_answer(Client(), "ok", QUESTION)[0] == app.ask("ok", QUESTION).text
    http.close()
    assert "Traceback" not in server.log.read_text()
