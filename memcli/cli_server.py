"""`memcli serve | ps | stop`, and the routing of ask, chat, inject and pool info through a server.

When a server runs, those commands talk to it (no torch import, no model load, the memory's
keys/values already computed); when none runs, the first ask/chat/inject starts one in the
background (its log: `server_address.log_file()`) unless `--no-server` or config `server = false`.
A server that was killed leaves its socket behind: the next command says so in one line and
starts a fresh one; its pools are at their last commit (every save is atomic).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Optional

import typer

from . import server_address

# httpx (the client) is imported by the functions that talk to a server, so commands that never do
# (--help, pool ls, models) do not pay for it.

START_DEADLINE = 180.0  # seconds a background server may take to import and bind (a loaded CPU is slow)


class RoutedError(ValueError):
    """The server's one-line refusal, shown like any other error of the command."""


def _cli():
    from . import cli

    return cli


# --------------------------------------------------------------------------- finding / starting a server
def running_client():
    """A client of the running server, or None."""
    from .client import Client
    client = Client()
    if client.health() is not None:
        return client
    client.close()
    return None


def _stale_note() -> str | None:
    """One line when a server died without stopping (its socket or facts are left behind)."""
    info = server_address.read_info()
    if info is None and not server_address.socket_path().exists():
        return None
    pid = info.get("pid") if info else None
    who = f"the memcli server (pid {pid})" if pid else "the memcli server"
    return f"{who} ended without stopping; its pools are at their last commit — starting a fresh server"


def start_server(flags: dict, say_stale: bool = True):
    """Start a detached server and wait until it answers; None (after one line) when it cannot."""
    cli = _cli()
    note = _stale_note() if say_stale else None
    if note:
        cli.say(note)
    log = server_address.log_file()
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "memcli"]
    for key in ("model", "device", "dtype", "quant"):
        if flags.get(key):
            argv += [f"--{key}", flags[key]]
    argv += ["serve", "--exit-when-idle"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                close_fds=True)
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
            cli.say(f"memcli: the server did not start (exit {code}; see {log}); running in this process")
            return None
        time.sleep(0.1)
    cli.say(f"memcli: the server did not answer within {START_DEADLINE:.0f} s (see {log}); running in this process")
    return None


def client_for(ctx: typer.Context, start: bool):
    """The server this command should use: None means run in-process."""
    state = _cli()._state(ctx)
    if state.flags.get("server") is False:
        return None
    if os.environ.get("MEMCLI_SERVER", "").lower() in ("0", "false", "no", "off"):
        return None
    settings = state.settings()
    if not settings.server:
        return None
    client = running_client()
    if client is not None or not start:
        return client
    return start_server(state.flags)


def _fail(err: Exception) -> None:
    """A server's refusal becomes this command's one-line error."""
    from .client import ServerError

    if isinstance(err, ServerError):
        raise RoutedError(str(err)) from None
    raise err


# --------------------------------------------------------------------------- routed commands
def ask(ctx, question: str, pool: str, max_new_tokens, temperature, top_p, seed, as_json: bool) -> bool:
    """`memcli ask` through a server; False when the command should run in-process."""
    from .client import ServerError, ServerGone
    client = client_for(ctx, start=True)
    if client is None:
        return False
    cli = _cli()
    answer = None
    started = False
    try:
        for event in client.ask(pool, question, max_new_tokens, temperature, top_p, seed):
            if "text" in event:
                if not as_json:
                    cli._write_stdout(event["text"])
                    started = True
            elif event.get("done"):
                answer = event["answer"]
    except ServerGone:
        if started:
            cli._write_stdout("\n")
        raise RoutedError("the memcli server stopped while answering; ask again (a fresh server starts)") from None
    except ServerError as err:
        if started:
            cli._write_stdout("\n")
        _fail(err)
    except BaseException:
        if started:
            cli._write_stdout("\n")
        raise
    if as_json:
        cli.print_json(answer)
    else:
        cli._write_stdout("\n")
    return True


def _uploads(paths: list[str], glob: Optional[str]):
    """Discover here (the server never opens a path a client names): uploads and skipped items in order."""
    from .client import Upload
    from .extract import Skipped, discover

    items = []
    for item in discover(paths, glob=glob):
        if isinstance(item, Skipped):
            items.append(("skipped", SimpleNamespace(path=item.path, status="skipped", reason=item.reason, chunks=0, tokens=0)))
            continue
        if item.kind == "stdin":
            data = sys.stdin.buffer.read()
            from io import BytesIO

            items.append(("upload", Upload("-", BytesIO(data), len(data))))
            continue
        try:
            stream = open(item.path, "rb")
        except OSError as err:
            reason = err.strerror or type(err).__name__
            items.append(("skipped", SimpleNamespace(path=item.path, status="skipped", reason=reason, chunks=0, tokens=0)))
            continue
        items.append(("upload", Upload(item.path, stream, os.fstat(stream.fileno()).st_size)))
    return items


