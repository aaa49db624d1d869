"""Writing a memory state: the injection forward, the update that drops K rows and writes the new
ones, and for M+ the move of dropped rows into the long-term bank and its periodic merge.

These are the official code's write semantics (reference-semantics §4, §5, §7.1-§7.3, FORMAT.md
§4), with the rows moved O(K) per layer: the state is a slot table (`state.py`), so an update
frees the dropped rows' slots and writes there. The new rows' memory keys/values are left to the
prefix cache (`prefix.py`), which records them and computes them at the next read.

On CUDA with pools in pinned host memory, rows travel through pinned staging buffers
(`HostStaging`) without blocking.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memcli.core.buffers import scratch_kv, token_ids
from memcli.core.model import ENCODER, Transformer
from memcli.core.prefix import PrefixCaches
from memcli.core.state import MemoryState
from memcli.core.threads import ensure as _ensure_threads


class HostStaging:
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


class MemoryWriter:
    """Writes new rows into any state compatible with `model`; keeps `prefixes` (the engine's
    memory K/V caches) told of what it wrote."""

    def __init__(self, model: Transformer, prefixes: PrefixCaches):
        self.model = model
        self.cfg = model.cfg
        self.prefixes = prefixes
        self._staging = HostStaging() if model.device.type == "cuda" else None

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

    @torch.inference_mode()
    def inject(self, state: MemoryState, ids: Tensor) -> Tensor:
        """One injection forward (encoder adapter): the new memory rows [L, K', d]; state unchanged.

        K' = K, except for an uninitialized pool where it is min(K, c) (reference-semantics §4.1).
        """
        _ensure_threads()  # the thread count chosen at load, in this thread too (a server's request thread)
        model, cfg = self.model, self.cfg
        ids = token_ids(ids, model.device)
        # The state's memory K/V stays while it fits the budget: the update that follows records its
        # K new rows in it (their keys/values computed at the next read, every key re-rotated once
        # then), so the ask after a 64-chunk inject reads a current cache instead of rebuilding N rows
        # per layer. Beyond the budget it is freed here, for the forward's room (the next read
        # rebuilds it); the M+ bank's device copies are kept either way (they only grow).
        self.prefixes.before_inject(state)
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
            kv = scratch_kv(model, total)  # every layer overwrites all of it
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
            kv = scratch_kv(model, c)
            for l, layer in enumerate(model.layers):
                h = x.clone()
                if add_e:
                    h[:, -n:] += e
                out = layer(h, cos, sin, kv, ENCODER)
                aliased = add_e and l < len(model.layers) - 1
                deltas[l].copy_(out[0, -n:] + e[0] if aliased else out[0, -n:])
                x = out
        return deltas

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
        self.prefixes.updated(state, new_rows, freed)

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
