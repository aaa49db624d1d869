"""Where memcli keeps its data, config and cache.

`MEMCLI_HOME` relocates everything (the tests always set it); otherwise the platform's
user directories from platformdirs are used.
"""

from __future__ import annotations

import os
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
