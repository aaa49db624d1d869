"""`memcli serve | ps | stop`, and the routing of ask, chat, inject and pool info through a server.

When a server runs, those commands talk to it (no torch import, no model load, the memory's
keys/values already computed); when none runs, the first ask/chat/inject starts one in the
background (its log: `server_address.log_file()`) unless `--no-server` or config `server = false`.
A server that was killed leaves its socket behind: the next command says so in one line and
starts a fresh one; its pools are at their last commit (every save is atomic).

`Remote` stands in for `memcli.app.api.Memcli` (ask, inject, chat) so the commands' own code shows
the results: the same output, JSON lines, report and exit codes as in-process runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import typer

from memcli.server import address as server_address

# httpx (the client) is imported by the functions that talk to a server, so commands that never do
# (--help, pool ls, models) do not pay for it.

START_DEADLINE = 180.0  # seconds a background server may take to import and bind (a loaded CPU is slow)


class RoutedError(ValueError):
    """The server's one-line refusal, shown like any other error of the command."""


def _cli():
    from memcli.cli import main as cli

    return cli


# --------------------------------------------------------------------------- finding / starting a server
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


def _stale_note() -> str | None:
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
                "sys.argv[0] = 'memcli'\nfrom memcli.cli.main import main\nmain()"]
    for key in ("device", "dtype", "quant"):  # the model is per request (each sends its own)
        if flags.get(key):
            argv += [f"--{key}", flags[key]]
    argv += ["serve", "--exit-when-idle"]
    return argv, env


def start_server(flags: dict, say_stale: bool = True):
    """Start a detached server and wait until it answers; None (after one line: the command then
    runs in its own process, as with MEMCLI_SERVER=0) when it cannot."""
    cli = _cli()
    log = server_address.log_file()
    try:
        server_address.ensure_runtime_dir()  # the server's own check, said here in one line
        note = _stale_note() if say_stale else None
        log.parent.mkdir(parents=True, exist_ok=True)
        argv, env = server_command(flags)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    close_fds=True, env=env)
    except (OSError, ValueError) as err:
        reason = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else \
            (err.strerror if isinstance(err, OSError) and err.strerror else str(err))
        cli.say(f"memcli: cannot start the memcli server ({cli.one_line(reason)}); running in this process")
        return None
    if note:
        cli.say(note)
    try:
        return _wait_for_start(proc, log)
    except server_address.UntrustedServer as err:
        cli.say(f"memcli: not using the memcli server: {err}; running in this process")
        return None


def _wait_for_start(proc: subprocess.Popen, log: Path):
    cli = _cli()
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
            cli.say(f"memcli: the memcli server did not start (exit {code}; see {log}); running in this process")
            return None
        time.sleep(0.1)
    cli.say(f"memcli: the memcli server did not answer within {START_DEADLINE:.0f} s (see {log}); running in this process")
    return None


def client_for(ctx: typer.Context, start: bool):
    """The server this command should use: None means run in-process (--no-server, config
    `server = false` or MEMCLI_SERVER=0: all of them read by the settings; or a server socket that
    is not this user's, said in one line)."""
    state = _cli()._state(ctx)
    if not state.settings().server:
        return None
    try:
        client = running_client()
        if client is not None or not start:
            return client
        return start_server(state.flags)
    except server_address.UntrustedServer as err:
        _cli().say(f"memcli: not using the memcli server: {err}; running in this process")
        return None


def _fail(err: Exception) -> None:
    """A server's refusal becomes this command's one-line error."""
    from memcli.server.client import ServerError

    if isinstance(err, ServerError):
        raise RoutedError(str(err)) from None
    raise err


# --------------------------------------------------------------------------- the server as the library
class RemoteAnswer:
    """An answer the server gave: its text, and `to_json()` as `memcli.app.api.Answer.to_json()`."""

    def __init__(self, data: dict):
        self._data = {k: v for k, v in data.items() if k not in ("event", "pool", "pool_version", "question")}
        self.text = self._data["answer"]
        self.pool_version = data.get("pool_version")

    def to_json(self) -> dict:
        return dict(self._data)


