"""Talking to a running `memcli serve` over its Unix socket (httpx). Imports no torch: a command
that goes through the server starts in a fraction of the time a model-loading one takes.

Every connection is checked before a byte is sent (`server_address.check_socket_path` and
`check_peer`): the socket's folder and the socket itself must be this user's (lstat, never
following a link) and the process listening must run as this user; otherwise the request raises
`server_address.UntrustedServer` (one line naming the path and the fix) and nothing was sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

import httpcore
import httpx

from memcli.base.errors import MemcliError
from memcli.server import address as server_address
from memcli.server.address import UntrustedServer, socket_path
from memcli.wire import AskRequest, Answer, Event, InjectParams, InjectReport, ModelUse, UploadHeader, error_of

UPLOAD_BLOCK = 1 << 20


class ServerUnavailable(MemcliError):
    """No server answers on the socket (none runs, or it was killed and left its socket behind)."""


class ServerGone(MemcliError):
    """The server went away in the middle of a request (killed, crashed or stopped)."""


class ServerError(MemcliError):
    """The server refused or failed a request: its one-line message, HTTP status and error type;
    it ends a command as the same failure ends it in-process (the taxonomy's kind by its type)."""

    def __init__(self, status: int, message: str, kind: str = ""):
        like = error_of(status, message, kind)
        super().__init__(str(like))
        self.status = self.http_status = status
        self.kind = kind or like.kind
        self.exit_code = like.exit_code


class Upload:
    """One line of an inject's upload (`wire.UploadHeader`) and, for a source, an open binary
    stream of its bytes."""

    def __init__(self, header: UploadHeader, stream: IO[bytes] | None = None):
        self.header, self.stream = header, stream

    @classmethod
    def of_file(cls, name: str, stream: IO[bytes], kind: str = "text", **how) -> "Upload":
        """A source's bytes from an open file (its size now), logged under `name`."""
        return cls(UploadHeader(name, os.fstat(stream.fileno()).st_size, kind, **how), stream)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class _CheckedBackend(httpcore.SyncBackend):
    """Connects to the Unix socket only after checking its folder and the socket itself, and keeps
    the connection only if the process listening runs as this user."""

    def __init__(self, repair: bool):
        self.repair = repair

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        server_address.check_socket_path(Path(path), repair=self.repair)
        stream = super().connect_unix_socket(path, timeout, socket_options)
        try:
            server_address.check_peer(stream.get_extra_info("socket"), path)
        except BaseException:
            stream.close()
            raise
        return stream


class _CheckedTransport(httpx.HTTPTransport):
    """httpx's transport over a Unix socket whose every new connection goes through `_CheckedBackend`."""

    def __init__(self, path: Path):
        super().__init__(uds=str(path))
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):  # pragma: no cover
            raise RuntimeError("this httpx keeps its connection pool elsewhere; memcli cannot check the server")
        self._pool = httpcore.ConnectionPool(uds=str(path),
                                             network_backend=_CheckedBackend(repair=path == socket_path()))


