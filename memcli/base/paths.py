"""Where memcli keeps its data, config and cache.

`MEMCLI_HOME` relocates everything (the tests always set it); otherwise the platform's
user directories from platformdirs are used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

APP = "memcli"


def _home() -> Path | None:
    value = os.environ.get("MEMCLI_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    home = _home()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP))


def cache_dir() -> Path:
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def pools_dir() -> Path:
    return data_dir() / "pools"


def config_file() -> Path:
    return config_dir() / "config.toml"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME,
    XDG_CACHE_HOME), without importing it (it costs a light command ~0.2 s); when it is imported
    already, its resolved value."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        return Path(constants.HF_HUB_CACHE)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"
