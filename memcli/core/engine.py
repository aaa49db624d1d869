"""Operations on (model, memory state): inject, update, logits, generate.

This is where the official code's semantics live (reference-semantics §4-§7, FORMAT.md §4); the
transformer itself is in `model.py`. What makes it fast without changing what is computed:

* The keys/values of the memory prefix (decoder adapter) depend only on the memory, not on the
  question, so they are kept in a `PrefixCache` that belongs to the state object itself
  (`state.derived()`), never to an id or a version number. An update only records its K new rows;
  their keys/values are computed at the next read, and every key is re-rotated then, in place,
  from the model's cos/sin tables, because the survivors' logical positions shift
  (reference-semantics §10.3.1). The cache survives an inject while it fits `kv_keep_budget_bytes`
  (a quarter of the device's memory by default), so the ask right after an inject costs what a
  repeated ask costs; beyond the budget an inject frees it and the next read rebuilds it.
* Generation writes the question's and the answer's keys/values straight after the prefix in the
  same buffer (a static KV cache). Each decode step has fixed shapes (a device position, a mask
  over the buffer), picks its token on the device, and the host reads the token back one step
  late; `compile_decode` compiles that step.
* On CUDA with pools in pinned host memory, rows travel through pinned staging buffers without
  blocking; the M+ bank's keys, ids, ages and (within a budget) rows are mirrored on the device,
  so retrieval needs no host round trip per layer.

`reference=True` on the engine turns the cache off and recomputes the prefix on every call, like
the original; it exists to check the cached path against.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from memcli.core.model import DECODER, ENCODER, KV, Transformer
from memcli.core.quant import first_line
from memcli.core.state import MemoryState, grow
from memcli.core.threads import ensure as _ensure_threads


@dataclass
class Retrieval:
    """What M+ placed in one layer's LTM block for one question (FORMAT.md §2.2)."""

    path: str  # "topk" | "repeat"
    order: Tensor  # [R, 2] int64: (0, j) = LTM entry j, (1, j) = cache row j, in prefix order
    ages: Tensor  # [R] float64
    scores: Tensor | None  # [n + c] retriever scores (topk path only)


@dataclass
class Generation:
    tokens: list[int]  # new tokens only (a stop token, when hit, is included)
    step_logits: Tensor  # [n, V] the logits each step chose from (fp32), only with keep_logits=True
    retrieval: list[Retrieval] = field(default_factory=list)
    prompt_tokens: int = 0


