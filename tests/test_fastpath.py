"""memcli.core.fastpath against the reference model (memcli/core/model.py): the same values, fewer operator calls.

Bitwise where the pieces are bitwise on the installed BLAS (dense fp32 products at BLAS sizes, column
blocks, RMSNorm, rotate_row, every inject on the conformance fixtures); the fused decode step at
the fixtures' width 64 goes through torch's small-matrix loop, hence a tolerance there."""

import pytest
import torch
from torch.nn import functional as F

from memcli.core import fastpath
from memcli.core.engine import Engine
from memcli.loading.checkpoints import initial_state, load_model
from memcli.core.model import MLP, Block, Projection, RMSNorm, Transformer, apply_rotary
from memcli.core.quant import DenseLinear

from .support import fixture_checkpoint

QUESTION = torch.tensor([[40, 41, 42, 43, 44, 45, 46, 47]])
CONTEXT = torch.arange(100, 124)[None]
VARIANTS = ["memoryllm-8b-tiny", "mplus-8b-tiny", "memoryllm-7b-tiny", "memoryllm-8b-chat-tiny",
            "memoryllm-8b-tiny-nt24"]


@pytest.fixture
def load(monkeypatch):
    """load(variant, how): the loader's model with the fast path ("fast"), without fusing ("unfused")
    or without it ("reference")."""
    install = fastpath.install

    def load(variant, how="fast"):
        with monkeypatch.context() as patch:
            if how == "reference":
                patch.setattr(fastpath, "install", lambda model: model)
            elif how == "unfused":
                patch.setattr(fastpath, "install", lambda model: install(model, fuse=False))
            return load_model(fixture_checkpoint(variant))

    return load


def _projection(gen, out, inp, rank=4, adapter="a"):
    p = Projection(DenseLinear(torch.randn(out, inp, generator=gen), torch.float32), scale=2.0)
    p.add_adapter(adapter, torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen))
    return p


def test_install_swaps_classes_and_keeps_every_weight(load):
    fast, _ = load("memoryllm-8b-tiny")
    reference, _ = load("memoryllm-8b-tiny", "reference")
    assert type(reference) is Transformer and type(reference.layers[0]) is Block
    assert not any(type(m).__module__ == fastpath.__name__ for m in reference.modules())
    assert isinstance(fast, fastpath.FastTransformer) and isinstance(fast.layers[0], fastpath.FastBlock)
    assert isinstance(fast.layers[0].self_attn.q_proj.base, fastpath.FastLinear)
    assert isinstance(fast.lm_head, fastpath.FastLinear)
    # the same names and values: the binding and the converted copy see the reference model
    ref_sd, fast_sd = reference.state_dict(), fast.state_dict()
    assert ref_sd.keys() == fast_sd.keys()
    assert all(torch.equal(ref_sd[k], fast_sd[k]) for k in ref_sd)
    classes = [type(m) for m in fast.modules()]
    assert fastpath.install(fast) is fast and [type(m) for m in fast.modules()] == classes  # again: no-op


def test_fused_weights_are_views_and_the_state_dict_is_unchanged(load):
    model, _ = load("memoryllm-8b-tiny")
    layer = model.layers[0]
    names = set(model.state_dict())
    assert not any("qkv" in n or "gate_up" in n for n in names)  # the binding and converted copy see the parts
    q = layer.self_attn.q_proj.base.weight
    assert q.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
    assert torch.equal(layer.qkv.weight[: q.shape[0]], q)


def test_dense_products_are_bitwise_f_linear():
    """One torch.mm with the kept transposed view is F.linear's own kernel: the same bits, one row
    (a decode step) or many, 2-D or 3-D."""
    gen = torch.Generator().manual_seed(0)
    for out, inp in ((1024, 1024), (3584, 1024), (1024, 3584)):
        linear = DenseLinear(torch.randn(out, inp, generator=gen), torch.float32)
        fast = fastpath.install(DenseLinear(linear.weight, torch.float32))
        assert isinstance(fast, fastpath.FastLinear)
        for x in (torch.randn(1, inp, generator=gen), torch.randn(300, inp, generator=gen),
                  torch.randn(1, 77, inp, generator=gen)):
            assert torch.equal(fast(x), F.linear(x, linear.weight))
    bf16 = fastpath.install(DenseLinear(torch.randn(64, 48, generator=gen).bfloat16(), torch.float32))
    x = torch.randn(5, 48, generator=gen)  # another dtype than the weight's: cast, as DenseLinear does
    assert torch.equal(bf16(x), F.linear(x, bf16.weight.float()))


