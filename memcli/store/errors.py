"""The store's errors: the PoolError family, each kind in memcli's one taxonomy (memcli.base.errors)
with the exit code and HTTP status its failures have; str() is one line made safe to show
(memcli.base.text, the one sanitizer every string from a manifest, an archive or a file name goes
through)."""

from __future__ import annotations

import logging

from memcli.base.errors import Conflict, Damaged, MemcliError, NotFound
from memcli.base.text import one_line

log = logging.getLogger("memcli.store")


def note(text: str) -> None:
    """One line on stderr (through logging: the CLI and a library user both see one line)."""
    log.warning("memcli: %s", one_line(text))


class PoolError(MemcliError):
    """A pool operation failed; str() is a one-line message for humans (made safe to show)."""

    http_status = 409
    kind = "pool_error"


class PoolNotFound(NotFound, PoolError):
    """No pool of that name: the one missing-pool error (its message names the closest pool)."""


class PoolExists(PoolError):
    """A pool of that name already exists."""


class PoolBusy(Conflict, PoolError):
    """Another process is writing the pool, or it changed since it was loaded."""


class PoolCorrupt(Damaged, PoolError):
    """The pool (or an export file) on disk is damaged or not ours."""


class InvalidPoolName(PoolError):
    """The name cannot be used as a pool name."""

    http_status = 400
    kind = "invalid_request_error"


class PoolReadOnly(PoolError):
    """The store cannot be written (a read-only home, or no permission): reading still works."""


def repair_hint(name: str) -> str:
    """What every line about a damaged part of pool `name` ends with."""
    return f"run memcli pool verify {name} --repair"
