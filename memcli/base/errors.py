"""memcli's one error taxonomy: how every failure ends, on the command line and over HTTP.

A failure a user can cause or fix is a `MemcliError`; its class says how it ends — the command's
exit code, the server's HTTP status and its OpenAI-style error type — and str() is one line.
Anything else that reaches the top is described by `describe`: an OS error by its file and reason,
a ValueError (a library's refusal of a bad value) as a user error, the rest as a bug in memcli.
The command line (cli) and the server (server.http) both end failures through `describe`.

    exit code   0 ok · 1 error · 2 usage · 3 inject skipped something · 130 interrupted
"""

from __future__ import annotations

from dataclasses import dataclass

from .text import one_line, shown

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
EXIT_INTERRUPTED = 130


class MemcliError(Exception):
    """A failure a user can cause or fix; str() is one line."""

    exit_code = EXIT_ERROR
    http_status = 400
    kind = "invalid_request_error"

    def __init__(self, message: object = ""):
        super().__init__(one_line(message))


class UsageError(MemcliError):
    """A command given without something it needs, or with an option it cannot take."""

    exit_code = EXIT_USAGE


class NotFound(MemcliError):
    """A pool, model, file or endpoint that is not there."""

    http_status = 404
    kind = "not_found_error"


class Conflict(MemcliError):
    """Somebody else holds it (a pool being written), or it changed meanwhile."""

    http_status = 409
    kind = "conflict_error"


class Damaged(MemcliError):
    """Stored data that fails its checks, or a store that cannot be used as it is."""

    http_status = 409
    kind = "pool_error"


class FileRefused(Damaged):
    """A file memcli will not read as it is: a symbolic link, not a regular file, implausibly
    large (base.durable.open_regular); str() names the file and why."""


class FileUnreadable(FileRefused):
    """A file the system will not let memcli read (no permission, an I/O error)."""


class Interrupted(MemcliError):
    """Ctrl-C, SIGTERM, or a client that asked to stop: what was committed is kept."""

    exit_code = EXIT_INTERRUPTED
    http_status = 499
    kind = "cancelled"


@dataclass(frozen=True)
class Failure:
    """How one failure ends: its one-line message, exit code, HTTP status and error type; `bug`
    when it is none of the expected kinds (the message then says so)."""

    message: str
    exit_code: int
    http_status: int
    kind: str
    bug: bool = False


def describe(err: BaseException) -> Failure:
    """The one way a failure becomes a message, an exit code and an HTTP status."""
    if isinstance(err, MemcliError):
        return Failure(str(err) or type(err).__name__, err.exit_code, err.http_status, err.kind)
    if isinstance(err, OSError):
        what = err.strerror or str(err) or type(err).__name__
        message = f"{shown(err.filename)}: {what}" if err.filename else what
        return Failure(one_line(message), EXIT_ERROR, 500, "server_error")
    if isinstance(err, ValueError):  # a library's refusal of a value (config, checkpoint, quantization)
        return Failure(one_line(err) or type(err).__name__, EXIT_ERROR, 400, "invalid_request_error")
    detail = f"unexpected {type(err).__name__}" + (f": {err}" if str(err) else "")
    return Failure(one_line(detail), EXIT_ERROR, 500, "server_error", bug=True)
