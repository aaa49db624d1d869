"""The `memcli` console script: the app (memcli.cli.app) with every command group registered, one
module each, in the order help lists them."""

from __future__ import annotations

from memcli.cli import inject, ask, chat, pools, config, models, eval, serve, log, mcp  # noqa: I001 - help's order
from memcli.cli.app import app
from memcli.cli.interrupts import install

COMMANDS = (inject, ask, chat, pools, config, models, eval, serve, log, mcp)  # each registers its commands on import


def main() -> None:
    """SIGTERM interrupts like Ctrl-C (exit 130, inject keeps what is committed); Ctrl-C's handler is
    installed too (memcli.cli.interrupts.install)."""
    install()
    app(prog_name="memcli")


__all__ = ["app", "main"]
