"""Operations on (model, memory state): inject, update, logits, generate.

This is where the official code's semantics live (reference-semantics §4-§7, FORMAT.md §4); the
transformer itself is in `model.py`. Two things make it fast without changing what is computed:

* The keys/values of the memory prefix (decoder adapter) depend only on the memory, not on the
  question, so they are computed once per memory version and kept in a `PrefixCache`. After an update
  only the K new rows' keys/values are computed; every key is re-rotated from its unrotated copy
  because the survivors' logical positions shift (reference-semantics §10.3.1).
* Generation writes the question's and the answer's keys/values straight after the prefix in the
  same buffer (a static KV cache), so nothing is concatenated per step.

`reference=True` on the engine turns the cache off and recomputes the prefix on every call, like
the original; it exists to check the cached path against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .model import DECODER, ENCODER, KV, Transformer, apply_rotary
from .state import MemoryState, grow


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
    step_logits: Tensor  # [n, V] the logits each step chose from (fp32)
    retrieval: list[Retrieval] = field(default_factory=list)
    prompt_tokens: int = 0


@dataclass
class Sampling:
    """Greedy when temperature is 0 (the default: the authors' evaluation decodes greedily)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class PrefixCache:
    """Memory keys/values of one state at one version, in a buffer with room for a question after them.

    Layout per layer (rows): [bos | LTM block (M+, filled per question) | STM slots | scratch].
    """

    def __init__(self, model: Transformer, state: MemoryState, scratch_rows: int):
        self.model = model
        self.state_id = id(state)
        self.version = -1
        cfg = model.cfg
        self.ltm_rows = cfg.ltm_retrieval_rows
        self.stm_start = 1 + self.ltm_rows
        self.prefix_rows = self.stm_start + state.num_rows
        self.kv = model.new_kv(self.prefix_rows + scratch_rows)
        shape = (cfg.num_layers, cfg.num_kv_heads, state.num_rows, cfg.head_dim)
        self.raw_k = torch.empty(shape, dtype=model.dtype, device=model.device)
        self._keys: Tensor | None = None  # M+: bank keys on the model's device
        self._keys_size = self._keys_epoch = 0
        cos, sin = model.cos_sin(0, 1)
        for l, (layer, kv) in enumerate(zip(model.layers, self.kv)):
            kv.k[:, :, :1], kv.v[:, :, :1] = layer.prefix_keys_values(model.bos_embedding[l][None], cos, sin, DECODER)
            kv.start = self.prefix_rows

    def ltm_keys(self, ltm) -> Tensor:
        """The bank's selector keys where retrieval runs, copied once and extended as the bank grows
        (the official code copies every layer's keys to the GPU for every question)."""
        device = self.model.device
        stale = self._keys is None or self._keys_epoch != ltm.epoch or ltm.size < self._keys_size
        if stale:
            self._keys = ltm.keys[:, : ltm.size].to(device, copy=True)
            self._keys_size, self._keys_epoch = ltm.size, ltm.epoch
        elif ltm.size > self._keys_size:
            if ltm.size > self._keys.shape[1]:
                self._keys = grow(self._keys, max(2 * self._keys.shape[1], ltm.size))
            self._keys[:, self._keys_size : ltm.size] = ltm.keys[:, self._keys_size : ltm.size].to(device)
            self._keys_size = ltm.size
        return self._keys

    def ensure_capacity(self, rows: int) -> None:
        if self.kv[0].k.shape[2] >= rows:
            return
        for kv in self.kv:
            for name in ("k", "v"):
                old = getattr(kv, name)
                new = old.new_empty(old.shape[:2] + (rows,) + old.shape[3:])
                new[:, :, : self.prefix_rows] = old[:, :, : self.prefix_rows]
                setattr(kv, name, new)

    def write_rows(self, state: MemoryState, slots: Tensor | None) -> None:
        """(Re)compute unrotated K and V for the given slots per layer ([L, m]; None = all slots)."""
        model = self.model
        zero_cos, zero_sin = model.cos_sin(0, 1)  # position 0: rotation by zero angle = identity
        for l, (layer, kv) in enumerate(zip(model.layers, self.kv)):
            idx = slots[l] if slots is not None else torch.arange(state.num_rows, device=state.slots.device)
            rows = state.slots[l, idx].to(device=model.device, dtype=model.dtype)[None]
            k, v = layer.prefix_keys_values(rows, zero_cos, zero_sin, DECODER)
            self.raw_k[l, :, idx.to(model.device)] = k[0]
            kv.v[0, :, self.stm_start + idx.to(model.device)] = v[0]
        self.rotate(state)

    def rotate(self, state: MemoryState) -> None:
        """Rotate every STM key by its current logical position."""
        model = self.model
        for l, kv in enumerate(self.kv):
            positions = self.stm_start + state.slot_positions(l).to(model.device)
            cos, sin = model.rotary.cos_sin(positions, model.dtype)
            kv.k[0, :, self.stm_start : self.prefix_rows] = apply_rotary(self.raw_k[l], cos, sin)
        self.version = state.version


class Engine:
    """A loaded model plus the operations the official classes offer, on any compatible state."""

    def __init__(self, model: Transformer, reference: bool = False, scratch_rows: int = 1024):
        self.model = model
        self.cfg = model.cfg
        self.reference = reference
        self.scratch_rows = scratch_rows
        self._prefix: PrefixCache | None = None

    # ------------------------------------------------------------------ writing
    @torch.inference_mode()
    def inject(self, state: MemoryState, ids: Tensor) -> Tensor:
        """One injection forward (encoder adapter): the new memory rows [L, K', d]; state unchanged.

        K' = K, except for an uninitialized pool where it is min(K, c) (reference-semantics §4.1).
        """
        model, cfg = self.model, self.cfg
        ids = _as_ids(ids, model.device)
        c, k_rows = ids.shape[1], cfg.num_tokens
        x = model.embed_tokens(ids)
        e = model.new_memory_positional_emb.to(model.dtype)
        deltas = []
        if state.initialized:
            in_prefix = min(k_rows, c)  # newest memory rows that only give keys/values
            prefix = 1 + in_prefix
            total = 1 + k_rows + c
            cos, sin = model.cos_sin(0, total)
            for l, layer in enumerate(model.layers):
                # only the newest K rows are needed: gather them, wherever the state lives
                tail = state.slots[l, state.order[l, -k_rows:]].to(device=model.device, dtype=model.dtype)
                kv = self._scratch_kv(total)
                rows = torch.cat((model.bos_embedding[l], tail[:in_prefix]))[None]
                kv.k[:, :, :prefix], kv.v[:, :, :prefix] = layer.prefix_keys_values(
                    rows, cos[:prefix], sin[:prefix], ENCODER
                )
                kv.start = prefix
                h = torch.cat((tail[in_prefix:][None], x), dim=1)
                h[:, -k_rows:] += e
                out = layer(h, cos[prefix:], sin[prefix:], kv, ENCODER)
                deltas.append(out[0, -k_rows:])
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
            for l, layer in enumerate(model.layers):
                h = x.clone()
                if add_e:
                    h[:, -n:] += e
                out = layer(h, cos, sin, self._scratch_kv(c), ENCODER)
                aliased = add_e and l < len(model.layers) - 1
                deltas.append(out[0, -n:] + e[0] if aliased else out[0, -n:])
                x = out
        return torch.stack(deltas)

    def _scratch_kv(self, rows: int) -> KV:
        shape = (1, self.cfg.num_kv_heads, rows, self.cfg.head_dim)
        return KV(
            torch.empty(shape, dtype=self.model.dtype, device=self.model.device),
            torch.empty(shape, dtype=self.model.dtype, device=self.model.device),
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
    def update(self, state: MemoryState, delta: Tensor, kept: Tensor | None = None, origin: int = 0) -> None:
        """Write new rows into the state: drop K rows (or `kept` explicitly) and append `delta`.

        `origin` tags the new rows for provenance (the injection chunk that produced them).
        """
        cfg = self.cfg
        delta = delta.to(device=state.slots.device, dtype=state.slots.dtype)
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
        state.origin[layer_index, freed] = origin
        if state.stm_ages is not None:
            state.stm_ages[layer_index, freed] = torch.arange(k_rows - 1, -1, -1, dtype=torch.float64)
        state.mark_dirty(freed)
        state.update_count += 1
        state.version += 1
        if state.ltm is not None:
            self._after_ltm_update(state)
        cache = self._prefix
        if cache is not None and not self.reference and cache.state_id == id(state) and cache.version == state.version - 1:
            cache.write_rows(state, freed)

    def _fill_uninitialized(self, state: MemoryState, delta: Tensor, origin: int) -> None:
        """First write into an empty pool: tile the delta to fill it (8b semantics, §5)."""
        n, t = state.num_rows, delta.shape[1]
        if t >= n:
            filled = delta[:, -n:]
        else:
            filled = torch.cat([delta] * (n // t) + [delta[:, t - n % t :]] if n % t else [delta] * (n // t), dim=1)
        state.slots = filled.clone()
        state.order = torch.arange(n, device=state.order.device).repeat(state.num_layers, 1)
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
        keys = torch.stack(
            [
                layer.key_proj(layer.input_layernorm(rows[l].to(device=model.device, dtype=model.dtype)))
                for l, layer in enumerate(model.layers)
            ]
        ).to(ltm.keys.dtype)
        ages = state.stm_ages[layer_index, freed]
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
        cache = self._prefix
        if self.reference or cache is None or cache.state_id != id(state):
            cache = PrefixCache(self.model, state, self.scratch_rows)
            cache.write_rows(state, None)
            self._prefix = cache
        elif cache.version != state.version:
            cache.write_rows(state, None)
        return cache

    def forget_prefix(self) -> None:
        """Drop the memory K/V cache (e.g. before switching to another state)."""
        self._prefix = None

    @torch.inference_mode()
    def logits(self, state: MemoryState, ids: Tensor, ltm_order: list[Tensor] | None = None,
               all_rows: bool = True) -> tuple[Tensor, list[Retrieval]]:
        """Logits of a plain (non-injection) forward over `ids` with the full memory: [T, V] fp32."""
        ids = _as_ids(ids, self.model.device)
        kv, start, retrieval, retrieve = self._read_prefix(state, ltm_order, extra_rows=ids.shape[1])
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
    ) -> Generation:
        """Decode with a KV cache after one prefill over [prefix ; ids]. The prefix (and for M+
        the retrieved LTM rows) is fixed for the whole answer, as in the official `generate`."""
        sampling = sampling or Sampling()
        ids = _as_ids(ids, self.model.device)
        kv, start, retrieval, retrieve = self._read_prefix(state, ltm_order, extra_rows=ids.shape[1] + max_new_tokens)
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        hidden = self._forward(ids, kv, start, retrieve)
        position = start + ids.shape[1]
        tokens, step_logits = [], []
        for step in range(max_new_tokens):
            logits = self.model.logits(hidden[0, -1:]).float()[0]
            step_logits.append(logits)
            token = _choose(logits, sampling, gen)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop_ids or step == max_new_tokens - 1:
                break
            hidden = self._forward(torch.tensor([[token]], device=self.model.device), kv, position)
            position += 1
        return Generation(tokens, torch.stack(step_logits) if step_logits else torch.empty(0),
                          retrieval, ids.shape[1])

    def _forward(self, ids: Tensor, kv: list[KV], start: int, before_layer: Callable | None = None) -> Tensor:
        """Run `ids` at positions start.. over buffers whose rows [0, start) are already filled."""
        model = self.model
        x = model.embed_tokens(ids)
        cos, sin = model.cos_sin(start, ids.shape[1])
        for l, (layer, layer_kv) in enumerate(zip(model.layers, kv)):
            layer_kv.start = start
            if before_layer is not None:
                before_layer(l, layer, layer_kv, x)
            x = layer(x, cos, sin, layer_kv, DECODER)
        return x

    def _read_prefix(self, state: MemoryState, ltm_order, extra_rows: int):
        """KV buffers with the prefix in place: (kv, prefix length, retrieval records, per-layer hook)."""
        model = self.model
        if not state.initialized:
            return [self._scratch_kv(extra_rows) for _ in model.layers], 0, [], None
        cache = self._prefix_cache(state)
        cache.ensure_capacity(cache.prefix_rows + extra_rows)
        retrieval: list[Retrieval] = []
        if state.ltm is not None:
            # M+: each layer retrieves its LTM block from that layer's input rows, just before it runs.
            def retrieve(l, layer, layer_kv, x, _state=state, _cache=cache):
                record, rows = self._retrieve(_state, l, layer, x, ltm_order[l] if ltm_order else None,
                                              _cache.ltm_keys(_state.ltm))
                retrieval.append(record)
                cos, sin = model.cos_sin(1, _cache.ltm_rows)
                k, v = layer.prefix_keys_values(rows[None].to(device=model.device, dtype=model.dtype), cos, sin, DECODER)
                layer_kv.k[:, :, 1 : _cache.stm_start], layer_kv.v[:, :, 1 : _cache.stm_start] = k, v

            return cache.kv, cache.prefix_rows, retrieval, retrieve
        return cache.kv, cache.prefix_rows, retrieval, None

    def _retrieve(self, state: MemoryState, l: int, layer, x: Tensor, forced: Tensor | None, bank_keys: Tensor):
        """M+ `get_ltm` for layer l (reference-semantics §7.4): choose R rows, order them by age."""
        cfg, ltm = self.cfg, state.ltm
        r = cfg.ltm_retrieval_rows
        ltm_ids = ltm.ids[l]
        cache_ids = ltm.cache_ids()
        n = len(ltm_ids)
        if n == 0:
            raise RuntimeError("M+ long-term memory of layer %d is empty; nothing to retrieve" % l)
        scores = None
        if n < r:
            # Too few entries to score: the official code tiles the indices 0..n-1 (no cache rows).
            reps = -(-r // n)
            candidates = torch.arange(n).repeat(reps)[-r:]
            sources = torch.zeros(r, dtype=torch.int64)
            path = "repeat"
        else:
            all_ids = torch.cat((ltm_ids, cache_ids))
            query = layer.query_proj(layer.input_layernorm(x[0]))
            keys = bank_keys[l, all_ids.to(bank_keys.device)].to(dtype=query.dtype)
            scores = torch.sigmoid(query @ keys.T).mean(dim=0)
            chosen = torch.topk(scores, r).indices.sort().values.cpu()
            sources = (chosen >= n).long()
            candidates = torch.where(chosen >= n, chosen - n, chosen)
            path = "topk"
        order_pairs = torch.stack((sources, candidates), dim=1)
        if forced is not None:
            order_pairs = forced.to(torch.int64).cpu()
        bank_ids = _bank_ids(order_pairs, ltm_ids, cache_ids)
        ages = ltm.ages(bank_ids, l, state.update_count, cfg.num_tokens)
        if forced is None:
            # Oldest first. The official code uses numpy's unstable argsort()[::-1]; we take the
            # stable sort reversed, so equal ages keep a deterministic order (later index first).
            order = torch.argsort(ages, stable=True).flip(0)
            order_pairs, bank_ids, ages = order_pairs[order], bank_ids[order], ages[order]
        rows = ltm.rows[l, bank_ids.to(ltm.rows.device)]
        return Retrieval(path, order_pairs, ages, None if scores is None else scores.float().cpu()), rows


def _bank_ids(pairs: Tensor, ltm_ids: Tensor, cache_ids: Tensor) -> Tensor:
    """(source, index) pairs -> bank ids: source 0 indexes the layer's LTM, 1 the cache."""
    out = torch.empty(len(pairs), dtype=torch.int64)
    from_cache = pairs[:, 0] == 1
    out[~from_cache] = ltm_ids.cpu()[pairs[~from_cache, 1]]
    out[from_cache] = cache_ids.cpu()[pairs[from_cache, 1]]
    return out


def _as_ids(ids, device) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ValueError("memcli runs batch size 1 (the official update keeps only batch element 0)")
    if ids.shape[1] == 0:
        raise ValueError("no tokens to run")
    return ids


def _choose(logits: Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        remove = cumulative - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        sorted_probs[remove] = 0
        probs = torch.zeros_like(probs).scatter(0, sorted_idx, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
