"""What every benchmark shares: the library versions it ran with, and how it prints its result
(one JSON object on stdout, and the same text into `--out` when given)."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def versions() -> dict:
    """torch, CUDA, bitsandbytes and Python versions (None for what is not installed)."""
    import torch

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # absent, or present without a usable native library
        bnb = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bnb,
            "python": platform.python_version()}


def emit(result: dict, out: Path | str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
