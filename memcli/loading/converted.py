"""A converted copy of a checkpoint's weights, so the next start does not convert again.

The published checkpoints are fp32 (39 GB for the 8B models). After a first load in 4-bit, 8-bit or
16-bit, the converted weights (about 6 GB in NF4) are written under the user cache directory, keyed
by everything that decides their bytes: the weight files (names, sizes, modification times), the
config, the quantization and compute dtype, and the memcli / torch / bitsandbytes versions. A later
load with the same key reads that file instead. The memory tensor is not part of it: it is only read
when a new pool starts from the checkpoint.

A cache entry is a folder with `weights.safetensors` and `manifest.json` (the key's inputs, the
sha256, size and modification time of the weights file, and each projection's mode). It is
written beside, then renamed into place. A start compares size and modification time only; a
mismatch there costs a full sha256 check, and `verify()` (doctor) hashes every entry. A missing,
stale or corrupt entry is ignored and rebuilt. Tensors are read one at a time straight onto the
device (`safe_open(..., device=...)`), so a start never holds the whole copy in host memory.
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
from pathlib import Path

import torch

from memcli import __version__
from memcli.base import paths
from memcli.base.durable import fsync_dir, hash_fd, new_hash, open_regular, read_regular, write_file
from memcli.base.errors import FileRefused
from memcli.base.jsonbound import load_json
from memcli.store.safetensors import safetensors_chunks

FORMAT = 1
WEIGHTS = "weights.safetensors"
MAX_MANIFEST_BYTES = 16 << 20  # a few KB: the key's inputs and one mode per projection


def _versions() -> dict:
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:
        bnb = None
    return {"memcli": __version__, "torch": torch.__version__, "bitsandbytes": bnb}


def cache_key(folder: Path, config_hash: str, quant: str, dtype: torch.dtype) -> tuple[str, dict]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
    inputs = {
        "format": FORMAT,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "config": config_hash,
        "quant": quant,
        "dtype": str(dtype),
        "versions": _versions(),
    }
    digest = new_hash()
    digest.update(json.dumps(inputs, sort_keys=True).encode())
    return digest.hexdigest()[:32], inputs


def entry(key: str) -> Path:
    return paths.cache_dir() / "converted" / key


def _sha256(path: Path) -> str:
    fd = open_regular(path, "converted weights")
    try:
        return hash_fd(fd)[0]
    finally:
        os.close(fd)


class Entry:
    """An open converted copy: tensors are read one at a time, straight onto the device."""

    def __init__(self, weights: Path, modes: dict, device: torch.device):
        from safetensors import safe_open

        where = "cpu" if device.type == "cpu" else (f"{device.type}:{device.index or 0}")
        self._handle = safe_open(str(weights), framework="pt", device=where)
        self._fields: dict[str, list[str]] = {}
        for full in self._handle.keys():
            name, _, field = full.partition("::")
            self._fields.setdefault(name, []).append(field)
        self.modes = modes

    def group(self, name: str) -> dict[str, torch.Tensor]:
        fields = self._fields[name]
        return {field: self._handle.get_tensor(f"{name}::{field}" if field else name) for field in fields}

    def close(self) -> None:
        self._handle = None


def _manifest(folder: Path) -> dict:
    """An entry's manifest, read as every file memcli did not just write (never through a link, never
    blocking on a FIFO, bounded) and parsed by the bounded parser; a ValueError when it is not one."""
    manifest = load_json(read_regular(folder / "manifest.json", "converted copy manifest", MAX_MANIFEST_BYTES))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError("unknown manifest")
    return manifest


def open_entry(key: str, device: torch.device | str = "cpu") -> Entry | None:
    """The cached copy, or None if absent or damaged. At start only the size and modification time
    are compared with the manifest; the full sha256 is computed only when they disagree (or by
    `verify`, which `memcli doctor` calls)."""
    folder = entry(key)
    try:
        manifest = _manifest(folder)
        weights = folder / WEIGHTS
        info = weights.stat()
        if info.st_size != manifest["bytes"]:
            return None
        if info.st_mtime_ns != manifest.get("mtime_ns") and _sha256(weights) != manifest["sha256"]:
            return None
        return Entry(weights, manifest["modes"], torch.device(device))
    except (OSError, ValueError, KeyError, TypeError, FileRefused):  # FileRefused: not a regular file
        return None
    except Exception:  # a damaged file can make safetensors raise its own errors: rebuild
        return None


def read(key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The cached tensors on the CPU, all at once, and the per-projection modes (tests, tools)."""
    opened = open_entry(key)
    if opened is None:
        return None
    tensors = {}
    for name in opened._fields:
        for field, t in opened.group(name).items():
            tensors[f"{name}::{field}" if field else name] = t
    opened.close()
    return tensors, opened.modes


def verify() -> list[tuple[Path, bool]]:
    """Every converted copy and whether its weights still match the recorded sha256 (doctor)."""
    root = paths.cache_dir() / "converted"
    results = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        try:
            manifest = _manifest(folder)
            ok = _sha256(folder / WEIGHTS) == manifest["sha256"]
        except (OSError, ValueError, KeyError, TypeError, FileRefused):  # FileRefused: not a regular file
            ok = False
        results.append((folder, ok))
    return results


def write(key: str, inputs: dict, tensors: dict[str, torch.Tensor], modes: dict[str, str]) -> None:
    """Write one entry durably (temp folder, fsync, rename); failures only cost the cache."""
    final = entry(key)
    temp = final.parent / f".tmp-{secrets.token_hex(6)}"
    try:
        temp.mkdir(parents=True)
        digest, size = new_hash(), 0
        with open(temp / WEIGHTS, "wb") as f:
            for chunk in safetensors_chunks(tensors):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "key": key, "inputs": inputs, "modes": modes,
                    "sha256": digest.hexdigest(), "bytes": size,
                    "mtime_ns": (temp / WEIGHTS).stat().st_mtime_ns}  # rename keeps it
        write_file(temp / "manifest.json", json.dumps(manifest, indent=1).encode())
        fsync_dir(temp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except OSError:
        pass  # a full disk or a read-only cache must not stop the model from loading
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def clear() -> int:
    """Remove every converted copy; returns the bytes freed."""
    root = paths.cache_dir() / "converted"
    freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
    shutil.rmtree(root, ignore_errors=True)
    return freed
