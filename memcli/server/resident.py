"""What a running server keeps loaded, and the one device its requests take turns on.

* One `memcli.app.api.Memcli` per model, so each model's weights (one `Engine`) are loaded once and
  unloaded alone when its keep-alive runs out.
* Per pool, the state of its latest committed store version, keyed by (pool, created, version):
  a commit by an inject (in this server or in another process) gives a new key, so a question is
  always answered from the last commit, never from an inject's uncommitted chunks. States are
  kept least recently used first out within a memory budget (rows + their keys/values).
* `DeviceQueue`: only one request computes at a time; waiting requests are served round-robin
  per client, FIFO within a client. The device is taken in slices: an inject gives up its turn
  after every chunk and an answer after every token (`Job.checkpoint`) whenever another request
  waits, so a question on another pool (or on the same pool, from its last commit) is answered
  between two chunks or two tokens of a long request. Two answers never decode from one pool state
  at once (its keys/values buffer holds the question being answered): `Job.holding` waits for the
  pool's reader lock without holding the device.
* The queue counts slices: per request, how many it took and the most slices others took while it
  waited for one (`device_report`, in `memcli ps --json` under "device"; the tests' measure of
  fairness).
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from memcli.pools import pool as pools
from memcli.app.api import DEFAULT_ANSWER_TOKENS, Memcli, StopAfterChunk, normalize_model
from memcli.loading.prompts import chat_prompt_ids, context_ids, conversation_ids, has_chat_template
from memcli.app.settings import Settings
from memcli.pools.meta import PoolStore


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

    def acquire(self, client: str, cancelled: threading.Event | None = None, waited: list | None = None) -> object:
        """Wait for the device; `waited`, when given, gets the number of slices others ended while
        this ticket waited appended."""
        ticket = object()
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


PAUSE_ENV = "MEMCLI_TEST_PAUSE"  # tests only: see `Job.checkpoint`


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
    registry: "Resident | None" = None  # told when the job starts waiting and when it ends (ps)
    _ticket: object | None = None

    def __enter__(self) -> "Job":
        if self.registry is not None:
            self.registry._job_started(self)
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
            self.registry._job_ended(self)

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
        if os.environ.get(PAUSE_ENV):
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
        """Tests only (MEMCLI_TEST_PAUSE=FILE): while FILE exists, wait here, holding the device, after
        creating FILE.reached; FILE may name where to wait (token, chunk, commit, file, file:N).
        A cancel or a stop request ends the wait."""
        path = os.environ[PAUSE_ENV]
        try:
            with open(path) as f:
                wanted = f.read().strip()
        except OSError:
            return
        if wanted and wanted != where and not (wanted == "file" and where.startswith("file:")):
            return
        open(path + ".reached", "a").close()
        while os.path.exists(path):
            self.check_cancelled()
            if self.stop_requested.is_set():
                return
            time.sleep(0.02)


# --------------------------------------------------------------------------- loaded things
class ServedMemcli(Memcli):
    """A Memcli that logs the server's uploaded copies of files under the names the client gave."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels: dict[str, str] = {}  # spool path -> the client's name for it
        # every resident pool state keeps its memory K/V (the state owns it); the server's memory
        # budget decides which states stay, and a state it drops takes its K/V with it
        self.cached_states = 1 << 16

    def source_label(self, path: str) -> str:
        return self.labels.get(path, path)


@dataclass
class ResidentModel:
    name: str
    app: Memcli
    loaded_at: float
    active: int = 0  # requests using it now (never unloaded while > 0)
    expires_at: float | None = None  # None: kept until the server stops (or while active)
    device: str = ""
    weights_bytes: int = 0


@dataclass
class ResidentState:
    pool: str
    model: str
    version: int
    state: pools.Pool
    bytes: int
    last_used: float


def state_bytes(pool: pools.Pool, loaded) -> int:
    """Host rows plus the memory keys/values a question builds from them (K rotated + unrotated, V)."""
    state = pool.state
    total = sum(t.numel() * t.element_size() for t in (state.slots, state.order, state.origin) if t is not None)
    ltm = getattr(state, "ltm", None)
    if ltm is not None:
        total += sum(t.numel() * t.element_size() for t in (ltm.rows, ltm.keys) if t is not None)
    cfg = loaded.cfg
    itemsize = torch.empty((), dtype=loaded.engine.model.dtype).element_size()
    total += 3 * cfg.num_layers * cfg.num_kv_heads * state.num_rows * cfg.head_dim * itemsize
    return total


