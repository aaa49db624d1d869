"""Stopping an inject that runs on a server (`memcli.server.remote.RemoteBackend.inject` with
`stop`): the first Ctrl-C asks the server to stop once the server has named the inject, a second
one quits at once, and a stop request that finds no server quits saying the pool keeps its last
commit. The server's side is faked here (an inject stream the test drives); tests/test_server_inject.py
runs the same through a real server."""

from __future__ import annotations

import threading

import pytest

from memcli.server import client as client_module
from memcli.server.remote import RemoteBackend
from memcli.wire import Event, InjectReport

INJECT_ID = "0123456789abcdef"


class Stream:
    """An inject's stream as `Client.inject` returns it: `id` once the server has named the inject,
    then its items. `items` are yielded in order; None blocks for good (the server says nothing more)."""

    def __init__(self, items, named: bool = True, wait_for_early_look: bool = False):
        self._id = INJECT_ID if named else None
        self.items = items
        self.looked_early = threading.Event()  # the stop was tried before the server named the inject
        self.wait_for_early_look = wait_for_early_look

    @property
    def id(self):
        if self._id is None:
            self.looked_early.set()
        return self._id

    def __iter__(self):
        if self.wait_for_early_look:
            assert self.looked_early.wait(60), "the stop was never tried while uploading"
            self._id = INJECT_ID  # the server's first line names the inject
        for item in self.items:
            if item is None:
                threading.Event().wait()
            yield item


class FakeClient:
    def __init__(self, path, stream: Stream):
        self.path, self.stream = path, stream

    def inject(self, params, uploads):
        return self.stream

    def close(self):
        pass


def backend(tmp_path, stream: Stream, said: list) -> RemoteBackend:
    return RemoteBackend(FakeClient(tmp_path / "server.sock", stream), model="memcli-tiny", say=said.append)


def test_a_stop_that_finds_no_server_quits_keeping_the_last_commit(tmp_path):
    """The stop request finds no server (nothing listens on the socket): the command quits as
    before (the KeyboardInterrupt goes on to `memcli: interrupted`), saying the pool keeps its last commit."""
    stop, said = threading.Event(), []
    stream = Stream([Event("file", "a.txt"), None])
    with pytest.raises(KeyboardInterrupt):
        backend(tmp_path, stream, said).inject("p", [], stop=stop, on_event=lambda event: stop.set())
    assert said == ["memcli: the server did not take the stop; pool p keeps its last commit"]


def test_the_first_ctrl_c_asks_for_the_stop_once_and_a_second_quits_at_once(tmp_path, monkeypatch):
    """The first Ctrl-C (stop set while the file event is shown) sends one stop request and reading
    goes on; the second (a KeyboardInterrupt while the chunk event is shown) is not swallowed."""
    asked = []
    monkeypatch.setattr(client_module.Client, "stop_inject", lambda self, inject_id: asked.append(inject_id) or {"ok": True})
    stop, said, shown = threading.Event(), [], []
    stream = Stream([Event("file", "a.txt"), Event("chunk", "a.txt", chunks=1), None])

    def on_event(event):
        shown.append(event.kind)
        if event.kind == "file":
            stop.set()  # the first Ctrl-C
        else:
            raise KeyboardInterrupt  # the second

    with pytest.raises(KeyboardInterrupt):
        backend(tmp_path, stream, said).inject("p", [], stop=stop, on_event=on_event)
    assert shown == ["file", "chunk"] and asked == [INJECT_ID] and said == []


def test_a_stop_during_the_upload_is_asked_for_once_the_server_names_the_inject(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(client_module.Client, "stop_inject", lambda self, inject_id: asked.append(inject_id) or {"ok": True})
    stop, said, seen = threading.Event(), [], []
    stop.set()  # Ctrl-C while the files are still being sent
    report = InjectReport(pool="p", model="memcli-tiny")
    stream = Stream([Event("file", "a.txt"), report], named=False, wait_for_early_look=True)
    got = backend(tmp_path, stream, said).inject("p", [], stop=stop, on_event=seen.append)
    assert stream.looked_early.is_set() and asked == [INJECT_ID]
    assert got is report and [event.kind for event in seen] == ["file"] and said == []
