import pytest


@pytest.fixture(autouse=True)
def memcli_home(tmp_path, monkeypatch):
    """Every test gets its own MEMCLI_HOME and no network."""
    home = tmp_path / "memcli-home"
    monkeypatch.setenv("MEMCLI_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return home

