"""`memcli mcp` driven by the MCP SDK's own client over stdio (a subprocess, as a desktop client
starts it): the tools, a note remembered and answered on memcli-tiny, the allowed folders of
inject_files, and a cancelled inject that leaves the pool at its last commit.

Synchronised on events only: a progress notification received, the server's test pause
(MEMCLI_TEST_PAUSE) reached; never on time.
"""

from __future__ import annotations

import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from memcli.app import facts
from memcli.loading.checkpoints import BUNDLED

from mcp import ClientSession, StdioServerParameters, stdio_client

from .helpers import DEADLINE, subprocess_env, tiny_note
from .support import REPO

TINY = BUNDLED["memcli-tiny"]
pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="memcli-tiny not shipped")

NOTE = tiny_note()  # four held-out facts, one chunk
TOOLS = {"ask", "remember", "inject_files", "list_pools", "pool_info"}


def long_text(chunks: int) -> str:
    """Notes of other facts, `chunks` chunks of memcli-tiny's 20 tokens."""
    world = facts.FactWorld(seed=5, split="any")
    names = {f.name for f in NOTE}
    return "\n".join(facts.note_text(world.chunk(world.names(4, exclude=names))) for _ in range(chunks))


@asynccontextmanager
async def session(tmp_path: Path, log_name: str = "mcp", **env):
    """A `memcli mcp` subprocess on memcli-tiny (CPU) and an initialized ClientSession of it; its
    stderr goes to tmp_path/LOG_NAME.log, which must hold no traceback at the end."""
    log = tmp_path / f"{log_name}.log"
    params = StdioServerParameters(command=sys.executable, args=["-m", "memcli", "mcp"], cwd=str(REPO),
                                   env=subprocess_env(MEMCLI_MODEL="memcli-tiny", MEMCLI_DEVICE="cpu", **env))
    with open(log, "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as client:
                await client.initialize()
                yield client
    assert "Traceback" not in log.read_text(), log.read_text()


def result(reply) -> dict | list:
    """A tool's JSON result (its text content); the call must have succeeded."""
    assert not reply.is_error, reply.content
    return json.loads(reply.content[0].text)


def rows(reply) -> list:
    """A tool's list result (structured: {"result": [...]})."""
    assert not reply.is_error, reply.content
    return reply.structured_content["result"]


def error(reply) -> str:
    """A tool error's one line."""
    assert reply.is_error, reply.content
    [content] = reply.content
    assert "\n" not in content.text and "Traceback" not in content.text
    return content.text


def drive(work) -> None:
    async def main():
        with anyio.fail_after(DEADLINE):  # a failure's bound (helpers.wait_for's), never reached by a passing run
            await work()

    anyio.run(main)


def test_tools_remember_and_ask(tmp_path):
    async def work():
        async with session(tmp_path) as client:
            listed = await client.list_tools()
            assert {tool.name for tool in listed.tools} == TOOLS
            assert rows(await client.call_tool("list_pools", {})) == []
            progress = []

            async def on_progress(done, total, message):
                progress.append((done, message))

            reply = result(await client.call_tool("remember", {"pool": "notes", "text": facts.note_text(NOTE)},
                                                  progress_callback=on_progress))
            assert reply["files"] == [{"path": "mcp-note", "status": "injected", "reason": "", "chunks": 1,
                                       "tokens": 20}]
            assert progress and progress[-1][0] == 1 and "mcp-note" in progress[-1][1]
            for fact in NOTE:
                answer = result(await client.call_tool("ask", {"pool": "notes", "question": fact.question}))
                assert facts.exact_hit(fact.value, answer["answer"]), (fact, answer)
                assert answer["sources"] == ["mcp-note"]
            info = result(await client.call_tool("pool_info", {"pool": "notes"}))
            assert info["model"] == "memcli-tiny" and info["sources"] == 1
            assert [row["name"] for row in rows(await client.call_tool("list_pools", {}))] == ["notes"]
            # pools as resources
            resources = await client.list_resources()
            assert [str(r.uri) for r in resources.resources] == ["memcli://pool/notes"]
            read = await client.read_resource("memcli://pool/notes")
            assert json.loads(read.contents[0].text) == info
            # failures are one-line tool errors, and the server goes on
            assert "pool nope not found" in error(await client.call_tool("ask", {"pool": "nope", "question": "x"}))
            assert "text is empty" in error(await client.call_tool("remember", {"pool": "notes", "text": " "}))
            assert "invalid pool name '../x'" in error(await client.call_tool("pool_info", {"pool": "../x"}))
            assert result(await client.call_tool("pool_info", {"pool": "notes"}))["sources"] == 1

    drive(work)
    # every answer is in the log of answers, through MCP, with its sources
    from memcli.app import answer_log

    logged = answer_log.entries(pool="notes", limit=None)
    assert sorted(row["question"] for row in logged) == sorted(fact.question for fact in NOTE)
    assert {row["via"] for row in logged} == {"mcp"} and all(row["model"] == "memcli-tiny" for row in logged)
    assert all(row["sources"] for row in logged)


def test_inject_files_reads_only_allowed_folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "facts.txt").write_text(facts.note_text(NOTE))
    (outside / "secret.txt").write_text("the secret is out of bounds")
    (allowed / "link.txt").symlink_to(outside / "secret.txt")

    async def work():
        async with session(tmp_path, "off") as client:  # nothing allowed by default
            assert "inject_files is off" in error(await client.call_tool(
                "inject_files", {"pool": "p", "paths": [str(allowed / "facts.txt")]}))
        async with session(tmp_path, MEMCLI_MCP_ALLOWED=str(allowed)) as client:
            refused = error(await client.call_tool("inject_files", {"pool": "p", "paths": [str(outside / "secret.txt")]}))
            assert "secret.txt is outside the folders memcli mcp may read" in refused
            assert str(allowed) in refused
            dotted = error(await client.call_tool("inject_files", {"pool": "p", "paths": [f"{allowed}/../outside"]}))
            assert "outside the folders" in dotted
            linked = error(await client.call_tool("inject_files", {"pool": "p", "paths": [str(allowed)]}))
            assert "link.txt leads outside the folders" in linked
            assert "pool p not found" in error(await client.call_tool("pool_info", {"pool": "p"}))  # nothing read
            (allowed / "link.txt").unlink()
            reply = result(await client.call_tool("inject_files", {"pool": "p", "paths": [str(allowed)]}))
            assert [(f["path"], f["status"]) for f in reply["files"]] == [(str(allowed / "facts.txt"), "injected")]
            answer = result(await client.call_tool("ask", {"pool": "p", "question": NOTE[0].question}))
            assert facts.exact_hit(NOTE[0].value, answer["answer"])

    drive(work)