class Remote:
    """A running server standing in for `memcli.app.api.Memcli` in ask, inject and chat: the same calls
    with the same results (the server runs the library's own code). The client's model setting
    (--model, MEMCLI_MODEL, the config file) goes with every request."""

    def __init__(self, ctx, client):
        self.ctx, self.client = ctx, client
        self.state = _cli()._state(ctx)
        self.settings = self.state.settings()

    def _model(self) -> tuple[str, bool]:
        from memcli.app.api import normalize_model  # a folder as an absolute path: the server runs elsewhere

        return normalize_model(self.settings.model), self.settings.explicit("model")

    # ------------------------------------------------------------------ ask
    def ask(self, pool: str, question: str, *, max_new_tokens: int | None = None, sampling=None,
            on_text=None, history: list[tuple[str, str]] | None = None) -> RemoteAnswer:
        from memcli.server.client import ServerError, ServerGone

        model, explicit = self._model()
        temperature, top_p, seed = ((sampling.temperature, sampling.top_p, sampling.seed) if sampling is not None
                                    else (0.0, 1.0, None))
        answer = None
        try:
            for event in self.client.ask(pool, question, max_new_tokens, temperature, top_p, seed, history=history,
                                         model=model, model_explicit=explicit):
                if event.get("event") == "text":
                    if on_text is not None:
                        on_text(event["text"])
                elif event.get("event") == "answer":
                    answer = RemoteAnswer(event)
        except ServerGone:
            raise RoutedError("the memcli server stopped while answering; ask again (a fresh server starts)") from None
        except ServerError as err:
            _fail(err)
        if answer is None:
            raise RoutedError("the memcli server ended the answer without finishing it; ask again")
        return answer

    def chat(self, pool: str, *, max_new_tokens: int | None = None, sampling=None):
        """A conversation (`memcli.app.api.ChatSession`): its turns are kept here and sent with each question."""
        from memcli.app.api import ChatSession

        return ChatSession(self, pool, max_new_tokens=max_new_tokens, sampling=sampling, new=not self.pool_exists(pool))

    def pool_exists(self, pool: str) -> bool:
        from memcli.server.client import ServerError

        try:
            self.client.require_pool(pool)
        except ServerError as err:
            if err.status == 404:
                return False  # a new pool: the chat's first /inject creates it
            _fail(err)
        return True

    # ------------------------------------------------------------------ inject
    def inject(self, pool: str, paths, *, model: str | None = None, chunk_tokens: int | None = None,
               glob: str | None = None, force: bool = False, type: str | None = None,
               encoding: str | None = None, stdin=None, on_event=None):
        """`Memcli.inject` through the server: files are found here (the server never opens a path
        a client names) and their bytes streamed to it; the report is the library's `InjectReport`."""
        from memcli.app.api import InjectInterrupted, MemcliError
        from memcli.server.client import ServerError, ServerGone
        from memcli.ingest.discover import Ignored, discover

        paths = list(paths)
        try:
            found = list(discover(paths, glob=glob, type=type, encoding=encoding)) if paths else []
        except ValueError as err:
            raise MemcliError(str(err)) from None
        items = [item for item in found if not isinstance(item, Ignored)]
        if not any(getattr(item, "kind", None) for item in items):
            # nothing to send: in-process says (and validates) exactly what it would say anyway
            return self.state.app().inject(pool, paths, model=model, chunk_tokens=chunk_tokens, glob=glob,
                                           force=force, type=type, encoding=encoding, stdin=stdin, on_event=on_event)
        if model is None:
            model, explicit = self._model()
        else:
            explicit = True
        args = dict(model=model, model_explicit=explicit, chunk_tokens=chunk_tokens, force=force, type=type,
                    encoding=encoding)
        piped = _piped(items, stdin)
        try:
            report = self._send(pool, items, piped, args, on_event)
        except ServerGone:
            # killed mid-inject: the pool is at its last commit; a fresh server resumes where it stopped
            _cli().say(f"the memcli server stopped during the inject; pool {pool} keeps its last commit — "
                       "continuing with a fresh server")
            client = start_server(self.state.flags, say_stale=False)
            if client is None:  # in-process resumes the same way
                return self.state.app().inject(pool, paths, model=model if explicit else None,
                                               chunk_tokens=chunk_tokens, glob=glob, force=force, type=type,
                                               encoding=encoding, stdin=_replay(piped), on_event=on_event)
            self.client = client
            try:
                report = self._send(pool, items, piped, args, on_event)
            except ServerGone:
                raise RoutedError("the memcli server stopped again during the inject") from None
            except ServerError as err:
                _fail(err)
        except ServerError as err:
            _fail(err)
        report.count_ignored(found)
        if report.interrupted:
            raise InjectInterrupted(report)
        return report

    def _send(self, pool: str, items, piped: bytes | None, args: dict, on_event):
        """One upload of `items` and its streamed events; the merged report."""
        from memcli.app.api import Event

        uploads, order = _uploads(items, piped)
        served = None
        fields = set(Event.__dataclass_fields__) - {"kind"}
        pending = [i for i, (kind, _, _) in enumerate(order) if kind == "skipped"]
        sent_files = 0
        emit = on_event or (lambda event: None)
        events = self.client.inject(pool, [u for u in uploads if u is not None], **args)

        def handle(event: dict) -> None:
            nonlocal served, sent_files
            if "event" not in event:  # the last line: {"done": true, "report": ...}
                served = event.get("report")
                return
            if event["event"] == "file":  # skips found here are told where they are in the run
                sent_files += 1
                while pending and order[pending[0]][2] < sent_files:
                    _, skipped, _ = order[pending.pop(0)]
                    emit(Event("skip", skipped.path, reason=skipped.reason))
            emit(Event(event["event"], **{k: v for k, v in event.items() if k in fields}))

        try:
            _Stop(self.client, events, pool).run(handle)
        finally:
            for upload in uploads:
                if upload is not None:
                    upload.stream.close()
        for index in pending:
            _, skipped, _ = order[index]
            emit(Event("skip", skipped.path, reason=skipped.reason))
        return _merged_report(pool, order, served)


