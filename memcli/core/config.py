"""What a checkpoint's config.json means to memcli: the family, the sizes, the RoPE.

The published files all load as transformers' `LlamaConfig` in the official code, and two of them say
`model_type: "llama"`, so the family is detected from the keys that only each family has
(reference-semantics §1, FORMAT.md §7), never from `model_type`.
"""

from __future__ import annotations

import json
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.base.durable import read_regular
from memcli.base.errors import FileRefused, MemcliError
from memcli.base.jsonbound import JsonRefused, load_json

FAMILIES = ("7b", "8b", "mplus")

# inv_freq precision, a decision the official usages disagree on (reference-semantics §6.4):
#   fp32        angles from fp32 inv_freq (8b README, 7b README; all conformance fixtures)
#   bf16        inv_freq rounded to bf16 first, angles still computed in fp32 (M+ README, how M+ was trained)
#   fp16-table  7b test_qa path: positions, scale and inv_freq in fp16, fp16 outer product
ROPE_PRECISIONS = ("fp32", "bf16", "fp16-table")
DEFAULT_ROPE_PRECISION = {"7b": "fp32", "8b": "fp32", "mplus": "bf16"}


class ConfigError(MemcliError, ValueError):
    """config.json is not a MemoryLLM / M+ config we can run (exit 1, HTTP 400; a bad value)."""


# --------------------------------------------------------------------------- reading JSON safely
MAX_JSON_BYTES = 64 << 20  # tokenizer.json of Llama 3 is 9 MB; configs are a few KB
MAX_JSON_DEPTH = 64


def read_json_file(path: Path, limit: int = MAX_JSON_BYTES):
    """A model folder's JSON file, refused (ConfigError naming the file) unless it is a regular file
    of bounded size and nesting. Opened without blocking, so a FIFO cannot hang the load. The same
    opener (memcli.base.durable) and bounded parser (memcli.base.jsonbound) read the pool store's
    documents."""
    path = Path(path)
    try:
        return load_json(read_regular(path, str(path), limit), MAX_JSON_DEPTH)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except FileRefused as err:
        raise ConfigError(str(err)) from None
    except JsonRefused as err:
        raise ConfigError(f"{path} {err.reason}") from None


# --------------------------------------------------------------------------- field checks
_MISSING = object()


def _int(raw: dict, key: str, lo: int, hi: int, default=_MISSING) -> int:
    value = raw.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"lacks the key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key} = {value} is outside [{lo}, {hi}]")
    return value


def _number(raw: dict, key: str, lo: float, hi: float, default=_MISSING, open_low: bool = False) -> float:
    value = raw.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"lacks the key {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {_show(value)}")
    if value > hi or value < lo or (open_low and value == lo):
        raise ConfigError(f"{key} = {value} is outside {'(' if open_low else '['}{lo}, {hi}]")
    return float(value)


def _token_id(raw: dict, key: str, vocab: int) -> int | None:
    value = raw.get(key)
    if isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if value is None:
        return None
    return _int({key: value}, key, 0, vocab - 1)


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


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
    window: int = 0  # longest question + answer (or chunk) the model was trained for: max_seq_length
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def prefix_rows(self) -> int:
        """Rows in front of a question at every layer: bos + (LTM block) + short-term memory."""
        return 1 + self.ltm_retrieval_rows + self.memory_rows

    def fingerprint(self) -> str:
        """The pool binding: a hash of the parsed values that change what the model computes (sizes,
        RoPE, LoRA, drop rule, M+ parameters). Cosmetic keys (`_name_or_path`,
        `transformers_version`, `torch_dtype`, token ids, ...) do not enter it."""
        import hashlib

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_COMPUTATION}
        values["rope"] = dataclasses.asdict(self.rope)
        values["lora_targets"] = sorted(self.lora_targets)
        return "v2-" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def legacy_fingerprint(self) -> str:
        """The binding pools made before the parsed fingerprint carry (a hash of the raw config.json);
        accepted so that existing pools keep loading."""
        import hashlib

        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]


# fields that do not change the computation of memory rows or logits
_NOT_COMPUTATION = {"raw", "bos_token_id", "eos_token_id", "pad_token_id", "window"}


