"""The Python API end to end on a tiny model (the CLI tests cover the same through the command line)."""

import pytest

from memcli.app.api import Memcli, MemcliError
from memcli.app.settings import Settings

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


def test_a_pool_created_by_an_inject_that_wrote_nothing_is_not_left_behind(app, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    report = app.inject("fresh", [str(tmp_path / "empty.txt")])
    assert [f.status for f in report.files] == ["skipped"]
    assert not app.store.exists("fresh")


def test_resume_after_another_file_does_not_inject_twice(app, tmp_path, monkeypatch):
    """A file interrupted, then another file injected, then the first resumed: the resumed part
    goes in once, and a later run sees the file as complete."""
    from memcli.ingest import pipeline
    from memcli.wire import InjectInterrupted

    monkeypatch.setattr(pipeline, "COMMIT_EVERY", 2)
    big = tmp_path / "big.txt"
    big.write_text(" ".join(f"sentence {i} says the value is {i * 7}." for i in range(300)))
    other = tmp_path / "other.txt"
    other.write_text("Mary walked to the library with two friends and talked about chess.")
    real_inject = app.model().engine.inject
    calls = {"n": 0}

    def interrupting(state, ids):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_inject(state, ids)

    monkeypatch.setattr(app.model().engine, "inject", interrupting)
    with pytest.raises(InjectInterrupted):
        app.inject("p", [str(big)])
    monkeypatch.setattr(app.model().engine, "inject", real_inject)
    app.inject("p", [str(other)])
    resumed = app.inject("p", [str(big)])
    assert [f.status for f in resumed.files] == ["resumed"]
    again = app.inject("p", [str(big)])
    assert [f.status for f in again.files] == ["already"]
    total = sum(s["chunks"] for s in app.pool_info("p")["files"] if s["path"] == str(big))
    fresh = Memcli(app.settings)
    assert total == fresh.inject("q", [str(big)]).chunks


def test_compile_setting_reaches_the_engine(monkeypatch, memcli_home):
    """`compile` (config, MEMCLI_COMPILE, default off) is what the engine's decode step is built with."""
    from memcli.core import engine as engines
    from memcli.app.settings import SettingsError, load_settings, set_config

    assert load_settings().compile is False
    set_config("compile", "true")
    assert load_settings().compile is True
    monkeypatch.setenv("MEMCLI_COMPILE", "0")
    assert load_settings().compile is False
    monkeypatch.setenv("MEMCLI_COMPILE", "sometimes")
    with pytest.raises(SettingsError, match="compile must be true or false"):
        load_settings()
    monkeypatch.delenv("MEMCLI_COMPILE")

    seen = []
    real_init = engines.Engine.__init__
    monkeypatch.setattr(engines.Engine, "__init__",
                        lambda self, *a, **kw: seen.append(kw) or real_init(self, *a, **{**kw, "compile_decode": False}))
    Memcli(load_settings(device="cpu")).model(str(fixture_checkpoint("memoryllm-8b-tiny")))
    assert seen and seen[-1]["compile_decode"] is True and seen[-1]["cached_states"] == 1
