"""Settings: config file < environment < command-line flags.

The config file is TOML at `paths.config_file()` (`memcli config set KEY VALUE` writes it):

    model = "memoryllm-8b-chat"   # the model of new pools
    pool = "work"                 # the pool commands use without --pool
    device = "auto"               # auto | cpu | cuda | cuda:1
    dtype = "auto"                # auto | fp32 | bf16 | fp16
    quant = "auto"                # auto | nf4 | int8 | fp32 | bf16 | fp16
    server = true                 # ask, chat and inject use (and start) a memcli server
    keep_alive = "5m"             # how long a server keeps a model loaded: 30s, 5m, 1h, 0, -1
    compile = false               # decode through torch.compile
    threads = "auto"              # auto | N: CPU compute threads (memcli/core/threads.py)
    log = true                    # keep every answer in the log of answers (memcli log)
    log_max_mb = 100              # its size bound
    mcp_allowed = ["~/notes"]     # folders `memcli mcp`'s inject_files may read (none by default)

`KEYS` and `HELP` are the one table of the settings: the CLI's help, completion and errors list
them from here. No torch here (`memcli config` and completion must stay light): only resolving
`auto` asks torch; nor tomllib until a config file is read (`memcli --version` does not).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from memcli.base import paths
from memcli.base.durable import replace_file
from memcli.base.errors import MemcliError
from memcli.loading.catalog import ALIASES

# The default model for new pools: the chat model answers questions in sentences and follows the
# chat template, where the base models continue text; it keeps the 8b's 12,800-row memory
# (about 68% of a fact left after 20 more 512-token chunks, 14% after 100), and it is the same
# 8B size. M+ retains longer but is published as a pretrained (non-chat) model only.
DEFAULT_MODEL = "memoryllm-8b-chat"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANTS = ("auto", "nf4", "int8", "fp32", "bf16", "fp16")
ENV = {"model": "MEMCLI_MODEL", "pool": "MEMCLI_POOL", "device": "MEMCLI_DEVICE", "dtype": "MEMCLI_DTYPE",
       "quant": "MEMCLI_QUANT", "server": "MEMCLI_SERVER", "keep_alive": "MEMCLI_KEEP_ALIVE",
       "compile": "MEMCLI_COMPILE", "log": "MEMCLI_LOG", "log_max_mb": "MEMCLI_LOG_MAX_MB",
       "threads": "MEMCLI_THREADS", "mcp_allowed": "MEMCLI_MCP_ALLOWED"}
KEYS = tuple(ENV)
HELP = {
    "model": "model of new pools: an alias (memcli models), hub id or folder",
    "pool": "the pool used when a command gets no --pool",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto, fp32, bf16 or fp16",
    "quant": "auto, nf4, int8, fp32, bf16 or fp16",
    "server": "true or false: whether ask, chat and inject use (and start) a memcli server",
    "keep_alive": "how long a server keeps a model loaded after its last request: 5m, 30s, 0, -1",
    "compile": "true or false: decode through torch.compile (CUDA graphs on a GPU; eager if it fails)",
    "log": "true or false: whether answers are kept in the log of answers (memcli log)",
    "log_max_mb": "the log of answers' size bound in MB (the oldest answers go first); default 100",
    "threads": "auto or N: CPU compute threads (auto: by the model's size and the usable cores; OMP_NUM_THREADS wins)",
    "mcp_allowed": f"folders memcli mcp's inject_files may read, separated by {os.pathsep!r} (default: none)",
}


class SettingsError(MemcliError, ValueError):
    """A setting that cannot be used (a bad value in the config file, the environment or a flag)."""


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    pool: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"
    # the resident server (memcli serve): whether commands use/start one, how long it keeps a model
    server: bool = True
    keep_alive: str = "5m"
    # decode through torch.compile(mode="reduce-overhead"): fewer host calls per token; the first
    # answer pays the compilation, a failure falls back to eager
    compile: bool = False
    # the log of answers (memcli/app/answer_log.py): on or off, and its size bound
    log: bool = True
    log_max_mb: int = 100
    # CPU compute threads: "auto" (by the model's size and the cores this process may use) or a
    # count; MEMCLI_THREADS, then OMP_NUM_THREADS, win over the config file (memcli/core/threads.py)
    threads: str = "auto"
    # `memcli mcp`: the folders (absolute) whose files an assistant may inject; none by default
    mcp_allowed: tuple[str, ...] = ()
    # where each value came from: "default" | "config file" | "environment" | "command line"
    origin: dict = field(default_factory=dict, compare=False, repr=False)

    def where(self, key: str) -> str:
        """How a value was set, for messages: "--device", "MEMCLI_DEVICE", "the config file"."""
        source = self.origin.get(key, "default")
        return {"command line": f"--{key}", "environment": ENV[key],
                "config file": f"{key} in {paths.config_file()}"}.get(source, "the default")

    def explicit(self, key: str) -> bool:
        """Set for this run (flag or environment), not by the config file or the default."""
        return self.origin.get(key) in ("command line", "environment")

    def resolved_device(self) -> str:
        """The device to run on; a device that is not there is refused here, before anything
        (quantization included) is tried on it."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                why = ("this torch is built without CUDA" if torch.version.cuda is None
                       else "no CUDA GPU is visible")
                raise SettingsError(f"device {self.device} ({self.where('device')}) is not available: {why}; "
                                    f"use --device cpu (or memcli config set device auto)")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise SettingsError(f"device {self.device} ({self.where('device')}) is not available: "
                                    f"{torch.cuda.device_count()} CUDA GPU(s) visible")
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
        return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[self.dtype if self.dtype != "auto" else "fp32"]


