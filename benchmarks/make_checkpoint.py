"""Write a random-weight checkpoint in the official format (config.json, sharded safetensors,
index, a small tokenizer), for benchmarks and load tests. Nothing is downloaded.

    python benchmarks/make_checkpoint.py OUT --like memoryllm-8b [--layers 2] [--dtype F32]
    python benchmarks/make_checkpoint.py OUT --like memoryllm-8b --medium   # width 1024, real memory rows

`--like` takes a folder of ../shared/reference/real-configs (or any config.json folder). Tensors are
generated and written one shard at a time, so memory stays around one shard (<= 2 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcli.core.config import parse_config  # noqa: E402
from memcli.loading.checkpoints import weight_plan  # noqa: E402

SHARED = REPO.parent / "shared"
TOKENIZER_FROM = SHARED / "conformance" / "memoryllm-8b-chat-tiny" / "checkpoint"
SHARD_BYTES = 2 * 1024**3
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
MEDIUM = {"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2,
          "num_hidden_layers": 4, "vocab_size": 32000}


def _tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name == "initialized":
        return torch.ones((), dtype=torch.uint8)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, dtype=dtype)
    if name.startswith("ltm_ages"):
        return torch.zeros(shape, dtype=dtype)
    if name.startswith("ltm_recall_frequencies"):
        return torch.full(shape, 10.0, dtype=dtype)
    scale = 1.0 if name in ("memory", "bos_embedding") or name.startswith("ltm.") else 0.02
    out = torch.empty(shape, dtype=dtype)
    # fill in slabs so a 6.7 GB memory tensor does not need a second fp32 copy
    flat = out.view(-1) if out.dim() else out.view(1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        part.copy_(torch.randn(part.numel(), generator=gen) * scale)
    return out


def make_checkpoint(out: Path, config: dict, dtype: str = "F32", seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(config)
    plan = weight_plan(cfg)
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            for key in shard:
                weight_map[key] = name
            shard, shard_bytes = {}, 0

    for spec in plan:
        tensor = _tensor(spec.name, spec.shape, torch_dtype, gen)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > SHARD_BYTES:
            flush()
        shard[spec.name] = tensor
        shard_bytes += size
    flush()
    total = sum((out / s).stat().st_size for s in shards)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if TOKENIZER_FROM.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(TOKENIZER_FROM / name, out / name)
    return out


def config_like(source: str, layers: int | None = None, medium: bool = False) -> dict:
    folder = Path(source)
    if not folder.is_dir():
        folder = SHARED / "reference" / "real-configs" / source
    config = json.loads((folder / "config.json").read_text())
    if medium:
        config.update(MEDIUM)
        config.pop("head_dim", None)
    if layers is not None:
        config["num_hidden_layers"] = layers
    _ids_inside_vocab(config)
    return config


def _ids_inside_vocab(config: dict) -> None:
    """Special-token ids must index the (possibly shrunk) vocabulary: the official code builds its
    embedding with `padding_idx=pad_token_id` and refuses an id outside it. Out-of-range ids are
    moved to the top of the vocabulary, keeping ids that were equal equal."""
    vocab = config["vocab_size"]
    moved: dict[int, int] = {}

    def inside(token):
        if isinstance(token, list):
            return [inside(t) for t in token]
        if not isinstance(token, int) or token < vocab:
            return token
        return moved.setdefault(token, vocab - 1 - len(moved))

    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            config[key] = inside(config[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", default="memoryllm-8b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--medium", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="F32")
    args = parser.parse_args()
    path = make_checkpoint(args.out, config_like(args.like, args.layers, args.medium), args.dtype)
    print(json.dumps({"checkpoint": str(path)}))


if __name__ == "__main__":
    main()
