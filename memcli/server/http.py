"""`memcli serve`: one resident process that keeps models and pools loaded (ASGI: Starlette + uvicorn).

Endpoints (JSON; streams are NDJSON, one object per line, or SSE for the OpenAI ones):

    GET  /api/health                 {"ok": true, "pid": …, "version": …}
    GET  /api/ps                     what is loaded, its memory and until when
    POST /api/stop                   stop the server (running work is cancelled; injects keep their commits)
    GET  /api/pools                  the pools (as `memcli pool ls --json`)
    GET  /api/pools/{name}           one pool (as `memcli pool info --json`)
    POST /api/ask                    {"pool", "question", "history": [[q, a], ...], "max_new_tokens",
                                     "temperature", "top_p", "seed", "model", "model_explicit"}
                                     -> `memcli ask --json`'s events: {"event": "text", "text": …} per
                                     piece, then {"event": "answer", "pool": …, "question": …, …, "pool_version": N}
    POST /api/inject?pool=P[&model=M&model_explicit=1&chunk_tokens=N&force=1&type=T&encoding=E]
                                     body: per file a JSON header line {"path": NAME, "size": N}
                                     (or {"path": "-", "size": N} for stdin) then N bytes; the server
                                     only opens its own copies. -> {"event": "started", "inject": ID},
                                     progress events ({"event": kind, api.Event's fields}), then
                                     {"done": true, "interrupted": bool, "report": …}
    POST /api/inject/{ID}/stop       end that inject once the chunk it is making is committed (the
                                     client's first Ctrl-C): its stream ends with the usual report,
                                     "interrupted": true; 404 when no such inject runs
    GET  /v1/models                  OpenAI: one model per pool (GET /v1/models/{pool}: one)
    POST /v1/chat/completions        OpenAI: "model" names the pool; SSE when "stream": true

Every error is JSON, {"error": {"message": one line, "type": …}}, with 400 (bad parameters),
401 (TCP without the bearer token), 404 (unknown pool or path), 409 (pool busy or damaged),
413 (body too large) or 500 (a bug: the message says so, the traceback goes to the log only with
MEMCLI_DEBUG=1). After a stream has started, an error is its last line.

Every request is bounded before any work starts: JSON bodies of at most `JSON_LIMIT` bytes are
parsed by memcli's bounded parser (`memcli.base.jsonbound.load_json`: nesting at most
`MAX_REQUEST_DEPTH`, no recursion), then each field is checked: strings of at most `MAX_TEXT`
characters, at most `MAX_TURNS` history turns and `MAX_MESSAGES` messages, finite numbers in range
(`memcli.app.sampling`), at most `MAX_STOP_STRINGS` stop strings of `MAX_STOP_CHARS` characters. A
violation is a 400 (413 for the body's size) naming the field.

`model` (in /api/ask and /api/inject): over the Unix socket (only this user's processes reach it:
it is 0600 in a 0700 folder, and a connection whose peer runs as another user is closed) it is
whatever the client's `--model` names, a local folder included; over TCP it must be an alias, a hub
id in the server's Hugging Face cache or a model the server has loaded: anything else, a path
above all, is refused with a 400 before anything is opened.

Fairness (`memcli.server.resident.DeviceQueue`): the device is taken in slices of one decoded token, one
injected chunk, or one prompt (its fitting to the window and prefill): between two slices a
request gives the device to any other waiting one. `/api/health`, `/api/ps` and `/api/stop` never
wait for the device. A client that disconnects cancels its work at the next slice.

Test hook: with MEMCLI_TEST_PAUSE=FILE, work waits at a slice boundary while FILE exists (holding
the device; it creates FILE.reached first, and a stop or cancel ends the wait); FILE may name the
boundary: token, chunk, commit, file or file:N (the Nth file of an inject).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from memcli import __version__
from memcli.base.errors import MemcliError
from memcli.server.address import AddressError, ensure_runtime_dir, info_path, is_loopback, lock_path, socket_path, spool_dir

JSON_LIMIT = 4 * 1024**2  # request bodies other than inject uploads
UPLOAD_LIMIT = int(os.environ.get("MEMCLI_SERVER_MAX_UPLOAD", 4 * 1024**3))  # one inject request
MAX_REQUEST_DEPTH = 16  # JSON nesting of a request body (ours need 4)
MAX_TEXT = 256 * 1024  # characters of one question, answer or message
MAX_TURNS = 100_000  # history turns of one /api/ask
MAX_MESSAGES = 100_000  # messages of one /v1/chat/completions
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_NEW_TOKENS = 1 << 20  # any answer longer than the window is refused later with the window's size
MAX_CHUNK_TOKENS = 1 << 20
MAX_MODEL_NAME = 512

log = logging.getLogger("memcli.server.http")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, " ".join(str(message).split()), kind


def _error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}


def classify(err: BaseException) -> ApiError:
    """Any failure as (status, one-line message); a bug is logged on one line and named as one."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ClientDisconnect):
        return ApiError(400, "the client disconnected before the request was complete")
    if isinstance(err, MemcliError):  # the store's, the settings', the library's: each kind its status
        return ApiError(err.http_status, str(err), err.kind)
    if isinstance(err, ValueError):
        return ApiError(400, str(err) or type(err).__name__)
    if isinstance(err, OSError):  # worded as the command line words it in-process
        what = err.strerror or type(err).__name__
        return ApiError(500, f"{err.filename}: {what}" if err.filename else f"server: {what}", "server_error")
    detail = f"unexpected {type(err).__name__}" + (f": {err}" if str(err) else "")
    log.error(" ".join(detail.split()))
    if os.environ.get("MEMCLI_DEBUG"):
        log.error("".join(traceback.format_exception(err)))
    return ApiError(500, f"{detail} (a bug in memcli; the server log has details with MEMCLI_DEBUG=1)", "server_error")