class _Stop:
    """Ctrl-C (or SIGTERM) during an inject through a server, as in-process: the first asks the
    server to end the inject once the chunk it is making is committed, and the events go on until
    its report of what was kept (marked interrupted); a second one quits at once (the server, seeing
    the client leave, returns to the last commit). The stream is read on its own thread, so that
    the interruption, raised in this (the main) thread, leaves the stream intact."""

    def __init__(self, client, events, pool: str):
        self.client, self.events, self.pool = client, events, pool
        self.wanted = False  # a first Ctrl-C came
        self.sent = False  # ... and the stop request went out

    def run(self, handle) -> None:
        """`handle(event)` for each event of the stream, in this thread, until its end."""
        import queue
        import threading

        from memcli.server.client import ServerGone

        inbox: queue.Queue = queue.Queue()
        end = object()

        def pump() -> None:
            try:
                for event in self.events:
                    inbox.put(event)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread as it is
                inbox.put(err)
            inbox.put(end)

        thread = threading.Thread(target=pump, name="memcli-inject-stream", daemon=True)
        started = False
        while True:
            try:
                if not started:
                    started = True
                    thread.start()  # in here: a Ctrl-C while it starts is the first one too
                try:
                    item = inbox.get(timeout=0.2 if self.wanted and not self.sent else None)
                except queue.Empty:
                    item = None
                if self.wanted and not self.sent:
                    self.send()  # the first Ctrl-C came before the server named the inject
                if item is None:
                    continue
                if item is end:
                    return
                if isinstance(item, ServerGone) and self.wanted:
                    self.give_up()  # interrupted: no fresh server to continue on
                if isinstance(item, BaseException):
                    raise item
                handle(item)
            except KeyboardInterrupt:
                if self.wanted:
                    raise  # the second one (or no stop possible): `memcli: interrupted` at once
                self.wanted = True
                _cli().say("memcli: stopping once the chunk in progress is committed (Ctrl-C again quits at once, "
                           "keeping the last commit)")

    def send(self) -> None:
        """The stop request, once the server has named the inject; no answer: quit as before."""
        from memcli.server.client import Client, ServerError, ServerGone, ServerUnavailable

        if self.events.id is None:
            return  # still uploading: asked once the server names the inject
        self.sent = True
        try:
            with Client(self.client.path) as other:
                other.stop_inject(self.events.id)
        except ServerError as err:
            if err.status != 404:  # 404: it has just finished, and its report is on the way
                self.give_up()
        except (ServerUnavailable, ServerGone):
            self.give_up()

    def give_up(self):
        _cli().say(f"memcli: the server did not take the stop; pool {self.pool} keeps its last commit")
        raise KeyboardInterrupt


