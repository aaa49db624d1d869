"""`memcli ask`: one question, the answer streamed to stdout as it is decoded (NDJSON events with
--json), and with --sources which sources the question read (computed where the pool is)."""

from __future__ import annotations

import sys
from typing import Callable, Optional

import typer

from memcli.base.errors import UsageError
from memcli.base.text import shown
from memcli.cli.app import FLAG, GLOBAL_NOTE, POOL_HELP, app, invocation
from memcli.cli.completion import complete_pool
from memcli.cli.output import print_json_line, say, write_answer
from memcli.wire import INITIAL_MEMORY, Answer, Sampling

TEMPERATURE_HELP = "0 decodes greedily (so does any value below 0.01)."
TOP_P_HELP = "Nucleus sampling share (with --temperature > 0)."
MAX_TOKENS_HELP = "Longest answer, in tokens (default 256, or what the model's window leaves)."


def checked_sampling(temperature: float, top_p: float, seed: Optional[int]) -> Sampling:
    """The options as the server checks them too (`wire.Sampling.checked`: finite, in range; a
    positive temperature below 0.01 decodes greedily); a usage error naming the option otherwise."""
    return Sampling.checked(temperature, top_p, seed, names=("--temperature", "--top-p", "--seed"), top_p_zero=True)


def stream_answer(ask: Callable[[str, Callable[[str], None]], Answer], question: str, as_json: bool = False) -> Answer:
    """Ask through `ask(question, on_text)`, writing the answer to stdout as it comes (NDJSON
    "text" events with --json); a started line is ended even when interrupted. The question's
    words the model has never seen are named on stderr."""
    from memcli.loading.vocabulary import note

    started = []

    def on_text(text: str) -> None:
        started.append(True)
        if as_json:
            print_json_line({"event": "text", "text": text})
        else:
            write_answer(text)

    try:
        answer = ask(question, on_text)
    except BaseException:
        if started and not as_json:
            write_answer("\n")
        raise
    if not as_json:
        write_answer("\n")
    unknown = note(answer.unknown_words, "the question")
    if unknown:
        say(shown(unknown), style="yellow")
    return answer


def render_sources(report: dict, top: int = 5) -> list[str]:
    """Lines for a terminal: the sources the question read most, ranked, each with its share of what
    the question looked up in memory (the shares, the rest and the initial memory make 100 %)."""
    lines = ["sources, ranked by their share of what the question looked up in memory:"]
    for share in report["sources"][:top]:
        lines.append(f"  {share['rank']:>2}. {share['share']:6.1%}  {share['source']}  ({share['rows']:,} memory rows)")
    rest = report["sources"][top:]
    if rest:
        lines.append(f"      {sum(s['share'] for s in rest):6.1%}  {len(rest):,} other sources")
    lines.append(f"      {report['initial_memory_share']:6.1%}  {INITIAL_MEMORY}: what the model held before any document")
    return lines


@app.command(epilog="Examples:  memcli ask 'When is the Orion launch?' --pool work  ·  "
                    "echo 'Who is Bob?' | memcli ask - --json. " + GLOBAL_NOTE)
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., metavar="QUESTION", help="The question (keep it short: it is read after the memory); - reads it from stdin."),
    pool: Optional[str] = typer.Option(None, "--pool", "-p", metavar="POOL", autocompletion=complete_pool, help=POOL_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", metavar="N", min=1, help=MAX_TOKENS_HELP),
    temperature: float = typer.Option(0.0, "--temperature", metavar="T", min=0.0, help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", metavar="P", min=0.0, max=1.0, help=TOP_P_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="Stream NDJSON events: \"text\" events with the answer's pieces, then one \"answer\" event with the question, the answer, the pool version, timings and token counts."),
    sources: bool = typer.Option(False, "--sources", metavar=FLAG, help="After the answer, the sources whose memory rows the question read most (also in --json)."),
) -> None:
    """Answer a question from a pool's memory, streaming the answer to stdout."""
    run = invocation(ctx)
    if question == "-":
        question = sys.stdin.read()
        if not question.strip():
            raise UsageError("ask -: stdin held no question")
    name = run.pool(pool)
    sampling = checked_sampling(temperature, top_p, seed)
    backend = run.backend()
    answer = stream_answer(lambda text, on_text: backend.ask(name, text, max_new_tokens=max_new_tokens,
                                                             sampling=sampling, sources=sources, on_text=on_text),
                           question, as_json=as_json)
    if as_json:
        print_json_line(answer.event())
    elif sources:
        sys.stdout.write("\n".join(render_sources(answer.attribution)) + "\n")
