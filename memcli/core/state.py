"""A memory state: everything a pool is, and nothing a model is.

Short-term memory (STM) is kept as a *slot table*: `slots[l]` holds N rows in physical slots and
`order[l, i]` names the slot of logical row i (row 0 = oldest, row N-1 = newest). An update
frees the K dropped rows' slots and writes the K new rows there, so it moves K rows per layer instead
of rebuilding the whole [L, N, d] tensor (reference-semantics §10.3.5). Attention does not care in
which physical order prefix keys sit as long as each row is rotated by its logical position, so the
model reads slots directly; `memory()` materialises the logical order for tests and export.

M+ long-term memory (LTM) rows live in an append-only *bank* of rows dropped from the STM (plus the
checkpoint's LTM at ids [0, n0)). Each layer's LTM is an ordered list of bank ids with a recall
frequency per entry; the not-yet-merged cache is the bank tail [cache_start, size). Ages are never
rewritten: a bank row's age is `birth_age + K * (update_count - birth_update)`, which is exactly the
reference's "+K to every LTM and cached age on every update" (reference-semantics §7.2).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

CHECKPOINT_ORIGIN = -1  # provenance of rows that came with the checkpoint
_STATE_TOKENS = itertools.count(1)  # never reused within a process, unlike id()


@dataclass
class LongTermMemory:
    rows: Tensor  # [L, capacity, d]  bank rows (first `size` valid)
    keys: Tensor  # [L, capacity, s]  key_proj(input_layernorm(row)) per layer
    birth_age: Tensor  # [L, capacity] float64: age when the row entered the bank
    birth_update: Tensor  # [capacity] int64: update_count when the row entered the bank
    origin: Tensor  # [L, capacity] int64: injection chunk that wrote the row (CHECKPOINT_ORIGIN)
    size: int
    ids: list[Tensor]  # per layer: int64 bank ids of that layer's LTM, in LTM order
    recall: list[Tensor]  # per layer: float64 recall frequency of each LTM entry
    cache_start: int  # bank ids [cache_start, size) are the not-yet-merged cache
    update_step: int = 0  # K * updates since the last merge
    epoch: int = 0  # bumped when `compact` renumbers the bank

    def ages(self, bank_ids: Tensor, layer: int, update_count: int, num_tokens: int) -> Tensor:
        ids = bank_ids.to(self.birth_update.device)
        return self.birth_age[layer, ids] + num_tokens * (update_count - self.birth_update[ids]).double()

    def append(self, rows: Tensor, keys: Tensor, ages: Tensor, origin: Tensor, update_count: int) -> None:
        """Append [L, m, ...] rows to the bank (amortised O(m): capacity doubles)."""
        m = rows.shape[1]
        if self.size + m > self.rows.shape[1]:
            capacity = max(2 * self.rows.shape[1], self.size + m, 64)
            self.rows = grow(self.rows, capacity)
            self.keys = grow(self.keys, capacity)
            self.birth_age = grow(self.birth_age, capacity)
            self.birth_update = grow(self.birth_update, capacity)
            self.origin = grow(self.origin, capacity)
        end = self.size + m
        self.rows[:, self.size : end] = rows
        self.keys[:, self.size : end] = keys
        self.birth_age[:, self.size : end] = ages
        self.birth_update[self.size : end] = update_count
        self.origin[:, self.size : end] = origin
        self.size = end

    def cache_ids(self) -> Tensor:
        return torch.arange(self.cache_start, self.size, device=self.birth_update.device)

    def dead_rows(self) -> int:
        """Bank rows that no layer's LTM and not the cache refers to any more."""
        return self.size - int(self._live().sum())

    def _live(self) -> Tensor:
        live = torch.zeros(self.size, dtype=torch.bool)
        for ids in self.ids:
            live[ids.cpu()] = True
        live[self.cache_start : self.size] = True
        return live

    def compact(self) -> None:
        """Drop bank rows nobody refers to, keeping the order of the rest (ids are renumbered).

        Recall frequencies decay at every merge, so without this the bank would keep every row ever
        dropped from the short-term memory; with it, it stays near the LTM's own size."""
        keep = torch.nonzero(self._live()).squeeze(1)
        renumber = torch.full((self.size,), -1, dtype=torch.int64)
        renumber[keep] = torch.arange(len(keep))
        self.rows = self.rows[:, keep.to(self.rows.device)].contiguous()
        self.keys = self.keys[:, keep.to(self.keys.device)].contiguous()
        self.birth_age = self.birth_age[:, keep].contiguous()
        self.birth_update = self.birth_update[keep].contiguous()
        self.origin = self.origin[:, keep].contiguous()
        self.ids = [renumber[ids.cpu()] for ids in self.ids]
        self.cache_start = int((keep < self.cache_start).sum())
        self.size = len(keep)
        self.epoch += 1


