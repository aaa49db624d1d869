import pytest

from .support import point_hf_cache


@pytest.fixture(autouse=True)
def memcli_home(tmp_path, monkeypatch):
    """Every test gets its own MEMCLI_HOME, its own empty Hugging Face cache, and no network."""
    home = tmp_path / "memcli-home"
    monkeypatch.setenv("MEMCLI_HOME", str(home))
    monkeypatch.setenv("MEMCLI_SERVER", "0")  # commands run in-process unless a test starts a server
    point_hf_cache(monkeypatch, tmp_path / "hf-home")
    return home
