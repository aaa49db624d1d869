"""The published models memcli knows by name: hub ids and sizes (no torch: `memcli models`,
completion and `doctor` read this without loading anything)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str  # the alias users type
    repo: str  # Hugging Face hub id
    family: str  # "8b" | "7b" | "mplus"
    params: float  # transformer parameters besides the memory
    layers: int
    hidden: int
    memory_rows: int  # short-term memory rows per layer
    notes: str


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("memoryllm-8b-chat", "YuWangX/memoryllm-8b-chat", "8b", 8.03e9, 32, 4096, 12_800,
               "chat-tuned; answers in sentences"),
    KnownModel("memoryllm-8b", "YuWangX/memoryllm-8b", "8b", 8.03e9, 32, 4096, 12_800, "base model: continues text"),
    KnownModel("mplus-8b", "YuWangX/mplus-8b", "mplus", 8.03e9, 32, 4096, 10_240,
               "retains longest (long-term memory); base model only"),
    KnownModel("memoryllm-7b", "YuWangX/memoryllm-7b", "7b", 6.74e9, 32, 4096, 7_680,
               "Llama-2 based, forgets fastest"),
)

# Short names users type; the hub ids are the published checkpoints.
ALIASES: dict[str, str] = {model.name: model.repo for model in KNOWN_MODELS}


# Models shipped inside the package: usable offline everywhere, never downloaded. memcli-tiny is a
# toy trained on synthetic facts (training/README.md), for the offline demo and the remember-tests.
BUNDLED: dict[str, Path] = {"memcli-tiny": Path(__file__).resolve().parent / "models" / "memcli-tiny"}


def known(name: str) -> KnownModel | None:
    """The catalog entry of an alias or hub id."""
    return next((m for m in KNOWN_MODELS if name in (m.name, m.repo)), None)


# Bytes per weight as each quantization mode stores it (nf4: 4 bits plus block scales).
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.56}


def host_bytes_needed(model: KnownModel, quant: str, state_bytes_per_value: int = 4) -> int:
    """Host memory a CPU run needs: the weights as `quant` stores them plus the memory pool's rows
    (fp32 on the CPU), before activations."""
    weights = model.params * BYTES_PER_WEIGHT.get(quant, 4.0)
    pool = model.layers * model.memory_rows * model.hidden * state_bytes_per_value
    return int(weights + pool)
