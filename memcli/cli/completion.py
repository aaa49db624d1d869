"""Shell completion of pool names, model aliases and folders, paths and config keys: read from the
folders and tables themselves (no store, no torch)."""

from __future__ import annotations

import os

from memcli.app import settings as settings_table  # torch- and tomllib-free: the keys for help and completion


def complete_pool(incomplete: str) -> list[str]:
    """Pool names for shell completion: the folders with a manifest (no store, no torch)."""
    from memcli.base import paths

    try:
        names = sorted(os.listdir(paths.pools_dir()))
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete) and not n.startswith(".")
            and os.path.isfile(os.path.join(paths.pools_dir(), n, "manifest.json"))]


def complete_model(incomplete: str) -> list[str]:
    """Model aliases, then folders, for shell completion."""
    from memcli.loading.catalog import ALIASES, BUNDLED

    found = [alias for alias in (*ALIASES, *BUNDLED) if alias.startswith(incomplete)]
    return found + paths_starting(incomplete, folders_only=True)


def complete_path(incomplete: str) -> list[str]:
    return paths_starting(incomplete)


def paths_starting(incomplete: str, folders_only: bool = False) -> list[str]:
    """Paths starting with `incomplete` (folders end with "/")."""
    folder, _, prefix = incomplete.rpartition("/")
    where = os.path.expanduser(folder or ".") if folder or not incomplete.startswith("/") else "/"
    try:
        names = sorted(os.listdir(where))
    except OSError:
        return []
    out = []
    for name in names:
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        full = (folder + "/" if folder or incomplete.startswith("/") else "") + name
        if os.path.isdir(os.path.join(where, name)):
            out.append(full + "/")
        elif not folders_only:
            out.append(full)
    return out


def complete_config_key(incomplete: str) -> list[tuple[str, str]]:
    """Every setting (with its description, for shells that show one)."""
    return [(key, settings_table.HELP[key]) for key in settings_table.KEYS if key.startswith(incomplete)]
