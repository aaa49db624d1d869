"""What a server keeps and how its requests take turns: the device queue (round-robin per client),
pool states within a memory budget, the state an inject committed kept resident (its memory K/V
read by the next ask), an answer that stops at the next token once its client left."""

from __future__ import annotations

import threading

import pytest

from memcli.app.settings import load_settings
from memcli.store import PoolStore

from .helpers import DEADLINE, QUESTION, TEXTS, local, make_pool, wait_for


# --------------------------------------------------------------------------- the device queue and the budget
def test_device_queue_serves_clients_round_robin():
    from memcli.server.queue import Cancelled, DeviceQueue

    queue = DeviceQueue()
    order = []
    held = queue.acquire("a")
    threads = []

    def take(client: str, name: str) -> None:
        ticket = queue.acquire(client)
        order.append(name)
        queue.release(ticket)

    for client, name in (("b", "b1"), ("b", "b2"), ("b", "b3"), ("c", "c1"), ("c", "c2")):
        thread = threading.Thread(target=take, args=(client, name))
        thread.start()
        threads.append(thread)
        wait_for(lambda n=len(threads): queue.waiting() == n, "the ticket to queue")
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):  # a client that left gives its place up
        queue.acquire("d", cancelled)
    queue.release(held)
    for thread in threads:
        thread.join(DEADLINE)
    assert order == ["b1", "c1", "b2", "c2", "b3"]


def test_pool_states_stay_within_the_memory_budget(ck, tmp_path):
    from memcli.app.asking import answer_prompt, decode_answer
    from memcli.server.resident import Resident

    app = local(ck)
    make_pool(app, tmp_path, "one", TEXTS[:1])
    make_pool(app, tmp_path, "two", TEXTS[1:2])
    resident = Resident(load_settings(device="cpu"), keep_alive=None, budget_bytes=1)
    try:
        model = resident.use_model(ck)
        loaded = model.app.model(ck)
        for name in ("one", "two"):
            state = resident.loaded_pool(model, name)
            ids, budget, _ = answer_prompt(loaded, QUESTION, None, 8)
            assert decode_answer(loaded, state.state, ids, budget).text == app.ask(name, QUESTION, max_new_tokens=8).text
        pools_kept = [p["pool"] for m in resident.snapshot()["models"] for p in m["pools"]]
        assert pools_kept == ["two"]  # the least recently used went out
        resident.done_with(model)
        resident2 = Resident(load_settings(device="cpu"), keep_alive=None, budget_bytes=10**9)
        model2 = resident2.use_model(ck)
        first = resident2.loaded_pool(model2, "one")
        assert resident2.loaded_pool(model2, "one") is first  # same version: kept
        app.inject("one", [str(tmp_path / "one-0.txt")], force=True)
        assert resident2.loaded_pool(model2, "one") is not first  # a new commit: a new state
        resident2.done_with(model2)
        resident2.close()
    finally:
        resident.close()


def test_an_ask_after_a_served_inject_reads_the_memory_kv_the_inject_kept(ck, tmp_path, monkeypatch):
    """The server keeps the state its inject committed as the pool's resident state: the next ask
    reads the memory K/V the inject updated (nothing is rebuilt) and answers what an in-process
    ask on the committed pool answers, token for token."""
    from memcli.app.asking import answer_prompt, decode_answer
    from memcli.core.prefix import PrefixCache
    from memcli.server.resident import Resident

    app = local(ck)
    make_pool(app, tmp_path, "kept", TEXTS[:1])
    extra = tmp_path / "extra.txt"
    extra.write_text(TEXTS[2] * 3)
    resident = Resident(load_settings(device="cpu"), keep_alive=None, budget_bytes=10**9)
    try:
        model = resident.use_model(ck)
        loaded = model.app.model(ck)
        ids, budget, _ = answer_prompt(loaded, QUESTION, None, 8)
        decode_answer(loaded, resident.loaded_pool(model, "kept").state, ids, budget)  # builds the K/V once
        job = resident.job("test")
        with job:  # as the server injects: its resident state handed over, kept once committed
            model.app.inject("kept", [str(extra)], model=ck, take_loaded=lambda: resident.take_pool(ck, "kept", job))
        builds = []
        original = PrefixCache.build
        monkeypatch.setattr(PrefixCache, "build", lambda self, state: (builds.append(1), original(self, state)))
        state = resident.loaded_pool(model, "kept")
        assert state.version == PoolStore().read_manifest("kept")["version"]
        got = decode_answer(loaded, state.state, ids, budget)
        assert builds == []  # the inject's K/V, updated row by row, answered
        assert got.tokens == app.ask("kept", QUESTION, max_new_tokens=8).tokens
        assert builds  # the in-process ask opened the pool afresh and built them (the counter counts)
        resident.done_with(model)
    finally:
        resident.close()


def test_an_answer_stops_at_the_next_token_once_its_client_left(ck, tmp_path):
    from memcli.app.asking import answer_prompt, decode_answer
    from memcli.server.queue import Cancelled, DeviceQueue, Job
    from memcli.server.resident import Resident

    app = local(ck)
    make_pool(app, tmp_path, "gone", TEXTS[:1])
    resident = Resident(load_settings(device="cpu"), keep_alive=None)
    try:
        model = resident.use_model(ck)
        loaded = model.app.model(ck)
        state = resident.loaded_pool(model, "gone")
        job = Job(DeviceQueue(), "c")
        pieces = []

        def on_text(text):
            pieces.append(text)
            job.cancelled.set()  # the client disconnects after the first piece

        with job, pytest.raises(Cancelled):
            decode_answer(loaded, state.state, answer_prompt(loaded, QUESTION, None, 30)[0], 30, on_text=on_text,
                          checkpoint=job.check_cancelled)
        assert len(pieces) == 1
        assert job.queue.acquire("next") is not None  # the device was given back
        resident.done_with(model)
    finally:
        resident.close()