def _module_bytes(module) -> int:
    """Bytes of a model's weights and buffers as loaded (packed sizes for quantized weights)."""
    try:
        tensors = list(module.parameters()) + list(module.buffers())
    except AttributeError:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors)


def default_budget() -> int:
    """Half of this machine's memory for pool states (weights are not counted)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


class Resident:
    def __init__(self, settings: Settings, store: PoolStore | None = None, keep_alive: float | None = 300.0,
                 budget_bytes: int | None = None, log: Callable[[str], None] | None = None):
        self.settings = settings
        self.store = store or PoolStore()
        self.keep_alive = keep_alive
        self.budget = budget_bytes if budget_bytes is not None else default_budget()
        self.device = DeviceQueue()
        self.log = log or (lambda line: None)
        self._lock = threading.Lock()  # guards the two tables below (ps reads them from elsewhere)
        self._models: dict[str, ResidentModel] = {}
        self._states: OrderedDict[tuple, ResidentState] = OrderedDict()
        self._closed = threading.Event()
        # a server started by a command exits once nothing has been loaded for this long (None: never)
        self.exit_when_idle: float | None = None
        self.on_idle: Callable[[], bool] | None = None  # True when it did stop the server
        self._idle_since = time.time()
        self._sweeper = threading.Thread(target=self._sweep, name="memcli-keep-alive", daemon=True)
        self._sweeper.start()
        self.unloads = 0  # models unloaded so far (for ps and tests)
        self._readers: dict[tuple[str, str], threading.Lock] = {}  # (model, pool) -> its answers' lock
        self._jobs: set[Job] = set()  # requests with a claim on the device
        self._ended: deque = deque(maxlen=32)  # reports of the last requests that ended

    def job(self, client: str, kind: str = "", pool: str = "") -> Job:
        return Job(self.device, client, kind=kind, pool=pool, registry=self)

    def _job_started(self, job: Job) -> None:
        with self._lock:
            self._jobs.add(job)

    def _job_ended(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)
            self._ended.append(job.report())

    def device_report(self) -> dict:
        """The device's turns and slices, the requests holding or waiting for it and the last that
        ended (each: its slices and the most slices others ended while it waited for a turn)."""
        with self._lock:
            running = [job.report() for job in self._jobs]
            ended = list(self._ended)
        return {"turns": self.device.turns, "slices": self.device.slices, "waiting": self.device.waiting(),
                "requests": running, "ended": ended}

    def reader_lock(self, model: str, pool: str) -> threading.Lock:
        """The lock an answer holds while it decodes from a pool's state (one at a time per state)."""
        with self._lock:
            return self._readers.setdefault((model, pool), threading.Lock())

    def loaded_models(self) -> set[str]:
        with self._lock:
            return set(self._models)

    # ------------------------------------------------------------------ models
    def settings_for(self, model: str | None = None, explicit: bool = False) -> Settings:
        """The settings a request runs with: the server's, with the client's model (its --model,
        MEMCLI_MODEL or config file; `explicit` when given for this run) where it sent one."""
        if not model:
            return self.settings
        origin = {**self.settings.origin, "model": "command line" if explicit else "config file"}
        return replace(self.settings, model=normalize_model(model), origin=origin)

    def model_of(self, pool: str | None, settings: Settings | None = None) -> str:
        """The model a request runs on, resolved as `Memcli` resolves it (the pool's own, one
        named for this run if its config has the pool's fingerprint, or for a new pool the asked
        or default one), without loading weights."""
        resolver = Memcli(settings or self.settings, self.store)
        if pool is None:
            return normalize_model(resolver.settings.model)
        return resolver.pool_model_name(pool)

    def use_model(self, name: str) -> ResidentModel:
        """The resident model (loaded now if needed), marked in use until `done_with`."""
        with self._lock:
            resident = self._models.get(name)
            if resident is None:
                app = ServedMemcli(self.settings, self.store)
                app.after_inject = lambda pool, model=name: self.adopt(model, pool)
                resident = ResidentModel(name, app, time.time())
                self._models[name] = resident
            resident.active += 1
            resident.expires_at = None
        try:
            loaded = resident.app.model(name)  # loads the weights on first use (under the device turn)
            resident.device = loaded.device
            if not resident.weights_bytes:
                resident.weights_bytes = _module_bytes(loaded.engine.model)
        except BaseException:
            self.done_with(resident)
            raise
        return resident

    def done_with(self, resident: ResidentModel) -> None:
        unload = False
        with self._lock:
            resident.active -= 1
            if resident.active == 0:
                if self.keep_alive is None:
                    resident.expires_at = None
                elif self.keep_alive == 0:
                    unload = True
                else:
                    resident.expires_at = time.time() + self.keep_alive
        if unload:
            self._unload(resident.name, only_if_idle=True)

    def _unload(self, name: str, only_if_idle: bool) -> bool:
        with self._lock:
            resident = self._models.get(name)
            if resident is None or (only_if_idle and resident.active):
                return False
            del self._models[name]
            for key in [k for k, s in self._states.items() if s.model == name]:
                del self._states[key]
            self.unloads += 1
        del resident
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.log(f"unloaded {name}")
        return True

    def _sweep(self) -> None:
        while not self._closed.wait(0.25):
            now = time.time()
            with self._lock:
                due = [r.name for r in self._models.values() if not r.active and r.expires_at is not None and r.expires_at <= now]
            for name in due:
                self._unload(name, only_if_idle=True)
            with self._lock:
                if self._models:
                    self._idle_since = now
                    continue
            if self.exit_when_idle is not None and self.on_idle is not None and now - self._idle_since >= self.exit_when_idle:
                if self.on_idle():
                    return
                self._idle_since = now

    def close(self) -> None:
        self._closed.set()
        for name in list(self._models):
            self._unload(name, only_if_idle=False)

    # ------------------------------------------------------------------ pool states
    def pool_state(self, resident: ResidentModel, pool: str) -> pools.Pool:
        """The pool's state at its latest committed version (call with the device turn held)."""
        resident.app.require_pool(pool)
        manifest = self.store.read_manifest(pool)
        key = (pool, manifest.get("created"), manifest.get("version"))
        with self._lock:
            entry = self._states.get(key)
            if entry is not None:
                entry.last_used = time.time()
                self._states.move_to_end(key)
                return entry.state
        loaded, state = resident.app.open_pool(pool, model=resident.name)
        if state.version != key[2]:  # committed again between the manifest read and the load
            key = (pool, key[1], state.version)
        self._keep(key, ResidentState(pool, resident.name, state.version, state, state_bytes(state, loaded), time.time()))
        return state

    def take_state(self, model: str, pool: str, job: Job) -> pools.Pool | None:
        """Hand the pool's resident state at its committed version over to an inject (call under
        the pool's writer lock, with the device turn held): the inject updates it and its memory
        K/V in place, so it leaves the table first, once an answer decoding from it is done; a
        question asked meanwhile loads the last commit afresh. None when none is resident."""
        manifest = self.store.read_manifest(pool)
        key = (pool, manifest.get("created"), manifest.get("version"))
        with job.holding(self.reader_lock(model, pool)):
            with self._lock:
                entry = self._states.get(key)
                if entry is None or entry.model != model:
                    return None
                del self._states[key]
        return entry.state

    def adopt(self, model: str, pool: pools.Pool) -> None:
        """Keep the state an inject just committed as the pool's resident state: its memory K/V
        were updated incrementally through the inject, so the next question reads them instead of
        loading the pool again and rebuilding every row. The inject is over (nothing changes the
        state any more); a version committed since by another process is left to the next read."""
        manifest = self.store.read_manifest(pool.name)
        if manifest.get("version") != pool.version:
            return
        with self._lock:
            resident = self._models.get(model)
        if resident is None:
            return
        loaded = resident.app.model(model)
        key = (pool.name, manifest.get("created"), pool.version)
        self._keep(key, ResidentState(pool.name, model, pool.version, pool, state_bytes(pool, loaded), time.time()))

    def _keep(self, key: tuple, entry: ResidentState) -> None:
        """Make `entry` the pool's one resident state, then evict the least recently used states
        beyond the memory budget."""
        pool = entry.pool
        with self._lock:
            for old in [k for k in self._states if k[0] == pool]:
                del self._states[old]  # an older version of this pool is never asked again
            self._states[key] = entry
            used = sum(s.bytes for s in self._states.values())
            while used > self.budget and len(self._states) > 1:
                _, evicted = self._states.popitem(last=False)
                used -= evicted.bytes
                self.log(f"evicted pool {evicted.pool} (version {evicted.version}) to stay within the memory budget")

    def forget_pool(self, pool: str) -> None:
        with self._lock:
            for key in [k for k in self._states if k[0] == pool]:
                del self._states[key]

    # ------------------------------------------------------------------ ps
    def snapshot(self) -> dict:
        with self._lock:
            models = []
            for r in self._models.values():
                states = [s for s in self._states.values() if s.model == r.name]
                models.append({
                    "model": r.name,
                    "device": r.device,
                    "loaded_at": r.loaded_at,
                    "active_requests": r.active,
                    "expires_at": r.expires_at,
                    "forever": r.expires_at is None and self.keep_alive is None,
                    "pools": [{"pool": s.pool, "version": s.version, "bytes": s.bytes, "last_used": s.last_used}
                              for s in states],
                    "pool_bytes": sum(s.bytes for s in states),
                    "weights_bytes": r.weights_bytes,
                })
            return {"models": models, "keep_alive_seconds": self.keep_alive, "memory_budget_bytes": self.budget,
                    "pool_bytes": sum(s.bytes for s in self._states.values()), "unloads": self.unloads}


