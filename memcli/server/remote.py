"""`RemoteBackend`: a running `memcli serve` as a `memcli.app.backend.Backend`, over its client.

Light: no torch, no model; the server runs the library's own code and sends the wire types back
(`memcli.wire`), so a command prints the same lines, JSON and exit codes either way. The client's
model setting (--model, MEMCLI_MODEL, the config file) goes with every request.

An inject sends what discovery found here (`memcli.app.backend.find`): each source's bytes under
its name (the server never opens a path a client names), the files found unreadable and the files
left out, in their order. If the server goes away mid-inject (killed), the pool is at its last
commit: one line says so and a fresh server continues where it stopped (`restart`), or this process
does (`fallback`).

Stopping (`stop`, set by the command's first Ctrl-C or SIGTERM): the server is asked to end the
inject once the chunk it is making is committed, and the events go on until its report of what was
kept (`InjectInterrupted`); a second Ctrl-C quits at once (the server, seeing the client leave,
returns to the last commit). The stream is read on its own thread, so that an interruption in this
(the main) thread leaves it intact.
"""

from __future__ import annotations

import io
import queue
import threading
from typing import BinaryIO, Callable, Iterable, Sequence

from memcli.app.backend import ChatSession, open_session
from memcli.base.errors import MemcliError
from memcli.server.client import Client, ServerError, ServerGone, ServerUnavailable, Upload
from memcli.wire import (
    AskRequest, Answer, Event, InjectInterrupted, InjectParams, InjectReport, ModelUse, Sampling, UploadHeader,
)

GONE = (ServerGone, ServerUnavailable)


