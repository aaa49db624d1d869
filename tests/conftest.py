import os

# as memcli/__init__ does for every process it runs (set before any BLAS call): in-process results
# and a test server's compare bit for bit only when MKL takes the same code path in both
os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (read when torch loads)

import pytest  # noqa: E402

from .support import point_hf_cache  # noqa: E402


@pytest.fixture(autouse=True)
def memcli_home(tmp_path, monkeypatch):
    """Every test gets its own MEMCLI_HOME, its own empty Hugging Face cache, and no network."""
    home = tmp_path / "memcli-home"
    monkeypatch.setenv("MEMCLI_HOME", str(home))
    monkeypatch.setenv("MEMCLI_SERVER", "0")  # commands run in-process unless a test starts a server
    point_hf_cache(monkeypatch, tmp_path / "hf-home")
    return home