def _json_error(err: BaseException) -> JSONResponse:
    api = classify(err)
    return JSONResponse(_error_body(api.message, api.kind), status_code=api.status)


# --------------------------------------------------------------------------- request parsing
async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit}")
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    return bytes(body)


async def read_json(request: Request) -> dict:
    """The request's JSON object, read within `JSON_LIMIT` bytes and parsed by the bounded parser
    (on a worker thread: a 4 MB body never holds up the event loop)."""
    from memcli.base.jsonbound import JsonRefused, load_json

    body = await read_body(request, JSON_LIMIT)
    try:
        data = await asyncio.to_thread(load_json, body, MAX_REQUEST_DEPTH, True)
    except JsonRefused as err:
        raise ApiError(400, f"{err.key if err.key else 'the request body'} {err.reason}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _number(data: dict, key: str, kind: type, default=None, low=None, high=None, low_open=False):
    from memcli.app.sampling import SamplingError, finite_number

    value = data.get(key, default)
    if value is None:
        return default
    if kind is float:
        try:
            return finite_number(key, value, low if low is not None else float("-inf"),
                                 high if high is not None else float("inf"), low_open)
        except SamplingError as err:
            raise ApiError(400, str(err)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer, not {_shown(value)}")
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"{key} must be {'>' if low_open else '>='} {low}, not {_shown(value)}")
    if high is not None and value > high:
        raise ApiError(400, f"{key} must be <= {high}, not {_shown(value)}")
    return value


def _text(value: object, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{what} must be a string")
    if len(value) > limit:
        raise ApiError(400, f"{what} is {len(value)} characters; at most {limit} are accepted")
    return value


def _pool_name(value: object, what: str = "pool") -> str:
    from memcli.store import validate_name

    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{what} must name a pool")
    validate_name(value)  # InvalidPoolName -> 400
    return value


def _sampling(data: dict, temperature_high: float = 2.0):
    """Temperature, top_p and seed, checked by `memcli.app.sampling` (finite, in range; a positive
    temperature below 0.01 decodes greedily, as on the command line)."""
    from memcli.core.engine import Sampling
    from memcli.app.sampling import SamplingError, check_sampling

    defaults = {"temperature": 0.0, "top_p": 1.0}
    values = [data.get(key) if data.get(key) is not None else defaults.get(key) for key in ("temperature", "top_p", "seed")]
    try:
        temperature, top_p, seed = check_sampling(*values, max_temperature=temperature_high)
    except SamplingError as err:
        raise ApiError(400, str(err)) from None
    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _over_tcp(request: Request) -> bool:
    """Whether the request came over TCP (uvicorn names no port for a Unix socket)."""
    server = request.scope.get("server")
    return bool(server) and server[1] is not None


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

    # ------------------------------------------------------------------ plumbing
    def client_of(self, request: Request) -> str:
        from memcli.server.resident import anonymous_client

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
                from memcli.server.resident import Cancelled

                if not isinstance(err, Cancelled):
                    api = classify(err)
                    emit({"error": {"message": api.message, "type": api.kind, "status": api.status}})
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

    def require_pool(self, name: str) -> None:
        """The one wording of a missing pool (as in-process): "pool X not found; did you mean Y?"."""
        from memcli.app.api import Memcli

        Memcli(self.resident.settings, self.resident.store).require_pool(name)

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
        from memcli.app.api import Memcli

        rows = await asyncio.to_thread(lambda: Memcli(self.resident.settings, self.resident.store).list_pools())
        return JSONResponse(rows)

    async def pool_info(self, request: Request):
        from memcli.app.api import Memcli

        name = _pool_name(request.path_params["name"])
        self.require_pool(name)
        return JSONResponse(await self.in_turn(request, lambda: Memcli(self.resident.settings, self.resident.store).pool_info(name),
                                               kind="pool info", pool=name))

    def request_settings(self, request: Request, model: object, explicit: object):
        """The server's settings with the client's model (what `memcli --model` / MEMCLI_MODEL / its
        config file named; `explicit` when named for this run). Over TCP the model must be one the
        server knows (`known_model`): a network client never names a path on the server's disk."""
        if model is not None and (not isinstance(model, str) or not model):
            raise ApiError(400, "model must be a non-empty string")
        if model is not None and (len(model) > MAX_MODEL_NAME or "\x00" in model):
            raise ApiError(400, f"model must be a name of at most {MAX_MODEL_NAME} characters")
        if model is not None and _over_tcp(request):
            self.known_model(model)
        return self.resident.settings_for(model, explicit in (True, "1", "true", "yes"))

    def known_model(self, name: str) -> None:
        """ApiError 400 unless `name` is an alias, a bundled model, a model this server has loaded,
        or a hub id (org/name) already in its Hugging Face cache. Decided from the name, the loaded
        models and the cache's own layout: nothing the name points at is opened."""
        from memcli.loading.catalog import ALIASES, BUNDLED

        if name in ALIASES or name in BUNDLED or name in self.resident.loaded_models():
            return
        if _HUB_ID.fullmatch(name) and ".." not in name:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return
            raise ApiError(400, f"model {_shown(name)} is not in this server's model cache; over TCP a request "
                                "names an alias, a downloaded hub id or a model the server has loaded")
        raise ApiError(400, f"model {_shown(name)} is not a model this server knows; over TCP a request names an "
                            f"alias ({', '.join(sorted(ALIASES))}), a downloaded hub id or a model the server has "
                            "loaded, never a path on the server")

    async def ask(self, request: Request):
        """A question as `Memcli.ask` answers it (the same prompt, turns of `history` within the
        window, the same decoding): NDJSON {"event": "text"} pieces, then {"event": "answer"}."""
        from memcli.app.api import answer_prompt, decode_answer

        from memcli.app.sampling import MAX_TEMPERATURE

        data = await read_json(request)
        question = _text(data.get("question"), "question")
        if not question.strip():
            raise ApiError(400, "the question is empty")
        pool = _pool_name(data.get("pool"))
        history = await asyncio.to_thread(_history, data.get("history"))
        max_new = _number(data, "max_new_tokens", int, None, 1, MAX_NEW_TOKENS)
        sampling = _sampling(data, temperature_high=MAX_TEMPERATURE)
        settings = self.request_settings(request, data.get("model"), data.get("model_explicit"))
        self.require_pool(pool)
        resident = self.resident

        def work(job, emit):
            model = resident.use_model(resident.model_of(pool, settings))
            try:
                loaded = model.app.model(model.name)
                ids, budget, turns = answer_prompt(loaded, question, history, max_new)
                with job.holding(resident.reader_lock(model.name, pool)):  # one answer per pool state at a time
                    state = resident.pool_state(model, pool)
                    answer = decode_answer(loaded, state.state, ids, budget, sampling=sampling,
                                           on_text=lambda text: emit({"event": "text", "text": text}),
                                           checkpoint=lambda: job.checkpoint("token"), turns_in_prompt=turns,
                                           question=question)
                emit({"event": "answer", "pool": pool, "question": question, **answer.to_json(), "pool_version": state.version})
            finally:
                resident.done_with(model)

        return self.stream(request, work, _ndjson, "application/x-ndjson", kind="ask", pool=pool)

    async def inject(self, request: Request):
        query = request.query_params
        pool = _pool_name(query.get("pool"))
        settings = self.request_settings(request, query.get("model") or None, query.get("model_explicit"))
        type_ = _text(query.get("type", ""), "type", 64) or None
        encoding = _text(query.get("encoding", ""), "encoding", 64) or None
        force = query.get("force", "") in ("1", "true", "yes")
        chunk_tokens = None
        if query.get("chunk_tokens"):
            text = query["chunk_tokens"]
            if len(text) > 12 or not text.lstrip("-").isdigit():
                raise ApiError(400, f"chunk_tokens must be an integer, not {text[:40]!r}")
            chunk_tokens = int(text)
            if chunk_tokens > MAX_CHUNK_TOKENS:
                raise ApiError(400, f"chunk_tokens must be <= {MAX_CHUNK_TOKENS}, not {chunk_tokens}")
        folder = await self.receive_files(request)

        def work(job, emit):
            try:
                self.inject_files(job, emit, pool, settings, chunk_tokens, force, folder, type_, encoding)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        try:
            return self.stream(request, work, _ndjson, "application/x-ndjson", inject_id=secrets.token_hex(8),
                               kind="inject", pool=pool)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def stop_inject(self, request: Request):
        """Ask a running inject to end at its next chunk boundary (the client's first Ctrl-C): it
        commits the chunk it made and its stream ends with the report of what was kept."""
        inject_id = request.path_params["id"]
        job = self.injects.get(inject_id)
        if job is None:
            raise ApiError(404, f"no inject {inject_id[:40]!r} is running (it finished, or never started)",
                           "not_found_error")
        job.stop_requested.set()
        return JSONResponse({"ok": True, "inject": inject_id})

    async def receive_files(self, request: Request) -> Path:
        """Spool the uploaded files into a private folder: [(their name, our copy)] in manifest.json."""
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.spool, 0o700)  # the uploads are somebody's documents
        folder = Path(self.spool) / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        entries: list[dict] = []
        total = 0
        buffer = bytearray()
        current = None  # (file object, bytes still to come)
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > UPLOAD_LIMIT:
                raise ApiError(413, f"the upload is {int(length)} bytes; the limit is {UPLOAD_LIMIT}")
            async for piece in request.stream():
                total += len(piece)
                if total > UPLOAD_LIMIT:
                    raise ApiError(413, f"the upload is over the limit of {UPLOAD_LIMIT} bytes")
                buffer += piece
                while buffer:
                    if current is None:
                        newline = buffer.find(b"\n")
                        if newline < 0:
                            if len(buffer) > 65536:
                                raise ApiError(400, "an upload's file header is not one JSON line")
                            break
                        header = _upload_header(bytes(buffer[:newline]), entries)
                        del buffer[:newline + 1]
                        copy = folder / str(len(entries)) / header["name"]
                        copy.parent.mkdir(mode=0o700)
                        entries.append({"path": header["path"], "copy": str(copy)})
                        current = [open(copy, "xb"), header["size"]]
                    take = min(current[1], len(buffer))
                    current[0].write(buffer[:take])
                    del buffer[:take]
                    current[1] -= take
                    if current[1] == 0:
                        current[0].close()
                        current = None
                    elif not buffer:
                        break
            if current is not None or buffer:
                raise ApiError(400, "the upload ended inside a file")
            if not entries:
                raise ApiError(400, "nothing to inject: the upload holds no file")
            (folder / "files.json").write_text(json.dumps(entries))
            return folder
        except BaseException:
            if current is not None:
                current[0].close()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def inject_files(self, job, emit, pool: str, settings, chunk_tokens, force: bool, folder: Path,
                     type_: str | None = None, encoding: str | None = None) -> None:
        import dataclasses

        from memcli.app.api import InjectInterrupted

        resident = self.resident
        entries = json.loads((folder / "files.json").read_text())
        stdin = None
        paths = []
        for entry in entries:
            if entry["path"] == "-":
                stdin = open(entry["copy"], "rb")
                paths.append("-")
            else:
                paths.append(entry["copy"])
        name = resident.model_of(pool, settings)  # a mismatched --model is refused before weights load
        model = resident.use_model(name)
        labels = {e["copy"]: e["path"] for e in entries if e["path"] != "-"}
        model.app.labels.update(labels)
        label = model.app.source_label

        def on_event(event) -> None:
            fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event) if f.name != "kind"}
            emit({"event": event.kind, **fields, "path": label(event.path)})
            if event.kind in ("chunk", "commit", "file"):
                # other requests may run here; a client that left stops the inject
                job.checkpoint(f"file:{event.file_index}" if event.kind == "file" else event.kind)
                job.check_stop_requested()  # ... and one that asked to stop ends it with its report

        try:
            report = model.app.inject(pool, paths, model=name, chunk_tokens=chunk_tokens, force=force, type=type_,
                                      encoding=encoding, stdin=stdin, on_event=on_event,
                                      take_loaded=lambda: resident.take_state(name, pool, job))
            interrupted = False
        except InjectInterrupted as stop:
            report, interrupted = stop.report, True
        finally:
            if stdin is not None:
                stdin.close()
            for copy in labels:
                model.app.labels.pop(copy, None)
            resident.done_with(model)
        for result in report.files:
            result.path = labels.get(result.path, result.path)
        if report.partial is not None:
            report.partial.path = labels.get(report.partial.path, report.partial.path)
        if not job.cancelled.is_set() or job.stopping:  # a client that left is told nothing
            emit({"done": True, "interrupted": interrupted, "report": report.to_json()})

    # ------------------------------------------------------------------ OpenAI
    async def models(self, request: Request):
        from memcli.app.api import Memcli

        rows = await asyncio.to_thread(lambda: Memcli(self.resident.settings, self.resident.store).list_pools())
        return JSONResponse({"object": "list", "data": [_model_entry(row) for row in rows if not row.get("error")]})

    async def model(self, request: Request):
        from memcli.app.api import Memcli
        from memcli.store import PoolNotFound

        name = _pool_name(request.path_params["name"], "model")
        self.require_pool(name)  # the one wording of a missing pool
        rows = await asyncio.to_thread(lambda: Memcli(self.resident.settings, self.resident.store).list_pools())
        for row in rows:
            if row["name"] == name and not row.get("error"):
                return JSONResponse(_model_entry(row))
        raise PoolNotFound(f"pool {name} not found")

    async def chat_completions(self, request: Request):
        from memcli.app.api import answer_budget, decode_answer
        from memcli.server.resident import conversation_prompt

        data = await read_json(request)
        pool = _pool_name(data.get("model"), "model")
        messages = await asyncio.to_thread(_messages, data.get("messages"))
        max_tokens = _number(data, "max_completion_tokens", int, None, 1, MAX_NEW_TOKENS)
        max_tokens = _number(data, "max_tokens", int, max_tokens, 1, MAX_NEW_TOKENS)
        if _number(data, "n", int, 1, 1) != 1:
            raise ApiError(400, "n must be 1 (memcli answers one completion per request)")
        sampling = _sampling(data)
        stop = _stop_strings(data.get("stop"))
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false")
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object")
        include_usage = bool(options.get("include_usage"))
        self.require_pool(pool)
        resident = self.resident
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": pool,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def work(job, emit):
            model = resident.use_model(resident.model_of(pool))
            try:
                loaded = model.app.model(model.name)
                ids, _ = conversation_prompt(loaded, messages, max_tokens)
                budget = answer_budget(loaded, len(ids), max_tokens, option="max_tokens")
                with job.holding(resident.reader_lock(model.name, pool)):  # one answer per pool state at a time
                    state = resident.pool_state(model, pool)
                    if stream:
                        emit(chunk({"role": "assistant", "content": ""}))
                    on_text = (lambda text: emit(chunk({"content": text}))) if stream else None
                    answer = decode_answer(loaded, state.state, ids, budget, sampling=sampling, on_text=on_text,
                                           stop=stop, checkpoint=lambda: job.checkpoint("token"))
            finally:
                resident.done_with(model)
            finish_reason = "stop" if answer.stopped else "length"
            usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": len(answer.tokens),
                     "total_tokens": answer.prompt_tokens + len(answer.tokens)}
            if stream:
                emit(chunk({}, finish_reason))
                if include_usage:
                    emit({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": pool,
                          "choices": [], "usage": usage})
            else:
                emit({"id": completion_id, "object": "chat.completion", "created": created, "model": pool,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                   "finish_reason": finish_reason, "logprobs": None}],
                      "usage": usage})

        if stream:
            return self.stream(request, work, _sse, "text/event-stream", tail=b"data: [DONE]\n\n", kind="chat",
                               pool=pool)
        return await self.complete(request, work, kind="chat", pool=pool)

    async def complete(self, request: Request, work, kind: str = "", pool: str = "") -> JSONResponse:
        """A non-streaming request: run `work(job, emit)` with the device turn held; what it emitted
        last is the response (or its error). A client that disconnects cancels the work at its next
        slice."""
        from memcli.server.resident import Cancelled

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
            return JSONResponse(_error_body("the server is stopping" if job.stopping else "the client went away",
                                            "server_error"), status_code=503)
        except Exception as err:  # noqa: BLE001
            return _json_error(err)
        finally:
            watcher.cancel()
            self.jobs.discard(job)
        return JSONResponse(result[-1])

    # ------------------------------------------------------------------ assembly
    def app(self) -> Starlette:
        def guarded(handler):
            async def endpoint(request: Request):
                from memcli.server.resident import Cancelled

                try:
                    return await handler(request)
                except Cancelled:  # the server is stopping while this request waited for its turn
                    return JSONResponse(_error_body("the server is stopping", "server_error"), status_code=503)
                except Exception as err:  # noqa: BLE001 - every failure becomes a JSON error
                    return _json_error(err)

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
            Route("/v1/models", guarded(self.models), methods=["GET"]),
            Route("/v1/models/{name:path}", guarded(self.model), methods=["GET"]),
            Route("/v1/chat/completions", guarded(self.chat_completions), methods=["POST"]),
        ]
        app = Starlette(routes=routes)

        async def not_found(request, exc):
            status = getattr(exc, "status_code", 404)
            message = "no such endpoint" if status == 404 else "method not allowed" if status == 405 else "bad request"
            return JSONResponse(_error_body(f"{message}: {request.method} {request.url.path}", "not_found_error"),
                                status_code=status)

        app.add_exception_handler(404, not_found)
        app.add_exception_handler(405, not_found)
        return _Guard(app, self.token)


