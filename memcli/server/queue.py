"""The one device a server's requests take turns on, and each request's claim on it.

* `DeviceQueue`: only one request computes at a time; waiting requests are served round-robin
  per client, FIFO within a client. The device is taken in slices: an inject gives up its turn
  after every chunk and an answer after every token (`Job.checkpoint`) whenever another request
  waits, so a question on another pool (or on the same pool, from its last commit) is answered
  between two chunks or two tokens of a long request. Two answers never decode from one pool state
  at once (its keys/values buffer holds the question being answered): `Job.holding` waits for the
  pool's reader lock without holding the device.
* The queue counts slices: per request, how many it took and the most slices others took while it
  waited for one (`Job.report`, in `memcli ps --json` under "device"; the tests' measure of
  fairness).
* `Job.checkpoint` is where a request stops: its client left (`Cancelled`, a KeyboardInterrupt, so
  an inject returns to its last commit exactly as on Ctrl-C) or asked to stop (`StopAfterChunk`:
  the chunk just made is committed first).

Test hook: with MEMCLI_TEST_PAUSE=FILE, work waits at a slice boundary while FILE exists
(`memcli.base.pause`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

from memcli.base import pause
from memcli.ingest.pipeline import StopAfterChunk


class Cancelled(KeyboardInterrupt):
    """The client went away: its work stops at the next token or chunk. A KeyboardInterrupt, so
    an inject returns to its last commit exactly as on Ctrl-C."""


# --------------------------------------------------------------------------- the device's queue
class DeviceQueue:
    """One holder at a time; the next turn goes to the next waiting client in round-robin order."""

    def __init__(self):
        self._cond = threading.Condition()
        self._holder: object | None = None
        self._waiting: OrderedDict[str, deque] = OrderedDict()  # client -> its tickets, oldest first
        self.turns = 0  # turns granted so far
        self.slices = 0  # slices of work ended so far (`slice_done`)
        self.on_wait: Callable[[float], None] | None = None  # each turn's wait in seconds (server metrics)

    def acquire(self, client: str, cancelled: threading.Event | None = None, waited: list | None = None) -> object:
        """Wait for the device; `waited`, when given, gets the number of slices others ended while
        this ticket waited appended."""
        ticket = object()
        asked = time.monotonic()
        with self._cond:
            before = self.slices
            self._waiting.setdefault(client, deque()).append(ticket)
            try:
                while not (self._holder is None and self._first() is ticket):
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled()
                    self._cond.wait(0.1)
            except BaseException:
                self._drop(client, ticket)
                self._cond.notify_all()
                raise
            self._drop(client, ticket)
            if client in self._waiting:  # round-robin: this client's next ticket waits behind the others
                self._waiting.move_to_end(client)
            self._holder = ticket
            self.turns += 1
            if waited is not None:
                waited.append(self.slices - before)
        if self.on_wait is not None:
            self.on_wait(time.monotonic() - asked)
        return ticket

    def slice_done(self) -> None:
        with self._cond:
            self.slices += 1

    def release(self, ticket: object) -> None:
        with self._cond:
            if ticket is not None and self._holder is ticket:
                self._holder = None
            self._cond.notify_all()

    def waiting(self) -> int:
        """Tickets waiting for a turn."""
        with self._cond:
            return sum(len(t) for t in self._waiting.values())

    def others_waiting(self) -> bool:
        with self._cond:
            return bool(self._waiting)

    def _first(self):
        for tickets in self._waiting.values():
            return tickets[0]
        return None

    def _drop(self, client: str, ticket: object) -> None:
        tickets = self._waiting.get(client)
        if tickets is None:
            return
        try:
            tickets.remove(ticket)
        except ValueError:
            pass
        if not tickets:
            del self._waiting[client]




class Registry(Protocol):
    """Who keeps the list of requests with a claim on the device (the server's `Resident`, for ps)."""

    def job_started(self, job: "Job") -> None: ...

    def job_ended(self, job: "Job") -> None: ...


@dataclass(eq=False)
class Job:
    """One request's claim on the device, and the flag its client's disconnect sets."""

    queue: DeviceQueue
    client: str
    kind: str = ""  # what the request is (ask, chat, inject, pool info): for ps
    pool: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False  # cancelled because the server stops (the client is still there to be told)
    stop_requested: threading.Event = field(default_factory=threading.Event)  # the client is still there
    slices: int = 0  # slices of work this request ended (checkpoints passed, and its last one)
    waits: list = field(default_factory=list)  # per turn taken: slices others ended while it waited
    outcome: str = "waiting"  # running, done, cancelled or failed
    registry: "Registry | None" = None  # told when the job starts waiting and when it ends (ps)
    _ticket: object | None = None

    def __enter__(self) -> "Job":
        if self.registry is not None:
            self.registry.job_started(self)
        try:
            self._ticket = self.queue.acquire(self.client, self.cancelled, self.waits)
        except BaseException as err:
            self._ended(type(err))
            raise
        self.outcome = "running"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ticket is not None:
            self.slices += 1
            self.queue.slice_done()
        self.queue.release(self._ticket)
        self._ticket = None
        self._ended(exc_type)

    def _ended(self, exc_type) -> None:
        self.outcome = ("done" if exc_type is None else "cancelled" if issubclass(exc_type, KeyboardInterrupt)
                        else "failed")
        if self.registry is not None:
            self.registry.job_ended(self)

    def report(self) -> dict:
        return {"client": self.client, "kind": self.kind, "pool": self.pool, "state": self.outcome,
                "slices": self.slices, "turns": len(self.waits), "waited_slices_max": max(self.waits, default=0)}

    def check_cancelled(self) -> None:
        """Stop here if the client left (between two tokens of an answer)."""
        if self.cancelled.is_set():
            raise Cancelled()

    def check_stop_requested(self) -> None:
        """Stop here if the client asked to (its first Ctrl-C, between two chunks of an inject): the
        inject commits the chunk just made and reports what it kept."""
        if self.stop_requested.is_set():
            raise StopAfterChunk()

    def checkpoint(self, where: str = "") -> None:
        """A slice boundary (`where`: token, chunk, commit, or file:N before the Nth file of an
        inject): stop if the client left; let waiting requests go first."""
        self.check_cancelled()
        if self._ticket is None:
            return
        self.slices += 1
        self.queue.slice_done()
        if pause.wanted():
            self._test_pause(where)
        if self.queue.others_waiting():
            self._give_turn()
            self._take_turn()

    def _give_turn(self) -> None:
        self.queue.release(self._ticket)
        self._ticket = None

    def _take_turn(self) -> None:
        self._ticket = self.queue.acquire(self.client, self.cancelled, self.waits)

    @contextmanager
    def holding(self, lock: threading.Lock):
        """Hold `lock` for the block; while another request holds it, wait without the device turn
        (which that request may need to finish), then take the turn again."""
        if not lock.acquire(blocking=False):
            self._give_turn()
            try:
                while not lock.acquire(timeout=0.05):
                    self.check_cancelled()
            except BaseException:
                self._ticket = None
                raise
            try:
                self._take_turn()
            except BaseException:
                lock.release()
                raise
        try:
            yield
        finally:
            lock.release()

    def _test_pause(self, where: str) -> None:
        """Tests only (memcli.base.pause): wait here, holding the device; a cancel or a stop request
        ends the wait."""

        def ended() -> bool:
            self.check_cancelled()
            return self.stop_requested.is_set()

        pause.pause_at(where, ended)


_client_ids = itertools.count()


def anonymous_client() -> str:
    return f"request-{next(_client_ids)}"
