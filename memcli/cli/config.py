"""`memcli config get | set | unset`: the config file's defaults, and where each setting in effect
comes from (default, config file, environment, flag). Light: no store beyond a name check, no torch."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from memcli.app import settings as settings_table  # torch- and tomllib-free: the keys for help and completion
from memcli.base.errors import UsageError
from memcli.base.text import shown
from memcli.cli.app import FLAG, JSON_HELP, config_app, invocation
from memcli.cli.completion import complete_config_key
from memcli.cli.output import console, print_json, say, table


# Every key, from the one table of settings (memcli/app/settings.py: KEYS and HELP).
KEY_HELP = f"A setting: {settings_table.keys_in_words()}."
KEYS_EPILOG = "Keys:\n" + "\n".join(f"  {key:<11} {settings_table.HELP[key]}" for key in settings_table.KEYS)


@config_app.command("get", epilog=KEYS_EPILOG)
def config_get(ctx: typer.Context,
               key: Optional[str] = typer.Argument(None, metavar="KEY", autocompletion=complete_config_key,
                                                   help=KEY_HELP + " Default: all of them."),
               as_json: bool = typer.Option(False, "--json", metavar=FLAG, help=JSON_HELP)) -> None:
    """Show the settings in effect and where each comes from (default, config file, environment, flag)."""
    from memcli.app.settings import KEYS, config_rows, shown_value

    if key is not None and key not in KEYS:
        raise UsageError(f"unknown setting {key!r} (known: {', '.join(KEYS)})")
    rows = config_rows(invocation(ctx).settings())
    if key is not None:
        [row] = [r for r in rows if r["key"] == key]
        if as_json:
            print_json(row)
        else:
            sys.stdout.write(f"{shown_value(row['value'])}\n")
        return
    if as_json:
        print_json(rows)
        return
    listing = table("key", "value", "from")
    for row in rows:
        listing.add_row(row["key"], shown(shown_value(row["value"])), row["source"])
    console(stderr=False).print(listing)


@config_app.command("set", epilog=KEYS_EPILOG)
def config_set(key: str = typer.Argument(..., metavar="KEY", autocompletion=complete_config_key, help=KEY_HELP),
               value: str = typer.Argument(..., metavar="VALUE", help="Its value, e.g. cpu, work, memoryllm-8b, false or 10m.")) -> None:
    """Write a default into the config file (a model folder is stored as an absolute path).

    A pool that does not exist yet is set all the same, with a warning: the first inject into it creates it."""
    from memcli.base import paths
    from memcli.app.settings import set_config

    missing = key == "pool" and _missing_pool(value)  # an invalid name is refused here, before writing
    set_config(key, value)
    say(f"{key} set in {paths.config_file()}")
    if missing:
        say(f"memcli: warning: {missing}", style="yellow")


def _missing_pool(name: str) -> str | None:
    """Why `name` as the default pool needs a word (it does not exist yet), or None; a name no
    pool can have is refused."""
    import difflib

    from memcli.pools.meta import PoolStore
    from memcli.store import validate_name

    validate_name(name)
    store = PoolStore()
    if store.exists(name):
        return None
    close = difflib.get_close_matches(name, [info.name for info in store.list()], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"pool {name} does not exist yet{hint}; the first inject into it creates it (memcli inject FILE)"


@config_app.command("unset", epilog=KEYS_EPILOG)
def config_unset(key: str = typer.Argument(..., metavar="KEY", autocompletion=complete_config_key, help=KEY_HELP)) -> None:
    """Remove a key from the config file (its default applies again)."""
    from memcli.base import paths
    from memcli.app.settings import set_config

    set_config(key, None)
    say(f"{key} removed from {paths.config_file()}")
