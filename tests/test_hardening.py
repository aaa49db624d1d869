"""Hardening: bad inputs, damaged pools, faults and trust, at the API level.

Every case is listed with its outcome in docs/hardening.md; `test_case_table_lists_every_test`
keeps that table and this file (and the modules it points at) in sync.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from memcli.ingest import discover as discover_module
from memcli.pools import meta as pool_meta
from memcli.pools import pool as pools
from memcli import store as store_module
from memcli.base import durable as base_durable
from memcli.app.api import Memcli, MemcliError
from memcli.app.settings import Settings
from memcli.store import PoolError, PoolStore
from tests.support import REPO, fixture_checkpoint
from tests.documents import BROKEN_PAGE, encrypt_pdf, make_pdf, text_page
from tests.helpers import flip_in_tensor

TINY = "memoryllm-8b-chat-tiny"
OTHER = "mplus-8b-tiny"
GOOD_TEXT = "The train to Lyon leaves at seven from platform four, said Ada. " * 2
POOL = "work"

# Loaded models are shared by every test of this module (weights load once).
_MODELS: dict = {}


def make_app(model: Path | str | None = None) -> Memcli:
    app = Memcli(settings=Settings(model=str(model or fixture_checkpoint(TINY)), device="cpu"))
    app._models = _MODELS
    return app


def home() -> Path:
    return Path(os.environ["MEMCLI_HOME"])


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root -> its bytes (None for folders), symlinks not followed."""
    out: dict[str, bytes | None] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            out[rel] = os.readlink(p).encode() if os.path.islink(p) else Path(p).read_bytes()
    return out


def pool_snapshot(app: Memcli, name: str = POOL) -> tuple[dict, dict]:
    """Every file's bytes in the pool folder, of every part object it names, and the parsed manifest."""
    files = tree(app.store.root / name)
    manifest = app.store.read_manifest(name)
    for entry in manifest["parts"].values():
        files[f".objects/{entry['sha256']}"] = (app.store.root / ".objects" / entry["sha256"]).read_bytes()
    return files, manifest