class RemoteBackend:
    def __init__(self, client: Client, *, model: str, model_explicit: bool = False,
                 say: Callable[[str], None] = lambda line: None,
                 on_model: Callable[[ModelUse], None] | None = None,
                 restart: Callable[[], "Client | None"] | None = None,
                 fallback: Callable[[], object] | None = None, via: str = "cli"):
        self.client = client
        self.via = via  # the entry point the log of answers names
        self.model, self.explicit = model, model_explicit  # a folder as an absolute path: the server runs elsewhere
        self.say, self.on_model = say, on_model
        self.restart, self.fallback = restart, fallback

    # ------------------------------------------------------------------ asking
    def ask(self, pool: str, question: str, *, history: Iterable[tuple[str, str]] = (),
            sampling: Sampling | None = None, max_new_tokens: int | None = None, sources: bool = False,
            on_text: Callable[[str], None] | None = None, conversation: str | None = None,
            turn: int | None = None) -> Answer:
        """The server's answer (the server logs it, with this backend's `via`)."""
        request = AskRequest(pool, question, tuple((q, a) for q, a in history), max_new_tokens,
                             sampling or Sampling(), self.model, self.explicit, sources, self.via, conversation, turn)
        try:
            return self.client.ask(request, on_text=on_text, on_model=self.on_model)
        except GONE:
            raise MemcliError("the memcli server stopped while answering; ask again (a fresh server starts)") from None

    def chat(self, pool: str, *, sampling: Sampling | None = None, max_new_tokens: int | None = None) -> ChatSession:
        return open_session(self, pool, sampling=sampling, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ pools
    def _read(self, ask: Callable, local: Callable):
        """`ask(client)`, or `local(backend)` in this process when the server is gone."""
        try:
            return ask(self.client)
        except GONE:
            if self.fallback is None:
                raise
            return local(self.fallback())

    def pool_info(self, pool: str) -> dict:
        return self._read(lambda client: client.pool_info(pool), lambda here: here.pool_info(pool))

    def list_pools(self) -> list[dict]:
        return self._read(lambda client: client.pools(), lambda here: here.list_pools())

    def require_pool(self, pool: str) -> str:
        self._read(lambda client: client.require_pool(pool), lambda here: here.require_pool(pool))
        return pool

    def pool_exists(self, pool: str) -> bool:
        try:
            self.require_pool(pool)
        except ServerError as err:
            if err.status == 404:
                return False  # a new pool: the chat's first /inject creates it
            raise
        return True

    def hold(self, pool: str) -> None:
        """Nothing to do: the server keeps pool states resident."""

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ inject
    def inject(self, pool: str, found: Sequence, *, model: str | None = None, chunk_tokens: int | None = None,
               force: bool = False, stdin: BinaryIO | None = None, on_event: Callable[[Event], None] | None = None,
               stop: threading.Event | None = None) -> InjectReport:
        if model is None:
            model, explicit = self.model, self.explicit
        else:
            from memcli.app.models import normalize_model

            model, explicit = normalize_model(model), True
        params = InjectParams(pool, model, explicit, chunk_tokens, force)
        piped = _piped(found, stdin)
        stop = stop if stop is not None else threading.Event()
        try:
            report = self._send(params, found, piped, on_event, stop)
        except GONE:
            # killed mid-inject: the pool is at its last commit; a fresh server resumes where it stopped
            self.say(f"the memcli server stopped during the inject; pool {pool} keeps its last commit — "
                     "continuing with a fresh server")
            client = self.restart() if self.restart is not None else None
            if client is None:  # in-process resumes the same way
                if self.fallback is None:
                    raise MemcliError(f"the memcli server stopped during the inject; pool {pool} keeps its last "
                                      "commit: run the same command again to continue") from None
                return self.fallback().inject(pool, found, model=model if explicit else None, chunk_tokens=chunk_tokens,
                                              force=force, stdin=_replay(piped), on_event=on_event, stop=stop)
            self.client.close()
            self.client = client
            try:
                report = self._send(params, found, piped, on_event, stop)
            except GONE:
                raise MemcliError("the memcli server stopped again during the inject") from None
        if report.interrupted:
            raise InjectInterrupted(report)
        return report

    def _send(self, params: InjectParams, found: Sequence, piped: bytes | None, on_event, stop) -> InjectReport:
        """One upload of what was found, and its stream of events; the server's report."""
        uploads = _uploads(found, piped)
        report = None
        try:
            events = self.client.inject(params, uploads)
            for item in _Stopping(self, events, params.pool, stop).items():
                if isinstance(item, ModelUse):
                    if self.on_model is not None:
                        self.on_model(item)
                elif isinstance(item, Event):
                    if on_event is not None:
                        on_event(item)
                else:
                    report = item
        finally:
            for upload in uploads:
                upload.close()
        if report is None:
            raise MemcliError("the memcli server ended the inject without a report; run the same command again")
        return report


class _Stopping:
    """An inject's stream read on its own thread, with the stop request sent once `stop` is set
    (and the server has named the inject)."""

    def __init__(self, backend: RemoteBackend, events, pool: str, stop: threading.Event):
        self.backend, self.events, self.pool, self.stop = backend, events, pool, stop
        self.sent = False  # the stop request went out

    def items(self):
        inbox: queue.Queue = queue.Queue()
        end = object()

        def pump() -> None:
            try:
                for item in self.events:
                    inbox.put(item)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread as it is
                inbox.put(err)
            inbox.put(end)

        threading.Thread(target=pump, name="memcli-inject-stream", daemon=True).start()
        while True:
            try:
                item = inbox.get(timeout=0.2 if not self.sent else None)
            except queue.Empty:
                item = None
            if self.stop.is_set() and not self.sent:
                self.send()  # also when the stop came before the server named the inject
            if item is None:
                continue
            if item is end:
                return
            if isinstance(item, GONE) and self.stop.is_set():
                self.give_up()  # stopping: no fresh server to continue on
            if isinstance(item, BaseException):
                raise item
            yield item

    def send(self) -> None:
        """The stop request, once the server has named the inject; no answer: quit as before."""
        if self.events.id is None:
            return  # still uploading: asked once the server names the inject
        self.sent = True
        try:
            with Client(self.backend.client.path) as other:
                other.stop_inject(self.events.id)
        except ServerError as err:
            if err.status != 404:  # 404: it has just finished, and its report is on the way
                self.give_up()
        except GONE:
            self.give_up()

    def give_up(self):
        self.backend.say(f"memcli: the server did not take the stop; pool {self.pool} keeps its last commit")
        raise KeyboardInterrupt


def _piped(found: Sequence, stdin: BinaryIO | None) -> bytes | None:
    """What stdin holds, read once (a retry on a fresh server sends it again)."""
    if not any(getattr(item, "kind", None) == "stdin" for item in found):
        return None
    if stdin is None:
        import sys

        stdin = sys.stdin.buffer
    return stdin.read()


def _replay(piped: bytes | None):
    return io.BytesIO(piped) if piped is not None else None


def _uploads(found: Sequence, piped: bytes | None) -> list[Upload]:
    """The upload of what discovery found, in its order: the files left out (counted), the files
    found unreadable (named), and each source's bytes under its name."""
    ignored = InjectReport(pool="", model="")
    items = ignored.count_ignored(found)
    uploads = []
    if ignored.ignored_by_type or ignored.ignored_by_glob:
        uploads.append(Upload(UploadHeader(ignored={"by_type": ignored.ignored_by_type,
                                                    "by_glob": ignored.ignored_by_glob})))
    for item in items:
        kind = getattr(item, "kind", None)
        if kind is None:  # found unreadable
            uploads.append(Upload(UploadHeader(item.path, skipped=item.reason)))
        elif kind == "stdin":
            data = piped or b""
            uploads.append(Upload(UploadHeader("-", len(data), "stdin", encoding=item.encoding, forced=item.forced),
                                  io.BytesIO(data)))
        else:
            try:
                stream = open(item.path, "rb")
            except OSError as err:
                uploads.append(Upload(UploadHeader(item.path, skipped=err.strerror or type(err).__name__)))
                continue
            uploads.append(Upload.of_file(item.path, stream, kind, compressed=item.compressed,
                                          encoding=item.encoding, forced=item.forced))
    return uploads
