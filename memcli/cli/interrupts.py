"""Ctrl-C and SIGTERM on the command line.

SIGTERM is delivered like Ctrl-C (`Terminated`, a KeyboardInterrupt), so every cleanup path for an
interruption runs, and a conversation that was sent SIGTERM ends (`terminated()`). During an inject
(`stopping`), in this process or through a server alike, the first Ctrl-C or SIGTERM asks the
inject to end once the chunk it is making is committed, and its report says what was kept; a
second one quits at once, keeping the last commit.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOPPING = ("memcli: stopping once the chunk in progress is committed (Ctrl-C again quits at once, "
            "keeping the last commit)")

_terminated = threading.Event()  # SIGTERM came: an interruption a chat session must not swallow


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so every cleanup path for an interruption runs."""


def terminated() -> bool:
    return _terminated.is_set()


def on_sigterm(signum, frame) -> None:
    _terminated.set()
    raise Terminated()


def install() -> None:
    """SIGTERM interrupts like Ctrl-C (exit 130, inject keeps what is committed). Ctrl-C's handler
    is installed too: a process started with SIGINT ignored (nohup, a background job of a
    non-interactive shell) still stops cleanly on SIGINT."""
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass


@contextmanager
def stopping(say: Callable[[str], None]) -> Iterator[threading.Event]:
    """The event an inject stops at (see the module docstring): set by the first Ctrl-C or SIGTERM
    (one line says so); the second raises at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame) -> None:
        if signum == signal.SIGTERM:
            _terminated.set()
        if stop.is_set():
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        stop.set()
        say(STOPPING)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
