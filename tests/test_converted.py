"""The converted-weights cache: written after a first load, read by the next, rebuilt when stale or damaged."""

import os
import shutil

import pytest
import torch

from memcli.loading import converted
from memcli.core import quant
from memcli.core.engine import Engine
from memcli.loading.checkpoints import initial_state, load_model

from .support import fixture_checkpoint

QUESTION = torch.tensor([[40, 41, 42, 43, 44, 45]])


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(fixture_checkpoint("mplus-8b-tiny"), folder)
    return folder


def _logits(folder, **options):
    model, reader = load_model(folder, **options)
    state = initial_state(reader, model.cfg, seed=0)
    return Engine(model).logits(state, QUESTION)[0]


def _entries():
    root = converted.entry("x").parent
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


@pytest.mark.parametrize("mode,dtype", [("nf4", torch.float32), ("int8", torch.float32), ("bf16", torch.bfloat16)])
def test_second_load_reads_the_converted_copy(checkpoint, monkeypatch, mode, dtype):
    first = _logits(checkpoint, quant=mode, dtype=dtype)
    assert len(_entries()) == 1
    monkeypatch.setattr(quant, "make_linear", lambda *a, **k: pytest.fail("converted again"))
    second = _logits(checkpoint, quant=mode, dtype=dtype)
    # the weights are the same bytes (next test); bitsandbytes' CPU kernels may take another
    # vectorised path for differently aligned buffers, hence a 1e-5 tolerance and not equality
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)


def test_converted_weights_are_the_same_bytes(checkpoint):
    fresh, _ = load_model(checkpoint, quant="nf4")
    cached, _ = load_model(checkpoint, quant="nf4")
    pairs = [(a, b) for a, b in zip(fresh.modules(), cached.modules()) if hasattr(a, "weight")]
    assert pairs
    for a, b in pairs:
        sa, sb = quant.linear_state(a), quant.linear_state(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fp32_needs_no_copy(checkpoint):
    _logits(checkpoint)
    assert _entries() == []


def test_damaged_or_stale_copies_are_rebuilt(checkpoint):
    first = _logits(checkpoint, quant="nf4")
    (entry,) = _entries()
    weights = entry / converted.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    torch.testing.assert_close(_logits(checkpoint, quant="nf4"), first, rtol=1e-5, atol=1e-5)  # rebuilt
    assert converted.read(entry.name) is not None
    shard = checkpoint / "model.safetensors"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the checkpoint changed
    _logits(checkpoint, quant="nf4")
    assert len(_entries()) == 2
    assert converted.clear() > 0 and _entries() == []


def test_start_checks_size_and_mtime_and_doctor_hashes(checkpoint, monkeypatch):
    """A start does not hash the copy (6 GB at 8B); a change that keeps size and mtime is caught by
    `converted.verify()` (what `memcli doctor` runs); a changed mtime triggers the hash at start."""
    _logits(checkpoint, quant="nf4")
    (entry,) = _entries()
    weights = entry / converted.WEIGHTS
    hashed = []
    real_sha = converted._sha256
    monkeypatch.setattr(converted, "_sha256", lambda path: hashed.append(path) or real_sha(path))
    assert converted.open_entry(entry.name) is not None and hashed == []
    info = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert converted.verify() == [(entry, False)]
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    hashed.clear()
    assert converted.open_entry(entry.name) is None and hashed == [weights]


def test_doctor_reports_a_damaged_copy(checkpoint):
    """`memcli doctor` (diagnose) runs the full hash and names the damaged copy as a problem."""
    from memcli.app.doctor import diagnose
    from memcli.app.settings import Settings

    _logits(checkpoint, quant="nf4")
    (entry,) = _entries()
    assert diagnose(Settings(device="cpu"))["converted"] == [{"folder": str(entry), "ok": True}]
    weights = entry / converted.WEIGHTS
    info = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))  # size and mtime as they were
    report = diagnose(Settings(device="cpu"))
    assert report["converted"] == [{"folder": str(entry), "ok": False}]
    assert any(str(entry) in problem and "damaged" in problem for problem in report["problems"])
