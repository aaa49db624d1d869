"""`memcli inject`: documents found here (`memcli.app.backend.find`), read into a pool through the
backend, with progress; the report's lines (or --json) and the exit code: 3 when something was
skipped, 130 when interrupted (what was kept is said)."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

import typer

from memcli.base.text import one_line, shown
from memcli.cli import interrupts
from memcli.cli.app import FLAG, GLOBAL_NOTE, POOL_HELP, app, invocation
from memcli.cli.completion import complete_path, complete_pool
from memcli.cli.output import plural, print_json, say
from memcli.cli.progress import InjectProgress
from memcli.base.errors import EXIT_INTERRUPTED, EXIT_SKIPPED
from memcli.wire import InjectInterrupted, InjectReport


def short_reason(reason: str, limit: int = 60) -> str:
    """A skip reason in a summary line: whole when short, else its first clause (before ": " or
    "; "), else cut with "…" (each skipped file's line above the summary has it whole)."""
    text = one_line(reason)
    if len(text) <= limit:
        return text
    for mark in (": ", "; "):
        clause = text.split(mark, 1)[0]
        if 0 < len(clause) <= limit:
            return clause
    return one_line(text, limit)


def report_lines(report: InjectReport) -> list[str]:
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
    if unknown_line(report):
        lines.append(unknown_line(report))
    done = report.count("injected", "resumed", "changed")
    if done:
        summary = (f"injected {plural(done, 'file')} ({plural(report.chunks, 'chunk')}, "
                   f"{plural(report.tokens, 'token')}) into pool {report.pool} in {report.seconds:.1f} s")
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
        shown_reasons = ", ".join(f"{n:,} {short_reason(reason)}" for reason, n in reasons[:3])
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


def unknown_line(report: InjectReport) -> str | None:
    """The words of what was read that the model has never seen, in one line (None: there are none)."""
    from memcli.loading.vocabulary import note

    line = note(report.unknown_words, "what was read")
    return shown(line) if line else None


def interrupted_line(report: InjectReport) -> str:
    if not report.count("injected", "resumed", "changed") and report.partial is None:
        return "interrupted before anything was committed; run the same command again to continue"
    kept = []
    if report.count("injected", "resumed", "changed"):
        kept.append(plural(report.count("injected", "resumed", "changed"), "complete file"))
    if report.partial is not None:
        kept.append(f"{plural(report.partial.chunks, 'chunk')} of {shown(report.partial.path)}")
    return f"interrupted: kept {' and '.join(kept)}; run the same command again to continue"


def run_inject(inject: Callable[..., InjectReport]) -> tuple[InjectReport, bool]:
    """`inject(on_event=..., stop=...)` (a backend's, bound to its pool and sources) with progress,
    the first Ctrl-C or SIGTERM asking it to stop once the chunk in progress is committed (the
    second quits at once); returns (report, interrupted)."""
    with InjectProgress() as progress, interrupts.stopping(say) as stop:
        try:
            return inject(on_event=progress, stop=stop), False
        except InjectInterrupted as stopped:
            return stopped.report, True


def stdin_of(paths: list[str]):
    """The stdin a "-" among the paths reads (None: none is named)."""
    return sys.stdin.buffer if "-" in paths and hasattr(sys.stdin, "buffer") else None


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
    from memcli.app.backend import find
    from memcli.store import validate_name

    run = invocation(ctx)
    name = validate_name(run.pool(pool))  # a name no pool can have is said before the files are looked at
    found = find(paths, glob=glob, type=type_, encoding=encoding)
    backend = run.backend()
    report, interrupted = run_inject(lambda **progress: backend.inject(
        name, found, chunk_tokens=chunk_tokens, force=force, stdin=stdin_of(paths), **progress))
    show_inject_report(report, interrupted, as_json)


def show_inject_report(report: InjectReport, interrupted: bool, as_json: bool) -> None:
    """An inject's outcome: the report, and its exit code."""
    if as_json:
        print_json(report.to_json())
        if unknown_line(report):
            say(unknown_line(report))  # on stderr also with --json
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
