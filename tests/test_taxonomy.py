"""The lower layers' errors in memcli's one taxonomy (memcli.base.errors): every error class of the
store, pools, config, loading, chunking, settings, the log of answers and the server's address
derives from MemcliError, with the exit code and HTTP status its failures had before (the
command line's `_user_message` and the server's `classify` of 0.2.0's first restructure step)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from memcli.base.errors import MemcliError, describe
from memcli.base.text import one_line
from memcli.core.quant import first_line

LOWER = ["memcli.base.errors", "memcli.base.durable", "memcli.base.jsonbound", "memcli.store.errors",
         "memcli.store.safetensors", "memcli.store.files", "memcli.pools.meta", "memcli.pools.pool",
         "memcli.core.config", "memcli.loading.checkpoints", "memcli.loading.catalog", "memcli.loading.converted",
         "memcli.ingest.chunking", "memcli.app.settings", "memcli.app.answer_log", "memcli.server.address"]

BAD_REQUEST = (1, 400, "invalid_request_error")
POOL = (1, 409, "pool_error")
EXPECTED = {
    "ConfigError": BAD_REQUEST, "CheckpointError": BAD_REQUEST, "ChunkingError": BAD_REQUEST,
    "SettingsError": BAD_REQUEST, "LogError": BAD_REQUEST, "AddressError": BAD_REQUEST,
    "UntrustedServer": BAD_REQUEST, "JsonRefused": BAD_REQUEST, "InvalidPoolName": BAD_REQUEST,
    "PoolError": POOL, "PoolExists": POOL, "PoolCorrupt": POOL, "PoolReadOnly": POOL, "PoolModelMismatch": POOL,
    "HeaderError": POOL, "FileRefused": POOL, "FileUnreadable": POOL, "Damaged": POOL,
    "PoolNotFound": (1, 404, "not_found_error"), "PoolBusy": (1, 409, "conflict_error"),
}


def _error_classes():
    for name in LOWER:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                yield cls


def test_every_lower_layer_error_is_a_memcli_error_ending_as_before():
    found = {cls.__name__: cls for cls in _error_classes()}
    assert set(EXPECTED) <= set(found), set(EXPECTED) - set(found)
    for name, cls in found.items():
        assert issubclass(cls, MemcliError), f"{cls.__module__}.{name} is not in the taxonomy"
        if name in EXPECTED:
            failure = describe(cls(f"{name}: what went wrong"))
            assert (failure.exit_code, failure.http_status, failure.kind) == EXPECTED[name], name
            assert failure.message.endswith(f"{name}: what went wrong") and not failure.bug


def test_a_bad_value_is_still_a_value_error():
    """Those that were ValueErrors stay ValueErrors (callers such as the client's health check catch
    AddressError as one), and end by their kind, not as a plain ValueError would."""
    from memcli.core.config import ConfigError
    from memcli.ingest.chunking import ChunkingError
    from memcli.server.address import AddressError

    for cls in (ConfigError, ChunkingError, AddressError):
        assert issubclass(cls, ValueError) and issubclass(cls, MemcliError)
    assert str(ConfigError("two\nlines \x1b[2J")) == "two lines \\x1b[2J"  # one line, made safe


@pytest.mark.parametrize("err, expected", [
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "RuntimeError: CUDA error: out of memory"),
    (ValueError(""), "ValueError"),
    (OSError("bad \x1b]0;title\x07 name"), "OSError: bad \\x1b]0;title\\x07 name"),
])
def test_first_line_is_type_and_first_line_made_safe_by_the_one_sanitizer(err, expected):
    assert first_line(err) == expected


def test_first_line_cuts_as_the_one_sanitizer_cuts():
    err = RuntimeError("x" * 500)
    assert first_line(err) == one_line(f"RuntimeError: {'x' * 500}", 160)
    assert len(first_line(err)) == 160 and first_line(err).endswith("…")
