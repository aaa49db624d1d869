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
come from `memcli.quant.make_linear`, so they may be 4-bit, 8-bit or 16/32-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from .config import ModelConfig, RopeSpec
from .quant import DenseLinear

ENCODER, DECODER = "encoder", "decoder"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Llama: normalise in fp32, cast back, then scale (the order matters in bf16). The casts are
        # skipped when they would be no-ops (fp32): same values, fewer operator calls per token.
        fp32 = x.dtype == torch.float32
        h = x if fp32 else x.float()
        squares = h * h  # what pow(h, 2) computes (ATen squares by one multiply), in one call not three
        if h.is_cpu:
            # ATen's CPU mean is this sum and division (bitwise the same), spelled out so that the
            # division takes a ready fp32 operand instead of wrapping the row count on every call
            mean = squares.sum(-1, keepdim=True).div_(_fp32_scalar(self, "width", h.shape[-1]))
        else:
            mean = squares.mean(-1, keepdim=True)
        h = h * torch.rsqrt(mean.add_(_fp32_scalar(self, "eps")))
        return self.weight * (h if fp32 else h.to(x.dtype))


def _fp32_scalar(owner, name: str, value: float | None = None) -> Tensor:
    """owner.<name> (or `value`) as a 0-dim fp32 CPU tensor, made once: a Python float operand is
    wrapped and cast on every call (four operator calls); fp32 arithmetic with it is the same."""
    if torch.compiler.is_compiling():  # a constant to the compiler; it cannot trace the cache
        return getattr(owner, name) if value is None else value
    key = "_fp32_" + name if value is None else f"_fp32_{name}_{value}"
    t = owner.__dict__.get(key)
    if t is None:
        t = torch.tensor(getattr(owner, name) if value is None else value, dtype=torch.float32)
        owner.__dict__[key] = t
    return t


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
    # x * cos + rotated * sin with the second product and the sum in place: the same values, two
    # temporaries fewer
    return (x * cos).add_(rotated.mul_(sin))


