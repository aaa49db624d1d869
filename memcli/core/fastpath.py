"""Fast paths for `memcli.core.model`, installed at load: the same values in fewer host-side operator calls.

`memcli/core/model.py` is the reference: plain arithmetic, one forward path per layer. A decode step is
one row, so on the CPU (and on an eager GPU) its cost is the number of operator calls, not the
arithmetic; an injection's 512+ rows are bounded by the host memory its temporaries take. What
this module changes, each exact (tests/test_fastpath.py checks it against the reference model):

* Dense projections (`quant.DenseLinear`) as one `torch.mm` with the weight's transposed view, kept:
  the kernel `F.linear` ends in, without its wrapper operators (t, transpose, matmul, views: nine
  calls). LoRA terms likewise, added in place.
* fp32 scalars (LoRA scale, RMSNorm eps and width) as ready 0-dim fp32 tensors: a Python float
  operand is wrapped and cast on every call (four operator calls); fp32 arithmetic with it is the
  same. On the CPU the RMSNorm mean is spelled as its sum and division, which ATen's CPU mean is.
* Decode steps of layers with dense bases: q|k|v and gate|up as one fused product each
  (`FusedProjection`), both rotations as one `rotate_row`, one-row heads as views, the K/V store as
  one `index_copy_` (compiled: `index_put_`, which the compiler turns into an in-place store).
* Long CPU inputs (injections) compute the LoRA term and the MLP's up projection in column blocks,
  so their temporaries are one block wide, not [T, intermediate]: that keeps an inject's host peak
  near the state + weights. Column blocks of a CPU matrix product are bitwise the whole product's
  columns (each column's sum is the same); row blocks are not.

`install(model)` swaps the classes of the model's modules for the subclasses below, in place:
parameters, buffers and names stay, so the state_dict, the binding and the converted copy see the
reference model; a model without it computes the reference results. Like gpt-fast's quantization,
the model never knows. Install after the weights are in place, on their device and in their dtype
(the kept views and the fused weights are views of them).

While compiling (`torch.compile` of the decode step) the kept views and scalars are left aside:
the compiler sees through `w.t()` and takes Python numbers as constants, where the kept tensors
would only be more graph inputs (host tensors, for the scalars, in a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memcli.core.model import DECODER, KV, MLP, Attention, Block, DecodeStep, Projection, RMSNorm, Transformer, attend
from memcli.core.quant import DenseLinear

# Inputs of more rows than this on the CPU compute outputs wider than the block in column blocks.
_BLOCK_ROWS, _BLOCK_COLUMNS = 64, 512


def install(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Swap in the fast paths of `model` and every module in it (a Transformer, or one part of it);
    again is a no-op. `fuse=False` leaves decode steps layer by projection (tests compare the two).
    Returns the model, the same object."""
    if fuse:  # first: fusing makes the parts' weights views of one storage, the kept views follow
        for module in model.modules():
            if type(module) is Block:
                FastBlock.fuse(module)
    for module in list(model.modules()):
        fast = _FAST.get(type(module))
        if fast is not None and fast.takes(module):
            module.__class__ = fast
            module.prepare()
    return model


class _Swapped:
    """What install() asks of a fast subclass: whether it takes a module, and what to make once."""

    @staticmethod
    def takes(module: nn.Module) -> bool:
        return True

    def prepare(self) -> None:
        pass


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _column_blocks(rows: Tensor, width: int) -> list[slice | None]:
    """Column blocks of a [T, width] output; [None] (all at once) for short or device inputs."""
    if rows.shape[0] <= _BLOCK_ROWS or not rows.is_cpu or width <= _BLOCK_COLUMNS:
        return [None]
    return [slice(j, min(j + _BLOCK_COLUMNS, width)) for j in range(0, width, _BLOCK_COLUMNS)]


