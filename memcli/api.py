"""The Python API: everything the command line does, callable and testable without it.

    app = Memcli()                                   # settings from config file / environment
    report = app.inject("work", ["notes.pdf"])       # files -> 512-token chunks -> memory updates
    answer = app.ask("work", "When does the train leave?", on_text=print)

A loaded model is kept per model name, so switching pools never reloads weights. Inject holds the
pool's writer lock for its whole run and commits after every file (and every `COMMIT_EVERY` chunks
of a long file), so an interruption keeps every committed chunk and nothing half-written; running
the same command again skips what is already in and resumes a file where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from . import pool as pools
from .chunking import MIN_CHUNK_TOKENS, ChunkingError, chunk_token_ids, encode_pieces
from .engine import Engine, Generation, Sampling
from .extract import ExtractError, Skipped, Source, discover, iter_text, sha256_of
from .loading import initial_state, load_model, resolve_checkpoint
from .prompts import context_ids, load_tokenizer, question_ids, stop_ids
from .settings import Settings, load_settings
from .store import PoolStore, validate_name

DEFAULT_CHUNK_TOKENS = 512
DEFAULT_ANSWER_TOKENS = 256
COMMIT_EVERY = 64  # chunks of one long file between commits (bounds the work an interruption loses)


class MemcliError(Exception):
    """A user-facing failure; str() is one line."""


@dataclass
class LoadedModel:
    name: str
    folder: Path
    engine: Engine
    tokenizer: object
    binding: pools.Binding
    state_dtype: torch.dtype
    device: str

    @property
    def cfg(self):
        return self.engine.cfg

    def max_input_tokens(self) -> int:
        """Longest question (+ answer) or chunk the model was trained for (`max_seq_length`)."""
        raw = self.cfg.raw
        return int(raw.get("max_seq_length") or 2 * self.cfg.num_tokens)


@dataclass
class FileResult:
    path: str
    status: str  # "injected" | "skipped" | "already" | "resumed"
    reason: str = ""
    chunks: int = 0
    tokens: int = 0


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

    @property
    def skipped(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "skipped"]

    def to_json(self) -> dict:
        return {
            "pool": self.pool,
            "model": self.model,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "interrupted": self.interrupted,
            "files": [f.__dict__ for f in self.files],
            "partial": self.partial.__dict__ if self.partial else None,
        }


class InjectInterrupted(MemcliError):
    def __init__(self, report: InjectReport):
        super().__init__("interrupted; every completed file and committed chunk is kept")
        self.report = report


@dataclass
class Event:
    """Progress of an inject, for a progress display."""

    kind: str  # "file" | "chunk" | "skip" | "commit"
    path: str = ""
    chunks: int = 0  # chunks done in this file
    tokens: int = 0  # tokens done in this run
    # chunk events of plain-text files (text, markdown): an estimate of how far into the file the
    # chunk ends, for an ETA; bytes_total is None where bytes do not map to text (pdf, html, stdin)
    bytes_done: int = 0
    bytes_total: int | None = None
    reason: str = ""


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
        }


def _host_resident(state, loaded: LoadedModel):
    """Pools live in host memory: the GPU holds the weights and the memory's keys and values (what
    every question reads); rows only travel when an update writes them or an injection reads the
    newest K. Pinned pages make those copies fast and asynchronous."""
    if loaded.device.startswith("cuda"):
        state.slots = state.slots.pin_memory()
    return state


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Memcli:
    def __init__(self, settings: Settings | None = None, store: PoolStore | None = None,
                 on_load: Callable[[str, str], None] | None = None):
        self.settings = settings or load_settings()
        self.store = store or PoolStore()
        self._models: dict[str, LoadedModel] = {}
        self._pools: dict[str, pools.Pool] = {}  # pools kept in memory by chat sessions
        # called with (model name, device) just before a model's weights are loaded
        self.on_load = on_load

    # ------------------------------------------------------------------ models
    def model(self, name: str | None = None) -> LoadedModel:
        name = name or self.settings.model
        if name not in self._models:
            from .config import ConfigError
            from .loading import CheckpointError

            try:
                folder = resolve_checkpoint(name)
                device = self.settings.resolved_device()
                dtype = self.settings.resolved_dtype()
                if self.on_load is not None:
                    self.on_load(name, device)
                transformer, reader = load_model(folder, device=device, dtype=dtype,
                                                 quant=self.settings.resolved_quant())
            except (ConfigError, CheckpointError, ValueError) as err:
                raise MemcliError(str(err)) from None
            cfg = transformer.cfg
            loaded = LoadedModel(
                name=name,
                folder=folder,
                engine=Engine(transformer),
                tokenizer=load_tokenizer(folder),
                binding=pools.Binding(name, cfg.family, cfg.fingerprint(), cfg.num_tokens),
                state_dtype=dtype,
                device=device,
            )
            loaded.reader = reader  # for initial states of new pools
            self._models[name] = loaded
        return self._models[name]

    # ------------------------------------------------------------------ pools
    def _pool_model(self, name: str, model: str | None) -> LoadedModel:
        """The model a pool is bound to (or, for a new pool, the requested/default one)."""
        if self.store.exists(name):
            binding = pools.read_binding(self.store, name)
            if model is not None and model != binding.model:
                loaded = self.model(model)
                pools.check_binding(name, binding, loaded.binding)
                return loaded
            return self.model(binding.model)
        return self.model(model)

    def open_pool(self, name: str, model: str | None = None, create: bool = False) -> tuple[LoadedModel, pools.Pool]:
        validate_name(name)
        if name in self._pools:
            pool = self._pools[name]
            return self.model(pool.binding.model), pool
        if not self.store.exists(name) and not create:
            raise MemcliError(f"pool {name} does not exist (memcli pool ls lists pools; inject creates one)")
        loaded = self._pool_model(name, model)
        if self.store.exists(name):
            return loaded, self._load_pool(name, loaded)
        state = _host_resident(initial_state(loaded.reader, loaded.cfg, "cpu", loaded.state_dtype), loaded)
        return loaded, pools.create(self.store, name, loaded.binding, state)

    def _load_pool(self, name: str, loaded: LoadedModel) -> pools.Pool:
        pool = pools.load(self.store, name, loaded.binding, device="cpu", dtype=loaded.state_dtype)
        _host_resident(pool.state, loaded)
        return pool

    def keep_open(self, name: str) -> None:
        """Keep a pool's state in memory across calls (chat sessions)."""
        self._pools[name] = self.open_pool(name)[1]

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
        stdin: BinaryIO | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> InjectReport:
        validate_name(pool_name)
        paths = list(paths)
        if not paths:
            raise MemcliError("nothing to inject: give at least one file, folder or - for stdin")
        loaded = self._pool_model(pool_name, model) if self.store.exists(pool_name) else self.model(model)
        limit = loaded.max_input_tokens()
        if chunk_tokens is None:
            chunk_tokens = min(DEFAULT_CHUNK_TOKENS, limit)
        if chunk_tokens < MIN_CHUNK_TOKENS:
            raise MemcliError(f"--chunk-tokens must be at least {MIN_CHUNK_TOKENS} (the model card's minimum), not {chunk_tokens}")
        if chunk_tokens > limit:
            raise MemcliError(f"--chunk-tokens {chunk_tokens} is longer than {loaded.name} reads at once ({limit} tokens)")
        emit = on_event or (lambda event: None)
        report = InjectReport(pool=pool_name, model=loaded.name)
        started = time.perf_counter()
        created = not self.store.exists(pool_name)
        try:
            return self._inject_all(loaded, pool_name, paths, chunk_tokens, glob, force, stdin, report, emit, started)
        finally:
            # a pool this call created but never wrote to is not left behind (bad input leaves no trace)
            if created and self.store.exists(pool_name) and not self.store.read_manifest(pool_name)["meta"].get("next_chunk"):
                self._pools.pop(pool_name, None)
                self.store.remove(pool_name)

    def _inject_all(self, loaded, pool_name, paths, chunk_tokens, glob, force, stdin, report, emit, started):
        with self.store.writer(pool_name):
            _, pool = self.open_pool(pool_name, model=loaded.name, create=True)
            current: Source | None = None
            try:
                for item in discover(paths, glob=glob):
                    if isinstance(item, Skipped):
                        report.files.append(FileResult(item.path, "skipped", item.reason))
                        emit(Event("skip", item.path, reason=item.reason))
                        continue
                    current = item
                    report.files.append(self._inject_source(loaded, pool, item, chunk_tokens, force, stdin, report, emit))
                    current = None
            except KeyboardInterrupt:
                report.interrupted = True
                self._discard_unsaved(pool_name, loaded, pool)
                report.partial = _partial_of(pool, current, self.source_label)
                report.seconds = time.perf_counter() - started
                raise InjectInterrupted(report) from None
        report.seconds = time.perf_counter() - started
        return report

    def source_label(self, path: str) -> str:
        """The name a source is logged under (a server logs an uploaded copy under the client's name)."""
        return path

    def _discard_unsaved(self, name: str, loaded: LoadedModel, pool: pools.Pool) -> None:
        """After an interruption or a failed file, return to the last committed state."""
        fresh = self._load_pool(name, loaded)
        pool.state, pool.sources, pool.next_chunk, pool.version, pool.parts = (
            fresh.state, fresh.sources, fresh.next_chunk, fresh.version, fresh.parts)
        loaded.engine.forget_prefix()

    def _inject_source(self, loaded, pool, source: Source, chunk_tokens, force, stdin, report, emit) -> FileResult:
        engine, tokenizer = loaded.engine, loaded.tokenizer
        try:
            if source.kind == "stdin":
                # stdin can be read once: keep its text (bounded by what the user piped) to hash it
                text = "".join(iter_text(source, stdin=stdin))
                digest = hashlib.sha256(text.encode()).hexdigest()
                pieces: Iterable[str] = [text]
            else:
                digest = sha256_of(source)
                pieces = iter_text(source)
        except ExtractError as err:
            emit(Event("skip", source.path, reason=str(err)))
            return FileResult(source.path, "skipped", str(err))
        entry = pool.source_by_hash(digest)
        if entry is not None and entry.get("complete") and not force:
            emit(Event("skip", source.path, reason="already in the pool"))
            return FileResult(source.path, "already", "already in the pool (use --force to inject it again)")
        resume_after = entry["chunks"] if entry is not None and not entry.get("complete") and not force else 0
        if entry is None or force or entry.get("complete") or entry["first_chunk"] + entry["chunks"] != pool.next_chunk:
            entry = {
                "id": len(pool.sources),
                "path": self.source_label(source.path),
                "kind": source.kind,
                "sha256": digest,
                "bytes": source.size,
                "tokens": 0,
                "chunks": 0,
                "first_chunk": pool.next_chunk,
                "complete": False,
                "time": _now(),
            }
            pool.sources.append(entry)
        emit(Event("file", source.path, bytes_total=source.size))
        done = tokens_done = 0  # chunks and tokens injected by this run
        # position estimate for progress: bytes of text encoded so far per token, times tokens chunked
        by_bytes = source.kind in ("text", "markdown") and bool(source.size)
        encoded = [0, 0]  # bytes, tokens

        def encode(text: str) -> list[int]:
            ids = context_ids(tokenizer, text)
            if by_bytes:
                encoded[0] += len(text.encode("utf-8", "surrogatepass"))
                encoded[1] += len(ids)
            return ids

        position = 0  # tokens of this file chunked so far (resumed ones included)
        try:
            chunks = chunk_token_ids(encode_pieces(pieces, encode), chunk_tokens)
            for index, chunk in enumerate(chunks):
                position += len(chunk)
                if index < resume_after:
                    continue  # committed by an earlier, interrupted run
                delta = engine.inject(pool.state, torch.tensor([chunk]))
                engine.update(pool.state, delta, origin=pool.next_chunk)
                pool.next_chunk += 1
                entry["chunks"] += 1
                entry["tokens"] += len(chunk)
                done += 1
                tokens_done += len(chunk)
                report.chunks += 1
                report.tokens += len(chunk)
                if by_bytes:
                    at = min(int(position * encoded[0] / max(encoded[1], 1)), encoded[0], source.size)
                    emit(Event("chunk", source.path, chunks=done, tokens=report.tokens,
                               bytes_done=at, bytes_total=source.size))
                else:
                    emit(Event("chunk", source.path, chunks=done, tokens=report.tokens))
                if done % COMMIT_EVERY == 0:
                    pools.save(self.store, pool)
                    emit(Event("commit", source.path, chunks=done))
        except (ExtractError, ChunkingError) as err:
            # Only what this file added since its last commit is undone.
            self._discard_unsaved(pool.name, loaded, pool)
            emit(Event("skip", source.path, reason=str(err)))
            return FileResult(source.path, "skipped", str(err))
        entry["complete"] = True
        entry["time"] = _now()
        pools.save(self.store, pool)
        status = "resumed" if resume_after else "injected"
        return FileResult(source.path, status, chunks=done, tokens=tokens_done)

    # ------------------------------------------------------------------ ask
    def ask(
        self,
        pool_name: str,
        question: str,
        *,
        max_new_tokens: int | None = None,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer from the pool. `max_new_tokens=None` allows up to 256 tokens, or what the model's
        window leaves after the question when that is less."""
        if not question or not question.strip():
            raise MemcliError("the question is empty")
        loaded, pool = self.open_pool(pool_name)
        ids = question_ids(loaded.tokenizer, question.strip())
        limit = loaded.max_input_tokens()
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_ANSWER_TOKENS, limit - len(ids))
            if max_new_tokens < 1:
                raise MemcliError(f"the question is {len(ids)} tokens; {loaded.name} reads at most {limit}")
        if len(ids) + max_new_tokens > limit:
            raise MemcliError(
                f"the question is {len(ids)} tokens and the answer may take {max_new_tokens}; "
                f"{loaded.name} reads at most {limit} tokens after its memory (shorten it or lower --max-new-tokens)"
            )
        tokenizer = loaded.tokenizer
        stops = stop_ids(tokenizer, loaded.cfg.eos_token_id)
        emitted = ""
        tokens: list[int] = []
        first_token_at: list[float] = []
        started = time.perf_counter()

        def on_token(token: int) -> None:
            nonlocal emitted
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            tokens.append(token)
            if token in stops:
                return
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            # hold back an incomplete UTF-8 sequence until the next token completes it
            if text.endswith("\ufffd"):
                return
            if on_text is not None and len(text) > len(emitted):
                on_text(text[len(emitted):])
            emitted = text

        generation: Generation = loaded.engine.generate(
            pool.state, torch.tensor([ids]), max_new_tokens=max_new_tokens, stop_ids=stops,
            sampling=sampling, on_token=on_token,
        )
        finished = time.perf_counter()
        text = tokenizer.decode([t for t in generation.tokens if t not in stops], skip_special_tokens=True)
        if on_text is not None and len(text) > len(emitted):
            on_text(text[len(emitted):])
        return Answer(
            text=text,
            tokens=generation.tokens,
            prompt_tokens=len(ids),
            seconds_to_first_token=(first_token_at[0] if first_token_at else finished) - started,
            seconds=finished - started,
            stopped=bool(generation.tokens) and generation.tokens[-1] in stops,
        )

    # ------------------------------------------------------------------ pool info
    def pool_info(self, name: str) -> dict:
        """Manifest facts plus, per source, how much of it is still in memory."""
        validate_name(name)
        info = self.store.info(name)
        meta = info.meta or {}
        binding = meta.get("model", {})
        result = {
            "name": info.name,
            "model": binding.get("model"),
            "family": binding.get("family"),
            "version": info.version,
            "created": info.created,
            "updated": info.updated,
            "bytes_on_disk": info.bytes_on_disk,
            "sources": meta.get("sources", []),
            "chunks": sum(s.get("chunks", 0) for s in meta.get("sources", [])),
            "tokens": sum(s.get("tokens", 0) for s in meta.get("sources", [])),
        }
        if meta.get("sources"):
            result["retention"] = pools.retention(pools.load(self.store, name))
        return result

    # ------------------------------------------------------------------ pool listing
    def list_pools(self) -> list[dict]:
        """One row per pool (sorted by name): the facts `memcli pool ls` shows, from manifests only."""
        rows = []
        for info in self.store.list():
            meta = info.meta or {}
            sources = meta.get("sources", []) if isinstance(meta.get("sources"), list) else []
            binding = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            rows.append({
                "name": info.name,
                "model": binding.get("model"),
                "bytes_on_disk": info.bytes_on_disk,
                "sources": len(sources),
                "chunks": sum(int(s.get("chunks", 0)) for s in sources),
                "tokens": sum(int(s.get("tokens", 0)) for s in sources),
                "created": info.created or None,
                "updated": info.updated or None,
                "error": info.error,
            })
        return rows


def _partial_of(pool: pools.Pool, source: Source | None, label=lambda path: path) -> FileResult | None:
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
    """The known model aliases and whether each is in the Hugging Face cache (never goes online)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .loading import ALIASES
    from .settings import DEFAULT_MODEL

    try:
        repos = {repo.repo_id: repo for repo in scan_cache_dir().repos if repo.repo_type == "model"}
    except (CacheNotFound, OSError):
        repos = {}
    rows = []
    for alias, repo_id in ALIASES.items():
        row = {"name": alias, "repo": repo_id, "default": alias == DEFAULT_MODEL,
               "status": "not downloaded", "bytes": 0, "path": None, "problem": None}
        cached = repos.get(repo_id)
        if cached is not None:
            row["bytes"] = cached.size_on_disk
            row["status"] = "partial"
            problem = "no snapshot"
            for revision in sorted(cached.revisions, key=lambda r: r.last_modified, reverse=True):
                problem = checkpoint_problem(revision.snapshot_path)
                if problem is None:
                    row["status"], row["path"] = "downloaded", str(revision.snapshot_path)
                    break
            row["problem"] = problem
        rows.append(row)
    return rows


def pull_model(name: str) -> Path:
    """Download (or finish downloading) a model into the Hugging Face cache; returns its folder."""
    from .loading import ALIASES, CheckpointError

    if Path(name).expanduser().is_dir():
        raise MemcliError(f"{name} is a local folder; there is nothing to download")
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise MemcliError(f"unknown model {name!r}: give an alias ({', '.join(ALIASES)}) or a hub id owner/name")
    try:
        folder = resolve_checkpoint(repo_id)  # snapshot_download: resumes, honours HF_HOME / HF_HUB_OFFLINE
    except CheckpointError as err:
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


def diagnose(settings: Settings) -> dict:
    """What this machine can run: versions, GPU, quantization modes, disk, paths, resolved settings,
    and a list of what will not work here (`memcli doctor`). Loads no model."""
    import importlib.metadata
    import platform
    import sys

    from huggingface_hub import constants

    from . import __version__, paths
    from .quant import QUANT_MODES, check_mode_supported

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
    from .loading import ALIASES

    if settings.model in ALIASES:
        downloaded = any(row["name"] == settings.model and row["status"] == "downloaded" for row in list_models())
        free = disk["hf_cache_free_bytes"]
        if not downloaded and free is not None and free < CHECKPOINT_DISK_BYTES:
            problems.append(f"{settings.model} is not downloaded and {hf_cache} has {free / 1e9:.1f} GB free; "
                            f"the checkpoint takes about {CHECKPOINT_DISK_BYTES / 1e9:.0f} GB")
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
        "paths": {"data": str(paths.data_dir()), "pools": str(paths.pools_dir()), "config": str(paths.config_dir()),
                  "config_file": str(paths.config_file()), "cache": str(paths.cache_dir()), "hf_cache": str(hf_cache)},
        "settings": {"model": settings.model, "device": settings.device, "dtype": settings.dtype, "quant": settings.quant},
        "resolved": resolved,
        "problems": problems,
    }
