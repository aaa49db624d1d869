"""`memcli mcp`: memcli as an MCP server for AI assistants (memcli.integrations.mcp does the work).

Over stdio by default (what a desktop client starts); `--http` serves streamable HTTP on an
owner-only Unix socket, and on TCP with --host/--port by `memcli serve`'s access rules.
"""

from __future__ import annotations

from typing import Optional

import typer

from memcli.cli.app import FLAG, app, invocation


@app.command()
def mcp(
    ctx: typer.Context,
    http: bool = typer.Option(False, "--http", metavar=FLAG, help="Serve streamable HTTP (at /mcp) on an owner-only Unix socket instead of stdio."),
    host: Optional[str] = typer.Option(None, "--host", metavar="ADDRESS", help="With --http, also listen on TCP at this address (beyond loopback only with MEMCLI_TOKEN set)."),
    port: Optional[int] = typer.Option(None, "--port", metavar="PORT", min=1, max=65535, help="With --http, the TCP port (default 11436; the host defaults to 127.0.0.1)."),
) -> None:
    """Run an MCP server (Model Context Protocol) for AI assistants: tools ask, remember, inject_files, list_pools, pool_info; pools as resources.

    A desktop client (Claude Desktop, Cursor, ...) starts it as the command memcli with the argument mcp (the README shows its configuration). inject_files reads only under the folders of config mcp_allowed."""
    from memcli.base.errors import UsageError
    from memcli.integrations import mcp as server

    if (host is not None or port is not None) and not http:
        raise UsageError("--host and --port need --http (stdio has no address)")
    settings = invocation(ctx).settings()
    code = server.run_http(settings, host, port) if http else server.run_stdio(settings)
    raise typer.Exit(code)