def test_rmsnorm_is_bitwise_the_reference():
    gen = torch.Generator().manual_seed(1)
    for dim, dtype in ((1024, torch.float32), (64, torch.float32), (1024, torch.bfloat16)):
        norm, fast = RMSNorm(dim, 1e-5), RMSNorm(dim, 1e-5)
        norm.weight.data = fast.weight.data = torch.randn(dim, generator=gen).to(dtype)
        fastpath.install(fast)
        assert isinstance(fast, fastpath.FastRMSNorm)
        for rows in (1, 513):
            x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
            assert torch.equal(fast(x), norm(x))


def test_rotate_row_is_bitwise_apply_rotary():
    gen = torch.Generator().manual_seed(2)
    for heads, d in ((24, 128), (6, 64)):
        x = torch.randn(1, heads, d, generator=gen)
        angles = torch.rand(1, d // 2, generator=gen) * 100
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        sign = torch.cat((-torch.ones(d // 2), torch.ones(d // 2)))
        expected = apply_rotary(x.view(1, heads, 1, d), cos, sin).view(1, heads, d)
        assert torch.equal(fastpath.rotate_row(x.clone(), cos, sin * sign), expected)


def test_column_blocked_projection_and_mlp_are_bitwise_the_whole_product():
    gen = torch.Generator().manual_seed(0)

    def whole(p, x):
        w, a, b = p.base.weight, p.lora_a["a"], p.lora_b["a"]
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * p.scale

    x = torch.randn(100, 48, generator=gen)  # long enough to be blocked, 1300 columns: 3 blocks
    gate = fastpath.install(_projection(gen, 1300, 48))
    assert isinstance(gate, fastpath.FastProjection) and len(fastpath._column_blocks(x, 1300)) == 3
    assert torch.equal(gate(x, "a"), whole(gate, x))
    mlp = MLP()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, _projection(gen, 1300, 48), _projection(gen, 48, 1300)
    expected = whole(mlp.down_proj, F.silu(whole(gate, x)) * whole(mlp.up_proj, x))
    reference = mlp(x, "a")  # the reference MLP (its parts' classes are what install swaps)
    assert torch.equal(reference, expected)
    fastpath.install(mlp)
    assert isinstance(mlp, fastpath.FastMLP) and isinstance(mlp.up_proj, fastpath.FastProjection)
    assert torch.equal(mlp(x, "a"), expected)
    assert torch.equal(mlp(x[None], "a")[0], expected)


def test_fused_projection_is_bitwise_the_separate_projections():
    """q|k|v and gate|up as one product (decode steps): the same bits as each projection alone, at
    the widths where BLAS, not torch's small-matrix loop, does the work (1024 / 256 columns, rank
    16, as the medium benchmark model), and the parts keep working on views of the fused weight."""
    gen = torch.Generator().manual_seed(0)
    for widths in ((1024, 256, 256), (3584, 3584)):
        parts = [_projection(gen, w, 1024, rank=16, adapter="decoder") for w in widths]
        row = torch.randn(1, 1024, generator=gen)
        expected = [p(row, "decoder") for p in parts]  # the reference projections
        fused = fastpath.FusedProjection(parts, "decoder")
        storage = fused.weight.untyped_storage().data_ptr()
        assert all(p.base.weight.untyped_storage().data_ptr() == storage for p in parts)
        assert torch.equal(fused(row), torch.cat(expected, dim=1))
        assert all(torch.equal(p(row, "decoder"), e) for p, e in zip(parts, expected))  # parts on views: unchanged
        for p in parts:
            fastpath.install(p)
        assert all(torch.equal(p(row, "decoder"), e) for p, e in zip(parts, expected))  # fast parts on views too


def _decode(model, reader, tokens=12):
    """The state after one inject, its greedy answer (with step logits) and the operator calls of
    10 decode steps."""
    from torch.profiler import ProfilerActivity, profile

    state = initial_state(reader, model.cfg, seed=0)
    engine = Engine(model)
    engine.update(state, engine.inject(state, CONTEXT))
    calls = []
    for n in (2, tokens):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            answer = engine.generate(state, QUESTION, n, keep_logits=True)
        calls.append(len(prof.events()))
    return answer, calls[1] - calls[0]


@pytest.mark.parametrize("variant", ["memoryllm-8b-tiny", "mplus-8b-tiny", "memoryllm-7b-tiny"])
def test_fused_decode_step_answers_as_the_reference(variant, load):
    fast, reader = load(variant)
    assert all(isinstance(layer, fastpath.FastBlock) for layer in fast.layers)
    fused, fused_calls = _decode(fast, reader)
    unfused, unfused_calls = _decode(*load(variant, "unfused"))
    reference, reference_calls = _decode(*load(variant, "reference"))
    assert fused.tokens == unfused.tokens == reference.tokens
    # the unfused fast step is the reference arithmetic; the fused one is bitwise at BLAS sizes
    # (the test above), these tiny widths go through torch's small bmm loop (measured: equal here)
    assert torch.equal(unfused.step_logits, reference.step_logits)
    torch.testing.assert_close(fused.step_logits, reference.step_logits, rtol=1e-5, atol=1e-5)
    # the point of it: fewer operator calls per step (counted, not timed)
    assert fused_calls < 0.85 * unfused_calls and unfused_calls < 0.6 * reference_calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_injects_and_answers_are_bitwise_with_and_without_the_fast_path(variant, load):
    """Memory after injects (every layer, M+'s long-term rows too), the logits of a question and the
    greedy tokens: the same bits with the fast path installed as with the reference model."""
    results = []
    for how in ("fast", "reference"):
        model, reader = load(variant, how)
        engine = Engine(model)
        state = initial_state(reader, model.cfg, seed=0)
        for step in range(3):
            engine.update(state, engine.inject(state, CONTEXT + 7 * step), origin=step)
        logits, _ = engine.logits(state, QUESTION)
        results.append((state, logits, engine.generate(state, QUESTION, 8).tokens))
    (fast, fast_logits, fast_tokens), (ref, ref_logits, ref_tokens) = results
    assert torch.equal(fast.slots, ref.slots) and torch.equal(fast.order, ref.order)
    if ref.ltm is not None:
        n = ref.ltm.size
        assert fast.ltm.size == n > 0
        assert torch.equal(fast.ltm.rows[:, :n], ref.ltm.rows[:, :n])
        assert torch.equal(fast.ltm.keys[:, :n], ref.ltm.keys[:, :n])
    assert torch.equal(fast_logits, ref_logits)
    assert fast_tokens == ref_tokens


def test_quantized_bases_keep_their_modules_and_skip_fusing():
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_model(fixture_checkpoint("memoryllm-8b-tiny"), quant="int8")
    layer = model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base, bnb.nn.Linear8bitLt)  # not swapped
    assert isinstance(layer.self_attn.q_proj, fastpath.FastProjection)  # its LoRA terms are
    assert type(layer) is Block and not hasattr(layer, "qkv")  # decode steps: layer by projection
    assert isinstance(model.lm_head, fastpath.FastLinear)  # lm_head stays 16/32-bit


def test_the_reference_decode_step_compiles(load):
    """model.py alone is what the compiler sees best (gpt-fast's way): its decode step compiles with
    no fallback and answers what the eager fast path answers."""
    model, reader = load("memoryllm-8b-tiny", "reference")
    state = initial_state(reader, model.cfg, seed=0)
    expected = Engine(load("memoryllm-8b-tiny")[0]).generate(state, QUESTION, 6, keep_logits=True)
    engine = Engine(model, compile_decode=True)
    got = engine.generate(state, QUESTION, 6, keep_logits=True)
    assert engine.compiled and got.tokens == expected.tokens
    torch.testing.assert_close(got.step_logits, expected.step_logits, rtol=1e-4, atol=1e-4)
