"""Paths to the shared reference material and fixtures, for the tests."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# resolved: memcli records a model folder by its real path, so a ../shared that is a symbolic link
# (a worktree beside the checkout) compares equal to what pools and answers name
SHARED = Path(os.environ.get("MEMCLI_SHARED", REPO.parent / "shared")).resolve()
CONFORMANCE = Path(os.environ.get("MEMCLI_CONFORMANCE_DIR", SHARED / "conformance")).resolve()
REAL_CONFIGS = SHARED / "reference" / "real-configs"


def fixture_checkpoint(variant: str) -> Path:
    path = CONFORMANCE / variant / "checkpoint"
    if not path.is_dir():
        pytest.skip(f"conformance fixture {variant} not found under {CONFORMANCE}")
    return path


def point_hf_cache(monkeypatch, hf_home):
    """huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at import: set both the environment
    (for subprocesses) and the already-imported constants."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
