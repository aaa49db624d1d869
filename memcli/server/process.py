"""The `memcli serve` process: the per-user lock, the owner-only Unix socket (and TCP beyond it only
with a bearer token), uvicorn, and a clean stop (running work cancelled; injects keep their
commits; the socket and the spool removed).

A server started by a command (`--exit-when-idle`) stops once nothing has been loaded for a
keep-alive.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

from memcli import __version__
from memcli.server.address import AddressError, ensure_runtime_dir, info_path, is_loopback, lock_path, socket_path
from memcli.server.http import Server

log = logging.getLogger("memcli.server.http")


class ServerRunning(AddressError):
    """A server of this user runs already."""


def take_lock():
    """The per-user server lock (flock on server.lock), held until the process ends."""
    import fcntl

    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind the socket owner-only: the umask makes it 0600 from its creation (no window where
    another user could connect), and chmod states it again."""
    try:
        path.unlink()  # a socket left by a server that was killed (we hold the lock: nobody serves it)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def bind_tcp_socket(tcp: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on (host, port) as `check_tcp` allowed it; AddressError in one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in tcp[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(tcp)
    except OSError as err:
        sock.close()
        raise AddressError(f"cannot listen on {tcp[0]}:{tcp[1]}: {err.strerror}") from None
    sock.listen(128)
    return sock


def check_tcp(host: str | None, port: int | None, token: str | None) -> tuple[str, int] | None:
    """The TCP address to listen on, or None. Beyond loopback only with a bearer token."""
    if host is None and port is None:
        return None
    host = host or "127.0.0.1"
    port = 11435 if port is None else port
    if not is_loopback(host) and not token:
        raise AddressError(f"refusing to listen on {host}, beyond this machine, without a bearer token: "
                           "set MEMCLI_TOKEN (clients send it as 'Authorization: Bearer …')")
    return host, port


def _uvicorn_class():
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """SIGTERM/SIGINT cancel running work at once (an inject returns to its last commit), then
        uvicorn shuts down as usual."""

        def __init__(self, config, server: Server):
            super().__init__(config)
            self.memcli = server

        def handle_exit(self, sig, frame) -> None:
            self.memcli.cancel_all()
            super().handle_exit(sig, frame)

    return Uvicorn


def owner_only_protocol():
    """uvicorn's HTTP protocol, closing at once a Unix-socket connection whose peer runs as another
    user (SO_PEERCRED: only root could reach the 0600 socket anyway): a request that comes over the
    Unix socket comes from this user, who may name a local model folder."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    from memcli.server.address import peer_uid

    base = import_from_string(HTTP_PROTOCOLS["auto"])

    class OwnerOnly(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is None or sock.family != socket.AF_UNIX:
                return
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            if uid is not None and uid != os.getuid():
                log.info(f"refused a connection from uid {uid} (this server serves uid {os.getuid()} only)")
                transport.close()

    return OwnerOnly


def serve(settings, keep_alive: float | None, host: str | None = None, port: int | None = None,
          budget_bytes: int | None = None, on_ready: Callable[[str], None] | None = None,
          exit_when_idle: bool = False) -> int:
    """Run the server in this process until `memcli stop`, SIGTERM or Ctrl-C. Returns an exit code."""
    import uvicorn

    from memcli.server.resident import Resident
    from memcli.server.address import TOKEN_ENV
    from memcli.pools.meta import PoolStore

    token = os.environ.get(TOKEN_ENV) or None
    tcp = check_tcp(host, port, token)
    store = PoolStore()
    with store.gate.shared(create=False):  # what every request does first: a store it cannot read is a start failure
        pass
    ensure_runtime_dir()
    lock = take_lock()
    if lock is None:
        raise ServerRunning(f"a memcli server is already running ({socket_path()}); memcli stop ends it")
    sockets = [bind_unix_socket(socket_path())]
    if tcp is not None:
        sockets.append(bind_tcp_socket(tcp))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    resident = Resident(settings, store=store, keep_alive=keep_alive, budget_bytes=budget_bytes, log=log.info)
    server = Server(resident, token)
    if exit_when_idle and keep_alive is not None:
        # started by a command, not by the user: gone once nothing is loaded for a keep-alive
        # (a minute for keep-alive 0, so that it does not mean a new server per command)
        resident.exit_when_idle = keep_alive if keep_alive > 0 else 60.0

        def stop_when_idle() -> bool:
            if server.jobs or server.uvicorn is None:
                return False
            log.info("nothing loaded for a while; the server started by a command stops")
            server.uvicorn.should_exit = True
            return True

        resident.on_idle = stop_when_idle
    config = uvicorn.Config(server.app(), lifespan="off", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=10, http=owner_only_protocol())
    runner = _uvicorn_class()(config, server)
    server.uvicorn = runner
    info = {"pid": os.getpid(), "socket": str(socket_path()), "started": server.started, "version": __version__,
            "tcp": f"{tcp[0]}:{tcp[1]}" if tcp else None, "keep_alive_seconds": keep_alive}
    tmp = info_path().with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, info_path())
    where = str(socket_path()) + (f" and http://{tcp[0]}:{tcp[1]}" if tcp else "")
    log.info(f"memcli server {__version__} (pid {os.getpid()}) listening on {where}")
    if on_ready is not None:
        on_ready(where)
    try:
        runner.run(sockets=sockets)
    finally:
        server.cancel_all()
        for worker in list(server.workers):  # cancelled work ends at its next token or chunk
            worker.join(30)
        resident.close()
        for leftover in (socket_path(), info_path()):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(server.spool, ignore_errors=True)
        os.close(lock)
        log.info("memcli server stopped")
    return 0
