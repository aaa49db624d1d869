"""Models as the facade binds them to pools: a loaded model's facts, the name a pool records, and a
model's identity read from its config.json alone (no weights).

Light at import: torch and the engine are imported by the facade where weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memcli.base.errors import MemcliError
from memcli.loading.catalog import CARD_CHUNK_TOKENS, CARD_MIN_CHUNK_TOKENS

if TYPE_CHECKING:  # pragma: no cover
    from memcli.core.engine import Engine
    from memcli.pools.pool import Binding

MIN_CHUNK_KEY = "memcli_min_chunk_tokens"  # config.json: the shortest context a model was trained on


@dataclass
class LoadedModel:
    name: str
    folder: Path
    engine: "Engine"
    tokenizer: object
    binding: "Binding"
    state_dtype: object  # torch.dtype
    device: str
    reader: object = None  # the checkpoint reader: initial states of new pools

    @property
    def cfg(self):
        return self.engine.cfg

    def max_input_tokens(self) -> int:
        """Longest question (+ answer) or chunk the model was trained for (`max_seq_length`)."""
        raw = self.cfg.raw
        return int(raw.get("max_seq_length") or 2 * self.cfg.num_tokens)

    def chunk_tokens(self) -> int:
        """Tokens per injected chunk unless --chunk-tokens says otherwise: the published
        checkpoints' 512, or what the model reads at once where that is less."""
        return min(CARD_CHUNK_TOKENS, self.max_input_tokens())

    def min_chunk_tokens(self) -> int:
        """The shortest context the model may be given: what its config.json declares
        (`memcli_min_chunk_tokens`; memcli-tiny: 20, the one chunk length it was trained on), else
        the published checkpoints' 16 (their model card's hard minimum)."""
        value = self.cfg.raw.get(MIN_CHUNK_KEY)
        if value is None:
            return CARD_MIN_CHUNK_TOKENS
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.max_input_tokens():
            raise MemcliError(f"{self.folder / 'config.json'}: {MIN_CHUNK_KEY} must be an integer from 1 to "
                              f"max_seq_length ({self.max_input_tokens()}), not {value!r}")
        return value


def host_resident(state, loaded: LoadedModel):
    """Pools live in host memory: the GPU holds the weights and the memory's keys and values (what
    every question reads); rows only travel when an update writes them or an injection reads the
    newest K. Pinned pages make those copies fast and asynchronous."""
    if loaded.device.startswith("cuda"):
        state.slots = state.slots.pin_memory()
    return state


def normalize_model(name: str) -> str:
    """What a pool records as its model: a local folder as an absolute path (so the pool works from
    any directory), an alias or hub id as it is."""
    from memcli.loading.catalog import ALIASES, BUNDLED

    local = Path(name).expanduser()
    if name not in ALIASES and name not in BUNDLED and local.is_dir():
        return str(local.resolve())
    return name


@dataclass(frozen=True)
class ModelIdentity:
    """What a pool's binding checks, read from a model's config.json alone (no weights)."""

    model: str
    family: str
    config_hash: str
    num_tokens: int
    legacy_hashes: tuple[str, ...] = ()  # fingerprints older pools carry for the same config


def model_identity(name: str) -> ModelIdentity:
    """The family and config fingerprint of a model from its config.json only: a local folder's,
    the Hugging Face cache's, or (online) the one file downloaded. Never reads weights."""
    from memcli.core.config import ConfigError, read_config
    from memcli.loading.catalog import BUNDLED, hub_id, not_a_model

    name = normalize_model(name)
    local = Path(name)
    if name in BUNDLED:
        folder = BUNDLED[name]
    elif local.is_dir():
        folder = local
    else:
        repo_id = hub_id(name)
        if repo_id is None:
            raise MemcliError(not_a_model(name))
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):
            folder = Path(cached).parent
        else:
            try:
                folder = Path(hf_hub_download(repo_id, "config.json")).parent
            except Exception as err:  # the hub client raises many kinds; the user needs one line
                raise MemcliError(f"cannot read the config of {repo_id}: it is not downloaded and the hub "
                                  f"cannot be reached ({type(err).__name__})") from None
    try:
        cfg = read_config(folder)
    except ConfigError as err:
        raise MemcliError(str(err)) from None
    return ModelIdentity(name, cfg.family, cfg.fingerprint(), cfg.num_tokens, (cfg.legacy_fingerprint(),))


def binding_mismatch(pool: str, binding, identity: ModelIdentity) -> str | None:
    """Why a pool's recorded binding is not `identity`'s model (None: it is the same model)."""
    if binding.config_hash in (identity.config_hash, *identity.legacy_hashes) and binding.family == identity.family:
        return None
    return (f"pool {pool} belongs to model {binding.model} ({binding.family}, config {binding.config_hash}), "
            f"not to {identity.model} ({identity.family}, config {identity.config_hash})")


def model_is_here(name: str) -> bool:
    """Whether a pool's recorded model can be loaded without asking the network to find it."""
    from memcli.loading.catalog import ALIASES, BUNDLED

    local = Path(name).expanduser()
    if name in BUNDLED or local.is_dir():
        return True
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or local.is_absolute() or name.startswith("."):
        return False  # a folder that is gone (or a relative path from another directory)
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    # not in the cache: a hub id can still be downloaded when online; "a/b" offline is most likely
    # a folder recorded relative to another directory (pools made before paths were absolute)
    return not constants.HF_HUB_OFFLINE
