"""memcli.base's file I/O and bounded JSON parser: the leaf modules the store, config, settings,
converted copies, the catalog and the server share, with their refusals in the one taxonomy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memcli.base import durable
from memcli.base.errors import Damaged, FileRefused, FileUnreadable, MemcliError, describe
from memcli.base.jsonbound import JsonRefused, load_json
from memcli.store import PoolCorrupt, PoolError
from memcli.store import files as store_files

from .support import REPO


def test_open_regular_refuses_links_fifos_folders_and_large_files_in_one_line(tmp_path):
    (tmp_path / "real").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")  # no writer: an open that blocked would hang here
    (tmp_path / "folder").mkdir()
    cases = {"link": "is a symbolic link; refusing", "fifo": "is not a regular file",
             "folder": "is not a regular file (a folder); refusing"}
    for name, words in cases.items():
        with pytest.raises(FileRefused) as err:
            durable.open_regular(tmp_path / name, f"the {name}")
        assert str(err.value).startswith(f"the {name} ") and words in str(err.value)
        assert not isinstance(err.value, FileUnreadable)
    with pytest.raises(FileRefused, match=r"the real is implausibly large \(5 bytes, at most 4\)"):
        durable.open_regular(tmp_path / "real", "the real", max_bytes=4)
    with pytest.raises(FileNotFoundError):
        durable.open_regular(tmp_path / "absent", "the absent")
    assert durable.read_regular(tmp_path / "real", "the real", 5) == b"12345"
    failure = describe(FileRefused("x is a FIFO"))
    assert (failure.exit_code, failure.http_status, failure.kind) == (1, 409, "pool_error")
    assert issubclass(FileRefused, Damaged) and issubclass(FileUnreadable, FileRefused)


def test_a_file_the_system_will_not_let_us_read_is_file_unreadable(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    real_open = os.open

    def no_permission(path, *args, **kwargs):  # chmod 0 would not stop root, who runs some test machines
        if str(path) == str(secret):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    with pytest.raises(FileUnreadable, match=r"^cannot read the secret \(Permission denied\)$"):
        durable.open_regular(secret, "the secret")
    with pytest.raises(PoolError, match=r"^cannot read the secret \(Permission denied\)$") as err:
        store_files.open_regular(secret, "the secret")
    assert not isinstance(err.value, PoolCorrupt)


def test_the_store_refuses_with_its_own_errors_and_the_same_words(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(FileRefused) as base_err:
        durable.open_regular(tmp_path / "fifo", "part p")
    with pytest.raises(PoolCorrupt) as store_err:
        store_files.open_regular(tmp_path / "fifo", "part p")
    assert str(store_err.value) == str(base_err.value)


def test_replace_file_leaves_the_old_content_or_the_new(tmp_path, monkeypatch):
    durable.replace_file(tmp_path, "f", b"old")
    real = durable.write_all

    def fail_half_way(fd, data):
        real(fd, bytes(data)[:1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_all", fail_half_way)
    with pytest.raises(OSError):
        durable.replace_file(tmp_path, "f", b"new content")
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
    durable.replace_file(tmp_path, "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"new" and os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("raw, reason, key", [
    (b"\xff{}", "is not UTF-8 text", None),
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper than 32 levels", "a"),
    (b'{"x": NaN}', "is not valid JSON (NaN is not a number JSON allows)", None),
    (b'{"x": 1', "is not valid JSON (Expecting ',' delimiter at line 1 column 8)", None),
])
def test_load_json_refuses_in_one_line_with_the_reason_and_the_key(raw, reason, key):
    with pytest.raises(JsonRefused) as err:
        load_json(raw)
    assert (err.value.reason, err.value.key) == (reason, key)
    assert isinstance(err.value, MemcliError) and str(err.value) == f"{key or 'the JSON text'} {reason}"


def test_load_json_limits_and_constants():
    deep = b"[" * 1000 + b"]" * 1000
    with pytest.raises(JsonRefused, match="nests deeper than 64 levels"):
        load_json(deep, max_depth=64)  # found without recursion: no RecursionError
    assert load_json(b"[" * 4 + b"]" * 4, max_depth=4) == [[[[]]]]
    assert load_json(b'{"x": Infinity}', constants=True) == {"x": float("inf")}


def test_the_leaf_modules_import_nothing_but_base():
    code = ("import sys\nimport memcli.base.durable, memcli.base.jsonbound\n"
            "print(sorted(m for m in sys.modules if m.startswith('memcli.') and not m.startswith('memcli.base')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
