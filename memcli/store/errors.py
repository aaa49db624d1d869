"""The store's errors, and the one way it makes text from disk safe to show."""

from __future__ import annotations

import logging

from memcli.base.errors import MemcliError

log = logging.getLogger("memcli.store")


def safe_text(text: object) -> str:
    """`text` as one harmless line: whitespace runs become one space and every other
    non-printable character (terminal escapes, NUL, bidi controls...) is escaped as repr()
    writes it. Every string the store reports that came from a manifest, an archive or a
    file name goes through here, so no command can clear a screen or retitle a terminal."""
    out = []
    for ch in " ".join(str(text).split()):
        out.append(ch if ch.isprintable() else repr(ch)[1:-1])
    return "".join(out)


def note(text: str) -> None:
    """One line on stderr (through logging: the CLI and a library user both see one line)."""
    log.warning("memcli: %s", safe_text(text))


class PoolError(MemcliError):
    """A pool operation failed; str() is a one-line message for humans (made safe to show)."""

    http_status = 409
    kind = "pool_error"


class PoolNotFound(PoolError):
    """No pool of that name: the one missing-pool error (its message names the closest pool)."""

    http_status = 404
    kind = "not_found_error"


class PoolExists(PoolError):
    """A pool of that name already exists."""


class PoolBusy(PoolError):
    """Another process is writing the pool, or it changed since it was loaded."""

    kind = "conflict_error"


class PoolCorrupt(PoolError):
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
