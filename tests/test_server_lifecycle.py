"""A server's life: keep-alive (models unloaded once idle, or kept), a server started by a command
stops when idle, `server = false` keeps commands in their own process, `memcli ps` and `stop`."""

from __future__ import annotations

import json

import pytest

from memcli.app.settings import load_settings, parse_keep_alive
from memcli.server import address as server_address
from memcli.server.client import Client

from .helpers import DEADLINE, QUESTION, TEXTS, env_for_server, local, make_pool, run_cli, served_answer, start_server, streamed, wait_for


# --------------------------------------------------------------------------- keep-alive
def test_keep_alive_expiry_unloads_the_model(ck, tmp_path):
    app = local(ck)
    make_pool(app, tmp_path, "ka", TEXTS[:1])
    running = start_server(tmp_path, "--keep-alive", "2s")
    try:
        with Client() as client:
            served_answer(client, "ka", QUESTION)
            ps = client.ps()
            assert ps["keep_alive_seconds"] == 2.0
            # loaded after the request (unless already expired), then unloaded: wait for the unload
            wait_for(lambda: client.ps()["unloads"] == 1 and client.ps()["models"] == [], "the model to unload")
            served_answer(client, "ka", QUESTION)  # loads again on demand
            wait_for(lambda: client.ps()["unloads"] == 2, "the second unload")
    finally:
        running.stop()


def test_keep_alive_zero_unloads_after_each_request_and_forever_keeps(ck, tmp_path, monkeypatch):
    app = local(ck)
    make_pool(app, tmp_path, "z", TEXTS[:1])
    monkeypatch.setenv("MEMCLI_KEEP_ALIVE", "0")  # the environment sets it when --keep-alive is not given
    running = start_server(tmp_path, env=env_for_server())
    try:
        with Client() as client:
            assert client.ps()["keep_alive_seconds"] == 0
            served_answer(client, "z", QUESTION)
            wait_for(lambda: client.ps()["models"] == [] and client.ps()["unloads"] == 1, "the unload")
    finally:
        running.stop()
    assert parse_keep_alive("-1") is None
    assert parse_keep_alive("5m") == 300 and parse_keep_alive(0) == 0
    with pytest.raises(ValueError):
        parse_keep_alive("soon")


def test_a_server_started_by_a_command_stops_when_idle(ck, tmp_path):
    app = local(ck)
    make_pool(app, tmp_path, "idle", TEXTS[:1])
    running = start_server(tmp_path, "--keep-alive", "1s", "--exit-when-idle")
    try:
        with Client() as client:
            served_answer(client, "idle", QUESTION)
        assert running.proc.wait(DEADLINE) == 0  # unloaded after 1 s, then stopped after 1 s idle
        assert not server_address.socket_path().exists()
    finally:
        running.stop()


def test_config_server_false_runs_in_process(ck, tmp_path, monkeypatch):
    from memcli.base import paths

    app = local(ck)
    make_pool(app, tmp_path, "inproc", TEXTS[:1])
    paths.config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.config_file().write_text('server = false\nkeep_alive = 600\n')
    assert load_settings().server is False and load_settings().keep_alive == "600"
    monkeypatch.delenv("MEMCLI_SERVER")
    result = run_cli("ask", QUESTION, "--pool", "inproc")
    assert result.exit_code == 0 and result.stdout == streamed(app, "inproc", QUESTION) + "\n"
    assert not server_address.socket_path().exists() and not server_address.lock_held()


def test_ps_and_stop_commands(ck, tmp_path, server, monkeypatch):
    app = local(ck)
    make_pool(app, tmp_path, "shown", TEXTS[:1])
    served_answer(server.client, "shown", QUESTION)
    monkeypatch.delenv("MEMCLI_SERVER")
    ps = json.loads(run_cli("ps", "--json").stdout)
    assert ps["running"] and ps["models"][0]["model"] == ck and ps["models"][0]["forever"]
    assert [p["pool"] for p in ps["models"][0]["pools"]] == ["shown"] and ps["models"][0]["pool_bytes"] > 0
    assert ps["models"][0]["weights_bytes"] > 0
    human = run_cli("ps")
    assert human.exit_code == 0 and "shown (v" in human.stdout and "forever" in human.stdout
    result = run_cli("stop")
    assert result.exit_code == 0 and "stopped the memcli server" in result.stderr
    server.proc.wait(DEADLINE)
    assert not server_address.socket_path().exists()
    assert "no memcli server is running" in run_cli("ps").stderr