def test_a_cancelled_inject_leaves_the_pool_at_its_last_commit(tmp_path):
    pause = tmp_path / "pause"
    text = long_text(6)

    async def work():
        async with session(tmp_path, MEMCLI_TEST_PAUSE=str(pause)) as client:
            result(await client.call_tool("remember", {"pool": "p", "text": facts.note_text(NOTE)}))
            before = result(await client.call_tool("pool_info", {"pool": "p"}))
            pause.write_text("chunk")  # from now on an inject waits after its chunk's progress
            first_chunk = anyio.Event()

            async def on_progress(done, total, message):
                first_chunk.set()

            async with anyio.create_task_group() as tasks:
                async def long_remember():
                    await client.call_tool("remember", {"pool": "p", "text": text, "source": "long"},
                                           progress_callback=on_progress)
                    raise AssertionError("the cancelled call returned")

                tasks.start_soon(long_remember)
                await first_chunk.wait()  # the server sent chunk 1's progress and waits at the pause
                assert Path(str(pause) + ".reached").exists()
                tasks.cancel_scope.cancel()  # the client's notifications/cancelled
            # the next call runs once the cancelled inject has ended
            answer = result(await client.call_tool("ask", {"pool": "p", "question": NOTE[1].question}))
            assert facts.exact_hit(NOTE[1].value, answer["answer"])
            after = result(await client.call_tool("pool_info", {"pool": "p"}))
            # the commit of the chunk it was making, and nothing after: the long note is partial
            assert after["version"] == before["version"] + 1
            assert after["sources"] == 2 and after["chunks"] == before["chunks"] + 1
            assert after["files"][0] == before["files"][0]
            long = after["files"][1]
            assert (long["path"], long["chunks"], long["complete"]) == ("long", 1, False)
            # the same note again resumes after that commit
            pause.unlink()
            again = result(await client.call_tool("remember", {"pool": "p", "text": text, "source": "long"}))
            assert again["files"][0]["status"] == "resumed"
            assert again["chunks"] == 5

    drive(work)


