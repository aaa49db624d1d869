"""Reading a memory state: the logits of a forward over a question with the full memory, and
decoding an answer (reference-semantics §6, §7.4; the official `generate`).

Generation writes the question's and the answer's keys/values straight after the memory prefix
(`prefix.py`) in the same buffer (a static KV cache). Each decode step has fixed shapes (a device
position, a mask over the buffer), picks its token on the device, and the host reads the token
back one step late; `compile_decode` compiles that step (CUDA graphs on CUDA, inductor's C++
kernels elsewhere), falling back to the eager step if compiling fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from memcli.core.buffers import scratch_kv, token_ids
from memcli.core.model import DECODER, KV, Transformer
from memcli.core.prefix import PrefixCaches
from memcli.core.quant import first_line
from memcli.core.retrieval import LtmBank, Retrieval, retrieve
from memcli.core.state import MemoryState
from memcli.core.threads import ensure as _ensure_threads


@dataclass
class Sampling:
    """Greedy when temperature is 0 (the default: the authors' evaluation decodes greedily)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    tokens: list[int]  # new tokens only (a stop token, when hit, is included)
    step_logits: Tensor  # [n, V] the logits each step chose from (fp32), only with keep_logits=True
    retrieval: list[Retrieval] = field(default_factory=list)
    prompt_tokens: int = 0


class MemoryReader:
    """Reads any state compatible with `model` through the memory K/V of `prefixes`.

    `ltm_device_budget_bytes`: M+ long-term rows are gathered from a device copy while the bank
    fits this budget (else from the host bank). `compile_decode`: run the decode step through
    `torch.compile` (`step`; `compiled` says whether it still is, after a fallback).
    """

    def __init__(self, model: Transformer, prefixes: PrefixCaches, ltm_device_budget_bytes: int,
                 compile_decode: bool = False):
        self.model = model
        self.prefixes = prefixes
        self.ltm_device_budget_bytes = ltm_device_budget_bytes
        self.step = self.decode_step
        self.compiled = False
        if compile_decode:
            # CUDA: inductor kernels replayed as CUDA graphs; elsewhere inductor alone (C++ kernels).
            # The first answer pays the compilation; every later one replays the same step.
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self.step = torch.compile(self.decode_step, mode=mode, dynamic=False)
            self.compiled = True

    @torch.inference_mode()
    def logits(self, state: MemoryState, ids: Tensor, ltm_order: list[Tensor] | None = None,
               all_rows: bool = True, record: bool = False) -> tuple[Tensor, list[Retrieval]]:
        """Logits of a plain (non-injection) forward over `ids` with the full memory: [T, V] fp32.
        M+ retrieval records come back only when `record` is set."""
        _ensure_threads()
        ids = token_ids(ids, self.model.device)
        kv, start, retrieval, before_layer = self._read_prefix(state, ltm_order, ids.shape[1], record)
        out = self._forward(ids, kv, start, before_layer)
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
        ids = token_ids(ids, model.device)
        prompt = ids.shape[1]
        kv, start, retrieval, before_layer = self._read_prefix(state, ltm_order, prompt + max_new_tokens, record, zeros=True)
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=model.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        hidden = self._forward(ids, kv, start, before_layer)
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
        pending = choose(logits, sampling, gen)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            following = None
            if step < max_new_tokens - 1:
                logits = self._run_step(pending, position, rows, views)
                following = choose(logits, sampling, gen)
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
        if self.step is not self.decode_step:
            try:
                if token.is_cuda:
                    # a new step of the CUDA graph: the previous step's outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                return self.step(token, position, rows, kv)
            except Exception as err:  # compilation problems must not cost the answer
                logging.getLogger(__name__).warning("compiled decode failed (%s); decoding eagerly", first_line(err))
                self.step, self.compiled = self.decode_step, False
        return self.decode_step(token, position, rows, kv)

    def decode_step(self, token: Tensor, position: Tensor, rows: Tensor, kv: list[KV]) -> Tensor:
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
            return [scratch_kv(model, extra_rows, zeros) for _ in model.layers], 0, [], None
        cache = self.prefixes.current(state)
        cache.ensure_capacity(cache.prefix_rows + extra_rows)
        retrieval: list[Retrieval] = []
        if state.ltm is not None:
            bank = LtmBank(
                keys=cache.ltm_keys(state.ltm),
                rows=cache.ltm_rows_source(state.ltm, self.ltm_device_budget_bytes),
                birth_age=cache.ltm_mirror("birth_age", state.ltm),
                birth_update=cache.ltm_mirror("birth_update", state.ltm),
                ids=cache.ltm_ids(state),
            )
            cos, sin = model.cos_sin(1, cache.ltm_rows)

            # M+: each layer retrieves its LTM block from that layer's input rows, just before it runs.
            def fill_ltm_block(l, layer, layer_kv, x):
                found, rows = retrieve(model, state, l, layer, x, ltm_order[l] if ltm_order else None, bank, record)
                if record:
                    retrieval.append(found)
                k, v = layer.prefix_keys_values(rows[None].to(device=model.device, dtype=model.dtype,
                                                              non_blocking=True), cos, sin, DECODER)
                layer_kv.k[:, :, 1 : cache.stm_start], layer_kv.v[:, :, 1 : cache.stm_start] = k, v

            return cache.kv, cache.prefix_rows, retrieval, fill_ltm_block
        return cache.kv, cache.prefix_rows, retrieval, None


def _static(t: Tensor) -> Tensor:
    """Tell the compiler a buffer keeps its address (CUDA graphs may then write into it)."""
    if t.is_cuda and not getattr(t, "_memcli_static", False):
        try:
            torch._dynamo.mark_static_address(t)
            t._memcli_static = True
        except Exception:
            pass
    return t


def choose(logits: Tensor, sampling: Sampling, gen: torch.Generator | None) -> Tensor:
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