def assert_one_line(text: str) -> None:
    assert text and "\n" not in text and "\r" not in text, repr(text)
    assert "Traceback" not in text and 'File "' not in text, text


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A pool made through the API from one good file; copied into each test's MEMCLI_HOME."""
    root = tmp_path_factory.mktemp("template-home")
    old = os.environ.get("MEMCLI_HOME")
    os.environ["MEMCLI_HOME"] = str(root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        good = root.parent / "good.txt"
        good.write_text(GOOD_TEXT)
        maker = make_app()
        report = maker.inject(POOL, [str(good)])
        assert [f.status for f in report.files] == ["injected"]
        made = maker.store.root  # the whole store: the pool's parts are shared objects in it
    finally:
        if old is None:
            os.environ.pop("MEMCLI_HOME", None)
        else:
            os.environ["MEMCLI_HOME"] = old
    return made


@pytest.fixture
def app(template):
    a = make_app()
    shutil.copytree(template, a.store.root, symlinks=True)
    return a


# =========================================================================== 1. bad inputs

def _w(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _vanishing(tmp, mp):
    path = _w(tmp / "gone.txt", GOOD_TEXT + " vanishing")
    real = discover_module.discover

    def discover(paths, glob=None, **options):
        for item in real(paths, glob=glob, **options):
            if getattr(item, "path", "") == str(path):
                path.unlink()  # between discover and read
            yield item

    mp.setattr(discover_module, "discover", discover)
    return [str(path)]


def _permission_denied(tmp, mp):
    path = _w(tmp / "secret.txt", GOOD_TEXT + " secret")
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root ignores permission bits: the kernel's answer is simulated
        real = os.open

        def deny(p, flags, *a, **kw):
            if os.fspath(p) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(p))
            return real(p, flags, *a, **kw)

        mp.setattr("memcli.ingest.discover.os.open", deny)
    return [str(path)]


def _symlink_loop(tmp, mp):
    d = tmp / "loop"
    (d / "sub").mkdir(parents=True)
    os.symlink("..", d / "sub" / "up")
    os.symlink(d, d / "self")
    return [str(d)]


def _fifo(tmp, mp):
    os.mkfifo(tmp / "pipe.txt")
    return [str(tmp / "pipe.txt")]


# kind -> builder(tmp, monkeypatch) -> paths; expected status of every file
FILE_CASES = {
    "empty_file": (lambda t, m: [str(_w(t / "empty.txt", b""))], "skipped"),
    "whitespace_only": (lambda t, m: [str(_w(t / "blank.txt", " \n\t\r\n  " * 100))], "skipped"),
    "binary_named_txt": (lambda t, m: [str(_w(t / "bin.txt", bytes(range(256)) * 8))], "skipped"),
    # invalid UTF-8 after a UTF-8 start (a non-UTF-8 start is detected as another encoding and read)
    "invalid_utf8": (lambda t, m: [str(_w(t / "bad.txt", b"hello world " * 1000 + b"\xc3\x28"))], "skipped"),
    "utf16_with_bom": (lambda t, m: [str(_w(t / "u16.txt", ("\ufeff" + GOOD_TEXT + " utf16").encode("utf-16-le")))], "injected"),
    "truncated_pdf": (lambda t, m: [str(_w(t / "cut.pdf", make_pdf([text_page("hello world")])[:60]))], "skipped"),
    "encrypted_pdf": (lambda t, m: [str(_w(t / "enc.pdf", encrypt_pdf(make_pdf([text_page("secret words")]), "pw")))], "skipped"),
    "pdf_without_text_layer": (lambda t, m: [str(_w(t / "scan.pdf", make_pdf([None, None])))], "skipped"),
    "pdf_page_raises": (lambda t, m: [str(_w(t / "broken.pdf", make_pdf([BROKEN_PAGE])))], "skipped"),
    "not_a_pdf": (lambda t, m: [str(_w(t / "fake.pdf", "just text, no pdf"))], "skipped"),
    "html_only_scripts_styles": (
        lambda t, m: [str(_w(t / "s.html", "<html><head><style>p{}</style><script>var x=1;</script></head>"
                                          "<body><script>alert(1)</script><noscript></noscript></body></html>"))],
        "skipped",
    ),
    "symlink_loop_directory": (_symlink_loop, "skipped"),
    "fifo": (_fifo, "skipped"),
    "permission_denied": (_permission_denied, "skipped"),
    "vanishes_during_run": (_vanishing, "skipped"),
    "missing_path": (lambda t, m: [str(t / "no-such-file.txt")], "skipped"),
    "unsupported_type": (lambda t, m: [str(_w(t / "doc.docx", b"PK\x03\x04"))], "skipped"),
    "too_short_to_inject": (lambda t, m: [str(_w(t / "short.txt", "hi"))], "skipped"),
    "name_with_newline": (lambda t, m: [str(_w(t / "line\nbreak.txt", GOOD_TEXT + " newline name"))], "injected"),
    "non_ascii_name": (lambda t, m: [str(_w(t / "notes-日本語-ü.md", GOOD_TEXT + " non ascii"))], "injected"),
    "odd_name_skipped": (lambda t, m: [str(_w(t / "emp\nty-ü.txt", b""))], "skipped"),
}

ARG_CASES = {
    "pool_name_slash": ("inject", {"pool": "a/b"}),
    "pool_name_dotdot": ("inject", {"pool": ".."}),
    "pool_name_nul": ("inject", {"pool": "a\x00b"}),
    "pool_name_65_chars": ("inject", {"pool": "x" * 65}),
    "pool_name_leading_dot": ("inject", {"pool": ".hidden"}),
    "question_empty": ("ask", {"question": ""}),
    "question_whitespace": ("ask", {"question": " \n\t  "}),
    "question_too_long": ("ask", {"question": "why " * 200}),
    "chunk_tokens_0": ("inject", {"chunk_tokens": 0}),
    "chunk_tokens_negative": ("inject", {"chunk_tokens": -1}),
    "chunk_tokens_15": ("inject", {"chunk_tokens": 15}),
    "chunk_tokens_over_context": ("inject", {"chunk_tokens": 10_000}),
    "unknown_model_offline": ("inject", {"pool": "fresh", "model": "nobody/no-such-model"}),
}


@pytest.mark.parametrize("kind", list(FILE_CASES) + list(ARG_CASES))
def test_bad_input(app, tmp_path, monkeypatch, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    before_home = tree(home())
    before = pool_snapshot(app)
    def blocked(*_):
        raise TimeoutError("inject blocked (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)
    try:
        if kind in FILE_CASES:
            build, expected = FILE_CASES[kind]
            paths = build(inputs, monkeypatch)
            report = app.inject(POOL, paths)
            assert report.files, kind
            for f in report.files:
                assert f.status == expected, (f, kind)
                if f.status == "skipped":
                    assert_one_line(f.reason)
            if expected == "skipped":
                assert pool_snapshot(app) == before
            else:
                assert app.store.verify(POOL) == []
                assert report.files[0].path in [s["path"] for s in pools.load(app.store, POOL).sources]
            return
        op, args = ARG_CASES[kind]
        good = str(_w(inputs / "good.txt", GOOD_TEXT + " arg case"))
        with pytest.raises((MemcliError, PoolError, ValueError)) as err:
            if op == "inject":
                app.inject(args.get("pool", POOL), [good], model=args.get("model"), chunk_tokens=args.get("chunk_tokens"))
            else:
                app.ask(POOL, args["question"], max_new_tokens=4)
        assert_one_line(str(err.value))
        if kind.startswith("pool_name"):
            assert tree(home()) == before_home  # refused before touching the disk
        if kind == "unknown_model_offline":
            assert "not downloaded" in str(err.value), str(err.value)
        assert pool_snapshot(app) == before
        assert {k for k in tree(home()) if ".locks" not in k} == {k for k in before_home if ".locks" not in k}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_pool_of_another_model_is_refused(app, tmp_path):
    other = fixture_checkpoint(OTHER)
    good = str(_w(tmp_path / "good.txt", GOOD_TEXT + " other model"))
    before = pool_snapshot(app)
    with pytest.raises((MemcliError, PoolError)) as err:
        app.inject(POOL, [good], model=str(other))
    message = str(err.value)
    assert_one_line(message)
    assert str(fixture_checkpoint(TINY)) in message and str(other) in message
    assert pool_snapshot(app) == before
    # the right binding: ask through an app whose default model is the other one still uses the pool's
    answer = make_app(other).ask(POOL, "When does the train leave?", max_new_tokens=3)
    assert isinstance(answer.text, str)
    with pytest.raises(pool_meta.PoolModelMismatch):
        pools.load(app.store, POOL, make_app(other).model().binding)


def test_big_single_line_streams_with_bounded_memory(tmp_path):
    """200 MB on one line through iter_text + chunk_token_ids (bytes as ids), peak RSS measured."""
    path = tmp_path / "big.txt"
    block = b"abcdefgh" * (1 << 17)  # 1 MiB, no whitespace: hard cuts only
    with open(path, "wb") as out:
        for _ in range(200):
            out.write(block)
    code = textwrap.dedent(f"""
        import resource, sys
        from memcli.ingest.discover import Source
        from memcli.ingest.extract import iter_text
        from memcli.ingest.chunking import chunk_token_ids, encode_pieces
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        src = Source({str(path)!r}, "text", {path.stat().st_size})
        n = tokens = 0
        for chunk in chunk_token_ids(encode_pieces(iter_text(src), lambda t: t.encode()), 1 << 16):
            n += 1; tokens += len(chunk)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, tokens, peak - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-2000:]
    chunks, tokens, grown_kib = map(int, out.stdout.split())
    assert tokens == 200 * len(block)
    assert grown_kib < 200 * 1024, f"peak RSS grew {grown_kib / 1024:.0f} MiB for a 200 MB file"


def test_big_single_line_inject(app, tmp_path, monkeypatch):
    """A 2 MB single-line file through the whole inject (the model's forward pass stubbed: the
    tiny model takes ~1 s a chunk on 2 cores, and this is about extraction, chunking and commits)."""
    path = _w(tmp_path / "line.txt", ("word" * 50 + " ") * (2_000_000 // 201))
    engine = app.model().engine
    monkeypatch.setattr(engine, "inject", lambda state, ids: None)
    monkeypatch.setattr(engine, "update", lambda state, delta, origin=None: None)
    report = app.inject(POOL, [str(path)])
    assert [f.status for f in report.files] == ["injected"] and report.chunks > 100
    assert app.store.verify(POOL) == []


# =========================================================================== 2. damaged pools

def _parts(app: Memcli) -> dict:
    return app.store.read_manifest(POOL)["parts"]


def _part_path(app: Memcli, pid: str) -> Path:
    return app.store.root / ".objects" / _parts(app)[pid]["sha256"]


def _layout(app: Memcli) -> dict:
    return app.store.read_manifest(POOL)["meta"]["state"]


def _ask_error(app: Memcli) -> str:
    with pytest.raises((MemcliError, PoolError)) as err:
        make_app().ask(POOL, "When?", max_new_tokens=2)
    assert_one_line(str(err.value))
    return str(err.value)


def _edit_manifest(app: Memcli, edit) -> None:
    path = app.store.root / POOL / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_damaged_truncated_part(app):
    path = _part_path(app, _layout(app)["stm_base"])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert "damaged" in _ask_error(app)
    assert any("bytes" in p for p in app.store.verify(POOL))


def test_damaged_flipped_byte(app):
    path = _part_path(app, _layout(app)["stm_base"])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = app.store.verify(POOL)
    assert problems and "sha256" in problems[0]
    for p in problems:
        assert_one_line(p)
    with pytest.raises(PoolError, match="sha256"):
        pools.load(app.store, POOL, verify=True)


def test_damaged_wrong_shape(app):
    from safetensors.torch import load_file, save_file
    import hashlib

    pid = _layout(app)["stm_meta"]
    path = _part_path(app, pid)
    tensors = load_file(str(path))
    tensors["order"] = tensors["order"][:, :-1].contiguous()
    save_file(tensors, str(path.parent / "wrong-shape"))
    data = (path.parent / "wrong-shape").read_bytes()
    (path.parent / "wrong-shape").rename(path.parent / hashlib.sha256(data).hexdigest())

    def edit(m):
        m["parts"][pid] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    _edit_manifest(app, edit)
    assert "do not match" in _ask_error(app)


def test_damaged_future_format_version(app):
    _edit_manifest(app, lambda m: m.update(format_version=99))
    message = _ask_error(app)
    assert "format_version 99" in message and "upgrade" in message


def test_damaged_unknown_state_layout(app):
    _edit_manifest(app, lambda m: m["meta"]["state"].update(format=7))
    assert "unknown state layout" in _ask_error(app)


def test_damaged_missing_part(app):
    _part_path(app, _layout(app)["stm_meta"]).unlink()
    assert "missing" in _ask_error(app)
    assert any("missing" in p for p in app.store.verify(POOL))


def test_damaged_pool_folder_is_symlink(app, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(app.store.root / POOL), elsewhere)
    os.symlink(elsewhere, app.store.root / POOL)
    before = tree(elsewhere)
    mtimes = {p: os.lstat(p).st_mtime_ns for p in elsewhere.rglob("*")}
    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        assert "symbolic link" in _ask_error(app)
        with pytest.raises((MemcliError, PoolError), match="symbolic link") as err:
            make_app().inject(POOL, [str(_w(tmp_path / "g.txt", GOOD_TEXT))])
        assert_one_line(str(err.value))
        assert app.store.verify(POOL) and "symbolic link" in app.store.verify(POOL)[0]
        app.store.recover()
    finally:
        watching[0] = False
    assert tree(elsewhere) == before
    assert {p: os.lstat(p).st_mtime_ns for p in elsewhere.rglob("*")} == mtimes
    real = str(elsewhere)
    via_link = str(app.store.root / POOL) + os.sep
    assert not [p for p in opened if p.startswith(real) or p.startswith(via_link)]


def test_damaged_crash_leftovers_are_cleaned(app, caplog):
    """Leftovers of killed work go at the next writing command, said in one line on stderr."""
    root = app.store.root
    (root / ".tmp-99999999-dead").mkdir()
    _w(root / ".tmp-99999999-dead" / "manifest.json", b"junk")
    _w(root / ".tmp-rm-99999999-x" / "manifest.json", b"a removal's trash")
    _w(root / ".objects" / ".tmp-part-123", b"half a part")
    _w(root / POOL / ".tmp-manifest-99999999-x", b"{half")
    _w(root / ".objects" / ("0" * 64), b"unreferenced")
    with open(root / POOL / "log.jsonl", "ab") as f:
        f.write(b'{"half a rec')
    before = pool_snapshot(app)[1]
    with caplog.at_level("WARNING", logger="memcli.store"):
        with PoolStore().writer(POOL):  # what every writing command does first
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "memcli.store"]
    assert len(lines) == 1 and "removed 6 leftover(s)" in lines[0], lines
    assert_one_line(lines[0])
    leftovers = [p for p in tree(root) if ".tmp-" in p or "0" * 64 in p]
    assert leftovers == []
    assert app.store.read_manifest(POOL) == before
    assert app.store.verify(POOL) == []
    assert make_app().ask(POOL, "When does the train leave?", max_new_tokens=2).tokens


# ==================================================================== 2b. hostile store input

def _cli(*args: str):
    from typer.testing import CliRunner

    from memcli.cli import main as cli

    result = CliRunner().invoke(cli.app, ["--device", "cpu", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _archive(app: Memcli, tmp_path: Path, members) -> Path:
    """An archive of pool POOL's export with its parts replaced as `members(manifest, parts)` says."""
    import io
    import tarfile

    good = tmp_path / "good.tar"
    app.store.export(POOL, good)
    with tarfile.open(good) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        parts = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name != "manifest.json"}
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members(manifest, parts):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return bad


def _member(name, data, **pax):
    import tarfile

    info = tarfile.TarInfo(name)
    info.pax_headers = pax
    return info, data


def _sparse(m, parts):
    yield _member("manifest.json", json.dumps(m).encode())
    for name, data in parts.items():
        yield _member(name, data, **{"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                     "GNU.sparse.realsize": str(2 << 30)})


def _header_bomb(m, parts):
    import struct

    head = json.dumps({"x": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]}}).encode()
    bomb = struct.pack("<Q", len(head)) + head + bytes(16)
    pid = m["meta"]["state"]["stm_meta"]
    m["parts"][pid] = {"sha256": hashlib.sha256(bomb).hexdigest(), "bytes": len(bomb)}
    yield _member("manifest.json", json.dumps(m).encode())
    for name, data in parts.items():
        yield _member(name, bomb if name == f"parts/{pid}.safetensors" else data)


def _count_bomb(m, parts):
    yield _member("manifest.json", json.dumps(m).encode())
    for name, data in parts.items():
        yield _member(name, data)
    first = next(n for n in parts if n.startswith("parts/"))
    for _ in range(10_000):
        yield _member(first, parts[first])


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("case", ["sparse_member", "header_bomb", "member_count_bomb", "fifo_manifest", "fifo_part", "fifo_log", "sources_not_objects", "chunks_not_a_number", "deep_nesting", "control_chars_in_updated", "control_chars_in_model", "export_onto_existing_file", "export_into_the_store", "export_beside_a_tmp_name"])
def test_hostile_store_input(app, tmp_path, case):
    """Attacks on the store through the CLI: one-line error (no traceback, nothing "unexpected"),
    exit != 0, the other pool bit-identical, nothing written outside MEMCLI_HOME but what was asked."""
    app.store.fork(POOL, "other")
    make_app().inject("other", [str(_w(tmp_path / "in" / "other.txt", "Other. " + GOOD_TEXT))])
    other_before = pool_snapshot(app, "other")
    out = tmp_path / "out"
    out.mkdir()
    root = app.store.root
    manifest = root / POOL / "manifest.json"
    state = _layout(app)
    command: tuple = ("pool", "info", POOL)
    listing_marks_damage = False
    if case in ("sparse_member", "header_bomb", "member_count_bomb"):
        builder = {"sparse_member": _sparse, "header_bomb": _header_bomb, "member_count_bomb": _count_bomb}[case]
        command = ("pool", "import", _archive(app, tmp_path / "in", builder), "imported")
    elif case == "fifo_manifest":
        _replace_with_fifo(manifest)
        listing_marks_damage = True
    elif case == "fifo_part":
        _replace_with_fifo(_part_path(app, state["stm_meta"]))  # a part of POOL only
        command = ("pool", "export", POOL, out / "x.tar")
    elif case == "fifo_log":
        _replace_with_fifo(root / POOL / "log.jsonl")
        listing_marks_damage = True
    elif case in ("sources_not_objects", "chunks_not_a_number"):
        sources = ["a"] if case == "sources_not_objects" else [{"path": "a.txt", "chunks": "x"}]
        _edit_manifest(app, lambda m: m["meta"].update(sources=sources))
        listing_marks_damage = True
    elif case == "deep_nesting":
        manifest.write_bytes(b"[" * 100_000 + b"]" * 100_000)
        listing_marks_damage = True
    elif case == "control_chars_in_updated":
        _edit_manifest(app, lambda m: m.update(updated="\x1b[2J\x1b]0;pwned\x07"))
        listing_marks_damage = True
    elif case == "control_chars_in_model":
        _edit_manifest(app, lambda m: m["meta"]["model"].update(model="\x1b]0;pwned\x07\x1b[2J"))
        for args in (("pool", "ls"), ("pool", "info", POOL), ("pool", "ls", "--json"), ("pool", "info", POOL, "--json")):
            result = _cli(*args)
            assert result.exit_code == 0, result.stderr
            assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\x1b" not in result.stderr
        assert pool_snapshot(app, "other") == other_before
        return
    elif case == "export_onto_existing_file":
        (out / "x.tar").write_text("precious")
        command = ("pool", "export", POOL, out / "x.tar")
    elif case == "export_into_the_store":
        command = ("pool", "export", POOL, manifest)
    elif case == "export_beside_a_tmp_name":
        (out / "x.tar.tmp").write_text("the user's own file")
        result = _cli("pool", "export", POOL, out / "x.tar")
        assert result.exit_code == 0, result.stderr
        assert (out / "x.tar.tmp").read_text() == "the user's own file"
        assert sorted(os.listdir(out)) == ["x.tar", "x.tar.tmp"]
        assert pool_snapshot(app, "other") == other_before
        return
    def outside() -> dict:
        """Every file under tmp_path but outside MEMCLI_HOME (which the attacks put FIFOs in)."""
        return {f"{d.name}/{k}": v for d in tmp_path.iterdir() if d != home() for k, v in tree(d).items()}

    outside_before = outside()
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("blocked")))
    signal.alarm(60)
    try:
        result = _cli(*command)
        listing = _cli("pool", "ls")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code != 0, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memcli: error: "), lines
    assert "Traceback" not in result.stderr and "unexpected" not in lines[0] and "\x1b" not in lines[0]
    assert listing.exit_code == 0, listing.stderr
    assert "other" in listing.stdout and "\x1b" not in listing.stdout
    if listing_marks_damage:
        assert "damaged" in listing.stdout
    assert pool_snapshot(app, "other") == other_before
    assert outside() == outside_before  # the archives and inputs as they were, nothing new beside
    assert not app.store.exists("imported")
    if case == "export_onto_existing_file":
        assert (out / "x.tar").read_text() == "precious" and "--force" in lines[0]
    if case == "export_into_the_store":
        assert "inside the pool store" in lines[0] and app.store.verify(POOL) == []


# ============================================================ 2c. damaged parts, odd homes (issue 17)

def _one_error_line(result) -> str:
    assert result.exit_code != 0, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memcli: error: "), lines
    assert "Traceback" not in result.stderr and "unexpected" not in lines[0]
    return lines[0].removeprefix("memcli: error: ")


def _listing(*names: str) -> dict:
    rows = {row["name"]: row for row in json.loads(_cli("pool", "ls", "--json").stdout)}
    return {name: rows[name]["error"] for name in names}


def _three_pools(app: Memcli, tmp_path: Path) -> tuple[str, str]:
    """POOL, "other" (its fork: every part shared) and "third" (its own injection: shares only the
    model's initial memory). Returns POOL's stm-meta part id and its sha256."""
    app.store.fork(POOL, "other")
    make_app().inject("third", [str(_w(tmp_path / "third.txt", "Third. Paris has many bridges, said Bob. " * 3))])
    pid = _layout(app)["stm_meta"]
    return pid, _parts(app)[pid]["sha256"]


DAMAGED_PART_COMMANDS = {
    "ask": lambda out, new: ("ask", "When does the train leave?", "--pool", POOL, "--max-new-tokens", "2"),
    "fork": lambda out, new: ("pool", "fork", POOL, "copy"),
    "inject": lambda out, new: ("inject", new, "--pool", POOL),
    "export": lambda out, new: ("pool", "export", POOL, out / "x.tar"),
}


@pytest.mark.parametrize("command", ["ask", "fork", "inject", "export"])
def test_damaged_part_through_the_cli(app, tmp_path, command):
    """One byte of a part (its row origins: the file still parses) flipped: the command on that pool
    fails with one line naming the pool, the part and `pool verify --repair`; a third pool answers;
    `pool ls` marks the pool and its fork (they share the part) and `pool info` says so; nothing is
    written (an inject loads the bytes it would commit again under new names: refused, no laundering)."""
    pid, sha = _three_pools(app, tmp_path)
    flip_in_tensor(app.store.root / ".objects" / sha, "origin")
    objects_before = sorted(os.listdir(app.store.root / ".objects"))
    out = tmp_path / "out"
    out.mkdir()
    new = str(_w(tmp_path / "new.txt", "New. " + GOOD_TEXT))
    line = _one_error_line(_cli(*DAMAGED_PART_COMMANDS[command](out, new)))
    assert line == f"pool {POOL}: part {pid} is damaged (sha256 mismatch); run memcli pool verify {POOL} --repair", line
    answer = _cli("ask", "When does the train leave?", "--pool", "third", "--max-new-tokens", "2")
    assert answer.exit_code == 0, answer.stderr
    listed = _listing(POOL, "other", "third")
    assert listed["third"] is None
    for name in (POOL, "other"):
        assert listed[name] == f"pool {name}: part {pid} is damaged (sha256 mismatch); run memcli pool verify {name} --repair"
    plain = _cli("pool", "ls")
    assert plain.exit_code == 0 and [ln.split()[0] for ln in plain.stdout.splitlines() if "damaged" in ln] == ["other", POOL]
    info = _cli("pool", "info", POOL)
    assert info.exit_code == 0 and "damaged" in info.stdout and pid in info.stdout
    assert sorted(os.listdir(app.store.root / ".objects")) == objects_before
    assert not app.store.exists("copy") and os.listdir(out) == []
    assert app.store.verify(POOL) == [f"part {pid} is damaged (sha256 mismatch)"]


def test_damaged_part_pool_verify_repair(app, tmp_path):
    """`pool verify --repair` removes the damaged object (nothing may reuse it), says which pools name
    it, and exits non-zero: those pools stay damaged (lost bytes cannot be made again); they can be
    removed; the third pool never noticed."""
    pid, sha = _three_pools(app, tmp_path)
    flip_in_tensor(app.store.root / ".objects" / sha, "origin")
    result = _cli("pool", "verify", POOL, "--repair")
    assert result.exit_code != 0
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(f"removed the damaged object of part {pid}" in s and f"pools other, {POOL} name it" in s for s in said), said
    assert said[-1] == f"memcli: error: pool {POOL} is damaged (1 problem)"
    assert f"part {pid} is missing" in result.stdout
    assert sha not in os.listdir(app.store.root / ".objects")
    listed = _listing(POOL, "other", "third")
    assert listed["third"] is None and all(f"part {pid} is missing" in listed[n] for n in (POOL, "other"))
    for name in (POOL, "other"):
        assert _cli("pool", "rm", name, "--yes").exit_code == 0
    assert _cli("ask", "When?", "--pool", "third", "--max-new-tokens", "2").exit_code == 0
    referenced = {e["sha256"] for e in app.store.read_manifest("third")["parts"].values()}
    assert set(os.listdir(app.store.root / ".objects")) == referenced


def test_symlinked_objects_folder_through_the_cli(app, tmp_path):
    """.objects moved out of MEMCLI_HOME and a link put in its place, beside a sha-named file and a
    temporary file there (garbage by the store's rules, if it followed the link): every command that
    needs the parts is refused with one line naming the link and the fix; nothing outside
    MEMCLI_HOME is deleted, written or touched."""
    root = app.store.root
    outside = tmp_path / "outside-objects"
    shutil.move(str(root / ".objects"), outside)
    os.symlink(outside, root / ".objects")
    _w(outside / ("0" * 64), b"an unreferenced object, if it were the store's")
    _w(outside / ".tmp-1-2", b"a leftover, if it were the store's")
    archive = tmp_path / "work.tar"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outside.iterdir()}
    new = str(_w(tmp_path / "new.txt", "New. " + GOOD_TEXT))
    for args in (("inject", new, "--pool", POOL), ("inject", new, "--pool", "fresh", "--model", fixture_checkpoint(TINY)),
                 ("ask", "When?", "--pool", POOL, "--max-new-tokens", "2"), ("pool", "fork", POOL, "copy"),
                 ("pool", "export", POOL, archive), ("pool", "rm", POOL, "--yes"), ("pool", "verify", POOL, "--repair")):
        line = _one_error_line(_cli(*args))
        assert line.startswith(f"{root / '.objects'} is a symbolic link where memcli keeps a folder"), (args, line)
    assert "symbolic link" in _listing(POOL)[POOL]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outside.iterdir()} == before
    assert not archive.exists() and app.store.exists(POOL) and not app.store.exists("copy")


