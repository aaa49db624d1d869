import pytest

from .support import point_hf_cache


@pytest.fixture(autouse=True)
def memcli_home(tmp_path, monkeypatch):
    """Every test gets its own MEMCLI_HOME, its own empty Hugging Face cache, and no network."""
    home = tmp_path / "memcli-home"
    monkeypatch.setenv("MEMCLI_HOME", str(home))
    point_hf_cache(monkeypatch, tmp_path / "hf-home")
    return home
