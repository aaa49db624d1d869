"""The `memcli` command line: parse, call `memcli.api`, render with Rich.

Results go to stdout; progress, summaries and diagnostics to stderr. Every failure is one line,
`memcli: error: <message>`, and an exit code:

    0    ok
    1    error
    2    usage error (bad option or argument)
    3    inject finished, but some inputs were skipped
    130  interrupted (Ctrl-C or SIGTERM); inject keeps every committed chunk

Heavy modules (torch, transformers) are imported inside the commands, so `--help`, `--version`
and shell completion stay fast.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from . import __version__

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
EXIT_INTERRUPTED = 130

CPU_WARNING = "no CUDA GPU found; running on the CPU (slow). Set --device cpu to silence this."
DEBUG_HINT = "run with MEMCLI_DEBUG=1 for details"

_terminated = False  # set by SIGTERM: an interruption a chat session must not swallow
_warned_cpu = False  # the CPU warning is said once per process


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so every cleanup path for an interruption runs."""


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


# --------------------------------------------------------------------------- output helpers
def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def console(stderr: bool = True) -> Console:
    """A Rich console on the current stdout/stderr: no markup parsing (file names may hold "[...]"),
    no colour when NO_COLOR is set (Rich adds none when the stream is not a terminal)."""
    no_color = _no_color()
    return Console(
        file=sys.stderr if stderr else sys.stdout,
        color_system=None if no_color else "auto",
        no_color=no_color or None,
        markup=False,
        highlight=False,
        emoji=False,
    )


def shown(text: object) -> str:
    """`text` with every non-printable character escaped as repr() would (newlines, escapes,
    undecodable bytes), so a file name or message always stays one harmless line."""
    out = []
    for ch in str(text):
        out.append(ch if ch.isprintable() else repr(ch)[1:-1])
    return "".join(out)


def one_line(text: object) -> str:
    return shown(" ".join(str(text).split()))


def say(message: str, style: str | None = None) -> None:
    """One diagnostic line on stderr (never wrapped)."""
    console().print(Text(message, style=style or ""), soft_wrap=True)


