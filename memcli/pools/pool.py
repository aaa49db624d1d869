"""Pools: a memory state saved in the store, bound to a model, with its injection log.

How a state becomes immutable, content-addressed store parts, so that saving costs what changed:

  stm-base-*    the whole short-term memory [L, N, d] (new pools, and a compaction once the
                patches since the base add up to N rows per layer). A new pool's base is the
                checkpoint's memory, so it is the same object for every pool of that model:
                creating a pool writes a manifest, not gigabytes; from its second pool on, the
                store finds that object by the memory's content key (state.initial_key) without
                hashing it.
  stm-patch-*   the slots rewritten since the last save (the state's dirty mask): flat indices
                into [L * N] and their rows [M, d] (format-1 pools: freed slots [m, L, K] and
                rows [m, L, K, d], still read)
  stm-meta-*    small per-slot tables rewritten on every save: logical order, provenance, M+ ages
  stm-gen-*     the drop generator's state (its own part, so that stm-meta of a new pool is shared)
  stm-census-*  how many rows of each injected chunk are alive in the STM and the LTM (distinct
                origins and their counts, at most N of each): all `pool info` reads of the state
  ltm-bank-*    M+: rows appended to the long-term bank since the last save (dropped STM rows
                with their keys, ages and provenance); never rewritten
  ltm-index-*   M+: each layer's list of bank ids and recall frequencies; rewritten at merges only

The injection log is appended to the store's pool log (pool_meta.py), one record per entry that
changed. Loading applies base + patches in order, from one snapshot of the pool; every part's
bytes are checked against its sha256 in the same pass that reads them (once per process per file:
store/integrity.py), so a damaged part is refused in one line, never loaded, and an inject never
commits bytes that were not checked.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

import torch

from memcli import __version__
from memcli.pools.meta import Binding, check_binding, check_meta, sources_of, totals_of
from memcli.core.state import LongTermMemory, MemoryState, new_generator
from memcli.store import PoolCorrupt, PoolError, PoolStore

STATE_FORMAT = 1


@dataclass
class Pool:
    name: str
    state: MemoryState
    binding: Binding
    sources: list[dict] = field(default_factory=list)  # the injection log
    next_chunk: int = 0  # provenance serial of the next injected chunk
    version: int = 0  # store version this was loaded from / last saved as
    parts: dict = field(default_factory=dict)  # state layout: which part ids hold what
    extra: dict = field(default_factory=dict)  # other manifest meta kept verbatim (forked_from, ...)
    saved_log: list[str] = field(default_factory=list, repr=False)  # each entry as last saved (JSON)

    def source_by_hash(self, sha256: str) -> dict | None:
        """The log entry of this content: a complete one if any, else the latest partial one."""
        entries = [s for s in self.sources if s.get("sha256") == sha256]
        return next((s for s in reversed(entries) if s.get("complete")), entries[-1] if entries else None)


def _pid(kind: str) -> str:
    return f"{kind}-{int(time.time())}-{secrets.token_hex(6)}"


def _entry_json(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- saving
def save(store: PoolStore, pool: Pool) -> None:
    """Commit what changed since the last save (the caller holds the writer lock)."""
    state, layout = pool.state, dict(pool.parts)
    new_parts: dict[str, dict[str, torch.Tensor]] = {}
    patches = list(layout.get("stm_patches", []))
    L, n = state.num_layers, state.num_rows
    dirty = state.dirty.flatten().nonzero().squeeze(1).cpu() if state.dirty is not None else torch.empty(0, dtype=torch.int64)
    dirty_rows = -(-len(dirty) // L)  # rows per layer, rounded up
    patch_rows = sum(layout.get("stm_patch_rows", [])) + dirty_rows
    content_keys = {}
    if state.full_rewrite or "stm_base" not in layout or patch_rows >= n:
        # A fresh base whose slots already hold every patch: loading stays O(N) per layer.
        base = _pid("stm-base")
        new_parts[base] = {"slots": state.slots.contiguous()}
        layout["stm_base"], patches, layout["stm_patch_rows"] = base, [], []
        if state.initial_key is not None and state.version == 0 and state.dirty is None:
            # no update since loading (each one bumps version): the slots are the checkpoint's
            content_keys[base] = state.initial_key
    elif len(dirty):
        patch = _pid("stm-patch")
        new_parts[patch] = {"index": dirty, "rows": state.slots.reshape(L * n, -1)[dirty.to(state.slots.device)].cpu()}
        patches.append(patch)
        layout["stm_patch_rows"] = layout.get("stm_patch_rows", []) + [dirty_rows]
    layout["stm_patches"] = patches
    meta_id, gen_id = _pid("stm-meta"), _pid("stm-gen")
    new_parts[meta_id] = {
        "order": state.order,
        "origin": state.origin,
        **({"stm_ages": state.stm_ages} if state.stm_ages is not None else {}),
    }
    new_parts[gen_id] = {"generator": state.generator.get_state()}
    layout["stm_meta"], layout["stm_gen"] = meta_id, gen_id
    census_id = _pid("stm-census")
    new_parts[census_id] = _census(state)
    layout["census"] = census_id
    if state.ltm is not None:
        _save_ltm(state.ltm, layout, new_parts)
    layout.update(
        format=STATE_FORMAT,
        initialized=state.initialized,
        update_count=state.update_count,
        dtype=str(state.slots.dtype).removeprefix("torch."),
        shape=list(state.slots.shape),
    )
    part_ids = [layout["stm_base"], *patches, meta_id, gen_id, census_id, *layout.get("ltm_banks", [])]
    if "ltm_index" in layout:
        part_ids.append(layout["ltm_index"])
    entries = [_entry_json(s) for s in pool.sources]
    records = [{"source": i, "entry": s} for i, (s, text) in enumerate(zip(pool.sources, entries))
               if i >= len(pool.saved_log) or pool.saved_log[i] != text]
    manifest = store.commit(
        pool.name,
        meta=_meta(pool, layout),
        part_ids=part_ids,
        new_parts=new_parts,
        expect_version=pool.version or None,
        log_append=records,
        # a new pool starts from its checkpoint's memory: the same parts for every such pool
        probe=new_parts if not pool.version else (),
        content_keys=content_keys,
    )
    pool.version = manifest["version"]
    pool.parts = layout
    pool.saved_log = entries
    state.dirty = None
    state.full_rewrite = False


def _census(state: MemoryState) -> dict[str, torch.Tensor]:
    """Distinct row origins alive in the STM and the LTM, with their row counts (sorted)."""
    stm_origin, stm_count = torch.unique(state.origin.flatten().cpu(), return_counts=True)
    ltm_origin = torch.empty(0, dtype=torch.int64)
    if state.ltm is not None:
        ltm = state.ltm
        live = [torch.cat((ids.cpu(), ltm.cache_ids().cpu())) for ids in ltm.ids]
        ltm_origin = torch.cat([ltm.origin[l, ids] for l, ids in enumerate(live)]).cpu()
    ltm_origin, ltm_count = torch.unique(ltm_origin, return_counts=True)
    return {"stm_origin": stm_origin, "stm_count": stm_count, "ltm_origin": ltm_origin, "ltm_count": ltm_count}


def _save_ltm(ltm: LongTermMemory, layout: dict, new_parts: dict) -> None:
    if layout.get("ltm_epoch", 0) != ltm.epoch:
        # the bank was compacted (ids renumbered): its rows are written anew, once
        layout["ltm_banks"], layout["ltm_saved_size"], layout["ltm_epoch"] = [], 0, ltm.epoch
    saved = layout.get("ltm_saved_size", 0)
    if ltm.size > saved:
        bank = _pid("ltm-bank")
        new_parts[bank] = {
            "rows": ltm.rows[:, saved : ltm.size].contiguous(),
            "keys": ltm.keys[:, saved : ltm.size].contiguous(),
            "birth_age": ltm.birth_age[:, saved : ltm.size].contiguous(),
            "birth_update": ltm.birth_update[saved : ltm.size].contiguous(),
            "origin": ltm.origin[:, saved : ltm.size].contiguous(),
        }
        layout["ltm_banks"] = layout.get("ltm_banks", []) + [bank]
        layout["ltm_saved_size"] = ltm.size
    index_key = [len(i) for i in ltm.ids] + [ltm.cache_start]
    if layout.get("ltm_index_key") != index_key or "ltm_index" not in layout:
        index = _pid("ltm-index")
        new_parts[index] = {
            "ids": torch.cat(ltm.ids),
            "lengths": torch.tensor([len(i) for i in ltm.ids]),
            "recall": torch.cat(ltm.recall),
        }
        layout["ltm_index"] = index
        layout["ltm_index_key"] = index_key
    layout["ltm"] = {"cache_start": ltm.cache_start, "update_step": ltm.update_step, "size": ltm.size}


def _meta(pool: Pool, layout: dict) -> dict:
    return {
        **pool.extra,
        "written_by": __version__,  # the memcli that last saved the memory (pool info shows it)
        "model": pool.binding.to_json(),
        "next_chunk": pool.next_chunk,
        "totals": totals_of(pool.sources),
        "state": layout,
    }


def create(store: PoolStore, name: str, binding: Binding, state: MemoryState) -> Pool:
    """A new pool holding `state` (usually the checkpoint's built-in memory)."""
    pool = Pool(name=name, state=state, binding=binding, extra={"created_with": "memcli", "created_by": __version__})
    state.full_rewrite = True
    with store.writer(name):
        save(store, pool)
    return pool


# --------------------------------------------------------------------------- loading
def load(store: PoolStore, name: str, binding: Binding | None = None, device="cpu",
         dtype: torch.dtype | None = None, verify: bool = False) -> Pool:
    """Read a pool back into a state, from one snapshot (whatever commits happen meanwhile);
    refuses a pool of another model when `binding` is given. Every part read is checked against
    its sha256 (the first time this process reads that file; verify=True: again, whatever it
    checked before)."""
    with store.snapshot(name) as snap:
        manifest = snap.manifest
        meta = manifest["meta"]
        records = snap.log_records()
        check_meta(f"pool {name}", meta, records)
        pool_binding = Binding.from_json(meta["model"])
        if binding is not None:
            check_binding(name, pool_binding, binding)
        layout = meta["state"]
        if layout.get("format") != STATE_FORMAT:
            raise PoolError(f"pool {name} has an unknown state layout; it was written by another memcli version")

        def part(part_id):
            if part_id not in manifest["parts"]:
                raise PoolCorrupt(f"pool {name}: its state names part {part_id}, which its manifest does not list")
            return snap.read(part_id, recheck=verify)

        try:
            state = _load_state(name, layout, part, device, dtype)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as err:
            if isinstance(err, PoolError):
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise PoolError(f"pool {name} is damaged: {reason}") from None
        sources = sources_of(meta, records)
    extra = {k: v for k, v in meta.items() if k not in ("model", "sources", "next_chunk", "state", "totals")}
    return Pool(
        name=name,
        state=state,
        binding=pool_binding,
        sources=sources,
        next_chunk=int(meta.get("next_chunk", 0)),
        version=int(manifest["version"]),
        parts=layout,
        extra=extra,
        # a format-1 manifest kept the log inside itself: the first save writes all of it to the log
        saved_log=[] if "sources" in meta else [_entry_json(s) for s in sources],
    )


def _load_state(name, layout, part, device, dtype) -> MemoryState:
    slots = part(layout["stm_base"])["slots"]
    L, n = slots.shape[:2]
    flat = slots.view(L * n, -1)
    for patch_id in layout.get("stm_patches", []):
        patch = part(patch_id)
        if "index" in patch:
            flat[patch["index"]] = patch["rows"]
        else:  # format-1 patch: the freed slots and new rows of each update
            layer = torch.arange(L)[:, None]
            for freed, rows in zip(patch["slots"], patch["rows"]):
                slots[layer, freed] = rows
    stm_meta = part(layout["stm_meta"])
    generator = new_generator(0)
    generator.set_state(part(layout["stm_gen"])["generator"] if "stm_gen" in layout else stm_meta["generator"])
    state = MemoryState(
        slots=slots.to(device=device, dtype=dtype or slots.dtype),
        order=stm_meta["order"].to(device),
        initialized=bool(layout["initialized"]),
        origin=stm_meta["origin"].to(device),
        generator=generator,
        update_count=int(layout["update_count"]),
        stm_ages=stm_meta["stm_ages"].to(device) if "stm_ages" in stm_meta else None,
        full_rewrite=False,
    )
    _check_state_shapes(name, state)
    if "ltm" in layout:
        state.ltm = _load_ltm(layout, part, dtype)
    return state


def _check_state_shapes(name: str, state: MemoryState) -> None:
    L, n = state.slots.shape[:2]
    if state.order.shape != (L, n) or state.origin.shape != (L, n):
        raise PoolError(f"pool {name} is damaged: its tables do not match its memory shape {list(state.slots.shape)}")
    expected = torch.arange(n).expand(L, n)
    if not torch.equal(state.order.sort(dim=1).values.cpu(), expected):
        raise PoolError(f"pool {name} is damaged: its row order is not a permutation")


def _load_ltm(layout: dict, part, dtype) -> LongTermMemory:
    banks = [part(b) for b in layout.get("ltm_banks", [])]
    cat = lambda key, dim: torch.cat([b[key] for b in banks], dim=dim)  # noqa: E731
    index = part(layout["ltm_index"])
    lengths = index["lengths"].tolist()
    info = layout["ltm"]
    rows = cat("rows", 1)
    ltm = LongTermMemory(
        rows=rows.to(dtype or rows.dtype),
        keys=cat("keys", 1).to(dtype or rows.dtype),
        birth_age=cat("birth_age", 1),
        birth_update=cat("birth_update", 0),
        origin=cat("origin", 1),
        size=int(info["size"]),
        ids=list(torch.split(index["ids"], lengths)),
        recall=list(torch.split(index["recall"], lengths)),
        cache_start=int(info["cache_start"]),
        update_step=int(info["update_step"]),
        epoch=int(layout.get("ltm_epoch", 0)),
    )
    if ltm.rows.shape[1] != ltm.size:
        raise PoolError("long-term memory bank size does not match its manifest")
    return ltm


# --------------------------------------------------------------------------- provenance
def retention(pool: Pool) -> list[dict]:
    """Per source: how many of the rows it wrote are still in memory, and where (STM / LTM).

    Every injected chunk writes `num_tokens` rows in every layer; each row carries the serial of
    the chunk that wrote it, so this is a count, not an estimate.
    """
    state, num_tokens = pool.state, pool.binding.num_tokens
    stm_origin = state.origin.flatten().cpu()
    ltm_origin = torch.empty(0, dtype=torch.int64)
    if state.ltm is not None:
        ltm = state.ltm
        live = [torch.cat((ids, ltm.cache_ids())) for ids in ltm.ids]
        ltm_origin = torch.cat([ltm.origin[l, ids] for l, ids in enumerate(live)])
    report = []
    for source in pool.sources:
        first, count = source.get("first_chunk", 0), source.get("chunks", 0)
        written = count * num_tokens * state.num_layers

        def within(origin: torch.Tensor) -> int:
            return int(((origin >= first) & (origin < first + count)).sum())

        stm, ltm_rows = within(stm_origin), within(ltm_origin)
        report.append({
            "source": source.get("path"),
            "sha256": source.get("sha256"),
            "chunks": count,
            "rows_written": written,
            "rows_in_stm": stm,
            "rows_in_ltm": ltm_rows,
            "share_retained": (stm + ltm_rows) / written if written else 0.0,
        })
    return report