class Client:
    def __init__(self, path: Path | str | None = None, timeout: float | None = None):
        self.path = Path(path) if path else socket_path()
        transport = _CheckedTransport(self.path)
        self.http = httpx.Client(transport=transport, base_url="http://memcli",
                                 timeout=httpx.Timeout(timeout, connect=5.0),
                                 headers={"x-memcli-client": f"pid-{os.getpid()}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plain requests
    def _request(self, method: str, url: str, **kwargs) -> object:
        try:
            response = self.http.request(method, url, **kwargs)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as err:
            raise ServerUnavailable(str(err)) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            raise ServerGone(str(err) or type(err).__name__) from None
        _raise_for(response)
        return response.json()

    def health(self) -> dict | None:
        """The server's facts, or None when no server answers; UntrustedServer when what is there
        is not this user's server."""
        if not os.path.lexists(self.path):
            return None
        try:
            return self._request("GET", "/api/health", timeout=10.0)  # a hung server is no server
        except UntrustedServer:
            raise
        except (ServerUnavailable, ServerGone, ServerError, ValueError):
            return None

    def ps(self) -> dict:
        return self._request("GET", "/api/ps")

    def stop(self) -> dict:
        return self._request("POST", "/api/stop")

    def pools(self) -> list[dict]:
        return self._request("GET", "/api/pools")

    def require_pool(self, name: str) -> None:
        """ServerError (404: "pool X not found; did you mean Y?", 400: an invalid name) unless the
        pool exists; reads manifests only."""
        self._request("GET", f"/v1/models/{httpx.URL(path=name).raw_path.decode()}")

    def pool_info(self, name: str) -> dict:
        return self._request("GET", f"/api/pools/{httpx.URL(path=name).raw_path.decode()}")

    # ------------------------------------------------------------------ streams
    def _stream(self, method: str, url: str, decode=None, **kwargs) -> Iterator[dict]:
        """The events of a streamed response: one JSON object per NDJSON line, or per line that
        `decode` turns into JSON text (None: skip the line). An event carrying "error" raises."""
        try:
            with self.http.stream(method, url, **kwargs) as response:
                if response.status_code != 200:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    text = decode(line) if decode is not None else (line if line.strip() else None)
                    if text is None:
                        continue
                    event = json.loads(text)
                    if "error" in event:
                        error = event["error"]
                        raise ServerError(int(error.get("status", 500)), error.get("message", "error"), error.get("type", ""))
                    yield event
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as err:
            raise ServerUnavailable(str(err)) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            raise ServerGone(str(err) or type(err).__name__) from None

    def ask(self, request: AskRequest, on_text: Callable[[str], None] | None = None,
            on_model: Callable[[ModelUse], None] | None = None) -> Answer:
        """The server's answer to `request` (`wire.Answer`), its text passed to `on_text` piece by
        piece as it comes, the model it runs on to `on_model`. ServerGone when the server goes away
        first (also when the stream ends without the answer)."""
        for event in self._stream("POST", "/api/ask", json=request.to_json()):
            kind = event.get("event")
            if kind == "text":
                if on_text is not None:
                    on_text(event["text"])
            elif kind == "model":
                if on_model is not None:
                    on_model(ModelUse.from_json(event))
            elif kind == "answer":
                return Answer.from_json(event)
        raise ServerGone("the answer's stream ended without the answer")

    def inject(self, params: InjectParams, uploads: Iterable[Upload]) -> "InjectEvents":
        """An inject's stream: `wire.ModelUse`, then progress (`wire.Event`), then the
        `wire.InjectReport` last. Once the server has taken the upload, the stream's `id` names
        the inject for `stop_inject`."""
        return InjectEvents(self._stream("POST", "/api/inject", params=params.to_query(),
                                         content=_upload_body(list(uploads)),
                                         headers={"content-type": "application/x-memcli-upload"}))

    def stop_inject(self, inject_id: str, timeout: float = 10.0) -> dict:
        """Ask the server to end that inject at its next chunk boundary; its stream then ends with
        the report of what was kept. ServerError 404: no such inject runs (it has just finished);
        ServerGone also when the server does not answer within `timeout` seconds."""
        try:
            return self._request("POST", f"/api/inject/{httpx.URL(path=inject_id).raw_path.decode()}/stop",
                                 timeout=timeout)
        except httpx.TimeoutException:
            raise ServerGone(f"the server did not answer within {timeout:g} s") from None

    def chat(self, pool: str, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> Iterator[dict]:
        """The OpenAI endpoint, streamed: the chunks' objects (the last one carries the usage)."""
        body = {"model": pool, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "temperature": temperature, "top_p": top_p}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if seed is not None:
            body["seed"] = seed
        return self._stream("POST", "/v1/chat/completions", decode=_sse_data, json=body)


class InjectEvents:
    """An inject's stream (`Client.inject`): `wire.ModelUse`, `wire.Event`s, then the
    `wire.InjectReport`. The stream's first line, {"event": "started", "inject": ID}, is not one of
    them; it sets `id`."""

    def __init__(self, events: Iterator[dict]):
        self.id: str | None = None
        self._events = events

    def __iter__(self) -> "InjectEvents":
        return self

    def __next__(self) -> "ModelUse | Event | InjectReport":
        while True:
            event = next(self._events)
            kind = event.get("event")
            if kind == "started":
                self.id = event.get("inject")
                continue
            if kind == "model":
                return ModelUse.from_json(event)
            if "event" not in event:  # the last line: {"done": true, "report": ...}
                return InjectReport.from_json(event["report"])
            return Event.from_json(event)

    def close(self) -> None:
        self._events.close()


def _sse_data(line: str) -> str | None:
    """The JSON of a server-sent `data:` line; None for anything else and for the final [DONE]."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return line[6:]


def _upload_body(uploads: list[Upload]) -> Iterator[bytes]:
    for upload in uploads:
        header = upload.header
        yield (json.dumps(header.to_json()) + "\n").encode()
        if upload.stream is None:
            continue
        left = header.size
        while left:
            block = upload.stream.read(min(UPLOAD_BLOCK, left))
            if not block:  # the server sees an upload that ends inside a file and injects none of it
                raise MemcliError(f"{header.name} got shorter while it was sent; nothing of it was injected")
            yield block
            left -= len(block)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, kind = error["message"], error.get("type", "")
    except (ValueError, KeyError, TypeError):
        message, kind = f"the server answered {response.status_code}", ""
    raise ServerError(response.status_code, message, kind)
