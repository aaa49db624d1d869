"""One backend behind every entry point: what a command (and next an MCP server or an `llm` plugin)
asks of memcli, whether the library runs in this process or a server holds the models.

    Backend        the protocol: ask, chat, inject, pool_info, list_pools, pool_exists, require_pool
    LocalBackend   the library in this process (memcli.app.local, over the `Memcli` facade)
    RemoteBackend  a running `memcli serve` (memcli.server.remote, over its client; no torch)

Both take and return the torch-free wire types (`memcli.wire`): an `Answer` (with its sources when
asked), an `InjectReport` (or `InjectInterrupted` carrying it: Ctrl-C keeps every committed chunk),
a pool's facts and the pools' rows as `memcli pool info/ls --json` print them. Every failure a
backend raises is a `MemcliError` of the one taxonomy (`memcli.base.errors`): one line, an exit
code, an HTTP status, whichever side found it. The caller chooses a backend once and has one path
through it.

An inject reads what discovery found on the caller's side (`find`: paths -> sources, the files
that cannot be read, the files left out by type or --glob), in that order.
"""

from __future__ import annotations

import threading
from typing import BinaryIO, Callable, Iterable, Protocol, Sequence

from memcli.app.answer_log import new_conversation_id
from memcli.base.errors import MemcliError
from memcli.wire import Answer, Event, InjectReport, Sampling


class Backend(Protocol):
    """What every entry point needs of memcli (see the module docstring)."""

    def ask(self, pool: str, question: str, *, history: Iterable[tuple[str, str]] = (),
            sampling: Sampling | None = None, max_new_tokens: int | None = None, sources: bool = False,
            on_text: Callable[[str], None] | None = None, conversation: str | None = None,
            turn: int | None = None) -> Answer:
        """Answer `question` from the pool (the newest `history` turns that fit the window go into
        the prompt), passing its text to `on_text` as it is decoded; with `sources`, the answer's
        `attribution` says which sources the question read (computed where the pool is). The
        answer is logged where it is decoded (the log of answers), a chat's turn with its
        `conversation` id and `turn` number."""

    def chat(self, pool: str, *, sampling: Sampling | None = None,
             max_new_tokens: int | None = None) -> "ChatSession":
        """A conversation with the pool (its turns are kept on the caller's side)."""

    def inject(self, pool: str, found: Sequence, *, model: str | None = None, chunk_tokens: int | None = None,
               force: bool = False, stdin: BinaryIO | None = None, on_event: Callable[[Event], None] | None = None,
               stop: threading.Event | None = None) -> InjectReport:
        """Inject what `find` found (created, bound to `model`, if new); `on_event` sees the
        progress. Once `stop` is set (a first Ctrl-C) the inject ends after committing the chunk
        it is making; an interruption (a second Ctrl-C) returns to the last commit. Either way:
        `wire.InjectInterrupted` with the report of what was kept."""

    def pool_info(self, pool: str) -> dict:
        """`memcli pool info --json`: the pool's facts and how much of each source is in memory."""

    def list_pools(self) -> list[dict]:
        """`memcli pool ls --json`: one row per pool (a damaged one has `error` set); the models a
        client of pools-as-models lists."""

    def pool_exists(self, pool: str) -> bool:
        """Whether the pool exists (an invalid name is refused)."""

    def require_pool(self, pool: str) -> str:
        """`pool` when it exists, else NotFound: "pool X not found; did you mean Y?"."""

    def hold(self, pool: str) -> None:
        """Keep the pool's state loaded for the next questions (a conversation)."""

    def close(self) -> None:
        """Let go of what the backend holds (a connection)."""


def find(paths: Iterable[str], *, glob: str | None = None, type: str | None = None,
         encoding: str | None = None) -> list:
    """What an inject of `paths` reads, found here on the caller's side (`ingest.extract.discover`):
    sources, files that cannot be read and files left out, in order; one line when `type` or
    `encoding` is unknown or when nothing at all is there to read."""
    from memcli.ingest.discover import discover
    from memcli.ingest.pipeline import nothing_found

    paths = [str(path) for path in paths]
    if not paths:
        raise MemcliError("nothing to inject: give at least one file, folder or - for stdin")
    try:
        found = list(discover(paths, glob=glob, type=type, encoding=encoding))
    except ValueError as err:
        raise MemcliError(str(err)) from None
    counted = InjectReport(pool="", model="")
    if not counted.count_ignored(found):
        raise MemcliError(nothing_found(paths, glob, counted))
    return found


class ChatSession:
    """A conversation with one pool through a backend: each question is asked with the earlier
    (question, answer) turns, as many of the newest as the model's window holds."""

    def __init__(self, backend: Backend, pool: str, *, max_new_tokens: int | None = None,
                 sampling: Sampling | None = None, new: bool = False):
        self.backend, self.pool = backend, pool
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.turns: list[tuple[str, str]] = []
        self.conversation = new_conversation_id()  # the log of answers groups the session's turns by it
        self.asked = 0  # turns asked (the log's turn numbers; /reset does not restart them)
        # the pool did not exist when the session began: it is empty until an inject creates it, and
        # a question before that is refused (an answer from the model's own memory alone would look
        # like one from documents)
        self.new = new

    def _started(self) -> bool:
        """Whether a new pool exists by now (and keep it loaded from then on)."""
        if self.new and self.backend.pool_exists(self.pool):
            self.new = False
            self.backend.hold(self.pool)
        return not self.new

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        if not self._started():
            raise MemcliError(f"pool {self.pool} is still empty: /inject PATH... adds documents to it")
        self.asked += 1
        answer = self.backend.ask(self.pool, question, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                  on_text=on_text, history=list(self.turns), conversation=self.conversation,
                                  turn=self.asked)
        self.turns.append((question.strip(), answer.text.strip()))
        return answer

    def reset(self) -> None:
        """Forget the conversation (the pool's memory is not touched)."""
        self.turns.clear()

    def inject(self, found: Sequence, **kwargs) -> InjectReport:
        """Add what `find` found to the pool mid-conversation (the first creates a new pool); the
        next answer reads it."""
        try:
            return self.backend.inject(self.pool, found, **kwargs)
        finally:
            self._started()


def open_session(backend: Backend, pool: str, *, sampling: Sampling | None = None,
                 max_new_tokens: int | None = None) -> ChatSession:
    """`Backend.chat` as every backend does it: a pool that does not exist yet is a new, empty one
    (the session's first inject creates it); an existing one is held loaded."""
    new = not backend.pool_exists(pool)
    if not new:
        backend.hold(pool)
    return ChatSession(backend, pool, max_new_tokens=max_new_tokens, sampling=sampling, new=new)