def test_torn_log_record_through_the_cli(app, tmp_path):
    """The log's last committed record cut in the middle (an interrupted append): `pool info` reads the
    whole records and says so in one line; `pool verify` names it; the next inject cuts it off."""
    log = app.store.root / POOL / "log.jsonl"
    first = log.read_bytes()
    make_app().inject(POOL, [str(_w(tmp_path / "second.txt", "Second. " + GOOD_TEXT))])
    os.truncate(log, log.stat().st_size - 10)
    info = _cli("pool", "info", POOL, "--json")
    assert info.exit_code == 0, info.stderr
    assert len(json.loads(info.stdout)["files"]) == 1  # the first file's record; the torn second one left out
    warned = [line for line in info.stderr.splitlines() if line.strip()]
    assert len(warned) == 1 and "interrupted append" in warned[0], warned
    assert _cli("pool", "verify", POOL).exit_code != 0
    assert _cli("inject", str(_w(tmp_path / "third.txt", "Third. " + GOOD_TEXT)), "--pool", POOL).exit_code == 0
    assert log.read_bytes().startswith(first) and app.store.verify(POOL) == []
    assert len(pools.load(app.store, POOL).sources) == 2


@pytest.mark.parametrize("command", ["fork", "export"])
def test_damaged_log_is_not_copied(app, tmp_path, command):
    """A committed log record that is not JSON: fork and export fail in one line instead of copying it."""
    log = app.store.root / POOL / "log.jsonl"
    data = bytearray(log.read_bytes())
    data[1] = ord("X")  # '{' of the first record: no longer JSON, same size
    log.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    args = ("pool", "fork", POOL, "copy") if command == "fork" else ("pool", "export", POOL, out / "x.tar")
    line = _one_error_line(_cli(*args))
    assert line.startswith(f"pool {POOL}: log.jsonl record 1 is not valid JSON"), line
    assert not app.store.exists("copy") and os.listdir(out) == []


