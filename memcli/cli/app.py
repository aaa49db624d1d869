"""The `memcli` command line's frame: the typer app and its groups, options before or after the
command, every failure ended as one line and an exit code, and the `Invocation` a command works with.

Results go to stdout; progress, summaries and diagnostics to stderr. Every failure is one line,
`memcli: error: <message>`, and an exit code (memcli.base.errors.describe, the one taxonomy):

    0    ok
    1    error
    2    usage error (bad option or argument)
    3    inject finished, but some inputs were skipped
    130  interrupted (Ctrl-C or SIGTERM); inject keeps every committed chunk

The commands live one group to a module (inject, ask, chat, pools, config, models, serve, eval,
log; memcli.cli.main puts them together). Each goes through one backend (`Invocation.backend`,
chosen once: memcli.cli.backends), in this process or through a running server. Heavy modules
(torch, transformers, the engine) are imported by the library where a model runs, so `--help`,
`--version`, completion, `pool ls/info/verify`, `models` and `config` stay light.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import typer
from typer._coercion import RuntimeParam  # typer 0.29: see _runtime_param
from typer.core import TyperGroup

from memcli import __version__
from memcli.base.errors import EXIT_INTERRUPTED, UsageError, describe
from memcli.cli.completion import complete_model
from memcli.cli.output import error_line, quiet_libraries, say

DEBUG_HINT = "run with MEMCLI_DEBUG=1 for details"
GLOBAL_NOTE = "Global options (--model, --device, --dtype, --quant, --no-server) may also come after the command."
POOL_HELP = "The pool (default: config pool, MEMCLI_POOL)."
JSON_HELP = "As JSON on stdout."


# --------------------------------------------------------------------------- the invocation
@dataclass
class Invocation:
    """One run of a command: its global options, the settings they give (read once), and the
    backend its work goes through (chosen once)."""

    flags: dict = field(default_factory=dict)
    _settings: Any = None
    _backend: Any = None

    def settings(self):
        if self._settings is None:
            from memcli.app.settings import load_settings

            self._settings = load_settings(**self.flags)
        return self._settings

    def backend(self, start: bool = True):
        """The backend of this command: a running (or, with `start`, a started) server, else the
        library in this process (memcli.cli.backends.choose)."""
        if self._backend is None:
            from memcli.cli.backends import choose

            self._backend = choose(self.settings(), self.flags, start)
        return self._backend

    def store(self):
        from memcli.pools.meta import PoolStore

        return PoolStore()

    def library(self):
        """The library facade for what reads manifests only (names, listings, rebinding): no settings
        are needed, no model loads."""
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
        raise UsageError("no pool given: use --pool NAME, or set a default with memcli config set pool NAME")

    def require_pool(self, name: str) -> str:
        """`name` if that pool exists, else the one-line "pool X not found; did you mean Y?"."""
        return self.library().require_pool(name)


def invocation(ctx: typer.Context) -> Invocation:
    obj = ctx.find_root().obj
    if not isinstance(obj, Invocation):
        obj = Invocation()
        ctx.find_root().obj = obj
    return obj


# --------------------------------------------------------------------------- options anywhere, errors in one line
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


class Group(TyperGroup):
    """Turns every exception of a command (and of the app callback) into one line and an exit code
    (`memcli.base.errors.describe`); help texts flow (`flowing`)."""

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
            failure = describe(err)
            error_line(failure.message + (f" ({DEBUG_HINT})" if failure.bug and not debug else ""))
            raise typer.Exit(failure.exit_code) from None


def command_group(name: str, help: str, **extra) -> typer.Typer:
    """A command group as every group of memcli's is: -h/--help, help when called bare, our errors
    instead of typer's tracebacks, global options accepted after the command (Group)."""
    extra.setdefault("no_args_is_help", True)
    return typer.Typer(cls=Group, name=name, help=help, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]}, **extra)


app = command_group(
    "memcli", "A local language model with a persistent memory of your documents (MemoryLLM / M+).",
    epilog="Examples:  memcli inject notes/ --pool work  ·  memcli ask 'When is the launch?' --pool work  ·  "
           "memcli config set pool work",
)
pool_app = command_group("pool", "List, inspect, copy, rename, remove, export, import, verify and rebind memory pools.")
config_app = command_group("config", "Read and write the config file's defaults (see `memcli config get`).")
eval_app = command_group("eval", "Measure what a model remembers.")
app.add_typer(pool_app, name="pool")
app.add_typer(config_app, name="config")
app.add_typer(eval_app, name="eval")

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
    quiet_libraries()
    ctx.obj = Invocation(flags={"model": model, "device": device, "dtype": dtype, "quant": quant,
                                "server": False if no_server else None})