def error_line(message: object) -> None:
    text = Text("memcli: ")
    text.append("error:", style="bold red")
    text.append(" " + one_line(message))
    console().print(text, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _safe_answer_text(text: str) -> str:
    """On a terminal, model output must not be able to send escape sequences."""
    if not sys.stdout.isatty():
        return text
    return "".join(ch if ch in "\n\t" or ch.isprintable() else "\ufffd" for ch in text)


def _write_stdout(text: str) -> None:
    sys.stdout.write(_safe_answer_text(text))
    sys.stdout.flush()


def _quiet_libraries() -> None:
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


# --------------------------------------------------------------------------- errors -> one line
def _user_message(err: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug."""
    from .settings import SettingsError
    from .store import PoolError

    if isinstance(err, (PoolError, SettingsError)):
        return str(err)
    if "memcli.api" in sys.modules and isinstance(err, sys.modules["memcli.api"].MemcliError):
        return str(err)
    if isinstance(err, OSError):
        what = err.strerror or str(err) or type(err).__name__
        where = err.filename
        return f"{shown(where)}: {what}" if where else what
    if isinstance(err, ValueError):  # name validation, checkpoint / config / quantization checks
        return str(err) or type(err).__name__
    return None


class _Group(TyperGroup):
    """Turns every exception of a command (and of the app callback) into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, SystemExit):
            raise
        except KeyboardInterrupt:
            say("memcli: interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as err:
            import errno

            if isinstance(err, OSError) and err.errno == errno.EPIPE:
                raise  # typer quiets a closed pipe (`memcli pool ls | head`)
            debug = bool(os.environ.get("MEMCLI_DEBUG"))
            if debug:
                traceback.print_exc(file=sys.stderr)
            message = _user_message(err)
            if message is None:
                detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                message = f"unexpected {detail}" + ("" if debug else f" ({DEBUG_HINT})")
            error_line(message)
            raise typer.Exit(EXIT_ERROR) from None


# --------------------------------------------------------------------------- state
@dataclass
class State:
    flags: dict = field(default_factory=dict)
    _settings: Any = None
    _app: Any = None

    def settings(self):
        if self._settings is None:
            from .settings import load_settings

            self._settings = load_settings(**self.flags)
        return self._settings

    def app(self):
        if self._app is None:
            from .api import Memcli

            settings = self.settings()

            def on_load(model: str, device: str) -> None:
                global _warned_cpu
                if settings.device == "auto" and device == "cpu" and not _warned_cpu:
                    _warned_cpu = True
                    say(CPU_WARNING, style="yellow")
                if console().is_terminal:
                    say(f"loading {shown(model)} on {device}...", style="dim")

            self._app = Memcli(settings, on_load=on_load)
        return self._app

    def store(self):
        from .store import PoolStore

        return PoolStore()

    def pools_api(self):
        """A Memcli for pool listing/info: those read manifests only, so no settings are needed."""
        from .api import Memcli
        from .settings import Settings

        return Memcli(Settings(), self.store())


def _state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):
        obj = State()
        ctx.find_root().obj = obj
    return obj


# --------------------------------------------------------------------------- the app
app = typer.Typer(
    cls=_Group,
    name="memcli",
    help="A local language model with a persistent memory of your documents (MemoryLLM / M+).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
pool_app = typer.Typer(
    name="pool",
    help="List, inspect, copy, rename, remove, export, import and verify memory pools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(pool_app, name="pool")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"memcli {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Model for new pools: an alias (memcli models), hub id or folder. Overrides MEMCLI_MODEL and the config file."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (MEMCLI_DEVICE)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, fp32, bf16 or fp16 (MEMCLI_DTYPE)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="auto, nf4, int8, fp32, bf16 or fp16 (MEMCLI_QUANT)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    no_server: bool = typer.Option(False, "--no-server", help="Run in this process, not through a memcli server (config: server = false)."),
) -> None:
    _quiet_libraries()
    ctx.obj = State(flags={"model": model, "device": device, "dtype": dtype, "quant": quant})
    ctx.obj.flags["server"] = False if no_server else None


# --------------------------------------------------------------------------- inject
class InjectProgress:
    """Rich progress on stderr (a terminal only): file, chunks, tokens/s, ETA from bytes when known."""

    def __init__(self, enabled: bool | None = None):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

        err = console()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TextColumn("{task.fields[chunks]} chunks", markup=False),
            TextColumn("{task.fields[rate]}", markup=False),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not (err.is_terminal if enabled is None else enabled),
        )
        self.task = None
        self.files = 0
        self.started = time.perf_counter()

    def __enter__(self) -> "InjectProgress":
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None, chunks=0, rate="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event) -> None:
        if self.task is None:
            return
        if event.kind == "file":
            self.files += 1
            name = shown(event.path)
            if len(name) > 40:
                name = "…" + name[-39:]
            self.progress.reset(self.task, total=None, completed=0, description=f"file {self.files}: {name}", chunks="0", rate="")
        elif event.kind == "chunk":
            elapsed = time.perf_counter() - self.started
            rate = f"{event.tokens / elapsed:,.0f} tok/s" if elapsed > 0 else ""
            update: dict = {"chunks": f"{event.chunks:,}", "rate": rate}
            if event.bytes_total:
                update.update(total=event.bytes_total, completed=event.bytes_done)
            self.progress.update(self.task, **update)


def _count(report, *statuses: str) -> int:
    return sum(1 for f in report.files if f.status in statuses)


def report_lines(report) -> list[str]:
    """The per-file notes (skipped, already there) and the one-line summary of an inject."""
    lines = []
    for f in report.files:
        if f.status == "skipped":
            lines.append(f"skipped {shown(f.path)}: {one_line(f.reason)}")
        elif f.status == "already":
            lines.append(f"{shown(f.path)}: {one_line(f.reason)}")
    done = _count(report, "injected", "resumed")
    if done:
        summary = (f"injected {_plural(done, 'file')} ({_plural(report.chunks, 'chunk')}, "
                   f"{_plural(report.tokens, 'token')}) into pool {report.pool} in {report.seconds:.1f} s")
    else:
        summary = f"nothing injected into pool {report.pool}"
    notes = []
    if _count(report, "resumed"):
        notes.append(f"{_count(report, 'resumed')} resumed")
    if _count(report, "already"):
        notes.append(f"{_count(report, 'already')} already in the pool")
    if report.skipped:
        notes.append(f"{len(report.skipped)} skipped")
    if notes:
        summary += " — " + ", ".join(notes)
    lines.append(summary)
    return lines


def interrupted_line(report) -> str:
    if not _count(report, "injected", "resumed") and report.partial is None:
        return "interrupted before anything was committed; run the same command again to continue"
    kept = []
    if _count(report, "injected", "resumed"):
        kept.append(_plural(_count(report, "injected", "resumed"), "complete file"))
    if report.partial is not None:
        kept.append(f"{_plural(report.partial.chunks, 'chunk')} of {shown(report.partial.path)}")
    return f"interrupted: kept {' and '.join(kept)}; run the same command again to continue"


def _run_inject(app_, pool: str, paths: list[str], **kwargs):
    """Inject with progress; returns (report, interrupted)."""
    from .api import InjectInterrupted

    stdin = sys.stdin.buffer if "-" in paths and hasattr(sys.stdin, "buffer") else None
    with InjectProgress() as progress:
        try:
            return app_.inject(pool, paths, stdin=stdin, on_event=progress, **kwargs), False
        except InjectInterrupted as stop:
            return stop.report, True


@app.command()
def inject(
    ctx: typer.Context,
    paths: List[str] = typer.Argument(..., help="Files or folders to read (.txt .md .html .pdf); - reads stdin."),
    pool: str = typer.Option(..., "--pool", "-p", help="The pool to inject into (created if new)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model of a new pool (default: the settings' model)."),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="Tokens per memory update (default 512, or what the model reads at once)."),
    glob: Optional[str] = typer.Option(None, "--glob", help="Only files matching this pattern inside folders, e.g. '*.md'."),
    force: bool = typer.Option(False, "--force", help="Inject files again even when they are already in the pool."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Read documents into a pool's memory, one chunk at a time (resumable)."""
    if cli_server.inject(ctx, paths, pool, model, chunk_tokens, glob, force, as_json):
        return
    state = _state(ctx)
    report, interrupted = _run_inject(state.app(), pool, paths, model=model, chunk_tokens=chunk_tokens,
                                      glob=glob, force=force)
    if as_json:
        print_json(report.to_json())
    else:
        for line in report_lines(report)[:-1]:
            say(line)
    if interrupted:
        say(interrupted_line(report))
        raise typer.Exit(EXIT_INTERRUPTED)
    if not as_json:
        say(report_lines(report)[-1])
    if report.skipped:
        raise typer.Exit(EXIT_SKIPPED)


# --------------------------------------------------------------------------- ask
def _stream_answer(app_, pool: str, question: str, max_new_tokens, sampling) -> None:
    """Ask, writing the answer to stdout as it comes; a started line is ended even when interrupted."""
    started = []

    def on_text(text: str) -> None:
        started.append(True)
        _write_stdout(text)

    try:
        app_.ask(pool, question, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)
    except BaseException:
        if started:
            _write_stdout("\n")
        raise
    _write_stdout("\n")


def _sampling(temperature: float, top_p: float, seed: Optional[int]):
    from .engine import Sampling

    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question (keep it short: it is read after the memory)."),
    pool: str = typer.Option(..., "--pool", "-p", help="The pool to answer from."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Longest answer, in tokens (default 256, or what the model's window leaves)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling share (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer and its timings as JSON (no streaming)."),
) -> None:
    """Answer a question from a pool's memory, streaming the answer to stdout."""
    if cli_server.ask(ctx, question, pool, max_new_tokens, temperature, top_p, seed, as_json):
        return
    app_ = _state(ctx).app()
    sampling = _sampling(temperature, top_p, seed)
    if as_json:
        answer = app_.ask(pool, question, max_new_tokens=max_new_tokens, sampling=sampling)
        print_json(answer.to_json())
        return
    _stream_answer(app_, pool, question, max_new_tokens, sampling)


# --------------------------------------------------------------------------- chat
CHAT_HELP = "type a question; /inject PATH... adds documents to the pool; /quit or Ctrl-D ends"


class _History:
    """Arrow-key editing and a history file (config dir) for an interactive chat."""

    def __init__(self):
        from . import paths

        self.file = paths.config_dir() / "chat_history"
        try:
            import readline
        except ImportError:  # pragma: no cover - no readline on this platform
            self.readline = None
            return
        self.readline = readline
        readline.set_history_length(1000)
        try:
            readline.read_history_file(self.file)
        except OSError:
            pass

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.file)
            os.chmod(self.file, 0o600)  # the questions are about somebody's documents
        except OSError:
            pass


def _read_question(interactive: bool) -> str:
    """The next line; EOFError at the end of input."""
    if not interactive:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line
    if sys.stdout.isatty():
        return input("> ")  # readline draws the prompt and edits the line on the terminal
    sys.stderr.write("> ")
    sys.stderr.flush()
    return input()


@app.command()
def chat(
    ctx: typer.Context,
    pool: str = typer.Option(..., "--pool", "-p", help="The pool to talk to."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Longest answer, in tokens (default 256, or what the model's window leaves)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
) -> None:
    """Ask many questions with the model and pool loaded once; /inject PATH adds documents."""
    if cli_server.chat(ctx, pool, max_new_tokens, temperature, top_p, seed):
        return
    from .api import MemcliError
    from .settings import SettingsError
    from .store import PoolError

    app_ = _state(ctx).app()
    app_.keep_open(pool)
    sampling = _sampling(temperature, top_p, seed)
    interactive = sys.stdin.isatty()
    history = _History() if interactive else None
    if interactive:
        say(f"pool {pool}: {CHAT_HELP}", style="dim")
    failures = 0
    try:
        while True:
            try:
                line = _read_question(interactive).strip()
            except EOFError:
                if interactive:
                    sys.stderr.write("\n")
                break
            except KeyboardInterrupt:
                if _terminated or not interactive:
                    raise
                sys.stderr.write("\n")
                continue
            if not line:
                continue
            try:
                if line.startswith("/"):
                    command, _, rest = line.partition(" ")
                    if command in ("/quit", "/exit", "/q"):
                        break
                    if command == "/help":
                        say(CHAT_HELP)
                    elif command == "/inject":
                        paths = shlex.split(rest)
                        if not paths:
                            raise MemcliError("/inject needs at least one path")
                        report, interrupted = _run_inject(app_, pool, paths)
                        for note in report_lines(report)[:-1]:
                            say(note)
                        if interrupted:
                            say(interrupted_line(report))
                            if _terminated or not interactive:
                                raise typer.Exit(EXIT_INTERRUPTED)
                        else:
                            say(report_lines(report)[-1])
                        if report.skipped:
                            failures += 1
                    else:
                        raise MemcliError(f"unknown command {command} ({CHAT_HELP})")
                    continue
                _stream_answer(app_, pool, line, max_new_tokens, sampling)
            except (MemcliError, PoolError, SettingsError, ValueError) as err:
                failures += 1
                error_line(err)
            except KeyboardInterrupt:
                if _terminated or not interactive:
                    raise
                say("(interrupted)")
    finally:
        if history is not None:
            history.save()
    if failures and not interactive:
        raise typer.Exit(EXIT_ERROR)


# --------------------------------------------------------------------------- pools
def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(show_edge=False, header_style="bold", box=None, pad_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        if column in right:  # numbers: never cut
            table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
        else:
            table.add_column(column, overflow="fold")
    return table


def _tail(text: str, width: int) -> str:
    """Long model paths keep their informative end."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    return iso.replace("T", " ")[:16]


@pool_app.command("ls")
def pool_ls(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Exact numbers as JSON.")) -> None:
    """List the pools."""
    rows = _state(ctx).pools_api().list_pools()
    if as_json:
        print_json(rows)
        return
    if not rows:
        say("no pools yet (memcli inject FILE --pool NAME creates one)")
        return
    table = _table("name", "model", "size", "sources", "chunks", "tokens", "updated",
                   right=("size", "sources", "chunks", "tokens"))
    for row in rows:
        if row["error"]:
            table.add_row(row["name"], Text(f"damaged: {one_line(row['error'])}", style="red"), "", "", "", "", "")
            continue
        table.add_row(row["name"], _tail(shown(row["model"] or "?"), 24), human_bytes(row["bytes_on_disk"]), f"{row['sources']:,}",
                      f"{row['chunks']:,}", f"{row['tokens']:,}", _when(row["updated"]))
    console(stderr=False).print(table)


@pool_app.command("info")
def pool_info(ctx: typer.Context, name: str = typer.Argument(..., help="Pool name."),
              as_json: bool = typer.Option(False, "--json", help="Exact numbers as JSON.")) -> None:
    """Show a pool's facts and how much of each source is still in memory."""
    info = cli_server.pool_info(ctx, name) or _state(ctx).pools_api().pool_info(name)
    if as_json:
        print_json(info)
        return
    out = console(stderr=False)
    facts = _table("", "")
    facts.show_header = False
    complete = sum(1 for s in info["sources"] if s.get("complete"))
    for key, value in (
        ("name", info["name"]),
        ("model", f"{info['model']} ({info['family']})"),
        ("size on disk", human_bytes(info["bytes_on_disk"])),
        ("sources", f"{len(info['sources']):,}" + (f" ({len(info['sources']) - complete} incomplete)" if complete < len(info["sources"]) else "")),
        ("chunks", f"{info['chunks']:,}"),
        ("tokens", f"{info['tokens']:,}"),
        ("version", str(info["version"])),
        ("created", _when(info["created"])),
        ("updated", _when(info["updated"])),
    ):
        facts.add_row(Text(key, style="bold"), shown(value))
    out.print(facts)
    retention = info.get("retention") or []
    if retention:
        out.print()
        table = _table("source", "chunks", "retained", "rows in STM", "rows in LTM",
                       right=("chunks", "retained", "rows in STM", "rows in LTM"))
        for row in retention:
            table.add_row(_tail(shown(row["source"]), 48), f"{row['chunks']:,}", f"{100 * row['share_retained']:.1f}%",
                          f"{row['rows_in_stm']:,}", f"{row['rows_in_ltm']:,}")
        out.print(table)


@pool_app.command("fork")
def pool_fork(ctx: typer.Context, src: str = typer.Argument(..., help="Pool to copy."),
              dst: str = typer.Argument(..., help="Name of the copy.")) -> None:
    """Copy a pool (cheap: parts are shared by hard links)."""
    _state(ctx).store().fork(src, dst)
    say(f"forked pool {src} to {dst}")


@pool_app.command("rename")
def pool_rename(ctx: typer.Context, old: str = typer.Argument(...), new: str = typer.Argument(...)) -> None:
    """Rename a pool."""
    _state(ctx).store().rename(old, new)
    say(f"renamed pool {old} to {new}")


@pool_app.command("rm")
def pool_rm(ctx: typer.Context, name: str = typer.Argument(..., help="Pool to delete."),
            yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete a pool (asks first; without a terminal, needs --yes)."""
    from .store import PoolError, PoolNotFound, validate_name

    store = _state(ctx).store()
    validate_name(name)
    if not store.exists(name):
        raise PoolNotFound(f"pool {name} not found")
    if not yes:
        if not sys.stdin.isatty():
            raise PoolError(f"refusing to remove pool {name} without --yes (no terminal to confirm on)")
        if not typer.confirm(f"Remove pool {name} and everything in its memory? This cannot be undone.", err=True):
            say(f"kept pool {name}")
            raise typer.Exit(EXIT_ERROR)
    store.remove(name)
    say(f"removed pool {name}")


@pool_app.command("export")
def pool_export(ctx: typer.Context, name: str = typer.Argument(...),
                file: Path = typer.Argument(..., help="The .tar file to write.")) -> None:
    """Write a pool to one file (a tar), e.g. for a backup or another machine."""
    _state(ctx).store().export(name, file)
    size = file.stat().st_size if file.exists() else None
    say(f"exported pool {name} to {shown(file)} ({human_bytes(size)})")


@pool_app.command("import")
def pool_import(ctx: typer.Context, file: Path = typer.Argument(..., help="A file written by memcli pool export."),
                name: Optional[str] = typer.Argument(None, help="Pool name (default: the exported name).")) -> None:
    """Create a pool from an exported file (every part is checked first)."""
    info = _state(ctx).store().import_(file, name)
    say(f"imported pool {info.name} from {shown(file)}")


@pool_app.command("verify")
def pool_verify(ctx: typer.Context, name: str = typer.Argument(...)) -> None:
    """Check a pool's manifest and the checksum of every part."""
    store = _state(ctx).store()
    problems = store.verify(name)
    if problems:
        for problem in problems:
            sys.stdout.write(one_line(problem) + "\n")
        error_line(f"pool {name} is damaged ({_plural(len(problems), 'problem')})")
        raise typer.Exit(EXIT_ERROR)
    parts = store.info(name).num_parts
    sys.stdout.write(f"pool {name}: ok ({_plural(parts, 'part')} verified)\n")


# --------------------------------------------------------------------------- models
@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="As JSON.")) -> None:
    """The known models and whether each is downloaded (never goes online)."""
    from .api import list_models

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    table = _table("model", "hub id", "status", "size", right=("size",))
    for row in rows:
        status = Text(row["status"], style="green" if row["status"] == "downloaded" else "yellow" if row["status"] == "partial" else "")
        if row["problem"] and row["status"] != "downloaded":
            status.append(f" ({row['problem']})")
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(name, row["repo"], status, human_bytes(row["bytes"]) if row["bytes"] else "")
    console(stderr=False).print(table)


@app.command()
def pull(model: str = typer.Argument(..., help="An alias (memcli models) or a hub id owner/name.")) -> None:
    """Download a model into the Hugging Face cache (an interrupted download resumes)."""
    from .api import pull_model

    folder = pull_model(model)
    sys.stdout.write(f"{folder}\n")


# --------------------------------------------------------------------------- doctor
@app.command()
def doctor(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="As JSON.")) -> None:
    """What this machine can run: GPU, quantization, disk, paths and the resolved settings."""
    from .api import diagnose

    report = diagnose(_state(ctx).settings())
    if as_json:
        print_json(report)
        return
    out = console(stderr=False)
    table = _table("", "")
    table.show_header = False

    def row(key: str, value: object) -> None:
        table.add_row(Text(key, style="bold"), shown(value))

    row("memcli", report["memcli"])
    row("python", f"{report['python']} ({report['executable']})")
    row("torch", report["torch"])
    cuda = report["cuda"]
    if cuda["available"]:
        for device in cuda["devices"]:
            free = human_bytes(device["free_bytes"]) if device["free_bytes"] is not None else "?"
            row(f"cuda:{device['index']}", f"{device['name']}, {human_bytes(device['total_bytes'])} total, {free} free")
    else:
        row("cuda", "not available")
    row("bitsandbytes", report["bitsandbytes"] or "not installed")
    for device, modes in report["quant_modes"].items():
        works = [mode for mode, reason in modes.items() if reason is None]
        row(f"quant on {device}", ", ".join(works) if works else "none")
    disk = report["disk"]
    row("free disk (data)", f"{human_bytes(disk['data_free_bytes'])} at {disk['data_dir']}")
    row("free disk (models)", f"{human_bytes(disk['hf_cache_free_bytes'])} at {disk['hf_cache']}")
    for key in ("data", "config_file", "cache", "hf_cache"):
        row(key.replace("_", " "), report["paths"][key])
    settings, resolved = report["settings"], report["resolved"]
    row("model", settings["model"])
    for key in ("device", "dtype", "quant"):
        value = settings[key]
        if value == "auto" and resolved[key]:
            value = f"auto -> {resolved[key]}"
        row(key, value)
    out.print(table)
    out.print()
    if report["problems"]:
        out.print(Text("what will not work here:", style="bold yellow"))
        for problem in report["problems"]:
            out.print(Text(f"  - {shown(problem)}"), soft_wrap=True)
    else:
        out.print(Text("no problems found", style="green"))


from . import cli_server  # noqa: E402 - serve, ps, stop and the routing through a running server

cli_server.register(app)


# --------------------------------------------------------------------------- entry point
def main() -> None:
    """The console script: SIGTERM interrupts like Ctrl-C (exit 130, inject keeps what is committed)."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    app(prog_name="memcli")


__all__ = ["app", "main"]