class _Guard:
    """Outermost ASGI layer: the bearer token on TCP connections, and no exception ever escapes
    (uvicorn would log a traceback for it)."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        over_tcp = bool(scope.get("server")) and scope["server"][1] is not None
        if over_tcp and self.token:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(header, b"Bearer " + self.token.encode()):
                response = JSONResponse(_error_body("missing or wrong bearer token (MEMCLI_TOKEN)", "authentication_error"),
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
            api = classify(err)
            if not started:
                await JSONResponse(_error_body(api.message, api.kind), status_code=api.status)(scope, receive, send)


def _upload_header(line: bytes, entries: list) -> dict:
    from memcli.base.jsonbound import JsonRefused, load_json

    try:
        header = load_json(line, 4)
    except JsonRefused as err:
        raise ApiError(400, f"an upload's file header {err.reason}") from None
    if not isinstance(header, dict) or not isinstance(header.get("path"), str) or not header["path"]:
        raise ApiError(400, "an upload's file header needs a path")
    size = header.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ApiError(400, "an upload's file header needs a size (bytes, >= 0)")
    if header["path"] == "-" and any(e["path"] == "-" for e in entries):
        raise ApiError(400, "an upload holds stdin (-) at most once")
    # the copy keeps the file's own name (what a file is may depend on it: name.1.gz, .html, .md);
    # only its last part, and never a name that could leave the copy's folder
    name = os.path.basename(header["path"]) if header["path"] != "-" else "stdin"
    if name in ("", ".", "..") or "\x00" in name or len(os.fsencode(name)) > 200:
        name = "upload"
    return {"path": header["path"], "size": size, "name": name}


def _history(value: object) -> list[tuple[str, str]]:
    """Earlier turns of a conversation: [[question, answer], ...], oldest first (at most
    `MAX_TURNS`, each string at most `MAX_TEXT` characters)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, "history must be a list of [question, answer] string pairs")
    if len(value) > MAX_TURNS:
        raise ApiError(400, f"history holds {len(value)} turns; at most {MAX_TURNS} are accepted")
    turns = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise ApiError(400, f"history[{i}] must be a [question, answer] pair of strings")
        turns.append((_text(turn[0], f"history[{i}][0]"), _text(turn[1], f"history[{i}][1]")))
    return turns


