"""`memcli pool ls | info | fork | rename | rm | export | import | verify | rebind`: pools as data.

Light: manifests, the log and the census only (no model, no torch). `pool info` asks a running
server when there is one (the same facts, read where the pool is), else reads here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from memcli.base.errors import EXIT_ERROR, UsageError
from memcli.base.text import one_line, shown
from memcli.cli.app import FLAG, JSON_HELP, invocation, pool_app
from memcli.cli.completion import complete_pool
from memcli.cli import output
from memcli.cli.output import console, error_line, facts_table, human_bytes, plural, print_json, say, tail, when


@pool_app.command("ls")
def pool_ls(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """List the pools."""
    from memcli.pools import meta as pool_meta  # manifests only: no model, no torch

    rows = pool_meta.list_rows(invocation(ctx).store())
    if as_json:
        print_json(rows)
        return
    if not rows:
        say("no pools yet (memcli inject FILE --pool NAME creates one)")
        return
    listing = output.table("name", "model", "size", "sources", "chunks", "tokens", "updated",
                   right=("size", "sources", "chunks", "tokens"))
    for row in rows:
        if row["error"]:
            listing.add_row(row["name"], Text(f"damaged: {one_line(row['error'])}", style="red"), "", "", "", "", "")
            continue
        listing.add_row(row["name"], tail(shown(row["model"] or "?"), 24), human_bytes(row["bytes_on_disk"]), f"{row['sources']:,}",
                      f"{row['chunks']:,}", f"{row['tokens']:,}", when(row["updated"]))
    console(stderr=False).print(listing, soft_wrap=not console(stderr=False).is_terminal)


@pool_app.command("info")
def pool_info(ctx: typer.Context,
              name: Optional[str] = typer.Argument(None, metavar="POOL", autocompletion=complete_pool, help="Pool name (default: config pool)."),
              as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Show a pool's facts and how much of each source is still in memory."""
    run = invocation(ctx)
    name = run.pool(name)
    info = run.backend(start=False).pool_info(name)  # a running server's, else read here (no model, no torch)
    if as_json:
        print_json(info)
        return
    out = console(stderr=False)
    facts = facts_table()
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
        ("created", when(info["created"])),
        ("updated", when(info["updated"])),
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
        retention = output.table("source", *columns, right=columns)
        for row in info["retention"]:
            chunks = f"{row['chunks']:,}" + (" shared" if "packed" in row else "")
            retention.add_row(tail(shown(row["source"]), 48), chunks, f"{100 * row['share_retained']:.1f}%",
                          f"{row['rows_in_stm']:,}", *((f"{row['rows_in_ltm']:,}",) if ltm else ()))
        out.print(retention)


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
    run = invocation(ctx)
    run.require_pool(src)
    info = run.store().fork(src, dst)
    _done(as_json, f"forked pool {src} to {dst}", {"pool": dst, "from": src, "version": info.version})


@pool_app.command("rename")
def pool_rename(ctx: typer.Context, old: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to rename."),
                new: str = typer.Argument(..., metavar="NEW", help="Its new name."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Rename a pool."""
    run = invocation(ctx)
    run.require_pool(old)
    run.store().rename(old, new)
    _done(as_json, f"renamed pool {old} to {new}", {"pool": new, "from": old})


@pool_app.command("rm")
def pool_rm(ctx: typer.Context, name: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to delete."),
            yes: bool = typer.Option(False, "--yes", "-y", metavar=FLAG, help="Do not ask for confirmation."),
            purge_log: bool = typer.Option(False, "--purge-log", metavar=FLAG, help="Also delete its answers from the log of answers (memcli log); they stay without it.")) -> None:
    """Delete a pool (asks first; without a terminal, needs --yes)."""
    from memcli.cli.log import purge_line
    from memcli.store import PoolError

    run = invocation(ctx)
    run.require_pool(name)
    store = run.store()
    if not yes:
        if not sys.stdin.isatty():
            raise PoolError(f"refusing to remove pool {name} without --yes (no terminal to confirm on)")
        if not typer.confirm(f"Remove pool {name} and everything in its memory? This cannot be undone.", err=True):
            say(f"kept pool {name}")
            raise typer.Exit(EXIT_ERROR)
    store.remove(name)
    say(purge_line(name) if purge_log else f"removed pool {name}")


@pool_app.command("export")
def pool_export(ctx: typer.Context, name: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to export."),
                file: Path = typer.Argument(..., metavar="FILE", help="The .tar file to write."),
                force: bool = typer.Option(False, "--force", metavar=FLAG, help="Replace FILE if it exists."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Write a pool to one file (a tar), e.g. for a backup or another machine."""
    run = invocation(ctx)
    run.require_pool(name)
    run.store().export(name, file, force=force)
    size = file.stat().st_size if file.exists() else None
    _done(as_json, f"exported pool {name} to {shown(file)} ({human_bytes(size)})",
          {"pool": name, "file": str(file.resolve()), "bytes": size})


@pool_app.command("import")
def pool_import(ctx: typer.Context, file: Path = typer.Argument(..., metavar="FILE", help="A file written by memcli pool export."),
                name: Optional[str] = typer.Argument(None, metavar="POOL", help="Pool name (default: the exported name)."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Create a pool from an exported file (every part is checked first)."""
    info = invocation(ctx).store().import_(file, name)
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
    run = invocation(ctx)
    name = run.require_pool(run.pool(name))
    store = run.store()
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
        error_line(f"pool {name} is damaged ({plural(len(problems), 'problem')})")
        raise typer.Exit(EXIT_ERROR)
    sys.stdout.write(f"pool {name}: ok ({plural(parts, 'part')} verified)\n")


@pool_app.command("rebind", epilog="Example:  memcli pool rebind demo --model ~/models/tiny-model")
def pool_rebind(ctx: typer.Context, name: str = typer.Argument(..., metavar="POOL", autocompletion=complete_pool, help="Pool to rebind."),
                as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Record --model MODEL as the pool's model: the same model found elsewhere (a moved folder, the
    hub id of a local copy).

    Its config.json must have the pool's fingerprint; no weights are read."""
    run = invocation(ctx)
    model = run.flags.get("model")
    if not model:
        raise UsageError(f"pool rebind needs --model: memcli pool rebind {name} --model PATH")
    done = run.library().rebind(name, model)
    _done(as_json, f"pool {name} now uses model {done['model']} (was {done['previous']})", done)
