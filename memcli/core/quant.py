"""Base-weight storage for the Llama projections: NF4 / int8 (bitsandbytes) or dense bf16 / fp16 / fp32.

Every projection of the model is built here by `make_linear(weight, mode, device, compute_dtype)` and
called as `linear(x)`, computing ``x @ W.T`` (no bias) with ``x`` and the result in ``compute_dtype``.

Modes
-----
``nf4``   bitsandbytes ``Linear4bit``: NF4 codes in blocks of 64 with double-quantized block scales
          (``compress_statistics=True``), ~0.52 bytes/param.  The weight is dequantized to
          ``compute_dtype`` on every call and multiplied there.
``int8``  bitsandbytes ``Linear8bitLt`` (LLM.int8(), ``has_fp16_weights=False``, outlier threshold 6.0):
          int8 rows with one fp32 absmax per row, ~1 byte/param.  Activations are quantized per row
          through fp16; input columns holding a value >= 6.0 go through an fp16 matmul instead.
``bf16`` / ``fp16`` / ``fp32``   an ``nn.Linear(bias=False)`` (`DenseLinear`) holding the weight in that
          dtype; if that is not ``compute_dtype``, the weight is cast for each call.

Why LoRA stays 16-bit on top of the quantized base
--------------------------------------------------
MemoryLLM-8B / M+ carry *two* LoRA adapters on q/k/v/gate/up/down ("encoder" for injection,
"decoder" for everything else), and a single forward uses one or the other.  Merging them into the
base weights would need two quantized copies of those six projections per layer (one merged with
each adapter), i.e. about twice the quantized weight memory -- the very thing quantization is for.
Worse, re-quantizing a merged weight ``W + s*B@A`` under NF4 does not preserve the adapter: the
rounding error of NF4 (~9 % of ||W|| for Gaussian-like weights) is an order of magnitude larger than
a typical LoRA delta, so ``Q(W + s*B@A) - Q(W)`` is mostly rounding noise, not ``s*B@A``
(``tests/test_quant.py::test_merging_lora_into_nf4_loses_the_delta``, rank-8 delta on a [256, 512]
weight: the recovered delta has a relative error of ~4.9 (490 %) when ||delta|| = 1 % of ||W||, and
still ~1.2 at 10 %; the same adapter kept unmerged in bf16 is off by ~2.4e-3).  So the base stays
quantized and unmerged, and the model adds ``scale * B (A x)`` in 16-bit on top (`memcli.core.model.Projection`);
that costs two small matmuls per projection and keeps the adapters exact.

Conversion and host memory
--------------------------
Checkpoints are streamed one tensor at a time, so `make_linear` never holds more than a slice of a
converted copy.  bitsandbytes' own "quantize on ``.to(device)``" path materialises the whole weight
in 16-bit and, on the CPU, the pure-PyTorch quantizer then allocates several fp32/int32 temporaries
of the full size (measured with bitsandbytes 0.50.2 on a 32M-param bf16 weight: peak extra host
memory ~7x a 16-bit copy of the weight for NF4, ~5x for int8).  Here the rows are instead converted
and quantized in chunks of at most max(n/32, 32K) and at most 256K elements, each chunk moved to
``device`` first and quantized there by the same bitsandbytes kernels, and the pieces written into
preallocated storage: peak extra host memory, the result included, stays below one 16-bit copy
(~0.4-1.0x measured, 1M..58M-param weights).  NF4 blocks run over the flattened weight, so chunk
boundaries are kept on 64-element block boundaries and the double quantization of the block scales
is done once over all of them, exactly as ``bitsandbytes.functional.quantize_4bit`` does; the result
is bit-identical to ``Params4bit(w).to(device)`` / ``Int8Params(w).to(device)`` (tested on the CPU;
on CUDA the same code calls bitsandbytes' CUDA kernels, chunk by chunk).

bitsandbytes on the CPU (0.50)
------------------------------
Both modes run on the CPU: quantization and dequantization use pure-PyTorch fallbacks (plus native
CPU kernels where the library has them).  Things worth knowing:
  - ``Linear4bit`` on a CPU with AVX512-BF16 repacks its weight on the first eval-mode forward into a
    layout for a fused bf16 kernel, which computes in bf16 whatever ``compute_dtype`` is and asserts
    ``out_features % 32 == 0``.  We turn that repacking off unless ``compute_dtype`` is bf16 and the
    shape fits; `dequantize` / `weight_bytes` understand the repacked layout either way.
  - ``Linear8bitLt`` on the CPU takes a different path in training mode (dequantize the whole weight,
    fp matmul, no activation quantization) from eval mode (LLM.int8()); modules are returned in eval
    mode, so the CPU numerics match the CUDA ones.  Without AVX512 the int8 matmul itself is emulated
    in fp32, so on the CPU int8 saves memory at rest but is not faster.
  - bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on *every* int8 call
    with non-fp16 inputs; that is inherent to LLM.int8() and is filtered out here.
"""

