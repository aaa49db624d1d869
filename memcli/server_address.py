"""Where a memcli server listens and how long it keeps models: shared by the server and its client.

Light on purpose (standard library and platformdirs only): the client side of every command reads it.

The server's files live in a per-user runtime directory of mode 0700 (platformdirs'
user_runtime_dir, or `$MEMCLI_HOME/run`), so no other user can reach its socket:

    server.sock   the Unix domain socket every command talks to
    server.json   pid, socket, TCP address, log file and start time of the running server
    server.lock   held (flock) by the running server for its whole life: one server per user
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import platformdirs

APP = "memcli"
SOCKET_NAME = "server.sock"
INFO_NAME = "server.json"
LOCK_NAME = "server.lock"
# sun_path is 108 bytes on Linux (104 on macOS), terminator included
MAX_SOCKET_PATH = 103
DEFAULT_KEEP_ALIVE = "5m"
TOKEN_ENV = "MEMCLI_TOKEN"
KEEP_ALIVE_ENV = "MEMCLI_KEEP_ALIVE"


class AddressError(ValueError):
    """A one-line reason why the server's directory or address cannot be used."""


def _home() -> Path | None:
    value = os.environ.get("MEMCLI_HOME")
    return Path(value).expanduser() if value else None


def runtime_dir() -> Path:
    home = _home()
    if home:
        return home / "run"
    folder = Path(platformdirs.user_runtime_dir(APP))
    if not os.environ.get("XDG_RUNTIME_DIR") and not folder.parent.is_dir():
        # no login session's runtime dir (containers, cron): a per-user folder in the temp dir;
        # ensure_runtime_dir refuses it if somebody else made it first
        import tempfile

        folder = Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    return folder


def log_file() -> Path:
    """The log of a server started in the background (the cache dir: safe to delete)."""
    home = _home()
    return (home / "cache" if home else Path(platformdirs.user_cache_dir(APP))) / "server.log"


def spool_dir() -> Path:
    """Where the server keeps uploaded files while it injects them (on disk, not the runtime
    dir, which is often a RAM-backed tmpfs)."""
    return log_file().parent / "spool"


def socket_path() -> Path:
    return runtime_dir() / SOCKET_NAME


def info_path() -> Path:
    return runtime_dir() / INFO_NAME


def lock_path() -> Path:
    return runtime_dir() / LOCK_NAME


def ensure_runtime_dir() -> Path:
    """Create the runtime directory owner-only (0700), or check that an existing one is ours and
    closed to others; a directory somebody else could enter is refused, never silently used."""
    folder = runtime_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise AddressError(f"{folder} is not a directory")
    if info.st_uid != os.getuid():
        raise AddressError(f"{folder} belongs to another user; refusing to put the server's socket there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)  # ours: close it (mkdir's mode is masked by the umask)
    if len(os.fsencode(socket_path())) > MAX_SOCKET_PATH:
        raise AddressError(f"the socket path {socket_path()} is longer than a Unix socket allows; "
                           "set MEMCLI_HOME to a shorter folder")
    return folder


def lock_held() -> bool:
    """Whether a server process holds the per-user server lock (it runs, or is starting)."""
    import fcntl

    try:
        fd = os.open(lock_path(), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def read_info() -> dict | None:
    """The running (or last) server's facts, None when there are none."""
    try:
        data = json.loads(info_path().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: object) -> float | None:
    """ollama's keep-alive: "5m", "30s", "1h", a number of seconds; any negative value keeps models
    forever (None); 0 unloads after each request."""
    if isinstance(value, bool):
        raise AddressError(f"keep-alive must be a duration like 5m, 30s, 0 or -1, not {value!r}")
    match = _DURATION.match(str(value))
    if not match:
        raise AddressError(f"keep-alive must be a duration like 5m, 30s, 0 or -1, not {str(value)!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None if seconds < 0 else seconds


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
