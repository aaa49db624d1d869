"""`memcli log`: the log of answers (memcli/app/answer_log.py), as `llm logs` shows its own.

    memcli log [-n N] [-q WORDS] [--pool P] [--since TIME] [--json]   the newest answers first
    memcli log off | on                                                 config `log` (MEMCLI_LOG)
    memcli log path | status | reset

A light command: answer_log is standard-library sqlite3, imported when a command runs; no torch.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.text import Text

from memcli.base.text import one_line, shown
from memcli.cli import output
from memcli.cli.app import FLAG, JSON_HELP, app, command_group, invocation
from memcli.cli.completion import complete_pool
from memcli.cli.output import console, human_bytes, plural, print_json, say, when

TEXT_WIDTH = {"question": 48, "answer": 72}  # characters of each shown in a table on a terminal


def _head(text: str, width: int, terminal: bool) -> str:
    """One harmless line of `text` (control characters escaped), cut to `width` on a terminal; piped
    output keeps all of it (one row per line for grep)."""
    line = one_line(text)
    if not terminal or len(line) <= width:
        return line
    return line[:width - 1] + "…"


def purge_line(name: str) -> str:
    """`pool rm --purge-log`, after the pool is removed: the line to say, or a LogError saying that the
    pool is gone but its answers are not."""
    from memcli.app import answer_log

    try:
        removed = answer_log.purge_pool(name)
    except answer_log.LogError as err:
        raise answer_log.LogError(f"removed pool {name}, but not its logged answers: {err}") from None
    return f"removed pool {name} and {plural(removed, 'logged answer')}"


log_app = command_group("log", invoke_without_command=True, no_args_is_help=False,
                        help="The log of answers: every question a pool answered (newest first), and its "
                             "settings. memcli log off stops it.")
app.add_typer(log_app, name="log")


@log_app.callback(epilog="Examples:  memcli log -n 3  ·  memcli log -q launch --pool work  ·  "
                         "memcli log --since 2026-12-01 --json  ·  memcli log off")
def show(
    ctx: typer.Context,
    count: int = typer.Option(10, "-n", "--count", metavar="N", min=0, help="How many of the newest answers (0: all)."),
    query: Optional[str] = typer.Option(None, "-q", "--query", metavar="WORDS",
                                        help="Only answers whose question or answer holds every word (word* for a prefix)."),
    pool: Optional[str] = typer.Option(None, "--pool", "-p", metavar="POOL", autocompletion=complete_pool,
                                       help="Only answers of this pool."),
    since: Optional[str] = typer.Option(None, "--since", metavar="TIME",
                                        help="Only answers at or after this ISO 8601 date or time (UTC unless it has an offset)."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="As a JSON list on stdout (every field, full text)."),
) -> None:
    """The newest logged answers (a table: id, time in UTC, pool, how it was asked, question, answer)."""
    if ctx.invoked_subcommand is not None:
        return
    from memcli.app import answer_log

    rows = answer_log.entries(pool=pool, query=query, limit=count, since=since)
    if as_json:
        print_json(rows)
        return
    if not rows:
        filtered = query is not None or pool is not None or since is not None
        say("no logged answer matches" if filtered and answer_log.count() else "no answers logged yet")
        if not answer_log.enabled(invocation(ctx).settings()):
            say("logging of answers is off (memcli log on turns it on)", style="dim")
        return
    out = console(stderr=False)
    terminal = out.is_terminal
    table = output.table("id", "time (UTC)", "pool", "via", "question", "answer", right=("id",))
    for row in rows:
        table.add_row(str(row["id"]), when(row["time"]), shown(row["pool"]), row["via"],
                      _head(row["question"], TEXT_WIDTH["question"], terminal),
                      _head(row["answer"], TEXT_WIDTH["answer"], terminal))
    out.print(table, soft_wrap=not terminal)

def _switch(ctx: typer.Context, on: bool) -> None:
    from memcli.base import paths
    from memcli.app.settings import set_config

    set_config("log", "true" if on else "false")
    word = "on" if on else "off"
    say(f"logging of answers is {word} (log = {str(on).lower()} in {paths.config_file()})")
    settings = invocation(ctx).settings()
    if settings.explicit("log") and settings.log != on:
        say(f"but {settings.where('log')} in the environment overrides it: answers are "
                f"{'' if settings.log else 'not '}logged while it is set", style="yellow")

@log_app.command("off")
def off(ctx: typer.Context) -> None:
    """Stop logging answers (config log = false); the logged ones stay."""
    _switch(ctx, False)

@log_app.command("on")
def on(ctx: typer.Context) -> None:
    """Log answers again (config log = true; the default)."""
    _switch(ctx, True)

@log_app.command("path")
def path_() -> None:
    """Print the log's file (an SQLite database, e.g. for sqlite3 or Datasette)."""
    from memcli.app import answer_log

    sys.stdout.write(f"{answer_log.path()}\n")

@log_app.command("status")
def status(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """On or off (and why), the log's file, how many answers it holds and its size."""
    from memcli.app import answer_log

    settings = invocation(ctx).settings()
    info = answer_log.status(settings)
    if as_json:
        print_json(info)
        return
    state = "on" if info["enabled"] else "off"
    facts = [("logging", f"{state} ({settings.where('log')})"), ("file", shown(info["path"]))]
    if info["exists"]:
        search = {"fts5": "full text (SQLite FTS5)", "like": "words (LIKE; this SQLite lacks FTS5)"}
        facts += [("answers", f"{info['answers']:,}"),
                  ("size", f"{human_bytes(info['bytes'])} of at most {human_bytes(info['max_bytes'])} "
                           f"({settings.where('log_max_mb')})"),
                  ("search", search[info["search"]])]
    else:
        facts.append(("answers", "none yet (the file is made by the first answer)"))
    table = output.table("", "")
    table.show_header = False
    for key, value in facts:
        table.add_row(Text(key, style="bold"), value)
    console(stderr=False).print(table)

@log_app.command("reset")
def reset() -> None:
    """Move the log aside (a damaged one, or to start afresh); the next answer starts a new one.
    Nothing is deleted: the old file stays beside it, named log.db.old-TIME."""
    from memcli.app import answer_log

    moved = answer_log.reset()
    if moved is None:
        say(f"no log at {shown(answer_log.path())}; nothing to do")
        return
    say(f"moved the log to {shown(moved)}; the next answer starts a new one "
            f"(delete the old file once you no longer need it)")
