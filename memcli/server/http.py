"""`memcli serve`'s native HTTP routes, and the plumbing every route shares (ASGI: Starlette).

Endpoints (JSON; streams are NDJSON, one object per line; the OpenAI routes: memcli.server.openai):

    GET  /api/health                 {"ok": true, "pid": …, "version": …}
    GET  /api/ps                     what is loaded, its memory and until when
    POST /api/stop                   stop the server (running work is cancelled; injects keep their commits)
    GET  /api/pools                  the pools (as `memcli pool ls --json`)
    GET  /api/pools/{name}           one pool (as `memcli pool info --json`)
    GET  /metrics                    Prometheus' text format (memcli.server.metrics)
    POST /api/ask                    `wire.AskRequest` -> {"event": "model", …} (the model it runs on,
                                     "loading" when its weights load for it), {"event": "text", "text": …}
                                     per piece, then `wire.Answer.event()` ({"event": "answer", …,
                                     "pool_version": N, "attribution" with "sources": true})
    POST /api/inject?`wire.InjectParams`
                                     body: `wire.UploadHeader` lines, each source's bytes after its
                                     line (the server only opens its own copies; the pool logs the
                                     names the client sent) -> {"event": "started", "inject": ID},
                                     {"event": "model", …}, progress (`wire.Event`), then
                                     `wire.InjectReport.end_event()` ({"done": true, "report": …})
    POST /api/inject/{ID}/stop       end that inject once the chunk it is making is committed (the
                                     client's first Ctrl-C): its stream ends with the usual report,
                                     "interrupted": true; 404 when no such inject runs

Every error is JSON, {"error": {"message": one line, "type": …}}, its status from the one error
taxonomy (`memcli.base.errors.describe`: 400 bad parameters, 404 unknown pool or path, 409 pool busy
or damaged, 413 body too large, 500 a bug: the message says so, the traceback goes to the log only
with MEMCLI_DEBUG=1); 401 for TCP without the bearer token. After a stream has started, an error is
its last line.

Every request is bounded before any work starts: JSON bodies of at most `JSON_LIMIT` bytes are
parsed by the bounded JSON parser (nesting at most `wire.MAX_REQUEST_DEPTH`, no
recursion: memcli.server.bodies), then checked field by field by the wire types (`memcli.wire`). A violation is a 400
(413 for the body's size) naming the field.

`model` (in /api/ask and /api/inject): over the Unix socket (only this user's processes reach it:
it is 0600 in a 0700 folder, and a connection whose peer runs as another user is closed) it is
whatever the client's `--model` names, a local folder included; over TCP it must be an alias, a hub
id in the server's Hugging Face cache or a model the server has loaded: anything else, a path
above all, is refused with a 400 before anything is opened.

Fairness (`memcli.server.queue.DeviceQueue`): the device is taken in slices of one decoded token,
one injected chunk, or one prompt (its fitting to the window and prefill): between two slices a
request gives the device to any other waiting one. `/api/health`, `/api/ps` and `/api/stop` never
wait for the device. A client that disconnects cancels its work at the next slice.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import traceback
from typing import Any, Callable, Iterator

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from memcli import __version__
from memcli.base.errors import Failure, NotFound, describe
from memcli.server.address import spool_dir
from memcli.server.bodies import check_pool_name, read_json
from memcli.server.metrics import Counting, Metrics
from memcli.server.queue import Cancelled, anonymous_client
from memcli.server.uploads import receive
from memcli.wire import AskRequest, BadRequest, InjectParams, ModelUse

log = logging.getLogger("memcli.server.http")


def failure(err: BaseException) -> Failure:
    """Any failure as the taxonomy describes it; a bug is logged on one line and named as one."""
    if isinstance(err, ClientDisconnect):
        err = BadRequest("the client disconnected before the request was complete")
    described = describe(err)
    if not described.bug:
        return described
    log.error(described.message)
    if os.environ.get("MEMCLI_DEBUG"):
        log.error("".join(traceback.format_exception(err)))
    return Failure(f"{described.message} (a bug in memcli; the server log has details with MEMCLI_DEBUG=1)",
                   described.exit_code, described.http_status, described.kind, bug=True)


def error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}


def json_error(err: BaseException) -> JSONResponse:
    described = failure(err)
    return JSONResponse(error_body(described.message, described.kind), status_code=described.http_status)


def stream_error(err: BaseException) -> dict:
    """An error as a stream's last line."""
    described = failure(err)
    return {"error": {"message": described.message, "type": described.kind, "status": described.http_status}}


# --------------------------------------------------------------------------- request parsing
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def over_tcp(request: Request) -> bool:
    """Whether the request came over TCP (uvicorn names no port for a Unix socket)."""
    server = request.scope.get("server")
    return bool(server) and server[1] is not None


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


