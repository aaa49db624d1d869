"""What a running server keeps loaded, and the one device its requests take turns on.

* One `memcli.api.Memcli` per model, so each model's weights (one `Engine`) are loaded once and
  unloaded alone when its keep-alive runs out.
* Per pool, the state of its latest committed store version, keyed by (pool, created, version):
  a commit by an inject (in this server or in another process) gives a new key, so a question is
  always answered from the last commit, never from an inject's uncommitted chunks. States are
  kept least recently used first out within a memory budget (rows + their keys/values).
* `DeviceQueue`: only one request computes at a time; waiting requests are served round-robin
  per client, FIFO within a client. An inject gives up its turn after every chunk, so a question
  on another pool (or on the same pool, from its last commit) is answered between two chunks.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import pool as pools
from .api import DEFAULT_ANSWER_TOKENS, Memcli, StopAfterChunk, normalize_model
from .prompts import chat_prompt_ids, context_ids, conversation_ids, has_chat_template
from .settings import Settings
from .store import PoolStore


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

    def acquire(self, client: str, cancelled: threading.Event | None = None) -> object:
        ticket = object()
        with self._cond:
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
            return ticket

    def release(self, ticket: object) -> None:
        with self._cond:
            if self._holder is ticket:
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


@dataclass(eq=False)
class Job:
    """One request's claim on the device, and the flag its client's disconnect sets."""

    queue: DeviceQueue
    client: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False  # cancelled because the server stops (the client is still there to be told)
    stop_requested: threading.Event = field(default_factory=threading.Event)  # the client is still there
    _ticket: object | None = None

    def __enter__(self) -> "Job":
        self._ticket = self.queue.acquire(self.client, self.cancelled)
        return self

    def __exit__(self, *exc) -> None:
        self.queue.release(self._ticket)
        self._ticket = None

    def check_cancelled(self) -> None:
        """Stop here if the client left (between two tokens of an answer)."""
        if self.cancelled.is_set():
            raise Cancelled()

    def check_stop_requested(self) -> None:
        """Stop here if the client asked to (its first Ctrl-C, between two chunks of an inject): the
        inject commits the chunk just made and reports what it kept."""
        if self.stop_requested.is_set():
            raise StopAfterChunk()

    def checkpoint(self) -> None:
        """Between two chunks of an inject: stop if the client left; let waiting requests go first."""
        self.check_cancelled()
        if self._ticket is not None and self.queue.others_waiting():
            self.queue.release(self._ticket)
            self._ticket = None
            self._ticket = self.queue.acquire(self.client, self.cancelled)


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

    def job(self, client: str) -> Job:
        return Job(self.device, client)

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
                resident = ResidentModel(name, ServedMemcli(self.settings, self.store), time.time())
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
        entry = ResidentState(pool, resident.name, state.version, state, state_bytes(state, loaded), time.time())
        with self._lock:
            for old in [k for k in self._states if k[0] == pool]:
                del self._states[old]  # an older version of this pool is never asked again
            self._states[key] = entry
            used = sum(s.bytes for s in self._states.values())
            while used > self.budget and len(self._states) > 1:
                _, evicted = self._states.popitem(last=False)
                used -= evicted.bytes
                self.log(f"evicted pool {evicted.pool} (version {evicted.version}) to stay within the memory budget")
        return state

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
    Returns (ids, messages dropped)."""
    limit = loaded.max_input_tokens()
    reserve = min(DEFAULT_ANSWER_TOKENS if max_new_tokens is None else max_new_tokens, limit // 2)
    kept = list(messages)
    dropped = 0
    while True:
        ids = _conversation_ids(loaded.tokenizer, kept)
        if len(ids) + reserve <= limit or len(kept) == 1:
            return ids, dropped
        turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        kept.pop(turns[0] if turns else 0)
        dropped += 1


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