READ_ONLY_READERS = {
    "pool_ls": ("pool", "ls"), "pool_info": ("pool", "info", POOL), "pool_verify": ("pool", "verify", POOL),
    "ask": ("ask", "When does the train leave?", "--pool", POOL, "--max-new-tokens", "2"),
    "export": ("pool", "export", POOL, "{out}/again.tar"),
}
READ_ONLY_WRITERS = {
    "inject": ("inject", "{new}", "--pool", POOL), "fork": ("pool", "fork", POOL, "copy"),
    "rm": ("pool", "rm", POOL, "--yes"), "rename": ("pool", "rename", POOL, "renamed"),
    "import": ("pool", "import", "{out}/work.tar", "imported"), "rebind": ("pool", "rebind", POOL, "--model", "{model}"),
}


@pytest.mark.parametrize("how", ["read_only_mount", "erofs", "eacces"])
def test_read_only_home(app, tmp_path, how):
    """A home that cannot be written: a real read-only bind mount (unshare, where the system allows
    it; every command a `python -m memcli` process), else the kernel's EROFS / EACCES simulated at the
    os calls for writes under MEMCLI_HOME (root ignores permission bits). Reading commands work
    (MEMCLI_SERVER=0), export to a writable place included; each writing command fails with one line
    saying the store is read-only; the home is bit-identical afterwards."""
    out = tmp_path / "out"
    out.mkdir()
    app.store.export(POOL, out / "work.tar")
    _w(app.store.root / ".tmp-9-killed" / "manifest.json", b"{")  # a leftover that cannot be removed here
    fill = {"out": str(out), "new": str(_w(tmp_path / "new.txt", "New. " + GOOD_TEXT)),
            "model": str(fixture_checkpoint(TINY))}
    commands = {**{f"read:{k}": v for k, v in READ_ONLY_READERS.items()},
                **{f"write:{k}": v for k, v in READ_ONLY_WRITERS.items()}}
    commands = {k: tuple(str(a).format(**fill) for a in v) for k, v in commands.items()}
    before = tree(home())
    results: dict[str, tuple[int, str]] = {}
    if how == "read_only_mount":
        if not shutil.which("unshare"):
            pytest.skip("no unshare here: a read-only bind mount cannot be made")
        script = [f"mount --bind {home()} {home()} && mount -o remount,ro,bind {home()} || exit 97"]
        for key, args in commands.items():
            quoted = " ".join(shlex.quote(a) for a in ["--device", "cpu", *args])
            script.append(f"echo '=== {key}'; {shlex.quote(sys.executable)} -m memcli {quoted} 2>&1; echo \"=== rc $?\"")
        run = subprocess.run(["unshare", "-rm", "bash", "-c", "\n".join(script)], capture_output=True, text=True,
                             timeout=600, cwd=REPO, env=dict(os.environ, MEMCLI_SERVER="0"))
        if run.returncode in (1, 97) and "=== " not in run.stdout:  # unshare or mount refused here
            pytest.skip(f"no read-only bind mount here: {run.stderr.strip()[:200]}")
        for block in run.stdout.split("=== ")[1:]:
            if block.startswith("rc "):
                continue
            key, _, body = block.partition("\n")
            rc_block = run.stdout.split(f"=== {key}\n", 1)[1].split("=== rc ", 1)[1]
            results[key] = (int(rc_block.split()[0]), body)
    else:
        from tests.helpers import read_only_home

        with pytest.MonkeyPatch.context() as mp:
            read_only_home(mp, home(), errno.EROFS if how == "erofs" else errno.EACCES)
            for key, args in commands.items():
                result = _cli(*args)
                results[key] = (result.exit_code, result.stderr)
    reason = "Read-only file system" if how != "eacces" else "Permission denied"
    for key in commands:
        code, said = results[key]
        if key.startswith("read:"):
            assert code == 0, (key, said)
        else:
            errors = [line for line in said.splitlines() if line.startswith("memcli: error: ")]
            assert code != 0 and len(errors) == 1, (key, said)
            assert errors[0] == (f"memcli: error: the pool store {app.store.root} is read-only ({reason}): this "
                                 f"command needs to write there; reading commands (pool ls, info, verify, export, "
                                 f"ask) still work"), (key, errors)
            assert "Traceback" not in said and "unexpected" not in said, (key, said)
    assert (out / "again.tar").stat().st_size == (out / "work.tar").stat().st_size
    assert tree(home()) == before


