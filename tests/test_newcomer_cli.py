"""Issue 19 (a newcomer's first hour, round 3), the command line and docs side: items 1, 8, 9, 10, 11,
12 and 13, each through the real CLI (the Typer app in-process, or `python -m memcli` where only a
real process shows it: a terminal, the imports of a fresh process)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import typer

import memcli
from memcli.cli import main as cli
from memcli.app import settings
from memcli.store import PoolStore

from .helpers import ALICE, ISO_Z, assert_one_error, err_lines, info, run, run_light, subprocess_env, write
from .support import REPO, fixture_checkpoint

TINY = ["--model", "memcli-tiny"]
needs_tmux = pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed")


@pytest.fixture
def tiny_pool(tmp_path) -> str:
    """A memcli-tiny pool `people` holding the offline demo's note."""
    result = run(*TINY, "inject", REPO / "examples" / "notes-tiny" / "people.txt", "--pool", "people")
    assert result.exit_code == 0, result.stderr
    return "people"


def screen_of(tmux: list[str], env: dict) -> str:
    return subprocess.run(tmux + ["capture-pane", "-p", "-t", "t", "-S", "-200"], env=env, capture_output=True,
                          text=True, timeout=30).stdout


def memcli_processes(home: Path) -> list[int]:
    """Processes running memcli with this MEMCLI_HOME (a server a command started inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"memcli" in b" ".join(command) and f"MEMCLI_HOME={home}".encode() in environ:
            found.append(int(entry.name))
    return found


# =========================================================================== item 1: the first screen, the demo
def test_item1_readme_says_how_to_activate_the_environment():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "bash examples/demo.sh" in first_block and ". .venv/bin/activate" in first_block
    first_screen = readme[: readme.index("## Usage")]
    assert "command not found" in first_screen and "min" in first_screen  # why, and how long the tests take


@needs_tmux
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc to find processes")
def test_item1_demo_on_a_terminal(tmp_path):
    """`bash examples/demo.sh --offline` on a terminal (tmux): it answers, says how to carry on from
    its pool and how to remove it; when it has ended no memcli process of its home runs, no
    temporary folder is left, and the pool is there to carry on from."""
    home, scratch = tmp_path / "h", tmp_path / "tmp"
    scratch.mkdir()
    env = subprocess_env(MEMCLI_HOME=str(home), TMPDIR=str(scratch), NO_COLOR="1",
                         PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MEMCLI_SERVER", None)  # as a newcomer's shell: the demo's commands start a server
    env.pop("TMUX", None)
    socket = tmp_path / "tmux.sock"
    tmux = ["tmux", "-S", str(socket), "-f", "/dev/null"]
    inner = f"cd {REPO} && bash examples/demo.sh --offline --no-install; echo DEMO-EXIT=$?; sleep 600"
    subprocess.run(tmux + ["new-session", "-d", "-x", "200", "-y", "80", "-s", "t", "sh", "-c", inner],
                   env=env, check=True, timeout=30)
    try:
        deadline = time.monotonic() + 600
        screen = ""
        while "DEMO-EXIT=" not in screen:  # the demo's end is the event waited for
            assert time.monotonic() < deadline, screen
            time.sleep(0.2)
            screen = screen_of(tmux, env)
    finally:
        subprocess.run(tmux + ["kill-server"], env=env, timeout=30)
    assert "DEMO-EXIT=0" in screen, screen
    assert re.search(r"\d of 8 answered right from memory", screen), screen
    assert "The pool demo-tiny stays" in screen and "ask 'Where does Mia work?' --pool demo-tiny" in screen
    assert "pool rm demo-tiny --yes" in screen
    # nothing left running: the server the demo started has exited (the demo waits for it)
    assert memcli_processes(home) == []
    os.environ["MEMCLI_HOME"] = str(home)  # the autouse fixture restores it
    from memcli.server import address as server_address

    assert not server_address.socket_path().exists()
    # no temporary folder (torch keeps its own compile cache in TMPDIR: not the demo's)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    # ... and the pool is where memcli keeps pools: a newcomer carries on from it
    assert [row["name"] for row in json.loads(run("pool", "ls", "--json").stdout)] == ["demo-tiny"]


# =========================================================================== item 8: config
def test_item8_config_help_and_completion_list_every_key(tmp_path):
    for command in (["config", "set", "--help"], ["config", "get", "--help"], ["config", "unset", "--help"]):
        text = run(*command, env={"COLUMNS": "200"}).stdout
        for key in settings.KEYS:
            assert re.search(rf"\b{key}\b", text), (command, key)
    env = subprocess_env(_MEMCLI_COMPLETE="complete_bash", COMP_WORDS="memcli config set ", COMP_CWORD="3")
    done = subprocess.run([sys.executable, "-m", "memcli"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.split() == list(settings.KEYS)


def test_item8_default_pool_that_does_not_exist_yet_is_set_with_a_warning(tiny_pool):
    result = run("config", "set", "pool", "peple")
    assert result.exit_code == 0
    lines = err_lines(result)
    assert lines[0].startswith("pool set in ")
    assert lines[1:] == ["memcli: warning: pool peple does not exist yet (did you mean people?); "
                         "the first inject into it creates it (memcli inject FILE)"]
    assert run("config", "get", "pool").stdout == "peple\n"
    quiet = run("config", "set", "pool", tiny_pool)
    assert quiet.exit_code == 0 and len(err_lines(quiet)) == 1
    refused = run("config", "set", "pool", "a/b")
    assert_one_error(refused, "invalid pool name")
    assert run("config", "get", "pool").stdout == f"{tiny_pool}\n"  # nothing written


def test_item8_config_get_prints_values_as_the_config_file_writes_them():
    assert run("config", "set", "server", "0").exit_code == 0
    assert run("config", "set", "keep_alive", "90s").exit_code == 0
    assert run("config", "get", "server", env={"MEMCLI_SERVER": None}).stdout == "false\n"
    assert run("config", "get", "compile").stdout == "false\n"
    assert run("config", "get", "keep_alive").stdout == "90s\n"
    table = run("config", "get", env={"MEMCLI_SERVER": None}).stdout
    assert re.search(r"^server\s+false\s+config file", table, re.M), table
    assert re.search(r"^compile\s+false\s+default", table, re.M) and "False" not in table and "True" not in table
    rows = {r["key"]: r for r in json.loads(run("config", "get", "--json", env={"MEMCLI_SERVER": None}).stdout)}
    assert rows["server"]["value"] is False and rows["keep_alive"]["value"] == "90s"  # JSON keeps JSON's types
    assert (Path(os.environ["MEMCLI_HOME"]) / "config" / "config.toml").read_text() == 'server = false\nkeep_alive = "90s"\n'


def test_item8_config_set_refuses_a_value_that_can_never_work_and_writes_nothing():
    """The class of item 8 (a value taken silently that fails later): a keep_alive that is no
    duration, a model that is neither bundled, a folder, an alias nor an OWNER/NAME hub id. Each is
    one line naming what is wrong (with the known name a typo was near), and the file is kept."""
    config = Path(os.environ["MEMCLI_HOME"]) / "config" / "config.toml"
    assert run("config", "set", "keep_alive", "90s").exit_code == 0
    before = config.read_bytes()
    assert_one_error(run("config", "set", "keep_alive", "soon"), "keep_alive must be a duration like 5m", "'soon'")
    assert_one_error(run("config", "set", "model", "memcli-tiyn"), "model 'memcli-tiyn' is neither a folder nor a hub id",
                     "did you mean memcli-tiny?")
    assert_one_error(run("config", "set", "model", "/no/such/folder"), "neither a folder nor a hub id")
    assert config.read_bytes() == before
    assert run("config", "set", "model", "someone/some-model").exit_code == 0  # a hub id: fetched when first used
    assert tomllib.loads(config.read_text())["model"] == "someone/some-model"


def test_item8_a_bad_value_in_the_config_file_is_named_and_config_repairs_it():
    """A config file edited by hand (or by an older memcli) with bad values: every command names the
    file and the key; `config unset` and `config set` repair one key while another is still bad."""
    config = Path(os.environ["MEMCLI_HOME"]) / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('device = "gpu9"\nkeep_alive = "soon"\npool = "notes"\n')
    assert_one_error(run("config", "get", "pool", device=None), str(config), "keep_alive must be a duration")
    assert run("config", "set", "keep_alive", "10m", device=None).exit_code == 0
    assert_one_error(run("config", "get", "pool", device=None), str(config), "device must be auto, cpu, cuda")
    unset = run("config", "unset", "device", device=None)
    assert unset.exit_code == 0, unset.stderr
    assert tomllib.loads(config.read_text()) == {"keep_alive": "10m", "pool": "notes"}
    assert run("config", "get", "pool", device=None).stdout == "notes\n"


# =========================================================================== item 9: help
def command_tree():
    """(path, click command) for every command and group of memcli, the root first."""
    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, path + (name,))

    yield from walk(typer.main.get_command(cli.app), ())


FORBIDDEN_IN_HELP = ("<str>", "<int", "<float", "<path>", "<bool>", "<list", "{", "[[", "...]...")


def test_item9_every_help_names_its_values_and_reads_as_sentences():
    """The class of item 9: every command's --help (the whole tree) shows names (POOL, N, FILE), no
    Python types, no {PATH...}... or [[POOL]]; every option names its value or is a flag; a group's
    command list gives each command one line (no sentence broken mid-way)."""
    tree = list(command_tree())
    assert len(tree) > 25  # the walk reaches the whole tree (pool, config, eval ... subcommands)
    for path, command in tree:
        result = run(*path, "--help", env={"COLUMNS": "250"})
        assert result.exit_code == 0, (path, result.stderr)
        text = result.stdout
        for token in FORBIDDEN_IN_HELP:
            assert token not in text, (path, token, text)
        [usage] = [line for line in text.splitlines() if "Usage:" in line]
        assert re.fullmatch(r"\s*Usage: memcli[ a-z-]*( \[OPTIONS\])?( (COMMAND \[ARGS\]\.\.\.|\[?[A-Z]+(\.\.\.)?\]?))*\s*",
                            usage), (path, usage)
        for param in command.params:
            if param.param_type_name == "option":
                assert param.is_flag or param.metavar is not None, (path, param.name)
            # Rich reads "[plot]" in a help text as markup and drops it from the screen
            assert not re.search(r"\[[a-z/=]+\]", getattr(param, "help", None) or ""), (path, param.name)
        assert not re.search(r"\[[a-z/=]+\]", (command.help or "") + (command.epilog or "")), path
        if hasattr(command, "commands"):  # a group: its command list has one line per command
            lines = text.splitlines()
            start = next(i for i, line in enumerate(lines) if "─ Commands ─" in line)
            end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
            listed = [line.split()[1] for line in lines[start + 1:end]]
            assert listed == [name for name, sub in command.commands.items() if not sub.hidden], (path, text)
    # the two named in the issue
    assert "Usage: memcli inject [OPTIONS] PATH..." in run("inject", "--help", env={"COLUMNS": "200"}).stdout
    assert "Usage: memcli pool info [OPTIONS] [POOL]" in run("pool", "info", "--help", env={"COLUMNS": "200"}).stdout


def test_item9_values_are_converted_as_before_without_pydantic(ck, tiny_pool, tmp_path):
    """memcli converts its parameters itself (typer 0.29 builds a pydantic adapter per parameter):
    numbers, ranges, paths and lists behave as they did, bad values are usage errors naming them."""
    def usage_error(*args: str) -> str:
        result = run(*args, env={"COLUMNS": "300"})  # wide: the message on one line of its box
        assert result.exit_code == 2, (args, result.stderr)
        return result.stderr

    assert "Invalid value for '--max-new-tokens': 'abc' is not a whole number" in \
        usage_error("ask", "q", "--pool", tiny_pool, "--max-new-tokens", "abc")
    assert "0 is out of range: it must be at least 1" in usage_error("ask", "q", "--pool", tiny_pool, "--max-new-tokens", "0")
    assert "it must be from 0.0 to 1.0" in usage_error("ask", "q", "--pool", tiny_pool, "--top-p", "2")
    assert "'nan' is not a number" in usage_error("ask", "q", "--pool", tiny_pool, "--temperature", "nan")
    assert "it must be from 1 to 65535" in usage_error("serve", "--port", "0")
    answer = run("ask", "Where does Kai live?", "--pool", tiny_pool, "--max-new-tokens", "3", "--temperature", "0.5",
                 "--top-p", "0.9", "--seed", "7", "--json")
    assert answer.exit_code == 0, answer.stderr
    assert json.loads(answer.stdout.splitlines()[-1])["new_tokens"] <= 3
    exported = run("pool", "export", tiny_pool, tmp_path / "p.tar", "--json")  # a Path argument
    assert exported.exit_code == 0 and json.loads(exported.stdout)["file"] == str(tmp_path / "p.tar")
    two = write(tmp_path / "b.txt", ALICE)
    many = run("inject", two, write(tmp_path / "c.txt", ALICE + " Again."), "--pool", "two", "--model", ck, "--json")
    assert many.exit_code == 0 and len(json.loads(many.stdout)["files"]) == 2  # a list argument


# =========================================================================== item 10: eval retention
def test_item10_eval_retention_json_is_a_flag_out_writes_a_file_and_the_old_form_still_works(tmp_path):
    args = [*TINY, "--device", "cpu", "eval", "retention", "--episodes", "2", "--distractors", "0,2"]
    printed = run(*args, "--json", device=None)
    assert printed.exit_code == 0, printed.stderr
    curve = json.loads(printed.stdout)  # stdout holds the JSON and nothing else
    assert curve["memory_rows"] == 160 and curve["memory_layers"] == 2 and curve["rows_unit"] == "per layer"
    # off a terminal: one progress line per episode on stderr
    assert [line.split(" (")[0] for line in err_lines(printed)] == ["episode 1 of 2 done", "episode 2 of 2 done"]
    assert "ETA" in err_lines(printed)[0]
    table = run(*args, "--out", tmp_path / "c.json", device=None)
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split()[0] == "distractors"
    assert json.loads((tmp_path / "c.json").read_text())["points"] == curve["points"]  # the same seeded run
    # memcli < 0.2.0 took --json FILE: still written, with a note
    old = run(*args, "--json", tmp_path / "old.json", device=None)
    assert old.exit_code == 0 and old.stdout.splitlines()[0].split()[0] == "distractors"
    assert "eval retention --json FILE is now --out FILE" in old.stderr
    assert json.loads((tmp_path / "old.json").read_text())["points"] == curve["points"]
    [flag] = [p for p in dict(command_tree())[("eval", "retention")].params if p.name == "as_json"]
    assert flag.is_flag


def test_item10_eval_retention_progress_on_a_terminal_has_an_eta():
    """With a terminal (Rich forced to think stderr is one), the display says the episode and an ETA."""
    result = run(*TINY, "--device", "cpu", "eval", "retention", "--episodes", "2", "--distractors", "0,1",
                 device=None, env={"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1", "NO_COLOR": None})
    assert result.exit_code == 0, result.stderr
    assert "episode 2 of 2" in result.stderr and "ETA" in result.stderr and "steps" in result.stderr
    assert "episode 1 of 2 done" not in result.stderr  # the per-episode lines are for logs, not terminals


def test_item10_plot_hint_works_from_a_clone(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = run(*TINY, "eval", "retention", "--plot", tmp_path / "c.png")
    assert_one_error(result, "--plot needs matplotlib", f"-m pip install -e '{REPO}[plot]'")


def test_item10_memory_size_is_said_alike_by_eval_and_pool_info(tiny_pool):
    """The plot's N and pool info's row counts: both say rows per layer and rows in all layers."""
    words = "160 rows per layer x 2 layers = 320 rows"
    evaluated = run(*TINY, "eval", "retention", "--episodes", "1", "--distractors", "0")
    assert evaluated.exit_code == 0 and words in evaluated.stdout
    shown = run("pool", "info", tiny_pool)
    assert words in shown.stdout
    facts = info(tiny_pool)
    assert facts["memory"] == {"layers": 2, "rows_per_layer": 160}
    assert facts["retention"][0]["rows_written"] == facts["chunks"] * 20 * 2  # K per layer, over all layers


def test_item10_the_plot_keeps_every_control_visible():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from memcli.app.retention import Curve, figure

    curve = Curve("m", 1, 20, 160, 0, layers=2, chance=0.0,
                  points=[{"distractors": t, "accuracy": 1.0, "rows_kept": 1.0, "expected_rows_kept": 1.0} for t in (0, 2)],
                  controls={"no_injection": 0.0, "zeroed_memory": 0.0, "other_pool": 0.0})
    fig = figure(curve)
    try:
        curves, controls = fig.axes
        bars = controls.patches
        assert len(bars) == 4 and len({bar.get_x() for bar in bars}) == 4  # equal values, four places
        assert [t.get_text() for t in controls.get_xticklabels()] == ["no injection", "zeroed memory", "other pool", "chance"]
        assert [t.get_text() for t in controls.texts] == ["0.0%"] * 4  # each value written on its bar
        assert any("N = 160 rows (per layer)" in t.get_text() for t in curves.get_legend().get_texts())
        assert "160 rows per layer x 2 layers = 320 rows" in curves.get_title()
    finally:
        plt.close(fig)


# =========================================================================== item 11: JSON
def test_item11_ask_json_answer_says_the_question_and_the_pool_version(tiny_pool):
    result = run("ask", "Where does Kai live?", "--pool", tiny_pool, "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events[:-1]] == ["text"] * (len(events) - 1) and events[-1]["event"] == "answer"
    answer = events[-1]
    assert answer["question"] == "Where does Kai live?" and answer["pool"] == tiny_pool
    assert answer["pool_version"] == PoolStore().info(tiny_pool).version
    assert list(answer)[:4] == ["event", "pool", "question", "answer"] and list(answer)[-1] == "pool_version"
    assert "".join(e["text"] for e in events[:-1]) == answer["answer"]
    piped = run("ask", "-", "--pool", tiny_pool, "--max-new-tokens", "3", "--json", input="Where does Kai live?\n")
    assert json.loads(piped.stdout.splitlines()[-1])["question"] == "Where does Kai live?"


def test_item11_through_a_server_ps_times_are_iso_and_ask_json_is_the_same(ck, tmp_path, monkeypatch):
    from .helpers import local, make_pool, served_answer, start_server

    app = local(ck)
    make_pool(app, tmp_path, "served", [ALICE])
    running = start_server(tmp_path, "--keep-alive", "-1")
    try:
        monkeypatch.delenv("MEMCLI_SERVER")
        through = run("ask", "Where did Alice go?", "--pool", "served", "--max-new-tokens", "3", "--json")
        assert through.exit_code == 0, through.stderr
        answer = json.loads(through.stdout.splitlines()[-1])
        assert answer["question"] == "Where did Alice go?" and answer["pool_version"] == PoolStore().info("served").version
        _, served = served_answer(running.client, "served", "Where did Alice go?", max_new_tokens=3)
        assert served["question"] == "Where did Alice go?" and served["pool_version"] == answer["pool_version"]
        alone = run("--no-server", "ask", "Where did Alice go?", "--pool", "served", "--max-new-tokens", "3", "--json")
        mine = json.loads(alone.stdout.splitlines()[-1])
        timing = ("seconds", "seconds_to_first_token", "decode_tokens_per_second")
        assert {k: v for k, v in mine.items() if k not in timing} == {k: v for k, v in answer.items() if k not in timing}
        ps = json.loads(run("ps", "--json").stdout)
        assert ps["running"] and re.match(ISO_Z, ps["started"]), ps
        [model] = ps["models"]
        assert re.match(ISO_Z, model["loaded_at"]) and model["expires_at"] is None  # kept forever: no time
        assert all(re.match(ISO_Z, p["last_used"]) for p in model["pools"]) and model["pools"]
    finally:
        running.stop()


# =========================================================================== item 12: light commands
REPORT = ('print("LOADED:" + ",".join(sorted(m for m in ("torch", "pydantic", "memcli.app.api") if m in sys.modules)), '
          'file=sys.stderr)')


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["pool", "ls"], ["pool", "info", "people"], ["config", "get"],
                                  ["models"], ["pool", "info", "--help"]], ids=" ".join)
def test_item12_light_commands_build_no_pydantic_adapter(tiny_pool, tmp_path, args):
    """typer 0.29 converts parameters through pydantic: memcli's own converters stand in for it, so a
    light command imports neither torch nor pydantic; pool info and models read what they show without
    the library facade (memcli.app.api)."""
    done = run_light(*args, cwd=tmp_path, env=subprocess_env(NO_COLOR="1", MEMCLI_DEBUG="1"),
                     blocked=("torch", "pydantic"), report=REPORT)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stderr.strip().splitlines()[-1]
    assert loaded == "LOADED:", done.stderr[-3000:]


def test_item12_the_light_command_benchmark_is_committed_and_meets_its_target():
    results = sorted((REPO / "benchmarks" / "results").glob("cpu-cli-light-*.json"))
    newest = max((json.loads(p.read_text()) for p in results), key=lambda r: r.get("memcli", ""))
    assert newest["memcli"] == memcli.__version__ and newest["repeat"] >= 7 and newest["bytecode_cache"] is True
    assert set(newest["new"]) == {"--version", "pool ls", "pool info", "models", "config get"}
    assert newest["meets_target"] and all(row["ratio_to_version"] <= 2.0 for row in newest["new"].values())
    assert newest["machine"]["name"]


# =========================================================================== item 13: one version
def test_item13_version_changelog_and_readme_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]  # one place: memcli.__version__
    assert run("--version").stdout == f"memcli {memcli.__version__}\n"
    headings = re.findall(r"^## (.+)$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert headings[0].startswith(f"{memcli.__version__} ")
    assert all(re.match(r"\d+\.\d+\.\d+ ", h) for h in headings)  # every release is named by its version
    readme = (REPO / "README.md").read_text()
    assert not re.search(r"memcli \d+\.\d+(?!\.\d)", readme)  # versions in full, as --version says them


def test_item13_pools_say_which_memcli_wrote_them(ck, tmp_path):
    assert run("inject", write(tmp_path / "a.txt", ALICE), "--pool", "p", "--model", ck).exit_code == 0
    facts = info("p")
    assert facts["created_by"] == facts["written_by"] == memcli.__version__
    assert re.search(rf"^written by\s+memcli {re.escape(memcli.__version__)}\s*$", run("pool", "info", "p").stdout, re.M)
    # a pool of memcli 0.1.0 (format 1: no versions recorded) reads fine, and says so
    store = PoolStore()
    shutil.copytree(Path(__file__).parent / "fixtures" / "pool-v1" / "old", store.root / "old")
    old = info("old")
    assert old["created_by"] is None and old["written_by"] is None
    assert re.search(r"^written by\s+a memcli before 0\.2\.0\s*$", run("pool", "info", "old").stdout, re.M)
    # its first write records this memcli as the last writer
    tiny8b = str(fixture_checkpoint("memoryllm-8b-tiny"))
    added = run("inject", write(tmp_path / "b.txt", ALICE + " Then she went home."), "--pool", "old", "--model", tiny8b)
    assert added.exit_code == 0, added.stderr
    assert info("old")["written_by"] == memcli.__version__ and info("old")["created_by"] is None
    assert f"memcli {memcli.__version__} (created by memcli before 0.2.0)" in run("pool", "info", "old").stdout