def _piped(items, stdin) -> bytes | None:
    """What stdin holds, read once (a retry on a fresh server sends it again)."""
    if not any(getattr(item, "kind", None) == "stdin" for item in items):
        return None
    stream = stdin if stdin is not None else sys.stdin.buffer
    return stream.read()


def _replay(piped: bytes | None):
    from io import BytesIO

    return BytesIO(piped) if piped is not None else None


def _uploads(items, piped: bytes | None):
    """Uploads for the sources, and the run's order: ("upload", Upload, k) or ("skipped", Skipped, k)
    where k counts the uploads before it."""
    from io import BytesIO

    from memcli.server.client import Upload
    from memcli.ingest.discover import Skipped

    uploads, order = [], []
    for item in items:
        if isinstance(item, Skipped):
            order.append(("skipped", item, len(uploads)))
            continue
        if item.kind == "stdin":
            upload = Upload("-", BytesIO(piped or b""), len(piped or b""))
        else:
            try:
                stream = open(item.path, "rb")
            except OSError as err:
                order.append(("skipped", Skipped(item.path, err.strerror or type(err).__name__), len(uploads)))
                continue
            upload = Upload(item.path, stream, os.fstat(stream.fileno()).st_size)
        order.append(("upload", upload, len(uploads)))
        uploads.append(upload)
    return uploads, order


def _merged_report(pool: str, order, served: dict | None):
    """The server's report (an `InjectReport`) with the files skipped here put back where discovery
    found them; after an interruption, only what came before the file it stopped in."""
    from memcli.app.api import FileResult, InjectReport

    if served is None:
        raise RoutedError("the memcli server ended the inject without a report; run the same command again")
    rows = iter(served["files"])
    files = []
    for kind, item, _ in order:
        if kind == "skipped":
            files.append(FileResult(item.path, "skipped", item.reason))
            continue
        row = next(rows, None)
        if row is None:
            break  # interrupted before this file
        files.append(FileResult(**row))
    files.extend(FileResult(**row) for row in rows)
    partial = FileResult(**served["partial"]) if served.get("partial") else None
    return InjectReport(pool=served["pool"], model=served["model"], files=files, chunks=served["chunks"],
                        tokens=served["tokens"], seconds=served["seconds"], interrupted=served["interrupted"],
                        partial=partial, unknown_words=served.get("unknown_words"))


def remote(ctx, start: bool = True) -> Remote | None:
    client = client_for(ctx, start=start)
    return Remote(ctx, client) if client is not None else None


# --------------------------------------------------------------------------- routed commands
def ask(ctx, question: str, pool: str, max_new_tokens, temperature, top_p, seed, as_json: bool) -> bool:
    """`memcli ask` through a server (the same output, --json events included); False when the
    command should run in-process."""
    server = remote(ctx)
    if server is None:
        return False
    cli = _cli()
    sampling = SimpleNamespace(temperature=temperature, top_p=top_p, seed=seed)

    def ask_once(text: str, on_text):
        return server.ask(pool, text, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)

    answer = cli._stream_answer(ask_once, question, as_json=as_json)
    if as_json:
        cli.print_json_line(cli.answer_event(pool, question, answer, answer.pool_version))
    return True


