"""Pools as simonw/llm models (memcli/integrations/llm_plugin.py), driven through llm's own command
line (`llm.cli.cli` in CliRunner; a subprocess where a fresh process matters): the plugin is found
through the entry point the editable install registered, nothing is installed at run time.

LLM_USER_PATH (llm's keys, settings and its SQLite log) and MEMCLI_HOME are this test's; memcli-tiny
answers on the CPU, in this process (MEMCLI_SERVER=0) unless a test runs a server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest
from click.testing import CliRunner

from memcli.app import facts
from memcli.loading.checkpoints import BUNDLED

from .helpers import FakeBackend, loaded_pools, subprocess_env, tiny_ask, tiny_note, tiny_run

TINY = BUNDLED["memcli-tiny"]
NOTE = tiny_note()  # four held-out facts memcli-tiny answers right once injected

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="memcli-tiny not shipped")


@pytest.fixture(autouse=True)
def llm_env(tmp_path, monkeypatch):
    """llm's own folder for this test, memcli-tiny on the CPU; the plugin's backend (one per process)
    is let go after the test, so that the next test's MEMCLI_HOME is the one read."""
    from memcli.integrations import llm_plugin

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm-user"))
    monkeypatch.setenv("MEMCLI_MODEL", "memcli-tiny")
    monkeypatch.setenv("MEMCLI_DEVICE", "cpu")
    for name in ("OPENAI_API_KEY", "LLM_MODEL", "LLM_LOAD_PLUGINS", "LLM_RAISE_ERRORS"):
        monkeypatch.delenv(name, raising=False)
    llm_plugin.close_backend()
    yield tmp_path / "llm-user"
    llm_plugin.close_backend()


def llm(*args: str, input: str | None = None, code: int = 0):
    """`llm ARGS...` in this process; it must end with `code`."""
    from llm.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
    assert result.exit_code == code, (result.output, result.exception)
    return result


def logged(n: int) -> list[dict]:
    """llm's log (its SQLite database): the newest `n` responses, oldest first."""
    return json.loads(llm("logs", "-n", str(n), "--json").stdout)


@pytest.fixture
def work(note):
    """Pool `work` on memcli-tiny holding NOTE, injected by memcli's own command line."""
    tiny_run("inject", note, "--pool", "work")
    return "work"


# --------------------------------------------------------------------------- the plugin and the pools
def test_the_plugin_is_found_through_its_entry_point():
    points = [p for p in metadata.entry_points(group="llm") if p.name == "memcli"]
    assert [p.value for p in points] == ["memcli.integrations.llm_plugin"]
    plugins = json.loads(llm("plugins").stdout)
    assert {"name": "memcli", "hooks": ["register_models"]}.items() <= next(
        p for p in plugins if p["name"] == "memcli").items()


def test_llm_models_lists_the_pools_and_leaves_out_a_damaged_one(work, memcli_home):
    tiny_run("pool", "fork", "work", "home")
    tiny_run("pool", "fork", "work", "broken")
    (memcli_home / "data" / "pools" / "broken" / "manifest.json").write_text('{"nope": 1}')
    rows = {row["name"]: row["error"] for row in json.loads(tiny_run("pool", "ls", "--json").stdout)}
    assert rows["broken"] and rows["work"] is None and rows["home"] is None  # memcli lists the damage

    lines = llm("models").stdout.splitlines()
    ours = sorted(line for line in lines if "memcli/" in line)
    assert ours == ["memcli pool: memcli/home (memcli-tiny)", "memcli pool: memcli/work (memcli-tiny)"]


def test_no_pool_no_model_and_an_unknown_pool_is_llms_own_error():
    assert "memcli/" not in llm("models").stdout
    result = llm("-m", "memcli/nope", "hello", code=1)
    assert "memcli/nope" in result.output and "Traceback" not in result.output


