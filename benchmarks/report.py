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


def export_tree(repo: Path, ref: str, as_name: str) -> tuple[Path, str]:
    """The `memcli` package of commit `ref` as a package named `as_name` in a new temporary folder
    (to put on sys.path beside this tree's memcli): (folder, full commit). Its absolute imports of
    memcli are pointed at `as_name` too, so an old tree never reaches into this one."""
    import re
    import subprocess
    import tempfile

    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], check=True, capture_output=True,
                            text=True).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix=f"{as_name}-"))
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "memcli"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "memcli").rename(root / as_name)
    absolute = re.compile(r"(?m)^(\s*)(from|import) memcli(?=[\s.])")
    for path in (root / as_name).rglob("*.py"):
        text = path.read_text()
        fixed = absolute.sub(lambda m: f"{m.group(1)}{m.group(2)} {as_name}", text)
        if fixed != text:
            path.write_text(fixed)
    return root, commit


def baseline_modules(package: str):
    """(engine module, loading module) of an exported tree, whichever layout it has (flat before
    the restructure of issue 18, layered after it)."""
    import importlib

    try:
        return importlib.import_module(f"{package}.core.engine"), importlib.import_module(f"{package}.loading.checkpoints")
    except ModuleNotFoundError:
        return importlib.import_module(f"{package}.engine"), importlib.import_module(f"{package}.loading")