def _messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise ApiError(400, f"messages holds {len(value)} items; at most {MAX_MESSAGES} are accepted")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, not {_shown(role)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if len(content) > MAX_MESSAGES:
                raise ApiError(400, f"messages[{i}].content holds {len(content)} parts; at most {MAX_MESSAGES}")
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string")
        out.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise ApiError(400, "the last message must be a non-empty user message")
    return out


def _stop_strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in value):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
    for i, text in enumerate(value):
        _text(text, f"stop[{i}]", MAX_STOP_CHARS)
    return tuple(value)


def _model_entry(row: dict) -> dict:
    """A pool as an OpenAI model."""
    return {"id": row["name"], "object": "model", "created": _epoch(row.get("created")), "owned_by": "memcli",
            "memcli_model": row.get("model")}


def _epoch(iso: str | None) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except (TypeError, ValueError):
        return 0


def _ndjson(item: dict) -> bytes:
    return (json.dumps(item) + "\n").encode()


def _sse(item: dict) -> bytes:
    if "error" in item:  # the OpenAI client raises an APIError for an event with an error field
        return f"data: {json.dumps({'error': item['error']})}\n\n".encode()
    return f"data: {json.dumps(item)}\n\n".encode()


# --------------------------------------------------------------------------- process
class ServerRunning(AddressError):
    pass


