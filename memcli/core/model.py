"""The MemoryLLM / M+ transformer: a Llama decoder whose every layer reads a prefix of stored rows.

Every forward in memcli is the same shape: at layer l a *prefix* of rows contributes keys and values
only, the real rows (`x`) get queries, and query i sees the whole prefix plus real rows 0..i
(a bottom-right-aligned causal mask). The prefix is
  - reading (a question, generation):  [bos_l ; (M+: retrieved LTM rows) ; memory_l]
  - writing (injection):                [bos_l ; the first min(c, K) of the newest K memory rows]
Keys and values live in a per-layer buffer `KV`: the prefix occupies [0, start), a forward writes its
own rows at [start, start + T) and attends over [0, start + T). Prefix rows are never carried from
layer to layer: each layer supplies its own (reference-semantics §3).

LoRA (8b, M+): q/k/v/gate/up/down carry two adapters, "encoder" (injection) and "decoder" (everything
else), applied unmerged on top of the base projection: y = W x + scale * B (A x). Base projections
come from `memcli.core.quant.make_linear`, so they may be 4-bit, 8-bit or 16/32-bit.

This file is the reference: plain arithmetic, one forward path per layer, whatever the weights'
format. The loader then installs `memcli.core.fastpath` (fused decode-step projections, host-side
shortcuts of the eager CPU path), which swaps modules from outside and computes the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from memcli.core.config import ModelConfig, RopeSpec

ENCODER, DECODER = "encoder", "decoder"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Llama: normalise in fp32, cast back, then scale (the order matters in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary:
    """cos/sin for arbitrary integer positions, computed in fp32 as transformers does."""

    def __init__(self, spec: RopeSpec, precision: str = "fp32"):
        self.spec = spec
        self.precision = precision
        inv = spec.inv_freq()
        if precision == "bf16":
            inv = inv.to(torch.bfloat16).float()
        self.inv_freq = inv

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(positions.device)
        if self.precision == "fp16-table":
            # 7b test_qa path: fp16 positions (rounded above 2048), fp16 scale, fp16 outer product.
            p = positions.to(torch.float16) * torch.tensor(self.spec.position_scale, dtype=torch.float16)
            freqs = (p[:, None] * inv.to(torch.float16)[None, :]).float()
        else:
            p = positions.float()
            if self.spec.kind == "linear":
                p = p / self.spec.factor
            elif self.spec.kind == "interpolate":
                p = p * self.spec.position_scale
            freqs = p[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [..., T, D]; cos/sin: [T, D]. Rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Projection(nn.Module):
    """A (possibly quantized) base projection plus optional unmerged LoRA adapters."""

    def __init__(self, base: nn.Module, scale: float = 0.0):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()

    def add_adapter(self, name: str, a: Tensor, b: Tensor) -> None:
        self.lora_a[name] = nn.Parameter(a, requires_grad=False)
        self.lora_b[name] = nn.Parameter(b, requires_grad=False)

    def has(self, adapter: str | None) -> bool:
        return adapter is not None and adapter in self.lora_a

    def forward(self, x: Tensor, adapter: str | None) -> Tensor:
        y = self.base(x)
        if self.has(adapter):
            y = y + F.linear(F.linear(x, self.lora_a[adapter]), self.lora_b[adapter]) * self.scale
        return y


class Selector(nn.Module):
    """M+ retrieval projector: Linear(d, 2s) -> SiLU -> Linear(2s, s), no bias."""

    def __init__(self, first: Tensor, second: Tensor):
        super().__init__()
        self.first = nn.Parameter(first, requires_grad=False)
        self.second = nn.Parameter(second, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.silu(F.linear(x, self.first)), self.second)


@dataclass
class KV:
    """One layer's key/value buffer: [1, H_kv, capacity, D]; rows [0, start) are the prefix.

    A decode step sets `step` instead: its one row is written at the device tensor `step.position`
    and attends over the whole buffer through `step.mask`, so every step has the same shapes and no
    Python integer that changes per token (gpt-fast style; lets CUDA graphs replay the step)."""

    k: Tensor
    v: Tensor
    start: int
    step: "DecodeStep | None" = None


@dataclass
class DecodeStep:
    position: Tensor  # [1] int64 on the model's device: buffer row of this step's token
    mask: Tensor  # [1, 1, 1, capacity] additive (0 / -inf, the model's dtype): rows 0..position visible
    cos: Tensor  # [1, D] at `position`
    sin: Tensor  # [1, D] at `position`


def attend(q: Tensor, k: Tensor, v: Tensor, mask_row: Tensor | None = None) -> Tensor:
    """q: [1, H, T, D] over k/v: [1, H_kv, S, D]; query i sees keys 0..S-T+i (bottom-right causal),
    or, for one decode step, the keys `mask_row` [1, 1, 1, S] allows.

    With grouped KV heads the G = H / H_kv query heads of a KV head are folded into the query rows
    ([1, H_kv, G*T, D]) instead of asking SDPA for `enable_gqa`: kernels that take a mask do not
    support GQA and would fall back to one that copies K and V G times (the memory prefix is 12,800
    rows per layer). Same arithmetic per head; the mask rows are repeated per folded head.
    Without grouping, `causal_lower_right` lets CUDA use its flash / memory-efficient kernels.
    """
    h, t, s, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    groups = h // k.shape[1]
    if groups == 1:
        mask = mask_row if mask_row is not None else causal_lower_right(t, s) if t > 1 else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask_row is not None:
        mask = mask_row
    elif t > 1:
        # additive (0 visible, -inf not), as SDPA would make it from a boolean mask
        mask = torch.full((t, s), float("-inf"), dtype=q.dtype, device=q.device).triu_(s - t + 1).repeat(groups, 1)
    else:
        mask = None
    out = F.scaled_dot_product_attention(q.reshape(1, k.shape[1], groups * t, d), k, v, attn_mask=mask)
    return out.view(1, h, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # filled by the loader
        self.q_proj: Projection
        self.k_proj: Projection
        self.v_proj: Projection
        self.o_proj: nn.Module

    def heads(self, y: Tensor, t: int, heads: int) -> Tensor:
        """Projected rows [.., T, heads * D] -> [1, heads, T, D]."""
        return y.view(1, t, heads, self.head_dim).transpose(1, 2)

    def keys_values(self, xn: Tensor, cos: Tensor | None, sin: Tensor | None,
                    adapter: str | None) -> tuple[Tensor, Tensor]:
        """Normalised rows [1, T, d] -> keys (rotated unless cos is None) and values [1, H_kv, T, D]."""
        t = xn.shape[-2]
        k = self.heads(self.k_proj(xn, adapter), t, self.num_kv_heads)
        v = self.heads(self.v_proj(xn, adapter), t, self.num_kv_heads)
        return (k if cos is None else apply_rotary(k, cos, sin)), v

    def forward(self, xn: Tensor, cos: Tensor, sin: Tensor, kv: KV, adapter: str | None) -> Tensor:
        """Rows xn [1, T, d] (a decode step: [1, d]) -> the attention output, the same shape."""
        t = xn.shape[-2]
        q = apply_rotary(self.heads(self.q_proj(xn, adapter), t, self.num_heads), cos, sin)
        k, v = self.keys_values(xn, cos, sin, adapter)
        if kv.step is not None:
            # the step's row of the buffer, named by a device tensor (compiled: an in-place store)
            kv.k[:, :, kv.step.position] = k
            kv.v[:, :, kv.step.position] = v
            out = attend(q, kv.k, kv.v, kv.step.mask)
        else:
            end = kv.start + t
            kv.k[:, :, kv.start : end] = k
            kv.v[:, :, kv.start : end] = v
            out = attend(q, kv.k[:, :, :end], kv.v[:, :, :end])
        return self.o_proj(out.transpose(1, 2).reshape(*xn.shape[:-1], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj: Projection
        self.up_proj: Projection
        self.down_proj: Projection

    def forward(self, x: Tensor, adapter: str | None) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, adapter)) * self.up_proj(x, adapter), adapter)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP()
        # M+ retrieval projectors (None for MemoryLLM)
        self.query_proj: Selector | None = None
        self.key_proj: Selector | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KV, adapter: str | None) -> Tensor:
        """The layer's output rows. It consumes `x`: the residual sums are made in place in it
        (the same values), since no caller reads a layer's input again and, at an injection's 512+
        rows, each out-of-place sum would keep one more [T, d] tensor alive through the MLP."""
        h = x.add_(self.self_attn(self.input_layernorm(x), cos, sin, kv, adapter))
        return h.add_(self.mlp(self.post_attention_layernorm(h), adapter))

    def prefix_keys_values(self, rows: Tensor, cos: Tensor | None, sin: Tensor | None, adapter: str | None):
        """Keys/values of prefix rows [1, P, d]: they are normalised but get no query, residual or MLP.
        cos None: keys left unrotated (the memory K/V cache rotates them by logical position later)."""
        return self.self_attn.keys_values(self.input_layernorm(rows), cos, sin, adapter)


class Transformer(nn.Module):
    """Weights only. Memory contents live in `memcli.core.state.MemoryState`, never here."""

    def __init__(self, cfg: ModelConfig, rope_precision: str = "fp32"):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope, rope_precision)
        # filled by the loader
        self.embed_tokens: nn.Embedding
        self.lm_head: nn.Module
        self.register_buffer("bos_embedding", torch.empty(0), persistent=False)  # [L, 1, d]
        self.register_buffer("new_memory_positional_emb", torch.empty(0), persistent=False)  # [1, 1, d]
        # cos/sin of positions [0, rows) in the model's dtype, computed once on the model's device
        # (grown only if a longer sequence ever needs it): every forward slices or gathers them.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.bos_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.bos_embedding.device

    def new_kv(self, capacity: int) -> list[KV]:
        shape = (1, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        return [
            KV(torch.zeros(shape, dtype=self.dtype, device=self.device),
               torch.zeros(shape, dtype=self.dtype, device=self.device), 0)
            for _ in self.layers
        ]

    def rope_rows(self, rows: int) -> None:
        """Make the cos/sin tables cover positions [0, rows). Entries equal what
        `Rotary.cos_sin` gives for those positions (it is elementwise), so slicing is exact."""
        have = self.rope_cos.shape[0] if self.rope_cos.dim() == 2 else 0
        if have >= rows and self.rope_cos.dtype == self.dtype and self.rope_cos.device == self.device:
            return
        rows = max(rows, 2 * have, self.cfg.prefix_rows + self.cfg.window + 1)
        self.rope_cos, self.rope_sin = self.rotary.cos_sin(torch.arange(rows, device=self.device), self.dtype)

    def cos_sin(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        self.rope_rows(start + length)
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def cos_sin_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin gathered at a device tensor of positions (the table must already cover them)."""
        return self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)

    def decode_step(self, position: Tensor, rows: Tensor) -> DecodeStep:
        """A decode step at buffer row `position` over buffer rows `rows` (arange, device tensors):
        one additive mask for every layer, as SDPA would make it from a boolean one."""
        cos, sin = self.cos_sin_at(position)
        mask = torch.where(rows <= position, 0.0, float("-inf")).to(self.dtype)
        return DecodeStep(position, mask.view(1, 1, 1, -1), cos, sin)

    def logits(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))
