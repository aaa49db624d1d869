import os

# as memcli/__init__ does for every process it runs (set before any BLAS call): in-process results
# and a test server's compare bit for bit only when MKL takes the same code path in both
os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (read when torch loads)

import pytest  # noqa: E402

from .helpers import (  # noqa: E402
    ALICE, CAROL, DAVE, FakeBackend, assert_clean_log, make_pdf, run, start_server, text_page, tiny_note, write,
)
from .support import fixture_checkpoint, point_hf_cache  # noqa: E402


@pytest.fixture(autouse=True)
def memcli_home(tmp_path, monkeypatch):
    """Every test gets its own MEMCLI_HOME, its own empty Hugging Face cache, and no network."""
    home = tmp_path / "memcli-home"
    monkeypatch.setenv("MEMCLI_HOME", str(home))
    monkeypatch.setenv("MEMCLI_SERVER", "0")  # commands run in-process unless a test starts a server
    point_hf_cache(monkeypatch, tmp_path / "hf-home")
    return home


@pytest.fixture
def ck() -> str:
    """The tiny random-weight chat checkpoint of the conformance fixtures."""
    return str(fixture_checkpoint("memoryllm-8b-chat-tiny"))


@pytest.fixture
def docs(tmp_path):
    """One document of every kind: text, Markdown, HTML, PDF."""
    folder = tmp_path / "docs"
    return {
        "txt": write(folder / "a.txt", ALICE),
        "md": write(folder / "b.md", "# Notes\n\n" + CAROL + "\n"),
        "html": write(folder / "c.html", f"<html><head><title>t</title><style>p{{}}</style></head><body><p>{DAVE}</p></body></html>"),
        "pdf": write(folder / "d.pdf", make_pdf([text_page("Erin flies to Oslo on the morning plane with her old red suitcase.")])),
    }


@pytest.fixture
def pool(ck, docs) -> str:
    """A pool `p` holding the .txt document."""
    result = run("inject", docs["txt"], "--pool", "p", "--model", ck)
    assert result.exit_code == 0, result.stderr
    return "p"


@pytest.fixture
def server(tmp_path):
    """A `memcli serve` (keep-alive forever) for this test; commands still run in-process unless the
    test lets them find it (MEMCLI_SERVER unset)."""
    running = start_server(tmp_path, "--keep-alive", "-1")
    yield running
    running.stop()
    assert_clean_log(running.log)


@pytest.fixture
def paused_server(tmp_path):
    """A server whose work waits at a slice boundary while the file `pause` exists (MEMCLI_TEST_PAUSE:
    the file names which boundary; the server creates pause.reached when it waits there)."""
    from .helpers import env_for_server

    pause = tmp_path / "pause"
    running = start_server(tmp_path, "--keep-alive", "-1", env=env_for_server(MEMCLI_TEST_PAUSE=str(pause)))
    running.pause = pause
    yield running
    pause.unlink(missing_ok=True)
    running.stop()
    assert_clean_log(running.log)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A server that the commands of this test go through (it loads memcli-tiny once)."""
    running = start_server(tmp_path, "--keep-alive", "-1")
    monkeypatch.delenv("MEMCLI_SERVER")  # the autouse fixture keeps other tests in-process
    yield running
    running.stop()
    assert_clean_log(running.log)


@pytest.fixture
def note(tmp_path):
    """memcli-tiny's held-out note (four facts, one chunk) in a file."""
    from memcli.app import facts

    path = tmp_path / "facts.txt"
    path.write_text(facts.note_text(tiny_note()))
    return path


@pytest.fixture
def fake_backend(monkeypatch) -> FakeBackend:
    """Every command of this test goes through a FakeBackend (no weights, no server)."""
    from memcli.cli import backends

    fake = FakeBackend()
    monkeypatch.setattr(backends, "choose", lambda settings, flags, start: fake)
    return fake