def _report(pool: str, items, served: dict | None) -> SimpleNamespace:
    """The server's report with the locally skipped items put back where discovery found them."""
    served = served or {"pool": pool, "model": None, "chunks": 0, "tokens": 0, "seconds": 0.0, "files": [],
                        "partial": None, "interrupted": False, "tokens_per_second": None}
    remote = iter(served["files"])
    files = []
    for kind, item in items:
        if kind == "skipped":
            files.append(item)
        else:
            row = next(remote, None)
            if row is not None:
                files.append(SimpleNamespace(**row))
    files.extend(SimpleNamespace(**row) for row in remote)
    partial = SimpleNamespace(**served["partial"]) if served.get("partial") else None
    report = SimpleNamespace(pool=served["pool"], model=served.get("model"), chunks=served["chunks"],
                             tokens=served["tokens"], seconds=served["seconds"], files=files, partial=partial,
                             skipped=[f for f in files if f.status == "skipped"])
    data = dict(served)
    data["files"] = [dict(vars(f)) for f in files]
    report.to_json = lambda: data
    return report


def run_inject(client, pool: str, paths: list[str], model, chunk_tokens, glob, force):
    """Inject through the server with the CLI's progress display; returns (report, interrupted)."""
    cli = _cli()
    items = _uploads(paths, glob)
    uploads = [item for kind, item in items if kind == "upload"]
    if not uploads:
        return None, False  # nothing to send: the in-process command reports (and validates) it
    served = None
    interrupted = False
    try:
        if uploads:
            with cli.InjectProgress() as progress:
                for event in client.inject(pool, uploads, model=model, chunk_tokens=chunk_tokens, force=force):
                    if event.get("done"):
                        served, interrupted = event["report"], event.get("interrupted", False)
                    elif "event" in event:
                        progress(SimpleNamespace(kind=event["event"], **{k: v for k, v in event.items() if k != "event"}))
    finally:
        for upload in uploads:
            upload.stream.close()
    return _report(pool, items, served), interrupted


def inject(ctx, paths: list[str], pool: str, model, chunk_tokens, glob, force: bool, as_json: bool) -> bool:
    """`memcli inject` through a server; False when the command should run in-process."""
    from .client import ServerError, ServerGone
    client = client_for(ctx, start=True)
    if client is None:
        return False
    cli = _cli()
    try:
        report, interrupted = run_inject(client, pool, paths, model, chunk_tokens, glob, force)
        if report is None:
            return False
    except ServerGone:
        # killed mid-inject: the pool is at its last commit; a fresh server resumes where it stopped
        cli.say(f"the memcli server stopped during the inject; pool {pool} keeps its last commit — "
                "continuing with a fresh server")
        client = start_server(_cli()._state(ctx).flags, say_stale=False)
        if client is None:
            return False  # runs in-process, which resumes the same way
        try:
            report, interrupted = run_inject(client, pool, paths, model, chunk_tokens, glob, force)
            if report is None:
                return False
        except (ServerError, ServerGone) as err:
            raise RoutedError(str(err) or "the memcli server stopped again during the inject") from None
    except ServerError as err:
        _fail(err)
    if as_json:
        cli.print_json(report.to_json())
    else:
        for line in cli.report_lines(report)[:-1]:
            cli.say(line)
    if interrupted:
        cli.say(cli.interrupted_line(report))
        raise typer.Exit(cli.EXIT_INTERRUPTED)
    if not as_json:
        cli.say(cli.report_lines(report)[-1])
    if report.skipped:
        raise typer.Exit(cli.EXIT_SKIPPED)
    return True


def pool_info(ctx, name: str) -> dict | None:
    """`memcli pool info` from a running server (None: none runs; read the pool here)."""
    from .client import ServerError, ServerGone, ServerUnavailable
    client = client_for(ctx, start=False)
    if client is None:
        return None
    try:
        return client.pool_info(name)
    except (ServerUnavailable, ServerGone):
        return None
    except ServerError as err:
        _fail(err)


CHAT_HELP = "type a question; /reset forgets the conversation; /inject PATH... adds documents; /quit or Ctrl-D ends"


