"""Settings: config file < environment < command-line flags.

The config file is TOML at `paths.config_file()`:

    model = "memoryllm-8b-chat"
    device = "auto"      # auto | cpu | cuda | cuda:1
    dtype = "auto"       # auto | fp32 | bf16 | fp16
    quant = "auto"       # auto | nf4 | int8 | fp32 | bf16 | fp16
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace

from . import paths

# The default model for new pools: the chat model answers questions in sentences and follows the
# chat template, where the base models continue text; it keeps the 8b's 12,800-row memory
# (about 68% of a fact left after 20 more 512-token chunks, 14% after 100), and it is the same
# 8B size. M+ retains longer but is published as a pretrained (non-chat) model only.
DEFAULT_MODEL = "memoryllm-8b-chat"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANTS = ("auto", "nf4", "int8", "fp32", "bf16", "fp16")
ENV = {"model": "MEMCLI_MODEL", "device": "MEMCLI_DEVICE", "dtype": "MEMCLI_DTYPE", "quant": "MEMCLI_QUANT"}
ENV["keep_alive"] = "MEMCLI_KEEP_ALIVE"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"
    # the resident server (memcli serve): whether commands use/start one, how long it keeps a model
    server: bool = True
    keep_alive: str = "5m"

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self):
        import torch

        name = self.dtype
        if name == "auto":
            name = "bf16" if self.resolved_device().startswith("cuda") else "fp32"
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]

    def resolved_quant(self) -> str:
        if self.quant != "auto":
            return self.quant
        if self.resolved_device().startswith("cuda"):
            return "nf4"  # 4-bit base weights: an 8B model + pool fit a consumer GPU
        from .loading import dense_mode

        return dense_mode(self.resolved_dtype())


def _validate(values: dict, where: str) -> dict:
    known = {f.name for f in fields(Settings)}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        if key == "server":
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: server must be true or false")
            continue
        if key == "keep_alive" and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = value = str(value)
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{where}: {key} must be a non-empty string")
    checks = {"dtype": DTYPES, "quant": QUANTS}
    for key, allowed in checks.items():
        if key in values and values[key] not in allowed:
            raise SettingsError(f"{where}: {key} must be one of {', '.join(allowed)}, not {values[key]!r}")
    device = values.get("device")
    if device and not (device in DEVICES or device.startswith("cuda:")):
        raise SettingsError(f"{where}: device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return values


def load_settings(**flags: str | None) -> Settings:
    """Settings from the config file, then the environment, then non-None `flags`."""
    values: dict = {}
    path = paths.config_file()
    if path.exists():
        try:
            values.update(_validate(tomllib.loads(path.read_text()), str(path)))
        except tomllib.TOMLDecodeError as err:
            raise SettingsError(f"{path}: not valid TOML ({err})") from None
    env = {key: os.environ[var] for key, var in ENV.items() if os.environ.get(var)}
    values.update(_validate(env, "environment"))
    values.update(_validate({k: v for k, v in flags.items() if v is not None}, "command line"))
    return replace(Settings(), **values)
