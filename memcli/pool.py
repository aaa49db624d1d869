"""Pools: a memory state saved in the store, bound to a model, with its injection log.

How a state becomes immutable store parts, so that saving costs what changed:

  stm-base-*    the whole short-term memory [L, N, d] (new pools, and a compaction once the
                patches since the base add up to N rows per layer)
  stm-patch-*   the rows an update wrote: freed slots [m, L, K] and new rows [m, L, K, d]
  stm-meta-*    small per-slot tables rewritten on every save: logical order, provenance, M+ ages,
                and the drop generator's state
  ltm-bank-*    M+: rows appended to the long-term bank since the last save (dropped STM rows
                with their keys, ages and provenance); never rewritten
  ltm-index-*   M+: each layer's list of bank ids and recall frequencies; rewritten at merges only

Loading applies base + patches in order. A fork shares every part by hard link; the first save
after it writes new parts only.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from .state import LongTermMemory, MemoryState, new_generator
from .store import PoolError, PoolStore

STATE_FORMAT = 1


class PoolModelMismatch(PoolError):
    pass


@dataclass(frozen=True)
class Binding:
    """Which model a pool belongs to. Pools can only be read by a model with the same config."""

    model: str  # what the user named: alias, hub id or folder
    family: str
    config_hash: str
    num_tokens: int = 0  # rows each injected chunk writes per layer (for retention figures)
    revision: str | None = None
    # engine helper: earlier config hashes of the same model (raw-config fingerprint of memcli < 0.3),
    # accepted from existing pools; never written
    legacy_hashes: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict:
        return {"model": self.model, "family": self.family, "config_hash": self.config_hash,
                "num_tokens": self.num_tokens, "revision": self.revision}

    @staticmethod
    def from_json(data: dict) -> "Binding":
        return Binding(data["model"], data["family"], data["config_hash"], int(data.get("num_tokens") or 0),
                       data.get("revision"))


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

    def source_by_hash(self, sha256: str) -> dict | None:
        """The log entry of this content: a complete one if any, else the latest partial one."""
        entries = [s for s in self.sources if s.get("sha256") == sha256]
        return next((s for s in reversed(entries) if s.get("complete")), entries[-1] if entries else None)


def _pid(kind: str) -> str:
    return f"{kind}-{int(time.time())}-{secrets.token_hex(6)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- saving
def save(store: PoolStore, pool: Pool) -> None:
    """Commit what changed since the last save (the caller holds the writer lock)."""
    state, layout = pool.state, dict(pool.parts)
    new_parts: dict[str, dict[str, torch.Tensor]] = {}
    patches = list(layout.get("stm_patches", []))
    patch_rows = sum(layout.get("stm_patch_rows", [])) + sum(p[0].shape[1] for p in state.unsaved_patches)
    if state.full_rewrite or "stm_base" not in layout or patch_rows >= state.num_rows:
        # A fresh base whose slots already hold every patch: loading stays O(N) per layer.
        base = _pid("stm-base")
        new_parts[base] = {"slots": state.slots.contiguous()}
        layout["stm_base"], patches, layout["stm_patch_rows"] = base, [], []
    elif state.unsaved_patches:
        patch = _pid("stm-patch")
        new_parts[patch] = {
            "slots": torch.stack([p[0] for p in state.unsaved_patches]),
            "rows": torch.stack([p[1] for p in state.unsaved_patches]),
        }
        patches.append(patch)
        layout["stm_patch_rows"] = layout.get("stm_patch_rows", []) + [
            p[0].shape[1] for p in state.unsaved_patches
        ]
    layout["stm_patches"] = patches
    meta = _pid("stm-meta")
    new_parts[meta] = {
        "order": state.order,
        "origin": state.origin,
        "generator": state.generator.get_state(),
        **({"stm_ages": state.stm_ages} if state.stm_ages is not None else {}),
    }
    layout["stm_meta"] = meta
    if state.ltm is not None:
        _save_ltm(state.ltm, layout, new_parts)
    layout.update(
        format=STATE_FORMAT,
        initialized=state.initialized,
        update_count=state.update_count,
        dtype=str(state.slots.dtype).removeprefix("torch."),
        shape=list(state.slots.shape),
    )
    part_ids = [layout["stm_base"], *patches, meta, *layout.get("ltm_banks", [])]
    if "ltm_index" in layout:
        part_ids.append(layout["ltm_index"])
    manifest = store.commit(
        pool.name,
        meta=_meta(pool, layout),
        part_ids=part_ids,
        new_parts=new_parts,
        expect_version=pool.version or None,
    )
    pool.version = manifest["version"]
    pool.parts = layout
    state.unsaved_patches.clear()
    state.full_rewrite = False


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
        "model": pool.binding.to_json(),
        "sources": pool.sources,
        "next_chunk": pool.next_chunk,
        "state": layout,
    }


def create(store: PoolStore, name: str, binding: Binding, state: MemoryState) -> Pool:
    """A new pool holding `state` (usually the checkpoint's built-in memory)."""
    pool = Pool(name=name, state=state, binding=binding, extra={"created_with": "memcli"})
    state.full_rewrite = True
    with store.writer(name):
        save(store, pool)
    return pool


# --------------------------------------------------------------------------- loading
def read_binding(store: PoolStore, name: str) -> Binding:
    meta = store.read_manifest(name).get("meta", {})
    try:
        return Binding.from_json(meta["model"])
    except (KeyError, TypeError):
        raise PoolError(f"pool {name} has no model binding in its manifest") from None


def check_binding(name: str, pool_binding: Binding, model_binding: Binding) -> None:
    known = (model_binding.config_hash, *model_binding.legacy_hashes)
    if pool_binding.config_hash not in known or pool_binding.family != model_binding.family:
        raise PoolModelMismatch(
            f"pool {name} belongs to model {pool_binding.model} ({pool_binding.family}, config "
            f"{pool_binding.config_hash}), not to {model_binding.model} ({model_binding.family}, config "
            f"{model_binding.config_hash})"
        )


def load(store: PoolStore, name: str, binding: Binding | None = None, device="cpu",
         dtype: torch.dtype | None = None, verify: bool = False) -> Pool:
    """Read a pool back into a state; refuses a pool of another model when `binding` is given."""
    manifest = store.read_manifest(name)
    meta = manifest.get("meta", {})
    pool_binding = read_binding(store, name)
    if binding is not None:
        check_binding(name, pool_binding, binding)
    layout = meta.get("state")
    if not isinstance(layout, dict) or layout.get("format") != STATE_FORMAT:
        raise PoolError(f"pool {name} has an unknown state layout; it was written by another memcli version")

    def part(part_id):
        return store.read_part(name, part_id, verify=verify)

    try:
        slots = part(layout["stm_base"])["slots"]
        for patch_id in layout.get("stm_patches", []):
            patch = part(patch_id)
            layer = torch.arange(slots.shape[0])[:, None]
            for freed, rows in zip(patch["slots"], patch["rows"]):
                slots[layer, freed] = rows
        stm_meta = part(layout["stm_meta"])
        generator = new_generator(0)
        generator.set_state(stm_meta["generator"])
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
    except (KeyError, IndexError, RuntimeError, ValueError) as err:
        if isinstance(err, PoolError):
            raise
        raise PoolError(f"pool {name} is damaged: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    extra = {k: v for k, v in meta.items() if k not in ("model", "sources", "next_chunk", "state")}
    return Pool(
        name=name,
        state=state,
        binding=pool_binding,
        sources=list(meta.get("sources", [])),
        next_chunk=int(meta.get("next_chunk", 0)),
        version=int(manifest["version"]),
        parts=layout,
        extra=extra,
    )


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
