"""The `memcli` command line: parse, call `memcli.app.api`, render with Rich.

Results go to stdout; progress, summaries and diagnostics to stderr. Every failure is one line,
`memcli: error: <message>`, and an exit code:

    0    ok
    1    error
    2    usage error (bad option or argument)
    3    inject finished, but some inputs were skipped
    130  interrupted (Ctrl-C or SIGTERM); inject keeps every committed chunk

Heavy modules (torch, transformers, the engine) are imported inside the commands that run a model,
so `--help`, `--version`, completion, `pool ls/info/verify`, `models` and `config` stay light.
Global options (--model, --device, --dtype, --quant) are accepted before or after the command.

Commands reach the library through `State.app()` (inject, ask, chat, pool info): the one place where
another backend (a running server's client) can stand in for the in-process `memcli.app.api.Memcli`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer._coercion import RuntimeParam  # typer 0.29: see _runtime_param
from typer.core import TyperGroup

from memcli import __version__
from memcli.app import settings as settings_table  # torch- and tomllib-free: the keys for help and completion

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
EXIT_INTERRUPTED = 130

CPU_WARNING = ("no CUDA GPU found; running on the CPU (slow). To silence this, set the device: "
               "memcli config set device cpu (or --device cpu, MEMCLI_DEVICE=cpu)")
DEBUG_HINT = "run with MEMCLI_DEBUG=1 for details"

_terminated = False  # set by SIGTERM: an interruption a chat session must not swallow
_warned_cpu = False  # the CPU warning is said once per process


class UsageProblem(ValueError):
    """A command given without something it needs (exit 2, like other usage errors)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so every cleanup path for an interruption runs."""


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


# --------------------------------------------------------------------------- output helpers
def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


_live_console: Console | None = None  # stderr console of the progress display while it is shown

# Columns for output that is not a terminal: wide enough that a table row is never wrapped
# (pipes into grep and awk get one line per row).
UNWRAPPED_WIDTH = 10_000


def console(stderr: bool = True) -> Console:
    """A Rich console on the current stdout/stderr: no markup parsing (file names may hold "[...]"),
    no colour when NO_COLOR is set (Rich adds none when the stream is not a terminal). While a
    progress display is live, stderr lines go through its console, so they print above it instead
    of breaking it."""
    if stderr and _live_console is not None:
        return _live_console
    no_color = _no_color()
    stream = sys.stderr if stderr else sys.stdout
    made = Console(
        file=stream,
        color_system=None if no_color else "auto",
        no_color=no_color or None,
        markup=False,
        highlight=False,
        emoji=False,
    )
    if not made.is_terminal:
        made.width = UNWRAPPED_WIDTH
    return made


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


def print_json_line(data: Any) -> None:
    """One JSON object on one line (NDJSON: streamed events, chat turns)."""
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
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


class _SayHandler(logging.Handler):
    """memcli's own log warnings (an unreadable PDF page) as one stderr line each, through say(), so
    during an inject they print above the progress display instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"memcli: {record.levelname.lower()}: {one_line(record.getMessage())}", style="yellow")
        except Exception:  # a log line must never fail a command
            pass


def _quiet_libraries() -> None:
    own = logging.getLogger("memcli")
    if not any(isinstance(handler, _SayHandler) for handler in own.handlers):
        own.addHandler(_SayHandler(logging.WARNING))
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    # bitsandbytes logs its optional kernels' absence ("Failed to load CPU gemm_4bit_forward ...")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # bitsandbytes' CPU backend asks the `kernels` package for a hub kernel; offline it warns
    # ("Skipping publisher trust check ...") on every 4-bit load: not ours to show
    logging.getLogger("kernels").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


