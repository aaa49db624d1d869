"""Durable on-disk store for memory pools.

A pool is somebody's memory: losing or corrupting one is the worst thing memcli can do. The
store is generic (it knows nothing about models): a pool is a JSON manifest naming immutable,
content-addressed *parts* (safetensors files) plus an append-only log; whoever makes a PoolStore
gives it the checks of its pools' meta (MetaChecks: memcli's pools give theirs, memcli.pools.meta).
Its modules, one job each, each importing only those listed before it (no cycles):

  errors.py       the PoolError family, in memcli's one error taxonomy (memcli.base.errors)
  files.py        memcli.base.durable's file I/O with the store's errors; the staged-folder rename
  manifest.py     the manifest format; JSON documents parsed by memcli.base.jsonbound
  folders.py      the store's own folders: opened without following links, files relative to
                  them; a file where a folder belongs named with the fix; read-only stores
  integrity.py    a part's bytes checked against its sha256 where they are read (once per
                  process per file identity), and the records of damage found
  safetensors.py  the streaming safetensors writer (shared with converted copies) and a bounded reader
  locking.py      flock locks: one writer lock per pool, the store gate for readers vs. collection
  staging.py      the root's staging entries (.tmp-*): staged folders, export records
  snapshot.py     snapshot reads: one version and the files it names, held open
  recovery.py     garbage collection and recovery of killed work
  transfer.py     fork, export, import
  core.py         PoolStore's names, reads, commits, renames, removals; MetaChecks

Importing the store does not import torch (only reading and writing tensors does).
"""

from __future__ import annotations

from pathlib import Path

from . import transfer
from .core import MetaChecks, PoolInfo, StoreCore
from .errors import (
    InvalidPoolName, PoolBusy, PoolCorrupt, PoolError, PoolExists, PoolNotFound, PoolReadOnly, repair_hint,
)
from .manifest import FORMAT_VERSION, validate_name, validate_part_id
from .recovery import collect_garbage, recover
from .safetensors import safetensors_chunks

__all__ = [
    "FORMAT_VERSION", "PoolError", "PoolNotFound", "PoolExists", "PoolBusy", "PoolCorrupt", "InvalidPoolName",
    "PoolReadOnly", "repair_hint",
    "MetaChecks", "PoolInfo", "PoolStore", "validate_name", "validate_part_id", "safetensors_chunks",
]


class PoolStore(StoreCore):
    """The pools under one root folder (core.py), with transfer and recovery. `checks`: how the meta
    of a pool this store did not write is checked (MetaChecks; the default accepts any)."""

    def fork(self, src: str, dst: str) -> PoolInfo:
        return transfer.fork(self, src, dst)

    def export(self, name: str, file: Path, force: bool = False) -> None:
        transfer.export(self, name, file, force=force)

    def import_(self, file: Path, name: str | None = None) -> PoolInfo:
        return transfer.import_(self, file, name)

    def recover(self, announce: bool = False, wait_s: float = 5.0) -> list[str]:
        """Remove leftovers of killed work now (recovery.py); returns what was removed."""
        return recover(self, announce=announce, wait_s=wait_s)

    def collect_garbage(self, wait_s: float = 5.0) -> int:
        return collect_garbage(self, wait_s)