async def _watch_disconnect(request: Request, job) -> None:
    """Cancel `job` if the client disconnects (its body was read: the next message is the disconnect)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancelled.set()
                return
    except Exception:  # noqa: BLE001 - the connection is gone one way or another: nothing to tell
        job.cancelled.set()


def ndjson(item: dict) -> bytes:
    return (json.dumps(item) + "\n").encode()


# --------------------------------------------------------------------------- the app
class Server:
    def __init__(self, resident, token: str | None = None):
        self.resident = resident
        self.token = token
        self.jobs: set = set()
        self.injects: dict[str, Any] = {}  # running injects by the id their stream's first line names
        self.workers: set[threading.Thread] = set()  # threads doing a request's work now
        self.uvicorn = None  # set by serve(): its should_exit ends the process
        self.started = time.time()
        self.spool = spool_dir()
        self.metrics = Metrics(resident)  # GET /metrics (memcli.server.metrics); the hooks below feed it
        resident.device.on_wait, resident.on_model_loaded = self.metrics.queue_waited, self.metrics.model_loaded

    # ------------------------------------------------------------------ plumbing
    def client_of(self, request: Request) -> str:
        named = request.headers.get("x-memcli-client")
        return f"client:{named[:64]}" if named else anonymous_client()

    def stream(self, request: Request, work: Callable[[Any, Callable[[dict], None]], None], encode: Callable[[dict], bytes],
               media_type: str, tail: bytes = b"", inject_id: str | None = None, kind: str = "",
               pool: str = "") -> StreamingResponse:
        """Run `work(job, emit)` with the device turn held, on its own thread, streaming what it emits.
        The client leaving sets the job's cancel flag: the work stops at its next token or chunk.
        An inject's stream first names it, at once (before its turn): `stop_inject` finds it by that."""
        job = self.resident.job(self.client_of(request), kind=kind, pool=pool)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        def emit(item: dict) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (the server is stopping): nobody to tell
                job.cancelled.set()

        def run() -> None:
            try:
                with job:
                    work(job, emit)
            except BaseException as err:  # noqa: BLE001 - everything is reported to the client, nothing escapes
                if not isinstance(err, Cancelled):
                    emit(stream_error(err))
                elif job.stopping:
                    emit({"error": {"message": "the server stopped before this request was complete",
                                    "type": "server_error", "status": 503}})
            finally:
                self.workers.discard(threading.current_thread())
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, end)
                except RuntimeError:
                    pass

        async def body() -> Iterator[bytes]:
            self.jobs.add(job)
            if inject_id is not None:
                self.injects[inject_id] = job
            thread = threading.Thread(target=run, name="memcli-request", daemon=True)
            self.workers.add(thread)
            thread.start()
            watcher = asyncio.create_task(_watch_disconnect(request, job))  # also while nothing is sent
            try:
                if inject_id is not None:
                    yield encode({"event": "started", "inject": inject_id})
                while True:
                    item = await queue.get()
                    if item is end:
                        break
                    yield encode(item)
                if tail:
                    yield tail
            finally:
                watcher.cancel()
                job.cancelled.set()  # after the end: harmless; on a disconnect: stops the work
                self.jobs.discard(job)
                if inject_id is not None:
                    self.injects.pop(inject_id, None)

        return StreamingResponse(body(), media_type=media_type)

    async def in_turn(self, request: Request, work: Callable[[], Any], kind: str = "", pool: str = "") -> Any:
        """Run `work()` on a thread with the device turn held and return its result; a client that
        disconnects while it waits for its turn gives the turn up."""
        job = self.resident.job(self.client_of(request), kind=kind, pool=pool)

        def run():
            with job:
                return work()

        self.jobs.add(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            return await asyncio.to_thread(run)
        finally:
            watcher.cancel()
            self.jobs.discard(job)

    async def complete(self, request: Request, work, kind: str = "", pool: str = "") -> JSONResponse:
        """A non-streaming request: run `work(job, emit)` with the device turn held; what it emitted
        last is the response (or its error). A client that disconnects cancels the work at its next
        slice."""
        job = self.resident.job(self.client_of(request), kind=kind, pool=pool)
        result: list[dict] = []

        def run() -> None:
            with job:
                work(job, result.append)

        self.jobs.add(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            await asyncio.to_thread(run)
        except Cancelled:
            return JSONResponse(error_body("the server is stopping" if job.stopping else "the client went away",
                                           "server_error"), status_code=503)
        except Exception as err:  # noqa: BLE001
            return json_error(err)
        finally:
            watcher.cancel()
            self.jobs.discard(job)
        return JSONResponse(result[-1])

    def library(self, settings=None):
        """The library facade for what reads manifests only (no model): names, listings, facts."""
        from memcli.app.api import Memcli

        return Memcli(settings or self.resident.settings, self.resident.store)

    def require_pool(self, name: str) -> None:
        """The one wording of a missing pool (as in-process): "pool X not found; did you mean Y?"."""
        self.library().require_pool(name)

    def use_model(self, name: str, emit: Callable[[dict], None]):
        """The resident model for a request (`Resident.use_model`), its use told first on the stream
        (`wire.ModelUse`: "loading" when its weights load for this request)."""
        loading: list[bool] = []

        def on_load(model: str, device: str) -> None:
            loading.append(True)
            emit(ModelUse(model, device, True).to_json())

        model = self.resident.use_model(name, on_load=on_load)
        if not loading:
            emit(ModelUse(name, model.device, False).to_json())
        return model

    def request_settings(self, request: Request, model: str | None, explicit: bool):
        """The server's settings with the client's model (what `memcli --model` / MEMCLI_MODEL / its
        config file named; `explicit` when named for this run). Over TCP the model must be one the
        server knows (`known_model`): a network client never names a path on the server's disk."""
        if model is not None and over_tcp(request):
            self.known_model(model)
        return self.resident.settings_for(model, explicit)

    def known_model(self, name: str) -> None:
        """BadRequest unless `name` is an alias, a bundled model, a model this server has loaded,
        or a hub id (org/name) already in its Hugging Face cache. Decided from the name, the loaded
        models and the cache's own layout: nothing the name points at is opened."""
        from memcli.loading.catalog import ALIASES, BUNDLED

        if name in ALIASES or name in BUNDLED or name in self.resident.loaded_models():
            return
        if _HUB_ID.fullmatch(name) and ".." not in name:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return
            raise BadRequest(f"model {_shown(name)} is not in this server's model cache; over TCP a request "
                             "names an alias, a downloaded hub id or a model the server has loaded")
        raise BadRequest(f"model {_shown(name)} is not a model this server knows; over TCP a request names an "
                         f"alias ({', '.join(sorted(ALIASES))}), a downloaded hub id or a model the server has "
                         "loaded, never a path on the server")

    # ------------------------------------------------------------------ native
    async def health(self, request: Request):
        return JSONResponse({"ok": True, "pid": os.getpid(), "version": __version__, "started": self.started})

    async def ps(self, request: Request):
        """What is loaded, and the device's turns ("device": slices taken, and per running and
        recently finished request its slices and the most slices others took while it waited)."""
        snapshot = self.resident.snapshot()
        snapshot.update(pid=os.getpid(), started=self.started, version=__version__)
        snapshot["device"] = self.resident.device_report()
        return JSONResponse(snapshot)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.stopping = True
            job.cancelled.set()

    async def stop(self, request: Request):
        self.cancel_all()
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
        return JSONResponse({"ok": True, "pid": os.getpid()})

    async def pools(self, request: Request):
        return JSONResponse(await asyncio.to_thread(lambda: self.library().list_pools()))

    async def pool_info(self, request: Request):
        name = request.path_params["name"]
        if not name:
            raise BadRequest("pool must name a pool")
        check_pool_name(name)
        self.require_pool(name)
        return JSONResponse(await self.in_turn(request, lambda: self.library().pool_info(name),
                                               kind="pool info", pool=name))

    async def ask(self, request: Request):
        """A question as `Memcli.ask` answers it (`memcli.app.asking`: the same prompt, turns of
        `history` within the window, the same decoding; with `sources`, the attribution computed
        here, where the pool is): NDJSON {"event": "text"} pieces, then the answer's event."""
        from memcli.app.answer_log import log_answer
        from memcli.app.asking import answer_from, answer_prompt

        ask = AskRequest.from_json(await read_json(request), check_pool=check_pool_name)
        settings = self.request_settings(request, ask.model, ask.model_explicit)
        self.require_pool(ask.pool)
        resident = self.resident

        def work(job, emit):
            model = self.use_model(resident.model_of(ask.pool, settings), emit)
            try:
                loaded = model.app.model(model.name)
                prompt = answer_prompt(loaded, ask.question, ask.history, ask.max_new_tokens)
                with job.holding(resident.reader_lock(model.name, ask.pool)):  # one answer per pool state at a time
                    pool = resident.loaded_pool(model, ask.pool)
                    answer = answer_from(loaded, pool, prompt, ask.question, sampling=ask.sampling,
                                         on_text=lambda text: emit({"event": "text", "text": text}),
                                         checkpoint=lambda: job.checkpoint("token"), sources=ask.sources)
                self.metrics.answered("/api/ask", answer)
                # logged before its last line goes out: a client that has the answer finds it in the log
                log_answer(answer, via=ask.via, sampling=ask.sampling, conversation=ask.conversation, turn=ask.turn)
                emit(answer.event())
            finally:
                resident.done_with(model)

        return self.stream(request, work, ndjson, "application/x-ndjson", kind="ask", pool=ask.pool)

    async def inject(self, request: Request):
        """An inject of the uploaded sources, under the names the client sent (`Memcli.ingest`)."""
        params = InjectParams.from_query(request.query_params, check_pool=check_pool_name)
        settings = self.request_settings(request, params.model, params.model_explicit)
        spooled = await receive(request, self.spool)

        def work(job, emit):
            try:
                self.ingest(job, emit, params, settings, spooled)
            finally:
                spooled.remove()

        try:
            return self.stream(request, work, ndjson, "application/x-ndjson", inject_id=secrets.token_hex(8),
                               kind="inject", pool=params.pool)
        except BaseException:
            spooled.remove()
            raise

    def ingest(self, job, emit, params: InjectParams, settings, spooled) -> None:
        from memcli.wire import InjectInterrupted

        resident = self.resident
        name = resident.model_of(params.pool, settings)  # a mismatched --model is refused before weights load
        model = self.use_model(name, emit)
        items, report, stdin = spooled.sources(params.pool)

        def on_event(event) -> None:
            emit(event.to_json())
            if event.kind in ("chunk", "commit", "file"):
                # other requests may run here; a client that left stops the inject
                job.checkpoint(f"file:{event.file_index}" if event.kind == "file" else event.kind)
                job.check_stop_requested()  # ... and one that asked to stop ends it with its report

        try:
            report = model.app.ingest(params.pool, items, report, model=name, chunk_tokens=params.chunk_tokens,
                                      force=params.force, stdin=stdin, on_event=on_event,
                                      take_loaded=lambda: resident.take_pool(name, params.pool, job))
        except InjectInterrupted as stop:
            report = stop.report
        finally:
            if stdin is not None:
                stdin.close()
            resident.done_with(model)
        self.metrics.injected(report)
        if not job.cancelled.is_set() or job.stopping:  # a client that left is told nothing
            emit(report.end_event())

    async def stop_inject(self, request: Request):
        """Ask a running inject to end at its next chunk boundary (the client's first Ctrl-C): it
        commits the chunk it made and its stream ends with the report of what was kept."""
        inject_id = request.path_params["id"]
        job = self.injects.get(inject_id)
        if job is None:
            raise NotFound(f"no inject {inject_id[:40]!r} is running (it finished, or never started)")
        job.stop_requested.set()
        return JSONResponse({"ok": True, "inject": inject_id})

    # ------------------------------------------------------------------ assembly
    def app(self) -> Counting:
        from memcli.server import openai

        def guarded(handler):
            async def endpoint(request: Request):
                try:
                    return await handler(request)
                except Cancelled:  # the server is stopping while this request waited for its turn
                    return JSONResponse(error_body("the server is stopping", "server_error"), status_code=503)
                except Exception as err:  # noqa: BLE001 - every failure becomes a JSON error
                    return json_error(err)

            return endpoint

        routes = [
            Route("/api/health", guarded(self.health), methods=["GET"]),
            Route("/api/ps", guarded(self.ps), methods=["GET"]),
            Route("/api/stop", guarded(self.stop), methods=["POST"]),
            Route("/api/pools", guarded(self.pools), methods=["GET"]),
            Route("/api/pools/{name:path}", guarded(self.pool_info), methods=["GET"]),
            Route("/api/ask", guarded(self.ask), methods=["POST"]),
            Route("/api/inject", guarded(self.inject), methods=["POST"]),
            Route("/api/inject/{id}/stop", guarded(self.stop_inject), methods=["POST"]),
            Route("/metrics", guarded(self.metrics.endpoint), methods=["GET"]),
        ] + [Route(path, guarded(handler), methods=methods) for path, handler, methods in openai.routes(self)]
        app = Starlette(routes=routes)

        async def not_found(request, exc):
            status = getattr(exc, "status_code", 404)
            message = "no such endpoint" if status == 404 else "method not allowed" if status == 405 else "bad request"
            return JSONResponse(error_body(f"{message}: {request.method} {request.url.path}", "not_found_error"),
                                status_code=status)

        app.add_exception_handler(404, not_found)
        app.add_exception_handler(405, not_found)
        return self.metrics.instrument(Guard(app, self.token), routes)  # counts what the guard refuses too


class Guard:
    """Outermost ASGI layer: the bearer token on TCP connections, and no exception ever escapes
    (uvicorn would log a traceback for it)."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tcp = bool(scope.get("server")) and scope["server"][1] is not None
        if tcp and self.token:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(header, b"Bearer " + self.token.encode()):
                response = JSONResponse(error_body("missing or wrong bearer token (MEMCLI_TOKEN)", "authentication_error"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        started = []

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:  # noqa: BLE001
            if not started:
                await json_error(err)(scope, receive, send)