# --------------------------------------------------------------------------- errors -> one line
def _user_message(err: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug."""
    from memcli.app.settings import SettingsError

    if isinstance(err, SettingsError):
        return str(err)
    if "memcli.store" in sys.modules and isinstance(err, sys.modules["memcli.store"].PoolError):
        return str(err)
    if "memcli.app.api" in sys.modules and isinstance(err, sys.modules["memcli.app.api"].MemcliError):
        return str(err)
    if isinstance(err, OSError):
        what = err.strerror or str(err) or type(err).__name__
        where = err.filename
        return f"{shown(where)}: {what}" if where else what
    if isinstance(err, ValueError):  # name validation, checkpoint / config / quantization checks
        return str(err) or type(err).__name__
    return None


GLOBAL_OPTIONS = ("--model", "--device", "--dtype", "--quant")
GLOBAL_FLAGS = ("--no-server",)


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with the global options (and their values) that come after the command moved in front
    of it, so `memcli ask q --pool p --device cpu` means `memcli --device cpu ask q --pool p`.
    Nothing after `--` moves."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if arg in GLOBAL_FLAGS and rest:
            front.append(arg)
            i += 1
            continue
        if name in GLOBAL_OPTIONS and rest:
            take = 1 if "=" in arg else 2
            front.extend(args[i:i + take])
            i += take
            continue
        rest.append(arg)
        i += 1
    return front + rest


def flowing(help_text: str | None) -> str | None:
    """A docstring as help shows it: each paragraph one flowing line (typer's Rich help keeps a
    docstring's line breaks, so a sentence wrapped in the source broke mid-way on the screen);
    paragraphs stay apart, and one that starts with \\b keeps its lines (click's convention)."""
    if not help_text:
        return help_text
    import inspect

    paragraphs = inspect.cleandoc(help_text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


class _Group(TyperGroup):
    """Turns every exception of a command (and of the app callback) into one line and an exit code;
    help texts flow (`flowing`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = flowing(self.help)
        for command in self.commands.values():
            command.help = flowing(command.help)

    def parse_args(self, ctx, args):
        if ctx.parent is None:
            args = hoist_global_options(list(args))
        return super().parse_args(ctx, args)

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
            if isinstance(err, UsageProblem):
                error_line(message)
                raise typer.Exit(EXIT_USAGE) from None
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
            from memcli.app.settings import load_settings

            self._settings = load_settings(**self.flags)
        return self._settings

    def app(self):
        """The library behind inject, ask, chat and pool info (`memcli.app.api.Memcli`)."""
        if self._app is None:
            from memcli.app.api import Memcli

            settings = self.settings()

            def on_load(model: str, device: str) -> None:
                global _warned_cpu
                from memcli.loading.catalog import made_for_cpu

                if settings.device == "auto" and device == "cpu" and not _warned_cpu and not made_for_cpu(model):
                    _warned_cpu = True
                    say(CPU_WARNING, style="yellow")
                if LiveProgress.active is not None:
                    LiveProgress.active.loading(model, device)  # shown in the display, gone after it
                elif console().is_terminal:
                    say(f"loading {shown(model)} on {device}...", style="dim")

            self._app = Memcli(settings, on_load=on_load)
        return self._app

    def store(self):
        from memcli.pools.meta import PoolStore

        return PoolStore()

    def pools_api(self):
        """A Memcli for pool listing/info/rebind: those read manifests only, so no settings are needed."""
        from memcli.app.api import Memcli
        from memcli.app.settings import Settings

        return Memcli(Settings(), self.store())

    def pool(self, given: str | None) -> str:
        """The pool a command works on: --pool, else the configured default."""
        if given:
            return given
        settings = self.settings()
        if settings.pool:
            return settings.pool
        raise UsageProblem("no pool given: use --pool NAME, or set a default with memcli config set pool NAME")

    def require_pool(self, name: str) -> str:
        """`name` if that pool exists, else the one-line "pool X not found; did you mean Y?"."""
        return self.pools_api().require_pool(name)


def _state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):
        obj = State()
        ctx.find_root().obj = obj
    return obj


# --------------------------------------------------------------------------- completion
def complete_pool(incomplete: str) -> list[str]:
    """Pool names for shell completion: the folders with a manifest (no store, no torch)."""
    from memcli.base import paths

    try:
        names = sorted(os.listdir(paths.pools_dir()))
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete) and not n.startswith(".")
            and os.path.isfile(os.path.join(paths.pools_dir(), n, "manifest.json"))]


def complete_model(incomplete: str) -> list[str]:
    """Model aliases, then folders, for shell completion."""
    from memcli.loading.catalog import ALIASES, BUNDLED

    found = [alias for alias in (*ALIASES, *BUNDLED) if alias.startswith(incomplete)]
    return found + paths_starting(incomplete, folders_only=True)


def complete_path(incomplete: str) -> list[str]:
    return paths_starting(incomplete)


def paths_starting(incomplete: str, folders_only: bool = False) -> list[str]:
    """Paths starting with `incomplete` (folders end with "/")."""
    folder, _, prefix = incomplete.rpartition("/")
    where = os.path.expanduser(folder or ".") if folder or not incomplete.startswith("/") else "/"
    try:
        names = sorted(os.listdir(where))
    except OSError:
        return []
    out = []
    for name in names:
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        full = (folder + "/" if folder or incomplete.startswith("/") else "") + name
        if os.path.isdir(os.path.join(where, name)):
            out.append(full + "/")
        elif not folders_only:
            out.append(full)
    return out


def complete_config_key(incomplete: str) -> list[tuple[str, str]]:
    """Every setting (with its description, for shells that show one)."""
    return [(key, settings_table.HELP[key]) for key in settings_table.KEYS if key.startswith(incomplete)]


# --------------------------------------------------------------------------- the app
GLOBAL_NOTE = "Global options (--model, --device, --dtype, --quant, --no-server) may also come after the command."
def _command_group(name: str, help: str, **extra) -> typer.Typer:
    """A command group as every group of memcli's is: -h/--help, help when called bare, our errors
    instead of typer's tracebacks, global options accepted after the command (_Group)."""
    return typer.Typer(cls=_Group, name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]}, **extra)


app = _command_group(
    "memcli", "A local language model with a persistent memory of your documents (MemoryLLM / M+).",
    epilog="Examples:  memcli inject notes/ --pool work  ·  memcli ask 'When is the launch?' --pool work  ·  "
           "memcli config set pool work",
)
pool_app = _command_group("pool", "List, inspect, copy, rename, remove, export, import, verify and rebind memory pools.")
config_app = _command_group("config", "Read and write the config file's defaults (see `memcli config get`).")
app.add_typer(pool_app, name="pool")
app.add_typer(config_app, name="config")

# --------------------------------------------------------------------------- typer, adapted (typer 0.29)
# Help shows an argument's name (PATH, QUESTION), not a Python type ("<list[str]>"); flags show none.
# Every option of memcli's names its value (a metavar: N, POOL, FILE; tests/test_newcomer_cli.py walks
# the whole command tree to check it), so no "<str>" or "<int range>" reaches the help.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = (  # type: ignore[method-assign]
    lambda self, ctx: None if self.is_flag else _option_type(self, ctx))
FLAG = ""  # metavar of a flag: nothing after its name


def _usage_name(self) -> str:
    """An argument in the usage line as every man page writes it: PATH... (required, repeated),
    [POOL] (optional); typer 0.29 writes {PATH...}... and [[POOL]] from the same metavars."""
    name = self.display_name_raw
    if self.nargs != 1 and not name.endswith("..."):
        name += "..."
    return name if self.required else f"[{name}]"


typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]


def _plain_converter(annotation, info):
    """How to turn a command-line string into `annotation` without pydantic, for the plain types
    memcli's parameters have (str, int, float, bool, Path, lists of them); None for anything else
    (then typer's own way applies).

    typer 0.29 converts every parameter through a pydantic TypeAdapter, built on its first use:
    importing pydantic and building the adapters of the root's and a command's parameters cost
    about 60 ms per command, more than `memcli --version` takes in all (issue 19, item 12)."""
    import typing
    from pathlib import PurePath

    from typer._param_types import coerce_cli_path

    if typing.get_origin(annotation) is list:
        [item] = typing.get_args(annotation)
        one = _plain_converter(item, info)
        return None if one is None else (lambda value, param, ctx: [one(v, param, ctx) for v in value])
    if getattr(info, "parser", None) is not None or getattr(info, "clamp", False):
        return None

    def bad(message: str, param, ctx):
        return typer.BadParameter(message, ctx=ctx, param=param)

    def number(kind, word: str):
        def convert(value, param, ctx):
            if isinstance(value, kind) and not isinstance(value, bool):
                number_ = value
            else:
                try:
                    number_ = kind(str(value).strip())
                except ValueError:
                    raise bad(f"{value!r} is not {word}", param, ctx) from None
            if number_ != number_ or number_ in (float("inf"), float("-inf")):
                raise bad(f"{value!r} is not {word}", param, ctx)
            low, high = info.min, info.max
            if (low is not None and number_ < low) or (high is not None and number_ > high):
                allowed = (f"from {low} to {high}" if low is not None and high is not None
                           else f"at least {low}" if low is not None else f"at most {high}")
                raise bad(f"{value} is out of range: it must be {allowed}", param, ctx)
            return number_
        return convert

    if annotation is str:
        return lambda value, param, ctx: os.fsdecode(value) if isinstance(value, bytes) else str(value)
    if annotation is int:
        return number(int, "a whole number")
    if annotation is float:
        return number(float, "a number")
    if annotation is bool:
        def boolean(value, param, ctx):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise bad(f"{value!r} is not true or false", param, ctx)
        return boolean
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return lambda value, param, ctx: coerce_cli_path(annotation(value), info, path_type=annotation,
                                                         param=param, ctx=ctx)
    return None