def test_listing_the_pools_imports_no_torch_and_starts_no_server(work, memcli_home, tmp_path):
    """llm imports every plugin at start and lists the models for `llm models`: a fresh process,
    where importing torch raises, lists the pools; with the server allowed, none is started."""
    blocker = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch imported by llm models')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from llm.cli import cli\n"
        "cli(['models'])\n")
    env = subprocess_env(LLM_USER_PATH=str(tmp_path / "llm-user"), MEMCLI_SERVER="1")
    done = subprocess.run([sys.executable, "-c", blocker], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "memcli pool: memcli/work (memcli-tiny)" in done.stdout.splitlines()
    assert done.stderr == ""
    from memcli.server import address

    assert address.read_info() is None and not address.socket_path().exists()  # no server was started


# --------------------------------------------------------------------------- answers
def test_llm_answers_held_facts_as_memcli_does_and_logs_them(work):
    for fact in NOTE:
        text = llm("-m", "memcli/work", fact.question).stdout.strip()
        assert facts.exact_hit(fact.value, text), (fact, text)
        assert text == tiny_ask(work, fact.question).strip()  # the same answer as `memcli ask`

    rows = logged(len(NOTE))
    assert [(r["model"], r["prompt"]) for r in rows] == [("memcli/work", f.question) for f in NOTE]
    for row, fact in zip(rows, NOTE):
        assert facts.exact_hit(fact.value, row["response"])
        answer = row["response_json"]
        assert answer["pool"] == "work" and answer["pool_version"] >= 1 and answer["turns_in_prompt"] == 0
        assert (row["input_tokens"], row["output_tokens"]) == (answer["prompt_tokens"], answer["new_tokens"])
        assert answer["new_tokens"] > 0
    # and memcli's own log of answers has each one, through llm
    from memcli.app import answer_log

    ours = answer_log.entries(pool="work", limit=None)
    for via in ("llm", "cli"):  # one row per answer: llm's, and `memcli ask`'s for the comparison
        assert sorted(row["question"] for row in ours if row["via"] == via) == sorted(f.question for f in NOTE)
    assert len(ours) == 2 * len(NOTE)


def test_streamed_and_unstreamed_answers_are_the_same(work):
    fact = NOTE[0]
    streamed = llm("-m", "memcli/work", fact.question).stdout
    whole = llm("-m", "memcli/work", "--no-stream", fact.question).stdout
    assert streamed == whole and facts.exact_hit(fact.value, whole)


def test_the_python_api_streams_the_answer_as_the_backend_decodes_it(work, monkeypatch):
    """Each piece the backend's `on_text` hears is one piece of llm's stream, in order."""
    import llm as llm_api

    from memcli.integrations import llm_plugin

    model = llm_api.get_model("memcli/work")
    response = model.prompt(NOTE[1].question)
    assert facts.exact_hit(NOTE[1].value, "".join(response)) and response.response_json["new_tokens"] >= 1
    fake = FakeBackend()
    fake.enqueue_answer("Solvay, said Mia", pieces=["Sol", "vay", ", said", " Mia"])
    monkeypatch.setattr(llm_plugin, "_backend", fake)
    assert list(model.prompt(NOTE[1].question)) == ["Sol", "vay", ", said", " Mia"]


# --------------------------------------------------------------------------- options
def test_options_reach_the_answer(work):
    fact = NOTE[2]
    greedy = llm("-m", "memcli/work", fact.question).stdout
    assert llm("-m", "memcli/work", "-o", "temperature", "0", fact.question).stdout == greedy
    assert llm("-m", "memcli/work", "-o", "top_p", "1", fact.question).stdout == greedy
    llm("-m", "memcli/work", "-o", "max_tokens", "1", fact.question)
    (last,) = logged(1)
    assert last["response_json"]["new_tokens"] == 1 and last["options_json"] == {"max_tokens": 1}
    assert last["response_json"]["stopped"] is False  # ended on max_tokens, not on its own
    seeded = [llm("-m", "memcli/work", "-o", "temperature", "5", "-o", "seed", "11", fact.question).stdout
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # the seed reaches the sampler


def test_options_go_to_the_backend_as_memclis_sampling(work, monkeypatch):
    """What the plugin hands the backend, seen by a FakeBackend in its place."""
    from memcli.integrations import llm_plugin
    from memcli.wire import Sampling

    fake = FakeBackend()
    fake.enqueue_answer("Turin", pieces=["Tu", "rin"])
    monkeypatch.setattr(llm_plugin, "_backend", fake)
    result = llm("-m", "memcli/work", "-o", "temperature", "0.7", "-o", "top_p", "0.9", "-o", "seed", "3",
                 "-o", "max_tokens", "5", "Where does Kai live ?")
    assert result.stdout == "Turin\n"
    (call,) = [call for method, call in fake.calls if method == "ask"]
    assert call["pool"] == "work" and call["question"] == "Where does Kai live ?"
    assert call["sampling"] == Sampling(0.7, 0.9, 3) and call["max_new_tokens"] == 5 and call["history"] == []


@pytest.mark.parametrize("option, value, message", [
    ("temperature", "500", "Error: temperature must be >= 0 and <= 100, not 500"),
    ("temperature", "-1", "Error: temperature must be >= 0 and <= 100, not -1"),
    ("temperature", "nan", "Error: temperature must be a finite number, not nan"),
    ("top_p", "0", "Error: top_p must be > 0 and <= 1, not 0"),
    ("top_p", "abc", "Error: top_p must be a number, not 'abc'"),
    ("max_tokens", "0", "Error: max_tokens must be >= 1, not 0"),
    ("max_tokens", "2.5", "Error: max_tokens must be an integer, not 2.5"),
    ("seed", "x", "Error: seed must be an integer, not 'x'"),
])
def test_a_bad_option_is_a_one_line_error(work, option, value, message):
    result = llm("-m", "memcli/work", "-o", option, value, "Where does Kai live ?", code=1)
    assert result.output.splitlines() == [message]


def test_refusals_are_one_line_errors(work, monkeypatch):
    from memcli.integrations import llm_plugin
    from memcli.store import PoolNotFound

    result = llm("-m", "memcli/work", "-s", "You are kind.", "hello", code=1)
    assert result.output.splitlines() == ["Error: memcli/work takes no system prompt: a pool answers from its memory"]
    fake = FakeBackend()
    fake.fail(PoolNotFound("pool work not found"))
    monkeypatch.setattr(llm_plugin, "_backend", fake)
    result = llm("-m", "memcli/work", "hello", code=1)
    assert result.output.splitlines() == ["Error: pool work not found"]


# --------------------------------------------------------------------------- conversations
def test_llm_chat_sends_the_earlier_turns_as_history(work, monkeypatch):
    from memcli.integrations import llm_plugin

    fake = FakeBackend()
    fake.enqueue_answer("Turin")
    fake.enqueue_answer("cricket")
    monkeypatch.setattr(llm_plugin, "_backend", fake)
    result = llm("chat", "-m", "memcli/work", input="Where does Kai live ?\nWhat does Zoe play ?\nquit\n")
    assert "Turin" in result.stdout and "cricket" in result.stdout
    asks = [call for method, call in fake.calls if method == "ask"]
    assert [a["history"] for a in asks] == [[], [("Where does Kai live ?", "Turin")]]
    assert ("hold", {"pool": "work"}) in fake.calls  # the conversation keeps the pool loaded

    # `llm -c` continues the logged conversation: llm reloads its turns, they go along too
    fake.enqueue_answer("jukebox")
    llm("-c", "What does Ivo own ?")
    assert fake.calls[-1][1]["history"] == [("Where does Kai live ?", "Turin"), ("What does Zoe play ?", "cricket")]


def test_a_conversation_carries_its_turns_into_the_prompt(ck, docs):
    """On a model whose window holds them (memcli-tiny's holds a question only), the earlier turn
    goes into the prompt: `turns_in_prompt` in llm's log."""
    tiny_run("inject", docs["txt"], "--pool", "long", "--model", ck)
    # one-token answers: whatever the random-weight model answers, a turn fits its window
    llm("chat", "-m", "memcli/long", "-o", "max_tokens", "1", input="Where did Alice go?\nWho did she meet?\nquit\n")
    first, second = logged(2)
    assert [first["response_json"]["turns_in_prompt"], second["response_json"]["turns_in_prompt"]] == [0, 1]
    assert second["input_tokens"] > first["input_tokens"]
    assert first["conversation_id"] == second["conversation_id"]


# --------------------------------------------------------------------------- through a running server
def test_llm_goes_through_the_running_server(work, served):
    """With a server running (and MEMCLI_SERVER unset), the pools are listed by it and the answers
    come from it: it holds the pool afterwards; the answer is the in-process one."""
    from memcli.integrations import llm_plugin

    fact = NOTE[3]
    assert "memcli pool: memcli/work (memcli-tiny)" in llm("models").stdout.splitlines()
    text = llm("-m", "memcli/work", fact.question).stdout.strip()
    assert type(llm_plugin.shared_backend()).__name__ == "RemoteBackend"
    assert any("work" in pools for pools in loaded_pools().values())  # the server loaded it for llm
    assert facts.exact_hit(fact.value, text) and text == tiny_ask(work, fact.question).strip()


def test_the_first_answer_starts_a_server_when_none_runs(work, monkeypatch):
    """As `memcli ask` does: with the server allowed and none running, the first answer starts one
    in the background (it stays for the next llm command); listing the models had started none."""
    import os

    from memcli.integrations import llm_plugin
    from memcli.server import address
    from memcli.server.client import Client

    from .helpers import wait_for

    monkeypatch.delenv("MEMCLI_SERVER")
    assert "memcli pool: memcli/work (memcli-tiny)" in llm("models").stdout.splitlines()
    assert address.read_info() is None
    try:
        text = llm("-m", "memcli/work", NOTE[0].question).stdout.strip()
        assert type(llm_plugin.shared_backend()).__name__ == "RemoteBackend"
        info = address.read_info()
        assert info is not None and any("work" in pools for pools in loaded_pools().values())
        assert facts.exact_hit(NOTE[0].value, text)
    finally:
        llm_plugin.close_backend()
        info = address.read_info()
        if info is not None:
            with Client() as client:
                client.stop()

            def gone():  # the server is this process's child (started by the plugin): reap it
                try:
                    return os.waitpid(info["pid"], os.WNOHANG)[0] == info["pid"]
                except ChildProcessError:
                    return True  # reaped already

            wait_for(gone, "the started server to stop")