from __future__ import annotations

import functools
import logging
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from memcli.base.text import one_line

QUANT_MODES = ("nf4", "int8", "bf16", "fp16", "fp32")

_DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size
_NESTED_BLOCKSIZE = 256  # block size bitsandbytes uses to double-quantize the 4-bit block scales
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (on activations)

# Row-chunking of the conversion: a chunk is at most max(n // 32, _MIN_CHUNK) and at most _MAX_CHUNK
# elements.  The CPU quantizers allocate ~15 (NF4) / ~13 (int8) bytes of fp32/int32 temporaries per
# chunk element (peak RSS shows about twice that, allocator slack included).
_MIN_CHUNK = 1 << 15
_MAX_CHUNK = 1 << 18

_DESCRIPTIONS = {
    "nf4": "NF4 4-bit (bitsandbytes, blocks of 64, double-quantized scales), ~0.52 bytes/param",
    "int8": "LLM.int8() 8-bit (bitsandbytes, per-row scales, outlier threshold 6.0), ~1.0 bytes/param",
    "bf16": "bfloat16 dense (torch), 2 bytes/param",
    "fp16": "float16 dense (torch), 2 bytes/param",
    "fp32": "float32 dense (torch), 4 bytes/param",
}


def _check_mode_name(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of: {', '.join(QUANT_MODES)}")


def _as_device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None


def describe(mode: str) -> str:
    """One line for `memcli doctor`."""
    _check_mode_name(mode)
    return _DESCRIPTIONS[mode]


# --------------------------------------------------------------------------- bitsandbytes access


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


@functools.cache
def _bnb():
    """Import bitsandbytes once (lazily: the dense modes must not need it)."""
    import bitsandbytes

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastWarning())
    return bitsandbytes


def _bnb_unavailable_reason(device: torch.device) -> str | None:
    try:
        bnb = _bnb()
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"bitsandbytes is not importable ({first_line(e)})"
    supported = getattr(bnb, "supported_torch_devices", {"cpu", "cuda"})
    if device.type not in supported:
        return f"bitsandbytes {bnb.__version__} has no backend for device type {device.type!r}"
    if device.type == "cuda":
        try:
            from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
        except ImportError:
            return None
        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
            msg = (getattr(lib, "error_msg", "") or "unknown error").strip().splitlines()[0][:160]
            return f"bitsandbytes {bnb.__version__} could not load its CUDA library ({msg})"
    return None


@functools.lru_cache(maxsize=None)
def _probe(mode: str, device_str: str) -> str | None:
    """Build and run a tiny layer of this mode on the device; the reason it failed, or None."""
    device = torch.device(device_str)
    reason = _bnb_unavailable_reason(device)
    if reason:
        return reason
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    try:
        w = torch.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64)
        lin = _build(w, mode, device, dtype)
        with torch.no_grad():
            y = lin(torch.ones(2, 64, device=device, dtype=dtype))
        if y.shape != (2, 64) or not torch.isfinite(y).all():
            return f"bitsandbytes {mode} produced an invalid result on {device}"
    except Exception as e:
        return f"bitsandbytes {mode} does not run on {device} ({first_line(e)})"
    return None


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception of a library as one line for a user, "Type: the first line of its message",
    made safe and cut at `limit` by memcli's one sanitizer (memcli.base.text.one_line)."""
    lines = str(e).strip().splitlines()
    return one_line(f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__, limit)