# --------------------------------------------------------------------------- OpenAI conversations
def conversation_prompt(loaded, messages: list[dict], max_new_tokens: int | None) -> tuple[list[int], int]:
    """An OpenAI conversation's prompt within the model's window, by the rules of `Memcli.ask`
    with a history: the oldest turns are dropped first (system messages last of all) while the
    prompt and min(answer, half the window) do not fit; the final user message always stays.
    Returns (ids, messages dropped).

    The candidates, from the smallest: the final message after the newest k system messages
    (k = 0..S), then after every system message and the newest j other messages; the largest that
    fits is found from the small end (`prompts.newest_that_fit`), so the time depends on what is
    kept, not on how many messages are dropped."""
    from memcli.loading.prompts import newest_that_fit

    limit = loaded.max_input_tokens()
    reserve = min(DEFAULT_ANSWER_TOKENS if max_new_tokens is None else max_new_tokens, limit // 2)
    final = len(messages) - 1
    system = [i for i in range(final) if messages[i]["role"] == "system"]
    others = [i for i in range(final) if messages[i]["role"] != "system"]

    def kept(t: int) -> list[int]:
        if t <= len(system):
            return system[len(system) - t:] + [final]
        j = t - len(system)
        return sorted(system + others[len(others) - j:]) + [final]

    def attempt(t: int):
        chosen = kept(t)
        ids = _conversation_ids(loaded.tokenizer, [messages[i] for i in chosen])
        return len(ids) + reserve <= limit, (ids, len(messages) - len(chosen))

    _, (ids, dropped) = newest_that_fit(len(system) + len(others), attempt)
    return ids, dropped


def _conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat models: their chat template, every message as it is. Base models: the prompt of
    `prompts.conversation_ids` (earlier `Question: ... Answer: ...` lines), system messages as
    lines in front."""
    if has_chat_template(tokenizer):
        return chat_prompt_ids(tokenizer, messages)
    lines = [m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip()]
    turns, asked = [], None
    for message in messages:
        if message["role"] == "user":
            if asked is not None:
                turns.append((asked, ""))
            asked = message["content"].strip()
        elif message["role"] == "assistant":
            turns.append((asked or "", message["content"].strip()))
            asked = None
    question = asked or ""
    prompt = conversation_ids(tokenizer, turns, question)
    if not lines:
        return prompt
    return context_ids(tokenizer, "\n".join(lines) + "\n") + prompt


_client_ids = itertools.count()


def anonymous_client() -> str:
    return f"request-{next(_client_ids)}"
