"""The CUDA subset (run by benchmarks/gpu.sh on the GPU machine; skipped without a GPU): the engine
on CUDA against the CPU fp32 engine on the conformance fixtures, NF4 and int8, M+ with its long-term
memory, pools in pinned host memory as the CLI keeps them, and the compiled decode step."""

import pytest
import torch

from memcli.core.engine import Engine
from memcli.loading.checkpoints import initial_state, load_model

from .support import fixture_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUESTION = torch.tensor([[40, 41, 42, 43, 44, 45, 46, 47]])
CONTEXT = torch.arange(100, 124)[None]
VARIANTS = ["memoryllm-8b-tiny", "mplus-8b-tiny", "memoryllm-7b-tiny"]


@pytest.fixture(autouse=True)
def exact_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _pair(variant, steps, pinned, **options):
    """(cpu engine, cpu state), (cuda engine, cuda-side state) after the same `steps` updates."""
    folder = fixture_checkpoint(variant)
    cpu_model, reader = load_model(folder)
    gpu_model, _ = load_model(folder, device="cuda", **options)
    dtype = options.get("dtype", torch.float32)
    cpu, gpu = Engine(cpu_model), Engine(gpu_model)
    a = initial_state(reader, cpu_model.cfg, seed=3)
    b = initial_state(reader, gpu_model.cfg, dtype=dtype, seed=3, device="cpu" if pinned else "cuda")
    if pinned:
        b.slots = b.slots.pin_memory()
    for step in range(steps):
        kept = cpu.choose_kept(a)
        cpu.update(a, cpu.inject(a, CONTEXT + step), kept=kept)
        gpu.update(b, gpu.inject(b, (CONTEXT + step).cuda()), kept=kept)
        b.dirty = None  # as a commit does: nothing here is saved
    return (cpu, a), (gpu, b)


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_fp32_matches_cpu_fp32(variant, pinned):
    steps = 8 if variant.startswith("mplus") else 3  # M+: past a long-term merge
    (cpu, a), (gpu, b) = _pair(variant, steps, pinned)
    torch.testing.assert_close(b.memory().cpu(), a.memory(), rtol=1e-4, atol=1e-4)
    la, ra = cpu.logits(a, QUESTION, record=True)
    lb, rb = gpu.logits(b, QUESTION.cuda(), record=True)
    torch.testing.assert_close(lb.cpu(), la, rtol=1e-3, atol=1e-3)
    assert [r.order.tolist() for r in ra] == [r.order.tolist() for r in rb]
    ga = cpu.generate(a, QUESTION, 12)
    gb = gpu.generate(b, QUESTION.cuda(), 12)
    assert ga.tokens == gb.tokens


@pytest.mark.parametrize("quant,min_agree", [("nf4", 0.4), ("int8", 0.8)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_quantized_against_cpu_fp32(variant, quant, min_agree):
    (cpu, a), (gpu, b) = _pair(variant, 2, True, quant=quant, dtype=torch.bfloat16)
    seq = torch.cat((QUESTION[0], torch.tensor(cpu.generate(a, QUESTION, 16).tokens)))[None]
    la, chosen = cpu.logits(a, seq, record=True)
    forced = [r.order for r in chosen] if chosen else None
    lb, _ = gpu.logits(b, seq.cuda(), ltm_order=forced)
    t = QUESTION.shape[1]
    agree = (la[t - 1 : -1].argmax(-1) == lb.cpu()[t - 1 : -1].argmax(-1)).float().mean().item()
    assert torch.isfinite(lb).all() and agree >= min_agree


def test_cuda_compiled_decode_matches_eager():
    """CUDA graphs replay the same step: the same tokens every time, the eager step's logits."""
    folder = fixture_checkpoint("memoryllm-8b-chat-tiny")
    model, reader = load_model(folder, device="cuda")
    state = initial_state(reader, model.cfg, seed=0)
    state.slots = state.slots.pin_memory()
    eager = Engine(model).generate(state, QUESTION.cuda(), 16, keep_logits=True)
    compiled = Engine(model, compile_decode=True)
    first = compiled.generate(state, QUESTION.cuda(), 16, keep_logits=True)
    second = compiled.generate(state, QUESTION.cuda(), 16, keep_logits=True)
    assert compiled.compiled, "the compiled step fell back to eager"
    assert first.tokens == second.tokens
    # logits are comparable up to the first step where the chosen tokens differ (same prefix)
    same = [a == b for a, b in zip(first.tokens, eager.tokens)]
    n = same.index(False) + 1 if False in same else len(same)
    torch.testing.assert_close(first.step_logits[:n].cpu(), eager.step_logits[:n].cpu(), rtol=1e-3, atol=1e-3)
