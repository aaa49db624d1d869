"""Hostile model folders: every class of damage is refused before anything is allocated, with one
line naming the file, a non-zero exit, bounded memory and no hang.

Each case runs the real CLI (`python -m memcli inject --model FOLDER`) in a child process under an
address-space limit; the child's peak RSS comes from the kernel (wait4), and a generous timeout only
guards against a hang (FIFO) — nothing here asserts on timing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .support import REPO, fixture_checkpoint

MAX_RSS_BYTES = 1 << 30
ADDRESS_SPACE = 8 << 30  # a runaway allocation fails fast instead of swapping the machine
HANG_GUARD_S = 120
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def _config_edit(**changes):
    def edit(folder):
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        raw.update(changes)
        path.write_text(json.dumps(raw))
    return edit


def _write(name, data: bytes):
    def edit(folder):
        (folder / name).unlink()
        (folder / name).write_bytes(data)
    return edit


def _fifo(name):
    def edit(folder):
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return edit


CASES = {
    "layers_1e9": (_config_edit(num_hidden_layers=1_000_000_000), "config.json", "num_hidden_layers"),
    "layers_vs_tensors": (_config_edit(num_hidden_layers=300), "config.json", "num_hidden_layers"),
    "zero_heads": (_config_edit(num_attention_heads=0), "config.json", "num_attention_heads"),
    "zero_vocab": (_config_edit(vocab_size=0), "config.json", "vocab_size"),
    "float_size": (_config_edit(hidden_size=64.5), "config.json", "hidden_size"),
    "string_size": (_config_edit(intermediate_size="128"), "config.json", "intermediate_size"),
    "pad_outside_vocab": (_config_edit(pad_token_id=10_000_000), "config.json", "pad_token_id"),
    "bad_lora": (_config_edit(lora_config=[1, 2]), "config.json", "lora_config"),
    "deep_json": (_write("config.json", b"[" * 200_000 + b"]" * 200_000), "config.json", "nests deeper"),
    "fifo_config": (_fifo("config.json"), "config.json", "not a regular file"),
    "bad_safetensors_header": (_write("model.safetensors", b"\xff" * 64), "model.safetensors", "safetensors"),
    "truncated_safetensors": (None, "model.safetensors", "safetensors"),
    "tokenizer_not_json": (_write("tokenizer.json", b"{not json"), "tokenizer.json", "JSON"),
    "tokenizer_malformed": (_write("tokenizer.json", b'{"model": 5}'), "tokenizer.json", "tokenizer"),
}


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def _limit_child():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_hostile_model_folder_is_refused(kind, tmp_path, memcli_home):
    edit, filename, words = CASES[kind]
    folder = tmp_path / "model"
    shutil.copytree(fixture_checkpoint("memoryllm-8b-tiny"), folder)
    (edit or _truncate_weights)(folder)
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document about the harbour of Valparaiso and its funicular railways. " * 4)
    env = dict(os.environ, MEMCLI_HOME=str(memcli_home), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MEMCLI_DEVICE="cpu",
               HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    started = time.monotonic()
    rss_file = tmp_path / "maxrss"
    command = [sys.executable, "-m", "memcli", "inject", str(doc), "--pool", "p", "--model", str(folder)]
    # the wrapper's only child is the CLI, so its RUSAGE_CHILDREN peak is the CLI's own
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(rss_file), *command],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_limit_child, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{kind}: the CLI hung")
    seconds = time.monotonic() - started
    max_rss_kib = int(rss_file.read_text())
    lines = [line for line in err.decode().splitlines() if line.strip()]
    print(f"{kind}: exit {proc.returncode}, {seconds:.1f} s, peak RSS {max_rss_kib // 1024} MiB, stderr {lines}")
    assert proc.returncode not in (0, None)
    assert len(lines) == 1, lines
    assert filename in lines[0] and words.lower() in lines[0].lower(), lines[0]
    assert "unexpected" not in lines[0].lower() and "Traceback" not in err.decode()
    assert max_rss_kib * 1024 < MAX_RSS_BYTES, f"peak RSS {max_rss_kib // 1024} MiB"


def test_binding_fingerprint_ignores_cosmetic_keys_and_keeps_old_pools():
    from memcli.pools import meta as pool_meta
    from memcli.core.config import parse_config

    raw = json.loads((fixture_checkpoint("memoryllm-8b-tiny") / "config.json").read_text())
    cfg = parse_config(raw)
    cosmetic = parse_config(dict(raw, _name_or_path="elsewhere/copy", transformers_version="9.9.9",
                                 torch_dtype="bfloat16", architectures=["Other"]))
    changed = parse_config(dict(raw, num_tokens=raw["num_tokens"] + 1))
    assert cosmetic.fingerprint() == cfg.fingerprint()
    assert changed.fingerprint() != cfg.fingerprint()
    # a pool written before (raw-config hash) is still accepted by the same model
    model = pool_meta.Binding("m", cfg.family, cfg.fingerprint(), cfg.num_tokens, legacy_hashes=(cfg.legacy_fingerprint(),))
    old_pool = pool_meta.Binding("m", cfg.family, cfg.legacy_fingerprint(), cfg.num_tokens)
    pool_meta.check_binding("p", old_pool, model)
    other = pool_meta.Binding("m", cfg.family, changed.legacy_fingerprint(), cfg.num_tokens)
    with pytest.raises(pool_meta.PoolModelMismatch):
        pool_meta.check_binding("p", other, model)
