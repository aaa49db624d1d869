"""The published models memcli knows by name: hub ids and sizes, and what a model folder declares
about itself (no torch: `memcli models`, `pool info`, completion and `doctor` read this without
loading anything)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memcli.base.durable import read_regular
from memcli.base.errors import FileRefused
from memcli.base.jsonbound import JsonRefused, load_json


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
BUNDLED: dict[str, Path] = {"memcli-tiny": Path(__file__).resolve().parent.parent / "models" / "memcli-tiny"}


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


def cpu_memory_problem(name: str, quant: str, total_bytes: int | None) -> str | None:
    """Why a published model cannot load on this machine's CPU (its weights in `quant` and its
    memory pool need more than `total_bytes`); None when it fits, or for a model not in the catalog."""
    entry = known(name)
    if entry is None or total_bytes is None:
        return None
    needed = host_bytes_needed(entry, quant)
    if needed <= total_bytes:
        return None
    return (f"on the CPU ({quant}) it needs about {needed / 2**30:.0f} GiB of memory and this machine has "
            f"{total_bytes / 2**30:.0f} GiB")


# What runs where the published models cannot: the toy shipped in the package, and its demo.
OFFLINE_HINT = ("use the bundled toy model: --model memcli-tiny (or memcli config set model memcli-tiny), "
                "or see it work: bash examples/demo.sh --offline")


# --------------------------------------------------------------------------- chunking
# The published checkpoints' chunking: contexts of 512 tokens (capped by a model's max_seq_length),
# never fewer than 16 (the model card's hard minimum; shorter contexts disturb the memory). A model
# folder declares its own minimum in config.json (memcli_min_chunk_tokens; memcli-tiny: 20, the
# only chunk length it was trained on).
CARD_CHUNK_TOKENS = 512
CARD_MIN_CHUNK_TOKENS = 16


# --------------------------------------------------------------------------- what a model declares
# Keys a model folder's config.json may carry about itself (read here without torch):
#   memcli_min_chunk_tokens  int   the shortest context it was trained on (default 16, the card's)
#   memcli_made_for_cpu      bool  made for the CPU: no "running on the CPU (slow)" warning
#   memcli_label             str   a few words shown beside its name (`pool info`)
#   memcli_description       str   one line: what it can and cannot answer (`memcli models`)
#   memcli_source_layers     [int] the layers whose attention names a source (attribution.py)
# A closed vocabulary needs no key: words the tokenizer turns into its unknown token are words the
# model has never seen, and inject and ask name them.
MAX_CONFIG_BYTES = 4 << 20


def model_folder(name: str) -> Path | None:
    """The folder of a bundled model or a local model folder (None for a hub id or alias)."""
    if name in BUNDLED:
        return BUNDLED[name]
    local = Path(name).expanduser()
    return local if local.is_dir() else None


def hub_id(name: str) -> str | None:
    """The hub id that an alias or an OWNER/NAME names; None when `name` can name no hub model."""
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or repo_id.startswith("/") or Path(name).suffix:
        return None
    return repo_id


def not_a_model(name: str) -> str | None:
    """Why `name` names no model (it is neither bundled, a folder, an alias nor an OWNER/NAME hub
    id), with the closest known name; None when it may name one."""
    import difflib

    if model_folder(name) is not None or hub_id(name) is not None:
        return None
    names = [*BUNDLED, *ALIASES]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"model {name!r} is neither a folder nor a hub id (known: {', '.join(names)}){hint}"


def declared(name: str) -> dict:
    """The `memcli_*` keys of a bundled model's or a local folder's config.json; {} for a hub id,
    or where the file cannot be read (loading the model says what is wrong with it)."""
    folder = model_folder(name)
    if folder is None:
        return {}
    path = folder / "config.json"
    try:
        if name in BUNDLED:  # a file of this package: read plainly (`memcli models` stays light)
            import json

            raw = json.loads(path.read_text())
        else:  # a user's folder: memcli's bounded, non-blocking reader
            raw = load_json(read_regular(path, str(path), MAX_CONFIG_BYTES))
    except (OSError, ValueError, FileRefused, JsonRefused):
        return {}
    return {k: v for k, v in raw.items() if k.startswith("memcli_")} if isinstance(raw, dict) else {}


def made_for_cpu(name: str) -> bool:
    return declared(name).get("memcli_made_for_cpu") is True


def label(name: str, family: str) -> str:
    """What to call a pool's model beside its name: a published checkpoint's family (8b, 7b, mplus),
    else what the model declares (memcli_label), else its family's layout."""
    if known(name) is not None:
        return family
    text = declared(name).get("memcli_label")
    if isinstance(text, str) and text.strip():
        return " ".join(text.split())[:80]
    return f"{family} layout"


def description(name: str) -> str | None:
    """The one line a model declares about what it can and cannot answer (memcli_description)."""
    text = declared(name).get("memcli_description")
    return " ".join(text.split())[:400] if isinstance(text, str) and text.strip() else None
