"""The memory prefix's keys/values: what every read of a state attends over before the question.

The keys/values of the memory prefix (decoder adapter) depend only on the memory, not on the
question, so they are kept in a `PrefixCache` that belongs to the state object itself
(`state.derived()`), never to an id or a version number. An update only records its K new rows;
their keys/values are computed at the next read, and every key is re-rotated then, in place, from
the model's cos/sin tables, because the survivors' logical positions shift (reference-semantics
§10.3.1). A cache survives an inject while it fits the keep budget (`default_kv_keep_budget`: a
quarter of the device's memory), so the ask right after an inject costs what a repeated ask costs;
beyond the budget an inject frees it and the next read rebuilds it.

For M+ the cache also holds device copies of the long-term bank (keys, ids, ages and, within a
budget, rows), so retrieval needs no host round trip per layer.

`PrefixCaches` is one engine's set of caches: which states hold one, how many may (the least
recently read loses its cache first), and the reference mode that recomputes the prefix on every
read, like the original.
"""

from __future__ import annotations

import itertools
import os
import weakref

import torch
from torch import Tensor

from memcli.core.model import DECODER, Transformer
from memcli.core.state import MemoryState, grow

LTM_DEVICE_BUDGET_BYTES = 4 << 30  # M+ bank rows are mirrored on the device while they fit this
MIN_KV_ROWS = 64  # new memory rows' keys/values are computed at least this many rows at a time
_CACHE_OWNERS = itertools.count(1)  # names one engine's entry in a state's derived data


