"""Finding this user's running server, or starting one in the background, for a command.

When none runs, the first ask/chat/inject starts one (its log: `address.log_file()`) unless
`--no-server`, config `server = false` or MEMCLI_SERVER=0. A server that was killed leaves its
socket behind: the next command says so in one line and starts a fresh one; its pools are at their
last commit (every save is atomic). When no server can be started, or what answers on the socket is
not provably this user's server, the command says why in one line and runs in its own process.

Light (standard library, httpx through the client): no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from memcli.server import address as server_address

START_DEADLINE = 180.0  # seconds a background server may take to import and bind (a loaded CPU is slow)
FALLBACK = "running in this process"


def running_client():
    """A client of the running server, or None when none runs. UntrustedServer (one line naming
    the path and the fix) when a socket is there that is not provably this user's server: nothing
    is sent to it."""
    if server_address.trusted_socket() is None:
        return None  # no server: and no httpx import for the commands that would only look
    from memcli.server.client import Client

    client = Client()
    try:
        if client.health() is not None:
            return client
    except BaseException:
        client.close()
        raise
    client.close()
    return None


def stale_note() -> str | None:
    """One line when a server died without stopping (its socket or facts are left behind)."""
    info = server_address.read_info()
    if info is None and not os.path.lexists(server_address.socket_path()):
        return None
    pid = info.get("pid") if info else None
    who = f"the memcli server (pid {pid})" if pid else "the memcli server"
    return f"{who} ended without stopping; its pools are at their last commit — starting a fresh server"


def server_command(flags: dict) -> tuple[list[str], dict]:
    """The argv and environment of a background server. It imports the memcli this command runs,
    whatever the working directory holds: the current directory is not put on its import path
    (`python -P`, or the same done by hand before Python 3.11), and the folder this memcli was
    imported from goes in front of PYTHONPATH unless it is one of the interpreter's own
    site-packages."""
    import site
    import sysconfig

    from memcli import __file__ as package_file

    home = Path(package_file).resolve().parent.parent
    env = dict(os.environ)
    own = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib")} | set(site.getsitepackages())
    own.add(site.getusersitepackages())
    if home not in {Path(p).resolve() for p in own if p}:
        env["PYTHONPATH"] = os.pathsep.join([str(home)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if sys.version_info >= (3, 11):
        argv = [sys.executable, "-P", "-m", "memcli"]
    else:  # pragma: no cover - Python 3.10
        argv = [sys.executable, "-c", "import sys\nif sys.path and sys.path[0] in ('', '.'):\n    del sys.path[0]\n"
                "sys.argv[0] = 'memcli'\nfrom memcli.cli.app import main\nmain()"]
    for key in ("device", "dtype", "quant"):  # the model is per request (each sends its own)
        if flags.get(key):
            argv += [f"--{key}", flags[key]]
    argv += ["serve", "--exit-when-idle"]
    return argv, env


def start_server(flags: dict, say: Callable[[str], None], say_stale: bool = True):
    """Start a detached server and wait until it answers; None (after one line: the command then
    runs in its own process, as with MEMCLI_SERVER=0) when it cannot."""
    log = server_address.log_file()
    try:
        server_address.ensure_runtime_dir()  # the server's own check, said here in one line
        note = stale_note() if say_stale else None
        log.parent.mkdir(parents=True, exist_ok=True)
        argv, env = server_command(flags)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    close_fds=True, env=env)
    except (OSError, ValueError) as err:
        from memcli.base.text import one_line

        reason = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else \
            (err.strerror if isinstance(err, OSError) and err.strerror else str(err))
        say(f"memcli: cannot start the memcli server ({one_line(reason)}); {FALLBACK}")
        return None
    if note:
        say(note)
    try:
        return _wait_for_start(proc, log, say)
    except server_address.UntrustedServer as err:
        say(f"memcli: not using the memcli server: {err}; {FALLBACK}")
        return None


def _wait_for_start(proc: subprocess.Popen, log: Path, say: Callable[[str], None]):
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        client = running_client()
        if client is not None:
            return client
        code = proc.poll()
        if code is not None:
            client = running_client()  # another command's server won the race: use that one
            if client is not None:
                return client
            if server_address.lock_held():
                time.sleep(0.1)  # ... and is still starting
                continue
            say(f"memcli: the memcli server did not start (exit {code}; see {log}); {FALLBACK}")
            return None
        time.sleep(0.1)
    say(f"memcli: the memcli server did not answer within {START_DEADLINE:.0f} s (see {log}); {FALLBACK}")
    return None


def connect(flags: dict, say: Callable[[str], None], start: bool):
    """The running server's client, or (with `start`) a server started for this command; None: run
    in this process (none runs and none is started, one cannot start, or the socket is not this
    user's server: said in one line)."""
    try:
        client = running_client()
        if client is not None or not start:
            return client
        return start_server(flags, say)
    except server_address.UntrustedServer as err:
        say(f"memcli: not using the memcli server: {err}; {FALLBACK}")
        return None


def open_backend(settings, flags: dict | None = None, *, start: bool = True,
                 say: Callable[[str], None] = lambda line: None, on_model=None, on_load=None, via: str = "cli"):
    """The backend of one client of memcli (a command, the MCP server, the `llm` plugin), chosen
    once: this user's running server (`RemoteBackend`; with `start`, one started in the background
    when none runs) unless `settings.server` is off, else the library in this process
    (`LocalBackend`, its models loading on first use). `say` hears the one-line notes (a stale
    socket, an untrusted one, a server that could not start); `on_model` sees each request's
    `wire.ModelUse` through a server, `on_load(model, device)` a model loading in this process.
    `via` names the entry point in the log of answers ("cli", "mcp", "llm": `app.answer_log.VIA`)."""
    from memcli.app.local import LocalBackend

    flags = flags or {}
    here = None

    def fallback():
        nonlocal here
        if here is None:
            def make():
                from memcli.app.api import Memcli

                return Memcli(settings, on_load=on_load)

            here = LocalBackend(make=make, via=via)
        return here

    if not settings.server:
        return fallback()
    client = connect(flags, say, start)
    if client is None:
        return fallback()
    from memcli.app.models import normalize_model
    from memcli.server.remote import RemoteBackend

    return RemoteBackend(client, model=normalize_model(settings.model), model_explicit=settings.explicit("model"),
                         say=say, on_model=on_model, restart=lambda: start_server(flags, say, say_stale=False),
                         fallback=fallback, via=via)
