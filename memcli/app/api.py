"""The Python API: everything the command line does, callable and testable without it.

    app = Memcli()                                   # settings from config file / environment
    report = app.inject("work", ["notes.pdf"])       # files -> chunks (512 tokens) -> memory updates
    answer = app.ask("work", "When does the train leave?", on_text=print)
    chat = app.chat("work"); chat.ask("Who is Bob?"); chat.ask("And his sister?")  # a conversation

A loaded model is kept per model name, so switching pools never reloads weights. Inject holds the
pool's writer lock for its whole run and commits after every file (and every `COMMIT_EVERY` chunks
of a long file), so an interruption keeps every committed chunk and nothing half-written; running
the same command again skips what is already in and resumes a file where it stopped.

torch, the engine and the tokenizer are imported where a model is needed: listing pools and
models, reading a pool's facts and the settings stay light.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

from memcli.loading.catalog import CARD_CHUNK_TOKENS, CARD_MIN_CHUNK_TOKENS
from memcli.ingest.chunking import ChunkingError, Packed, Packer, chunk_token_ids, encode_pieces, share_rows
from memcli.base.clock import now_iso
from memcli.base.errors import MemcliError
from memcli.ingest.discover import Ignored, Skipped, Source, discover
from memcli.ingest.extract import ExtractError, Reading, iter_text, sha256_of
from memcli.app.settings import Settings, load_settings

if TYPE_CHECKING:  # pragma: no cover
    from memcli.core.engine import Engine, Sampling
    from memcli.loading.vocabulary import UnknownWords
    from memcli.pools.meta import Binding, PoolStore
    from memcli.pools.pool import Pool


def __getattr__(name: str):
    """`memcli.app.api.pools` (the pool module) on first use, so importing the API stays light."""
    if name == "pools":
        from memcli.pools import pool

        return pool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEFAULT_ANSWER_TOKENS = 256
COMMIT_EVERY = 64  # chunks of one long file between commits (bounds the work an interruption loses)
MIN_CHUNK_KEY = "memcli_min_chunk_tokens"  # config.json: the shortest context a model was trained on




@dataclass
class LoadedModel:
    name: str
    folder: Path
    engine: "Engine"
    tokenizer: object
    binding: "Binding"
    state_dtype: object  # torch.dtype
    device: str

    @property
    def cfg(self):
        return self.engine.cfg

    def max_input_tokens(self) -> int:
        """Longest question (+ answer) or chunk the model was trained for (`max_seq_length`)."""
        raw = self.cfg.raw
        return int(raw.get("max_seq_length") or 2 * self.cfg.num_tokens)

    def chunk_tokens(self) -> int:
        """Tokens per injected chunk unless --chunk-tokens says otherwise: the published
        checkpoints' 512, or what the model reads at once where that is less."""
        return min(CARD_CHUNK_TOKENS, self.max_input_tokens())

    def min_chunk_tokens(self) -> int:
        """The shortest context the model may be given: what its config.json declares
        (`memcli_min_chunk_tokens`; memcli-tiny: 20, the one chunk length it was trained on), else
        the published checkpoints' 16 (their model card's hard minimum)."""
        value = self.cfg.raw.get(MIN_CHUNK_KEY)
        if value is None:
            return CARD_MIN_CHUNK_TOKENS
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.max_input_tokens():
            raise MemcliError(f"{self.folder / 'config.json'}: {MIN_CHUNK_KEY} must be an integer from 1 to "
                              f"max_seq_length ({self.max_input_tokens()}), not {value!r}")
        return value


@dataclass
class FileResult:
    path: str
    status: str  # "injected" | "changed" | "resumed" | "already" | "skipped" ("pending": being packed)
    reason: str = ""
    chunks: int = 0
    tokens: int = 0
    packed: bool = False  # shorter than the model's minimum: packed into chunks shared with other texts


