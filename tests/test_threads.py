"""Compute threads chosen by the work (memcli/core/threads.py): the decision (model size x usable cores x
environment and config), that loading a model applies it, and that idle threads wait passively."""

import json
import os
import subprocess
import sys

import pytest

from memcli.core import threads
from memcli.loading.catalog import BUNDLED
from memcli.core.config import parse_config, read_config, read_json_file

from .support import REAL_CONFIGS, REPO, fixture_checkpoint

TINY = read_config(BUNDLED["memcli-tiny"])
NO_ENV: dict = {}


def _medium_config():
    """A width-1024 model (the benchmarks' medium shape), from memcli-tiny's config resized."""
    raw = dict(read_json_file(BUNDLED["memcli-tiny"] / "config.json"))
    raw.update(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
               max_seq_length=512, vocab_size=32000)
    return parse_config(raw)


def _real(name):
    folder = REAL_CONFIGS / name
    if not (folder / "config.json").exists():
        pytest.skip(f"{folder} not found")
    return read_config(folder)


def test_largest_product_of_a_chunk():
    # memcli-tiny reads 20-token chunks; its MLP is 64 -> 256 wide
    assert threads.largest_product_flops(TINY) == 2 * 20 * 64 * 256
    assert threads.largest_product_flops(_medium_config()) == 2 * 512 * 1024 * 3584
    real = _real("memoryllm-8b")
    assert threads.largest_product_flops(real) == 2 * 512 * 4096 * 14336


@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_small_models_compute_on_one_thread_whatever_the_cores(cpus):
    for cfg in [TINY] + [read_config(fixture_checkpoint(v)) for v in ("memoryllm-8b-tiny", "mplus-8b-tiny",
                                                                         "memoryllm-7b-tiny")]:
        choice = threads.choose(threads.largest_product_flops(cfg), cpus, NO_ENV)
        assert (choice.threads, choice.source) == (1, "auto")


@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_large_models_compute_on_every_usable_core(cpus):
    for cfg in (_medium_config(), _real("memoryllm-8b"), _real("memoryllm-7b"), _real("mplus-8b")):
        choice = threads.choose(threads.largest_product_flops(cfg), cpus, NO_ENV)
        assert (choice.threads, choice.source) == (cpus, "auto")


def test_in_between_one_thread_per_share_of_the_largest_product():
    share = threads.PER_THREAD_FLOPS
    assert threads.choose(share - 1, 8, NO_ENV).threads == 1
    assert threads.choose(3 * share, 8, NO_ENV).threads == 3
    assert threads.choose(3 * share, 2, NO_ENV).threads == 2  # never more than the usable cores
    assert threads.choose(3 * share, 0, NO_ENV).threads == 1


def _pair(choice):
    return choice.threads, choice.source


