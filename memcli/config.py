"""What a checkpoint's config.json means to memcli: the family, the sizes, the RoPE.

The published files all load as transformers' `LlamaConfig` in the official code, and two of them say
`model_type: "llama"`, so the family is detected from the keys that only each family has
(reference-semantics §1, FORMAT.md §7), never from `model_type`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("7b", "8b", "mplus")

# inv_freq precision, a decision the official usages disagree on (reference-semantics §6.4):
#   fp32        angles from fp32 inv_freq (8b README, 7b README; all conformance fixtures)
#   bf16        inv_freq rounded to bf16 first, angles still computed in fp32 (M+ README, how M+ was trained)
#   fp16-table  7b test_qa path: positions, scale and inv_freq in fp16, fp16 outer product
ROPE_PRECISIONS = ("fp32", "bf16", "fp16-table")
DEFAULT_ROPE_PRECISION = {"7b": "fp32", "8b": "fp32", "mplus": "bf16"}


class ConfigError(ValueError):
    """config.json is not a MemoryLLM / M+ config we can run."""


def detect_family(raw: dict) -> str:
    if "num_ltm_blocks" in raw:
        return "mplus"
    if "lora_config" in raw:
        return "8b"
    if raw.get("interpolate_position_ids") is not None or raw.get("model_type") == "memoryllm":
        return "7b"
    raise ConfigError(
        "config.json is not a MemoryLLM or M+ config (none of num_ltm_blocks, lora_config, "
        "interpolate_position_ids found)"
    )


@dataclass(frozen=True)
class RopeSpec:
    """How a position p becomes rotation angles: angle(p, i) = position_transform(p) * inv(i)."""

    kind: str  # "default" | "linear" | "interpolate" | "llama3"
    theta: float
    head_dim: int
    factor: float = 1.0  # linear: positions divided by it; llama3: low-band divisor
    position_scale: float = 1.0  # 7b interpolation: positions multiplied by it
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self) -> torch.Tensor:
        """fp32 inverse frequencies, exactly as transformers builds them."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv = 1.0 / (self.theta**exponent)
        if self.kind != "llama3":
            return inv
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    num_tokens: int  # K: rows written per injection, rows dropped per update
    memory_rows: int  # N: short-term memory rows per layer
    rope: RopeSpec
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    lora_rank: int = 0
    lora_scale: float = 0.0
    lora_targets: tuple[str, ...] = ()
    drop_per_layer: bool = True
    # M+ only
    ltm_retrieval_rows: int = 0  # R = num_ltm_blocks * K
    selector_hidden_dim: int = 0
    num_selector_layers: int = 0
    add_encoder_retriever: bool = False
    update_ltm_frequency: int = 0
    decay_frequency: float = 0.0
    initial_rf_when_moving_stm_to_ltm: float = 0.0
    ltm_initial_size: int = 0
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def prefix_rows(self) -> int:
        """Rows in front of a question at every layer: bos + (LTM block) + short-term memory."""
        return 1 + self.ltm_retrieval_rows + self.memory_rows

    def fingerprint(self) -> str:
        """A hash of the config values that decide tensor shapes and numerics (pool binding)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(raw: dict) -> ModelConfig:
    family = detect_family(raw)
    try:
        return _parse(raw, family)
    except KeyError as missing:
        raise ConfigError(f"config.json of a {family} checkpoint lacks the key {missing}") from None


def _parse(raw: dict, family: str) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not supported (MemoryLLM uses silu)")
    hidden = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or hidden // heads
    num_tokens = raw["num_tokens"]
    num_blocks = raw["num_blocks"]
    ltm_blocks = raw.get("num_ltm_blocks", 0) if family == "mplus" else 0
    lora = raw.get("lora_config") if family != "7b" else None
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return ModelConfig(
        family=family,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        num_tokens=num_tokens,
        memory_rows=(num_blocks - ltm_blocks) * num_tokens,
        rope=_rope(raw, family, head_dim),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
        lora_rank=lora["r"] if lora else 0,
        lora_scale=lora["lora_alpha"] / lora["r"] if lora else 0.0,
        lora_targets=tuple(lora["target_modules"]) if lora else (),
        # the 7b code always drops one shared choice of rows from every layer
        drop_per_layer=family != "7b" and bool(raw.get("drop_memory_per_layer", True)),
        ltm_retrieval_rows=ltm_blocks * num_tokens,
        selector_hidden_dim=raw.get("selector_hidden_dim", 0) if family == "mplus" else 0,
        num_selector_layers=raw.get("num_selector_layers", 0) if family == "mplus" else 0,
        add_encoder_retriever=bool(raw.get("add_encoder_retriever", False)) and family == "mplus",
        update_ltm_frequency=raw.get("update_ltm_frequency", 0) if family == "mplus" else 0,
        decay_frequency=raw.get("decay_frequency", 0) if family == "mplus" else 0,
        initial_rf_when_moving_stm_to_ltm=raw.get("initial_rf_when_moving_stm_to_ltm", 0)
        if family == "mplus"
        else 0,
        ltm_initial_size=raw.get("ltm_initial_size", 0) if family == "mplus" else 0,
        raw=raw,
    )


def _rope(raw: dict, family: str, head_dim: int) -> RopeSpec:
    scaling = raw.get("rope_scaling")
    if family == "7b":
        # The 7b code hard-codes base 10000 and interpolates positions only when rope_scaling is null.
        if scaling is None and raw.get("interpolate_position_ids"):
            original = raw["max_position_embeddings"]
            target = (raw["num_blocks"] + 1) * raw["num_tokens"]
            return RopeSpec("interpolate", 10000.0, head_dim, position_scale=original / max(original, target))
        if scaling is None:
            return RopeSpec("default", 10000.0, head_dim)
        return _linear(scaling, 10000.0, head_dim)
    theta = float(raw.get("rope_theta", 10000.0))
    if scaling is None:
        return RopeSpec("default", theta, head_dim)
    kind = scaling.get("rope_type") or scaling.get("type")
    if family == "8b":
        # the 8b code reads rope_scaling["type"] only
        kind = scaling.get("type", kind)
    if kind in ("default", None):
        return RopeSpec("default", theta, head_dim)
    if kind == "linear":
        return _linear(scaling, theta, head_dim)
    if kind == "llama3" and family == "mplus":
        return RopeSpec(
            "llama3",
            theta,
            head_dim,
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ConfigError(f"rope_scaling type {kind!r} is not supported for the {family} family")


def _linear(scaling: dict, theta: float, head_dim: int) -> RopeSpec:
    return RopeSpec("linear", theta, head_dim, factor=float(scaling["factor"]))


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return parse_config(raw)