@dataclass(frozen=True)
class _PlainParam(RuntimeParam):
    """A parameter converted by `_plain_converter`'s function."""

    convert: Any = None

    def _coerce_value(self, value, param, ctx):
        return self.convert(value, param, ctx)


def _runtime_param(self):
    """typer's per-parameter converter, made by `_plain_converter` where it can (no pydantic)."""
    if self._runtime_param is None:
        descriptor = self.type_descriptor
        convert = None if descriptor.file_annotation is not None or descriptor.is_choice else \
            _plain_converter(descriptor.annotation, descriptor.parameter_info)
        if convert is None:
            return _typer_runtime_param(self)
        self._runtime_param = _PlainParam(descriptor.parameter_info, descriptor.annotation, convert)
    return self._runtime_param


_typer_runtime_param = typer.core._TyperParameter.get_runtime_param
typer.core._TyperParameter.get_runtime_param = _runtime_param  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"memcli {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", autocompletion=complete_model,
                                        help="An alias (memcli models), hub id or folder: the model of new pools; for an existing pool, the same model from elsewhere (checked). Overrides MEMCLI_MODEL and the config file."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (MEMCLI_DEVICE)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE", help="auto, fp32, bf16 or fp16 (MEMCLI_DTYPE)."),
    quant: Optional[str] = typer.Option(None, "--quant", metavar="QUANT", help="auto, nf4, int8, fp32, bf16 or fp16 (MEMCLI_QUANT)."),
    version: bool = typer.Option(False, "--version", metavar=FLAG, callback=_version, is_eager=True, help="Show the version and exit."),
    no_server: bool = typer.Option(False, "--no-server", metavar=FLAG, help="Run in this process, not through a memcli server (config: server = false; MEMCLI_SERVER=0)."),
) -> None:
    _quiet_libraries()
    ctx.obj = State(flags={"model": model, "device": device, "dtype": dtype, "quant": quant})
    ctx.obj.flags["server"] = False if no_server else None


# --------------------------------------------------------------------------- inject
def _eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class LiveProgress:
    """A Rich progress display on stderr, on a terminal only: a spinner, what is being done, a bar
    and text columns (`fields`). Transient: nothing of it stays on the terminal. While it is shown,
    stderr lines (say()) print above it and the model's loading note goes into it."""

    active: "LiveProgress | None" = None  # the display being shown (the loading note goes there)

    def __init__(self, fields: tuple[str, ...], enabled: bool | None = None):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        err = console()
        self.fields = fields
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            *(TextColumn(f"{{task.fields[{name}]}}", markup=False) for name in fields),
            console=err,
            transient=True,
            disable=not (err.is_terminal if enabled is None else enabled),
        )
        self.task = None

    def __enter__(self):
        global _live_console
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=None, **dict.fromkeys(self.fields, ""))
        if not self.progress.disable:
            LiveProgress.active = self
            _live_console = self.progress.console
        return self

    def __exit__(self, *exc) -> None:
        global _live_console
        LiveProgress.active = None
        _live_console = None
        self.progress.__exit__(*exc)

    def loading(self, model: str, device: str) -> None:
        name = shown(model)
        name = name if len(name) <= 40 else "…" + name[-39:]
        self.progress.update(self.task, description=f"loading {name} on {device}…", refresh=True)


class InjectProgress(LiveProgress):
    """inject's display: "file k of n", chunks, tokens/s and an ETA from the file's position (bytes,
    or pages of a PDF). Rate and ETA count from this run's first chunk of the file (a resumed file's
    skipped part is not work done) and use the file's whole average, so the ETA does not jump with
    one slow chunk."""

    def __init__(self, enabled: bool | None = None):
        super().__init__(("chunks", "rate", "eta"), enabled)

    def __call__(self, event) -> None:
        if self.task is None:
            return
        if event.kind == "file":
            name = os.path.basename(shown(event.path)) or shown(event.path)
            if len(name) > 40:
                name = "…" + name[-39:]
            self.progress.reset(self.task, total=None, completed=0, chunks="", rate="", eta="",
                                description=f"file {event.file_index:,} of {event.files_total:,}: {name}")
            self.progress.refresh()
        elif event.kind == "chunk":
            update: dict = {"chunks": _plural(event.chunks, "chunk"), "rate": "", "eta": ""}
            if event.seconds > 0:
                update["rate"] = f"{event.tokens / event.seconds:,.0f} tok/s"
            if event.total:
                update.update(total=event.total, completed=event.done)
                progressed = event.done - event.start
                if progressed > 0 and event.seconds > 0:
                    update["eta"] = "ETA " + _eta((event.total - event.done) * event.seconds / progressed)
            self.progress.update(self.task, **update)


def report_lines(report) -> list[str]:
    """The per-file notes (skipped, already there, changed) and the one-line summary of an inject:
    injected / changed / resumed / already in / skipped by reason / ignored by type."""
    lines = []
    for f in report.files:
        if f.status == "skipped":
            lines.append(f"skipped {shown(f.path)}: {one_line(f.reason)}")
        elif f.status == "already":
            lines.append(f"{shown(f.path)}: {one_line(f.reason)}")
        elif f.status == "changed":
            lines.append(f"changed {shown(f.path)}: injected again (the earlier version's rows stay and fade)")
    if _unknown_line(report):
        lines.append(_unknown_line(report))
    done = report.count("injected", "resumed", "changed")
    if done:
        summary = (f"injected {_plural(done, 'file')} ({_plural(report.chunks, 'chunk')}, "
                   f"{_plural(report.tokens, 'token')}) into pool {report.pool} in {report.seconds:.1f} s")
    else:
        summary = f"nothing injected into pool {report.pool}"
    counts = report.summary()
    notes = []
    for key, label in (("changed", "changed"), ("resumed", "resumed"), ("already", "already in the pool"),
                       ("packed", "too short alone, packed together")):
        if counts[key]:
            notes.append(f"{counts[key]:,} {label}")
    if report.skipped:
        reasons = sorted(counts["skipped_by_reason"].items(), key=lambda kv: -kv[1])
        shown_reasons = ", ".join(f"{n:,} {one_line(reason)[:60]}" for reason, n in reasons[:3])
        more = f", {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
        notes.append(f"{len(report.skipped):,} skipped ({shown_reasons}{more})")
    ignored = counts["ignored_by_type"]
    if ignored:
        kinds = ", ".join(f"{k} {v:,}" for k, v in list(ignored.items())[:5])
        notes.append(f"{sum(ignored.values()):,} ignored by type ({kinds})")
    if counts["ignored_by_glob"]:
        notes.append(f"{counts['ignored_by_glob']:,} not matching --glob")
    if notes:
        summary += " — " + ", ".join(notes)
    lines.append(summary)
    return lines


