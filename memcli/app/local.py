"""`LocalBackend`: the library in this process, as a `memcli.app.backend.Backend`.

The models load here (torch, the engine: on the first ask or inject, through the `Memcli` facade);
pool facts and listings read manifests only.
"""

from __future__ import annotations

import threading
from typing import BinaryIO, Callable, Iterable, Sequence

from memcli.app import pools
from memcli.base import pause
from memcli.app.backend import ChatSession, open_session
from memcli.pools.meta import PoolStore
from memcli.wire import Answer, Event, InjectReport, Sampling


class LocalBackend:
    """The `Memcli` facade behind the `Backend` protocol (`app` is made on first use by `make`);
    what reads manifests only goes to the store without it (memcli.app.pools)."""

    def __init__(self, app=None, make: Callable[[], object] | None = None, via: str = "cli"):
        self._app, self._make = app, make
        self.via = via  # the entry point the log of answers names
        self._store = app.store if app is not None else None

    @property
    def app(self):
        if self._app is None:
            self._app = self._make()
        return self._app

    @property
    def store(self):
        if self._store is None:
            self._store = self._app.store if self._app is not None else PoolStore()
        return self._store

    def ask(self, pool: str, question: str, *, history: Iterable[tuple[str, str]] = (),
            sampling: Sampling | None = None, max_new_tokens: int | None = None, sources: bool = False,
            on_text: Callable[[str], None] | None = None, conversation: str | None = None,
            turn: int | None = None) -> Answer:
        """The answer, logged here where it was decoded (the log of answers, `via` this backend's)."""
        from memcli.app.answer_log import log_answer

        answer = self.app.ask(pool, question, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text,
                              history=list(history), sources=sources)
        log_answer(answer, via=self.via, sampling=sampling, conversation=conversation, turn=turn,
                   settings=self.app.settings)
        return answer

    def chat(self, pool: str, *, sampling: Sampling | None = None, max_new_tokens: int | None = None) -> ChatSession:
        return open_session(self, pool, sampling=sampling, max_new_tokens=max_new_tokens)

    def inject(self, pool: str, found: Sequence, *, model: str | None = None, chunk_tokens: int | None = None,
               force: bool = False, stdin: BinaryIO | None = None, on_event: Callable[[Event], None] | None = None,
               stop: threading.Event | None = None) -> InjectReport:
        """`stop` (set by a first Ctrl-C): the inject ends once the chunk it is making is committed,
        as a server's does when its client asks it to stop."""
        from memcli.ingest.pipeline import StopAfterChunk

        report = InjectReport(pool=pool, model="")
        items = report.count_ignored(found)

        def progress(event: Event) -> None:
            if on_event is not None:
                on_event(event)
            if event.kind not in ("chunk", "commit", "file"):
                return
            if pause.wanted():  # a test's pause at the boundaries a server's inject pauses at
                pause.pause_at(f"file:{event.file_index}" if event.kind == "file" else event.kind,
                               lambda: stop is not None and stop.is_set())
            if stop is not None and stop.is_set():
                raise StopAfterChunk()

        return self.app.ingest(pool, items, report, model=model, chunk_tokens=chunk_tokens, force=force,
                               stdin=stdin, on_event=progress)

    def pool_info(self, pool: str) -> dict:
        return pools.pool_info(self.store, pool)

    def list_pools(self) -> list[dict]:
        return pools.list_pools(self.store)

    def pool_exists(self, pool: str) -> bool:
        return pools.pool_exists(self.store, pool)

    def require_pool(self, pool: str) -> str:
        return pools.require_pool(self.store, pool)

    def hold(self, pool: str) -> None:
        self.app.keep_open(pool)

    def close(self) -> None:
        pass