def grow(t: Tensor, capacity: int) -> Tensor:
    dim = 1 if t.dim() > 1 else 0
    shape = list(t.shape)
    shape[dim] = capacity
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


@dataclass
class MemoryState:
    slots: Tensor  # [L, N, d]
    order: Tensor  # [L, N] int64: slot of logical row i
    initialized: bool
    origin: Tensor  # [L, N] int64 per slot: injection chunk that wrote it (CHECKPOINT_ORIGIN)
    generator: torch.Generator  # drops; its state is saved with the pool
    update_count: int = 0
    version: int = 0  # bumped on every change; derived caches (memory K/V) key on it
    stm_ages: Tensor | None = None  # M+: [L, N] float64 per slot
    ltm: LongTermMemory | None = None  # M+
    # Slots rewritten since the last save ([L, N] bool, None when none): a save writes those slots'
    # current rows, once each however often they were rewritten, instead of the whole STM.
    dirty: Tensor | None = None
    full_rewrite: bool = True  # the whole STM must be saved (new pool, uninitialized fill)
    # Content key of the checkpoint's initial memory (loading.initial_state): while `version` is 0
    # the slots are exactly that memory, and a new pool's save lets the store find the object
    # holding it without hashing it (pool.save). A clone keeps it: same slots, same version.
    initial_key: str | None = None

    def __post_init__(self):
        # Not dataclass fields: never compared, cloned or saved. Every MemoryState object, a clone
        # too, gets its own token and its own derived data.
        self.token = next(_STATE_TOKENS)
        self._derived: dict = {}

    def derived(self) -> dict:
        """Data an engine computed from this state (memory K/V, bank keys on the device), keyed by
        the engine. It lives and dies with this object, so it can never serve another state."""
        return self._derived

    def mark_dirty(self, slots: Tensor) -> None:
        """Record that `slots` ([L, K] slot indices per layer) were rewritten since the last save."""
        if self.dirty is None:
            self.dirty = torch.zeros(self.order.shape, dtype=torch.bool, device=slots.device)
        self.dirty.scatter_(1, slots, True)

    @property
    def num_layers(self) -> int:
        return self.slots.shape[0]

    @property
    def num_rows(self) -> int:
        return self.slots.shape[1]

    def memory(self, layer: int | None = None) -> Tensor:
        """STM in logical order: [L, N, d] (or [N, d] for one layer)."""
        if layer is not None:
            return self.slots[layer, self.order[layer]]
        return torch.gather(self.slots, 1, self.order[..., None].expand_as(self.slots))

    def slot_positions(self, layer: int) -> Tensor:
        """Logical index of every slot of one layer (inverse of `order`)."""
        pos = torch.empty_like(self.order[layer])
        pos[self.order[layer]] = torch.arange(self.num_rows, device=pos.device)
        return pos

    def clone(self) -> "MemoryState":
        """An independent copy (a fork in memory): same contents, own generator."""
        gen = torch.Generator(device="cpu")
        gen.set_state(self.generator.get_state())
        copied = {
            f.name: _clone_value(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("generator", "dirty")
        }
        return MemoryState(generator=gen, dirty=None, **copied)


def _clone_value(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, LongTermMemory):
        return LongTermMemory(
            **{
                f.name: _clone_value(getattr(value, f.name))
                for f in dataclasses.fields(value)
            }
        )
    if isinstance(value, list):
        return [_clone_value(v) for v in value]
    return value


def new_generator(seed: int | None = None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