def _unknown_line(report) -> str | None:
    """The words of what was read that the model has never seen, in one line (None: there are none)."""
    from memcli.loading.vocabulary import note

    line = note(report.unknown_words, "what was read")
    return shown(line) if line else None


def interrupted_line(report) -> str:
    if not report.count("injected", "resumed", "changed") and report.partial is None:
        return "interrupted before anything was committed; run the same command again to continue"
    kept = []
    if report.count("injected", "resumed", "changed"):
        kept.append(_plural(report.count("injected", "resumed", "changed"), "complete file"))
    if report.partial is not None:
        kept.append(f"{_plural(report.partial.chunks, 'chunk')} of {shown(report.partial.path)}")
    return f"interrupted: kept {' and '.join(kept)}; run the same command again to continue"


def _run_inject(inject, paths: list[str], **kwargs):
    """Inject with progress through `inject(paths, stdin=..., on_event=..., **kwargs)` (the library's
    function, bound to its pool); returns (report, interrupted)."""
    from memcli.app.api import InjectInterrupted

    stdin = sys.stdin.buffer if "-" in paths and hasattr(sys.stdin, "buffer") else None
    with InjectProgress() as progress:
        try:
            return inject(paths, stdin=stdin, on_event=progress, **kwargs), False
        except InjectInterrupted as stop:
            return stop.report, True


POOL_HELP = "The pool (default: config pool, MEMCLI_POOL)."


@app.command(epilog="Examples:  memcli inject notes.pdf ~/notes --pool work  ·  "
                    "memcli inject /usr/share/man/man1 --glob 'git*' --pool man  ·  cat log | memcli inject - -p work. "
                    + GLOBAL_NOTE)
def inject(
    ctx: typer.Context,
    paths: List[str] = typer.Argument(..., metavar="PATH...", autocompletion=complete_path,
                                      help="Files or folders (every text file: text in any encoding, Markdown, HTML, PDF, man pages, source code, CSV/JSON, gzip); - reads stdin."),
    pool: Optional[str] = typer.Option(None, "--pool", "-p", metavar="POOL", autocompletion=complete_pool,
                                       help=POOL_HELP + " Created, bound to --model, if new."),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", metavar="N", help="Tokens per memory update (default 512, or what the model reads at once)."),
    glob: Optional[str] = typer.Option(None, "--glob", metavar="PATTERN", help="Only files matching this pattern inside folders, e.g. '*.md' or 'notes/**/*.txt'."),
    type_: Optional[str] = typer.Option(None, "--type", metavar="TYPE", help="Read every file as this type: text, markdown, html, pdf or man (default: from the content)."),
    encoding: Optional[str] = typer.Option(None, "--encoding", metavar="ENCODING", help="The text's encoding, e.g. latin-1 (default: detected)."),
    force: bool = typer.Option(False, "--force", metavar=FLAG, help="Inject files again even when they are already in the pool."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="Print the report as JSON on stdout."),
) -> None:
    """Read documents into a pool's memory, one chunk at a time (resumable).

    A file already in the pool is skipped; a file whose content changed is injected again.
    Exit code 3 when something was skipped."""
    import functools

    state = _state(ctx)
    name = state.pool(pool)
    if cli_server.inject(ctx, paths, name, chunk_tokens, glob, force, as_json, type_=type_, encoding=encoding):
        return
    report, interrupted = _run_inject(functools.partial(state.app().inject, name), paths, chunk_tokens=chunk_tokens,
                                      glob=glob, force=force, type=type_, encoding=encoding)
    show_inject_report(report, interrupted, as_json)


def show_inject_report(report, interrupted: bool, as_json: bool) -> None:
    """An inject's outcome (in-process or through a server): the report, and its exit code."""
    if as_json:
        print_json(report.to_json())
        if _unknown_line(report):
            say(_unknown_line(report))  # on stderr also with --json
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
def _stream_answer(ask, question: str, as_json: bool = False):
    """Ask through `ask(question, on_text=...)`, writing the answer to stdout as it comes (NDJSON
    "text" events with --json); a started line is ended even when interrupted."""
    started = []

    def on_text(text: str) -> None:
        started.append(True)
        if as_json:
            print_json_line({"event": "text", "text": text})
        else:
            _write_stdout(text)

    try:
        answer = ask(question, on_text=on_text)
    except BaseException:
        if started and not as_json:
            _write_stdout("\n")
        raise
    if not as_json:
        _write_stdout("\n")
    from memcli.loading.vocabulary import note

    unknown = note(answer.to_json().get("unknown_words"), "the question")
    if unknown:
        say(shown(unknown), style="yellow")
    return answer


def answer_event(pool: str, question: str, answer, pool_version: int | None) -> dict:
    """`ask --json`'s last line, in-process and through a server alike: what was asked, the answer
    (`Answer.to_json()`), and the pool version it was read from."""
    return {"event": "answer", "pool": pool, "question": question.strip(), **answer.to_json(),
            "pool_version": pool_version}


def _checked_sampling(temperature: float, top_p: float, seed: Optional[int]) -> tuple[float, float, Optional[int]]:
    """The options as `memcli.app.sampling` checks them for the server too (finite, in range; a
    positive temperature below 0.01 decodes greedily); a usage error naming the option otherwise."""
    from memcli.app.sampling import SamplingError, check_sampling

    try:
        return check_sampling(temperature, top_p, seed, names=("--temperature", "--top-p", "--seed"), top_p_zero=True)
    except SamplingError as err:
        raise UsageProblem(str(err)) from None


