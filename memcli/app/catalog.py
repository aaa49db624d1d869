"""The models on this machine: the known aliases and whether each is downloaded (`memcli models`,
never online), and `memcli pull` (a download into the Hugging Face cache that resumes)."""

from __future__ import annotations

import os
from pathlib import Path

from memcli.base.errors import MemcliError


def checkpoint_problem(folder: Path) -> str | None:
    """Why a downloaded checkpoint folder is incomplete (None: it has config, tokenizer and all weights)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return "the tokenizer files are missing"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "model.safetensors.index.json is unreadable"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"{len(missing)} of {len(shards)} weight files are missing (e.g. {missing[0]})"
        return None
    if not any(folder.glob("*.safetensors")):
        return "no weight files (*.safetensors)"
    return None


def list_models() -> list[dict]:
    """The known model aliases and whether each is in the Hugging Face cache (never goes online;
    reads the cache's folders directly: models--OWNER--NAME/{blobs,snapshots})."""
    from memcli.app.settings import DEFAULT_MODEL
    from memcli.base import paths
    from memcli.loading.catalog import ALIASES, BUNDLED, description

    cache = paths.hf_hub_cache()
    # description: what a model declares it can and cannot answer (memcli-tiny: a toy of 268 words)
    rows = [{"name": alias, "repo": None, "default": alias == DEFAULT_MODEL, "status": "bundled",
             "bytes": _folder_bytes(folder), "path": str(folder), "problem": checkpoint_problem(folder),
             "description": description(alias)}
            for alias, folder in BUNDLED.items()]
    for alias, repo_id in ALIASES.items():
        row = {"name": alias, "repo": repo_id, "default": alias == DEFAULT_MODEL,
               "status": "not downloaded", "bytes": 0, "path": None, "problem": None, "description": None}
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        if repo.is_dir():
            row["bytes"] = _folder_bytes(repo / "blobs")
            row["status"] = "partial"
            problem = "no snapshot"
            try:
                snapshots = sorted((p for p in (repo / "snapshots").iterdir() if p.is_dir()),
                                   key=lambda p: p.stat().st_mtime, reverse=True)
            except OSError:
                snapshots = []
            for snapshot in snapshots:
                problem = checkpoint_problem(snapshot)
                if problem is None:
                    row["status"], row["path"] = "downloaded", str(snapshot)
                    break
            row["problem"] = problem
        rows.append(row)
    return rows


def _folder_bytes(folder: Path) -> int:
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def pull_model(name: str) -> Path:
    """Download (or finish downloading) a model into the Hugging Face cache; returns its folder."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from memcli.loading.catalog import ALIASES
    from memcli.loading.checkpoints import CheckpointError, resolve_checkpoint

    if Path(name).expanduser().is_dir():
        raise MemcliError(f"{name} is a local folder; there is nothing to download")
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise MemcliError(f"unknown model {name!r}: give an alias ({', '.join(ALIASES)}) or a hub id owner/name")
    try:
        folder = resolve_checkpoint(repo_id)  # snapshot_download: resumes, honours HF_HOME / HF_HUB_OFFLINE
    except CheckpointError as err:
        if isinstance(err.__context__, LocalEntryNotFoundError):
            # resolve_checkpoint's advice is to run pull: here that is what just failed
            why = ("HF_HUB_OFFLINE is set; unset it to download" if constants.HF_HUB_OFFLINE
                   else "the Hugging Face hub cannot be reached; check the network connection (or HF_ENDPOINT)")
            raise MemcliError(f"cannot download {repo_id}: {why}") from None
        raise MemcliError(str(err)) from None
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise MemcliError(f"{repo_id} downloaded incompletely ({problem}); run memcli pull again")
    return folder