def test_locks_path_is_a_file(app, tmp_path):
    """.locks is a file: readers need no lock file and work; a writing command names the file and the fix."""
    locks = app.store.root / ".locks"
    shutil.rmtree(locks)
    locks.write_text("somebody's notes")
    assert _cli("pool", "ls").exit_code == 0 and _listing(POOL)[POOL] is None
    assert _cli("ask", "When?", "--pool", POOL, "--max-new-tokens", "2").exit_code == 0
    line = _one_error_line(_cli("inject", str(_w(tmp_path / "n.txt", "New. " + GOOD_TEXT)), "--pool", POOL))
    assert line == f"{locks} is a file where memcli keeps a folder: move it away (mv '{locks}' '{locks}.moved') and try again"
    assert locks.read_text() == "somebody's notes"


def test_import_onto_a_name_another_process_holds(app, tmp_path):
    """`pool import` onto a name whose writer lock another process holds: one line saying who (was:
    unexpected KeyError)."""
    archive = tmp_path / "work.tar"
    app.store.export(POOL, archive)
    code = ("import sys\nfrom memcli.store import PoolStore\nwith PoolStore().writer('busy'):\n"
            "    print('ready', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        line = _one_error_line(_cli("pool", "import", archive, "busy"))
        assert line.startswith("pool busy is being written by process ") and line.endswith("try again later"), line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert _cli("pool", "import", archive, "busy").exit_code == 0 and app.store.verify("busy") == []


# =========================================================================== 3. faults

def test_fault_enospc_during_commit(app, tmp_path, monkeypatch):
    before = pool_snapshot(app)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.core, "write_all", full)
    monkeypatch.setattr(base_durable, "write_all", full)
    with pytest.raises((MemcliError, PoolError)) as err:
        app.inject(POOL, [str(_w(tmp_path / "new.txt", GOOD_TEXT + " needs space"))])
    assert_one_line(str(err.value))
    assert "no space" in str(err.value).lower()
    monkeypatch.undo()
    assert pool_snapshot(app) == before
    assert app.store.verify(POOL) == []


