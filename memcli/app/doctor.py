"""`memcli doctor`: what this machine can run (versions, GPU, quantization modes, memory, disk,
paths, the resolved settings) and what will not work here. Loads no model."""

from __future__ import annotations

import os
from pathlib import Path

from memcli.app.catalog import list_models
from memcli.app.settings import Settings


CHECKPOINT_DISK_BYTES = 40 * 10**9  # an 8B MemoryLLM checkpoint in fp32 is about 39 GB


def _free_bytes(path: Path) -> int | None:
    import shutil

    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def host_memory() -> dict:
    """Total and available host memory in bytes (None where the platform does not say)."""
    total = available = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"total_bytes": total, "available_bytes": available, "needed_bytes": None}


def diagnose(settings: Settings) -> dict:
    """What this machine can run: versions, GPU, quantization modes, disk, paths, resolved settings,
    and a list of what will not work here (`memcli doctor`). Loads no model."""
    import importlib.metadata
    import logging
    import platform
    import sys

    import torch
    from huggingface_hub import constants

    from memcli import __version__
    from memcli.base import paths
    from memcli.loading.catalog import known
    from memcli.core.quant import QUANT_MODES, check_mode_supported

    for noisy in ("bitsandbytes", "kernels"):  # their kernel-loading notes are not ours to show
        logging.getLogger(noisy).setLevel(logging.ERROR)
    problems: list[str] = []
    cuda = {"available": torch.cuda.is_available(), "version": torch.version.cuda, "devices": []}
    if cuda["available"]:
        for index in range(torch.cuda.device_count()):
            device = {"index": index, "name": torch.cuda.get_device_name(index),
                      "total_bytes": torch.cuda.get_device_properties(index).total_memory, "free_bytes": None}
            try:
                device["free_bytes"] = torch.cuda.mem_get_info(index)[0]
            except RuntimeError:
                pass
            cuda["devices"].append(device)
    else:
        problems.append("no CUDA GPU: memcli runs on the CPU, slowly; 4-bit (nf4) and 8-bit (int8) weights "
                        "save memory there but not time (they are made for a CUDA GPU)")
    try:
        bnb_version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb_version = None
        problems.append("bitsandbytes is not installed: nf4 and int8 quantization are unavailable")

    modes: dict[str, dict[str, str | None]] = {}
    for device in ("cpu", "cuda"):
        modes[device] = {}
        for mode in QUANT_MODES:
            if device == "cuda" and not cuda["available"]:
                modes[device][mode] = "no CUDA GPU"
                continue
            try:
                check_mode_supported(mode, device)
                modes[device][mode] = None
            except ValueError as err:
                modes[device][mode] = str(err)

    resolved: dict[str, str | None] = {"device": None, "dtype": None, "quant": None}
    try:
        resolved["device"] = settings.resolved_device()
        resolved["dtype"] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[settings.resolved_dtype()]
        resolved["quant"] = settings.resolved_quant()
    except (ValueError, KeyError) as err:
        problems.append(f"the settings do not resolve: {err}")
    device = resolved["device"]
    if device and device.startswith("cuda") and not cuda["available"]:
        problems.append(f"device is set to {settings.device} but there is no CUDA GPU")
    elif device and resolved["quant"]:
        try:
            check_mode_supported(resolved["quant"], device)
        except ValueError as err:
            problems.append(f"the configured quantization will not run here: {err}")

    hf_cache = Path(constants.HF_HUB_CACHE)
    disk = {"data_dir": str(paths.data_dir()), "data_free_bytes": _free_bytes(paths.data_dir()),
            "hf_cache": str(hf_cache), "hf_cache_free_bytes": _free_bytes(hf_cache)}
    from memcli.loading.catalog import ALIASES

    memory = host_memory()
    catalog_entry = known(settings.model)
    if catalog_entry is not None and resolved["device"] == "cpu" and resolved["quant"]:
        from memcli.loading.catalog import OFFLINE_HINT, cpu_memory_problem, host_bytes_needed

        memory["needed_bytes"] = host_bytes_needed(catalog_entry, resolved["quant"])
        problem = cpu_memory_problem(settings.model, resolved["quant"], memory["total_bytes"])
        if problem is not None:
            problems.append(f"{settings.model} will not load here: {problem} (it needs a CUDA GPU); {OFFLINE_HINT}")
    if settings.model in ALIASES:
        downloaded = any(row["name"] == settings.model and row["status"] == "downloaded" for row in list_models())
        free = disk["hf_cache_free_bytes"]
        if not downloaded and free is not None and free < CHECKPOINT_DISK_BYTES:
            problems.append(f"{settings.model} is not downloaded and {hf_cache} has {free / 1e9:.1f} GB free; "
                            f"the checkpoint takes about {CHECKPOINT_DISK_BYTES / 1e9:.0f} GB")
    from memcli.loading import converted

    # the full sha256 of every converted-weights copy (a load checks only size and mtime)
    copies = [{"folder": str(folder), "ok": ok} for folder, ok in converted.verify()]
    problems += [f"the converted weights at {row['folder']} are damaged (sha256 mismatch): remove that folder "
                 f"and the next load rebuilds them" for row in copies if not row["ok"]]
    return {
        "memcli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": cuda,
        "bitsandbytes": bnb_version,
        "quant_modes": modes,
        "disk": disk,
        "memory": memory,
        "converted": copies,
        "paths": {"data": str(paths.data_dir()), "pools": str(paths.pools_dir()), "config": str(paths.config_dir()),
                  "config_file": str(paths.config_file()), "cache": str(paths.cache_dir()), "hf_cache": str(hf_cache)},
        "settings": {"model": settings.model, "device": settings.device, "dtype": settings.dtype, "quant": settings.quant},
        "resolved": resolved,
        "problems": problems,
    }
