"""Finding a checkpoint, planning its tensors, and streaming them into a model and an initial state.

Loading is apart from modelling: `model.py` never reads a file. Weights are read tensor by tensor
(the memory tensor layer by layer) from the safetensors shards, converted — and quantized — on the
way to the device, so the peak host memory is about one tensor, not the 39 GB checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memcli.base.durable import new_hash
from memcli.base.errors import MemcliError
from memcli.core import fastpath
from memcli.core.config import ConfigError, ModelConfig, read_config, read_json_file
from memcli.core.model import Projection, Selector, Transformer
from memcli.core.quant import first_line
from memcli.core.state import CHECKPOINT_ORIGIN, LongTermMemory, MemoryState, new_generator

from memcli.loading.catalog import ALIASES, BUNDLED, hub_id, not_a_model  # torch-free tables (memcli models, completion)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


class CheckpointError(MemcliError, ValueError):
    """A checkpoint that cannot be found, trusted or read; the message is one line (exit 1, HTTP 400)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: "F32", "U8"


# --------------------------------------------------------------------------- the plan
def weight_plan(cfg: ModelConfig, ltm_rows: list[int] | None = None) -> list[TensorSpec]:
    """Every tensor the official `save_pretrained` writes for this config, in state_dict order.

    `ltm_rows`: the per-layer LTM length of an M+ file (not knowable from config alone);
    defaults to `ltm_initial_size`.
    """
    d, L, f = cfg.hidden_size, cfg.num_layers, "F32"
    kv_out = cfg.num_kv_heads * cfg.head_dim
    q_out = cfg.num_heads * cfg.head_dim
    plan = [
        TensorSpec("memory", (L, cfg.memory_rows, d), f),
        TensorSpec("new_memory_positional_emb", (1, 1, d), f),
        TensorSpec("bos_embedding", (L, 1, d), f),
    ]
    if cfg.family != "mplus":
        plan.append(TensorSpec("initialized", (), "U8"))
    plan.append(TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, d), f))
    shapes = {
        "q_proj": (q_out, d),
        "k_proj": (kv_out, d),
        "v_proj": (kv_out, d),
        "o_proj": (d, q_out),
        "gate_proj": (cfg.intermediate_size, d),
        "up_proj": (cfg.intermediate_size, d),
        "down_proj": (d, cfg.intermediate_size),
    }
    for i in range(L):
        prefix = f"model.layers.{i}."
        if cfg.family == "mplus":
            s = cfg.selector_hidden_dim
            selectors = ["query_proj", "key_proj"] + (["encoder_query_proj"] if cfg.add_encoder_retriever else [])
            for sel in selectors:
                plan.append(TensorSpec(f"{prefix}self_attn.{sel}.0.weight", (2 * s, d), f))
                plan.append(TensorSpec(f"{prefix}self_attn.{sel}.2.weight", (s, 2 * s), f))
        for proj, shape in shapes.items():
            name = f"{prefix}{PROJECTIONS[proj]}.{proj}"
            if proj in cfg.lora_targets:
                r = cfg.lora_rank
                plan.append(TensorSpec(f"{name}.base_layer.weight", shape, f))
                for ab, ab_shape in (("lora_A", (r, shape[1])), ("lora_B", (shape[0], r))):
                    for adapter in ("default", "decoder_adapter"):
                        plan.append(TensorSpec(f"{name}.{ab}.{adapter}.weight", ab_shape, f))
            else:
                plan.append(TensorSpec(f"{name}.weight", shape, f))
        plan.append(TensorSpec(f"{prefix}input_layernorm.weight", (d,), f))
        plan.append(TensorSpec(f"{prefix}post_attention_layernorm.weight", (d,), f))
    plan.append(TensorSpec("model.norm.weight", (d,), f))
    plan.append(TensorSpec("lm_head.weight", (cfg.vocab_size, d), f))
    if cfg.family == "mplus":
        rows = ltm_rows or [cfg.ltm_initial_size] * L
        s = cfg.selector_hidden_dim
        for kind, shape in (("ltm", (d,)), ("ltm_keys", (s,)), ("ltm_recall_frequencies", ()), ("ltm_ages", ())):
            for i in range(L):
                plan.append(TensorSpec(f"{kind}.{i}", (rows[i], *shape), f))
    return plan