def rotate_row(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """apply_rotary for one decode step, bitwise the same in fewer operator calls: the halves are
    swapped by one flip and the sign of the first half lives in `sin_signed` (cat(-sin1, sin2)),
    since (-x2) * s == x2 * (-s) exactly. x: [..., D]; cos/sin_signed broadcast against it."""
    half = x.shape[-1] // 2
    swapped = x.view(*x.shape[:-1], 2, half).flip(-2).view(x.shape)
    return (x * cos).add_(swapped.mul_(sin_signed))


class Projection(nn.Module):
    """A (possibly quantized) base projection plus optional unmerged LoRA adapters.

    Dense matrices are applied through `apply_linear` (one `torch.mm` per matrix)."""

    def __init__(self, base: nn.Module, scale: float = 0.0):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()

    def add_adapter(self, name: str, a: Tensor, b: Tensor) -> None:
        self.lora_a[name] = nn.Parameter(a, requires_grad=False)
        self.lora_b[name] = nn.Parameter(b, requires_grad=False)

    def forward(self, x: Tensor, adapter: str | None) -> Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = apply_linear(self.base, rows)
        if self.has(adapter):
            a = self.lora_in(rows, adapter)
            for cols in _column_blocks(rows, y.shape[-1]):
                self.add_lora(y if cols is None else y[:, cols], a, adapter, cols)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def has(self, adapter: str | None) -> bool:
        return adapter is not None and adapter in self.lora_a

    def lora_in(self, rows: Tensor, adapter: str) -> Tensor:
        """A x: [T, r]."""
        return torch.mm(rows, _transposed(self.lora_a[adapter]))

    def add_lora(self, y: Tensor, a: Tensor, adapter: str, cols: slice | None) -> None:
        """y += (B[cols] (A x)) * scale (cols None: all), in place: the same two roundings as
        `y + B(Ax) * scale`."""
        scale = _fp32_scalar(self, "scale") if y.dtype == torch.float32 else self.scale
        bt = _transposed(self.lora_b[adapter])
        y.add_(torch.mm(a, bt if cols is None else bt[:, cols]).mul_(scale))

    def columns(self, rows: Tensor, adapter: str | None, a: Tensor | None, cols: slice) -> Tensor:
        """Output columns `cols` of forward(rows) (a dense base only; `a` from `lora_in`)."""
        y = torch.mm(rows, _transposed(self.base.weight)[:, cols])
        if a is not None:
            self.add_lora(y, a, adapter, cols)
        return y

    def dense(self, dtype: torch.dtype) -> bool:
        return type(self.base) is DenseLinear and self.base.weight.dtype == dtype


class FusedProjection(nn.Module):
    """Dense projections of one input (q|k|v, gate|up) as one matrix product, for decode steps.

    A decode step is a single row, so its host cost is the number of operator calls, not the
    arithmetic: fused, q, k and v cost one base product, one LoRA A product and one batched LoRA B
    product instead of one of each per projection. The parts' weights become row blocks (views) of
    the fused weight, so nothing is stored twice and every other path still sees its own projection.

    LoRA stays exact (bitwise what each projection computes on its own, as tests check): the
    output is cut into blocks of one width w (a k/v projection's width; q is G of them), B into
    the matching row blocks, and A lists each part's matrix once per block of that part, so the
    batched B product multiplies every block by its own part's A x: column blocks of the separate
    products, which BLAS computes the same (block-diagonal B with zeros would not be)."""

    def __init__(self, parts: list[Projection], adapter: str):
        super().__init__()
        widths = [p.base.weight.shape[0] for p in parts]
        weight = torch.cat([p.base.weight for p in parts])
        row = 0
        for p, rows in zip(parts, widths):
            p.base.weight = nn.Parameter(weight[row : row + rows], requires_grad=False)
            row += rows
        # not persistent: the parts' weights (views of it) are what a state_dict lists
        self.register_buffer("weight", weight, persistent=False)
        self.scale = parts[0].scale
        self.lora = parts[0].has(adapter)
        if self.lora:
            block = min(widths)
            a = torch.cat([p.lora_a[adapter] for p, rows in zip(parts, widths) for _ in range(rows // block)])
            b = torch.cat([p.lora_b[adapter] for p in parts])  # [sum widths, r]
            # the parts' own matrices become views too: only the repeated A blocks are extra
            a_row = b_row = 0
            for p, rows in zip(parts, widths):
                r = p.lora_a[adapter].shape[0]
                p.lora_a[adapter] = nn.Parameter(a[a_row : a_row + r], requires_grad=False)
                p.lora_b[adapter] = nn.Parameter(b[b_row : b_row + rows], requires_grad=False)
                a_row, b_row = a_row + r * (rows // block), b_row + rows
            self.register_buffer("lora_a", a, persistent=False)
            self.register_buffer("lora_b", b.view(-1, block, b.shape[1]), persistent=False)  # [blocks, w, r]

    @staticmethod
    def possible(parts: list[Projection], adapter: str) -> bool:
        """Dense bases of one dtype; every part with the adapter or none, of one rank and scale;
        output widths that are multiples of the narrowest."""
        if type(parts[0].base) is not DenseLinear:
            return False
        dtype = parts[0].base.weight.dtype
        widths = [p.base.weight.shape[0] for p in parts]
        if not all(p.dense(dtype) for p in parts) or any(w % min(widths) for w in widths):
            return False
        adapted = [p.has(adapter) for p in parts]
        if not any(adapted):
            return True
        return all(adapted) and len({(p.lora_a[adapter].shape[0], p.scale) for p in parts}) == 1

    def forward(self, row: Tensor) -> Tensor:
        """One row [1, in] -> [1, sum of the parts' outputs], the parts' columns in order."""
        y = torch.mm(row, _transposed(self.weight))
        if self.lora:
            a = torch.mm(row, _transposed(self.lora_a)).view(self.lora_b.shape[0], 1, -1)  # [blocks, 1, r]
            scale = _fp32_scalar(self, "scale") if y.dtype == torch.float32 else self.scale
            y.add_(torch.bmm(a, _transposed(self.lora_b)).mul_(scale).view(1, -1))
        return y


# Long inputs on the CPU (an injection runs 512-768 rows) compute wide outputs in column blocks, so
# that the temporaries of the LoRA term and of the MLP's up projection are one block, not
# [T, 14,336] each: that is what keeps an injection's host peak near the state + weights. Column
# blocks of a CPU matrix product came out bitwise equal to the whole product's columns (each
# column's sum is the same; tests/test_engine.py checks it on the installed BLAS); row blocks did not.
_BLOCK_ROWS, _BLOCK_COLUMNS = 64, 512


def _column_blocks(rows: Tensor, width: int) -> list[slice | None]:
    """Column blocks of a [T, width] output; [None] (all at once) for short or device inputs."""
    if rows.shape[0] < _BLOCK_ROWS or not rows.is_cpu or width <= _BLOCK_COLUMNS:
        return [None]
    return [slice(j, min(j + _BLOCK_COLUMNS, width)) for j in range(0, width, _BLOCK_COLUMNS)]


def _transposed(w: Tensor) -> Tensor:
    """w.t() (a view, no copy; for a batch [n, a, b] of matrices, each one's), kept on the weight
    object itself: made again only for a new weight object (after `.to()`, say), never stale."""
    if torch.compiler.is_compiling():  # the compiler sees through w.t(); it cannot trace the cache
        return w.transpose(-1, -2)
    t = w.__dict__.get("_memcli_t")
    if t is None:
        t = w.transpose(-1, -2)  # w.t() for a matrix; per matrix for a batch of them
        w.__dict__["_memcli_t"] = t
    return t


def apply_linear(base: nn.Module, rows: Tensor) -> Tensor:
    """x @ W.T for rows [T, in]. A dense weight in the rows' dtype goes through one `torch.mm` with
    its transposed view: the kernel `F.linear` ends in (bitwise the same result) without its wrapper
    operators (t, transpose, matmul, views: nine calls), which dominated the host-side cost of a
    decode step. Quantized or differently typed bases are called as modules."""
    if type(base) is DenseLinear and base.weight.dtype == rows.dtype:
        return torch.mm(rows, _transposed(base.weight))
    return base(rows)


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
    cos: Tensor  # [1, D] at `position` (fused steps; the others take cos/sin as arguments)
    sin_signed: Tensor  # [1, D] at `position`: cat(-sin1, sin2), for rotate_row


def _heads(y: Tensor, t: int, heads: int, head_dim: int) -> Tensor:
    """Projected rows [.., T, heads * D] -> [1, heads, T, D]. One row needs no transpose: [1, 1, H, D]
    and [1, H, 1, D] are the same memory, so a view gives the same tensor with fewer operator calls."""
    if t == 1:
        return y.view(1, heads, 1, head_dim)
    return y.view(1, t, heads, head_dim).transpose(1, 2)


def attend(q: Tensor, k: Tensor, v: Tensor, mask_row: Tensor | None = None) -> Tensor:
    """q: [1, H, T, D] over k/v: [1, H_kv, S, D]; query i sees keys 0..S-T+i (bottom-right causal),
    or, for one decode step, the keys `mask_row` [1, 1, 1, S] allows.

    With grouped KV heads the G = H / H_kv query heads of a KV head are folded into the query rows
    ([1, H_kv, G*T, D]) instead of asking SDPA for `enable_gqa`: kernels that take a mask do not
    support GQA and would fall back to one that copies K and V G times (the memory prefix is 12,800
    rows per layer). Same arithmetic per head; the mask rows are repeated per folded head.
    """
    h, t, s, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    groups = h // k.shape[1]
    if groups == 1:
        if mask_row is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_row)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s) if t > 1 else None)
    folded = q.reshape(1, k.shape[1], groups * t, d)
    if mask_row is not None:
        mask = mask_row
    elif t > 1:
        # additive, as SDPA would make it from a boolean mask (0 visible, -inf not): built once
        # here instead of a boolean copy plus SDPA's float one
        mask = torch.full((t, s), float("-inf"), dtype=q.dtype, device=q.device).triu_(s - t + 1).repeat(groups, 1)
    else:
        mask = None
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return out.view(1, h, t, d)


def _store_step(kv: KV, k: Tensor, v: Tensor) -> None:
    """Write one step's key/value [1, H_kv, 1, D] at the buffer row `kv.step.position`."""
    if torch.compiler.is_compiling():
        # index_put_ (not index_copy_): the compiler turns it into an in-place store into
        # the buffer instead of a copy of the whole buffer per step
        kv.k[:, :, kv.step.position] = k
        kv.v[:, :, kv.step.position] = v
    else:  # eager: the same store as one operator call instead of five
        kv.k.index_copy_(2, kv.step.position, k)
        kv.v.index_copy_(2, kv.step.position, v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # filled by the loader
        self.q_proj: Projection
        self.k_proj: Projection
        self.v_proj: Projection
        self.o_proj: nn.Module

    def keys_values(self, xn: Tensor, cos: Tensor | None, sin: Tensor | None,
                    adapter: str | None) -> tuple[Tensor, Tensor]:
        """Normalised rows [1, T, d] -> keys (rotated unless cos is None) and values [1, H_kv, T, D]."""
        t = xn.shape[-2]
        k = _heads(self.k_proj(xn, adapter), t, self.num_kv_heads, self.head_dim)
        v = _heads(self.v_proj(xn, adapter), t, self.num_kv_heads, self.head_dim)
        return (k if cos is None else apply_rotary(k, cos, sin)), v

    def forward(self, xn: Tensor, cos: Tensor, sin: Tensor, kv: KV, adapter: str | None) -> Tensor:
        t = xn.shape[-2]
        q = apply_rotary(_heads(self.q_proj(xn, adapter), t, self.num_heads, self.head_dim), cos, sin)
        k, v = self.keys_values(xn, cos, sin, adapter)
        if kv.step is not None:
            _store_step(kv, k, v)
            out = attend(q, kv.k, kv.v, kv.step.mask)
        else:
            end = kv.start + t
            kv.k[:, :, kv.start : end] = k
            kv.v[:, :, kv.start : end] = v
            out = attend(q, kv.k[:, :, :end], kv.v[:, :, :end])
        width = self.num_heads * self.head_dim
        rows = out.view(1, width) if t == 1 else out.transpose(1, 2).reshape(t, width)
        out = apply_linear(self.o_proj, rows)
        return out if xn.dim() == 2 else out.view(1, t, out.shape[-1])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj: Projection
        self.up_proj: Projection
        self.down_proj: Projection

    def forward(self, x: Tensor, adapter: str | None) -> Tensor:
        # silu and the product in place on the fresh gate output (the same values); the up
        # projection in column blocks for long CPU inputs (see _column_blocks): one [T, intermediate]
        # tensor alive instead of three
        h = F.silu(self.gate_proj(x, adapter), inplace=True)
        up = self.up_proj
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        blocks = _column_blocks(rows, h.shape[-1])
        if len(blocks) == 1 or not up.dense(rows.dtype):
            return self.down_proj(h.mul_(up(x, adapter)), adapter)
        a = up.lora_in(rows, adapter) if up.has(adapter) else None
        flat = h.view(-1, h.shape[-1])
        for cols in blocks:
            flat[:, cols].mul_(up.columns(rows, adapter, a, cols))
        return self.down_proj(h, adapter)


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
        # decode-step projections (fuse(); None: the step runs projection by projection)
        self.qkv: FusedProjection | None = None
        self.gate_up: FusedProjection | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KV, adapter: str | None) -> Tensor:
        """The layer's output rows. It consumes `x`: the residual sums are made in place in it
        (the same values), since no caller reads a layer's input again and, at an injection's 512+
        rows, each out-of-place sum would keep one more [T, d] tensor alive through the MLP."""
        if kv.step is not None and self.qkv is not None and adapter == DECODER:
            return self.step(x, kv)
        h = x.add_(self.self_attn(self.input_layernorm(x), cos, sin, kv, adapter))
        return h.add_(self.mlp(self.post_attention_layernorm(h), adapter))

    def fuse(self) -> None:
        """Fused q|k|v and gate|up projections for decode steps (dense bases only; see
        FusedProjection). Call once the weights are in place; the parts then share their storage."""
        attn, mlp = self.self_attn, self.mlp
        qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        if FusedProjection.possible(qkv, DECODER) and FusedProjection.possible(gate_up, DECODER):
            self.qkv, self.gate_up = FusedProjection(qkv, DECODER), FusedProjection(gate_up, DECODER)

    def step(self, x: Tensor, kv: KV) -> Tensor:
        """One decode step (x: [1, d], the decoder adapter) through the fused projections: the same
        arithmetic as forward(), in about two thirds of the operator calls."""
        attn, step = self.self_attn, kv.step
        h, h_kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        # (split_with_sizes and views: each slice costs an operator call or two)
        qk, v = self.qkv(self.input_layernorm(x)).view(1, h + 2 * h_kv, d).split_with_sizes((h + h_kv, h_kv), 1)
        q, k = rotate_row(qk, step.cos, step.sin_signed).split_with_sizes((h, h_kv), 1)
        _store_step(kv, k.view(1, h_kv, 1, d), v.view(1, h_kv, 1, d))
        # attend()'s grouped-query fold, which for one row is a view: [1, H_kv, G, D]
        out = F.scaled_dot_product_attention(q.view(1, h_kv, h // h_kv, d), kv.k, kv.v, attn_mask=step.mask)
        x = x + apply_linear(attn.o_proj, out.view(1, h * d))
        widths = (self.mlp.gate_proj.base.weight.shape[0], self.mlp.up_proj.base.weight.shape[0])
        gate, up = self.gate_up(self.post_attention_layernorm(x)).split_with_sizes(widths, 1)
        return x + self.mlp.down_proj(F.silu(gate, inplace=True).mul_(up), DECODER)

    def prefix_keys_values(self, rows: Tensor, cos: Tensor | None, sin: Tensor | None, adapter: str | None):
        """Keys/values of prefix rows [1, P, d]: they are normalised but get no query, residual or MLP.
        cos None: keys left unrotated (the memory K/V cache rotates them by logical position later)."""
        return self.self_attn.keys_values(self.input_layernorm(rows), cos, sin, adapter)


class Transformer(nn.Module):
    """Weights only. Memory contents live in `memcli.state.MemoryState`, never here."""

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
        # [-1 x D/2, +1 x D/2] (made with the tables): sin * sign = cat(-sin1, sin2) exactly
        self.register_buffer("rope_sign", torch.empty(0), persistent=False)

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
        half = self.cfg.head_dim // 2
        self.rope_sign = torch.ones(2, half, dtype=self.dtype, device=self.device)
        self.rope_sign[0].neg_()
        self.rope_sign = self.rope_sign.view(-1)

    def cos_sin(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        self.rope_rows(start + length)
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def fuse(self) -> None:
        """Fused decode-step projections in every layer (after loading; see FusedProjection)."""
        for layer in self.layers:
            layer.fuse()

    def cos_sin_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin gathered at a device tensor of positions (the table must already cover them)."""
        return self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)

    def logits(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        rows = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
        out = apply_linear(self.lm_head, rows)
        return out if h.dim() == 2 else out.view(*h.shape[:-1], out.shape[-1])