@dataclass
class InjectReport:
    pool: str
    model: str
    files: list[FileResult] = field(default_factory=list)
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    # on interruption: the file that was being injected and how many of its chunks are committed
    # (kept; the next run resumes after them). None when it had no committed chunk.
    partial: FileResult | None = None

    # files inside folders left out without being read: suffix -> count (binary formats), and
    # how many did not match --glob
    ignored_by_type: dict[str, int] = field(default_factory=dict)
    ignored_by_glob: int = 0
    # the words of what was read that the model has never seen (vocabulary.UnknownWords.to_json)
    unknown_words: dict | None = None

    @property
    def skipped(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "skipped"]

    def count(self, *statuses: str) -> int:
        return sum(1 for f in self.files if f.status in statuses)

    def skipped_by_reason(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for f in self.skipped:
            reasons[f.reason] = reasons.get(f.reason, 0) + 1
        return reasons

    def summary(self) -> dict:
        """The per-run counts: injected / already in / changed / resumed / skipped by reason /
        ignored by type."""
        return {
            "injected": self.count("injected"),
            "changed": self.count("changed"),
            "resumed": self.count("resumed"),
            "already": self.count("already"),
            "packed": sum(1 for f in self.files if f.packed and f.status in ("injected", "changed")),
            "skipped": len(self.skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "ignored_by_type": dict(sorted(self.ignored_by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
            "ignored_by_glob": self.ignored_by_glob,
        }

    def count_ignored(self, found: Iterable) -> list:
        """What discover() found, less the files it left out (counted here by reason and type)."""
        items = []
        for item in found:
            if not isinstance(item, Ignored):
                items.append(item)
            elif item.why == "glob":
                self.ignored_by_glob += 1
            else:
                key = item.suffix or "(no suffix)"
                self.ignored_by_type[key] = self.ignored_by_type.get(key, 0) + 1
        return items

    def to_json(self) -> dict:
        return {
            "pool": self.pool,
            "model": self.model,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "interrupted": self.interrupted,
            "summary": self.summary(),
            "files": [f.__dict__ for f in self.files],
            "partial": self.partial.__dict__ if self.partial else None,
            "unknown_words": self.unknown_words,
        }


@dataclass(eq=False)
class _Short:
    """A text shorter than the model's minimum, held until the end of its inject run to be packed
    with the run's other short texts (`Memcli._pack`)."""

    source: Source
    label: str  # the path it is logged under
    digest: str
    ids: list[int]
    previous: dict | None  # the log entry of its earlier version (a changed file)
    index: int  # file k of the run
    result: FileResult  # its place in the report, filled in once it is committed
    entry: dict | None = None  # its log entry, from its first packed chunk on


@dataclass
class _Run:
    """What one inject run carries from file to file."""

    chunk_tokens: int
    min_tokens: int
    unknown: "UnknownWords"
    shorts: list[_Short] = field(default_factory=list)
    # the chunk injected last: its ids and, per piece, (log entry, provenance serial) - what a last
    # packed chunk too short on its own is filled up with
    last: Packed | None = None


class StopAfterChunk(KeyboardInterrupt):
    """Raised by an inject's `on_event` (a server whose client asked to stop): at a "chunk" event
    that chunk is committed first; then the inject ends as on Ctrl-C, with `InjectInterrupted`."""


class InjectInterrupted(MemcliError):
    def __init__(self, report: InjectReport):
        super().__init__("interrupted; every completed file and committed chunk is kept")
        self.report = report


@dataclass
class Event:
    """Progress of an inject, for a progress display."""

    kind: str  # "file" | "chunk" | "skip" | "commit"
    path: str = ""
    chunks: int = 0  # chunks of this file injected by this run
    tokens: int = 0  # tokens of this file injected by this run
    file_index: int = 0  # "file k of n": k (1-based) ...
    files_total: int = 0  # ... and n, the files this run reads
    # how far into the file the chunk ends, in `unit`s (bytes of the file, pages of a PDF): an
    # estimate for an ETA; total None where unknown (stdin)
    done: float = 0
    total: int | None = None
    unit: str = "bytes"
    # wall time since this file's first chunk of this run began, and the position it began at
    # (a resumed file's skipped part counts neither in the rate nor in the ETA)
    seconds: float = 0.0
    start: float = 0
    reason: str = ""  # "skip": why


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int
    seconds_to_first_token: float
    seconds: float
    stopped: bool  # ended on a stop token (not on max_new_tokens)

    def to_json(self) -> dict:
        decode = len(self.tokens) - 1
        decode_seconds = self.seconds - self.seconds_to_first_token
        return {
            "answer": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "seconds_to_first_token": round(self.seconds_to_first_token, 4),
            "seconds": round(self.seconds, 4),
            "decode_tokens_per_second": round(decode / decode_seconds, 2) if decode > 0 and decode_seconds > 0 else None,
            "stopped": self.stopped,
            "turns_in_prompt": self.turns_in_prompt,
            "unknown_words": self.unknown_words,
        }

    turns_in_prompt: int = 0  # earlier conversation turns the prompt carried (chat)
    unknown_words: dict | None = None  # the question's words the model has never seen (vocabulary.py)


def _host_resident(state, loaded: LoadedModel):
    """Pools live in host memory: the GPU holds the weights and the memory's keys and values (what
    every question reads); rows only travel when an update writes them or an injection reads the
    newest K. Pinned pages make those copies fast and asynchronous."""
    if loaded.device.startswith("cuda"):
        state.slots = state.slots.pin_memory()
    return state


def normalize_model(name: str) -> str:
    """What a pool records as its model: a local folder as an absolute path (so the pool works from
    any directory), an alias or hub id as it is."""
    from memcli.loading.catalog import ALIASES, BUNDLED

    local = Path(name).expanduser()
    if name not in ALIASES and name not in BUNDLED and local.is_dir():
        return str(local.resolve())
    return name


@dataclass(frozen=True)
class ModelIdentity:
    """What a pool's binding checks, read from a model's config.json alone (no weights)."""

    model: str
    family: str
    config_hash: str
    num_tokens: int
    legacy_hashes: tuple[str, ...] = ()  # fingerprints older pools carry for the same config


def model_identity(name: str) -> ModelIdentity:
    """The family and config fingerprint of a model from its config.json only: a local folder's,
    the Hugging Face cache's, or (online) the one file downloaded. Never reads weights."""
    from memcli.loading.catalog import ALIASES, BUNDLED
    from memcli.core.config import ConfigError, read_config

    name = normalize_model(name)
    local = Path(name)
    if name in BUNDLED:
        folder = BUNDLED[name]
    elif local.is_dir():
        folder = local
    else:
        repo_id = ALIASES.get(name, name)
        if repo_id.count("/") != 1 or local.suffix or repo_id.startswith("/"):
            raise MemcliError(f"model {name!r} is neither a folder nor a hub id (known: {', '.join(ALIASES)})")
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):
            folder = Path(cached).parent
        else:
            try:
                folder = Path(hf_hub_download(repo_id, "config.json")).parent
            except Exception as err:  # the hub client raises many kinds; the user needs one line
                raise MemcliError(f"cannot read the config of {repo_id}: it is not downloaded and the hub "
                                  f"cannot be reached ({type(err).__name__})") from None
    try:
        cfg = read_config(folder)
    except ConfigError as err:
        raise MemcliError(str(err)) from None
    return ModelIdentity(name, cfg.family, cfg.fingerprint(), cfg.num_tokens, (cfg.legacy_fingerprint(),))


def _binding_mismatch(pool: str, binding, identity: ModelIdentity) -> str | None:
    if binding.config_hash in (identity.config_hash, *identity.legacy_hashes) and binding.family == identity.family:
        return None
    return (f"pool {pool} belongs to model {binding.model} ({binding.family}, config {binding.config_hash}), "
            f"not to {identity.model} ({identity.family}, config {identity.config_hash})")


def _model_is_here(name: str) -> bool:
    """Whether a pool's recorded model can be loaded without asking the network to find it."""
    from memcli.loading.catalog import ALIASES, BUNDLED

    local = Path(name).expanduser()
    if name in BUNDLED or local.is_dir():
        return True
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or local.is_absolute() or name.startswith("."):
        return False  # a folder that is gone (or a relative path from another directory)
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    # not in the cache: a hub id can still be downloaded when online; "a/b" offline is most likely
    # a folder recorded relative to another directory (pools made before paths were absolute)
    return not constants.HF_HUB_OFFLINE


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
    def model(self, name: str | None = None) -> LoadedModel:
        name = normalize_model(name or self.settings.model)
        if name not in self._models:
            from memcli.pools.meta import Binding
            from memcli.core.config import ConfigError
            from memcli.core.engine import Engine
            from memcli.loading.checkpoints import CheckpointError, load_checked_tokenizer, load_model, resolve_checkpoint

            try:
                device = self.settings.resolved_device()  # a missing device is said first
                self._check_runs_here(name, device)  # before a download that could not run anyway
                folder = resolve_checkpoint(name)
                dtype = self.settings.resolved_dtype()
                if self.on_load is not None:
                    self.on_load(name, device)
                transformer, reader = load_model(folder, device=device, dtype=dtype,
                                                 quant=self.settings.resolved_quant(), threads=self.settings.threads)
                tokenizer = load_checked_tokenizer(folder)  # a damaged tokenizer file: one line naming it
            except (ConfigError, CheckpointError, ValueError) as err:
                raise MemcliError(str(err)) from None
            cfg = transformer.cfg
            loaded = LoadedModel(
                name=name,
                folder=folder,
                engine=Engine(transformer, cached_states=self.cached_states, compile_decode=self.settings.compile),
                tokenizer=tokenizer,
                binding=Binding(name, cfg.family, cfg.fingerprint(), cfg.num_tokens,
                                legacy_hashes=(cfg.legacy_fingerprint(),)),
                state_dtype=dtype,
                device=device,
            )
            loaded.reader = reader  # for initial states of new pools
            self._models[name] = loaded
        return self._models[name]

    def _check_runs_here(self, name: str, device: str) -> None:
        """A published model that cannot run on this machine (on the CPU, and more memory than the
        machine has: doctor's check) is refused in one line that names what can run here: the
        bundled memcli-tiny and the offline demo, not a 39 GB download. The default model stays the
        default (switching to a toy silently would surprise); the message says how to switch."""
        from memcli.loading.catalog import OFFLINE_HINT, cpu_memory_problem

        if device != "cpu":
            return
        problem = cpu_memory_problem(name, self.settings.resolved_quant(), host_memory()["total_bytes"])
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
        from memcli.store import PoolNotFound, validate_name

        validate_name(name)
        if self.store.exists(name):
            return name
        raise PoolNotFound(pool_not_found_message(name, [info.name for info in self.store.list()]))

    def _pool_model(self, name: str, model: str | None) -> LoadedModel:
        return self.model(self.pool_model_name(name, model))

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
            problem = _binding_mismatch(name, binding, model_identity(wanted))
            if problem is not None:
                raise pool_meta.PoolModelMismatch(problem)
            return normalize_model(wanted)
        if _model_is_here(binding.model):
            return binding.model
        fallback = self.settings.model
        if fallback != binding.model and _model_is_here(fallback) and \
                _binding_mismatch(name, binding, model_identity(fallback)) is None:
            return normalize_model(fallback)
        raise MemcliError(
            f"pool {name} belongs to model {binding.model}, which is not on this machine; give the same "
            f"model with --model (its config.json must match) or record where it is now: "
            f"memcli pool rebind {name} --model PATH"
        )

    def open_pool(self, name: str, model: str | None = None, create: bool = False) -> tuple[LoadedModel, "Pool"]:
        from memcli.pools import pool as pools
        from memcli.loading.checkpoints import initial_state
        from memcli.store import validate_name

        validate_name(name)
        if name in self._pools:
            pool = self._pools[name]
            return self.model(pool.binding.model), pool
        if not create:
            self.require_pool(name)
        loaded = self._pool_model(name, model)
        if self.store.exists(name):
            return loaded, self._load_pool(name, loaded)
        state = _host_resident(initial_state(loaded.reader, loaded.cfg, "cpu", loaded.state_dtype), loaded)
        return loaded, pools.create(self.store, name, loaded.binding, state)

    def _load_pool(self, name: str, loaded: LoadedModel) -> "Pool":
        from memcli.pools import pool as pools

        pool = pools.load(self.store, name, loaded.binding, device="cpu", dtype=loaded.state_dtype)
        _host_resident(pool.state, loaded)
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
            problem = _binding_mismatch(name, binding, identity)
            if problem is not None:
                raise pool_meta.PoolModelMismatch(problem)
            meta["model"] = {**meta["model"], "model": identity.model}
            self.store.commit(name, meta=meta, part_ids=list(manifest["parts"]), new_parts={},
                              expect_version=int(manifest["version"]))
        self._pools.pop(name, None)
        return {"pool": name, "model": identity.model, "previous": binding.model, "family": identity.family,
                "config_hash": identity.config_hash}

    # ------------------------------------------------------------------ inject
    def inject(
        self,
        pool_name: str,
        paths: Iterable[str],
        *,
        model: str | None = None,
        chunk_tokens: int | None = None,
        glob: str | None = None,
        force: bool = False,
        type: str | None = None,
        encoding: str | None = None,
        stdin: BinaryIO | None = None,
        on_event: Callable[[Event], None] | None = None,
        take_loaded: Callable[[], "Pool | None"] | None = None,
    ) -> InjectReport:
        """Inject files, folders or "-" (stdin) into a pool (created, bound to `model`, if new).

        What is read is found first (so bad input is said before a model loads): files inside
        folders that match `glob` and are not of a binary type; `type` forces how files are read
        (extract.TYPES), `encoding` their text encoding. Texts shorter than the model's minimum
        are packed together at the end of the run (`_pack`). `take_loaded()`, called under the
        pool's writer lock, may hand over a loaded state of the pool at its committed version to
        inject into (None: it is loaded)."""
        from memcli.store import validate_name
        from memcli.loading.vocabulary import UnknownWords

        validate_name(pool_name)
        paths = list(paths)
        if not paths:
            raise MemcliError("nothing to inject: give at least one file, folder or - for stdin")
        emit = on_event or (lambda event: None)
        report = InjectReport(pool=pool_name, model="")
        try:
            found = list(discover(paths, glob=glob, type=type, encoding=encoding))
        except ValueError as err:
            raise MemcliError(str(err)) from None
        items = report.count_ignored(found)
        if not items:
            raise MemcliError(_nothing_found(paths, glob, report))
        self.store.check_writable()  # a read-only home: said in one line before a model loads
        loaded = self._pool_model(pool_name, model) if self.store.exists(pool_name) else self.model(model)
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
        run = _Run(chunk_tokens, least, UnknownWords(loaded.tokenizer, loaded.name))
        try:
            return self._inject_all(loaded, pool_name, items, run, force, stdin, report, emit, started, take_loaded)
        finally:
            # a pool this call created but never wrote to is not left behind (bad input leaves no trace)
            if created and self.store.exists(pool_name) and not self.store.read_manifest(pool_name)["meta"].get("next_chunk"):
                self._pools.pop(pool_name, None)
                self.store.remove(pool_name)

    def _inject_all(self, loaded, pool_name, items, run: "_Run", force, stdin, report, emit, started, take_loaded=None):
        total = sum(1 for item in items if isinstance(item, Source))
        with self.store.writer(pool_name):
            # a state of the pool at its committed version that somebody hands over (a server's
            # resident one, with its memory K/V: the inject updates them row by row), else loaded
            pool = take_loaded() if take_loaded is not None and self.store.exists(pool_name) else None
            if pool is None:
                _, pool = self.open_pool(pool_name, model=loaded.name, create=True)
            current: Source | None = None
            index = 0
            try:
                for item in items:
                    if isinstance(item, Skipped):
                        report.files.append(FileResult(item.path, "skipped", item.reason))
                        emit(Event("skip", item.path, reason=item.reason))
                        continue
                    current = item
                    index += 1
                    result = self._inject_source(loaded, pool, item, run, force, stdin, report, emit, (index, total))
                    if isinstance(result, _Short):
                        run.shorts.append(result)
                        result = result.result  # its place in the report, filled in once it is packed
                    report.files.append(result)
                    current = None
                if run.shorts:
                    self._pack(loaded, pool, run, report, emit, total)
            except KeyboardInterrupt:
                report.interrupted = True
                self._discard_unsaved(pool_name, loaded, pool)
                report.partial = _partial_of(pool, current, self.source_label)
                # short texts whose packed chunk was not committed: this run did not inject them
                report.files = [f for f in report.files if f.status != "pending"]
                report.unknown_words = run.unknown.to_json()
                report.seconds = time.perf_counter() - started
                raise InjectInterrupted(report) from None
            if self.after_inject is not None:
                self.after_inject(pool)
        report.unknown_words = run.unknown.to_json()
        report.seconds = time.perf_counter() - started
        return report

    def source_label(self, path: str) -> str:
        """The name a source is logged under (a server logs an uploaded copy under the client's name)."""
        return path

    def _discard_unsaved(self, name: str, loaded: LoadedModel, pool: "Pool") -> None:
        """After an interruption or a failed file, return to the last committed state."""
        fresh = self._load_pool(name, loaded)
        pool.state, pool.sources, pool.next_chunk, pool.version, pool.parts = (
            fresh.state, fresh.sources, fresh.next_chunk, fresh.version, fresh.parts)
        loaded.engine.forget_prefix()

    def _inject_source(self, loaded, pool, source: Source, run: "_Run", force, stdin, report, emit,
                       position_in_run: tuple[int, int]) -> "FileResult | _Short":
        import itertools

        import torch

        from memcli.pools import pool as pools
        from memcli.loading.prompts import context_ids

        engine, tokenizer = loaded.engine, loaded.tokenizer
        index, total = position_in_run
        reading = Reading()
        try:
            if source.kind == "stdin":
                # stdin can be read once: keep its text (bounded by what the user piped) to hash it
                text = "".join(iter_text(source, stdin=stdin))
                digest = hashlib.sha256(text.encode()).hexdigest()
                pieces: Iterable[str] = [text]
            else:
                digest = sha256_of(source)
                pieces = iter_text(source, reading=reading)
        except ExtractError as err:
            emit(Event("skip", source.path, reason=str(err)))
            return FileResult(source.path, "skipped", str(err))
        label = self.source_label(source.path)
        entry = pool.source_by_hash(digest)
        if entry is not None and entry.get("complete") and not force:
            same = entry.get("path") == label or source.kind == "stdin"
            reason = "already in the pool" if same else f"already in the pool as {entry.get('path')}"
            emit(Event("skip", source.path, reason=reason))
            return FileResult(source.path, "already", reason + " (use --force to inject it again)")
        twin = None if force else next((s for s in run.shorts if s.digest == digest), None)
        if twin is not None:  # a short text waiting to be packed: its twin goes in with it
            reason = f"the same text as {twin.label} in this run"
            emit(Event("skip", source.path, reason=reason))
            return FileResult(source.path, "already", reason + " (use --force to inject it again)")
        # A source is its path: the same path with other content is a changed file, injected again;
        # the rows of its earlier version stay in memory and fade like all rows.
        previous = None
        if source.kind != "stdin":
            previous = next((s for s in reversed(pool.sources) if s.get("path") == label and s.get("complete")
                             and s.get("sha256") != digest and not s.get("superseded_by")), None)
        resume_after = entry["chunks"] if entry is not None and not entry.get("complete") and not force \
            and not entry.get("packed") else 0
        emit(Event("file", source.path, file_index=index, files_total=total, total=source.size))
        done = tokens_done = 0  # chunks and tokens injected by this run
        # position estimate for progress: units read (bytes, pages) per token encoded, times tokens chunked
        encoded_tokens = [0]
        head: list[int] = []  # the text's first ids: all of them when it is shorter than the minimum

        def encode(text: str) -> list[int]:
            ids = context_ids(tokenizer, text)
            encoded_tokens[0] += len(ids)
            if len(head) < run.min_tokens:
                head.extend(ids)
            run.unknown.scan(text, ids)
            return ids

        position = 0  # tokens of this file chunked so far (resumed ones included)
        began: list[float] = []  # (time, position in units) when this run's first chunk of the file began
        try:
            chunks = chunk_token_ids(encode_pieces(pieces, encode), run.chunk_tokens, run.min_tokens)
            try:
                first = next(chunks)  # reads at most about two chunks of the text
            except ChunkingError:
                if not head:
                    raise  # no text at all
                # shorter than the minimum: packed with the run's other short texts at its end
                return _Short(source, label, digest, list(head), previous, index,
                              FileResult(source.path, "pending", tokens=len(head)))
            if entry is None or force or entry.get("complete") or entry.get("packed") or \
                    entry["first_chunk"] + entry["chunks"] != pool.next_chunk:
                entry = {
                    "id": len(pool.sources),
                    "path": label,
                    "kind": source.kind,
                    "sha256": digest,
                    "bytes": source.size,
                    "tokens": 0,
                    "chunks": 0,
                    "first_chunk": pool.next_chunk,
                    "complete": False,
                    "time": now_iso(),
                }
                pool.sources.append(entry)
            for number, chunk in enumerate(itertools.chain([first], chunks)):
                position += len(chunk)
                if number < resume_after:
                    continue  # committed by an earlier, interrupted run
                at = _position(position, encoded_tokens[0], reading)
                if not began:
                    before = _position(position - len(chunk), encoded_tokens[0], reading)
                    began.extend((time.perf_counter(), before))
                delta = engine.inject(pool.state, torch.tensor([chunk]))
                engine.update(pool.state, delta, origin=pool.next_chunk)
                run.last = Packed(ids=list(chunk), pieces=[((entry, pool.next_chunk), len(chunk))])
                pool.next_chunk += 1
                entry["chunks"] += 1
                entry["tokens"] += len(chunk)
                done += 1
                tokens_done += len(chunk)
                report.chunks += 1
                report.tokens += len(chunk)
                try:
                    emit(Event("chunk", source.path, chunks=done, tokens=tokens_done, file_index=index,
                               files_total=total, done=at, total=reading.total, unit=reading.unit,
                               seconds=time.perf_counter() - began[0], start=began[1]))
                except StopAfterChunk:
                    pools.save(self.store, pool)  # a clean boundary (unlike a signal's): keep this chunk
                    raise
                if done % COMMIT_EVERY == 0:
                    pools.save(self.store, pool)
                    emit(Event("commit", source.path, chunks=done))
        except (ExtractError, ChunkingError) as err:
            # Only what this file added since its last commit is undone.
            self._discard_unsaved(pool.name, loaded, pool)
            run.last = None  # (its chunks are gone with it)
            emit(Event("skip", source.path, reason=str(err)))
            return FileResult(source.path, "skipped", str(err))
        entry["complete"] = True
        entry["time"] = now_iso()
        if previous is not None:
            previous["superseded_by"] = entry["id"]
        pools.save(self.store, pool)
        status = "resumed" if resume_after else "changed" if previous is not None else "injected"
        reason = "changed since it was injected; its earlier rows stay and fade" if status == "changed" else ""
        return FileResult(source.path, status, reason, chunks=done, tokens=tokens_done)

    # ------------------------------------------------------------------ short texts, packed
    def _pack(self, loaded, pool, run: "_Run", report: InjectReport, emit, total: int) -> None:
        """Inject the run's texts shorter than the model's minimum, packed into shared chunks
        (chunking.Packer): whole texts while they fit, the last chunk filled up with the end of the
        chunk this run injected before it. Each text keeps its own log entry (`packed`: the chunks
        it is in; `rows`: the memory rows it was given per layer). A chunk's new rows are shared
        among its texts by their tokens (chunking.share_rows), and every row is tagged with the
        provenance serial of the text it is counted for, so `pool info`'s retention and
        `ask --sources` count a packed text's rows as they count any source's. A text is refused
        only when nothing at all can be packed with it: the run's short texts are too short
        together and this run injected nothing else."""
        packer = Packer(run.chunk_tokens, run.min_tokens)
        unsaved: list[_Short] = []
        for short in run.shorts:
            for chunk in packer.add(short, short.ids):
                self._inject_packed(loaded, pool, run, chunk, report, emit, total, unsaved)
        last = packer.finish(run.last)
        if last is not None:
            self._inject_packed(loaded, pool, run, last, report, emit, total, unsaved)
        if unsaved:
            self._commit_packed(pool, unsaved)
        left = [s for s in run.shorts if s in packer.left]
        together = sum(len(s.ids) for s in left)
        for short in left:
            reason = (f"only {len(short.ids)} tokens and nothing to pack it with: {loaded.name} needs at least "
                      f"{run.min_tokens} tokens per chunk, and " +
                      (f"this run's short texts make only {together}" if len(left) > 1
                       else "this run injected nothing else"))
            short.result.status, short.result.reason, short.result.tokens = "skipped", reason, 0
            emit(Event("skip", short.source.path, reason=reason))

    def _inject_packed(self, loaded, pool, run: "_Run", chunk: Packed, report: InjectReport, emit, total: int,
                       unsaved: list["_Short"]) -> None:
        import torch

        state, k_rows = pool.state, loaded.cfg.num_tokens
        rows = share_rows(chunk.pieces, k_rows if state.initialized else min(k_rows, len(chunk.ids)))
        key = pool.next_chunk  # the chunk's first new serial names it in its texts' entries
        owners: list[tuple[dict, int]] = []  # (log entry, provenance serial) of every piece
        for owner, tokens in chunk.pieces:
            if not isinstance(owner, _Short):
                owners.append(owner)  # borrowed from the chunk before: its own (entry, serial)
                continue
            if owner.entry is None:
                owner.entry = {"id": len(pool.sources), "path": owner.label, "kind": owner.source.kind,
                               "sha256": owner.digest, "bytes": owner.source.size, "tokens": 0, "chunks": 0,
                               "first_chunk": pool.next_chunk, "complete": False, "time": now_iso(),
                               "rows": 0, "packed": []}
                pool.sources.append(owner.entry)
            entry = owner.entry
            assert entry["first_chunk"] + entry["chunks"] == pool.next_chunk, "a packed text's serials are contiguous"
            owners.append((entry, pool.next_chunk))
            pool.next_chunk += 1
            entry["chunks"] += 1
            entry["tokens"] += tokens
            entry["packed"].append(key)
        origin = torch.tensor([serial for (_, serial), n in zip(owners, rows) for _ in range(n)], dtype=torch.int64)
        delta = loaded.engine.inject(state, torch.tensor([chunk.ids]))
        loaded.engine.update(state, delta, origin=origin)
        for (entry, _), n in zip(owners, rows):
            entry["rows"] = entry.get("rows", entry["chunks"] * k_rows) + n
        run.last = Packed(ids=list(chunk.ids), pieces=[(o, t) for o, (_, t) in zip(owners, chunk.pieces)])
        report.chunks += 1
        report.tokens += len(chunk.ids)
        for short in chunk.complete:
            short.entry["complete"] = True
            short.entry["time"] = now_iso()
            if short.previous is not None:
                short.previous["superseded_by"] = short.entry["id"]
            unsaved.append(short)
        first = next(owner for owner, _ in chunk.pieces if isinstance(owner, _Short))
        try:
            emit(Event("chunk", first.source.path, chunks=1, tokens=len(chunk.ids), file_index=first.index,
                       files_total=total))
        except StopAfterChunk:
            self._commit_packed(pool, unsaved)
            raise
        if chunk.pieces[-1][0] in chunk.complete:  # no text left half-injected: a clean boundary
            self._commit_packed(pool, unsaved)

    def _commit_packed(self, pool, unsaved: list["_Short"]) -> None:
        """Save, then count the packed texts that are now complete as injected."""
        from memcli.pools import pool as pools

        pools.save(self.store, pool)
        for short in unsaved:
            chunks = len(set(short.entry["packed"]))
            short.result.status = "changed" if short.previous is not None else "injected"
            short.result.reason = ("changed since it was injected; its earlier rows stay and fade"
                                   if short.previous is not None else "")
            short.result.chunks, short.result.tokens, short.result.packed = chunks, short.entry["tokens"], True
        unsaved.clear()

    # ------------------------------------------------------------------ ask
    def ask(
        self,
        pool_name: str,
        question: str,
        *,
        max_new_tokens: int | None = None,
        sampling: "Sampling | None" = None,
        on_text: Callable[[str], None] | None = None,
        history: list[tuple[str, str]] | None = None,
    ) -> Answer:
        """Answer from the pool. `max_new_tokens=None` allows up to 256 tokens, or what the model's
        window leaves after the question when that is less. `history`: earlier (question, answer)
        turns of a conversation, oldest first; as many of the newest as fit the window go into the
        prompt (the oldest are dropped first)."""
        if not question or not question.strip():
            raise MemcliError("the question is empty")
        loaded, pool = self.open_pool(pool_name)
        ids, max_new_tokens, turns = answer_prompt(loaded, question, history, max_new_tokens)
        return decode_answer(loaded, pool.state, ids, max_new_tokens, sampling=sampling, on_text=on_text,
                             turns_in_prompt=turns, question=question)

    def chat(self, pool_name: str, *, max_new_tokens: int | None = None,
             sampling: "Sampling | None" = None) -> "ChatSession":
        """A conversation with a pool: the pool stays loaded and earlier turns go into each prompt.
        A pool that does not exist yet is a new, empty one (`ChatSession.new`): the session's first
        inject creates it, bound to the configured model."""
        new = not self.pool_exists(pool_name)
        if not new:
            self.keep_open(pool_name)
        return ChatSession(self, pool_name, max_new_tokens=max_new_tokens, sampling=sampling, new=new)

    def pool_exists(self, name: str) -> bool:
        """Whether pool `name` exists (an invalid name is refused)."""
        from memcli.store import validate_name

        return self.store.exists(validate_name(name))

    # ------------------------------------------------------------------ pool info
    def pool_info(self, name: str) -> dict:
        """Manifest facts plus, per source, how much of it is still in memory (`retention`, a list,
        empty for an empty pool), from the small tables only. `sources` is a count, as in
        list_pools; `files` the log entries."""
        from memcli.pools import meta as pool_meta

        self.require_pool(name)
        return pool_meta.info_json(self.store, name)

    # ------------------------------------------------------------------ pool listing
    def list_pools(self) -> list[dict]:
        """One row per pool (sorted by name): the facts `memcli pool ls` shows, from manifests only;
        a damaged pool has `error` set instead of failing the listing."""
        from memcli.pools import meta as pool_meta

        return pool_meta.list_rows(self.store)


class ChatSession:
    """A conversation with one pool (`Memcli.chat`): each question is asked with the earlier
    (question, answer) turns in the prompt, as many of the newest as the model's window holds."""

    def __init__(self, app: Memcli, pool: str, *, max_new_tokens: int | None = None,
                 sampling: "Sampling | None" = None, new: bool = False):
        self.app, self.pool = app, pool
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.turns: list[tuple[str, str]] = []
        # the pool did not exist when the session began: it is empty until an inject creates it, and
        # a question before that is refused (an answer from the model's own memory alone would look
        # like one from documents)
        self.new = new

    def _started(self) -> bool:
        """Whether a new pool exists by now (and, in-process, keep it loaded from then on)."""
        if self.new and self.app.pool_exists(self.pool):
            self.new = False
            keep = getattr(self.app, "keep_open", None)
            if keep is not None:
                keep(self.pool)
        return not self.new

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        if not self._started():
            raise MemcliError(f"pool {self.pool} is still empty: /inject PATH... adds documents to it")
        answer = self.app.ask(self.pool, question, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                              on_text=on_text, history=self.turns)
        self.turns.append((question.strip(), answer.text.strip()))
        return answer

    def reset(self) -> None:
        """Forget the conversation (the pool's memory is not touched)."""
        self.turns.clear()

    def inject(self, paths: Iterable[str], **kwargs) -> InjectReport:
        """Add documents to the pool mid-conversation (the first creates a new pool); the next
        answer reads them."""
        try:
            return self.app.inject(self.pool, paths, **kwargs)
        finally:
            self._started()


def answer_prompt(loaded: LoadedModel, question: str, history: list[tuple[str, str]] | None,
                  max_new_tokens: int | None) -> tuple[list[int], int, int]:
    """The prompt of `question` after the newest earlier turns that fit the model's window (the
    oldest dropped first), and the answer's token budget: (ids, max_new_tokens, turns kept). The
    turns are fitted from the newest end (`prompts.newest_that_fit`): the time does not grow with
    the turns that are dropped."""
    from memcli.loading.prompts import conversation_ids, newest_that_fit

    if not question or not question.strip():
        raise MemcliError("the question is empty")
    tokenizer = loaded.tokenizer
    limit = loaded.max_input_tokens()
    turns = list(history or [])
    answer_room = DEFAULT_ANSWER_TOKENS if max_new_tokens is None else max_new_tokens
    question = question.strip()

    def attempt(k: int):
        ids = conversation_ids(tokenizer, turns[len(turns) - k:], question)
        return len(ids) + min(answer_room, limit // 2) <= limit, ids

    kept, ids = newest_that_fit(len(turns), attempt)
    return ids, answer_budget(loaded, len(ids), max_new_tokens, "question"), kept


def answer_budget(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int | None, what: str = "prompt",
                  option: str = "--max-new-tokens") -> int:
    """Tokens the answer may take: `max_new_tokens`, or up to 256 / what the window leaves; a
    one-line refusal when the prompt and the answer do not fit the window."""
    limit = loaded.max_input_tokens()
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_ANSWER_TOKENS, limit - prompt_tokens)
        if max_new_tokens < 1:
            raise MemcliError(f"the {what} is {prompt_tokens} tokens; {loaded.name} reads at most {limit}")
    if prompt_tokens + max_new_tokens > limit:
        raise MemcliError(
            f"the {what} is {prompt_tokens} tokens and the answer may take {max_new_tokens}; "
            f"{loaded.name} reads at most {limit} tokens after its memory (shorten it or lower {option})"
        )
    return max_new_tokens


class _StopString(Exception):
    """A stop string appeared: the answer ends before it."""


def decode_answer(loaded: LoadedModel, state, ids: list[int], max_new_tokens: int, *,
                  sampling: "Sampling | None" = None, on_text: Callable[[str], None] | None = None,
                  stop: tuple[str, ...] = (), checkpoint: Callable[[], None] | None = None,
                  turns_in_prompt: int = 0, question: str | None = None) -> Answer:
    """Decode an answer to the prompt `ids` from a memory state, passing text to `on_text` as it
    comes: an incomplete UTF-8 sequence is held back until the next token completes it, and so is
    text that may be the start of a stop string (`stop`: the answer ends before the first one).
    `checkpoint()` runs before each token (a server stops there when its client left). Given the
    `question`, the answer names its words the model has never seen (`unknown_words`)."""
    import torch

    from memcli.loading.prompts import stop_ids
    from memcli.loading.vocabulary import UnknownWords

    unknown = None
    if question is not None:
        words = UnknownWords(loaded.tokenizer, loaded.name)
        words.scan(question)
        unknown = words.to_json()

    tokenizer = loaded.tokenizer
    stops = stop_ids(tokenizer, loaded.cfg.eos_token_id)
    hold = max((len(s) for s in stop), default=1) - 1
    tokens: list[int] = []
    sent = 0  # characters of the answer already passed to on_text
    first_token_at: list[float] = []
    cut: list[str] = []
    started = time.perf_counter()

    def visible(text: str, final: bool) -> str:
        for s in stop:
            at = text.find(s)
            if at >= 0:
                cut.append(text[:at])
                return text[:at]
        return text if final or not hold else text[: max(len(text) - hold, sent)]

    shown: list[str] = []  # the pieces streamed: the answer is what was shown, even where a later
    # token decodes an earlier byte sequence differently (random weights' byte soup)

    def emit(text: str) -> None:
        nonlocal sent
        if len(text) > sent:
            shown.append(text[sent:])
            if on_text is not None:
                on_text(text[sent:])
        sent = max(sent, len(text))

    def on_token(token: int) -> None:
        if checkpoint is not None:
            checkpoint()
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        tokens.append(token)
        if token in stops:
            return
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        emit(visible(text, final=False))
        if cut:
            raise _StopString()

    try:
        generated = loaded.engine.generate(state, torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                           stop_ids=stops, sampling=sampling, on_token=on_token).tokens
        text = visible(tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True), True)
    except _StopString:
        generated, text = list(tokens), cut[0]
    finished = time.perf_counter()
    emit(text)
    return Answer(
        text="".join(shown),
        tokens=list(generated),
        prompt_tokens=len(ids),
        seconds_to_first_token=(first_token_at[0] if first_token_at else finished) - started,
        seconds=finished - started,
        stopped=bool(cut) or (bool(generated) and generated[-1] in stops),
        turns_in_prompt=turns_in_prompt,
        unknown_words=unknown,
    )


def _position(tokens: int, encoded_tokens: int, reading: Reading) -> float:
    """Where in the file (in reading.unit) the first `tokens` tokens end: what was read so far,
    shared out over the tokens encoded from it (text is read at most a piece ahead)."""
    if reading.total is None or not encoded_tokens:
        return 0
    return min(tokens * reading.done / encoded_tokens, reading.done, reading.total)


def _nothing_found(paths: list[str], glob: str | None, report: InjectReport) -> str:
    """Why an inject found no file to read, in one line."""
    where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    ignored = sum(report.ignored_by_type.values())
    notes = []
    if glob is not None and report.ignored_by_glob:
        notes.append(f"--glob {glob!r} matched none of its {report.ignored_by_glob:,} files")
    elif glob is not None:
        notes.append(f"--glob {glob!r} matched no file")
    if ignored:
        kinds = ", ".join(f"{k} {v:,}" for k, v in list(InjectReport.summary(report)["ignored_by_type"].items())[:4])
        notes.append(f"{ignored:,} ignored by type ({kinds}; --type text reads them)")
    return f"nothing to inject in {where}: " + ("; ".join(notes) if notes else "no files there")


def pool_not_found_message(name: str, existing: list[str]) -> str:
    """The one wording of a missing pool, with the closest existing name."""
    close = difflib.get_close_matches(name, existing, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else " (memcli pool ls lists pools; inject creates one)"
    return f"pool {name} not found{hint}"


def _partial_of(pool: "Pool", source: Source | None, label=lambda path: path) -> FileResult | None:
    """After an interruption (and a return to the last commit): what is kept of the file in progress."""
    if source is None:
        return None
    for entry in reversed(pool.sources):
        if entry.get("path") == label(source.path) and not entry.get("complete"):
            if entry.get("chunks"):
                return FileResult(source.path, "partial", chunks=entry["chunks"], tokens=entry.get("tokens", 0))
            break
    return None


# --------------------------------------------------------------------------- models on this machine
def checkpoint_problem(folder: Path) -> str | None:
    """Why a downloaded checkpoint folder is incomplete (None: it has config, tokenizer and all weights)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return "the tokenizer files are missing"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "model.safetensors.index.json is unreadable"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"{len(missing)} of {len(shards)} weight files are missing (e.g. {missing[0]})"
        return None
    if not any(folder.glob("*.safetensors")):
        return "no weight files (*.safetensors)"
    return None


def list_models() -> list[dict]:
    """The known model aliases and whether each is in the Hugging Face cache (never goes online;
    reads the cache's folders directly: models--OWNER--NAME/{blobs,snapshots})."""
    from memcli.base import paths
    from memcli.loading.catalog import ALIASES
    from memcli.app.settings import DEFAULT_MODEL

    from memcli.loading.catalog import BUNDLED

    cache = paths.hf_hub_cache()
    from memcli.loading.catalog import description

    # description: what a model declares it can and cannot answer (memcli-tiny: a toy of 268 words)
    rows = [{"name": alias, "repo": None, "default": alias == DEFAULT_MODEL, "status": "bundled",
             "bytes": _folder_bytes(folder), "path": str(folder), "problem": checkpoint_problem(folder),
             "description": description(alias)}
            for alias, folder in BUNDLED.items()]
    for alias, repo_id in ALIASES.items():
        row = {"name": alias, "repo": repo_id, "default": alias == DEFAULT_MODEL,
               "status": "not downloaded", "bytes": 0, "path": None, "problem": None, "description": None}
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        if repo.is_dir():
            row["bytes"] = _folder_bytes(repo / "blobs")
            row["status"] = "partial"
            problem = "no snapshot"
            try:
                snapshots = sorted((p for p in (repo / "snapshots").iterdir() if p.is_dir()),
                                   key=lambda p: p.stat().st_mtime, reverse=True)
            except OSError:
                snapshots = []
            for snapshot in snapshots:
                problem = checkpoint_problem(snapshot)
                if problem is None:
                    row["status"], row["path"] = "downloaded", str(snapshot)
                    break
            row["problem"] = problem
        rows.append(row)
    return rows


def _folder_bytes(folder: Path) -> int:
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def pull_model(name: str) -> Path:
    """Download (or finish downloading) a model into the Hugging Face cache; returns its folder."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from memcli.loading.catalog import ALIASES
    from memcli.loading.checkpoints import CheckpointError, resolve_checkpoint

    if Path(name).expanduser().is_dir():
        raise MemcliError(f"{name} is a local folder; there is nothing to download")
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise MemcliError(f"unknown model {name!r}: give an alias ({', '.join(ALIASES)}) or a hub id owner/name")
    try:
        folder = resolve_checkpoint(repo_id)  # snapshot_download: resumes, honours HF_HOME / HF_HUB_OFFLINE
    except CheckpointError as err:
        if isinstance(err.__context__, LocalEntryNotFoundError):
            # resolve_checkpoint's advice is to run pull: here that is what just failed
            why = ("HF_HUB_OFFLINE is set; unset it to download" if constants.HF_HUB_OFFLINE
                   else "the Hugging Face hub cannot be reached; check the network connection (or HF_ENDPOINT)")
            raise MemcliError(f"cannot download {repo_id}: {why}") from None
        raise MemcliError(str(err)) from None
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise MemcliError(f"{repo_id} downloaded incompletely ({problem}); run memcli pull again")
    return folder


# --------------------------------------------------------------------------- doctor
CHECKPOINT_DISK_BYTES = 40 * 10**9  # an 8B MemoryLLM checkpoint in fp32 is about 39 GB


def _free_bytes(path: Path) -> int | None:
    import shutil

    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def host_memory() -> dict:
    """Total and available host memory in bytes (None where the platform does not say)."""
    total = available = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"total_bytes": total, "available_bytes": available, "needed_bytes": None}


def diagnose(settings: Settings) -> dict:
    """What this machine can run: versions, GPU, quantization modes, disk, paths, resolved settings,
    and a list of what will not work here (`memcli doctor`). Loads no model."""
    import importlib.metadata
    import platform
    import sys

    import logging

    import torch
    from huggingface_hub import constants

    from memcli import __version__
    from memcli.base import paths
    from memcli.loading.catalog import known
    from memcli.core.quant import QUANT_MODES, check_mode_supported

    for noisy in ("bitsandbytes", "kernels"):  # their kernel-loading notes are not ours to show
        logging.getLogger(noisy).setLevel(logging.ERROR)
    problems: list[str] = []
    cuda = {"available": torch.cuda.is_available(), "version": torch.version.cuda, "devices": []}
    if cuda["available"]:
        for index in range(torch.cuda.device_count()):
            device = {"index": index, "name": torch.cuda.get_device_name(index),
                      "total_bytes": torch.cuda.get_device_properties(index).total_memory, "free_bytes": None}
            try:
                device["free_bytes"] = torch.cuda.mem_get_info(index)[0]
            except RuntimeError:
                pass
            cuda["devices"].append(device)
    else:
        problems.append("no CUDA GPU: memcli runs on the CPU, slowly; 4-bit (nf4) and 8-bit (int8) weights "
                        "save memory there but not time (they are made for a CUDA GPU)")
    try:
        bnb_version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb_version = None
        problems.append("bitsandbytes is not installed: nf4 and int8 quantization are unavailable")

    modes: dict[str, dict[str, str | None]] = {}
    for device in ("cpu", "cuda"):
        modes[device] = {}
        for mode in QUANT_MODES:
            if device == "cuda" and not cuda["available"]:
                modes[device][mode] = "no CUDA GPU"
                continue
            try:
                check_mode_supported(mode, device)
                modes[device][mode] = None
            except ValueError as err:
                modes[device][mode] = str(err)

    resolved: dict[str, str | None] = {"device": None, "dtype": None, "quant": None}
    try:
        resolved["device"] = settings.resolved_device()
        resolved["dtype"] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[settings.resolved_dtype()]
        resolved["quant"] = settings.resolved_quant()
    except (ValueError, KeyError) as err:
        problems.append(f"the settings do not resolve: {err}")
    device = resolved["device"]
    if device and device.startswith("cuda") and not cuda["available"]:
        problems.append(f"device is set to {settings.device} but there is no CUDA GPU")
    elif device and resolved["quant"]:
        try:
            check_mode_supported(resolved["quant"], device)
        except ValueError as err:
            problems.append(f"the configured quantization will not run here: {err}")

    hf_cache = Path(constants.HF_HUB_CACHE)
    disk = {"data_dir": str(paths.data_dir()), "data_free_bytes": _free_bytes(paths.data_dir()),
            "hf_cache": str(hf_cache), "hf_cache_free_bytes": _free_bytes(hf_cache)}
    from memcli.loading.catalog import ALIASES

    memory = host_memory()
    catalog_entry = known(settings.model)
    if catalog_entry is not None and resolved["device"] == "cpu" and resolved["quant"]:
        from memcli.loading.catalog import OFFLINE_HINT, cpu_memory_problem, host_bytes_needed

        memory["needed_bytes"] = host_bytes_needed(catalog_entry, resolved["quant"])
        problem = cpu_memory_problem(settings.model, resolved["quant"], memory["total_bytes"])
        if problem is not None:
            problems.append(f"{settings.model} will not load here: {problem} (it needs a CUDA GPU); {OFFLINE_HINT}")
    if settings.model in ALIASES:
        downloaded = any(row["name"] == settings.model and row["status"] == "downloaded" for row in list_models())
        free = disk["hf_cache_free_bytes"]
        if not downloaded and free is not None and free < CHECKPOINT_DISK_BYTES:
            problems.append(f"{settings.model} is not downloaded and {hf_cache} has {free / 1e9:.1f} GB free; "
                            f"the checkpoint takes about {CHECKPOINT_DISK_BYTES / 1e9:.0f} GB")
    from memcli.loading import converted

    # the full sha256 of every converted-weights copy (a load checks only size and mtime)
    copies = [{"folder": str(folder), "ok": ok} for folder, ok in converted.verify()]
    problems += [f"the converted weights at {row['folder']} are damaged (sha256 mismatch): remove that folder "
                 f"and the next load rebuilds them" for row in copies if not row["ok"]]
    return {
        "memcli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": cuda,
        "bitsandbytes": bnb_version,
        "quant_modes": modes,
        "disk": disk,
        "memory": memory,
        "converted": copies,
        "paths": {"data": str(paths.data_dir()), "pools": str(paths.pools_dir()), "config": str(paths.config_dir()),
                  "config_file": str(paths.config_file()), "cache": str(paths.cache_dir()), "hf_cache": str(hf_cache)},
        "settings": {"model": settings.model, "device": settings.device, "dtype": settings.dtype, "quant": settings.quant},
        "resolved": resolved,
        "problems": problems,
    }
