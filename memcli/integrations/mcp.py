"""`memcli mcp`: memcli as a Model Context Protocol server, for AI assistants and agents (Claude
Desktop, Claude Code, Cursor, ...), on the official `mcp` SDK (`MCPServer`).

Tools (each a tool error of one line when it fails; the server itself never ends on one):

    ask            pool, question -> the answer, the sources it read (ranked), the pool version
    remember       pool, text, source (default "mcp-note"), model (a new pool's; default: the
                   configured one) -> injects the text under that source name
    inject_files   pool, paths -> injects files and folders, only under the folders the user
                   allowed (`memcli config set mcp_allowed FOLDER`; none by default)
    list_pools     the pools (as `memcli pool ls --json`)
    pool_info      one pool's facts (as `memcli pool info --json`)

Resources: every pool is `memcli://pool/NAME` (its `pool_info` as JSON), listed by resources/list.

Everything goes through the one backend (`memcli.server.launch.open_backend(..., via="mcp")`): the
resident server when one runs (or is started, as a command would), else the library in this
process. Backend calls block, so each runs on a worker thread while the event loop keeps reading the
client; one at a time from this server (the in-process library runs one job at a time).

Long injects: each committed chunk is a progress notification (chunks so far; the message names the
file, k of n, its chunks and tokens). A cancelled request (notifications/cancelled) sets the inject's
`stop`: it ends after committing the chunk it is making, the pool at that commit (as a first Ctrl-C
does on the command line). The next tool call starts once it has ended.

stdout is the protocol's channel (stdio): notes (a stale server socket, a server that could not
start) go to stderr. No torch at import: the library loads it when a model runs.

`--http`: streamable HTTP on an owner-only Unix socket (`mcp.sock` in the server's runtime folder,
checked and created as `memcli serve`'s), and with --host/--port on TCP, as `memcli serve`'s: beyond
loopback only with MEMCLI_TOKEN set, and a TCP request without `Authorization: Bearer $MEMCLI_TOKEN`
is refused (401) when it is set.

Test hook: MEMCLI_TEST_PAUSE (`memcli.base.pause`): an inject, in this process or in a server, waits
at a boundary after its progress is sent, so a test cancels at a known chunk.
"""


import json
import os
import sys
import tempfile
import threading
from typing import Any, Callable

NAME = "memcli"
NOTE_NAME = "mcp-note"
POOL_URI = "memcli://pool/{name}"
SOCKET_NAME = "mcp.sock"
DEFAULT_PORT = 11436  # `memcli serve` is 11435


def say(line: str) -> None:
    """A note for the person running the server: stderr (stdout carries the protocol)."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def one_line_error(err: BaseException) -> str:
    """What a client sees of a failure: the taxonomy's one line (`describe`)."""
    from memcli.base.errors import describe
    from memcli.base.text import one_line

    return one_line(describe(err).message)


class Refused(Exception):
    """A request the server will not do (a path outside the allowed folders)."""


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