def _take_lock():
    """The per-user server lock (flock on server.lock), held until the process ends."""
    import fcntl

    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind the socket owner-only: the umask makes it 0600 from its creation (no window where
    another user could connect), and chmod states it again."""
    try:
        path.unlink()  # a socket left by a server that was killed (we hold the lock: nobody serves it)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def check_tcp(host: str | None, port: int | None, token: str | None) -> tuple[str, int] | None:
    """The TCP address to listen on, or None. Beyond loopback only with a bearer token."""
    if host is None and port is None:
        return None
    host = host or "127.0.0.1"
    port = 11435 if port is None else port
    if not is_loopback(host) and not token:
        raise AddressError(f"refusing to listen on {host}, beyond this machine, without a bearer token: "
                           "set MEMCLI_TOKEN (clients send it as 'Authorization: Bearer …')")
    return host, port


def _uvicorn_class():
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """SIGTERM/SIGINT cancel running work at once (an inject returns to its last commit), then
        uvicorn shuts down as usual."""

        def __init__(self, config, server: Server):
            super().__init__(config)
            self.memcli = server

        def handle_exit(self, sig, frame) -> None:
            self.memcli.cancel_all()
            super().handle_exit(sig, frame)

    return Uvicorn


def _Uvicorn(config, server: Server):
    return _uvicorn_class()(config, server)


def _owner_only_protocol():
    """uvicorn's HTTP protocol, closing at once a Unix-socket connection whose peer runs as another
    user (SO_PEERCRED: only root could reach the 0600 socket anyway): a request that comes over the
    Unix socket comes from this user, who may name a local model folder."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    from memcli.server.address import peer_uid

    base = import_from_string(HTTP_PROTOCOLS["auto"])

    class OwnerOnly(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is None or sock.family != socket.AF_UNIX:
                return
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            if uid is not None and uid != os.getuid():
                log.info(f"refused a connection from uid {uid} (this server serves uid {os.getuid()} only)")
                transport.close()

    return OwnerOnly


def serve(settings, keep_alive: float | None, host: str | None = None, port: int | None = None,
          budget_bytes: int | None = None, on_ready: Callable[[str], None] | None = None,
          exit_when_idle: bool = False) -> int:
    """Run the server in this process until `memcli stop`, SIGTERM or Ctrl-C. Returns an exit code."""
    import uvicorn

    from memcli.server.resident import Resident
    from memcli.server.address import TOKEN_ENV
    from memcli.pools.meta import PoolStore

    token = os.environ.get(TOKEN_ENV) or None
    tcp = check_tcp(host, port, token)
    store = PoolStore()
    with store.gate.shared(create=False):  # what every request does first: a store it cannot read is a start failure
        pass
    ensure_runtime_dir()
    lock = _take_lock()
    if lock is None:
        raise ServerRunning(f"a memcli server is already running ({socket_path()}); memcli stop ends it")
    sockets = [bind_unix_socket(socket_path())]
    if tcp is not None:
        tcp_sock = socket.socket(socket.AF_INET6 if ":" in tcp[0] else socket.AF_INET, socket.SOCK_STREAM)
        tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp_sock.bind(tcp)
        except OSError as err:
            raise AddressError(f"cannot listen on {tcp[0]}:{tcp[1]}: {err.strerror}") from None
        tcp_sock.listen(128)
        sockets.append(tcp_sock)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    resident = Resident(settings, store=store, keep_alive=keep_alive, budget_bytes=budget_bytes, log=log.info)
    server = Server(resident, token)
    if exit_when_idle and keep_alive is not None:
        # started by a command, not by the user: gone once nothing is loaded for a keep-alive
        # (a minute for keep-alive 0, so that it does not mean a new server per command)
        resident.exit_when_idle = keep_alive if keep_alive > 0 else 60.0

        def stop_when_idle() -> bool:
            if server.jobs or server.uvicorn is None:
                return False
            log.info("nothing loaded for a while; the server started by a command stops")
            server.uvicorn.should_exit = True
            return True

        resident.on_idle = stop_when_idle
    config = uvicorn.Config(server.app(), lifespan="off", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=10, http=_owner_only_protocol())
    runner = _Uvicorn(config, server)
    server.uvicorn = runner
    info = {"pid": os.getpid(), "socket": str(socket_path()), "started": server.started, "version": __version__,
            "tcp": f"{tcp[0]}:{tcp[1]}" if tcp else None, "keep_alive_seconds": keep_alive}
    tmp = info_path().with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, info_path())
    where = str(socket_path()) + (f" and http://{tcp[0]}:{tcp[1]}" if tcp else "")
    log.info(f"memcli server {__version__} (pid {os.getpid()}) listening on {where}")
    if on_ready is not None:
        on_ready(where)
    try:
        runner.run(sockets=sockets)
    finally:
        server.cancel_all()
        for worker in list(server.workers):  # cancelled work ends at its next token or chunk
            worker.join(30)
        resident.close()
        for leftover in (socket_path(), info_path()):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(server.spool, ignore_errors=True)
        os.close(lock)
        log.info("memcli server stopped")
    return 0