def _fp32(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _dense(module: nn.Module, dtype: torch.dtype) -> bool:
    return isinstance(module, DenseLinear) and module.weight.dtype == dtype


class FastLinear(DenseLinear, _Swapped):
    """x @ W.T as one torch.mm with W's transposed view (bitwise F.linear: the same kernel)."""

    def prepare(self) -> None:
        self.weight_t = self.weight.t()

    def transposed(self) -> Tensor:
        return self.weight.t() if _compiling() else self.weight_t

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:
            return super().forward(x)
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch.mm(rows, self.transposed())
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class FastRMSNorm(RMSNorm, _Swapped):
    """Casts skipped where they are no-ops (fp32), squares by one multiply (what pow(h, 2) does),
    eps and (CPU) the width as ready fp32 operands."""

    def prepare(self) -> None:
        self.eps_fp32, self.width_fp32 = _fp32(self.eps), _fp32(self.weight.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        fp32 = x.dtype == torch.float32
        h = x if fp32 else x.float()
        compiling = _compiling()
        squares = h * h
        if h.is_cpu:
            # ATen's CPU mean is this sum and division (bitwise the same)
            mean = squares.sum(-1, keepdim=True).div_(h.shape[-1] if compiling else self.width_fp32)
        else:
            mean = squares.mean(-1, keepdim=True)
        h = h * torch.rsqrt(mean.add_(self.eps if compiling else self.eps_fp32))
        return self.weight * (h if fp32 else h.to(x.dtype))


class FastProjection(Projection, _Swapped):
    """Rows as one 2-D product; the LoRA term through kept transposed views, added in place (the same
    two roundings as `y + B(Ax) * scale`), in column blocks for long CPU inputs."""

    def prepare(self) -> None:
        self.scale_fp32 = _fp32(self.scale)
        self.a_t = {name: a.t() for name, a in self.lora_a.items()}
        self.b_t = {name: b.t() for name, b in self.lora_b.items()}

    def forward(self, x: Tensor, adapter: str | None) -> Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self.base(rows)
        if self.has(adapter):
            a = self.lora_in(rows, adapter)
            for cols in _column_blocks(rows, y.shape[-1]):
                self.add_lora(y if cols is None else y[:, cols], a, adapter, cols)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def lora_in(self, rows: Tensor, adapter: str) -> Tensor:
        """A x: [T, r]."""
        return torch.mm(rows, self.lora_a[adapter].t() if _compiling() else self.a_t[adapter])

    def add_lora(self, y: Tensor, a: Tensor, adapter: str, cols: slice | None) -> None:
        """y += (B[cols] (A x)) * scale (cols None: all), in place."""
        compiling = _compiling()
        scale = self.scale_fp32 if y.dtype == torch.float32 and not compiling else self.scale
        bt = self.lora_b[adapter].t() if compiling else self.b_t[adapter]
        y.add_(torch.mm(a, bt if cols is None else bt[:, cols]).mul_(scale))

    def columns(self, rows: Tensor, adapter: str | None, a: Tensor | None, cols: slice) -> Tensor:
        """Output columns `cols` of forward(rows) (a dense base only; `a` from `lora_in`)."""
        y = torch.mm(rows, self.base.transposed()[:, cols])
        if a is not None:
            self.add_lora(y, a, adapter, cols)
        return y


class FastMLP(MLP, _Swapped):
    """silu and the product in place on the fresh gate output (the same values); the up projection in
    column blocks for long CPU inputs: one [T, intermediate] tensor alive instead of three."""

    def forward(self, x: Tensor, adapter: str | None) -> Tensor:
        h = F.silu(self.gate_proj(x, adapter), inplace=True)
        up = self.up_proj
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        blocks = _column_blocks(rows, h.shape[-1])
        if len(blocks) == 1 or not _dense(up.base, rows.dtype):
            return self.down_proj(h.mul_(up(x, adapter)), adapter)
        a = up.lora_in(rows, adapter) if up.has(adapter) else None
        flat = h.view(-1, h.shape[-1])
        for cols in blocks:
            flat[:, cols].mul_(up.columns(rows, adapter, a, cols))
        return self.down_proj(h, adapter)


def _heads(y: Tensor, t: int, heads: int, head_dim: int) -> Tensor:
    """Attention.heads; one row needs no transpose: [1, 1, H, D] and [1, H, 1, D] are the same
    memory, so a view gives the same tensor in fewer operator calls."""
    if t == 1:
        return y.view(1, heads, 1, head_dim)
    return y.view(1, t, heads, head_dim).transpose(1, 2)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """model.apply_rotary with the second product and the sum in place: two temporaries fewer."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos).add_(rotated.mul_(sin))


def rotate_row(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """apply_rotary for one decode step, bitwise the same in fewer operator calls: the halves are
    swapped by one flip and the sign of the first half lives in `sin_signed` (cat(-sin1, sin2)),
    since (-x2) * s == x2 * (-s) exactly. x: [..., D]; cos/sin_signed broadcast against it."""
    half = x.shape[-1] // 2
    swapped = x.view(*x.shape[:-1], 2, half).flip(-2).view(x.shape)
    return (x * cos).add_(swapped.mul_(sin_signed))


def _store_step(kv: KV, k: Tensor, v: Tensor) -> None:
    """Write one step's key/value [1, H_kv, 1, D] at the buffer row `kv.step.position`."""
    if _compiling():
        # index_put_ (not index_copy_): the compiler turns it into an in-place store into
        # the buffer instead of a copy of the whole buffer per step
        kv.k[:, :, kv.step.position] = k
        kv.v[:, :, kv.step.position] = v
    else:  # eager: the same store as one operator call instead of five
        kv.k.index_copy_(2, kv.step.position, k)
        kv.v.index_copy_(2, kv.step.position, v)


class FastAttention(Attention, _Swapped):
    """One-row heads as views, rotations in place, the step's K/V store in one call, o_proj on 2-D rows."""

    def keys_values(self, xn: Tensor, cos: Tensor | None, sin: Tensor | None,
                    adapter: str | None) -> tuple[Tensor, Tensor]:
        t = xn.shape[-2]
        k = _heads(self.k_proj(xn, adapter), t, self.num_kv_heads, self.head_dim)
        v = _heads(self.v_proj(xn, adapter), t, self.num_kv_heads, self.head_dim)
        return (k if cos is None else _rotate(k, cos, sin)), v

    def forward(self, xn: Tensor, cos: Tensor, sin: Tensor, kv: KV, adapter: str | None) -> Tensor:
        t = xn.shape[-2]
        q = _rotate(_heads(self.q_proj(xn, adapter), t, self.num_heads, self.head_dim), cos, sin)
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
        out = self.o_proj(rows)
        return out if xn.dim() == 2 else out.view(1, t, out.shape[-1])


class FusedProjection(nn.Module):
    """Dense projections of one input (q|k|v, gate|up) as one matrix product, for decode steps.

    A decode step is a single row, so its host cost is the number of operator calls, not the
    arithmetic: fused, q, k and v cost one base product, one LoRA A product and one batched LoRA B
    product instead of one of each per projection. The parts' weights become row blocks (views) of
    the fused weight, so nothing is stored twice and every other path still sees its own projection.

    LoRA stays exact (bitwise what each projection computes on its own at BLAS sizes, as tests
    check): the output is cut into blocks of one width w (a k/v projection's width; q is G of them),
    B into the matching row blocks, and A lists each part's matrix once per block of that part, so
    the batched B product multiplies every block by its own part's A x: column blocks of the
    separate products, which BLAS computes the same (block-diagonal B with zeros would not be)."""

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
        self.weight_t = weight.t()
        self.scale = parts[0].scale
        self.scale_fp32 = _fp32(self.scale)
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
            self.lora_a_t, self.lora_b_t = self.lora_a.t(), self.lora_b.transpose(-1, -2)

    @staticmethod
    def possible(parts: list[Projection], adapter: str) -> bool:
        """Dense bases of one dtype; every part with the adapter or none, of one rank and scale;
        output widths that are multiples of the narrowest."""
        if not isinstance(parts[0].base, DenseLinear):
            return False
        dtype = parts[0].base.weight.dtype
        widths = [p.base.weight.shape[0] for p in parts]
        if not all(_dense(p.base, dtype) for p in parts) or any(w % min(widths) for w in widths):
            return False
        adapted = [p.has(adapter) for p in parts]
        if not any(adapted):
            return True
        return all(adapted) and len({(p.lora_a[adapter].shape[0], p.scale) for p in parts}) == 1

    def forward(self, row: Tensor) -> Tensor:
        """One row [1, in] -> [1, sum of the parts' outputs], the parts' columns in order."""
        compiling = _compiling()
        y = torch.mm(row, self.weight.t() if compiling else self.weight_t)
        if self.lora:
            a = torch.mm(row, self.lora_a.t() if compiling else self.lora_a_t)
            a = a.view(self.lora_b.shape[0], 1, -1)  # [blocks, 1, r]
            b_t = self.lora_b.transpose(-1, -2) if compiling else self.lora_b_t
            scale = self.scale_fp32 if y.dtype == torch.float32 and not compiling else self.scale
            y.add_(torch.bmm(a, b_t).mul_(scale).view(1, -1))
        return y


class FastBlock(Block, _Swapped):
    """Decode steps (decoder adapter) through the fused projections: the same arithmetic as
    Block.forward, in about two thirds of the operator calls."""

    qkv: FusedProjection
    gate_up: FusedProjection

    @staticmethod
    def fuse(block: Block) -> None:
        """Fused q|k|v and gate|up projections (dense bases only), made before the swap."""
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        if hasattr(block, "qkv"):
            return
        if FusedProjection.possible(qkv, DECODER) and FusedProjection.possible(gate_up, DECODER):
            block.qkv, block.gate_up = FusedProjection(qkv, DECODER), FusedProjection(gate_up, DECODER)

    @staticmethod
    def takes(module: Block) -> bool:
        return isinstance(getattr(module, "qkv", None), FusedProjection)

    def prepare(self) -> None:
        self.widths = (self.mlp.gate_proj.base.weight.shape[0], self.mlp.up_proj.base.weight.shape[0])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KV, adapter: str | None) -> Tensor:
        if kv.step is not None and adapter == DECODER:
            return self.step(x, kv)
        return super().forward(x, cos, sin, kv, adapter)

    def step(self, x: Tensor, kv: KV) -> Tensor:
        """One decode step (x: [1, d], the decoder adapter)."""
        attn, step = self.self_attn, kv.step
        h, h_kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        # (split_with_sizes and views: each slice costs an operator call or two)
        qk, v = self.qkv(self.input_layernorm(x)).view(1, h + 2 * h_kv, d).split_with_sizes((h + h_kv, h_kv), 1)
        q, k = rotate_row(qk, step.cos, step.sin_signed).split_with_sizes((h, h_kv), 1)
        _store_step(kv, k.view(1, h_kv, 1, d), v.view(1, h_kv, 1, d))
        # attend()'s grouped-query fold, which for one row is a view: [1, H_kv, G, D]
        out = F.scaled_dot_product_attention(q.view(1, h_kv, h // h_kv, d), kv.k, kv.v, attn_mask=step.mask)
        x = x + attn.o_proj(out.view(1, h * d))
        gate, up = self.gate_up(self.post_attention_layernorm(x)).split_with_sizes(self.widths, 1)
        return x + self.mlp.down_proj(F.silu(gate, inplace=True).mul_(up), DECODER)


@dataclass
class FastDecodeStep(DecodeStep):
    sin_signed: Tensor | None = None  # [1, D] at `position`: cat(-sin1, sin2), for rotate_row


class FastTransformer(Transformer, _Swapped):
    """Decode steps carry the signed sin for rotate_row; the mask's cast is skipped where it is a no-op."""

    def prepare(self) -> None:
        half = self.cfg.head_dim // 2
        sign = torch.ones(2, half, dtype=self.dtype, device=self.device)
        sign[0].neg_()
        # [-1 x D/2, +1 x D/2]: sin * sign = cat(-sin1, sin2) exactly
        self.register_buffer("rope_sign", sign.view(-1), persistent=False)

    def decode_step(self, position: Tensor, rows: Tensor) -> FastDecodeStep:
        cos, sin = self.cos_sin_at(position)
        mask = torch.where(rows <= position, 0.0, float("-inf"))  # fp32
        if self.dtype != torch.float32:
            mask = mask.to(self.dtype)
        return FastDecodeStep(position, mask.view(1, 1, 1, -1), cos, sin, sin * self.rope_sign)


# the subclass that replaces each reference class (exact types: a subclass is left alone)
_FAST: dict[type, type] = {
    DenseLinear: FastLinear,
    RMSNorm: FastRMSNorm,
    Projection: FastProjection,
    MLP: FastMLP,
    Attention: FastAttention,
    Block: FastBlock,
    Transformer: FastTransformer,
}
