"""The Python API end to end on a tiny model (the CLI tests cover the same through the command line)."""

import pytest

from memcli.api import Memcli, MemcliError
from memcli.settings import Settings

from .support import fixture_checkpoint


@pytest.fixture
def app():
    return Memcli(Settings(model=str(fixture_checkpoint("memoryllm-8b-chat-tiny")), device="cpu"))


def test_retention_stays_exact_after_patches_are_compacted(app, tmp_path):
    # 14+ chunks over a 32-row memory with 8 rows per chunk: the pool compacts its patches
    words = " ".join(f"word{i} is number {i}." for i in range(400))
    (tmp_path / "long.txt").write_text(words)
    (tmp_path / "short.md").write_text("Mary walked to the library with two friends and talked about chess.")
    report = app.inject("p", [str(tmp_path / "long.txt"), str(tmp_path / "short.md")])
    assert report.chunks > 8
    info = app.pool_info("p")
    by_source = {r["source"]: r for r in info["retention"]}
    layers, k = 3, 8
    for row in by_source.values():
        assert row["rows_written"] == row["chunks"] * k * layers
        assert 0 <= row["share_retained"] <= 1
    # the newest source was written last: nothing of it has been dropped yet
    assert by_source[str(tmp_path / "short.md")]["share_retained"] == 1.0
    assert sum(r["rows_in_stm"] for r in by_source.values()) <= 32 * layers


def test_answer_length_adapts_to_the_window(app, tmp_path):
    (tmp_path / "a.txt").write_text("The train to the harbor leaves at four o'clock, said John, every day.")
    app.inject("p", [str(tmp_path / "a.txt")])
    limit = app.model().max_input_tokens()
    answer = app.ask("p", "When does the train leave?")
    assert answer.prompt_tokens + len(answer.tokens) <= limit
    with pytest.raises(MemcliError, match="reads at most"):
        app.ask("p", "When does the train leave?", max_new_tokens=limit)
