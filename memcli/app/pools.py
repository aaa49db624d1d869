"""Pools as the library reads them without a model: the one wording of a missing pool, a pool's
facts and the pools' rows (manifests, the log and the census only: light, no torch)."""

from __future__ import annotations

import difflib


def pool_not_found_message(name: str, existing: list[str]) -> str:
    """The one wording of a missing pool, with the closest existing name."""
    close = difflib.get_close_matches(name, existing, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else " (memcli pool ls lists pools; inject creates one)"
    return f"pool {name} not found{hint}"


def require_pool(store, name: str) -> str:
    """`name` if that pool exists; else NotFound naming the closest pool (an invalid name is refused)."""
    from memcli.store import PoolNotFound, validate_name

    validate_name(name)
    if store.exists(name):
        return name
    raise PoolNotFound(pool_not_found_message(name, [info.name for info in store.list()]))


def pool_exists(store, name: str) -> bool:
    """Whether pool `name` exists (an invalid name is refused)."""
    from memcli.store import validate_name

    return store.exists(validate_name(name))


def pool_info(store, name: str) -> dict:
    """Manifest facts plus, per source, how much of it is still in memory (`retention`, a list,
    empty for an empty pool), from the small tables only. `sources` is a count, as in
    list_pools; `files` the log entries."""
    from memcli.pools import meta as pool_meta

    require_pool(store, name)
    return pool_meta.info_json(store, name)


def list_pools(store) -> list[dict]:
    """One row per pool (sorted by name): the facts `memcli pool ls` shows, from manifests only;
    a damaged pool has `error` set instead of failing the listing."""
    from memcli.pools import meta as pool_meta

    return pool_meta.list_rows(store)