class Memory:
    """What the tools do, over one backend (opened on first use); every method blocks."""

    def __init__(self, settings, backend=None):
        self.settings = settings
        self._backend = backend
        self._opening = threading.Lock()
        self.turn = threading.Lock()  # one backend job at a time from this server

    def backend(self):
        with self._opening:
            if self._backend is None:
                from memcli.server.launch import open_backend

                self._backend = open_backend(self.settings, start=True, via="mcp", say=say)
            return self._backend

    def _take_turn(self, stop: threading.Event) -> None:
        self.turn.acquire()
        if stop.is_set():  # cancelled while it waited: nothing is started
            self.turn.release()
            from memcli.base.errors import Interrupted

            raise Interrupted("cancelled before it started")

    # ------------------------------------------------------------------ the tools' work
    def ask(self, pool: str, question: str, stop: threading.Event) -> dict:
        from memcli import wire

        wire.text(question, "question")
        self._take_turn(stop)
        try:
            answer = self.backend().ask(pool, question, sources=True)
        finally:
            self.turn.release()
        ranked = (answer.attribution or {}).get("sources") or []
        return {"answer": answer.text.strip(), "sources": [s["source"] for s in ranked],
                "pool": pool, "pool_version": answer.pool_version}

    def remember(self, pool: str, text: str, source: str, model: str | None, on_event, stop) -> dict:
        from memcli import wire
        from memcli.base.errors import UsageError
        from memcli.ingest.discover import Skipped, Source

        wire.text(text, "text")
        if not text.strip():
            raise UsageError("text is empty: give the note to remember")
        if not source.strip():
            raise UsageError("source must name the note (default mcp-note)")
        model = wire.model_name(model) if model else None
        with tempfile.TemporaryDirectory(prefix="memcli-mcp-") as folder:
            copy = os.path.join(folder, "note.txt")
            with open(copy, "w", encoding="utf-8") as f:
                f.write(text)
            found = Source.from_file(copy, name=source)
            if isinstance(found, Skipped):
                raise UsageError(f"cannot read the note: {found.reason}")
            return self._inject(pool, [found], model, on_event, stop)

    def allowed(self, paths: list[str]) -> list[str]:
        """`paths` as absolute paths when each is under a folder the user allowed; Refused (naming
        the path and the fix) otherwise."""
        folders = [os.path.realpath(folder) for folder in self.settings.mcp_allowed]
        if not folders:
            raise Refused("inject_files is off: no folder is allowed "
                          "(memcli config set mcp_allowed FOLDER allows the files under FOLDER)")
        checked = []
        for path in paths:
            if not isinstance(path, str) or not path or "\x00" in path:
                raise Refused(f"not a path: {path!r}")
            real = os.path.realpath(os.path.expanduser(path))
            if not any(_inside(real, folder) for folder in folders):
                raise Refused(f"{path} is outside the folders memcli mcp may read ({', '.join(folders)}; "
                              "memcli config set mcp_allowed changes them)")
            checked.append(real)
        return checked

    def inject_files(self, pool: str, paths: list[str], on_event, stop) -> dict:
        from memcli.app.backend import find

        found = find(self.allowed(paths))
        folders = [os.path.realpath(folder) for folder in self.settings.mcp_allowed]
        for item in found:  # a link inside an allowed folder may lead out of it: discovery follows links
            where = getattr(item, "path", None)
            if getattr(item, "kind", None) is not None and where and \
                    not any(_inside(os.path.realpath(where), folder) for folder in folders):
                raise Refused(f"{where} leads outside the folders memcli mcp may read "
                              f"(to {os.path.realpath(where)})")
        return self._inject(pool, found, None, on_event, stop)

    def _inject(self, pool: str, found: list, model: str | None, on_event, stop) -> dict:
        self._take_turn(stop)
        try:
            report = self.backend().inject(pool, found, model=model, on_event=on_event, stop=stop)
        finally:
            self.turn.release()
        data = report.to_json()
        skipped = report.skipped
        if skipped and len(skipped) == len(report.files):
            from memcli.base.errors import MemcliError

            raise MemcliError("nothing injected: " + "; ".join(f"{f.path}: {f.reason}" for f in skipped))
        return {"pool": pool, "chunks": data["chunks"], "tokens": data["tokens"],
                "files": [{k: f[k] for k in ("path", "status", "reason", "chunks", "tokens")} for f in data["files"]]}

    def list_pools(self) -> list[dict]:
        return self.backend().list_pools()

    def pool_info(self, pool: str) -> dict:
        return self.backend().pool_info(pool)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


# --------------------------------------------------------------------------- the MCP server
async def _in_thread(work: Callable[[], Any], stop: threading.Event):
    """`work()` on a worker thread. A cancelled request sets `stop` and waits (shielded) for the
    work to end: an inject ends after committing its current chunk."""
    import anyio

    finished = threading.Event()

    def run():
        try:
            return work()
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait)
        raise


