"""`memcli models | pull | doctor`: the known models and whether each is downloaded (never online),
a download that resumes, and what this machine can run."""

from __future__ import annotations

import sys

import typer
from rich.text import Text

from memcli.base.text import shown
from memcli.cli.app import FLAG, JSON_HELP, app, invocation
from memcli.cli.completion import complete_model
from memcli.cli.output import console, facts_table, human_bytes, print_json, table


@app.command()
def models(as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """The known models and whether each is downloaded (never goes online)."""
    from memcli.app.catalog import list_models

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    listing = table("model", "hub id", "status", "size", right=("size",))
    for row in rows:
        status = Text(row["status"], style="green" if row["status"] in ("downloaded", "bundled") else "yellow" if row["status"] == "partial" else "")
        if row["problem"] and row["status"] not in ("downloaded", "bundled"):
            status.append(f" ({row['problem']})")
        name = row["name"] + (" (default)" if row["default"] else "")
        listing.add_row(name, row["repo"] or "(in the package)", status, human_bytes(row["bytes"]) if row["bytes"] else "")
    console(stderr=False).print(listing)
    for row in rows:
        if row.get("description"):
            console(stderr=False).print(Text(f"{row['name']}: {shown(row['description'])}"), soft_wrap=True)


@app.command()
def pull(model: str = typer.Argument(..., metavar="MODEL", autocompletion=complete_model,
                                     help="An alias (memcli models) or a hub id owner/name.")) -> None:
    """Download a model into the Hugging Face cache (an interrupted download resumes)."""
    from memcli.app.catalog import pull_model

    folder = pull_model(model)
    sys.stdout.write(f"{folder}\n")


@app.command()
def doctor(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """What this machine can run: GPU, quantization, memory, disk, paths and the resolved settings."""
    from memcli.app.doctor import diagnose

    report = diagnose(invocation(ctx).settings())
    if as_json:
        print_json(report)
        return
    out = console(stderr=False)
    facts = facts_table()

    def row(key: str, value: object) -> None:
        facts.add_row(Text(key, style="bold"), shown(value))

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
    out.print(facts)
    out.print()
    if report["problems"]:
        out.print(Text("what will not work here:", style="bold yellow"))
        for problem in report["problems"]:
            out.print(Text(f"  - {shown(problem)}"), soft_wrap=True)
    else:
        out.print(Text("no problems found", style="green"))
