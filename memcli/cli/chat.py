"""`memcli chat`: a conversation with a pool (earlier turns go into each prompt, the oldest dropped
first when the window is full), its turns kept here whichever backend answers; /reset forgets them,
/inject PATH... adds documents mid-conversation."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Optional

import typer

from memcli.base.errors import EXIT_ERROR, EXIT_INTERRUPTED, MemcliError, describe
from memcli.base.text import shown
from memcli.cli import interrupts
from memcli.cli.app import FLAG, GLOBAL_NOTE, POOL_HELP, app, invocation
from memcli.cli.ask import MAX_TOKENS_HELP, TEMPERATURE_HELP, TOP_P_HELP, checked_sampling, stream_answer
from memcli.cli.completion import complete_path, complete_pool
from memcli.cli.inject import interrupted_line, report_lines, run_inject, stdin_of
from memcli.cli.output import error_line, print_json_line, say

CHAT_HELP = ("type a question (earlier turns are part of the conversation); /reset forgets them; "
             "/inject PATH... adds documents to the pool; /quit or Ctrl-D ends")
CHAT_COMMANDS = ("/inject", "/reset", "/help", "/quit", "/exit")


class History:
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
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N", min=1, help=MAX_TOKENS_HELP),
    temperature: float = typer.Option(0.0, "--temperature", metavar="T", min=0.0, help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", min=0.0, max=1.0, help=TOP_P_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="One JSON line per turn (question, answer, timings) on stdout."),
) -> None:
    """A conversation with a pool; /reset forgets it, /inject PATH adds documents.

    Earlier turns are part of each prompt, the oldest dropped first when the model's window is full."""
    run = invocation(ctx)
    name = run.pool(pool)
    sampling = checked_sampling(temperature, top_p, seed)
    backend = run.backend()
    session = backend.chat(name, max_new_tokens=max_new_tokens, sampling=sampling)
    interactive = sys.stdin.isatty()
    history = History() if interactive else None
    if session.new:  # a typo is more likely than a new pool next to a close name
        import difflib

        close = difflib.get_close_matches(name, [row["name"] for row in backend.list_pools()], n=1)
        say(f"pool {name} is new and empty: /inject PATH... adds documents to it (the first creates it, "
            f"for model {shown(run.settings().model)})" + (f"; did you mean {close[0]}?" if close else ""))
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
                if interrupts.terminated() or not interactive:
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
                        failures += _inject(session, shlex.split(rest), as_json, interactive)
                    else:
                        raise MemcliError(f"unknown command {command} ({CHAT_HELP})")
                    continue
                if as_json:  # one line per turn, written when the answer is complete
                    answer = session.ask(line)
                    print_json_line({"event": "turn", "pool": name, "turn": len(session.turns),
                                     "question": line, **answer.to_json()})
                else:
                    stream_answer(lambda text, on_text: session.ask(text, on_text), line)
            except (MemcliError, ValueError) as err:  # a user's to fix: said, and the conversation goes on
                failures += 1
                error_line(describe(err).message)
            except KeyboardInterrupt:
                if interrupts.terminated() or not interactive:
                    raise
                say("(interrupted)")
    finally:
        if history is not None:
            history.save()
    if failures and not interactive:
        raise typer.Exit(EXIT_ERROR)


def _inject(session, paths: list[str], as_json: bool, interactive: bool) -> int:
    """/inject PATH...: what was found, injected into the conversation's pool; 1 when something was
    skipped (a failure of the session), else 0."""
    from memcli.app.backend import find

    if not paths:
        raise MemcliError("/inject needs at least one path")
    found = find(paths)
    report, interrupted = run_inject(lambda **progress: session.inject(found, stdin=stdin_of(paths), **progress))
    for note in report_lines(report)[:-1]:
        say(note)
    if as_json:
        print_json_line({"event": "inject", **report.to_json()})
    if interrupted:
        say(interrupted_line(report))
        if interrupts.terminated() or not interactive:
            raise typer.Exit(EXIT_INTERRUPTED)
    else:
        say(report_lines(report)[-1])
    return 1 if report.skipped else 0
