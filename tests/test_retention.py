"""`memcli eval retention`: the table, the JSON and the plot, on the shipped tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memcli.cli import main as cli
from memcli.app import retention
from memcli.loading.checkpoints import BUNDLED

runner = CliRunner()
TINY = BUNDLED["memcli-tiny"]
needs_tiny = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="memcli-tiny not shipped")


def invoke(*args: str):
    return runner.invoke(cli.app, ["--model", "memcli-tiny", "--device", "cpu", *map(str, args)])


@pytest.mark.parametrize("text", ["1,x", "", "-1", "3;4"])
def test_bad_distractor_lists_are_refused(text):
    with pytest.raises(ValueError, match="--distractors"):
        retention.parse_distractors(text)


def test_expected_share_is_the_survival_of_one_row():
    assert retention.expected(0, 20, 160) == 1.0
    assert retention.expected(2, 20, 160) == pytest.approx((140 / 160) ** 2)


@needs_tiny
def test_table_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "curve.json", tmp_path / "curve.png"
    result = invoke("eval", "retention", "--episodes", "4", "--distractors", "0,2,16",
                    "--json", out_json, "--plot", out_png)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["distractors", "accuracy", "rows", "kept", "(1-K/N)^t"]
    assert [line.split()[0] for line in lines[1:4]] == ["0", "2", "16"]
    assert lines[4].startswith("controls: no injection")
    data = json.loads(out_json.read_text())
    assert data["model"] == "memcli-tiny" and data["questions_per_point"] == 16
    points = {p["distractors"]: p for p in data["points"]}
    # right after injection every row of the facts is there; later the share follows the drops
    assert points[0]["rows_kept"] == 1.0 and points[0]["expected_rows_kept"] == 1.0
    assert points[16]["rows_kept"] < points[2]["rows_kept"] < 1.0
    # the tiny model remembers what was just injected, and forgets with distractors
    assert points[0]["accuracy"] >= 0.75
    assert points[16]["accuracy"] < points[0]["accuracy"]
    # every control is far below what the memory gives
    assert max(data["controls"].values()) <= 0.25
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_tiny
def test_bad_input_is_one_line(tmp_path):
    result = invoke("eval", "retention", "--distractors", "2,x")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["memcli: error: --distractors must be comma-separated integers, not '2,x'"]
    result = invoke("eval", "retention", "--json", tmp_path / "missing" / "c.json")
    assert result.exit_code == 1 and "does not exist" in result.stderr
