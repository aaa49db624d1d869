"""What the command line writes: results on stdout (text, tables, JSON), progress, summaries and
diagnostics on stderr, one line each. Everything from a file, a model or a server is shown through
`memcli.base.text` (no escape sequence reaches the terminal)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memcli.base.text import one_line

# Columns for output that is not a terminal: wide enough that a table row is never wrapped
# (pipes into grep and awk get one line per row).
UNWRAPPED_WIDTH = 10_000

_live: list[Console] = []  # the stderr console of the progress display while it is shown


def live(console_: Console | None) -> None:
    """While a progress display is shown (`console_`; None: no more), stderr lines go through its
    console, so they print above it instead of breaking it."""
    _live[:] = [console_] if console_ is not None else []


def console(stderr: bool = True) -> Console:
    """A Rich console on the current stdout/stderr: no markup parsing (file names may hold "[...]"),
    no colour when NO_COLOR is set (Rich adds none when the stream is not a terminal)."""
    if stderr and _live:
        return _live[0]
    no_color = bool(os.environ.get("NO_COLOR"))
    made = Console(
        file=sys.stderr if stderr else sys.stdout,
        color_system=None if no_color else "auto",
        no_color=no_color or None,
        markup=False,
        highlight=False,
        emoji=False,
    )
    if not made.is_terminal:
        made.width = UNWRAPPED_WIDTH
    return made


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


def write_answer(text: str) -> None:
    """A model's text on stdout; on a terminal it cannot send escape sequences."""
    if sys.stdout.isatty():
        text = "".join(ch if ch in "\n\t" or ch.isprintable() else "\ufffd" for ch in text)
    sys.stdout.write(text)
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


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    made = Table(show_edge=False, header_style="bold", box=None, pad_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        if column in right:  # numbers: never cut
            made.add_column(column, justify="right", no_wrap=True, min_width=len(column))
        else:
            made.add_column(column, overflow="fold")
    return made


def facts_table() -> Table:
    """Two columns, no header: a key in bold and its value."""
    made = table("", "")
    made.show_header = False
    return made


def tail(text: str, width: int) -> str:
    """Long model paths keep their informative end (on a terminal; piped output keeps everything)."""
    if not console(stderr=False).is_terminal:
        return text
    return text if len(text) <= width else "…" + text[-(width - 1):]


def when(iso: str | None) -> str:
    if not iso:
        return ""
    return iso.replace("T", " ")[:16]


class _SayHandler(logging.Handler):
    """memcli's own log warnings (an unreadable PDF page) as one stderr line each, through say(), so
    during an inject they print above the progress display instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"memcli: {record.levelname.lower()}: {one_line(record.getMessage())}", style="yellow")
        except Exception:  # a log line must never fail a command
            pass


def quiet_libraries() -> None:
    """memcli's warnings as stderr lines; the libraries' own notes (not ours to show) quiet."""
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