@dataclass
class Sampling:
    """Greedy when temperature is 0 (the default: the authors' evaluation decodes greedily)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


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
        return self._mirror("keys", ltm)

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
        return self._mirror("rows", ltm)

    def _mirror(self, name: str, ltm) -> Tensor:
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
        if slots is not None and m < _MIN_KV_ROWS:
            # A CPU BLAS splits a product by its row count: on two threads MKL (AVX2, measured)
            # summed an 8-row LoRA product's rows otherwise than the same rows of the full build's
            # product, so the few new rows of a small model (K = 8) got keys/values 1e-6 off a
            # rebuild's. Padded with zero rows to a build-like height they are bitwise what `build`
            # computes (tests/test_engine.py checks it on the installed BLAS, 1 and 2 threads).
            rows = torch.cat((rows, rows.new_zeros(_MIN_KV_ROWS - m, rows.shape[1])))
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


class _HostStaging:
    """One pinned host buffer per shape for device<->host copies on hot paths (CUDA only), reused
    once the copy that last used it has finished."""

    def __init__(self):
        self._buffers: dict[tuple, tuple[Tensor, object]] = {}

    def get(self, shape, dtype) -> Tensor:
        key = (tuple(shape), dtype)
        found = self._buffers.get(key)
        if found is not None:
            found[1].synchronize()  # the last copy through this buffer is done
            return found[0]
        buf = torch.empty(shape, dtype=dtype, pin_memory=True)
        self._buffers[key] = (buf, torch.cuda.Event())
        return buf

    def used(self, buf: Tensor) -> None:
        self._buffers[(tuple(buf.shape), buf.dtype)][1].record()


_ENGINE_TOKENS = itertools.count(1)
LTM_DEVICE_BUDGET_BYTES = 4 << 30
_MIN_KV_ROWS = 64  # new memory rows' keys/values are computed at least this many rows at a time


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
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 2 << 30


class Engine:
    """A loaded model plus the operations the official classes offer, on any compatible state.

    `cached_states`: how many states keep their memory K/V at once (the least recently read loses
    its cache first; device memory is the limit). `ltm_device_budget_bytes`: M+ long-term rows are
    mirrored on the model's device while the bank fits this budget (default 4 GiB: 32 layers x
    16k rows x 4096 x bf16), so a question gathers its retrieved rows there instead of copying
    ~0.7 GB from the host. `compile_decode`: on CUDA, run the decode step
    through `torch.compile(mode="reduce-overhead")` (CUDA graphs), falling back to eager if that
    fails. `reference=True` recomputes the prefix on every call, like the official code.
    `kv_keep_budget_bytes`: a state's memory K/V up to this size survives an inject and is updated
    incrementally (default: `default_kv_keep_budget`, a quarter of the device's memory); a larger
    one is freed when an inject starts.
    """

    def __init__(self, model: Transformer, reference: bool = False, scratch_rows: int | None = None,
                 cached_states: int = 1, compile_decode: bool = False,
                 ltm_device_budget_bytes: int = LTM_DEVICE_BUDGET_BYTES,
                 kv_keep_budget_bytes: int | None = None):
        self.model = model
        self.cfg = model.cfg
        self.reference = reference
        # rows after the prefix: sized once for the model's window, so no question + answer
        # within it ever regrows (and copies) the memory K/V buffer
        self.scratch_rows = scratch_rows or self.cfg.window
        self.cached_states = max(1, cached_states)
        self.ltm_device_budget_bytes = ltm_device_budget_bytes
        self.kv_keep_budget_bytes = (default_kv_keep_budget(model.device) if kv_keep_budget_bytes is None
                                     else kv_keep_budget_bytes)
        self._token = next(_ENGINE_TOKENS)  # names this engine's entry in a state's derived data
        self._holders: list[weakref.ref] = []  # states holding one of our caches, least recent first
        self._staging = _HostStaging() if model.device.type == "cuda" else None
        self._step = self._decode_step
        self.compiled = False
        if compile_decode:
            # CUDA: inductor kernels replayed as CUDA graphs; elsewhere inductor alone (C++ kernels).
            # The first answer pays the compilation; every later one replays the same step.
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self._step = torch.compile(self._decode_step, mode=mode, dynamic=False)
            self.compiled = True

    # ------------------------------------------------------------------ moving rows
    def _rows_to_model(self, state: MemoryState, slots: Tensor) -> Tensor:
        """state.slots[l, slots[l]] for every layer, as [L, m, d] in the model's dtype on its device.
        From a host pool on CUDA the rows are gathered straight into a pinned buffer and copied
        without blocking."""
        model = self.model
        src = state.slots
        if src.device == model.device or self._staging is None:
            layer_index = torch.arange(state.num_layers, device=src.device)[:, None]
            return src[layer_index, slots.to(src.device)].to(device=model.device, dtype=model.dtype)
        staging = self._staging.get((state.num_layers, slots.shape[1], src.shape[2]), src.dtype)
        slots = slots.cpu()
        for l in range(state.num_layers):
            torch.index_select(src[l], 0, slots[l], out=staging[l])
        out = staging.to(model.device, non_blocking=True)
        self._staging.used(staging)
        return out.to(model.dtype)

    def _to_state(self, t: Tensor, like: Tensor) -> Tensor:
        """A device tensor in the state's storage (dtype, device); through pinned staging on CUDA."""
        if t.device == like.device or self._staging is None or like.device.type != "cpu":
            return t.to(device=like.device, dtype=like.dtype)
        staging = self._staging.get(t.shape, like.dtype)
        staging.copy_(t, non_blocking=True)
        self._staging.used(staging)
        torch.cuda.current_stream().synchronize()  # the host reads it next
        return staging  # valid until the next copy through this buffer: update() copies it into the state

    # ------------------------------------------------------------------ writing
    @torch.inference_mode()
    def inject(self, state: MemoryState, ids: Tensor) -> Tensor:
        """One injection forward (encoder adapter): the new memory rows [L, K', d]; state unchanged.

        K' = K, except for an uninitialized pool where it is min(K, c) (reference-semantics §4.1).
        """
        _ensure_threads()  # the thread count chosen at load, in this thread too (a server's request thread)
        model, cfg = self.model, self.cfg
        ids = _as_ids(ids, model.device)
        # The state's memory K/V stays while it fits the budget: the update that follows records its
        # K new rows in it (their keys/values computed at the next read, every key re-rotated once
        # then), so the ask after a 64-chunk inject reads a current cache instead of rebuilding N rows
        # per layer. Beyond the budget it is freed here, for the forward's room (the next read
        # rebuilds it); the M+ bank's device copies are kept either way (they only grow).
        cache = state.derived().get(self._token)
        if cache is not None and cache.nbytes() > self.kv_keep_budget_bytes:
            cache.release()
        c, k_rows = ids.shape[1], cfg.num_tokens
        x = model.embed_tokens(ids)
        e = model.new_memory_positional_emb.to(model.dtype)
        # the new rows of every layer, copied out as each layer finishes (its [1, c + K, d] output
        # is then freed, not kept alive by a view until the end)
        deltas = torch.empty((len(model.layers), min(k_rows, c) if not state.initialized else k_rows,
                              model.cfg.hidden_size), dtype=model.dtype, device=model.device)
        if state.initialized:
            in_prefix = min(k_rows, c)  # newest memory rows that only give keys/values
            prefix = 1 + in_prefix
            total = 1 + k_rows + c
            cos, sin = model.cos_sin(0, total)
            # only the newest K rows of every layer are needed: gathered layer by layer where the
            # state lives with the model (one layer's rows alive, not L), else all at once through
            # one pinned staging copy
            newest = state.order[:, -k_rows:]
            if state.slots.device == model.device:
                def tail_of(l):
                    return state.slots[l].index_select(0, newest[l]).to(model.dtype)
            else:
                tail_of = self._rows_to_model(state, newest).__getitem__
            kv = self._scratch_kv(total)  # every layer overwrites all of it
            for l, layer in enumerate(model.layers):
                tail = tail_of(l)
                rows = torch.cat((model.bos_embedding[l], tail[:in_prefix]))[None]
                kv.k[:, :, :prefix], kv.v[:, :, :prefix] = layer.prefix_keys_values(
                    rows, cos[:prefix], sin[:prefix], ENCODER
                )
                kv.start = prefix
                # the layer's input rows: [older memory rows not in the prefix ; x], the newest K
                # with the positional embedding. With no older rows that is x itself, changed in
                # place (it is the previous layer's output, or the embeddings: nothing reads it again)
                h = x if in_prefix == k_rows else torch.cat((tail[in_prefix:][None], x), dim=1)
                del x
                h[:, -k_rows:] += e
                out = layer(h, cos[prefix:], sin[prefix:], kv, ENCODER)
                del h
                deltas[l].copy_(out[0, -k_rows:])
                x = out[:, -c:]
        else:
            # No memory yet: a plain causal forward. The 8b code still adds the positional
            # embedding to the last rows; the 7b code does not.
            # Without a prefix the official code adds the embedding in place to the previous layer's
            # output, which its stored delta still aliases: every layer's delta but the last carries
            # the embedding too. The golden fixtures record exactly that, so we reproduce it.
            n = min(k_rows, c)
            add_e = cfg.family != "7b"
            cos, sin = model.cos_sin(0, c)
            kv = self._scratch_kv(c)
            for l, layer in enumerate(model.layers):
                h = x.clone()
                if add_e:
                    h[:, -n:] += e
                out = layer(h, cos, sin, kv, ENCODER)
                aliased = add_e and l < len(model.layers) - 1
                deltas[l].copy_(out[0, -n:] + e[0] if aliased else out[0, -n:])
                x = out
        return deltas

    def _scratch_kv(self, rows: int, zeros: bool = False) -> KV:
        shape = (1, self.cfg.num_kv_heads, rows, self.cfg.head_dim)
        make = torch.zeros if zeros else torch.empty
        return KV(
            make(shape, dtype=self.model.dtype, device=self.model.device),
            make(shape, dtype=self.model.dtype, device=self.model.device),
            0,
        )

    def choose_kept(self, state: MemoryState) -> Tensor:
        """Random drop from the state's own generator: [L, N-K] ascending logical rows to keep.

        Mirrors the official order of draws: one randperm(N) per layer, layers in order (7b: one
        draw shared by every layer), keep the first N-K sorted (reference-semantics §5).
        """
        n, k = state.num_rows, self.cfg.num_tokens
        draws = state.num_layers if self.cfg.drop_per_layer else 1
        kept = [torch.randperm(n, generator=state.generator)[: n - k].sort().values for _ in range(draws)]
        kept = torch.stack(kept)
        return kept if draws == state.num_layers else kept.expand(state.num_layers, -1)

    @torch.inference_mode()
    def update(self, state: MemoryState, delta: Tensor, kept: Tensor | None = None, origin: int | Tensor = 0) -> None:
        """Write new rows into the state: drop K rows (or `kept` explicitly) and append `delta`.

        `origin` tags the new rows for provenance (the injection chunk that produced them): one
        serial, or one per new row (a chunk packed from several texts: [K'] int64). Costs
        O(K) rows per layer, also with a warm memory K/V cache: the new rows' keys/values are
        computed from `delta` where it already is (the model's device).
        """
        _ensure_threads()
        cfg = self.cfg
        new_rows = delta
        delta = self._to_state(delta, state.slots)
        if not state.initialized:
            self._fill_uninitialized(state, delta, origin)
            return
        k_rows, n = cfg.num_tokens, state.num_rows
        if delta.shape[1] != k_rows:
            raise ValueError(f"an update needs exactly {k_rows} new rows per layer, got {delta.shape[1]}")
        if kept is None:
            kept = self.choose_kept(state)
        kept = torch.as_tensor(kept, device=state.order.device).expand(state.num_layers, n - k_rows)
        dropped_mask = torch.ones(state.num_layers, n, dtype=torch.bool, device=kept.device)
        dropped_mask.scatter_(1, kept, False)
        dropped = torch.nonzero(dropped_mask)[:, 1].view(state.num_layers, k_rows)  # ascending per layer
        freed = torch.gather(state.order, 1, dropped)
        if state.ltm is not None:
            self._move_to_ltm(state, freed)
        state.order = torch.cat((torch.gather(state.order, 1, kept), freed), dim=1)
        layer_index = torch.arange(state.num_layers, device=freed.device)[:, None]
        state.slots[layer_index, freed] = delta
        state.origin[layer_index, freed] = origin.to(freed.device) if isinstance(origin, Tensor) else origin
        if state.stm_ages is not None:
            ages = torch.arange(k_rows - 1, -1, -1, dtype=torch.float64, device=state.stm_ages.device)
            state.stm_ages[layer_index.to(ages.device), freed.to(ages.device)] = ages
        state.mark_dirty(freed)
        state.update_count += 1
        state.version += 1
        if state.ltm is not None:
            self._after_ltm_update(state)
        cache = state.derived().get(self._token)
        if cache is None or cache.released:
            return
        if self.reference or cache.version != state.version - 1:
            state.derived().pop(self._token, None)
            return
        model = self.model
        if new_rows.dtype != state.slots.dtype:  # the cache must see the rows as the state stores them
            new_rows = new_rows.to(state.slots.dtype)
        cache.add_rows(new_rows.to(device=model.device, dtype=model.dtype),
                       freed.to(model.device, non_blocking=True), state.version)

    def _fill_uninitialized(self, state: MemoryState, delta: Tensor, origin: int) -> None:
        """First write into an empty pool: tile the delta to fill it (8b semantics, §5)."""
        n, t = state.num_rows, delta.shape[1]
        if t >= n:
            filled = delta[:, -n:]
        else:
            filled = torch.cat([delta] * (n // t) + [delta[:, t - n % t :]] if n % t else [delta] * (n // t), dim=1)
        state.slots = filled.clone()
        state.order = torch.arange(n, device=state.order.device).repeat(state.num_layers, 1)
        if isinstance(origin, Tensor):  # one serial per new row: tiled as the rows are
            rows = torch.arange(t)
            index = rows[-n:] if t >= n else torch.cat([rows] * (n // t) + [rows[t - n % t:]])
            state.origin.copy_(origin.cpu()[index].to(state.origin.device).expand_as(state.origin))
        else:
            state.origin.fill_(origin)
        state.initialized = True
        state.full_rewrite = True
        state.dirty = None  # full_rewrite saves every slot
        state.version += 1

    def _move_to_ltm(self, state: MemoryState, freed: Tensor) -> None:
        """M+: the dropped STM rows (ascending logical order) enter the cache with their keys."""
        model, ltm = self.model, state.ltm
        layer_index = torch.arange(state.num_layers, device=freed.device)[:, None]
        rows = state.slots[layer_index, freed]
        on_model = rows.to(device=model.device, dtype=model.dtype, non_blocking=True)
        keys = torch.stack(
            [layer.key_proj(layer.input_layernorm(on_model[l])) for l, layer in enumerate(model.layers)]
        ).to(ltm.keys.dtype)
        ages_device = state.stm_ages.device
        ages = state.stm_ages[layer_index.to(ages_device), freed.to(ages_device)]
        origin = state.origin[layer_index, freed]
        ltm.append(rows.to(ltm.rows.dtype), keys.to(ltm.keys.device), ages.to(ltm.birth_age.device),
                   origin.to(ltm.origin.device), state.update_count + 1)

    def _after_ltm_update(self, state: MemoryState) -> None:
        cfg, ltm = self.cfg, state.ltm
        ltm.update_step += cfg.num_tokens
        if ltm.update_step < cfg.update_ltm_frequency * cfg.num_tokens:
            return
        cache = ltm.cache_ids()
        for l in range(state.num_layers):
            ids = torch.cat((ltm.ids[l], cache))
            recall = torch.cat(
                (ltm.recall[l], torch.full((len(cache),), float(cfg.initial_rf_when_moving_stm_to_ltm), dtype=torch.float64))
            )
            recall = recall - cfg.decay_frequency
            alive = recall > 0.01
            # Garbage collection only when enough rows survive to fill a retrieval block.
            if int(alive.sum()) > cfg.ltm_retrieval_rows:
                ids, recall = ids[alive], recall[alive]
            else:
                recall = recall + cfg.decay_frequency
            ltm.ids[l], ltm.recall[l] = ids, recall
        ltm.cache_start = ltm.size
        ltm.update_step = 0
        if ltm.dead_rows() * 2 > ltm.size:
            ltm.compact()

    # ------------------------------------------------------------------ reading
    def _prefix_cache(self, state: MemoryState) -> PrefixCache:
        """The state's own memory K/V for this engine, current for its version and positions."""
        if self.reference:
            cache = PrefixCache(self.model, state, self.scratch_rows)
            cache.build(state)
            cache.rotate(state)
            return cache
        derived = state.derived()
        cache = derived.get(self._token)
        if cache is not None and (cache.owner != state.token or cache.prefix_rows != 1 + cache.ltm_rows + state.num_rows):
            cache = None  # cannot happen through the engine; refuse rather than answer wrongly
        if cache is None:
            cache = PrefixCache(self.model, state, self.scratch_rows)
            self._hold(state)
            derived[self._token] = cache
        if cache.released:
            cache.allocate()
        if cache.version != state.version:
            cache.build(state)
        cache.flush()
        if cache.rotated != state.version:
            cache.rotate(state)
        return cache

    def _hold(self, state: MemoryState) -> None:
        """Record that `state` now holds one of our caches; evict the least recently cached beyond
        `cached_states` (their caches are freed with them)."""
        alive = [ref for ref in self._holders if ref() is not None and ref() is not state]
        while len(alive) >= self.cached_states:
            old = alive.pop(0)()
            if old is not None:
                old.derived().pop(self._token, None)
        alive.append(weakref.ref(state))
        self._holders = alive

    def forget_prefix(self) -> None:
        """Drop every memory K/V cache this engine made (frees their device memory)."""
        for ref in self._holders:
            state = ref()
            if state is not None:
                state.derived().pop(self._token, None)
        self._holders = []

    @torch.inference_mode()
    def logits(self, state: MemoryState, ids: Tensor, ltm_order: list[Tensor] | None = None,
               all_rows: bool = True, record: bool = False) -> tuple[Tensor, list[Retrieval]]:
        """Logits of a plain (non-injection) forward over `ids` with the full memory: [T, V] fp32.
        M+ retrieval records come back only when `record` is set."""
        _ensure_threads()
        ids = _as_ids(ids, self.model.device)
        kv, start, retrieval, retrieve = self._read_prefix(state, ltm_order, ids.shape[1], record)
        out = self._forward(ids, kv, start, retrieve)
        rows = out[0] if all_rows else out[0, -1:]
        return self.model.logits(rows).float(), retrieval

    @torch.inference_mode()
    def generate(
        self,
        state: MemoryState,
        ids: Tensor,
        max_new_tokens: int = 64,
        stop_ids: tuple[int, ...] = (),
        sampling: Sampling | None = None,
        on_token: Callable[[int], None] | None = None,
        ltm_order: list[Tensor] | None = None,
        keep_logits: bool = False,
        record: bool = False,
    ) -> Generation:
        """Decode with a KV cache after one prefill over [prefix ; ids]. The prefix (and for M+
        the retrieved LTM rows) is fixed for the whole answer, as in the official `generate`.

        Each decode step has the same shapes (one token, a device position, a mask over a fixed
        buffer); the token is chosen on the device and read back one step late, after the next
        step is queued, so the host never waits for the device except to stream a token.
        `keep_logits`: also return every step's fp32 logits (tests); `record`: M+ retrieval records.
        """
        _ensure_threads()
        model = self.model
        sampling = sampling or Sampling()
        ids = _as_ids(ids, model.device)
        prompt = ids.shape[1]
        kv, start, retrieval, retrieve = self._read_prefix(state, ltm_order, prompt + max_new_tokens, record, zeros=True)
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=model.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        hidden = self._forward(ids, kv, start, retrieve)
        logits = model.logits(hidden[0, -1:]).float()
        # the buffer a step attends over: fixed for the answer (the whole buffer when compiled,
        # so that every answer replays the same graph)
        if self.compiled:
            end = kv[0].k.shape[2]
            views = [KV(_static(layer_kv.k), _static(layer_kv.v), 0) for layer_kv in kv]
        else:
            end = start + prompt + max_new_tokens
            views = [KV(layer_kv.k[:, :, :end], layer_kv.v[:, :, :end], 0) for layer_kv in kv]
        model.rope_rows(end)
        rows = torch.arange(end, device=model.device)
        position = torch.full((1,), start + prompt, dtype=torch.long, device=model.device)
        kept_logits = [logits] if keep_logits else None
        pending = _choose(logits, sampling, gen)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            following = None
            if step < max_new_tokens - 1:
                logits = self._run_step(pending, position, rows, views)
                following = _choose(logits, sampling, gen)
            token = int(pending)  # the only read-back: the streamed token (the next step is queued)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop_ids or following is None:
                break
            if kept_logits is not None:
                kept_logits.append(logits.clone() if self.compiled else logits)  # graph outputs are reused
            position.add_(1)
            pending = following
        step_logits = torch.cat(kept_logits) if kept_logits else torch.empty(0)
        return Generation(tokens, step_logits, retrieval, prompt)

    def _run_step(self, token: Tensor, position: Tensor, rows: Tensor, kv: list[KV]) -> Tensor:
        if self._step is not self._decode_step:
            try:
                if token.is_cuda:
                    # a new step of the CUDA graph: the previous step's outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                return self._step(token, position, rows, kv)
            except Exception as err:  # compilation problems must not cost the answer
                import logging

                logging.getLogger(__name__).warning("compiled decode failed (%s); decoding eagerly", first_line(err))
                self._step, self.compiled = self._decode_step, False
        return self._decode_step(token, position, rows, kv)

    def _decode_step(self, token: Tensor, position: Tensor, rows: Tensor, kv: list[KV]) -> Tensor:
        """One token at buffer row `position` (a device tensor) -> fp32 logits [1, V]."""
        model = self.model
        x = model.embed_tokens(token)  # [1, d]: a step runs on 2-D rows, no batch dimension to view
        step = model.decode_step(position, rows)  # position, cos/sin, one mask for every layer
        for layer, layer_kv in zip(model.layers, kv):
            layer_kv.step = step
            x = layer(x, step.cos, step.sin, layer_kv, DECODER)
        logits = model.logits(x)
        return logits if logits.dtype == torch.float32 else logits.float()

    def _forward(self, ids: Tensor, kv: list[KV], start: int, before_layer: Callable | None = None) -> Tensor:
        """Run `ids` at positions start.. over buffers whose rows [0, start) are already filled."""
        model = self.model
        x = model.embed_tokens(ids)
        cos, sin = model.cos_sin(start, ids.shape[1])
        for l, (layer, layer_kv) in enumerate(zip(model.layers, kv)):
            layer_kv.start = start
            layer_kv.step = None
            if before_layer is not None:
                before_layer(l, layer, layer_kv, x)
            x = layer(x, cos, sin, layer_kv, DECODER)
        return x

    def _read_prefix(self, state: MemoryState, ltm_order, extra_rows: int, record: bool, zeros: bool = False):
        """KV buffers with the prefix in place: (kv, prefix length, retrieval records, per-layer hook)."""
        model = self.model
        if not state.initialized:
            return [self._scratch_kv(extra_rows, zeros) for _ in model.layers], 0, [], None
        cache = self._prefix_cache(state)
        cache.ensure_capacity(cache.prefix_rows + extra_rows)
        retrieval: list[Retrieval] = []
        if state.ltm is not None:
            bank = _Bank(
                keys=cache.ltm_keys(state.ltm),
                rows=cache.ltm_rows_source(state.ltm, self.ltm_device_budget_bytes),
                birth_age=cache._mirror("birth_age", state.ltm),
                birth_update=cache._mirror("birth_update", state.ltm),
                ids=cache.ltm_ids(state),
            )
            cos, sin = model.cos_sin(1, cache.ltm_rows)

            # M+: each layer retrieves its LTM block from that layer's input rows, just before it runs.
            def retrieve(l, layer, layer_kv, x):
                found, rows = self._retrieve(state, l, layer, x, ltm_order[l] if ltm_order else None, bank, record)
                if record:
                    retrieval.append(found)
                k, v = layer.prefix_keys_values(rows[None].to(device=model.device, dtype=model.dtype,
                                                              non_blocking=True), cos, sin, DECODER)
                layer_kv.k[:, :, 1 : cache.stm_start], layer_kv.v[:, :, 1 : cache.stm_start] = k, v

            return cache.kv, cache.prefix_rows, retrieval, retrieve
        return cache.kv, cache.prefix_rows, retrieval, None

    def _retrieve(self, state: MemoryState, l: int, layer, x: Tensor, forced: Tensor | None,
                  bank: "_Bank", record: bool):
        """M+ `get_ltm` for layer l (reference-semantics §7.4): choose R rows, order them by age.

        Everything runs where the model runs (no host sync per layer when the bank is mirrored
        there). Scores are computed in fp32: in bf16, ties would decide the top-k."""
        cfg, ltm, device = self.cfg, state.ltm, self.model.device
        r = cfg.ltm_retrieval_rows
        ltm_ids = bank.ids[l]
        n = len(state.ltm.ids[l])
        if n == 0:
            raise RuntimeError("M+ long-term memory of layer %d is empty; nothing to retrieve" % l)
        all_ids = torch.cat((ltm_ids, torch.arange(ltm.cache_start, ltm.size, device=device)))
        scores = None
        if n < r:
            # Too few entries to score: the official code tiles the indices 0..n-1 (no cache rows).
            reps = -(-r // n)
            candidates = torch.arange(n, device=device).repeat(reps)[-r:]
            sources = torch.zeros(r, dtype=torch.int64, device=device)
            path = "repeat"
        else:
            query = layer.query_proj(layer.input_layernorm(x[0])).float()
            keys = bank.keys[l, all_ids.to(bank.keys.device)].float()
            scores = torch.sigmoid(query @ keys.T).mean(dim=0)
            chosen = torch.topk(scores, r).indices.sort().values
            sources = (chosen >= n).long()
            candidates = torch.where(chosen >= n, chosen - n, chosen)
            path = "topk"
        order_pairs = torch.stack((sources, candidates), dim=1)
        if forced is not None:
            order_pairs = forced.to(device=device, dtype=torch.int64)
        # (source, index): source 0 indexes the layer's LTM, 1 the cache (bank ids after it)
        bank_ids = all_ids[order_pairs[:, 1] + order_pairs[:, 0] * n]
        ages = bank.birth_age[l, bank_ids] + cfg.num_tokens * (state.update_count - bank.birth_update[bank_ids]).double()
        if forced is None:
            # Oldest first. The official code uses numpy's unstable argsort()[::-1]; we take the
            # stable sort reversed, so equal ages keep a deterministic order (later index first).
            order = torch.argsort(ages, stable=True).flip(0)
            order_pairs, bank_ids, ages = order_pairs[order], bank_ids[order], ages[order]
        rows = bank.rows[l, bank_ids.to(bank.rows.device)]
        found = None
        if record:
            found = Retrieval(path, order_pairs.cpu(), ages.cpu(), None if scores is None else scores.cpu())
        return found, rows


@dataclass
class _Bank:
    """One question's view of the M+ bank, on the model's device where it fits."""

    keys: Tensor
    rows: Tensor
    birth_age: Tensor
    birth_update: Tensor
    ids: list[Tensor]


def _as_ids(ids, device) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ValueError("memcli runs batch size 1 (the official update keeps only batch element 0)")
    if ids.shape[1] == 0:
        raise ValueError("no tokens to run")
    return ids


def _static(t: Tensor) -> Tensor:
    """Tell the compiler a buffer keeps its address (CUDA graphs may then write into it)."""
    if t.is_cuda and not getattr(t, "_memcli_static", False):
        try:
            torch._dynamo.mark_static_address(t)
            t._memcli_static = True
        except Exception:
            pass
    return t


def _choose(logits: Tensor, sampling: Sampling, gen: torch.Generator | None) -> Tensor:
    """The next token from fp32 logits [1, V], on the logits' device: a [1] int64 tensor."""
    logits = logits[0]
    if sampling.temperature <= 0:
        return torch.argmax(logits).view(1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        remove = cumulative - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        sorted_probs[remove] = 0
        probs = torch.zeros_like(probs).scatter(0, sorted_idx, sorted_probs)
    return torch.multinomial(probs / probs.sum(), 1, generator=gen)
