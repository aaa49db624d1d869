"""What the command line shows of what a backend returns, with a `FakeBackend` in place of memcli
(no weights, no server; as simonw/llm's MockModel): the options it hands over, how answers stream,
reports and failures render, and the exit codes. The real backends are held to the same output by
tests/test_parity.py."""

from __future__ import annotations

import json

from memcli.store import PoolNotFound
from memcli.wire import Event, FileResult, InjectReport, Sampling

from .helpers import assert_one_error, run, write


def test_ask_streams_the_pieces_and_hands_over_the_options(fake_backend):
    fake_backend.pools["work"] = {"name": "work"}
    fake_backend.enqueue_answer("The launch is on Friday.", pieces=["The launch", " is on", " Friday."])
    result = run("ask", "When is the launch?", "--pool", "work", "--max-new-tokens", "7", "--temperature", "0.5",
                 "--top-p", "0.9", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "The launch is on Friday.\n" and result.stderr == ""
    [(method, call)] = [c for c in fake_backend.calls if c[0] == "ask"]
    assert (call["pool"], call["question"], call["max_new_tokens"], call["sources"]) == \
        ("work", "When is the launch?", 7, False)
    assert call["sampling"] == Sampling(0.5, 0.9, 3)


def test_a_piped_answer_is_printed_as_the_model_wrote_it(fake_backend):
    """Off a terminal the answer's characters go out untouched, "\r" and control bytes included
    (random weights write them): what a script reads is the answer. On a terminal they would be
    shown as U+FFFD (cli.output.write_answer)."""
    text = "Y.\x17]<\x1f p E\r\n at\r an\x0b\x85end"
    fake_backend.enqueue_answer(text, pieces=[text[:8], text[8:13], text[13:]])
    result = run("ask", "When?", "--pool", "work")
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == (text + "\n").encode() and result.stdout == text + "\n"


def test_ask_json_is_text_events_then_the_answer_event(fake_backend):
    fake_backend.enqueue_answer("Friday.", pieces=["Fri", "day."], pool_version=4)
    events = [json.loads(line) for line in run("ask", "When?", "--pool", "work", "--json").stdout.splitlines()]
    assert events[:2] == [{"event": "text", "text": "Fri"}, {"event": "text", "text": "day."}]
    assert events[2]["event"] == "answer" and events[2]["answer"] == "Friday." and events[2]["pool_version"] == 4
    assert events[2]["question"] == "When?" and len(events) == 3


def test_ask_sources_are_ranked_under_the_answer(fake_backend):
    attribution = {"sources": [{"rank": 1, "share": 0.6, "source": "notes.txt", "rows": 120},
                               {"rank": 2, "share": 0.25, "source": "plan.md", "rows": 40}],
                   "initial_memory_share": 0.15}
    fake_backend.enqueue_answer("Friday.", attribution=attribution)
    result = run("ask", "When?", "--pool", "work", "--sources")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Friday." and "notes.txt" in lines[2] and "60.0%" in lines[2] and "plan.md" in lines[3]
    assert "(initial memory)" in lines[-1] and "15.0%" in lines[-1]
    assert [c[1]["sources"] for c in fake_backend.calls if c[0] == "ask"] == [True]


def test_a_backend_failure_is_one_line_with_its_exit_code(fake_backend):
    fake_backend.fail(PoolNotFound("pool wrk not found; did you mean work?"))
    assert_one_error(run("ask", "When?", "--pool", "wrk"), "pool wrk not found; did you mean work?",
                     code=PoolNotFound.exit_code)


def test_bad_options_are_refused_before_the_backend_is_asked(fake_backend):
    result = run("ask", "When?", "--pool", "work", "--temperature", "nan")
    assert result.exit_code == 2 and "--temperature" in result.stderr
    assert fake_backend.calls == []


def test_inject_renders_the_report_and_an_interruption_exits_130(fake_backend, tmp_path):
    note = write(tmp_path / "a.txt", "Alice took the train to Paris on Monday.")
    done = InjectReport(pool="work", model="memcli-tiny", files=[FileResult(str(note), "injected", chunks=1, tokens=9)],
                        chunks=1, tokens=9)
    fake_backend.enqueue_inject(done, [Event("file", str(note), file_index=1, files_total=1),
                                       Event("commit", str(note), chunks=1)])
    result = run("inject", note, "--pool", "work", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pool"] == "work" and report["files"][0]["status"] == "injected" and report["chunks"] == 1
    [(method, call)] = [c for c in fake_backend.calls if c[0] == "inject"]
    assert [getattr(item, "name", None) for item in call["found"]] == [str(note)]  # what discovery found here

    stopped = InjectReport(pool="work", model="memcli-tiny", interrupted=True,
                           partial=FileResult(str(note), "partial", chunks=2, tokens=40))
    fake_backend.enqueue_inject(stopped)
    result = run("inject", note, "--pool", "work")
    assert result.exit_code == 130
    assert [line for line in result.stderr.splitlines() if line.startswith("interrupted")], result.stderr


def test_chat_sends_the_earlier_turns_and_reset_forgets_them(fake_backend):
    fake_backend.pools["work"] = {"name": "work"}
    for text in ("Paris.", "Bob.", "Paris again."):
        fake_backend.enqueue_answer(text)
    result = run("chat", "--pool", "work", input="Where did Alice go?\nWho did she meet?\n/reset\nWhere?\n")
    assert result.exit_code == 0, result.stderr
    asks = [call for method, call in fake_backend.calls if method == "ask"]
    assert [a["history"] for a in asks] == [[], [("Where did Alice go?", "Paris.")], []]
    assert [a["turn"] for a in asks] == [1, 2, 3] and len({a["conversation"] for a in asks}) == 1
    assert ("hold", {"pool": "work"}) in fake_backend.calls