class PrefixCache:
    """Memory keys/values of one state, in a buffer with room for a question after them.

    Layout per layer (rows): [bos | LTM block (M+, filled per question) | STM slots | scratch].
    Keys are kept unrotated per slot (`raw_k`); the rotated copy in `kv` is refreshed from it, lazily,
    the first time the state is read after its rows moved. An update therefore costs O(K): it records
    the K new rows (their keys/values are computed at the next read, or when more than two updates'
    rows wait); one rotation (a gather from the model's cos/sin tables, in place) pays for any
    number of updates in a row, e.g. a 64-chunk inject.

    A cache is owned by exactly one state object (it lives in `state.derived()`), so it can never
    answer for another state whatever ids or version numbers say.
    """

    def __init__(self, model: Transformer, state: MemoryState, scratch_rows: int):
        self.model = model
        self.owner = state.token
        cfg = model.cfg
        self.ltm_rows = cfg.ltm_retrieval_rows
        self.stm_start = 1 + self.ltm_rows
        self.prefix_rows = self.stm_start + state.num_rows
        self.rows, self.scratch_rows = state.num_rows, scratch_rows
        self.pending: list[tuple[Tensor, Tensor]] = []  # (rows [L, m, d], slots [L, m]) not yet in raw_k / v
        self._mirrors: dict[str, tuple[Tensor, int, int]] = {}  # M+: bank keys / rows on the device
        self._ltm_ids: tuple[int, list[Tensor]] = (-1, [])
        self.allocate()

    def allocate(self) -> None:
        """The key/value buffers, with the bos row in place; nothing of the memory yet."""
        model, cfg = self.model, self.model.cfg
        self.version = -1  # state version whose rows raw_k / v hold (with `pending` written)
        self.rotated = -1  # state version whose logical positions kv.k is rotated by
        self.pending.clear()
        model.rope_rows(self.prefix_rows + self.scratch_rows)
        # zeros, not empty: a decode step attends over the whole buffer behind a mask, and masked
        # garbage could be NaN (0 * NaN = NaN in the weighted sum of values)
        self.kv = model.new_kv(self.prefix_rows + self.scratch_rows)
        shape = (cfg.num_layers, cfg.num_kv_heads, self.rows, cfg.head_dim)
        self.raw_k = torch.empty(shape, dtype=model.dtype, device=model.device)
        self._scratch = torch.empty(shape[1:], dtype=model.dtype, device=model.device)
        cos, sin = model.cos_sin(0, 1)
        for l, (layer, kv) in enumerate(zip(model.layers, self.kv)):
            kv.k[:, :, :1], kv.v[:, :, :1] = layer.prefix_keys_values(model.bos_embedding[l][None], cos, sin, DECODER)
            kv.start = self.prefix_rows

    @property
    def released(self) -> bool:
        return self.kv is None

    def nbytes(self) -> int:
        """Bytes of the key/value buffers (what `release` frees)."""
        if self.kv is None:
            return 0
        tensors = [t for kv in self.kv for t in (kv.k, kv.v)] + [self.raw_k, self._scratch]
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        """Free the keys/values (the largest part); the M+ bank's device copies stay, since they
        only grow with the bank. The next read allocates and builds them again."""
        self.kv = self.raw_k = self._scratch = None
        self.version = self.rotated = -1
        self.pending.clear()

    def ltm_keys(self, ltm) -> Tensor:
        """The bank's selector keys where retrieval runs, copied once and extended as the bank grows
        (the official code copies every layer's keys to the GPU for every question)."""
        return self.ltm_mirror("keys", ltm)

    def ltm_rows_source(self, ltm, budget_bytes: int) -> Tensor:
        """Where retrieved rows are gathered from: a device copy of the bank's rows when the bank
        fits `budget_bytes` (kept and extended like the keys), else the bank itself (host)."""
        rows = ltm.rows
        if rows.device == self.model.device:
            return rows
        need = rows.shape[0] * max(ltm.size, 1) * rows.shape[2] * rows.element_size()
        if need > budget_bytes:
            self._mirrors.pop("rows", None)
            return rows
        return self.ltm_mirror("rows", ltm)

    def ltm_mirror(self, name: str, ltm) -> Tensor:
        """A device copy of one of the bank's append-only tensors (rows, keys, birth ages/updates),
        extended as the bank grows and rebuilt when compaction renumbers it."""
        source = getattr(ltm, name)
        device = self.model.device
        if source.device == device and name != "keys":
            return source
        dim = 1 if source.dim() > 1 else 0
        copy, size, epoch = self._mirrors.get(name, (None, 0, -1))
        if copy is None or epoch != ltm.epoch or ltm.size < size:
            copy = source.narrow(dim, 0, ltm.size).to(device, copy=True, non_blocking=True)
        elif ltm.size > size:
            if ltm.size > copy.shape[dim]:
                copy = grow(copy, max(2 * copy.shape[dim], ltm.size))
            copy.narrow(dim, size, ltm.size - size).copy_(source.narrow(dim, size, ltm.size - size), non_blocking=True)
        self._mirrors[name] = (copy, ltm.size, ltm.epoch)
        return copy

    def ltm_ids(self, state: MemoryState) -> list[Tensor]:
        """Every layer's LTM bank ids on the device (they change only inside an update)."""
        key, ids = self._ltm_ids
        if key != state.version:
            ids = [i.to(self.model.device, non_blocking=True) for i in state.ltm.ids]
            self._ltm_ids = (state.version, ids)
        return ids

    def ensure_capacity(self, rows: int) -> None:
        if self.kv[0].k.shape[2] >= rows:
            return
        self.model.rope_rows(rows)
        for kv in self.kv:
            for name in ("k", "v"):
                old = getattr(kv, name)
                new = old.new_zeros(old.shape[:2] + (rows,) + old.shape[3:])
                new[:, :, : self.prefix_rows] = old[:, :, : self.prefix_rows]
                setattr(kv, name, new)

    def build(self, state: MemoryState) -> None:
        """Unrotated K and V of every slot, read layer by layer straight from the state's storage
        (a pinned host pool is copied without a pageable detour)."""
        model = self.model
        self.pending.clear()
        for l, layer in enumerate(model.layers):
            rows = state.slots[l].to(device=model.device, non_blocking=True).to(model.dtype)
            self._write(l, layer, rows, None)
        self.version = state.version

    def add_rows(self, rows: Tensor, slots: Tensor, version: int) -> None:
        """New rows [L, K, d] (model dtype, on the model's device) for `slots` [L, K]: their K and V
        are computed at the next read (or once more than two updates' rows wait), so an update
        itself only records them; slots written twice before a read are computed in order."""
        self.pending.append((rows, slots))
        self.version = version
        if sum(r.shape[1] for r, _ in self.pending) > 2 * self.model.cfg.num_tokens:
            self.flush()

    def flush(self) -> None:
        for rows, slots in self.pending:
            for l, layer in enumerate(self.model.layers):
                self._write(l, layer, rows[l], slots[l])
        self.pending.clear()

    def _write(self, l: int, layer, rows: Tensor, slots: Tensor | None) -> None:
        m = rows.shape[0]
        if slots is not None and m < MIN_KV_ROWS:
            # A CPU BLAS splits a product by its row count: on two threads MKL (AVX2, measured)
            # summed an 8-row LoRA product's rows otherwise than the same rows of the full build's
            # product, so the few new rows of a small model (K = 8) got keys/values 1e-6 off a
            # rebuild's. Padded with zero rows to a build-like height they are bitwise what `build`
            # computes (tests/test_engine.py checks it on the installed BLAS, 1 and 2 threads).
            rows = torch.cat((rows, rows.new_zeros(MIN_KV_ROWS - m, rows.shape[1])))
        k, v = layer.prefix_keys_values(rows[None], None, None, DECODER)
        if slots is None:
            self.raw_k[l].copy_(k[0])
            self.kv[l].v[0, :, self.stm_start : self.prefix_rows].copy_(v[0])
        else:
            self.raw_k[l].index_copy_(1, slots, k[0, :, :m])
            self.kv[l].v[0].index_copy_(1, self.stm_start + slots, v[0, :, :m])

    def rotate(self, state: MemoryState) -> None:
        """Rotate every STM key by its current logical position: cos/sin gathered from the model's
        tables, written in place (bitwise what `apply_rotary` computes)."""
        model = self.model
        n, half = state.num_rows, self.raw_k.shape[-1] // 2
        order = state.order.to(model.device, non_blocking=True)
        positions = torch.empty_like(order)
        positions.scatter_(1, order, torch.arange(self.stm_start, self.stm_start + n, device=order.device).expand_as(order))
        tmp = self._scratch
        for l, kv in enumerate(self.kv):
            cos, sin = model.cos_sin_at(positions[l])
            raw, out = self.raw_k[l], kv.k[0, :, self.stm_start : self.prefix_rows]
            # apply_rotary: x * cos + cat(-x2, x1) * sin
            torch.mul(raw[..., half:], sin[:, :half], out=tmp[..., :half])
            tmp[..., :half].neg_()
            torch.mul(raw[..., :half], sin[:, half:], out=tmp[..., half:])
            torch.mul(raw, cos, out=out)
            out.add_(tmp)
        self.rotated = state.version


