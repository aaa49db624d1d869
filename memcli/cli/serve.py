"""`memcli serve | ps | stop`: the resident server (memcli.server), what it has loaded, and its end.

ask, chat, inject and pool info go through a running server by themselves (memcli.cli.backends).
"""

from __future__ import annotations

import time
from typing import Optional

import typer

from memcli.app.settings import parse_keep_alive
from memcli.base.text import shown
from memcli.cli.app import invocation, app
from memcli.cli.output import console, human_bytes, print_json, quiet_libraries, say, table
from memcli.server import address as server_address
from memcli.server.launch import running_client


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "forever"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _parse_bytes(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a size like 8G or 512M") from None
    return int(number * units[unit])


def _iso_times(ps: dict) -> dict:
    """`ps` (the server's /api/ps, Unix times) with its times in memcli's one format (ISO 8601, UTC)."""
    from memcli.base.clock import iso_from_epoch

    def model(row: dict) -> dict:
        pools = [{**p, "last_used": iso_from_epoch(p.get("last_used"))} for p in row.get("pools", [])]
        return {**row, "loaded_at": iso_from_epoch(row.get("loaded_at")),
                "expires_at": iso_from_epoch(row.get("expires_at")), "pools": pools}

    return {**ps, "started": iso_from_epoch(ps.get("started")), "models": [model(m) for m in ps.get("models", [])]}


@app.command()
def serve(
    ctx: typer.Context,
    keep_alive: Optional[str] = typer.Option(None, "--keep-alive", metavar="DURATION", help="How long a model stays loaded after its last request: 5m (default), 30s, 1h, 0 (unload after each request) or -1 (forever). MEMCLI_KEEP_ALIVE, config keep_alive."),
    host: Optional[str] = typer.Option(None, "--host", metavar="ADDRESS", help="Also listen on TCP at this address (beyond loopback only with MEMCLI_TOKEN set)."),
    port: Optional[int] = typer.Option(None, "--port", metavar="PORT", min=1, max=65535, help="TCP port (default 11435; the host defaults to 127.0.0.1)."),
    memory: Optional[str] = typer.Option(None, "--memory", metavar="SIZE", help="Budget for loaded pool states, e.g. 8G (default: half of this machine's memory)."),
    exit_when_idle: bool = typer.Option(False, "--exit-when-idle", hidden=True, help="Stop once nothing is loaded for a keep-alive (servers that commands start)."),
) -> None:
    """Run the resident server: models and pools stay loaded; ask, chat and inject use it."""
    from memcli.server.process import serve as run_server

    settings = invocation(ctx).settings()
    seconds = parse_keep_alive(keep_alive if keep_alive is not None else settings.keep_alive)
    budget = _parse_bytes(memory) if memory else None
    quiet_libraries()
    code = run_server(settings, seconds, host=host, port=port, budget_bytes=budget, exit_when_idle=exit_when_idle)
    raise typer.Exit(code)

@app.command()
def ps(as_json: bool = typer.Option(False, "--json", metavar="", help="As JSON on stdout (times in ISO 8601, UTC).")) -> None:
    """Show what the running server has loaded: models, pools, memory and until when."""
    client = running_client()
    if client is None:
        if as_json:
            print_json({"running": False, "models": []})
        else:
            say("no memcli server is running")
        return
    data = client.ps()
    if as_json:
        print_json({**_iso_times(data), "running": True})
        return
    listing = table("model", "device", "weights", "pools", "pool memory", "until", right=("weights", "pool memory"))
    for model in data["models"]:
        pools = ", ".join(f"{p['pool']} (v{p['version']})" for p in model["pools"]) or "-"
        until = "in use" if model["active_requests"] else _when(model["expires_at"])
        listing.add_row(shown(model["model"]), model["device"], human_bytes(model["weights_bytes"]),
                        shown(pools), human_bytes(model["pool_bytes"]), until)
    say(f"memcli server pid {data['pid']}, keep-alive "
            f"{'forever' if data['keep_alive_seconds'] is None else str(data['keep_alive_seconds']) + ' s'}")
    if data["models"]:
        console(stderr=False).print(listing)
    else:
        say("no model loaded")

@app.command()
def stop() -> None:
    """Stop the running server (work in progress is cancelled; injects keep their commits)."""
    client = running_client()
    if client is None:
        say("no memcli server is running")
        return
    pid = client.stop()["pid"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server_address.socket_path().exists():
        time.sleep(0.05)
    say(f"stopped the memcli server (pid {pid})")