def parse_config(raw: dict) -> ModelConfig:
    """Checked before anything is allocated: types, ranges and consistency of every field used."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json is not a JSON object")
    family = detect_family(raw)
    try:
        return _parse(raw, family)
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise ConfigError(f"{err} ({family} config)") from None
        raise ConfigError(f"malformed field ({type(err).__name__}: {str(err)[:80]}) ({family} config)") from None


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def _parse(raw: dict, family: str) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {_show(raw['hidden_act'])} is not supported (MemoryLLM uses silu)")
    vocab = _int(raw, "vocab_size", 1, 1 << 22)
    hidden = _int(raw, "hidden_size", 1, 1 << 16)
    intermediate = _int(raw, "intermediate_size", 1, 1 << 18)
    layers = _int(raw, "num_hidden_layers", 1, 512)
    heads = _int(raw, "num_attention_heads", 1, 1024)
    kv_heads = _int(raw, "num_key_value_heads", 1, heads, default=raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if raw.get("head_dim"):
        head_dim = _int(raw, "head_dim", 2, 1024)
    elif hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} is odd; rotary embeddings need an even head size")
    num_tokens = _int(raw, "num_tokens", 1, 1 << 16)
    num_blocks = _int(raw, "num_blocks", 1, 1 << 12)
    ltm_blocks = _int(raw, "num_ltm_blocks", 0, num_blocks - 1, default=0) if family == "mplus" else 0
    memory_rows = (num_blocks - ltm_blocks) * num_tokens
    if memory_rows > 1 << 20:
        raise ConfigError(f"{memory_rows} memory rows per layer (num_blocks x num_tokens) is more than {1 << 20}")
    eps = _number(raw, "rms_norm_eps", 0.0, 1.0, default=1e-6, open_low=True)
    lora = raw.get("lora_config") if family != "7b" else None
    rank, scale, targets = 0, 0.0, ()
    if lora is not None:
        if not isinstance(lora, dict):
            raise ConfigError(f"lora_config must be an object, got {_show(lora)}")
        rank = _int(lora, "r", 1, 4096)
        scale = _number(lora, "lora_alpha", 0.0, 1e6) / rank
        modules = lora.get("target_modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) and m in LORA_MODULES for m in modules):
            raise ConfigError(f"lora_config.target_modules must list some of {', '.join(LORA_MODULES)}")
        targets = tuple(modules)
    mplus = family == "mplus"
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        num_tokens=num_tokens,
        memory_rows=memory_rows,
        rope=_rope(raw, family, head_dim),
        bos_token_id=_token_id(raw, "bos_token_id", vocab),
        eos_token_id=_token_id(raw, "eos_token_id", vocab),
        pad_token_id=_token_id(raw, "pad_token_id", vocab),
        lora_rank=rank,
        lora_scale=scale,
        lora_targets=targets,
        # the 7b code always drops one shared choice of rows from every layer
        drop_per_layer=family != "7b" and bool(raw.get("drop_memory_per_layer", True)),
        ltm_retrieval_rows=ltm_blocks * num_tokens,
        selector_hidden_dim=_int(raw, "selector_hidden_dim", 1, 1 << 14) if mplus else 0,
        num_selector_layers=_int(raw, "num_selector_layers", 0, 64, default=0) if mplus else 0,
        add_encoder_retriever=bool(raw.get("add_encoder_retriever", False)) and mplus,
        update_ltm_frequency=_int(raw, "update_ltm_frequency", 1, 1 << 20) if mplus else 0,
        decay_frequency=_number(raw, "decay_frequency", 0.0, 1e6) if mplus else 0,
        initial_rf_when_moving_stm_to_ltm=_number(raw, "initial_rf_when_moving_stm_to_ltm", 0.0, 1e6)
        if mplus
        else 0,
        ltm_initial_size=_int(raw, "ltm_initial_size", 0, 1 << 24, default=0) if mplus else 0,
        window=_int(raw, "max_seq_length", 1, 1 << 20, default=raw.get("max_seq_length") or 2 * num_tokens),
        raw=raw,
    )


def _rope(raw: dict, family: str, head_dim: int) -> RopeSpec:
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {_show(scaling)}")
    if family == "7b":
        # The 7b code hard-codes base 10000 and interpolates positions only when rope_scaling is null.
        if scaling is None and raw.get("interpolate_position_ids"):
            original = _int(raw, "max_position_embeddings", 1, 1 << 24)
            target = (raw["num_blocks"] + 1) * raw["num_tokens"]
            return RopeSpec("interpolate", 10000.0, head_dim, position_scale=original / max(original, target))
        if scaling is None:
            return RopeSpec("default", 10000.0, head_dim)
        return _linear(scaling, 10000.0, head_dim)
    theta = _number(raw, "rope_theta", 0.0, 1e12, default=10000.0, open_low=True)
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
        if _number(scaling, "high_freq_factor", 0.0, 1e6) <= _number(scaling, "low_freq_factor", 0.0, 1e6):
            raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")
        return RopeSpec(
            "llama3",
            theta,
            head_dim,
            factor=_number(scaling, "factor", 0.0, 1e6, open_low=True),
            low_freq_factor=_number(scaling, "low_freq_factor", 0.0, 1e6, open_low=True),
            high_freq_factor=_number(scaling, "high_freq_factor", 0.0, 1e6, open_low=True),
            original_max_position_embeddings=_int(scaling, "original_max_position_embeddings", 1, 1 << 24),
        )
    raise ConfigError(f"rope_scaling type {kind!r} is not supported for the {family} family")


def _linear(scaling: dict, theta: float, head_dim: int) -> RopeSpec:
    return RopeSpec("linear", theta, head_dim, factor=_number(scaling, "factor", 0.0, 1e6, open_low=True))


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    raw = read_json_file(path, limit=1 << 20)
    try:
        return parse_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