def default_kv_keep_budget(device: torch.device) -> int:
    """How large a state's memory K/V may be and still be kept through an inject: a quarter of
    the device's memory (host RAM for the CPU, the GPU's own memory on CUDA).

    The cache was built by a read, so keeping it adds nothing to what the process already held;
    an inject's own forward needs one layer's activations of a chunk beside it (~26 MB on the
    medium model, ~50 MB at 8B in bf16), far less than the cache (174 MB; 2.5 GB). The quarter
    leaves room for the weights and the state, as the server's budget for resident states (half
    the host's memory, K/V included: `resident.state_bytes`) does; a cache beyond it is freed for
    the inject, as before, and rebuilt by the next read."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory // 4
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 2 << 30


class PrefixCaches:
    """One engine's memory K/V caches, each in the state it belongs to.

    `cached_states`: how many states keep their cache at once (the least recently read loses its
    cache first; device memory is the limit). `keep_bytes`: a cache up to this size survives an
    inject and is updated incrementally; a larger one is freed when an inject starts.
    `reference`: build a fresh cache for every read and keep none (the original's cost; the
    cached path is checked against it).
    """

    def __init__(self, model: Transformer, scratch_rows: int, cached_states: int = 1,
                 keep_bytes: int | None = None, reference: bool = False):
        self.model = model
        self.scratch_rows = scratch_rows
        self.cached_states = max(1, cached_states)
        self.keep_bytes = default_kv_keep_budget(model.device) if keep_bytes is None else keep_bytes
        self.reference = reference
        self.token = next(_CACHE_OWNERS)  # the key of our caches in a state's derived data
        self._holders: list[weakref.ref] = []  # states holding one of our caches, least recent first

    def of(self, state: MemoryState) -> PrefixCache | None:
        """The state's cache as it is (possibly stale or released), or None."""
        return state.derived().get(self.token)

    def current(self, state: MemoryState) -> PrefixCache:
        """The state's memory K/V, current for its version and positions."""
        if self.reference:
            cache = PrefixCache(self.model, state, self.scratch_rows)
            cache.build(state)
            cache.rotate(state)
            return cache
        derived = state.derived()
        cache = derived.get(self.token)
        if cache is not None and (cache.owner != state.token or cache.prefix_rows != 1 + cache.ltm_rows + state.num_rows):
            cache = None  # cannot happen through the engine; refuse rather than answer wrongly
        if cache is None:
            cache = PrefixCache(self.model, state, self.scratch_rows)
            self._hold(state)
            derived[self.token] = cache
        if cache.released:
            cache.allocate()
        if cache.version != state.version:
            cache.build(state)
        cache.flush()
        if cache.rotated != state.version:
            cache.rotate(state)
        return cache

    def before_inject(self, state: MemoryState) -> None:
        """Free the state's cache if it is over the keep budget, for the inject's forward's room
        (the next read rebuilds it); the M+ bank's device copies stay (they only grow)."""
        cache = self.of(state)
        if cache is not None and cache.nbytes() > self.keep_bytes:
            cache.release()

    def updated(self, state: MemoryState, rows: Tensor, slots: Tensor) -> None:
        """The state's last update wrote `rows` [L, K, d] (as the injection computed them, on the
        model's device) into `slots` [L, K]: a cache that was current before the update records
        them; one that was not is dropped."""
        cache = self.of(state)
        if cache is None or cache.released:
            return
        if self.reference or cache.version != state.version - 1:
            state.derived().pop(self.token, None)
            return
        model = self.model
        if rows.dtype != state.slots.dtype:  # the cache must see the rows as the state stores them
            rows = rows.to(state.slots.dtype)
        cache.add_rows(rows.to(device=model.device, dtype=model.dtype),
                       slots.to(model.device, non_blocking=True), state.version)

    def _hold(self, state: MemoryState) -> None:
        """Record that `state` now holds one of our caches; evict the least recently cached beyond
        `cached_states` (their caches are freed with them)."""
        alive = [ref for ref in self._holders if ref() is not None and ref() is not state]
        while len(alive) >= self.cached_states:
            old = alive.pop(0)()
            if old is not None:
                old.derived().pop(self.token, None)
        alive.append(weakref.ref(state))
        self._holders = alive

    def forget(self) -> None:
        """Drop every cache we made (frees their device memory)."""
        for ref in self._holders:
            state = ref()
            if state is not None:
                state.derived().pop(self.token, None)
        self._holders = []