def inject(ctx, paths: list[str], pool: str, chunk_tokens, glob, force: bool, as_json: bool,
           type_: str | None = None, encoding: str | None = None) -> bool:
    """`memcli inject` through a server (the same progress, report and exit code); False when the
    command should run in-process."""
    import functools

    server = remote(ctx)
    if server is None:
        return False
    cli = _cli()
    report, interrupted = cli._run_inject(functools.partial(server.inject, pool), paths, chunk_tokens=chunk_tokens,
                                          glob=glob, force=force, type=type_, encoding=encoding)
    cli.show_inject_report(report, interrupted, as_json)
    return True


def pool_info(ctx, name: str) -> dict | None:
    """`memcli pool info` from a running server (None: none runs; read the pool here)."""
    client = client_for(ctx, start=False)
    if client is None:
        return None
    from memcli.server.client import ServerError, ServerGone, ServerUnavailable

    try:
        return client.pool_info(name)
    except (ServerUnavailable, ServerGone):
        return None
    except ServerError as err:
        _fail(err)


def chat(ctx, pool: str, max_new_tokens, temperature, top_p, seed):
    """The conversation `memcli chat` holds through a server (`memcli.app.api.ChatSession` on `Remote`:
    the chat loop is the command's own); None when the command should run in-process."""
    server = remote(ctx)
    if server is None:
        return None
    return server.chat(pool, max_new_tokens=max_new_tokens,
                       sampling=SimpleNamespace(temperature=temperature, top_p=top_p, seed=seed))


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


def _iso_times(ps: dict) -> dict:
    """`ps` (the server's /api/ps, Unix times) with its times in memcli's one format (ISO 8601, UTC)."""
    from memcli.base.clock import iso_from_epoch

    def model(row: dict) -> dict:
        pools = [{**p, "last_used": iso_from_epoch(p.get("last_used"))} for p in row.get("pools", [])]
        return {**row, "loaded_at": iso_from_epoch(row.get("loaded_at")),
                "expires_at": iso_from_epoch(row.get("expires_at")), "pools": pools}

    return {**ps, "started": iso_from_epoch(ps.get("started")), "models": [model(m) for m in ps.get("models", [])]}


def register(app: typer.Typer) -> None:
    """Add `serve`, `ps` and `stop` to the memcli app."""

    @app.command()
    def serve(
        ctx: typer.Context,
        keep_alive: Optional[str] = typer.Option(None, "--keep-alive", metavar="DURATION", help="How long a model stays loaded after its last request: 5m (default), 30s, 1h, 0 (unload after each request) or -1 (forever). MEMCLI_KEEP_ALIVE, config keep_alive."),
        host: Optional[str] = typer.Option(None, "--host", metavar="ADDRESS", help="Also listen on TCP at this address (beyond loopback only with MEMCLI_TOKEN set)."),
        port: Optional[int] = typer.Option(None, "--port", metavar="PORT", min=1, max=65535, help="TCP port (default 11435; the host defaults to 127.0.0.1)."),
        memory: Optional[str] = typer.Option(None, "--memory", metavar="SIZE", help="Budget for loaded pool states, e.g. 8G (default: half of this machine's memory)."),
        exit_when_idle: bool = typer.Option(False, "--exit-when-idle", hidden=True, help="Stop once nothing is loaded for a keep-alive (servers that commands start)."),
    ) -> None:
        """Run the resident server: models and pools stay loaded; ask, chat and inject use it."""
        from memcli.server.http import serve as run_server

        cli = _cli()
        state = cli._state(ctx)
        settings = state.settings()
        seconds = server_address.parse_keep_alive(keep_alive if keep_alive is not None else settings.keep_alive)
        budget = _parse_bytes(memory) if memory else None
        cli._quiet_libraries()
        code = run_server(settings, seconds, host=host, port=port, budget_bytes=budget, exit_when_idle=exit_when_idle)
        raise typer.Exit(code)

    @app.command()
    def ps(as_json: bool = typer.Option(False, "--json", metavar="", help="As JSON on stdout (times in ISO 8601, UTC).")) -> None:
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
            cli.print_json({**_iso_times(data), "running": True})
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
