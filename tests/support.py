"""Paths to the shared reference material and fixtures, for the tests."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEMCLI_SHARED", REPO.parent / "shared"))
CONFORMANCE = Path(os.environ.get("MEMCLI_CONFORMANCE_DIR", SHARED / "conformance"))
REAL_CONFIGS = SHARED / "reference" / "real-configs"


def fixture_checkpoint(variant: str) -> Path:
    path = CONFORMANCE / variant / "checkpoint"
    if not path.is_dir():
        pytest.skip(f"conformance fixture {variant} not found under {CONFORMANCE}")
    return path
