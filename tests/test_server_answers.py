"""Answers through `memcli serve` equal the same work in this process (tiny random-weight
checkpoints: the answers are noise, so every comparison is exact equality): the native ask and the
command line through it, the OpenAI endpoint, conversations, two clients at once.

Every wait is on an event (a line on the socket, a process exit, `ps` showing a change) with a
generous deadline; nothing counts what happens within a time window.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from memcli.server import address as server_address
from memcli.server.client import Client
from memcli.store import PoolStore
from memcli.wire import Sampling

from .helpers import (
    DEADLINE, QUESTION, TEXTS, local, make_pool, ndjson_events, run_cli, served_answer, streamed,
)
from .support import fixture_checkpoint


# --------------------------------------------------------------------------- results equal in-process
def test_ask_through_server_equals_in_process(ck, tmp_path, server, monkeypatch):
    app = local(ck)
    make_pool(app, tmp_path, "notes", TEXTS[:2])
    expected = app.ask("notes", QUESTION)
    sampled = app.ask("notes", QUESTION, sampling=Sampling(0.8, 0.9, 7))

    with Client() as client:
        text, done = served_answer(client, "notes", QUESTION)
        assert text == expected.text
        assert done["new_tokens"] == len(expected.tokens) == expected.new_tokens
        assert done["prompt_tokens"] == expected.prompt_tokens
        again, _ = served_answer(client, "notes", QUESTION)  # from the cached memory K/V
        assert again == expected.text
        text, _ = served_answer(client, "notes", QUESTION, temperature=0.8, top_p=0.9, seed=7)
        assert text == sampled.text

    # the command line finds the running server and prints the same answer
    monkeypatch.delenv("MEMCLI_SERVER")
    result = run_cli("ask", QUESTION, "--pool", "notes")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == streamed(app, "notes", QUESTION) + "\n"
    # --json: the same NDJSON events as in-process (timings aside)
    served = ndjson_events(run_cli("ask", QUESTION, "--pool", "notes", "--json").stdout)
    here = ndjson_events(run_cli("--no-server", "ask", QUESTION, "--pool", "notes", "--json").stdout)
    assert served == here
    assert served[-1]["event"] == "answer" and served[-1]["answer"] == expected.text
    assert "".join(e["text"] for e in served if e["event"] == "text") == expected.text

    # a missing pool: the same one-line error
    missing = run_cli("ask", QUESTION, "--pool", "note")
    assert missing.exit_code == 1 and missing.stderr.strip() == "memcli: error: pool note not found; did you mean notes?"
    assert run_cli("--no-server", "ask", QUESTION, "--pool", "note").stderr == missing.stderr
    # chat starts a pool that does not exist yet (issue 19): the same lines through the server and here
    chat = run_cli("chat", "--pool", "note", input="hi?\n")
    assert chat.exit_code == 1 and chat.stderr == run_cli("--no-server", "chat", "--pool", "note", input="hi?\n").stderr
    assert chat.stderr.splitlines()[0].endswith("; did you mean notes?")
    assert chat.stderr.splitlines()[1] == "memcli: error: pool note is still empty: /inject PATH... adds documents to it"
    for command in (["ask", QUESTION, "--pool"], ["chat", "--pool"], ["pool", "info"]):  # the store's one line
        invalid = run_cli(*command, "bad/name", input="hi?\n")
        assert invalid.exit_code == 1 and "invalid pool name" in invalid.stderr, invalid.stderr
        assert run_cli("--no-server", *command, "bad/name", input="hi?\n").stderr == invalid.stderr

    # --model (here after the command) of another model: refused from its config, as in-process, unloaded
    other = str(fixture_checkpoint("memoryllm-8b-tiny"))
    refused = run_cli("ask", QUESTION, "--pool", "notes", "--model", other)
    assert refused.exit_code == 1 and "belongs to model" in refused.stderr
    assert run_cli("--no-server", "ask", QUESTION, "--pool", "notes", "--model", other).stderr == refused.stderr
    with Client() as client:
        assert [m["model"] for m in client.ps()["models"]] == [ck]


def test_openai_client_streams_and_completes_from_a_pool(ck, tmp_path, server):
    import openai

    app = local(ck)
    make_pool(app, tmp_path, "work", TEXTS)
    expected = app.ask("work", QUESTION, max_new_tokens=12)
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(server_address.socket_path())))
    oa = openai.OpenAI(base_url="http://memcli/v1", api_key="unused", http_client=http)

    assert "work" in [m.id for m in oa.models.list().data]
    assert oa.models.retrieve("work").id == "work"
    messages = [{"role": "user", "content": QUESTION}]
    done = oa.chat.completions.create(model="work", messages=messages, max_tokens=12)
    assert done.choices[0].message.content == expected.text
    assert done.usage.prompt_tokens == expected.prompt_tokens
    assert done.usage.completion_tokens == len(expected.tokens)
    assert done.usage.total_tokens == expected.prompt_tokens + len(expected.tokens)
    assert done.choices[0].finish_reason == ("stop" if expected.stopped else "length")

    pieces, usage, finish = [], None, None
    for chunk in oa.chat.completions.create(model="work", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == expected.text and usage.completion_tokens == len(expected.tokens) and finish

    # a stop string ends the answer before it: three characters that first occur at index 3 or later
    # (the tiny model's random answer may repeat itself, and its pool's drops are random)
    at = next(i for i in range(3, len(expected.text) - 2) if expected.text.find(expected.text[i : i + 3]) == i)
    stop = expected.text[at : at + 3]
    cut = oa.chat.completions.create(model="work", messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == expected.text[:at]
    assert cut.choices[0].finish_reason == "stop"

    # seed and temperature are honoured: same seed, same sample
    one = oa.chat.completions.create(model="work", messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    two = oa.chat.completions.create(model="work", messages=messages, max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert one.choices[0].message.content == two.choices[0].message.content

    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-pool", messages=messages)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="work", messages=messages, temperature=-1)
    http.close()


def test_conversation_keeps_earlier_turns_within_the_window(ck, tmp_path, server):
    from memcli.app.asking import conversation_prompt

    app = local(ck)
    make_pool(app, tmp_path, "talk", TEXTS[:1])
    loaded = app.model(ck)
    limit = loaded.max_input_tokens()
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i} about trains?"}, {"role": "assistant", "content": f"answer {i}."}]
    turns.append({"role": "user", "content": "and the last one?"})
    ids, dropped = conversation_prompt(loaded, turns, 8)
    assert dropped > 0 and len(ids) + 8 <= limit
    kept = turns[dropped:]
    from memcli.loading.prompts import chat_prompt_ids

    assert ids == chat_prompt_ids(loaded.tokenizer, kept)  # the oldest went first, the newest stayed
    short = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello."}, {"role": "user", "content": "and?"}]
    assert conversation_prompt(loaded, short, 8) == (chat_prompt_ids(loaded.tokenizer, short), 0)

    with Client() as client:
        events = list(client.chat("talk", turns, max_tokens=8))
    usage = [e["usage"] for e in events if e.get("usage")][-1]
    assert usage["prompt_tokens"] == len(ids)


# --------------------------------------------------------------------------- concurrency
def test_two_clients_on_different_pools_at_once(ck, tmp_path, server):
    app = local(ck)
    make_pool(app, tmp_path, "a", TEXTS[:2])
    make_pool(app, tmp_path, "b", TEXTS[2:])
    expected = {"a": app.ask("a", QUESTION).text, "b": app.ask("b", QUESTION).text}
    results: dict[str, list[str]] = {"a": [], "b": []}
    errors = []
    start = threading.Barrier(2)

    def worker(pool: str) -> None:
        try:
            with Client() as client:
                start.wait()
                for _ in range(3):
                    results[pool].append(served_answer(client, pool, QUESTION)[0])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    assert results == {"a": [expected["a"]] * 3, "b": [expected["b"]] * 3}


def test_chat_through_the_server_is_a_conversation(ck, tmp_path, server, monkeypatch):
    """The same conversation through the server and in-process: the same answers (the second turn
    carries the first, /reset forgets both), the same --json lines."""
    app = local(ck)
    make_pool(app, tmp_path, "conv", TEXTS[:2])
    monkeypatch.delenv("MEMCLI_SERVER")
    lines = "first question?\nsecond question?\n/reset\nfirst question?\n"
    args = ["chat", "--pool", "conv", "--max-new-tokens", "6"]
    served = run_cli(*args, input=lines)
    here = run_cli("--no-server", *args, input=lines)
    assert served.exit_code == 0 and here.exit_code == 0, served.stderr + here.stderr
    assert served.stdout == here.stdout and served.stderr == here.stderr
    session = app.chat("conv", max_new_tokens=6)
    first, second = [streamed(session, None, q) for q in ("first question?", "second question?")]
    assert served.stdout == f"{first}\n{second}\n{first}\n"

    served_json = ndjson_events(run_cli(*args, "--json", input=lines).stdout)
    assert served_json == ndjson_events(run_cli("--no-server", *args, "--json", input=lines).stdout)
    assert [(e["event"], e.get("turn")) for e in served_json] == [("turn", 1), ("turn", 2), ("reset", None), ("turn", 1)]
    # the second turn's prompt carried the first as far as the window holds it (the random tiny
    # model's answer may not fit; test_cli shows a turn that does), the turn after /reset none
    fresh = app.chat("conv", max_new_tokens=6)
    fresh.ask("first question?")
    carried = fresh.ask("second question?").turns_in_prompt
    assert [e.get("turns_in_prompt") for e in served_json] == [0, carried, None, 0]
    assert served_json[0]["prompt_tokens"] == served_json[3]["prompt_tokens"]

    # /inject mid-conversation: the same report line and the next answer reads it
    PoolStore().fork("conv", "conv2")
    note = tmp_path / "later.txt"
    note.write_text(TEXTS[3])
    lines = f"first question?\n/inject {note} {tmp_path / 'gone.txt'}\nfirst question?\n"
    served_json = ndjson_events(run_cli("chat", "--pool", "conv", "--max-new-tokens", "6", "--json", input=lines).stdout)
    here_json = ndjson_events(run_cli("--no-server", "chat", "--pool", "conv2", "--max-new-tokens", "6", "--json",
                                      input=lines).stdout)
    unpooled = lambda events: [{k: v for k, v in e.items() if k != "pool"} for e in events]  # noqa: E731
    assert unpooled(served_json) == unpooled(here_json)
    assert [e["event"] for e in served_json] == ["turn", "inject", "turn"]
    assert served_json[1]["summary"]["injected"] == 1 and served_json[1]["summary"]["skipped"] == 1

    # earlier turns reach the server's prompt as they reach the in-process one
    history = [("first question?", "yes.")]
    expected = local(ck).ask("conv", "second question?", max_new_tokens=6, history=history)  # conv's last commit
    assert expected.turns_in_prompt == 1
    with Client() as client:
        text, done = served_answer(client, "conv", "second question?", max_new_tokens=6, history=history)
    assert text == expected.text and done["turns_in_prompt"] == 1 and done["prompt_tokens"] == expected.prompt_tokens
