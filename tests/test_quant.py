"""memcli.core.quant: quantized / dense base projections (CPU; bitsandbytes 0.50 runs NF4 and int8 here).

Error bounds are ~1.5x the value measured with the fixed seeds below (torch 2.13 CPU, bitsandbytes
0.50.2); each comment gives the measured figure(s) and the spread over 4 other seeds.  Relative
errors are against a float64 reference ``x @ W.T`` and include rounding ``x`` to the compute dtype.

No mode is skipped on the CPU: both bitsandbytes modes run there (pure-PyTorch fallbacks + native
CPU kernels).  A bitsandbytes test skips only if bitsandbytes is not installed at all.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from memcli.core import quant

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [(256, 512), (96, 64)]


def _weight(shape, seed=None):
    g = torch.Generator().manual_seed(shape[0] if seed is None else seed)
    w = torch.randn(*shape, generator=g) * 0.02  # Llama-like scale
    x = torch.randn(16, shape[1], generator=g)
    return w, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# (mode, compute dtype, bound).  Measured at the fixed seeds for [256, 512] / [96, 64]; "seeds" = range
# over 4 other seeds and both shapes.
ERROR_CASES = [
    ("fp32", F32, 3.7e-7),  # measured 2.37e-7 / 1.43e-7 (seeds 1.4e-7..2.4e-7): fp32 summation order only
    ("bf16", BF16, 4.5e-3),  # measured 2.77e-3 / 2.81e-3 (seeds 2.8e-3..3.0e-3): bf16 W and x
    ("fp16", F16, 5.5e-4),  # measured 3.53e-4 / 3.45e-4 (seeds 3.4e-4..3.7e-4)
    ("int8", F16, 1.65e-2),  # measured 1.08e-2 / 8.21e-3 (seeds 8.2e-3..1.08e-2): int8 W *and* int8 x
    ("int8", BF16, 1.65e-2),  # measured 1.10e-2 / 8.46e-3 (seeds 8.5e-3..1.10e-2)
    ("nf4", BF16, 1.35e-1),  # measured 8.97e-2 / 8.90e-2 (seeds 8.9e-2..9.7e-2)
    ("nf4", F16, 1.35e-1),  # measured 8.95e-2 / 8.86e-2 (seeds 8.9e-2..9.7e-2)
    ("nf4", F32, 1.35e-1),  # measured 8.96e-2 / 8.86e-2 (seeds 8.9e-2..9.7e-2)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode,cdtype,bound", ERROR_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_output_close_to_dense_matmul(mode, cdtype, bound, shape):
    w, x = _weight(shape)
    y = x.double() @ w.double().T
    lin = quant.make_linear(w, mode, "cpu", cdtype)
    yq = lin(x.to(cdtype))
    assert yq.dtype == cdtype and yq.shape == y.shape
    err = _rel(yq, y)
    print(f"{mode}/{cdtype} {shape}: rel err {err:.3e}")
    assert err < bound
    if mode in ("nf4", "int8"):
        assert err > 1e-3  # really quantized, not silently dense


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
@pytest.mark.parametrize("cdtype", [F32, BF16, F16], ids=str)
def test_output_dtype_is_compute_dtype(mode, cdtype):
    w, x = _weight((64, 128))
    lin = quant.make_linear(w, mode, "cpu", cdtype)
    assert lin(x.to(cdtype)).dtype == cdtype


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_batched_inputs(mode):
    """[batch, seq, in] (and 4-D, which bitsandbytes' Linear8bitLt alone cannot take) == row by row."""
    w, _ = _weight((96, 64))
    lin = quant.make_linear(w, mode, "cpu", BF16)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(BF16)
    y3 = lin(x)
    assert y3.shape == (2, 5, 96) and y3.dtype == BF16
    rows = torch.stack([lin(x[b]) for b in range(2)])
    # int8 quantizes activations per row, so row-by-row is the same computation; allow bf16 noise
    assert _rel(y3, rows) < 1e-2
    y4 = lin(x.reshape(1, 2, 5, 64))
    assert y4.shape == (1, 2, 5, 96)
    assert _rel(y4.reshape(2, 5, 96), y3) < 1e-2


def _nf4_expected_bytes(n: int) -> int:
    """4-bit codes, one u8 scale per 64-block, fp32 second-level scales per 256 blocks, the fp32
    offset, and the NF4 (16 x fp32) and 8-bit "dynamic" (256 x fp32) code tables."""
    blocks = -(-n // 64)
    nested_blocks = -(-blocks // 256)
    return (n + 1) // 2 + blocks + 4 * nested_blocks + 4 + 16 * 4 + 256 * 4


def test_weight_bytes_ratios_vs_fp32():
    w, x = _weight((256, 512))
    sizes = {m: quant.weight_bytes(quant.make_linear(w, m, "cpu", BF16)) for m in quant.QUANT_MODES}
    fp32 = sizes["fp32"]
    assert fp32 == 256 * 512 * 4
    assert sizes["bf16"] == sizes["fp16"] == fp32 // 2
    assert sizes["int8"] == 256 * 512 + 256 * 4  # int8 codes + one fp32 scale per row
    assert sizes["nf4"] == _nf4_expected_bytes(256 * 512)
    # 0.1311x (0.125 for the 4-bit codes + block scales + code tables); 0.2520x for int8
    assert 0.125 < sizes["nf4"] / fp32 < 0.135
    assert 0.25 < sizes["int8"] / fp32 < 0.255
    # the int8 state moves from the weight into module.state on the first call; same count after
    lin8 = quant.make_linear(w, "int8", "cpu", BF16)
    lin8(x.to(BF16))
    assert quant.weight_bytes(lin8) == sizes["int8"]


def test_describe_and_unknown_mode():
    for mode in quant.QUANT_MODES:
        line = quant.describe(mode)
        assert "\n" not in line and "bytes/param" in line
    w, _ = _weight((64, 64))
    for call in (
        lambda: quant.make_linear(w, "int4", "cpu", BF16),
        lambda: quant.describe("int4"),
        lambda: quant.check_mode_supported("int4", "cpu"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert "'int4'" in str(e.value) and "nf4, int8, bf16, fp16, fp32" in str(e.value)


def test_check_mode_supported():
    for mode in quant.QUANT_MODES:
        quant.check_mode_supported(mode, "cpu")
        quant.check_mode_supported(mode, torch.device("cpu"))
    with pytest.raises(ValueError, match="invalid device"):
        quant.check_mode_supported("nf4", "not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as e:
            quant.check_mode_supported("nf4", "cuda")
        assert "\n" not in str(e.value) and "not available" in str(e.value)


def test_make_linear_rejects_bad_inputs():
    w, _ = _weight((64, 64))
    with pytest.raises(ValueError, match="2-D float"):
        quant.make_linear(w[0], "bf16", "cpu", BF16)
    with pytest.raises(ValueError, match="compute_dtype"):
        quant.make_linear(w, "nf4", "cpu", torch.float64)


@pytest.mark.parametrize("shape", [(256, 512), (100, 96), (37, 50), (33, 7)], ids=str)
def test_chunked_conversion_is_bit_identical_to_bitsandbytes(shape, monkeypatch):
    """Our chunked quantization == bitsandbytes' own `Params4bit/Int8Params(w).to(device)` path.

    Chunks are forced tiny so that there are many, and NF4 blocks of 64 straddle rows for the
    odd widths (96, 50, 7).
    """
    monkeypatch.setattr(quant, "_MIN_CHUNK", 1)
    monkeypatch.setattr(quant, "_MAX_CHUNK", max(700, shape[0] * shape[1] // 16))
    assert quant._chunk_rows(shape[0], shape[1], 64) < shape[0] or shape == (33, 7)
    w, _ = _weight(shape)
    for cdtype in (BF16, F32):
        lin = quant.make_linear(w, "nf4", "cpu", cdtype)
        ref = bnb.nn.Params4bit(w.to(cdtype), requires_grad=False, quant_type="nf4", compress_statistics=True)
        ref = ref.to("cpu")  # bitsandbytes quantizes here (on the CPU as well)
        a, b = lin.weight.quant_state, ref.quant_state
        assert torch.equal(lin.weight.data, ref.data)
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.offset, b.offset)
        assert torch.equal(a.state2.absmax, b.state2.absmax) and torch.equal(a.code, b.code)
        assert (a.shape, a.dtype, a.blocksize, a.quant_type) == (b.shape, b.dtype, b.blocksize, b.quant_type)

        lin8 = quant.make_linear(w.to(cdtype), "int8", "cpu", cdtype)
        ref8 = bnb.nn.Int8Params(w.to(cdtype), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert torch.equal(lin8.weight.data, ref8.data) and torch.equal(lin8.weight.SCB, ref8.SCB)


def test_module_types_and_frozen_weights():
    w, _ = _weight((64, 128))
    nf4 = quant.make_linear(w, "nf4", "cpu", BF16)
    assert isinstance(nf4, bnb.nn.Linear4bit) and nf4.weight.quant_type == "nf4"
    assert nf4.weight.compress_statistics and nf4.compute_dtype == BF16
    int8 = quant.make_linear(w, "int8", "cpu", BF16)
    assert isinstance(int8, bnb.nn.Linear8bitLt) and int8.weight.dtype == torch.int8
    assert int8.state.threshold == 6.0 and not int8.state.has_fp16_weights
    for mode in ("bf16", "fp16", "fp32"):
        lin = quant.make_linear(w, mode, "cpu", BF16)
        assert isinstance(lin, nn.Linear) and lin.bias is None
        assert lin.weight.dtype == {"bf16": BF16, "fp16": F16, "fp32": F32}[mode]
    for lin in (nf4, int8, lin):
        assert not any(p.requires_grad for p in lin.parameters())
        assert not lin.training


def test_dense_modes_copy_once_or_adopt():
    w, _ = _weight((64, 128))
    w16 = w.to(BF16)
    adopted = quant.make_linear(w16, "bf16", "cpu", BF16)
    assert adopted.weight.data_ptr() == w16.data_ptr()  # same dtype/device, owns its storage: no copy
    view = torch.cat([w16, w16])[:64]  # a view into a larger buffer must not keep that buffer alive
    copied = quant.make_linear(view, "bf16", "cpu", BF16)
    assert copied.weight.data_ptr() != view.data_ptr()
    assert copied.weight.untyped_storage().nbytes() == 64 * 128 * 2
    conv = quant.make_linear(w, "bf16", "cpu", BF16)
    assert conv.weight.dtype == BF16 and torch.equal(conv.weight, w16)


@pytest.mark.parametrize("mode", ["nf4", "int8", "bf16"])
def test_result_does_not_keep_the_source_weight(mode):
    w, _ = _weight((64, 128))
    ref = weakref.ref(w)
    lin = quant.make_linear(w, mode, "cpu", BF16)
    del w
    gc.collect()
    assert ref() is None
    assert lin is not None


def test_dequantize():
    w, _ = _weight((256, 512))
    # dense: exact (up to the storage dtype)
    assert torch.equal(quant.dequantize(quant.make_linear(w, "fp32", "cpu", F32)), w)
    d = quant.dequantize(quant.make_linear(w, "nf4", "cpu", BF16))
    assert d.dtype == F32 and d.shape == w.shape
    assert 0.05 < _rel(d, w) < 0.14  # measured 9.2e-2: NF4 weight error
    d8 = quant.dequantize(quant.make_linear(w, "int8", "cpu", BF16))
    assert _rel(d8, w) < 1.2e-2  # measured 7.7e-3: per-row int8 weight error
    # and the module really multiplies by the dequantized weight
    x = torch.randn(8, 512).to(BF16)
    lin = quant.make_linear(w, "nf4", "cpu", BF16)
    assert _rel(lin(x), x.float() @ quant.dequantize(lin).T) < 5e-3  # measured 1.7e-3 (bf16 output)


def test_cpu_avx512bf16_repacked_layout_is_understood():
    """bitsandbytes repacks NF4 weights on the first eval forward on AVX512-BF16 CPUs.

    That CPU is not needed to test `dequantize`/`weight_bytes` on the repacked layout: apply the
    same (pure PyTorch) conversion the forward would.
    """
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repacking")
    w, _ = _weight((256, 512))
    lin = quant.make_linear(w, "nf4", "cpu", BF16)
    before = quant.dequantize(lin)
    lin.weight.data, lin.weight.quant_state = convert(lin.weight.data, lin.weight.quant_state)
    assert lin.weight.quant_state.packing_format_for_cpu
    after = quant.dequantize(lin)
    assert _rel(after, before) < 3e-3  # measured 2.0e-3: block scales become bf16, un-nested
    # codes unchanged, block scales now one bf16 each instead of one byte + second-level state
    assert quant.weight_bytes(lin) == 256 * 512 // 2 + (256 * 512 // 64) * 2 + 16 * 4 + 4


def test_cpu_repacking_only_where_it_is_safe():
    # the repacked kernel computes in bf16 and asserts out % 32 == 0: off for other dtypes/shapes
    w, _ = _weight((100, 96))
    assert not quant.make_linear(w, "nf4", "cpu", BF16).support_avx512bf16_for_cpu
    w, _ = _weight((256, 512))
    assert not quant.make_linear(w, "nf4", "cpu", F32).support_avx512bf16_for_cpu
    lin = quant.make_linear(w, "nf4", "cpu", BF16)
    assert lin.support_avx512bf16_for_cpu == bnb.functional.has_avx512bf16()


def test_int8_cast_warning_is_silenced(caplog):
    w, x = _weight((64, 128))
    lin = quant.make_linear(w, "int8", "cpu", BF16)
    with caplog.at_level(logging.WARNING):
        lin(x.to(BF16))
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


def test_merging_lora_into_nf4_loses_the_delta():
    """Why LoRA stays unmerged in 16-bit: Q(W + 2BA) - Q(W) is mostly NF4 rounding noise.

    Measured (rank 8, [256, 512], ||W|| rel. delta -> rel. error of the recovered delta, cosine):
      0.1 %: 17.0 (cos 0.06)   1 %: 4.89 (cos 0.20)   3 %: 2.69   10 %: 1.18 (cos 0.65)   30 %: 0.44
    The same adapter kept as bf16 B, A and applied on top: 2.4e-3 at every size.
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    a = torch.randn(8, 512, generator=g)
    b = torch.randn(256, 8, generator=g)
    q_w = quant.dequantize(quant.make_linear(w, "nf4", "cpu", BF16))
    errors = {}
    for frac in (0.01, 0.1):
        s = frac * w.norm() / (2 * b @ a).norm()
        delta = 2 * s * (b @ a)
        q_merged = quant.dequantize(quant.make_linear(w + delta, "nf4", "cpu", BF16))
        errors[frac] = _rel(q_merged - q_w, delta)
        unmerged = 2 * s * (b.to(BF16).float() @ a.to(BF16).float())
        assert _rel(unmerged, delta) < 4e-3  # measured 2.4e-3
    print(f"merged-into-NF4 LoRA delta rel. error: {errors}")
    assert errors[0.01] > 3.0  # measured 4.89: the delta is lost
    assert errors[0.1] > 0.8  # measured 1.18: even a large delta is mostly noise


# --------------------------------------------------------------------------- host memory


def _peak_rss_tools():
    status = Path("/proc/self/status")
    clear_refs = Path("/proc/self/clear_refs")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim
        clear_refs.write_text("5")  # resets VmHWM (peak RSS) to the current RSS; Linux >= 4.0
    except (OSError, AttributeError):
        pytest.skip("needs Linux /proc/self/clear_refs and glibc malloc_trim to measure peak RSS")

    def hwm() -> int:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        pytest.skip("no VmHWM in /proc/self/status")

    def measure(fn):
        gc.collect()
        libc.malloc_trim(0)  # hand freed heap back, so the peak measures new memory only
        clear_refs.write_text("5")
        base = hwm()
        result = fn()
        return hwm() - base, result

    return measure


@pytest.mark.parametrize("mode,src_dtype", [("nf4", F32), ("int8", BF16)], ids=["nf4-from-fp32", "int8-from-bf16"])
def test_conversion_peak_host_memory(mode, src_dtype):
    """Peak extra RSS while converting, *result included*, stays under ~one 16-bit copy of the weight.

    Measured for a [2048, 4096] weight, as a multiple of its 16-bit size: nf4 0.83x (from bf16) /
    0.94x (from fp32), int8 0.98x / 0.95x, of which the result itself is 0.26x (nf4) / 0.5x (int8).
    Tested for the worse source dtype of each.
    bitsandbytes' own `Params4bit(w).to("cpu")` / `Int8Params(w).to("cpu")`: ~7x / ~5x.
    """
    measure = _peak_rss_tools()
    quant.make_linear(torch.randn(64, 256), mode, "cpu", BF16)  # warm up lazy initialisation
    w = torch.empty(1024, 4096, dtype=src_dtype).normal_(0, 0.02)
    copy16 = w.numel() * 2
    extra, lin = measure(lambda: quant.make_linear(w, mode, "cpu", BF16))
    print(f"{mode} from {src_dtype}: peak extra {extra / copy16:.2f}x a 16-bit copy")
    assert extra < 1.35 * copy16
    assert quant.weight_bytes(lin) < copy16
