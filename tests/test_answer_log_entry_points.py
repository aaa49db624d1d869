"""The log of answers through every entry point (issue 20 item 3): an answer is logged where it is
decoded, once, with the entry point it came through: `memcli ask` and `chat` in this process
("cli"), the same through a server ("cli": the client says so), a client of POST /api/ask that does
not say ("server"), the OpenAI API ("openai"); MCP and llm are in tests/test_mcp.py and
tests/test_llm_plugin.py. `memcli log off` stops it at the next answer, in a running server too."""

from __future__ import annotations

import json

import pytest

from memcli.app import answer_log

from .helpers import run, served_answer, tiny_run


@pytest.fixture
def work_pool(note):
    """Pool `work` on memcli-tiny holding its held-out note."""
    tiny_run("inject", note, "--pool", "work")
    return "work"


def _rows(pool: str) -> list[dict]:
    return list(reversed(answer_log.entries(pool=pool, limit=None)))  # oldest first


def test_ask_and_chat_in_process_write_one_row_each(work_pool):
    question = "Where did the tiny notes go?"
    tiny_run("ask", question, "--pool", work_pool, "--max-new-tokens", "3")
    [row] = _rows(work_pool)
    assert (row["via"], row["question"], row["model"], row["conversation"]) == ("cli", question, "memcli-tiny", None)
    assert row["pool_version"] >= 1 and row["new_tokens"] >= 1 and row["answer"]
    assert row["sources"] is None  # sources only when they were asked for
    tiny_run("ask", question, "--pool", work_pool, "--max-new-tokens", "3", "--sources")
    assert _rows(work_pool)[-1]["sources"]

    result = run("--model", "memcli-tiny", "chat", "--pool", work_pool, "--max-new-tokens", "3",
                 input="first question?\nsecond question?\n")
    assert result.exit_code == 0, result.stderr
    turns = _rows(work_pool)[2:]
    assert [(r["question"], r["turn"], r["via"]) for r in turns] == [("first question?", 1, "cli"),
                                                                      ("second question?", 2, "cli")]
    assert turns[0]["conversation"] and turns[0]["conversation"] == turns[1]["conversation"]
    # -q finds it; --json prints it
    found = run("log", "-q", "second", "--json")
    assert found.exit_code == 0, found.stderr
    assert [r["question"] for r in json.loads(found.stdout)] == ["second question?"]


def test_log_off_stops_it(work_pool):
    assert run("log", "off").exit_code == 0
    tiny_run("ask", "Anything?", "--pool", work_pool, "--max-new-tokens", "2")
    assert _rows(work_pool) == []
    assert run("log", "on").exit_code == 0
    tiny_run("ask", "Anything?", "--pool", work_pool, "--max-new-tokens", "2")
    assert len(_rows(work_pool)) == 1


def test_through_a_server_each_answer_is_one_row_named_by_its_entry_point(work_pool, served):
    tiny_run("ask", "Through the server?", "--pool", work_pool, "--max-new-tokens", "2")  # routed
    served_answer(served.client, work_pool, "A raw client?", max_new_tokens=2)  # says no via
    import httpx
    from openai import OpenAI

    from memcli.server.address import socket_path

    transport = httpx.HTTPTransport(uds=str(socket_path()))
    with httpx.Client(transport=transport, base_url="http://memcli") as http:
        client = OpenAI(base_url="http://memcli/v1", api_key="none", http_client=http)
        reply = client.chat.completions.create(model=work_pool, max_tokens=2,
                                               messages=[{"role": "user", "content": "And the OpenAI API?"}])
    rows = _rows(work_pool)
    assert [(r["via"], r["question"]) for r in rows] == [("cli", "Through the server?"), ("server", "A raw client?"),
                                                          ("openai", "And the OpenAI API?")]
    assert rows[2]["answer"] == reply.choices[0].message.content
    assert all(r["model"] == "memcli-tiny" and r["pool_version"] >= 1 for r in rows)
    # `memcli log off` reaches the running server at its next answer
    assert run("log", "off").exit_code == 0
    tiny_run("ask", "Not logged?", "--pool", work_pool, "--max-new-tokens", "2")
    assert len(_rows(work_pool)) == 3