def build(settings, memory: Memory | None = None):
    """The MCP server (an `mcp.server.mcpserver.MCPServer`) over `memory`'s backend."""
    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ResourceError, ToolError

    from memcli import __version__

    memory = memory or Memory(settings)

    class Server(MCPServer):
        async def list_resources(self):
            """The resources: every pool, `memcli://pool/NAME`."""
            listed = await super().list_resources()
            try:
                rows = await _in_thread(memory.list_pools, threading.Event())
            except Exception as err:  # noqa: BLE001 - a listing never fails the server
                say(f"memcli mcp: cannot list the pools: {one_line_error(err)}")
                rows = []
            from mcp.types import Resource

            for row in rows:
                if row.get("error"):
                    continue
                name = row.get("name") or row.get("pool")
                listed.append(Resource(uri=POOL_URI.format(name=name), name=f"pool {name}",
                                       description=f"memcli pool {name}: its facts (pool_info)",
                                       mime_type="application/json"))
            return listed

    server = Server(NAME, version=__version__, log_level="WARNING", instructions=(
        "memcli keeps a memory of documents in pools: ask answers from a pool, remember and inject_files add "
        "to one (a new pool is made on the first), list_pools and pool_info show them."))

    async def call(work: Callable[..., Any], *args, ctx: Context | None = None, stop: threading.Event | None = None):
        """`work(*args)` on a worker thread; every failure a one-line tool error."""
        stop = stop or threading.Event()
        try:
            return await _in_thread(lambda: work(*args), stop)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as err:  # noqa: BLE001 - every failure is the client's one line
            from memcli.base.text import one_line

            raise ToolError(one_line(err) if isinstance(err, Refused) else one_line_error(err)) from None

    def progress_of(ctx: Context, stop: threading.Event):
        """The inject's `on_event`: each chunk a progress notification (from the worker thread)."""
        count = [0]

        def on_event(event) -> None:
            if event.kind != "chunk":
                return
            count[0] += 1
            if not stop.is_set():
                message = (f"{event.path}: file {event.file_index} of {event.files_total}, "
                           f"{event.chunks} chunks, {event.tokens} tokens")
                try:
                    anyio.from_thread.run(ctx.report_progress, count[0], None, message)
                except Exception:  # noqa: BLE001 - a progress that cannot be sent never ends the inject
                    pass

        return on_event

    @server.tool()
    async def ask(pool: str, question: str, ctx: Context) -> dict:
        """Answer a question from a memcli pool's memory. Returns the answer, the sources (documents)
        the question read, most read first, and the pool version it was read from."""
        return await call(memory.ask, pool, question, threading.Event(), ctx=ctx)

    @server.tool()
    async def remember(pool: str, text: str, ctx: Context, source: str = NOTE_NAME,
                       model: str | None = None) -> dict:
        """Remember a note: inject `text` into the pool under the source name `source` (a new pool
        is made on `model`, by default the configured model). Reports progress per chunk; a
        cancelled call keeps what is committed."""
        stop = threading.Event()
        return await call(memory.remember, pool, text, source, model, progress_of(ctx, stop), stop, ctx=ctx,
                          stop=stop)

    @server.tool()
    async def inject_files(pool: str, paths: list[str], ctx: Context) -> dict:
        """Inject files and folders (text, Markdown, HTML, PDF, man pages) into the pool; only paths
        under the folders the user allowed (memcli config mcp_allowed) are read. Reports progress
        per chunk; a cancelled call keeps what is committed."""
        stop = threading.Event()
        return await call(memory.inject_files, pool, list(paths), progress_of(ctx, stop), stop, ctx=ctx, stop=stop)

    @server.tool()
    async def list_pools() -> list[dict]:
        """The memcli pools: name, model, version, sources, size."""
        return await call(memory.list_pools)

    @server.tool()
    async def pool_info(pool: str) -> dict:
        """One pool's facts: model, version, its sources (files) and how much of each is still in memory."""
        return await call(memory.pool_info, pool)

    @server.resource(POOL_URI, name="pool", description="A memcli pool's facts (pool_info) as JSON",
                     mime_type="application/json")
    async def pool_resource(name: str) -> str:
        try:
            info = await _in_thread(lambda: memory.pool_info(name), threading.Event())
        except Exception as err:  # noqa: BLE001
            raise ResourceError(one_line_error(err)) from None
        return json.dumps(info)

    server.memory = memory
    return server


def run_stdio(settings) -> int:
    """Serve over stdin/stdout until the client closes them."""
    import anyio

    server = build(settings)
    try:
        anyio.run(server.run_stdio_async)
    except KeyboardInterrupt:
        pass
    finally:
        server.memory.close()
    return 0


def run_http(settings, host: str | None = None, port: int | None = None) -> int:
    """Serve streamable HTTP (at /mcp) on the owner-only Unix socket `mcp.sock` of the server's
    runtime folder, and on TCP when `host` or `port` is given, by `memcli serve`'s rules."""
    import socket

    import uvicorn

    from memcli.server.address import TOKEN_ENV, AddressError, ensure_runtime_dir
    from memcli.server.http import Guard
    from memcli.server.process import bind_tcp_socket, bind_unix_socket, check_tcp, owner_only_protocol

    token = os.environ.get(TOKEN_ENV) or None
    tcp = check_tcp(host, port if port is not None else (DEFAULT_PORT if host else None), token)
    path = ensure_runtime_dir() / SOCKET_NAME
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        pass
    else:
        raise AddressError(f"a memcli mcp --http server already listens on {path}")
    finally:
        probe.close()
    sockets = [bind_unix_socket(path)]
    if tcp is not None:
        sockets.append(bind_tcp_socket(tcp))
    from mcp.server.transport_security import TransportSecuritySettings

    from memcli.server.address import is_loopback

    server = build(settings)
    if tcp is None or is_loopback(tcp[0]):
        # DNS rebinding: a web page must not reach a local server through a name of its own
        local = ("127.0.0.1", "localhost", "[::1]")
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[*local, *(f"{name}:*" for name in local)],
            allowed_origins=[f"http://{name}:*" for name in local] + [f"http://{name}" for name in local])
    else:  # beyond loopback only with the bearer token (check_tcp), which no such page has
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = server.streamable_http_app(host=tcp[0] if tcp else "127.0.0.1", transport_security=security)
    config = uvicorn.Config(Guard(app, token), lifespan="on", access_log=False, log_level="warning",
                            http=owner_only_protocol())
    where = str(path) + (f" and http://{tcp[0]}:{tcp[1]}/mcp" if tcp else "")
    say(f"memcli mcp listening on {where}")
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        server.memory.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return 0
