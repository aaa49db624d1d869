"""The loader's plan of every tensor (name, shape, dtype) equals the real checkpoints' layouts."""

import json

import pytest
import torch

from memcli.core.config import ConfigError, detect_family, parse_config
from memcli.loading.checkpoints import CheckpointError, CheckpointReader, check_plan, weight_plan

from .support import CONFORMANCE, REAL_CONFIGS

REAL = sorted(p.name for p in REAL_CONFIGS.glob("*/") if (p / "tensors.json").exists()) if REAL_CONFIGS.exists() else []


@pytest.mark.parametrize("name", REAL or ["<missing>"])
def test_plan_equals_real_layout(name):
    if name == "<missing>":
        pytest.skip(f"no real-configs under {REAL_CONFIGS}")
    folder = REAL_CONFIGS / name
    cfg = parse_config(json.loads((folder / "config.json").read_text()))
    listing = json.loads((folder / "tensors.json").read_text())["tensors"]
    expected = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in listing]
    ltm_rows = None
    if cfg.family == "mplus":
        ltm_rows = [t["shape"][0] for t in listing if t["name"].startswith("ltm.")]
    got = [(s.name, s.shape, s.dtype) for s in weight_plan(cfg, ltm_rows)]
    assert got == expected


def test_real_families_detected_from_keys_not_model_type():
    families = {}
    for folder in REAL_CONFIGS.glob("*/"):
        raw = json.loads((folder / "config.json").read_text())
        families[folder.name] = (raw.get("model_type"), detect_family(raw))
    if not families:
        pytest.skip("no real configs")
    assert families.get("memoryllm-8b") == ("llama", "8b")
    assert families.get("memoryllm-7b") == ("memoryllm", "7b")
    assert families.get("mplus-8b") == ("llama", "mplus")


def test_real_sizes():
    cfg8 = parse_config(json.loads((REAL_CONFIGS / "memoryllm-8b" / "config.json").read_text()))
    assert (cfg8.memory_rows, cfg8.num_tokens, cfg8.lora_scale, cfg8.rope.kind, cfg8.rope.factor) == (
        12800, 256, 2.0, "linear", 1.8125)
    cfgp = parse_config(json.loads((REAL_CONFIGS / "mplus-8b" / "config.json").read_text()))
    assert (cfgp.memory_rows, cfgp.ltm_retrieval_rows, cfgp.prefix_rows) == (10240, 2560, 12801)
    cfg7 = parse_config(json.loads((REAL_CONFIGS / "memoryllm-7b" / "config.json").read_text()))
    assert cfg7.rope.kind == "interpolate" and abs(cfg7.rope.position_scale - 4096 / 7936) < 1e-12
    assert not cfg7.drop_per_layer and not cfg7.has_lora


def test_plain_llama_config_is_refused():
    with pytest.raises(ConfigError, match="not a MemoryLLM"):
        parse_config({"model_type": "llama", "hidden_size": 8})


@pytest.mark.parametrize("variant", sorted(p.parent.parent.name for p in CONFORMANCE.glob("*/checkpoint/config.json")))
def test_fixture_checkpoints_match_their_plan(variant):
    folder = CONFORMANCE / variant / "checkpoint"
    cfg = parse_config(json.loads((folder / "config.json").read_text()))
    plan = check_plan(CheckpointReader(folder), cfg)
    assert {s.name for s in plan} == CheckpointReader(folder).names()


def test_pickle_weights_refused_without_opt_in(tmp_path):
    torch.save({"memory": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        CheckpointReader(tmp_path)
    reader = CheckpointReader(tmp_path, allow_pickle=True)
    assert reader.names() == {"memory"}


def test_wrong_shape_is_named(tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file

    src = CONFORMANCE / "memoryllm-8b-tiny" / "checkpoint"
    if not src.exists():
        pytest.skip("fixture missing")
    shutil.copytree(src, tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    tensors["memory"] = tensors["memory"][:, :5].contiguous()
    save_file(tensors, tmp_path / "ck" / "model.safetensors")
    cfg = parse_config(json.loads((src / "config.json").read_text()))
    with pytest.raises(CheckpointError, match="memory has shape"):
        check_plan(CheckpointReader(tmp_path / "ck"), cfg)


@pytest.mark.parametrize("like", ["memoryllm-8b", "mplus-8b", "memoryllm-7b"])
def test_benchmark_checkpoints_keep_special_ids_inside_the_vocabulary(like):
    """The official code embeds with padding_idx=pad_token_id: an id outside the vocabulary refuses
    to load there (and here)."""
    import sys

    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import make_checkpoint

    config = make_checkpoint.config_like(like, medium=True)
    cfg = parse_config(config)
    for token in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        assert token is None or 0 <= token < cfg.vocab_size