def test_environment_and_config_win_in_order():
    tiny = threads.largest_product_flops(TINY)
    big = threads.largest_product_flops(_medium_config())
    both = {"MEMCLI_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert threads.choose(tiny, 2, both, configured="2") == threads.Choice(3, "MEMCLI_THREADS", "set by MEMCLI_THREADS")
    assert threads.choose(big, 16, {"OMP_NUM_THREADS": "5"}, configured="2").threads == 5
    assert threads.choose(big, 16, {"OMP_NUM_THREADS": "4,2"}).threads == 4  # nested levels: the first
    assert _pair(threads.choose(tiny, 2, NO_ENV, configured="2")) == (2, "config")
    assert threads.choose(tiny, 2, NO_ENV, configured=6).threads == 6  # an integer from TOML
    assert _pair(threads.choose(big, 16, {"MEMCLI_THREADS": "auto"}, configured="auto")) == (16, "auto")
    # an OMP_NUM_THREADS OpenMP itself would ignore is ignored here too
    assert _pair(threads.choose(tiny, 16, {"OMP_NUM_THREADS": "many"})) == (1, "auto")
    for bad in ("0", "-1", "x", "2.5", "99999"):
        with pytest.raises(ValueError, match="MEMCLI_THREADS must be auto or a whole number"):
            threads.choose(tiny, 2, {"MEMCLI_THREADS": bad})
        with pytest.raises(ValueError, match="threads must be auto"):
            threads.choose(tiny, 2, NO_ENV, configured=bad)


def test_the_threads_setting_is_checked_where_it_is_read(monkeypatch, memcli_home):
    from memcli.app.settings import SettingsError, load_settings, set_config

    monkeypatch.setenv("MEMCLI_THREADS", "lots")
    with pytest.raises(SettingsError, match="environment: threads must be auto or a whole number"):
        load_settings()
    monkeypatch.delenv("MEMCLI_THREADS")
    set_config("threads", "3")
    settings = load_settings()
    assert settings.threads == "3" and settings.where("threads").startswith("threads in ")
    with pytest.raises(SettingsError, match="threads must be auto"):
        set_config("threads", "0")


def _run(code: str, cpus: set[int] | None = None, **env) -> dict:
    """Run `code` in a fresh interpreter (its affinity narrowed to `cpus` before anything loads);
    it prints one JSON line."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MEMCLI_THREADS")}
    clean.update(PYTHONPATH=str(REPO), **env)
    prefix = f"import os; os.sched_setaffinity(0, {sorted(cpus)!r})\n" if cpus is not None else ""
    out = subprocess.run([sys.executable, "-c", prefix + code], env=clean, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


LOAD_TINY = """
import json, memcli, torch
from memcli.core import threads
from memcli.loading.catalog import BUNDLED
from memcli.loading.checkpoints import load_model
model, _ = load_model(BUNDLED["memcli-tiny"])
print(json.dumps({"threads": torch.get_num_threads(), "usable": threads.usable_cpus(),
                  "source": threads.applied().source}))
"""

CONFIGURE_MEDIUM_THEN_TINY = """
import json, torch
from tests.test_threads import _medium_config
from memcli.core import threads
from memcli.loading.catalog import BUNDLED
from memcli.loading.checkpoints import load_model
threads.configure(_medium_config())
medium = torch.get_num_threads()
load_model(BUNDLED["memcli-tiny"])
print(json.dumps({"medium": medium, "after_tiny": torch.get_num_threads(), "usable": threads.usable_cpus()}))
"""


def _two_cpus() -> set[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs in this process's affinity")
    return set(allowed[:2])


def test_loading_memcli_tiny_applies_one_thread_on_two_cpus():
    got = _run(LOAD_TINY, cpus=_two_cpus())
    assert got["usable"] in (1, 2)  # two cores, or one with two hyper-threads
    assert (got["threads"], got["source"]) == (1, "auto")


def test_an_environment_value_wins_when_loading():
    assert _run(LOAD_TINY, cpus=_two_cpus(), MEMCLI_THREADS="2")["threads"] == 2
    got = _run(LOAD_TINY, cpus=_two_cpus(), OMP_NUM_THREADS="2")
    assert (got["threads"], got["source"]) == (2, "OMP_NUM_THREADS")


def test_the_config_key_reaches_the_loaded_model(memcli_home):
    """`threads = 2` in the config file (MEMCLI_HOME is this test's) makes memcli-tiny, which would
    get one thread, load on two through the API, as the CLI and the server load models."""
    from memcli.base.paths import config_file

    code = """
import json, torch
from memcli.app.api import Memcli
from memcli.app.settings import load_settings
Memcli(load_settings(model="memcli-tiny", device="cpu")).model()
print(json.dumps({"threads": torch.get_num_threads()}))
"""
    config_file().parent.mkdir(parents=True, exist_ok=True)
    config_file().write_text("threads = 2\n")  # an integer, as someone editing the file writes it
    assert _run(code, cpus=_two_cpus())["threads"] == 2
    config_file().write_text('threads = "auto"\n')
    assert _run(code, cpus=_two_cpus())["threads"] == 1


def test_large_model_uses_the_affinity_and_a_small_one_loaded_after_it_does_not_lower_it():
    two = _run(CONFIGURE_MEDIUM_THEN_TINY, cpus=_two_cpus())
    # two CPUs are two cores unless they are hyper-thread siblings (then one)
    assert two["usable"] in (1, 2) and two == {"medium": two["usable"], "after_tiny": two["usable"],
                                               "usable": two["usable"]}
    one = {sorted(os.sched_getaffinity(0))[0]}
    assert _run(CONFIGURE_MEDIUM_THEN_TINY, cpus=one) == {"medium": 1, "after_tiny": 1, "usable": 1}


def test_importing_memcli_makes_idle_openmp_threads_wait_passively():
    """libgomp reads its wait policy once, when torch loads it: importing memcli first sets
    OMP_WAIT_POLICY=PASSIVE, which libgomp shows as a spin count of 0 (300000 by default); a
    value the user set is kept."""
    code = "import memcli, torch, os, json; torch.ones(1); print(json.dumps(os.environ['OMP_WAIT_POLICY']))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(REPO), OMP_DISPLAY_ENV="VERBOSE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "GOMP_SPINCOUNT" not in out.stderr:
        pytest.skip("this torch's OpenMP runtime is not libgomp")
    assert json.loads(out.stdout.strip()) == "PASSIVE"
    assert "GOMP_SPINCOUNT = '0'" in out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip()) == "ACTIVE"


WORKER_THREAD = """
import json, queue, threading, torch
from memcli.loading.catalog import BUNDLED
from memcli.core.engine import Engine
from memcli.loading.checkpoints import initial_state, load_model

jobs, results = queue.Queue(), queue.Queue()

def worker():  # a request thread of a server: it computed before the model loaded
    while (job := jobs.get()) is not None:
        results.put(job())

thread = threading.Thread(target=worker)
thread.start()
# its own count, as torch's default gives it on two cores (set here so on any machine)
jobs.put(lambda: (torch.set_num_threads(2), torch.ones(4) @ torch.ones(4), torch.get_num_threads())[2])
before = results.get()
model, reader = load_model(BUNDLED["memcli-tiny"])  # in the main thread: one thread for memcli-tiny
state = initial_state(reader, model.cfg, seed=0)
engine = Engine(model)
jobs.put(lambda: (engine.logits(state, torch.tensor([[5, 6, 7]])), torch.get_num_threads())[1])
after = results.get()
jobs.put(None)
thread.join()
print(json.dumps({"worker_before": before, "main": torch.get_num_threads(), "worker_after": after}))
"""


def test_a_thread_that_computed_before_the_model_loaded_computes_with_the_choice():
    """OpenMP and MKL keep the thread count per thread: the engine applies the choice in the
    thread that calls it (a server answers in request threads that may predate the load)."""
    got = _run(WORKER_THREAD)
    assert got == {"worker_before": 2, "main": 1, "worker_after": 1}