def _validate(values: dict, where: str) -> dict:
    for key, value in values.items():
        if key not in KEYS:
            raise SettingsError(f"{where}: unknown setting {key!r} (known: {', '.join(KEYS)})")
        if key in ("server", "compile", "log"):
            values[key] = value = _boolean(value, where, key)
            continue
        if key == "log_max_mb":
            values[key] = _whole_number(value, where, key)
            continue
        if key == "mcp_allowed":
            values[key] = _folders(value, where, key)
            continue
        if key in ("keep_alive", "threads") and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = value = str(value)
        if key == "keep_alive":
            parse_keep_alive(value, f"{where}: keep_alive")
        if key == "threads":
            from memcli.core.threads import parse_count  # torch-free

            try:
                parse_count(value, "threads")
            except ValueError as err:
                raise SettingsError(f"{where}: {err}") from None
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{where}: {key} must be a non-empty string")
    checks = {"dtype": DTYPES, "quant": QUANTS}
    for key, allowed in checks.items():
        if key in values and values[key] not in allowed:
            raise SettingsError(f"{where}: {key} must be one of {', '.join(allowed)}, not {values[key]!r}")
    device = values.get("device")
    if device and not (device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())):
        raise SettingsError(f"{where}: device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return values  # a pool name is checked by the store where it is used


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: object, what: str = "keep-alive") -> float | None:
    """ollama's keep-alive: "5m", "30s", "1h", a number of seconds; any negative value keeps models
    forever (None); 0 unloads after each request. Anything else is a SettingsError naming `what`."""
    match = None if isinstance(value, bool) else _DURATION.match(str(value))
    if not match:
        raise SettingsError(f"{what} must be a duration like 5m, 30s, 0 or -1, not {str(value)!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None if seconds < 0 else seconds


def _boolean(value, where: str, key: str) -> bool:
    """true/false in the config file; 1/0, true/false, yes/no, on/off as a string."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{where}: {key} must be true or false, not {value!r}")


def _whole_number(value, where: str, key: str) -> int:
    """A whole number >= 1 (an integer in the config file, digits as a string)."""
    text = str(value).strip()
    number = isinstance(value, int) or (text.isascii() and text.isdigit())
    if isinstance(value, bool) or not number or int(text) < 1:
        raise SettingsError(f"{where}: {key} must be a whole number >= 1, not {value!r}")
    return int(text)


def _folders(value, where: str, key: str) -> tuple[str, ...]:
    """Folders as absolute paths: a list of strings in the config file, one string separated by
    os.pathsep elsewhere ("" or []: none)."""
    items = value.split(os.pathsep) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise SettingsError(f"{where}: {key} must be a list of folders, not {value!r}")
    return tuple(os.path.abspath(os.path.expanduser(item)) for item in items if item.strip())


def _config_toml() -> dict:
    """The config file parsed but not checked; {} when there is none."""
    import tomllib

    path = paths.config_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise SettingsError(f"{path}: {err.strerror or err}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"{path}: not valid TOML ({err})") from None


def read_config_file() -> dict:
    """The config file's values (validated); {} when there is none."""
    return _validate(_config_toml(), str(paths.config_file()))


def load_settings(**flags: str | None) -> Settings:
    """Settings from the config file, then the environment, then non-None `flags`."""
    values: dict = {}
    origin: dict = {}
    for source, layer in (
        ("config file", read_config_file()),
        ("environment", _validate({k: os.environ[v] for k, v in ENV.items() if os.environ.get(v)}, "environment")),
        ("command line", _validate({k: v for k, v in flags.items() if v is not None}, "command line")),
    ):
        values.update(layer)
        origin.update(dict.fromkeys(layer, source))
    return replace(Settings(), **values, origin=origin)


# --------------------------------------------------------------------------- memcli config
def _normalized(key: str, value: str) -> str:
    """What is stored for `value`: a model folder as an absolute path (works from anywhere)."""
    if key == "model" and value not in ALIASES and os.path.isdir(os.path.expanduser(value)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def set_config(key: str, value: str | None) -> None:
    """Write `key = value` into the config file (None removes the key). Other keys are kept;
    the file is replaced atomically (comments are not kept: it is rewritten from its values)."""
    if key not in KEYS:
        raise SettingsError(f"unknown setting {key!r} (known: {', '.join(KEYS)})")
    path = paths.config_file()
    # the other keys as they are, even bad ones (each is named where it is read): one bad value
    # must not stop the repair of another
    values = {k: v for k, v in _config_toml().items() if k != key}
    for other, kept in values.items():
        if not _writable(kept):
            raise SettingsError(f"{path}: {other} is not a setting's value ({type(kept).__name__}); edit the file")
    if value is not None:
        value = _normalized(key, value)
        if key == "model":  # a default that names no model would fail every command that loads one
            from memcli.loading.catalog import not_a_model  # torch-free

            problem = not_a_model(value)
            if problem is not None:
                raise SettingsError(problem)
        values.update(_validate({key: value}, "memcli config set"))
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path.parent, path.name, "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()).encode())


def _writable(value) -> bool:
    """A value `_toml_value` writes back: what settings hold (strings, booleans, numbers, lists of
    strings)."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(item, str) for item in value)
    return isinstance(value, (str, bool, int, float))


def _toml_value(value: str | bool | int | float | tuple) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_string(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # TOML writes inf and nan as Python does
        return repr(value)
    return _toml_string(value)


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in escaped)
    return f'"{escaped}"'


def keys_in_words() -> str:
    """"model, pool, …, keep_alive or compile": every setting, for help texts."""
    return ", ".join(KEYS[:-1]) + " or " + KEYS[-1]


def shown_value(value) -> str:
    """A setting's value as one writes it in the config file: true/false, a duration as given."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return os.pathsep.join(value)
    return "" if value is None else str(value)


def config_rows(settings: Settings) -> list[dict]:
    """Every setting with its effective value and where it came from (`memcli config get`)."""
    return [{"key": key, "value": getattr(settings, key), "source": settings.origin.get(key, "default")}
            for key in KEYS]
