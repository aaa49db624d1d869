"""benchmarks/gpu.sh --device cpu: the device run's every step but the GPU (2 layers, width 1024),
so that the prepared command does not first break on the GPU machine."""

import json
import os
import subprocess

import pytest

from .support import REPO


def test_gpu_script_dry_run(tmp_path, memcli_home):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "dry.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MEMCLI_HOME=str(memcli_home))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    names = [v["variant"] for v in result["variants"]]
    assert names == ["8b-chat-nf4", "8b-chat-bf16", "mplus-8b-nf4"]
    for variant in result["variants"]:
        assert "error" not in variant, variant
        assert variant["layers"] == 2
        for key in ("load_seconds", "inject_tokens_per_second", "update_ms", "ask_ttft_cold_ms",
                    "ask_ttft_warm_ms", "decode_ms_per_token"):
            assert variant[key] > 0, key
    assert result["variants"][2]["ltm_rows_per_layer"] > 0
