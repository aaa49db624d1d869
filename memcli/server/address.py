"""Where a memcli server listens and how long it keeps models: shared by the server and its client.

Light on purpose (standard library and platformdirs only): the client side of every command reads it.

The server's files live in a per-user runtime directory of mode 0700 (platformdirs'
user_runtime_dir, or `$MEMCLI_HOME/run`), so no other user can reach its socket:

    server.sock   the Unix domain socket every command talks to
    server.json   pid, socket, TCP address, log file and start time of the running server
    server.lock   held (flock) by the running server for its whole life: one server per user

Trust (`check_folder`, `check_socket`, `check_peer`): a client sends a byte only to a socket whose
folder is a real folder owned by this user and writable by nobody else, which is itself a socket
(never a symbolic link: lstat) owned by this user, and whose listening process runs as this user
(SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS/BSD; where the platform has neither, the folder and
socket checks are the guarantee). Anything else is refused with one line naming the path and the
fix (`UntrustedServer`). The one repair: a folder of ours that others may enter or list but never
write into is closed to 0700, since nothing in it can be theirs; a folder others could write into
is never chmodded and used (a socket of theirs could already be in it), only named with the fix.
The server creates and checks its folder by the same rules.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import platformdirs

from memcli.base.errors import MemcliError

APP = "memcli"
SOCKET_NAME = "server.sock"
INFO_NAME = "server.json"
LOCK_NAME = "server.lock"
# sun_path is 108 bytes on Linux (104 on macOS), terminator included
MAX_SOCKET_PATH = 103
DEFAULT_KEEP_ALIVE = "5m"
TOKEN_ENV = "MEMCLI_TOKEN"
KEEP_ALIVE_ENV = "MEMCLI_KEEP_ALIVE"


class AddressError(MemcliError, ValueError):
    """A one-line reason why the server's directory or address cannot be used (exit 1, HTTP 400)."""


class UntrustedServer(AddressError):
    """The server's folder, socket or listening process is not provably this user's: one line
    naming the path and the fix. Nothing was sent there."""


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


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_folder(folder: Path, repair: bool = True) -> bool:
    """Whether the server's folder is there (False: it is not); UntrustedServer unless it is a real
    folder (not a symbolic link), owned by this user and writable by nobody else. `repair`: a
    folder of ours that others may only enter or list is closed to 0700 (nothing in it can be
    theirs)."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedServer(f"{folder} is a symbolic link, not the memcli server's own folder; "
                              f"remove it (rm {folder}) and run the command again")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedServer(f"{folder} is not a folder; remove it (rm {folder}) and run the command again")
    if st.st_uid != os.getuid():
        raise UntrustedServer(f"{folder} belongs to another user (uid {st.st_uid}), so a socket there may not be "
                              "your memcli server's; set MEMCLI_HOME to a folder of yours (or have its owner remove it)")
    if st.st_mode & 0o022:
        raise UntrustedServer(f"{folder} is writable by other users (mode {_mode(st)}), so a socket there may not be "
                              f"your memcli server's; remove it (rm -r {folder}) and run the command again")
    if repair and st.st_mode & 0o077:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        try:
            again = os.fstat(fd)
            if (again.st_dev, again.st_ino, again.st_uid) == (st.st_dev, st.st_ino, st.st_uid) and not again.st_mode & 0o022:
                os.fchmod(fd, 0o700)  # ours and never writable by others: close it
        finally:
            os.close(fd)
    return True


def check_socket(path: Path) -> bool:
    """Whether a socket is at `path` (False: nothing is); UntrustedServer unless it is a socket
    itself (lstat: a symbolic link is refused, never followed) owned by this user."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedServer(f"{path} is a symbolic link, not your memcli server's socket; "
                              f"remove it (rm {path}) and run the command again")
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedServer(f"{path} is not a socket; remove it (rm {path}) and run the command again")
    if st.st_uid != os.getuid():
        raise UntrustedServer(f"{path} belongs to another user (uid {st.st_uid}), not your memcli server; "
                              f"remove it (rm {path}) and run the command again")
    return True


def check_socket_path(path: Path, repair: bool = False) -> bool:
    """`check_folder` of the socket's folder, then `check_socket`: whether a socket is there."""
    path = Path(path)
    return check_folder(path.parent, repair=repair) and check_socket(path)


def peer_uid(sock) -> int | None:
    """The user id of the process at the other end of a connected Unix socket; None where the
    platform cannot tell (then the folder and socket checks are the guarantee)."""
    import socket
    import struct

    if hasattr(socket, "SO_PEERCRED"):  # Linux: struct ucred {pid, uid, gid}
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[1]
    if hasattr(socket, "LOCAL_PEERCRED"):  # macOS, FreeBSD: struct xucred {version, uid, ...}
        raw = sock.getsockopt(getattr(socket, "SOL_LOCAL", 0), socket.LOCAL_PEERCRED, 76)
        return struct.unpack("2I", raw[:8])[1]
    return None


def check_peer(sock, path: Path | str) -> None:
    """UntrustedServer unless the process listening at the other end of `sock` runs as this user."""
    uid = peer_uid(sock)
    if uid is not None and uid != os.getuid():
        raise UntrustedServer(f"the process listening on {path} runs as another user (uid {uid}), not as you; "
                              f"remove the socket (rm {path}) and run the command again")


def trusted_socket() -> Path | None:
    """The server's socket path when a socket is there that may be used (its peer is checked when
    connecting); None when there is none; UntrustedServer when one is there that is not ours."""
    path = socket_path()
    return path if check_socket_path(path, repair=True) else None


def ensure_runtime_dir() -> Path:
    """Create the runtime directory owner-only (0700), or check that an existing one is ours and
    writable by nobody else (`check_folder`, which closes one that others may only enter); a
    directory somebody else could have put a socket in is refused, never chmodded and used."""
    folder = runtime_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(folder, 0o700)  # just made by us (mkdir's mode is masked by the umask)
    check_folder(folder, repair=True)
    if len(os.fsencode(socket_path())) > MAX_SOCKET_PATH:
        raise AddressError(f"the socket path {socket_path()} is longer than a Unix socket allows; "
                           "set MEMCLI_HOME to a shorter folder")
    return folder


def lock_held() -> bool:
    """Whether a server process holds the per-user server lock (it runs, or is starting)."""
    import fcntl

    try:
        fd = os.open(lock_path(), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