def check_mode_supported(mode: str, device: torch.device | str) -> None:
    """Raise ValueError with a one-line reason if `mode` cannot run on `device`."""
    _check_mode_name(mode)
    dev = _as_device(device)
    if dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if backend is None or (callable(is_available) and not is_available()):
            raise ValueError(
                f"{mode}: device type {dev.type!r} is not available to this PyTorch ({torch.__version__})"
            )
    if mode in _DENSE_DTYPES:
        return
    reason = _probe(mode, str(dev))
    if reason:
        raise ValueError(f"{mode} is not available on {dev}: {reason}")


# --------------------------------------------------------------------------- building modules


class DenseLinear(nn.Linear):
    """``nn.Linear(bias=False)`` over a frozen weight; computes in the input's dtype.

    With storage dtype == compute dtype (the usual case) this is exactly ``F.linear(x, W)``; otherwise
    the weight is cast to the input's dtype for the call.
    """

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.linear(x, w)


def _owns_its_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _make_dense(weight: torch.Tensor, dtype: torch.dtype, device: torch.device, compute_dtype) -> nn.Module:
    w = weight.detach()
    if w.dtype == dtype and w.device == device and _owns_its_storage(w):
        data = w  # already what we want: adopt it, no copy at all
    else:
        data = torch.empty(w.shape, dtype=dtype, device=device)
        data.copy_(w)  # converts (and transfers) in one go; nothing else is kept
    del w
    return DenseLinear(data, compute_dtype)