_KILL_WORKER = """
import sys
from memcli.ingest import pipeline
from memcli.pools import pool
from memcli.app.api import Memcli
from memcli.app.settings import Settings
pipeline.COMMIT_EVERY = 1
real = pool.save
def save(store, p):
    real(store, p)
    print("v", p.version, flush=True)
pool.save = save
app = Memcli(settings=Settings(model=sys.argv[1], device="cpu"))
app.inject(sys.argv[2], sys.argv[3:])
print("done", flush=True)
"""


def test_fault_sigkill_during_inject(app, tmp_path):
    """SIGKILL an inject (commits after every chunk) once it has reported a random number (1-5) of
    commits, at a random point of the ones under way; each trial brings 6 new files, so hundreds of
    commits are left and every kill lands mid-stream. The pool always loads, verifies, is at least
    at the last reported version, and the next writing command leaves nothing behind."""
    import queue
    import threading

    rng = random.Random(1234)
    version = app.store.read_manifest(POOL)["version"]
    for trial in range(1, 9):
        files = [str(_w(tmp_path / f"t{trial}-doc{i}.txt", f"Trial {trial}, document {i}. " + GOOD_TEXT * 40))
                 for i in range(6)]
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_WORKER, str(fixture_checkpoint(TINY)), POOL, *files],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        reported = []
        wanted = rng.randint(1, 5)
        while len(reported) < wanted:  # synchronise on the child's progress, not on time
            line = lines.get(timeout=120)
            assert line.startswith("v "), line
            reported.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.0, 0.02))  # a random point inside the commits under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        err = proc.stderr.read()
        assert "Traceback" not in err, err[-2000:]
        with PoolStore().writer(POOL):  # the next writing command recovers
            pass
        assert [p for p in tree(app.store.root) if ".tmp-" in p] == []
        now = app.store.read_manifest(POOL)["version"]
        assert now >= max(reported) > version, (now, reported, version)
        assert app.store.verify(POOL) == []
        loaded = pools.load(app.store, POOL, verify=True)
        assert loaded.version == now
        version = now
    assert pools.load(app.store, POOL).version == app.store.read_manifest(POOL)["version"]