def test_through_a_running_server(tmp_path, served):
    """With a memcli server running, the tools go through it: the server holds the pool loaded."""
    from .helpers import loaded_pools

    async def work():
        async with session(tmp_path) as client:
            result(await client.call_tool("remember", {"pool": "p", "text": facts.note_text(NOTE)}))
            for fact in NOTE:
                answer = result(await client.call_tool("ask", {"pool": "p", "question": fact.question}))
                assert facts.exact_hit(fact.value, answer["answer"]), (fact, answer)
            assert "pool nope not found" in error(await client.call_tool("ask", {"pool": "nope", "question": "x"}))

    drive(work)
    assert "p" in loaded_pools().get("memcli-tiny", [])


def test_a_cancelled_inject_through_a_server_keeps_its_commits(tmp_path, paused_server, monkeypatch):
    """Cancelling inject_files through a running server: the server is asked to stop (it waits
    before the second file, a test-only pause) and the pool keeps the first file, whole."""
    from .helpers import wait_for

    monkeypatch.delenv("MEMCLI_SERVER")  # the tools go through the paused server
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = [facts.note_text(NOTE), long_text(2), long_text(3)]
    for i, text in enumerate(texts):
        (folder / f"f{i}.txt").write_text(text)
    pause = paused_server.pause

    async def work():
        async with session(tmp_path, MEMCLI_MCP_ALLOWED=str(folder)) as client:
            progress = []

            async def on_progress(done, total, message):
                progress.append(message)

            pause.write_text("file:2")  # after the first file is committed
            async with anyio.create_task_group() as tasks:
                async def inject():
                    await client.call_tool("inject_files", {"pool": "p", "paths": [str(folder)]},
                                           progress_callback=on_progress)
                    raise AssertionError("the cancelled call returned")

                tasks.start_soon(inject)
                await anyio.to_thread.run_sync(wait_for, lambda: Path(str(pause) + ".reached").exists(),
                                               "the second file")
                tasks.cancel_scope.cancel()
            answer = result(await client.call_tool("ask", {"pool": "p", "question": NOTE[2].question}))
            assert facts.exact_hit(NOTE[2].value, answer["answer"])
            info = result(await client.call_tool("pool_info", {"pool": "p"}))
            assert [(f["path"], f["complete"]) for f in info["files"]] == [(str(folder / "f0.txt"), True)]
            assert info["chunks"] == 1
            assert progress and "f0.txt: file 1 of 3" in progress[0]

    try:
        drive(work)
    finally:
        pause.unlink(missing_ok=True)


def test_http_on_the_owner_only_socket_and_tcp_with_the_token(tmp_path):
    """`memcli mcp --http`: streamable HTTP on mcp.sock in the owner-only runtime folder, and on
    127.0.0.1 where, with MEMCLI_TOKEN set, a request without the bearer token is refused (401)."""
    import socket
    import subprocess

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    from memcli.server.address import runtime_dir

    from .helpers import wait_for

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log = tmp_path / "http.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "memcli", "mcp", "--http", "--port", str(port)],
                                  stdout=out, stderr=out, cwd=str(REPO), env=subprocess_env(MEMCLI_TOKEN="sekrit"))
    sock = runtime_dir() / "mcp.sock"
    try:
        wait_for(lambda: "listening on" in log.read_text() or server.poll() is not None, "memcli mcp --http")
        assert server.poll() is None, log.read_text()
        assert oct(sock.stat().st_mode & 0o777) == "0o600" and oct(sock.parent.stat().st_mode & 0o777) == "0o700"
        refused = httpx2.post(f"http://127.0.0.1:{port}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert refused.status_code == 401

        async def tools(client, url):
            async with client, streamable_http_client(url, http_client=client) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return {tool.name for tool in (await session.list_tools()).tools}

        async def work():
            bearer = httpx2.AsyncClient(headers={"Authorization": "Bearer sekrit"})
            assert await tools(bearer, f"http://127.0.0.1:{port}/mcp") == TOOLS
            unix = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=str(sock)))
            assert await tools(unix, "http://localhost/mcp") == TOOLS

        drive(work)
    finally:
        server.terminate()
        server.wait(DEADLINE)
    assert "Traceback" not in log.read_text()
    assert not sock.exists()


def test_http_beyond_loopback_needs_a_token():
    from .helpers import assert_one_error, run

    assert_one_error(run("mcp", "--http", "--host", "0.0.0.0"), "refusing to listen on 0.0.0.0",
                     "without a bearer token")
    assert_one_error(run("mcp", "--port", "9"), "--host and --port need --http", code=2)
