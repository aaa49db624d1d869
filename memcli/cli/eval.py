"""`memcli eval retention`: how much a model remembers as distractors follow the facts (in this
process: an experiment on the library, not a request to a server)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from memcli.cli.app import FLAG, eval_app, invocation
from memcli.cli.backends import local
from memcli.cli.output import say
from memcli.cli.progress import EvalProgress


class RetentionCommand(typer.core.TyperCommand):
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


@eval_app.command("retention", cls=RetentionCommand,
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

    run = invocation(ctx)
    with EvalProgress() as progress:
        command(local(run.settings()).app, episodes, distractors, seed, max_new_tokens, out_path, plot_path, as_json=as_json,
                out=sys.stdout.write,
                on_progress=lambda done, total, episode: progress(done, total, episode, episodes))