def test_fault_two_processes_inject_one_pool(app, tmp_path):
    mine = str(_w(tmp_path / "mine.txt", "Mine. " + GOOD_TEXT))
    theirs = [str(_w(tmp_path / f"theirs{i}.txt", f"Theirs {i}. " + GOOD_TEXT * 3)) for i in range(3)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WORKER, str(fixture_checkpoint(TINY)), POOL, *theirs],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lock = app.store.root / ".locks" / f"{POOL}.lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lock.exists() and lock.stat().st_size):
            time.sleep(0.05)
        refused = None
        try:
            report = app.inject(POOL, [mine])
        except (MemcliError, PoolError) as err:
            refused = str(err)
            assert_one_line(refused)
            assert "being written" in refused
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = [s["path"] for s in pools.load(app.store, POOL).sources]
    assert all(t in logged for t in theirs)
    if refused is None:
        assert mine in logged and report.files[0].status == "injected"
    else:
        assert mine not in logged
        app.inject(POOL, [mine])  # the refused one, again: now both are in
        assert mine in [s["path"] for s in pools.load(app.store, POOL).sources]
    assert app.store.verify(POOL) == []


# =========================================================================== 4. trust

def _sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "memcli").rglob("*.py"))}


def test_trust_no_unsafe_deserialization_in_sources():
    for name, text in _sources().items():
        tree_ = ast.parse(text)
        for node in ast.walk(tree_):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for m in mods), name
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func.endswith("torch.load") or func == "load" and "torch" in text and "from torch import load" in text:
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kw.get("weights_only") == "True", f"{name}: {ast.unparse(node)}"
                    assert name == "memcli/loading/checkpoints.py", f"torch.load outside the opt-in loader: {name}"
        assert not re.search(r"pickle\.loads?\(|numpy\.load\([^)]*allow_pickle=True", text), name