# --------------------------------------------------------------------------- finding files
def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local folder, or a hub id / alias fetched through huggingface_hub (HF_HOME, HF_HUB_OFFLINE)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if model in BUNDLED:
        return BUNDLED[model]
    repo_id = hub_id(model)
    if repo_id is None:
        raise CheckpointError(not_a_model(model))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"model {repo_id} is not downloaded and the hub cannot be reached (offline); "
            f"run `memcli pull {model}` with a network connection"
        ) from None
    except Exception as err:  # the hub client raises many kinds; the user needs one line
        raise CheckpointError(f"cannot fetch {repo_id}: {str(err).splitlines()[0]}") from None


class CheckpointReader:
    """Lazy, per-tensor access to a checkpoint's weight files (safetensors; pickle only on request)."""

    def __init__(self, folder: Path, allow_pickle: bool = False):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._safe_open = safe_open
        self._where: dict[str, Path] = {}
        shards = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            spec = read_json_file(index)
            weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and Path(v).name == v and v.endswith(".safetensors")
                for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard files in the folder")
            self._where = {name: self.folder / file for name, file in weight_map.items()}
            for shard in sorted(set(self._where.values())):
                self._check_shard(shard)
        elif shards:
            for shard in shards:
                with self._handle(shard) as handle:
                    for name in handle.keys():
                        self._where[name] = shard
        elif list(self.folder.glob("*.bin")):
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.folder} has only pickle (.bin) weights, which can run code when loaded; "
                    "convert them to safetensors or pass --allow-pickle if you trust the source"
                )
            self._load_pickle()
        else:
            raise CheckpointError(f"{self.folder} has no weight files (*.safetensors)")

    def _check_shard(self, shard: Path) -> None:
        import stat as stat_module

        try:
            mode = shard.stat().st_mode
        except OSError as err:
            raise CheckpointError(f"cannot read {shard}: {err.strerror or err}") from None
        if not stat_module.S_ISREG(mode):
            raise CheckpointError(f"{shard} is not a regular file")
        with self._handle(shard):
            pass

    def _handle(self, shard: Path):
        """safe_open, with its errors (bad header, truncated file) as one line naming the file."""
        import stat as stat_module

        try:
            if not stat_module.S_ISREG(shard.stat().st_mode):
                raise CheckpointError(f"{shard} is not a regular file")
            return self._safe_open(str(shard), "pt")
        except CheckpointError:
            raise
        except Exception as err:  # SafetensorError and OSError alike
            raise CheckpointError(f"{shard}: not a readable safetensors file ({first_line(err)})") from None

    def _load_pickle(self) -> None:
        self._pickled: dict[str, torch.Tensor] = {}
        for shard in sorted(self.folder.glob("*.bin")):
            # weights_only refuses arbitrary objects; mmap keeps host memory bounded.
            self._pickled.update(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
        self._where = {name: Path("<pickle>") for name in self._pickled}

    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> Path | None:
        """The safetensors shard holding tensor `name` (None: not there, or pickle weights)."""
        if hasattr(self, "_pickled"):
            return None
        return self._where.get(name)

    def _open(self, name: str):
        """A fresh handle per read: a handle kept open keeps its mmapped pages resident, and
        a 39 GB checkpoint would then count fully against host memory."""
        if name not in self._where:
            raise CheckpointError(f"checkpoint {self.folder} lacks tensor {name}")
        return self._handle(self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self, "_pickled"):
            if name not in self._pickled:
                raise CheckpointError(f"checkpoint {self.folder} lacks tensor {name}")
            return tuple(self._pickled[name].shape)
        with self._open(name) as handle:
            try:
                return tuple(handle.get_slice(name).get_shape())
            except Exception as err:
                raise CheckpointError(f"{self._where[name]}: cannot read tensor {name} ({first_line(err)})") from None

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or its `index`-th slice along dim 0), read from disk now."""
        if hasattr(self, "_pickled"):
            if name not in self._pickled:
                raise CheckpointError(f"checkpoint {self.folder} lacks tensor {name}")
            t = self._pickled[name]
            return (t if index is None else t[index]).clone()
        with self._open(name) as handle:
            try:
                if index is None:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[index].clone()
            except Exception as err:
                raise CheckpointError(f"{self._where[name]}: cannot read tensor {name} ({first_line(err)})") from None


def check_plan(reader: CheckpointReader, cfg: ModelConfig) -> list[TensorSpec]:
    """The plan for this file (LTM lengths read from it); every planned tensor must be present with its shape.

    The layer count is checked against the tensor names first, so an absurd `num_hidden_layers`
    is refused before a plan (or a model) of that size is built."""
    layers = {int(m.group(1)) for m in map(_LAYER_NAME.match, reader.names()) if m}
    found = max(layers) + 1 if layers else 0
    if found != cfg.num_layers:
        raise CheckpointError(
            f"{reader.folder / 'config.json'}: num_hidden_layers is {cfg.num_layers}, the weight files have {found} layers"
        )
    ltm_rows = None
    if cfg.family == "mplus":
        ltm_rows = [reader.shape(f"ltm.{i}")[0] for i in range(cfg.num_layers)]
    plan = weight_plan(cfg, ltm_rows)
    for spec in plan:
        if spec.name == "initialized" and spec.name not in reader.names():
            continue  # an absent flag means a trained (initialized) pool
        shape = reader.shape(spec.name)
        if shape != spec.shape:
            raise CheckpointError(
                f"tensor {spec.name} has shape {list(shape)}, config.json implies {list(spec.shape)}"
            )
    return plan


_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,6})\.")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def load_checked_tokenizer(folder: Path):
    """The checkpoint's tokenizer; a damaged or hostile tokenizer file is a CheckpointError naming
    it (its JSON files are read with the same limits as config.json first)."""
    from memcli.loading.prompts import load_tokenizer

    folder = Path(folder)
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            try:
                read_json_file(path)
            except ConfigError as err:
                raise CheckpointError(str(err)) from None
    try:
        return load_tokenizer(folder)
    except Exception as err:  # tokenizers / transformers raise many kinds; the user needs one line
        present = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if (folder / n).exists()]
        where = folder / present[0] if present else folder
        raise CheckpointError(f"{where}: cannot load the tokenizer ({first_line(err)})") from None


# --------------------------------------------------------------------------- building
def dense_mode(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def load_model(
    folder: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    rope_precision: str | None = None,
    allow_pickle: bool = False,
    use_converted: bool = True,
    threads: str | int | None = None,
) -> tuple[Transformer, CheckpointReader]:
    """Weights only: the model, plus the open reader (for `initial_state`).

    Unless the checkpoint's own fp32 is wanted, the converted weights are kept in the user cache
    (`converted.py`) and read from there by the next load with the same settings. `threads`: the
    config key `threads` ("auto" or a count; see `threads.configure`)."""
    from memcli.loading import converted

    cfg = read_config(folder)
    reader = CheckpointReader(folder, allow_pickle=allow_pickle)
    check_plan(reader, cfg)
    quant = quant or dense_mode(dtype)
    key = inputs = None
    if use_converted and not (quant == "fp32" and dtype == torch.float32):
        key, inputs = converted.cache_key(Path(folder), cfg.fingerprint(), quant, dtype)
    model = build_model(cfg, reader, device, dtype, quant, rope_precision, converted_entry=(key, inputs) if key else None,
                        threads=threads)
    return model, reader


def build_model(
    cfg: ModelConfig,
    reader,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    rope_precision: str | None = None,
    converted_entry: tuple[str, dict] | None = None,
    threads: str | int | None = None,
) -> Transformer:
    """The model from any tensor source with `get(name)` (a checkpoint, or the GPU benchmark's
    random weights made on the device). `converted_entry`: (key, inputs) of the converted copy
    to read, or to write after converting. The process's compute threads are set here, once per
    model, from the model's size (`threads.configure`; `threads` is the config key's value)."""
    from memcli.loading import converted
    from memcli.core import quant as quantization
    from memcli.core import threads as compute_threads
    from memcli.core.config import DEFAULT_ROPE_PRECISION

    compute_threads.configure(cfg, threads)  # before the weights are converted: that work uses them too

    device = torch.device(device)
    quant = quant or dense_mode(dtype)
    quantization.check_mode_supported(quant, device)
    model = Transformer(cfg, rope_precision or DEFAULT_ROPE_PRECISION[cfg.family])
    cacheable = converted_entry is not None
    cached = converted.open_entry(converted_entry[0], device) if cacheable else None
    to_save: dict[str, torch.Tensor] = {}
    modes: dict[str, str] = {}

    def linear(name: str, mode: str) -> nn.Module:
        if cached is not None:
            return quantization.linear_from_state(cached.group(name), cached.modes[name], device, dtype)
        module = quantization.make_linear(reader.get(name), mode, device, dtype)
        if cacheable:
            modes[name] = mode
            to_save.update({f"{name}::{field}": t for field, t in quantization.linear_state(module).items()})
        return module

    def dense(name: str) -> torch.Tensor:
        tensor = (cached.group(name)[""] if cached is not None else reader.get(name)).to(device=device, dtype=dtype)
        if cacheable and cached is None:
            to_save[name] = tensor
        return tensor

    try:
        for i, block in enumerate(model.layers):
            prefix = f"model.layers.{i}."
            for proj, parent_name in PROJECTIONS.items():
                name = f"{prefix}{parent_name}.{proj}"
                parent = getattr(block, parent_name)
                lora = proj in cfg.lora_targets
                base = linear(f"{name}.base_layer.weight" if lora else f"{name}.weight", quant)
                if proj == "o_proj":
                    parent.o_proj = base
                    continue
                module = Projection(base, cfg.lora_scale)
                if lora:
                    for adapter, stored in (("encoder", "default"), ("decoder", "decoder_adapter")):
                        module.add_adapter(
                            adapter, dense(f"{name}.lora_A.{stored}.weight"), dense(f"{name}.lora_B.{stored}.weight")
                        )
                setattr(parent, proj, module)
            block.input_layernorm.weight.data = dense(f"{prefix}input_layernorm.weight")
            block.post_attention_layernorm.weight.data = dense(f"{prefix}post_attention_layernorm.weight")
            if cfg.family == "mplus":
                for sel in ("query_proj", "key_proj"):
                    setattr(block, sel, Selector(dense(f"{prefix}self_attn.{sel}.0.weight"),
                                                 dense(f"{prefix}self_attn.{sel}.2.weight")))
        model.embed_tokens = nn.Embedding.from_pretrained(dense("model.embed_tokens.weight"), freeze=True)
        # lm_head stays 16-bit: it is read once per generated token and quantizing it costs accuracy
        # on every logit for ~0.5 GB of savings.
        model.lm_head = linear("lm_head.weight", dense_mode(dtype))
        model.norm.weight.data = dense("model.norm.weight")
        model.bos_embedding = dense("bos_embedding")
        model.new_memory_positional_emb = dense("new_memory_positional_emb")
    finally:
        if cached is not None:
            cached.close()
    model.eval()
    model.rope_rows(cfg.prefix_rows + cfg.window + 1)  # the cos/sin tables, once, for the window
    if cacheable and cached is None:
        converted.write(converted_entry[0], converted_entry[1], to_save, modes)
        to_save.clear()
    fastpath.install(model)  # fused decode steps, host-side shortcuts; after the converted copy, which keeps them apart
    return model


def initial_state(
    reader: CheckpointReader,
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    ltm_device: str | torch.device = "cpu",
) -> MemoryState:
    """The checkpoint's built-in memory: the state every new pool starts from.

    Its `initial_key` names these slots by where they came from (the memory tensor's file, as
    the file system identifies that file's current content, read into this dtype and shape),
    so that the store recognises them without hashing 3 GB (pool.save); None when the source
    has no such identity (pickle weights) or changed while it was read."""
    import json
    import os

    def source_identity():
        file_of = getattr(reader, "file_of", None)  # any tensor source will do (the GPU benchmark's has no files)
        source = file_of("memory") if file_of is not None else None
        if source is None:
            return None
        try:
            path = Path(source).resolve(strict=True)
            st = os.stat(path)
        except (OSError, RuntimeError):
            return None
        # size and mtime change with the content; inode and ctime also change when a copy that
        # kept both (cp -p, rsync -t) replaces the file: a key must never name other bytes
        return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}

    L, n = cfg.num_layers, cfg.memory_rows
    before = source_identity()
    slots = torch.empty(L, n, cfg.hidden_size, dtype=dtype, device=device)
    for l in range(L):  # layer by layer: the fp32 memory tensor alone is 6.7 GB
        slots[l] = reader.get("memory", l).to(device=device, dtype=dtype)
    initial_key = None
    if before is not None and source_identity() == before:
        identity = {"format": "memcli initial memory slots 1", **before, "tensor": "memory",
                    "dtype": str(dtype).removeprefix("torch."), "shape": list(slots.shape)}
        h = new_hash()
        h.update(json.dumps(identity, sort_keys=True).encode("utf-8"))
        initial_key = h.hexdigest()
    initialized = True
    if "initialized" in reader.names():
        initialized = bool(reader.get("initialized").item())
    state = MemoryState(
        slots=slots,
        order=torch.arange(n, device=device).repeat(L, 1),
        initialized=initialized,
        origin=torch.full((L, n), CHECKPOINT_ORIGIN, dtype=torch.int64, device=device),
        generator=new_generator(seed),
        initial_key=initial_key,
    )
    if cfg.family == "mplus":
        state.stm_ages = torch.zeros(L, n, dtype=torch.float64, device=device)
        state.ltm = _checkpoint_ltm(reader, cfg, dtype, ltm_device, device)
    return state


def _checkpoint_ltm(reader, cfg, dtype, ltm_device, key_device) -> LongTermMemory:
    L, d, s = cfg.num_layers, cfg.hidden_size, cfg.selector_hidden_dim
    lengths = [reader.shape(f"ltm.{l}")[0] for l in range(L)]
    width = max(lengths)
    if width == 0:
        raise CheckpointError("the M+ checkpoint has an empty long-term memory; retrieval needs at least one row")
    ltm = LongTermMemory(
        rows=torch.zeros(L, width, d, dtype=dtype, device=ltm_device),
        keys=torch.zeros(L, width, s, dtype=dtype, device=key_device),
        birth_age=torch.zeros(L, width, dtype=torch.float64),
        birth_update=torch.zeros(width, dtype=torch.int64),
        origin=torch.full((L, width), CHECKPOINT_ORIGIN, dtype=torch.int64),
        size=width,
        ids=[],
        recall=[],
        cache_start=width,
    )
    for l, n in enumerate(lengths):
        ltm.rows[l, :n] = reader.get(f"ltm.{l}").to(dtype)
        ltm.keys[l, :n] = reader.get(f"ltm_keys.{l}").to(dtype)
        # the official put_ltm_to_numpy truncates ages to int32; keep that, exactly (no bf16 detour)
        ltm.birth_age[l, :n] = reader.get(f"ltm_ages.{l}").double().trunc()
        ltm.ids.append(torch.arange(n))
        ltm.recall.append(reader.get(f"ltm_recall_frequencies.{l}").float().double())
    return ltm


__all__ = [
    "ALIASES",
    "CheckpointError",
    "CheckpointReader",
    "ConfigError",
    "TensorSpec",
    "check_plan",
    "initial_state",
    "load_checked_tokenizer",
    "build_model",
    "load_model",
    "resolve_checkpoint",
    "weight_plan",
]

