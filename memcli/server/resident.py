"""What a running server keeps loaded: models, and the pools' states at their last commit.

* One `memcli.app.api.Memcli` per model, so each model's weights (one `Engine`) are loaded once and
  unloaded alone when its keep-alive runs out.
* Per pool, the state of its latest committed store version (`ResidentPool`), keyed by (pool,
  created, version): a commit by an inject (in this server or in another process) gives a new key,
  so a question is always answered from the last commit, never from an inject's uncommitted
  chunks. They are kept least recently used first out within a memory budget (rows + their
  keys/values). An inject continues from the resident state (`take_state`) and the state it
  commits stays resident (`adopt`): the next question reads the memory K/V the inject kept.
* The requests' turns on the device are `memcli.server.queue`'s; the routes are memcli.server.http's
  and memcli.server.openai's.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Callable

import torch

from memcli.app.api import Memcli
from memcli.app.models import normalize_model
from memcli.app.settings import Settings
from memcli.pools import pool as pools
from memcli.server.queue import DeviceQueue, Job
from memcli.pools.meta import PoolStore

# --------------------------------------------------------------------------- loaded things
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
class ResidentPool:
    """A pool's state at one committed version, kept loaded."""

    name: str
    model: str
    version: int
    pool: pools.Pool
    bytes: int
    last_used: float


def pool_bytes(pool: pools.Pool, loaded) -> int:
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
        self._pools: OrderedDict[tuple, ResidentPool] = OrderedDict()
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
        self.on_model_loaded: Callable[[float], None] | None = None  # seconds a model's weights took (metrics)

    def job(self, client: str, kind: str = "", pool: str = "") -> Job:
        return Job(self.device, client, kind=kind, pool=pool, registry=self)

    def job_started(self, job: Job) -> None:
        with self._lock:
            self._jobs.add(job)

    def job_ended(self, job: Job) -> None:
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

    def use_model(self, name: str, on_load: Callable[[str, str], None] | None = None) -> ResidentModel:
        """The resident model (loaded now if needed: `on_load(name, device)` first), marked in use
        until `done_with`."""
        with self._lock:
            resident = self._models.get(name)
            if resident is None:
                app = Memcli(self.settings, self.store)
                # every resident pool state keeps its memory K/V (the state owns it); the server's memory
                # budget decides which states stay, and a state it drops takes its K/V with it
                app.cached_states = 1 << 16
                app.after_inject = lambda pool, model=name: self.adopt(model, pool)
                resident = ResidentModel(name, app, time.time())
                self._models[name] = resident
            resident.active += 1
            resident.expires_at = None
        loading: list[float] = []

        def timed_load(model: str, device: str) -> None:
            loading.append(time.monotonic())
            if on_load is not None:
                on_load(model, device)

        try:
            loaded = resident.app.model(name, on_load=timed_load)  # loads the weights on first use (under the device turn)
            if loading and self.on_model_loaded is not None:
                self.on_model_loaded(time.monotonic() - loading[0])
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
            for key in [k for k, s in self._pools.items() if s.model == name]:
                del self._pools[key]
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
    def loaded_pool(self, resident: ResidentModel, pool: str) -> pools.Pool:
        """The pool at its latest committed version, loaded (call with the device turn held)."""
        resident.app.require_pool(pool)
        manifest = self.store.read_manifest(pool)
        key = (pool, manifest.get("created"), manifest.get("version"))
        with self._lock:
            entry = self._pools.get(key)
            if entry is not None:
                entry.last_used = time.time()
                self._pools.move_to_end(key)
                return entry.pool
        loaded, opened = resident.app.open_pool(pool, model=resident.name)
        if opened.version != key[2]:  # committed again between the manifest read and the load
            key = (pool, key[1], opened.version)
        self._keep(key, ResidentPool(pool, resident.name, opened.version, opened, pool_bytes(opened, loaded), time.time()))
        return opened

    def take_pool(self, model: str, pool: str, job: Job) -> pools.Pool | None:
        """Hand the pool's resident state at its committed version over to an inject (call under
        the pool's writer lock, with the device turn held): the inject updates it and its memory
        K/V in place, so it leaves the table first, once an answer decoding from it is done; a
        question asked meanwhile loads the last commit afresh. None when none is resident."""
        manifest = self.store.read_manifest(pool)
        key = (pool, manifest.get("created"), manifest.get("version"))
        with job.holding(self.reader_lock(model, pool)):
            with self._lock:
                entry = self._pools.get(key)
                if entry is None or entry.model != model:
                    return None
                del self._pools[key]
        return entry.pool

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
        self._keep(key, ResidentPool(pool.name, model, pool.version, pool, pool_bytes(pool, loaded), time.time()))

    def _keep(self, key: tuple, entry: ResidentPool) -> None:
        """Make `entry` the pool's one resident state, then evict the least recently used states
        beyond the memory budget."""
        with self._lock:
            for old in [k for k in self._pools if k[0] == entry.name]:
                del self._pools[old]  # an older version of this pool is never asked again
            self._pools[key] = entry
            used = sum(s.bytes for s in self._pools.values())
            while used > self.budget and len(self._pools) > 1:
                _, evicted = self._pools.popitem(last=False)
                used -= evicted.bytes
                self.log(f"evicted pool {evicted.name} (version {evicted.version}) to stay within the memory budget")

    def forget_pool(self, pool: str) -> None:
        with self._lock:
            for key in [k for k in self._pools if k[0] == pool]:
                del self._pools[key]

    # ------------------------------------------------------------------ ps
    def snapshot(self) -> dict:
        with self._lock:
            models = []
            for r in self._models.values():
                states = [s for s in self._pools.values() if s.model == r.name]
                models.append({
                    "model": r.name,
                    "device": r.device,
                    "loaded_at": r.loaded_at,
                    "active_requests": r.active,
                    "expires_at": r.expires_at,
                    "forever": r.expires_at is None and self.keep_alive is None,
                    "pools": [{"pool": s.name, "version": s.version, "bytes": s.bytes, "last_used": s.last_used}
                              for s in states],
                    "pool_bytes": sum(s.bytes for s in states),
                    "weights_bytes": r.weights_bytes,
                })
            return {"models": models, "keep_alive_seconds": self.keep_alive, "memory_budget_bytes": self.budget,
                    "pool_bytes": sum(s.bytes for s in self._pools.values()), "unloads": self.unloads}
