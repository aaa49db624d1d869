"""The library facade (`Memcli`): models bound to pools, and what a pool is asked and given.

    app = Memcli()                                   # settings from config file / environment
    report = app.inject("work", ["notes.pdf"])       # files -> chunks (512 tokens) -> memory updates
    answer = app.ask("work", "When does the train leave?", on_text=print)
    chat = app.chat("work"); chat.ask("Who is Bob?"); chat.ask("And his sister?")  # a conversation

A loaded model is kept per model name, so switching pools never reloads weights. Inject holds the
pool's writer lock for its whole run (memcli.ingest.pipeline: commits after every file and every
`COMMIT_EVERY` chunks of a long file; Ctrl-C keeps every committed chunk); running the same command
again skips what is already in and resumes a file where it stopped. The command line reaches this
through `memcli.app.local.LocalBackend`, a server's client through `memcli.server.remote`.

torch, the engine and the tokenizer are imported where a model is needed: listing pools and
models, reading a pool's facts and the settings stay light.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

from memcli.app import pools as pools_read
from memcli.app.models import LoadedModel, binding_mismatch, host_resident, model_identity, model_is_here, normalize_model
from memcli.app.settings import Settings, load_settings
from memcli.base.errors import MemcliError
from memcli.wire import Answer, Event, InjectReport, Sampling

if TYPE_CHECKING:  # pragma: no cover
    from memcli.app.backend import ChatSession
    from memcli.pools.pool import Pool
    from memcli.pools.meta import PoolStore


class Memcli:
    def __init__(self, settings: Settings | None = None, store: "PoolStore | None" = None,
                 on_load: Callable[[str, str], None] | None = None):
        from memcli.pools.meta import PoolStore

        self.settings = settings or load_settings()
        self.store = store or PoolStore()
        self._models: dict[str, LoadedModel] = {}
        self._pools: dict[str, "Pool"] = {}  # pools kept in memory by chat sessions
        # how many pool states keep their memory K/V at once (one: a CLI process reads one pool;
        # a server keeps more, within its memory budget)
        self.cached_states = 1
        # called with the pool an inject leaves committed (a server keeps that state, whose memory
        # K/V the inject kept up to date, as the pool's resident one: the next ask builds nothing)
        self.after_inject: Callable[["Pool"], None] | None = None
        # called with (model name, device) just before a model's weights are loaded
        self.on_load = on_load

    # ------------------------------------------------------------------ models
    def model(self, name: str | None = None, on_load: Callable[[str, str], None] | None = None) -> LoadedModel:
        """The model loaded (weights, tokenizer, engine), once per name; `on_load(name, device)`
        (else the facade's own) is told just before weights load."""
        name = normalize_model(name or self.settings.model)
        on_load = on_load or self.on_load
        if name not in self._models:
            from memcli.core.config import ConfigError
            from memcli.core.engine import Engine
            from memcli.loading.checkpoints import CheckpointError, load_checked_tokenizer, load_model, resolve_checkpoint
            from memcli.pools import meta as pool_meta

            try:
                device = self.settings.resolved_device()  # a missing device is said first
                self._check_runs_here(name, device)  # before a download that could not run anyway
                folder = resolve_checkpoint(name)
                dtype = self.settings.resolved_dtype()
                if on_load is not None:
                    on_load(name, device)
                transformer, reader = load_model(folder, device=device, dtype=dtype,
                                                 quant=self.settings.resolved_quant(), threads=self.settings.threads)
                tokenizer = load_checked_tokenizer(folder)  # a damaged tokenizer file: one line naming it
            except (ConfigError, CheckpointError, ValueError) as err:
                raise MemcliError(str(err)) from None
            cfg = transformer.cfg
            self._models[name] = LoadedModel(
                name=name,
                folder=folder,
                engine=Engine(transformer, cached_states=self.cached_states, compile_decode=self.settings.compile),
                tokenizer=tokenizer,
                binding=pool_meta.Binding(name, cfg.family, cfg.fingerprint(), cfg.num_tokens,
                                      legacy_hashes=(cfg.legacy_fingerprint(),)),
                state_dtype=dtype,
                device=device,
                reader=reader,  # for initial states of new pools
            )
        return self._models[name]

    def _check_runs_here(self, name: str, device: str) -> None:
        """A published model that cannot run on this machine (on the CPU, and more memory than the
        machine has: doctor's check) is refused in one line that names what can run here: the
        bundled memcli-tiny and the offline demo, not a 39 GB download. The default model stays the
        default (switching to a toy silently would surprise); the message says how to switch."""
        from memcli.app import doctor
        from memcli.loading.catalog import OFFLINE_HINT, cpu_memory_problem

        if device != "cpu":
            return
        problem = cpu_memory_problem(name, self.settings.resolved_quant(), doctor.host_memory()["total_bytes"])
        if problem is None:
            return
        import torch

        why = "no CUDA GPU" if not torch.cuda.is_available() else f"the device is cpu ({self.settings.where('device')})"
        default = name == self.settings.model and "model" not in self.settings.origin
        which = f"{name} (the default model)" if default else name
        raise MemcliError(f"{which} cannot run on this machine: {why}, and {problem}; {OFFLINE_HINT}")

    # ------------------------------------------------------------------ pools
    def require_pool(self, name: str) -> str:
        """`name` if that pool exists; else a one-line error naming the closest pool."""
        return pools_read.require_pool(self.store, name)

    def pool_exists(self, name: str) -> bool:
        """Whether pool `name` exists (an invalid name is refused)."""
        return pools_read.pool_exists(self.store, name)

    def pool_model_name(self, name: str, model: str | None = None) -> str:
        """The model a pool runs on (or, for a new pool, the requested/default one), resolved
        without loading weights (a server resolves it with its client's settings).

        For an existing pool, a model named for this run (`model`, --model or MEMCLI_MODEL) is
        used instead of the recorded one when its config.json has the pool's fingerprint — checked
        before any weights are read — and so is the configured model when the recorded one is not
        on this machine (a folder that moved)."""
        from memcli.pools import meta as pool_meta

        if not self.store.exists(name):
            return normalize_model(model or self.settings.model)
        binding = pool_meta.read_binding(self.store, name)
        wanted = model or (self.settings.model if self.settings.explicit("model") else None)
        if wanted is not None and normalize_model(wanted) != binding.model:
            problem = binding_mismatch(name, binding, model_identity(wanted))
            if problem is not None:
                raise pool_meta.PoolModelMismatch(problem)
            return normalize_model(wanted)
        if model_is_here(binding.model):
            return binding.model
        fallback = self.settings.model
        if fallback != binding.model and model_is_here(fallback) and \
                binding_mismatch(name, binding, model_identity(fallback)) is None:
            return normalize_model(fallback)
        raise MemcliError(
            f"pool {name} belongs to model {binding.model}, which is not on this machine; give the same "
            f"model with --model (its config.json must match) or record where it is now: "
            f"memcli pool rebind {name} --model PATH"
        )

    def open_pool(self, name: str, model: str | None = None, create: bool = False) -> tuple[LoadedModel, "Pool"]:
        from memcli.loading.checkpoints import initial_state
        from memcli.pools import pool as pools
        from memcli.store import validate_name

        validate_name(name)
        if name in self._pools:
            pool = self._pools[name]
            return self.model(pool.binding.model), pool
        if not create:
            self.require_pool(name)
        loaded = self.model(self.pool_model_name(name, model))
        if self.store.exists(name):
            return loaded, self.load_pool(name, loaded)
        state = host_resident(initial_state(loaded.reader, loaded.cfg, "cpu", loaded.state_dtype), loaded)
        return loaded, pools.create(self.store, name, loaded.binding, state)

    def load_pool(self, name: str, loaded: LoadedModel) -> "Pool":
        """The pool's last commit, read from the store."""
        from memcli.pools import pool as pools

        pool = pools.load(self.store, name, loaded.binding, device="cpu", dtype=loaded.state_dtype)
        host_resident(pool.state, loaded)
        return pool

    def keep_open(self, name: str) -> None:
        """Keep a pool's state in memory across calls (chat sessions)."""
        self._pools[name] = self.open_pool(name)[1]

    def rebind(self, name: str, model: str) -> dict:
        """Record `model` as pool `name`'s model, after checking from its config.json alone that it
        is the same model (family and config fingerprint). For a pool whose model folder moved, or
        to switch between a folder and the hub id of the same checkpoint."""
        from memcli.pools import meta as pool_meta

        self.require_pool(name)
        identity = model_identity(model)
        with self.store.writer(name):
            manifest = self.store.read_manifest(name)
            meta = dict(manifest.get("meta") or {})
            binding = pool_meta.read_binding(self.store, name)
            problem = binding_mismatch(name, binding, identity)
            if problem is not None:
                raise pool_meta.PoolModelMismatch(problem)
            meta["model"] = {**meta["model"], "model": identity.model}
            self.store.commit(name, meta=meta, part_ids=list(manifest["parts"]), new_parts={},
                              expect_version=int(manifest["version"]))
        self._pools.pop(name, None)
        return {"pool": name, "model": identity.model, "previous": binding.model, "family": identity.family,
                "config_hash": identity.config_hash}

    def pool_info(self, name: str) -> dict:
        """`memcli pool info --json` (memcli.app.pools.pool_info)."""
        return pools_read.pool_info(self.store, name)

    def list_pools(self) -> list[dict]:
        """`memcli pool ls --json` (memcli.app.pools.list_pools)."""
        return pools_read.list_pools(self.store)

    # ------------------------------------------------------------------ inject
    def inject(self, pool_name: str, paths: Iterable[str], *, model: str | None = None,
               chunk_tokens: int | None = None, glob: str | None = None, force: bool = False,
               type: str | None = None, encoding: str | None = None, stdin: BinaryIO | None = None,
               on_event: Callable[[Event], None] | None = None,
               take_loaded: Callable[[], "Pool | None"] | None = None) -> InjectReport:
        """Inject files, folders or "-" (stdin) into a pool (created, bound to `model`, if new).

        What is read is found first (so bad input is said before a model loads): files inside
        folders that match `glob` and are not of a binary type; `type` forces how files are read
        (extract.TYPES), `encoding` their text encoding. `take_loaded()`, called under the pool's
        writer lock, may hand over a loaded state of the pool at its committed version to inject
        into (None: it is loaded)."""
        from memcli.app.backend import find
        from memcli.store import validate_name

        validate_name(pool_name)
        found = find(paths, glob=glob, type=type, encoding=encoding)
        report = InjectReport(pool=pool_name, model="")
        items = report.count_ignored(found)
        return self.ingest(pool_name, items, report, model=model, chunk_tokens=chunk_tokens, force=force,
                           stdin=stdin, on_event=on_event, take_loaded=take_loaded)

    def ingest(self, pool_name: str, items: list, report: InjectReport, *, model: str | None = None,
               chunk_tokens: int | None = None, force: bool = False, stdin: BinaryIO | None = None,
               on_event: Callable[[Event], None] | None = None,
               take_loaded: Callable[[], "Pool | None"] | None = None) -> InjectReport:
        """Inject found sources (and the files found unreadable, in their places) into a pool:
        the model and the chunk size resolved and checked, the pool opened under its writer lock,
        then `memcli.ingest.pipeline.Run`. A pool this call created but never wrote to is not left
        behind (bad input leaves no trace)."""
        from memcli.ingest.pipeline import Run
        from memcli.loading.vocabulary import UnknownWords
        from memcli.store import validate_name

        validate_name(pool_name)
        self.store.check_writable()  # a read-only home: said in one line before a model loads
        loaded = self.model(self.pool_model_name(pool_name, model)) if self.store.exists(pool_name) else self.model(model)
        report.model = loaded.name
        limit = loaded.max_input_tokens()
        least = loaded.min_chunk_tokens()
        if chunk_tokens is None:
            chunk_tokens = max(loaded.chunk_tokens(), least)
        if chunk_tokens < least:
            raise MemcliError(f"--chunk-tokens must be at least {least} (the shortest context {loaded.name} "
                              f"takes), not {chunk_tokens}")
        if chunk_tokens > limit:
            raise MemcliError(f"--chunk-tokens {chunk_tokens} is longer than {loaded.name} reads at once ({limit} tokens)")
        started = time.perf_counter()
        created = not self.store.exists(pool_name)
        try:
            with self.store.writer(pool_name):
                # a state of the pool at its committed version that somebody hands over (a server's
                # resident one, with its memory K/V: the inject updates them row by row), else loaded
                pool = take_loaded() if take_loaded is not None and self.store.exists(pool_name) else None
                if pool is None:
                    _, pool = self.open_pool(pool_name, model=loaded.name, create=True)
                run = Run(self.store, loaded, pool, report, chunk_tokens, least, UnknownWords(loaded.tokenizer, loaded.name),
                          reload=lambda: self.load_pool(pool_name, loaded), force=force, stdin=stdin,
                          emit=on_event or (lambda event: None))
                report = run.ingest(items, started)
                if self.after_inject is not None:
                    self.after_inject(pool)
            return report
        finally:
            if created and self.store.exists(pool_name) and not self.store.read_manifest(pool_name)["meta"].get("next_chunk"):
                self._pools.pop(pool_name, None)
                self.store.remove(pool_name)

    # ------------------------------------------------------------------ ask
    def ask(self, pool_name: str, question: str, *, max_new_tokens: int | None = None,
            sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None,
            history: Iterable[tuple[str, str]] | None = None, sources: bool = False) -> Answer:
        """Answer from the pool. `max_new_tokens=None` allows up to 256 tokens, or what the model's
        window leaves after the question when that is less. `history`: earlier (question, answer)
        turns of a conversation, oldest first; as many of the newest as fit the window go into the
        prompt (the oldest are dropped first). `sources`: also which sources the question read
        (`Answer.attribution`), from the very state the answer was read from."""
        from memcli.app.asking import ask_pool

        if not question or not question.strip():
            raise MemcliError("the question is empty")
        loaded, pool = self.open_pool(pool_name)
        return ask_pool(loaded, pool, question, history=history, max_new_tokens=max_new_tokens, sampling=sampling,
                        on_text=on_text, sources=sources)

    def chat(self, pool_name: str, *, max_new_tokens: int | None = None,
             sampling: Sampling | None = None) -> "ChatSession":
        """A conversation with a pool (`memcli.app.backend.ChatSession`): the pool stays loaded and
        earlier turns go into each prompt. A pool that does not exist yet is a new, empty one: the
        session's first inject creates it, bound to the configured model."""
        from memcli.app.local import LocalBackend

        return LocalBackend(self).chat(pool_name, max_new_tokens=max_new_tokens, sampling=sampling)