def _sampling(temperature: float, top_p: float, seed: Optional[int]):
    from memcli.core.engine import Sampling

    temperature, top_p, seed = _checked_sampling(temperature, top_p, seed)
    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


@app.command(epilog="Examples:  memcli ask 'When is the Orion launch?' --pool work  ·  "
                    "echo 'Who is Bob?' | memcli ask - --json. " + GLOBAL_NOTE)
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., metavar="QUESTION", help="The question (keep it short: it is read after the memory); - reads it from stdin."),
    pool: Optional[str] = typer.Option(None, "--pool", "-p", metavar="POOL", autocompletion=complete_pool, help=POOL_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N", min=1, help="Longest answer, in tokens (default 256, or what the model's window leaves)."),
    temperature: float = typer.Option(0.0, "--temperature", metavar="T", min=0.0, help="0 decodes greedily (so does any value below 0.01)."),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", min=0.0, max=1.0, help="Nucleus sampling share (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="Stream NDJSON events: \"text\" events with the answer's pieces, then one \"answer\" event with the question, the answer, the pool version, timings and token counts."),
    sources: bool = typer.Option(False, "--sources", metavar=FLAG, help="After the answer, the sources whose memory rows the question read most (also in --json)."),
) -> None:
    """Answer a question from a pool's memory, streaming the answer to stdout."""
    state = _state(ctx)
    if question == "-":
        question = sys.stdin.read()
        if not question.strip():
            raise UsageProblem("ask -: stdin held no question")
    name = state.pool(pool)
    temperature, top_p, seed = _checked_sampling(temperature, top_p, seed)  # the server checks them alike
    # --sources reads the engine's attention over memory rows: answered in this process
    if not sources and cli_server.ask(ctx, question, name, max_new_tokens, temperature, top_p, seed, as_json):
        return
    app_ = state.app()
    sampling = _sampling(temperature, top_p, seed)
    if as_json or sources:
        app_.keep_open(name)  # loaded once: the answer, its pool version and --sources read the same state

    def ask_once(text: str, on_text):
        return app_.ask(name, text, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)

    answer = _stream_answer(ask_once, question, as_json=as_json)
    if as_json:
        data = answer_event(name, question, answer, app_.open_pool(name)[1].version)
        if sources:
            from memcli.app.attribution import for_question

            data["attribution"] = for_question(app_, name, question)
        print_json_line(data)
    elif sources:
        from memcli.app.attribution import for_question, render

        sys.stdout.write("\n".join(render(for_question(app_, name, question))) + "\n")


# --------------------------------------------------------------------------- chat
CHAT_HELP = ("type a question (earlier turns are part of the conversation); /reset forgets them; "
             "/inject PATH... adds documents to the pool; /quit or Ctrl-D ends")
CHAT_COMMANDS = ("/inject", "/reset", "/help", "/quit", "/exit")


class _History:
    """Arrow-key editing, a history file (config dir) and Tab completion (chat commands, and paths
    after /inject) for an interactive chat."""

    def __init__(self):
        from memcli.base import paths

        self.file = paths.config_dir() / "chat_history"
        try:
            import readline
        except ImportError:  # pragma: no cover - no readline on this platform
            self.readline = None
            return
        self.readline = readline
        readline.set_history_length(1000)
        readline.set_completer_delims(" \t\n")
        readline.set_completer(chat_completer(readline.get_line_buffer))
        readline.parse_and_bind("tab: complete")
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


def chat_completer(line_buffer):
    """A readline completer: chat commands at the start of a line, paths after /inject."""

    def complete(text: str, index: int) -> str | None:
        line = line_buffer()
        if line.startswith("/inject "):
            options = complete_path(text)
        elif " " not in line.lstrip():
            options = [c + " " for c in CHAT_COMMANDS if c.startswith(text)]
        else:
            options = []
        return options[index] if index < len(options) else None

    return complete


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


@app.command(epilog="Examples:  memcli chat --pool work  ·  printf 'Who is Bob?\\nAnd his sister?\\n' | memcli chat --json. "
                    + GLOBAL_NOTE)
def chat(
    ctx: typer.Context,
    pool: Optional[str] = typer.Option(None, "--pool", "-p", metavar="POOL", autocompletion=complete_pool, help=POOL_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N", min=1, help="Longest answer, in tokens (default 256, or what the model's window leaves)."),
    temperature: float = typer.Option(0.0, "--temperature", metavar="T", min=0.0, help="0 decodes greedily (so does any value below 0.01)."),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", min=0.0, max=1.0, help="Nucleus sampling share (with --temperature > 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="One JSON line per turn (question, answer, timings) on stdout."),
) -> None:
    """A conversation with a pool; /reset forgets it, /inject PATH adds documents.

    Earlier turns are part of each prompt, the oldest dropped first when the model's window is full."""
    from memcli.app.api import MemcliError
    from memcli.app.settings import SettingsError

    state = _state(ctx)
    name = state.pool(pool)
    temperature, top_p, seed = _checked_sampling(temperature, top_p, seed)  # the server checks them alike
    session = (cli_server.chat(ctx, name, max_new_tokens, temperature, top_p, seed)  # through a running server
               or state.app().chat(name, max_new_tokens=max_new_tokens, sampling=_sampling(temperature, top_p, seed)))
    interactive = sys.stdin.isatty()
    history = _History() if interactive else None
    if getattr(session, "new", False):  # a typo is more likely than a new pool next to a close name
        import difflib

        close = difflib.get_close_matches(name, [row["name"] for row in state.pools_api().list_pools()], n=1)
        say(f"pool {name} is new and empty: /inject PATH... adds documents to it (the first creates it, "
            f"for model {shown(state.settings().model)})" + (f"; did you mean {close[0]}?" if close else ""))
    if interactive:
        say(f"pool {name}: {CHAT_HELP}", style="dim")
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
                    elif command == "/reset":
                        session.reset()
                        say("the conversation is forgotten (the pool's memory is kept)")
                        if as_json:
                            print_json_line({"event": "reset"})
                    elif command == "/inject":
                        paths = shlex.split(rest)
                        if not paths:
                            raise MemcliError("/inject needs at least one path")
                        report, interrupted = _run_inject(session.inject, paths)
                        for note in report_lines(report)[:-1]:
                            say(note)
                        if as_json:
                            print_json_line({"event": "inject", **report.to_json()})
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
                if as_json:  # one line per turn, written when the answer is complete
                    answer = session.ask(line)
                    print_json_line({"event": "turn", "pool": name, "turn": len(session.turns),
                                     "question": line, **answer.to_json()})
                else:
                    _stream_answer(session.ask, line)
            except Exception as err:
                # the store's PoolError only where the store is loaded: a chat through a server stays light
                store = sys.modules.get("memcli.store")
                if not isinstance(err, (MemcliError, SettingsError, ValueError) + ((store.PoolError,) if store else ())):
                    raise
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
    """Long model paths keep their informative end (on a terminal; piped output keeps everything)."""
    if not console(stderr=False).is_terminal:
        return text
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    return iso.replace("T", " ")[:16]


JSON_HELP = "As JSON on stdout."


@pool_app.command("ls")
def pool_ls(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """List the pools."""
    from memcli.pools import meta as pool_meta  # manifests only: no model, no torch

    rows = pool_meta.list_rows(_state(ctx).store())
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
    console(stderr=False).print(table, soft_wrap=not console(stderr=False).is_terminal)


@pool_app.command("info")
def pool_info(ctx: typer.Context,
              name: Optional[str] = typer.Argument(None, metavar="POOL", autocompletion=complete_pool, help="Pool name (default: config pool)."),
              as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Show a pool's facts and how much of each source is still in memory."""
    from memcli.pools import meta as pool_meta  # manifests, the log and the census only: no model, no torch, no memcli.app.api

    state = _state(ctx)
    name = state.pool(name)
    store = state.store()
    if not store.exists(name):
        state.require_pool(name)  # the one wording of a missing pool, with the closest name
    info = cli_server.pool_info(ctx, name) or pool_meta.info_json(store, name)
    if as_json:
        print_json(info)
        return
    out = console(stderr=False)
    facts = _table("", "")
    facts.show_header = False
    files = info["files"]
    complete = sum(1 for s in files if s.get("complete"))
    for key, value in (
        ("name", info["name"]),
        ("model", f"{info['model']} ({_model_label(info)})"),
        ("size on disk", human_bytes(info["bytes_on_disk"])),
        ("sources", f"{info['sources']:,}" + (f" ({len(files) - complete} incomplete)" if complete < len(files) else "")),
        ("chunks", f"{info['chunks']:,}"),
        ("tokens", f"{info['tokens']:,}"),
        ("version", str(info["version"])),
        ("created", _when(info["created"])),
        ("updated", _when(info["updated"])),
        ("memory", _memory_words(info)),
        ("written by", _written_by(info)),
    ):
        facts.add_row(Text(key, style="bold"), shown(value))
    for problem in info.get("damaged") or []:
        facts.add_row(Text("damaged", style="bold red"), Text(one_line(problem), style="red"))
    out.print(facts)
    if info["retention"]:
        out.print()
        ltm = info["family"] == "mplus"  # only M+ has a long-term memory
        columns = ("chunks", "retained", "rows in STM") + (("rows in LTM",) if ltm else ())
        table = _table("source", *columns, right=columns)
        for row in info["retention"]:
            chunks = f"{row['chunks']:,}" + (" shared" if "packed" in row else "")
            table.add_row(_tail(shown(row["source"]), 48), chunks, f"{100 * row['share_retained']:.1f}%",
                          f"{row['rows_in_stm']:,}", *((f"{row['rows_in_ltm']:,}",) if ltm else ()))
        out.print(table)


def _memory_words(info: dict) -> str:
    """The memory's size as eval retention says it: rows per layer, and in all layers (the unit of
    the rows columns below)."""
    memory = info.get("memory") or {}
    n, layers = memory.get("rows_per_layer"), memory.get("layers")
    if not n or not layers:
        return "?"
    return f"{n:,} rows per layer x {layers} layers = {n * layers:,} rows (the row counts below are over all layers)"


def _written_by(info: dict) -> str:
    """Which memcli last saved a pool's memory, and which created it (pools before 0.2.0 say neither)."""
    written, created = info.get("written_by"), info.get("created_by")
    if not written:
        return "a memcli before 0.2.0"
    if created == written:
        return f"memcli {written}"
    return f"memcli {written} (created by memcli {created or 'before 0.2.0'})"


def _model_label(info: dict) -> str:
    """A pool's model in words a user reads: a published checkpoint's family (8b, 7b, mplus), else
    what the model folder declares about itself (memcli-tiny: a toy)."""
    from memcli.loading.catalog import label

    return label(info["model"], info["family"])


def _done(as_json: bool, message: str, data: dict) -> None:
    """A pool command's outcome: one line on stderr, or its facts as JSON on stdout."""
    if as_json:
        print_json(data)
    else:
        say(message)


@pool_app.command("fork")
def pool_fork(ctx: typer.Context, src: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to copy."),
              dst: str = typer.Argument(..., metavar="NEW", help="Name of the copy."),
              as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Copy a pool (cheap: it writes a manifest; the parts are shared)."""
    state = _state(ctx)
    state.require_pool(src)
    info = state.store().fork(src, dst)
    _done(as_json, f"forked pool {src} to {dst}", {"pool": dst, "from": src, "version": info.version})


@pool_app.command("rename")
def pool_rename(ctx: typer.Context, old: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to rename."),
                new: str = typer.Argument(..., metavar="NEW", help="Its new name."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Rename a pool."""
    state = _state(ctx)
    state.require_pool(old)
    state.store().rename(old, new)
    _done(as_json, f"renamed pool {old} to {new}", {"pool": new, "from": old})


@pool_app.command("rm")
def pool_rm(ctx: typer.Context, name: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to delete."),
            yes: bool = typer.Option(False, "--yes", "-y", metavar=FLAG, help="Do not ask for confirmation."),
            purge_log: bool = typer.Option(False, "--purge-log", metavar=FLAG, help="Also delete its answers from the log of answers (memcli log); they stay without it.")) -> None:
    """Delete a pool (asks first; without a terminal, needs --yes)."""
    from memcli.store import PoolError

    state = _state(ctx)
    state.require_pool(name)
    store = state.store()
    if not yes:
        if not sys.stdin.isatty():
            raise PoolError(f"refusing to remove pool {name} without --yes (no terminal to confirm on)")
        if not typer.confirm(f"Remove pool {name} and everything in its memory? This cannot be undone.", err=True):
            say(f"kept pool {name}")
            raise typer.Exit(EXIT_ERROR)
    store.remove(name)
    say(cli_log.purge_line(name) if purge_log else f"removed pool {name}")


@pool_app.command("export")
def pool_export(ctx: typer.Context, name: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to export."),
                file: Path = typer.Argument(..., metavar="FILE", help="The .tar file to write."),
                force: bool = typer.Option(False, "--force", metavar=FLAG, help="Replace FILE if it exists."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Write a pool to one file (a tar), e.g. for a backup or another machine."""
    state = _state(ctx)
    state.require_pool(name)
    state.store().export(name, file, force=force)
    size = file.stat().st_size if file.exists() else None
    _done(as_json, f"exported pool {name} to {shown(file)} ({human_bytes(size)})",
          {"pool": name, "file": str(file.resolve()), "bytes": size})


@pool_app.command("import")
def pool_import(ctx: typer.Context, file: Path = typer.Argument(..., metavar="FILE", help="A file written by memcli pool export."),
                name: Optional[str] = typer.Argument(None, metavar="POOL", help="Pool name (default: the exported name)."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Create a pool from an exported file (every part is checked first)."""
    info = _state(ctx).store().import_(file, name)
    _done(as_json, f"imported pool {info.name} from {shown(file)}",
          {"pool": info.name, "file": str(file.resolve()), "version": info.version})


@pool_app.command("verify")
def pool_verify(ctx: typer.Context, name: Optional[str] = typer.Argument(None, metavar="POOL", autocompletion=complete_pool,
                                                                         help="Pool name (default: config pool)."),
                repair: bool = typer.Option(False, "--repair", metavar=FLAG, help="First remove leftovers of interrupted work "
                                            "from the store (never anything a pool names), remove the pool's damaged "
                                            "part objects so nothing reuses them, and cut a torn last log record."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Check a pool's manifest and the checksum of every part."""
    state = _state(ctx)
    name = state.require_pool(state.pool(name))
    store = state.store()
    if repair:
        store.recover(announce=True)
        for line in store.repair(name):
            say(one_line(line))
    problems = store.verify(name)
    parts = None if problems else store.info(name).num_parts
    if as_json:
        print_json({"pool": name, "ok": not problems, "parts": parts, "problems": [one_line(p) for p in problems]})
        if problems:
            raise typer.Exit(EXIT_ERROR)
        return
    if problems:
        for problem in problems:
            sys.stdout.write(one_line(problem) + "\n")
        error_line(f"pool {name} is damaged ({_plural(len(problems), 'problem')})")
        raise typer.Exit(EXIT_ERROR)
    sys.stdout.write(f"pool {name}: ok ({_plural(parts, 'part')} verified)\n")


@pool_app.command("rebind", epilog="Example:  memcli pool rebind demo --model ~/models/tiny-model")
def pool_rebind(ctx: typer.Context, name: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to rebind."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Record --model MODEL as the pool's model: the same model found elsewhere (a moved folder, the
    hub id of a local copy).

    Its config.json must have the pool's fingerprint; no weights are read."""
    state = _state(ctx)
    model = state.flags.get("model")
    if not model:
        raise UsageProblem(f"pool rebind needs --model: memcli pool rebind {name} --model PATH")
    done = state.pools_api().rebind(name, model)
    _done(as_json, f"pool {name} now uses model {done['model']} (was {done['previous']})", done)


# --------------------------------------------------------------------------- config
# Every key, from the one table of settings (memcli/app/settings.py: KEYS and HELP).
KEY_HELP = f"A setting: {settings_table.keys_in_words()}."
KEYS_EPILOG = "Keys:\n" + "\n".join(f"  {key:<11} {settings_table.HELP[key]}" for key in settings_table.KEYS)


@config_app.command("get", epilog=KEYS_EPILOG)
def config_get(ctx: typer.Context,
               key: Optional[str] = typer.Argument(None, metavar="KEY", autocompletion=complete_config_key,
                                                   help=KEY_HELP + " Default: all of them."),
               as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Show the settings in effect and where each comes from (default, config file, environment, flag)."""
    from memcli.app.settings import KEYS, config_rows, shown_value

    if key is not None and key not in KEYS:
        raise UsageProblem(f"unknown setting {key!r} (known: {', '.join(KEYS)})")
    rows = config_rows(_state(ctx).settings())
    if key is not None:
        [row] = [r for r in rows if r["key"] == key]
        if as_json:
            print_json(row)
        else:
            sys.stdout.write(f"{shown_value(row['value'])}\n")
        return
    if as_json:
        print_json(rows)
        return
    table = _table("key", "value", "from")
    for row in rows:
        table.add_row(row["key"], shown(shown_value(row["value"])), row["source"])
    console(stderr=False).print(table)


@config_app.command("set", epilog=KEYS_EPILOG)
def config_set(key: str = typer.Argument(..., metavar="KEY", autocompletion=complete_config_key, help=KEY_HELP),
               value: str = typer.Argument(..., metavar="VALUE", help="Its value, e.g. cpu, work, memoryllm-8b, false or 10m.")) -> None:
    """Write a default into the config file (a model folder is stored as an absolute path).

    A pool that does not exist yet is set all the same, with a warning: the first inject into it creates it."""
    from memcli.base import paths
    from memcli.app.settings import set_config

    missing = key == "pool" and _missing_pool(value)  # an invalid name is refused here, before writing
    set_config(key, value)
    say(f"{key} set in {paths.config_file()}")
    if missing:
        say(f"memcli: warning: {missing}", style="yellow")


def _missing_pool(name: str) -> str | None:
    """Why `name` as the default pool needs a word (it does not exist yet), or None; a name no
    pool can have is refused."""
    import difflib

    from memcli.pools.meta import PoolStore
    from memcli.store import validate_name

    validate_name(name)
    store = PoolStore()
    if store.exists(name):
        return None
    close = difflib.get_close_matches(name, [info.name for info in store.list()], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"pool {name} does not exist yet{hint}; the first inject into it creates it (memcli inject FILE)"


@config_app.command("unset", epilog=KEYS_EPILOG)
def config_unset(key: str = typer.Argument(..., metavar="KEY", autocompletion=complete_config_key, help=KEY_HELP)) -> None:
    """Remove a key from the config file (its default applies again)."""
    from memcli.base import paths
    from memcli.app.settings import set_config

    set_config(key, None)
    say(f"{key} removed from {paths.config_file()}")


# --------------------------------------------------------------------------- models
@app.command()
def models(as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """The known models and whether each is downloaded (never goes online)."""
    from memcli.app.api import list_models

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    table = _table("model", "hub id", "status", "size", right=("size",))
    for row in rows:
        status = Text(row["status"], style="green" if row["status"] in ("downloaded", "bundled") else "yellow" if row["status"] == "partial" else "")
        if row["problem"] and row["status"] not in ("downloaded", "bundled"):
            status.append(f" ({row['problem']})")
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(name, row["repo"] or "(in the package)", status, human_bytes(row["bytes"]) if row["bytes"] else "")
    console(stderr=False).print(table)
    for row in rows:
        if row.get("description"):
            console(stderr=False).print(Text(f"{row['name']}: {shown(row['description'])}"), soft_wrap=True)


@app.command()
def pull(model: str = typer.Argument(..., metavar="MODEL", autocompletion=complete_model,
                                     help="An alias (memcli models) or a hub id owner/name.")) -> None:
    """Download a model into the Hugging Face cache (an interrupted download resumes)."""
    from memcli.app.api import pull_model

    folder = pull_model(model)
    sys.stdout.write(f"{folder}\n")


# --------------------------------------------------------------------------- doctor
@app.command()
def doctor(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """What this machine can run: GPU, quantization, memory, disk, paths and the resolved settings."""
    from memcli.app.api import diagnose

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
    memory = report["memory"]
    text = f"{human_bytes(memory['total_bytes'])} total, {human_bytes(memory['available_bytes'])} available"
    if memory["needed_bytes"]:
        text += f"; the model needs about {human_bytes(memory['needed_bytes'])} on the CPU"
    row("memory", text)
    disk = report["disk"]
    row("free disk (data)", f"{human_bytes(disk['data_free_bytes'])} at {disk['data_dir']}")
    row("free disk (models)", f"{human_bytes(disk['hf_cache_free_bytes'])} at {disk['hf_cache']}")
    for key in ("data", "config_file", "cache", "hf_cache"):
        row(key.replace("_", " "), report["paths"][key])
    if report["converted"]:
        damaged = sum(not c["ok"] for c in report["converted"])
        row("converted weights", f"{len(report['converted'])} cop{'y' if len(report['converted']) == 1 else 'ies'}, "
                                 + (f"{damaged} damaged" if damaged else "all intact (sha256)"))
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


# --------------------------------------------------------------------------- eval (issue 12)
class EvalProgress(LiveProgress):
    """eval retention's progress: "episode k of n", a bar over every injected chunk and question,
    and an ETA from the run's average so far (inject's conventions). Off a terminal: one line per
    finished episode on stderr, with the time so far and the ETA."""

    def __init__(self, enabled: bool | None = None):
        super().__init__(("steps", "eta"), enabled)
        self.started: float | None = None
        self.said = 0  # episodes said off a terminal

    def __call__(self, done: int, total: int, episode: int, episodes: int) -> None:
        import time

        now = time.monotonic()
        if self.started is None or done == 0:
            self.started = now
        elapsed = now - self.started
        eta = _eta((total - done) * elapsed / done) if done and elapsed > 0 else ""
        finished = episode - (done < total)  # episodes complete (the last one when all is done)
        if self.progress.disable:
            if finished > self.said:
                self.said = finished
                say(f"episode {finished} of {episodes} done ({_eta(elapsed)} so far"
                    + (f", ETA {eta})" if done < total else ")"))
            return
        description = f"episode {episode} of {episodes}"
        changed = description != self.progress.tasks[0].description
        self.progress.update(self.task, total=total, completed=done, description=description,
                             steps=f"{done:,}/{total:,} steps", eta=f"ETA {eta}" if eta else "", refresh=changed)


class _RetentionCommand(typer.core.TyperCommand):
    """`eval retention --json FILE` (before 0.2.0 --json took a file) still writes FILE: it is read
    as --out FILE, with a note; --json alone prints the curve as JSON, as every other --json does."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg.startswith("--json="):
                args[i] = "--out=" + arg.partition("=")[2]
            elif arg == "--json" and i + 1 < len(args) and not args[i + 1].startswith("-"):
                args[i] = "--out"  # no argument of this command: a word after --json is the old file
            else:
                continue
            say("memcli: note: eval retention --json FILE is now --out FILE (--json prints the JSON on stdout)")
            break
        return super().parse_args(ctx, args)


eval_app = _command_group("eval", "Measure what a model remembers.")
app.add_typer(eval_app, name="eval")


@eval_app.command("retention", cls=_RetentionCommand,
                  epilog="Examples:  memcli --model memcli-tiny eval retention --plot curve.png  ·  "
                         "memcli --model memcli-tiny eval retention --episodes 5 --json > curve.json")
def eval_retention(
    ctx: typer.Context,
    episodes: int = typer.Option(25, "--episodes", metavar="N", min=1, help="Fact chunks to test (4 questions each)."),
    distractors: str = typer.Option("0,1,2,4,8,16", "--distractors", metavar="LIST", help="Distractor chunk counts to ask after, comma-separated."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed for the facts and the drops."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", metavar="N", min=1, help="Longest answer, in tokens."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="Print the curve as JSON on stdout instead of the table."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Also write the curve as JSON to FILE."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Also draw the curve as a PNG to FILE (needs matplotlib: the 'plot' extra)."),
) -> None:
    """Knowledge retention: inject facts, then distractor chunks, ask after each count, score.

    On a terminal a progress display shows the episode and an ETA; otherwise one line per episode
    goes to stderr."""
    from memcli.app.retention import command

    state = _state(ctx)
    with EvalProgress() as progress:
        command(state.app(), episodes, distractors, seed, max_new_tokens, out_path, plot_path, as_json=as_json,
                out=sys.stdout.write,
                on_progress=lambda done, total, episode: progress(done, total, episode, episodes))


from memcli.cli import serve as cli_server  # noqa: E402 - serve, ps, stop and the routing through a running server

cli_server.register(app)
from memcli.cli import log as cli_log  # noqa: E402 - memcli log: the log of answers
cli_log.register(app)


# --------------------------------------------------------------------------- entry point
def main() -> None:
    """The console script: SIGTERM interrupts like Ctrl-C (exit 130, inject keeps what is committed).
    Ctrl-C's handler is installed here too: a process started with SIGINT ignored (nohup, a
    background job of a non-interactive shell) still stops cleanly on SIGINT."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass
    app(prog_name="memcli")


__all__ = ["app", "main"]