def test_trust_no_remote_code():
    for name, text in _sources().items():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), name


def test_trust_pickle_only_behind_opt_in():
    text = (REPO / "memcli" / "loading" / "checkpoints.py").read_text()
    loads = [m.start() for m in re.finditer(r"torch\.load\(", text)]
    assert loads, "expected the opt-in pickle path in loading.py"
    body = text[text.index("def _load_pickle"):]
    assert all(text.index("def _load_pickle") < at for at in loads)
    assert "weights_only=True" in body
    assert "if not allow_pickle" in text


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


def _manifest_like() -> st.SearchStrategy:
    """Mostly-valid manifests with one field replaced by random JSON."""
    keys = ["format_version", "version", "name", "created", "updated", "meta", "parts"]

    def build(key, value, part_value):
        m = {"format_version": 1, "version": 1, "name": "fz", "created": "x", "updated": "y",
             "meta": {"model": {"model": "m", "family": "f", "config_hash": "h"}, "state": {"format": 1}},
             "parts": {"stm-base-1": {"sha256": "0" * 64, "bytes": 3}}}
        m[key] = value
        if isinstance(m.get("meta"), dict) and part_value is not None:
            m["meta"]["state"] = part_value
        return m

    return st.builds(build, st.sampled_from(keys), _JSON, st.none() | _JSON)


@hsettings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.one_of(st.binary(max_size=300), _JSON.map(lambda v: json.dumps(v).encode()),
                         _manifest_like().map(lambda v: json.dumps(v).encode())))
def test_trust_manifest_parser_fuzz(tmp_path_factory, payload):
    root = tmp_path_factory.mktemp("fuzz")
    store = PoolStore(root)
    (root / "fz" / "parts").mkdir(parents=True)
    (root / "fz" / "parts" / "stm-base-1.safetensors").write_bytes(b"abc")
    (root / "fz" / "manifest.json").write_bytes(payload)
    for call in (lambda: store.read_manifest("fz"), lambda: pools.load(store, "fz"), lambda: store.verify("fz")):
        try:
            call()
        except PoolError as err:
            assert_one_line(str(err))


# =========================================================================== 5. the case table

def _test_ids_of(module_path: Path) -> set[str]:
    """Test function names, and name[param] for every literal/param id of a parametrized test."""
    text = module_path.read_text()
    ids = set(re.findall(r"^(?:async )?def (test_\w+)", text, re.M))
    ids |= set(re.findall(r"^    def (test_\w+)", text, re.M))
    if module_path.resolve() == Path(__file__).resolve():
        ids |= {f"test_bad_input[{k}]" for k in list(FILE_CASES) + list(ARG_CASES)}
    for m in re.finditer(r"@pytest\.mark\.parametrize\(\s*\"[^\"]+\",\s*\[([^\]]*)\]\)\s*\ndef (test_\w+)", text):
        for value in re.findall(r"\"([^\"]*)\"", m.group(1)):
            ids.add(f"{m.group(2)}[{value}]")
    return ids


def test_case_table_lists_every_test():
    doc = (REPO / "docs" / "hardening.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    named = re.findall(r"`(tests/[\w/]+\.py)::([\w\[\]\-\.]+)`", doc)
    assert len(named) >= 36
    known: dict[str, set[str]] = {}
    for module, test_id in named:
        if module not in known:
            known[module] = _test_ids_of(REPO / module)
        assert test_id in known[module] or test_id.split("[")[0] in known[module] and "[" not in test_id, (
            f"docs/hardening.md names {module}::{test_id}, which does not exist")
    # and every test of this module (and every bad-input kind), and of the server's, appears in the table
    for module in ("tests/test_hardening.py", "tests/test_server_hardening.py"):
        mine = _test_ids_of(REPO / module)
        listed = {t for m, t in named if m == module}
        # a parametrized test is listed through its cases
        missing = {t for t in mine if t not in listed and not any(n.startswith(t + "[") for n in listed)}
        assert not missing, f"not in docs/hardening.md: {sorted(missing)}"
    sections = {"bad inputs": 25, "damaged pools": 6, "faults": 5, "server": 14}
    for title, least in sections.items():
        part = doc.lower().split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        count = sum(1 for line in part.splitlines() if line.startswith("| ") and "`tests/" in line)
        assert count >= least, f"{title}: {count} rows"
    assert rows