def chat(ctx, pool: str, max_new_tokens, temperature, top_p, seed, as_json: bool = False) -> bool:
    """`memcli chat` through a server: a conversation (earlier turns go into the prompt, within the
    model's window, oldest dropped first); False when the command should run in-process."""
    from .client import ServerError, ServerGone
    client = client_for(ctx, start=True)
    if client is None:
        return False
    cli = _cli()
    from .store import validate_name

    validate_name(pool)
    if pool not in {row["name"] for row in client.pools()}:  # manifests only: cheap
        raise RoutedError(f"pool {pool} does not exist (memcli pool ls lists pools; inject creates one)")
    interactive = sys.stdin.isatty()
    history = cli._History() if interactive else None
    if interactive:
        cli.say(f"pool {pool}: {CHAT_HELP}", style="dim")
    messages: list[dict] = []
    failures = 0
    try:
        while True:
            try:
                line = cli._read_question(interactive).strip()
            except EOFError:
                break
            if not line:
                continue
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/quit", "/exit", "/q"):
                    break
                if command == "/reset":
                    messages.clear()
                    cli.say("(conversation cleared)", style="dim")
                elif command == "/help":
                    cli.say(CHAT_HELP)
                elif command == "/inject" and shlex.split(rest):
                    try:
                        report, interrupted = run_inject(client, pool, shlex.split(rest), None, None, None, False)
                        if report is None:
                            report = _report(pool, [("skipped", SimpleNamespace(path=p, status="skipped", reason="not found or not readable", chunks=0, tokens=0)) for p in shlex.split(rest)], None)
                        for note in cli.report_lines(report):
                            cli.say(note)
                        failures += bool(report.skipped)
                    except ServerError as err:
                        failures += 1
                        cli.error_line(err)
                else:
                    failures += 1
                    cli.error_line(f"unknown or incomplete command {command} ({CHAT_HELP})")
                continue
            messages.append({"role": "user", "content": line})
            text, usage, started = [], None, False
            try:
                for event in client.chat(pool, messages, max_new_tokens, temperature, top_p, seed):
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            text.append(piece)
                            if not as_json:
                                cli._write_stdout(piece)
                                started = True
                    usage = event.get("usage") or usage
            except ServerError as err:
                messages.pop()
                if started:
                    cli._write_stdout("\n")
                failures += 1
                cli.error_line(err)
                continue
            messages.append({"role": "assistant", "content": "".join(text)})
            if as_json:
                sys.stdout.write(json.dumps({"question": line, "answer": "".join(text), "usage": usage}) + "\n")
                sys.stdout.flush()
            else:
                cli._write_stdout("\n")
    except ServerGone:
        raise RoutedError("the memcli server stopped during the chat; start the chat again (a fresh server starts)") from None
    finally:
        if history is not None:
            history.save()
    if failures and not interactive:
        raise typer.Exit(cli.EXIT_ERROR)
    return True


# --------------------------------------------------------------------------- serve / ps / stop
def _when(epoch: float | None) -> str:
    if epoch is None:
        return "forever"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _parse_bytes(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a size like 8G or 512M") from None
    return int(number * units[unit])


def register(app: typer.Typer) -> None:
    """Add `serve`, `ps` and `stop` to the memcli app."""

    @app.command()
    def serve(
        ctx: typer.Context,
        keep_alive: Optional[str] = typer.Option(None, "--keep-alive", help="How long a model stays loaded after its last request: 5m (default), 30s, 1h, 0 (unload after each request) or -1 (forever). MEMCLI_KEEP_ALIVE, config keep_alive."),
        host: Optional[str] = typer.Option(None, "--host", help="Also listen on TCP at this address (beyond loopback only with MEMCLI_TOKEN set)."),
        port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="TCP port (default 11435; the host defaults to 127.0.0.1)."),
        memory: Optional[str] = typer.Option(None, "--memory", help="Budget for loaded pool states, e.g. 8G (default: half of this machine's memory)."),
        exit_when_idle: bool = typer.Option(False, "--exit-when-idle", hidden=True, help="Stop once nothing is loaded for a keep-alive (servers that commands start)."),
    ) -> None:
        """Run the resident server: models and pools stay loaded; ask, chat and inject use it."""
        from .server import serve as run_server

        cli = _cli()
        state = cli._state(ctx)
        settings = state.settings()
        seconds = server_address.parse_keep_alive(keep_alive if keep_alive is not None else settings.keep_alive)
        budget = _parse_bytes(memory) if memory else None
        cli._quiet_libraries()
        code = run_server(settings, seconds, host=host, port=port, budget_bytes=budget, exit_when_idle=exit_when_idle)
        raise typer.Exit(code)

    @app.command()
    def ps(as_json: bool = typer.Option(False, "--json", help="As JSON.")) -> None:
        """Show what the running server has loaded: models, pools, memory and until when."""
        cli = _cli()
        client = running_client()
        if client is None:
            if as_json:
                cli.print_json({"running": False, "models": []})
            else:
                cli.say("no memcli server is running")
            return
        data = client.ps()
        if as_json:
            data["running"] = True
            cli.print_json(data)
            return
        table = cli._table("model", "device", "weights", "pools", "pool memory", "until", right=("weights", "pool memory"))
        for model in data["models"]:
            pools = ", ".join(f"{p['pool']} (v{p['version']})" for p in model["pools"]) or "-"
            until = "in use" if model["active_requests"] else _when(model["expires_at"])
            table.add_row(cli.shown(model["model"]), model["device"], cli.human_bytes(model["weights_bytes"]),
                          cli.shown(pools), cli.human_bytes(model["pool_bytes"]), until)
        cli.say(f"memcli server pid {data['pid']}, keep-alive "
                f"{'forever' if data['keep_alive_seconds'] is None else str(data['keep_alive_seconds']) + ' s'}")
        if data["models"]:
            cli.console(stderr=False).print(table)
        else:
            cli.say("no model loaded")

    @app.command()
    def stop() -> None:
        """Stop the running server (work in progress is cancelled; injects keep their commits)."""
        cli = _cli()
        client = running_client()
        if client is None:
            cli.say("no memcli server is running")
            return
        pid = client.stop()["pid"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server_address.socket_path().exists():
            time.sleep(0.05)
        cli.say(f"stopped the memcli server (pid {pid})")
