"""Durable on-disk store for memory pools.

A pool is somebody's memory: losing or corrupting one is the worst thing memcli can do. The
store is generic (it knows nothing about models): a pool is a JSON manifest naming immutable,
content-addressed *parts* (safetensors files) plus an append-only log. Its modules, one job each:

  durable.py      file I/O: non-blocking regular-file opens, durable writes, the staged-folder
                  rename, the clock format and the hashing helper
  folders.py      the store's own folders: opened without following links, files relative to
                  them; a file where a folder belongs named with the fix; read-only stores
  integrity.py    a part's bytes checked against its sha256 where they are read (once per
                  process per file identity), and the records of damage found
  safetensors.py  the streaming safetensors writer (shared with converted.py) and a bounded reader
  locking.py      flock locks: one writer lock per pool, the store gate for readers vs. collection
  manifest.py     the manifest format and the checked JSON parser
  snapshot.py     snapshot reads: one version and the files it names, held open
  core.py         PoolStore's names, reads, commits, renames, removals
  transfer.py     fork, export, import
  recovery.py     garbage collection and recovery of killed work

Importing the store does not import torch (only reading and writing tensors does).
"""

from __future__ import annotations

from pathlib import Path

from . import transfer
from .core import PoolInfo, StoreCore
from .errors import (
    InvalidPoolName, PoolBusy, PoolCorrupt, PoolError, PoolExists, PoolNotFound, PoolReadOnly, repair_hint, safe_text,
)
from .manifest import FORMAT_VERSION, validate_name, validate_part_id
from .recovery import collect_garbage, recover
from .safetensors import safetensors_chunks

__all__ = [
    "FORMAT_VERSION", "PoolError", "PoolNotFound", "PoolExists", "PoolBusy", "PoolCorrupt", "InvalidPoolName",
    "PoolReadOnly", "repair_hint",
    "PoolInfo", "PoolStore", "validate_name", "validate_part_id", "safe_text", "safetensors_chunks",
]


class PoolStore(StoreCore):
    """The pools under one root folder (core.py), with transfer and recovery."""

    def fork(self, src: str, dst: str) -> PoolInfo:
        return transfer.fork(self, src, dst)

    def export(self, name: str, file: Path, force: bool = False) -> None:
        transfer.export(self, name, file, force=force)

    def import_(self, file: Path, name: str | None = None) -> PoolInfo:
        return transfer.import_(self, file, name)

    def recover(self, announce: bool = False, wait_s: float = 5.0) -> list[str]:
        """Remove leftovers of killed work now (recovery.py); returns what was removed."""
        return recover(self, announce=announce, wait_s=wait_s)

    cleanup = recover  # the name older callers and tests use

    def collect_garbage(self, wait_s: float = 5.0) -> int:
        return collect_garbage(self, wait_s)
