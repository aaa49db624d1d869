"""Ingestion: a pool and its sources -> text -> chunks -> memory updates, one run of an inject.

The caller holds the pool's writer lock and hands over the pool opened at its last commit
(`Run.pool`); `Run.ingest(items)` injects the sources in order and returns the `wire.InjectReport`:

* a source already complete in the pool is skipped (unless `force`); one whose log entry is
  incomplete (an interrupted run) resumes after its committed chunks; a path logged with other
  content is a changed file, injected again (its earlier rows stay and fade);
* every file is committed when it is done, and a long file every `COMMIT_EVERY` chunks, so an
  interruption keeps every committed chunk and nothing half-written (Ctrl-C: `InjectInterrupted`
  with the report of what was kept; the pool returns to its last commit);
* texts shorter than the model's minimum are packed together at the end of the run (`_pack`);
* the words the model has never seen are counted (`report.unknown_words`).

`loaded` is the app's LoadedModel (name, engine, tokenizer, cfg); `reload()` reads the pool's
last commit again.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

from memcli.base.clock import now_iso
from memcli.ingest.chunking import ChunkingError, Packed, Packer, chunk_token_ids, encode_pieces, share_rows
from memcli.ingest.discover import Skipped, Source
from memcli.ingest.extract import ExtractError, Reading, iter_text, sha256_of
from memcli.wire import Event, FileResult, InjectInterrupted, InjectReport

if TYPE_CHECKING:  # pragma: no cover
    from memcli.loading.vocabulary import UnknownWords
    from memcli.pools.pool import Pool
    from memcli.pools.meta import PoolStore

COMMIT_EVERY = 64  # chunks of one long file between commits (bounds the work an interruption loses)


class StopAfterChunk(KeyboardInterrupt):
    """Raised by an inject's `on_event` (a server whose client asked to stop): at a "chunk" event
    that chunk is committed first; then the inject ends as on Ctrl-C, with `InjectInterrupted`."""


@dataclass(eq=False)
class _Short:
    """A text shorter than the model's minimum, held until the end of its inject run to be packed
    with the run's other short texts (`Run._pack`)."""

    source: Source
    label: str  # the path it is logged under
    digest: str
    ids: list[int]
    previous: dict | None  # the log entry of its earlier version (a changed file)
    index: int  # file k of the run
    result: FileResult  # its place in the report, filled in once it is committed
    entry: dict | None = None  # its log entry, from its first packed chunk on


