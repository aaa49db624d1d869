"""A test hook, one for every path that does work in slices (an inject in this process, a
server's requests): with MEMCLI_TEST_PAUSE=FILE, work waits at a boundary while FILE exists.

FILE may name the boundary to wait at (token, chunk, commit, file, or file:N before the Nth file of
an inject; empty: the first one reached); the waiter creates FILE.reached when it starts waiting,
so a test can act (send a signal, a second request) while the work is provably mid-way, on any
machine, without timing. `ended()` is asked while waiting: True (a stop was asked for) ends the
wait; it may raise (a cancelled request).
"""

from __future__ import annotations

import os
import time
from typing import Callable

PAUSE_ENV = "MEMCLI_TEST_PAUSE"


def wanted() -> bool:
    """Whether the hook is on (one environment lookup: what a boundary costs when it is off)."""
    return bool(os.environ.get(PAUSE_ENV))


def pause_at(where: str, ended: Callable[[], bool] = lambda: False) -> None:
    """Wait at boundary `where` while the pause file exists (see the module docstring)."""
    path = os.environ.get(PAUSE_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            name = f.read().strip()
    except OSError:
        return
    if name and name != where and not (name == "file" and where.startswith("file:")):
        return
    open(path + ".reached", "a").close()
    while os.path.exists(path):
        if ended():
            return
        time.sleep(0.02)