def _chunk_rows(rows: int, cols: int, align_elems: int = 1) -> int:
    """Rows per conversion chunk; rows * cols is a multiple of align_elems."""
    n = rows * cols
    target = min(max(n // 32, _MIN_CHUNK), _MAX_CHUNK)
    step = align_elems // math.gcd(cols, align_elems)  # rows per aligned unit
    r = max(step, (target // max(cols, 1)) // step * step)
    return min(r, rows)


def _make_nf4(weight: torch.Tensor, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    bf = bnb.functional
    out_f, in_f = weight.shape
    n = weight.numel()
    bs = NF4_BLOCKSIZE

    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = None
    step = _chunk_rows(out_f, in_f, align_elems=bs)
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        chunk = weight[r0:r1].to(device=device, dtype=compute_dtype)
        q, st = bf.quantize_4bit(
            chunk, blocksize=bs, compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8
        )
        del chunk
        if absmax is None:
            absmax = torch.empty(-(-n // bs), dtype=st.absmax.dtype, device=device)
        e0 = r0 * in_f  # a multiple of bs (hence even) by construction
        packed[e0 // 2 : e0 // 2 + q.shape[0]].copy_(q.view(-1, 1))
        absmax[e0 // bs : e0 // bs + st.absmax.numel()].copy_(st.absmax)
        del q, st

    # Double quantization of the block scales, as bitsandbytes.functional.quantize_4bit does it.
    offset = absmax.mean()
    qabsmax, state2 = bf.quantize_blockwise(absmax - offset, blocksize=_NESTED_BLOCKSIZE)
    del absmax
    return _nf4_module(packed, qabsmax, offset, state2.absmax, state2.code, (out_f, in_f), device, compute_dtype)


def _nf4_module(packed, qabsmax, offset, absmax2, code2, shape, device: torch.device, compute_dtype) -> nn.Module:
    """A Linear4bit around already-quantized data (fresh from `_make_nf4`, or from a converted cache)."""
    bnb = _bnb()
    bf = bnb.functional
    bs = NF4_BLOCKSIZE
    out_f, in_f = shape
    state2 = bf.QuantState(absmax=absmax2, code=code2, blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32)
    qs = bf.QuantState(
        absmax=qabsmax,
        shape=torch.Size((out_f, in_f)),
        code=bf.get_4bit_type("nf4", device=device),
        blocksize=bs,
        quant_type="nf4",
        dtype=compute_dtype,
        offset=offset,
        state2=state2,
    )

    lin = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",  # no throw-away fp32 init of the full weight
    )
    lin.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=qs,
        blocksize=bs,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=lin,
        bnb_quantized=True,
    )
    lin.quant_state = qs
    if device.type == "cpu" and not (
        compute_dtype == torch.bfloat16 and out_f % 32 == 0 and in_f % bs == 0
    ):
        # see the module docstring: the AVX512-BF16 repacking computes in bf16 and needs these shapes
        lin.support_avx512bf16_for_cpu = False
    return lin


@functools.cache
def _int8_linear_class():
    bnb = _bnb()

    class Int8Linear(bnb.nn.Linear8bitLt):
        """Linear8bitLt that also takes inputs of any rank (bitsandbytes handles only 2-D and 3-D)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 2:
                return super().forward(x)
            lead = x.shape[:-1]
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_features)

    return Int8Linear


def _make_int8(weight: torch.Tensor, device: torch.device) -> nn.Module:
    bnb = _bnb()
    out_f, in_f = weight.shape
    cb = torch.empty((out_f, in_f), dtype=torch.int8, device=device)
    scb = None
    step = _chunk_rows(out_f, in_f)
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        chunk = weight[r0:r1].to(device=device, dtype=torch.float16)  # as Int8Params._quantize does
        q, s, _ = bnb.functional.int8_vectorwise_quant(chunk)
        del chunk
        if scb is None:
            scb = torch.empty(out_f, dtype=s.dtype, device=device)
        cb[r0:r1].copy_(q)
        scb[r0:r1].copy_(s)
        del q, s

    return _int8_module(cb, scb)


def _int8_module(cb: torch.Tensor, scb: torch.Tensor) -> nn.Module:
    """A Linear8bitLt around already-quantized rows and their scales."""
    bnb = _bnb()
    out_f, in_f = cb.shape
    lin = _int8_linear_class()(
        in_f, out_f, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
    )
    lin.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    return lin


# --------------------------------------------------------------------------- converted copies


def linear_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Everything needed to rebuild a module made by `make_linear` without converting again
    (for the converted-weights cache). Call it before the first forward: bitsandbytes may repack
    CPU 4-bit weights on first use."""
    if _is_linear4bit(module):
        qs = module.weight.quant_state
        return {
            "packed": module.weight.data,
            "absmax": qs.absmax,
            "offset": qs.offset.reshape(1),
            "absmax2": qs.state2.absmax,
            "code2": qs.state2.code,
            "shape": torch.tensor(list(qs.shape)),
        }
    if _is_linear8bit(module):
        return {"cb": module.weight.data, "scb": _int8_scales(module)}
    return {"weight": module.weight.data}


def linear_from_state(tensors: dict[str, torch.Tensor], mode: str, device: torch.device | str,
                      compute_dtype: torch.dtype) -> nn.Module:
    """The inverse of `linear_state`."""
    dev = _as_device(device)
    t = {name: value.to(dev) for name, value in tensors.items()}
    with torch.no_grad():
        if mode == "nf4":
            lin = _nf4_module(t["packed"], t["absmax"], t["offset"].reshape(()), t["absmax2"], t["code2"],
                              tuple(tensors["shape"].tolist()), dev, compute_dtype)
        elif mode == "int8":
            lin = _int8_module(t["cb"], t["scb"])
        else:
            lin = DenseLinear(t["weight"].to(_DENSE_DTYPES[mode]), compute_dtype)
    return lin.eval()


def _build(weight: torch.Tensor, mode: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    if mode in _DENSE_DTYPES:
        lin = _make_dense(weight, _DENSE_DTYPES[mode], device, compute_dtype)
    elif mode == "nf4":
        lin = _make_nf4(weight, device, compute_dtype)
    else:
        lin = _make_int8(weight, device)
    # Frozen inference weights.  Eval mode also picks bitsandbytes' inference paths on the CPU.
    return lin.eval()


def make_linear(
    weight: torch.Tensor, mode: str, device: torch.device | str, compute_dtype: torch.dtype
) -> nn.Module:
    """A module on `device` computing ``x @ weight.T`` (x and result in `compute_dtype`), stored per `mode`.

    `weight` is a dense [out, in] float tensor (normally on the CPU, streamed from a checkpoint); it is
    read chunk by chunk and not referenced by the result unless it could be adopted as-is (dense mode,
    same dtype and device, owning its storage).  The caller may drop it right after this returns.
    """
    _check_mode_name(mode)
    dev = _as_device(device)
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of float32, bfloat16, float16, not {compute_dtype}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight [out, in], got {tuple(weight.shape)} {weight.dtype}")
    check_mode_supported(mode, dev)
    with torch.no_grad():
        return _build(weight, mode, dev, compute_dtype)


# --------------------------------------------------------------------------- inspection


def _bnb_if_loaded():
    """bitsandbytes if it has been imported (a module can only be a bitsandbytes one if it has)."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        return _bnb()
    except Exception:
        return None


def _is_linear4bit(module: nn.Module) -> bool:
    bnb = _bnb_if_loaded()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_linear8bit(module: nn.Module) -> bool:
    bnb = _bnb_if_loaded()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def _int8_scales(module: nn.Module) -> torch.Tensor:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:  # moved into module.state by the first forward
        scb = module.state.SCB
    return scb


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = []
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, "__dict__", {}).get(name)
        if isinstance(t, torch.Tensor):
            out.append(t)
    state2 = qs.__dict__.get("state2")
    if state2 is not None:
        out.extend(_quant_state_tensors(state2))
    return out


def _nbytes_unique(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights occupy, including quantization statistics and code tables."""
    if _is_linear4bit(module):
        return _nbytes_unique([module.weight.data, *_quant_state_tensors(module.weight.quant_state)])
    if _is_linear8bit(module):
        return _nbytes_unique([module.weight.data, _int8_scales(module)])
    return _nbytes_unique([*module.parameters(), *module.buffers()])


def _unpack_cpu_packed_nf4(data: torch.Tensor, qs) -> torch.Tensor:
    """Dense fp32 weight from bitsandbytes' AVX512-BF16 CPU layout (see _convert_weight_packed_for_cpu)."""
    n_out, n_in = qs.shape
    block_n = 32
    packed = data.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # the 64 codes of one packed row
    codes = codes.reshape(n_out // block_n, n_in // 2, block_n, 2).transpose(1, 2).reshape(n_out, n_in)
    values = qs.code.float()[codes.long()]
    scales = qs.absmax.float().T.repeat_interleave(qs.blocksize, dim=1)  # [n_out, n_in]
    return values * scales


def dequantize(module: nn.Module) -> torch.Tensor:
    """The effective dense weight [out, in] the module multiplies by, as a new float32 tensor."""
    with torch.no_grad():
        if _is_linear4bit(module):
            qs = module.weight.quant_state
            if getattr(qs, "packing_format_for_cpu", False):
                return _unpack_cpu_packed_nf4(module.weight.data, qs)
            bf = _bnb().functional
            return bf.dequantize_4bit(module.weight.data, qs).float()  # in qs.dtype == compute dtype, as used
        if _is_linear8bit(module):
            cb = module.weight.data
            return cb.float() * (_int8_scales(module).float() / 127.0).unsqueeze(1)
        if isinstance(module, nn.Linear):
            return module.weight.detach().float().clone()
    raise TypeError(f"dequantize: unsupported module {type(module).__name__}")