@dataclass(eq=False)
class Run:
    """One inject run into one pool (see the module docstring)."""

    store: "PoolStore"
    loaded: object  # the app's LoadedModel
    pool: "Pool"
    report: InjectReport
    chunk_tokens: int
    min_tokens: int
    unknown: "UnknownWords"
    reload: Callable[[], "Pool"]
    force: bool = False
    stdin: BinaryIO | None = None
    emit: Callable[[Event], None] = lambda event: None
    shorts: list[_Short] = field(default_factory=list)
    # the chunk injected last: its ids and, per piece, (log entry, provenance serial) - what a last
    # packed chunk too short on its own is filled up with
    last: Packed | None = None

    def ingest(self, items: list, started: float) -> InjectReport:
        """Inject `items` (Sources and Skipped, in order); InjectInterrupted on Ctrl-C."""
        report = self.report
        total = sum(1 for item in items if isinstance(item, Source))
        current: Source | None = None
        index = 0
        try:
            for item in items:
                if isinstance(item, Skipped):
                    report.files.append(FileResult(item.path, "skipped", item.reason))
                    self.emit(Event("skip", item.path, reason=item.reason))
                    continue
                current = item
                index += 1
                result = self._inject_source(item, (index, total))
                if isinstance(result, _Short):
                    self.shorts.append(result)
                    result = result.result  # its place in the report, filled in once it is packed
                report.files.append(result)
                current = None
            if self.shorts:
                self._pack(total)
        except KeyboardInterrupt:
            report.interrupted = True
            self.discard_unsaved()
            report.partial = self._partial_of(current)
            # short texts whose packed chunk was not committed: this run did not inject them
            report.files = [f for f in report.files if f.status != "pending"]
            report.unknown_words = self.unknown.to_json()
            report.seconds = time.perf_counter() - started
            raise InjectInterrupted(report) from None
        report.unknown_words = self.unknown.to_json()
        report.seconds = time.perf_counter() - started
        return report

    def discard_unsaved(self) -> None:
        """After an interruption or a failed file, return to the last committed state."""
        fresh, pool = self.reload(), self.pool
        pool.state, pool.sources, pool.next_chunk, pool.version, pool.parts = (
            fresh.state, fresh.sources, fresh.next_chunk, fresh.version, fresh.parts)
        self.loaded.engine.forget_prefix()

    def _partial_of(self, source: Source | None) -> FileResult | None:
        """After an interruption (and a return to the last commit): what is kept of the file in progress."""
        if source is None:
            return None
        for entry in reversed(self.pool.sources):
            if entry.get("path") == source.name and not entry.get("complete"):
                if entry.get("chunks"):
                    return FileResult(source.name, "partial", chunks=entry["chunks"], tokens=entry.get("tokens", 0))
                break
        return None

    def _inject_source(self, source: Source, position_in_run: tuple[int, int]) -> "FileResult | _Short":
        import torch

        from memcli.loading.prompts import context_ids
        from memcli.pools import pool as pools

        engine, tokenizer, pool, report, emit = self.loaded.engine, self.loaded.tokenizer, self.pool, self.report, self.emit
        index, total = position_in_run
        label = source.name  # what the pool logs, the events and the report name it (the client's name)
        reading = Reading()
        try:
            if source.kind == "stdin":
                # stdin can be read once: keep its text (bounded by what the user piped) to hash it
                text = "".join(iter_text(source, stdin=self.stdin))
                digest = hashlib.sha256(text.encode()).hexdigest()
                pieces: Iterable[str] = [text]
            else:
                digest = sha256_of(source)
                pieces = iter_text(source, reading=reading)
        except ExtractError as err:
            emit(Event("skip", label, reason=str(err)))
            return FileResult(label, "skipped", str(err))
        entry = pool.source_by_hash(digest)
        if entry is not None and entry.get("complete") and not self.force:
            same = entry.get("path") == label or source.kind == "stdin"
            reason = "already in the pool" if same else f"already in the pool as {entry.get('path')}"
            emit(Event("skip", label, reason=reason))
            return FileResult(label, "already", reason + " (use --force to inject it again)")
        twin = None if self.force else next((s for s in self.shorts if s.digest == digest), None)
        if twin is not None:  # a short text waiting to be packed: its twin goes in with it
            reason = f"the same text as {twin.label} in this run"
            emit(Event("skip", label, reason=reason))
            return FileResult(label, "already", reason + " (use --force to inject it again)")
        # A source is its path: the same path with other content is a changed file, injected again;
        # the rows of its earlier version stay in memory and fade like all rows.
        previous = None
        if source.kind != "stdin":
            previous = next((s for s in reversed(pool.sources) if s.get("path") == label and s.get("complete")
                             and s.get("sha256") != digest and not s.get("superseded_by")), None)
        resume_after = entry["chunks"] if entry is not None and not entry.get("complete") and not self.force \
            and not entry.get("packed") else 0
        emit(Event("file", label, file_index=index, files_total=total, total=source.size))
        done = tokens_done = 0  # chunks and tokens injected by this run
        # position estimate for progress: units read (bytes, pages) per token encoded, times tokens chunked
        encoded_tokens = [0]
        head: list[int] = []  # the text's first ids: all of them when it is shorter than the minimum

        def encode(text: str) -> list[int]:
            ids = context_ids(tokenizer, text)
            encoded_tokens[0] += len(ids)
            if len(head) < self.min_tokens:
                head.extend(ids)
            self.unknown.scan(text, ids)
            return ids

        position = 0  # tokens of this file chunked so far (resumed ones included)
        began: list[float] = []  # (time, position in units) when this run's first chunk of the file began
        try:
            chunks = chunk_token_ids(encode_pieces(pieces, encode), self.chunk_tokens, self.min_tokens)
            try:
                first = next(chunks)  # reads at most about two chunks of the text
            except ChunkingError:
                if not head:
                    raise  # no text at all
                # shorter than the minimum: packed with the run's other short texts at its end
                return _Short(source, label, digest, list(head), previous, index,
                              FileResult(label, "pending", tokens=len(head)))
            if entry is None or self.force or entry.get("complete") or entry.get("packed") or \
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
                self.last = Packed(ids=list(chunk), pieces=[((entry, pool.next_chunk), len(chunk))])
                pool.next_chunk += 1
                entry["chunks"] += 1
                entry["tokens"] += len(chunk)
                done += 1
                tokens_done += len(chunk)
                report.chunks += 1
                report.tokens += len(chunk)
                try:
                    emit(Event("chunk", label, chunks=done, tokens=tokens_done, file_index=index,
                               files_total=total, done=at, total=reading.total, unit=reading.unit,
                               seconds=time.perf_counter() - began[0], start=began[1]))
                except StopAfterChunk:
                    pools.save(self.store, pool)  # a clean boundary (unlike a signal's): keep this chunk
                    raise
                if done % COMMIT_EVERY == 0:
                    pools.save(self.store, pool)
                    emit(Event("commit", label, chunks=done))
        except (ExtractError, ChunkingError) as err:
            # Only what this file added since its last commit is undone.
            self.discard_unsaved()
            self.last = None  # (its chunks are gone with it)
            emit(Event("skip", label, reason=str(err)))
            return FileResult(label, "skipped", str(err))
        entry["complete"] = True
        entry["time"] = now_iso()
        if previous is not None:
            previous["superseded_by"] = entry["id"]
        pools.save(self.store, pool)
        status = "resumed" if resume_after else "changed" if previous is not None else "injected"
        reason = "changed since it was injected; its earlier rows stay and fade" if status == "changed" else ""
        return FileResult(label, status, reason, chunks=done, tokens=tokens_done)

    # ------------------------------------------------------------------ short texts, packed
    def _pack(self, total: int) -> None:
        """Inject the run's texts shorter than the model's minimum, packed into shared chunks
        (chunking.Packer): whole texts while they fit, the last chunk filled up with the end of the
        chunk this run injected before it. Each text keeps its own log entry (`packed`: the chunks
        it is in; `rows`: the memory rows it was given per layer). A chunk's new rows are shared
        among its texts by their tokens (chunking.share_rows), and every row is tagged with the
        provenance serial of the text it is counted for, so `pool info`'s retention and
        `ask --sources` count a packed text's rows as they count any source's. A text is refused
        only when nothing at all can be packed with it: the run's short texts are too short
        together and this run injected nothing else."""
        packer = Packer(self.chunk_tokens, self.min_tokens)
        unsaved: list[_Short] = []
        for short in self.shorts:
            for chunk in packer.add(short, short.ids):
                self._inject_packed(chunk, total, unsaved)
        last = packer.finish(self.last)
        if last is not None:
            self._inject_packed(last, total, unsaved)
        if unsaved:
            self._commit_packed(unsaved)
        left = [s for s in self.shorts if s in packer.left]
        together = sum(len(s.ids) for s in left)
        for short in left:
            reason = (f"only {len(short.ids)} tokens and nothing to pack it with: {self.loaded.name} needs at least "
                      f"{self.min_tokens} tokens per chunk, and " +
                      (f"this run's short texts make only {together}" if len(left) > 1
                       else "this run injected nothing else"))
            short.result.status, short.result.reason, short.result.tokens = "skipped", reason, 0
            self.emit(Event("skip", short.label, reason=reason))

    def _inject_packed(self, chunk: Packed, total: int, unsaved: list[_Short]) -> None:
        import torch

        pool, engine = self.pool, self.loaded.engine
        state, k_rows = pool.state, self.loaded.cfg.num_tokens
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
        delta = engine.inject(state, torch.tensor([chunk.ids]))
        engine.update(state, delta, origin=origin)
        for (entry, _), n in zip(owners, rows):
            entry["rows"] = entry.get("rows", entry["chunks"] * k_rows) + n
        self.last = Packed(ids=list(chunk.ids), pieces=[(o, t) for o, (_, t) in zip(owners, chunk.pieces)])
        self.report.chunks += 1
        self.report.tokens += len(chunk.ids)
        for short in chunk.complete:
            short.entry["complete"] = True
            short.entry["time"] = now_iso()
            if short.previous is not None:
                short.previous["superseded_by"] = short.entry["id"]
            unsaved.append(short)
        first = next(owner for owner, _ in chunk.pieces if isinstance(owner, _Short))
        try:
            self.emit(Event("chunk", first.label, chunks=1, tokens=len(chunk.ids), file_index=first.index,
                            files_total=total))
        except StopAfterChunk:
            self._commit_packed(unsaved)
            raise
        if chunk.pieces[-1][0] in chunk.complete:  # no text left half-injected: a clean boundary
            self._commit_packed(unsaved)

    def _commit_packed(self, unsaved: list[_Short]) -> None:
        """Save, then count the packed texts that are now complete as injected."""
        from memcli.pools import pool as pools

        pools.save(self.store, self.pool)
        for short in unsaved:
            chunks = len(set(short.entry["packed"]))
            short.result.status = "changed" if short.previous is not None else "injected"
            short.result.reason = ("changed since it was injected; its earlier rows stay and fade"
                                   if short.previous is not None else "")
            short.result.chunks, short.result.tokens, short.result.packed = chunks, short.entry["tokens"], True
        unsaved.clear()


def _position(tokens: int, encoded_tokens: int, reading: Reading) -> float:
    """Where in the file (in reading.unit) the first `tokens` tokens end: what was read so far,
    shared out over the tokens encoded from it (text is read at most a piece ahead)."""
    if reading.total is None or not encoded_tokens:
        return 0
    return min(tokens * reading.done / encoded_tokens, reading.done, reading.total)


def nothing_found(paths: list[str], glob: str | None, report: InjectReport) -> str:
    """Why an inject found no file to read, in one line."""
    where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    ignored = sum(report.ignored_by_type.values())
    notes = []
    if glob is not None and report.ignored_by_glob:
        notes.append(f"--glob {glob!r} matched none of its {report.ignored_by_glob:,} files")
    elif glob is not None:
        notes.append(f"--glob {glob!r} matched no file")
    if ignored:
        kinds = ", ".join(f"{k} {v:,}" for k, v in list(report.summary()["ignored_by_type"].items())[:4])
        notes.append(f"{ignored:,} ignored by type ({kinds}; --type text reads them)")
    return f"nothing to inject in {where}: " + ("; ".join(notes) if notes else "no files there")
