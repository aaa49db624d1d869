"""Discovery: paths to named byte streams (Source, Skipped, Ignored), never opening what is not a
regular file, ending symlink cycles; Sources made from uploaded copies; reading a Source whose file
changed after discovery."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
from pathlib import Path

import pytest

import memcli.ingest.discover as discovery
from memcli.ingest.discover import Ignored, Skipped, Source, discover
from memcli.ingest.extract import ExtractError, iter_text, sha256_of

from .documents import ShortReads, extract_error, make_pdf, source_for, text_of_source, text_page, write


def rel(found: list[Source | Skipped], root: Path) -> list[tuple[str, str]]:
    """(kind or 'skipped', path relative to root) for compact assertions."""
    rows = []
    for item in found:
        tag = item.kind if isinstance(item, Source) else "skipped"
        rows.append((tag, os.path.relpath(item.path, root)))
    return rows


@pytest.fixture
def no_hang():
    """Fail instead of hanging forever if something opens a FIFO blocking."""

    def on_alarm(signum, frame):
        raise TimeoutError("blocked (a FIFO was opened?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_explicit_files_of_every_kind(tmp_path):
    write(tmp_path / "a.pdf", make_pdf([text_page("hello")]))
    names = {"b.txt": "text", "c.md": "markdown", "d.markdown": "markdown", "e.html": "html",
             "f.htm": "html", "G.TXT": "text", "h.Md": "markdown"}  # fmt: skip
    for name in names:
        write(tmp_path / name, "hello")
    found = list(discover([str(tmp_path / name) for name in names]))
    assert found == [Source(str(tmp_path / name), kind, 5) for name, kind in names.items()]
    [pdf] = discover([str(tmp_path / "a.pdf")])
    assert pdf.kind == "pdf"


def test_directories_are_walked_recursively_in_sorted_order(tmp_path):
    for name in ["b.md", "a.txt", "sub/z.html", "sub/deeper/y.pdf", "c.MD", "ignored.docx", "sub/noext", "A.txt",
                 ".git/config", "img.PNG"]:
        write(tmp_path / "docs" / name, "x")
    found = list(discover([str(tmp_path / "docs")]))
    assert rel([f for f in found if not isinstance(f, Ignored)], tmp_path / "docs") == [
        ("text", "A.txt"),
        ("text", "a.txt"),
        ("markdown", "b.md"),
        ("markdown", "c.MD"),
        ("text", "sub/deeper/y.pdf"),  # "x" is no PDF: read as the text it is
        ("text", "sub/noext"),
        ("html", "sub/z.html"),
    ]
    ignored = [(os.path.basename(f.path), f.why, f.suffix) for f in found if isinstance(f, Ignored)]
    assert ignored == [("ignored.docx", "type", ".docx"), ("img.PNG", "type", ".png")]
    assert found == list(discover([str(tmp_path / "docs")]))  # deterministic


def test_paths_are_absolute_and_normalized(tmp_path, monkeypatch):
    """Item 16 of issue 13: a source's identity is its absolute, normalized path."""
    write(tmp_path / "docs" / "a.md", "x")
    monkeypatch.chdir(tmp_path)
    expected = [str(tmp_path / "docs" / "a.md")]
    assert [s.path for s in discover(["docs/"])] == expected
    assert [s.path for s in discover([Path("docs")])] == expected
    assert [s.path for s in discover(["./docs/../docs//a.md"])] == expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*.md", ["a.md", "sub/b.md", "sub/deep/c.md"]),
        ("**/*.txt", ["t.txt", "sub/t.txt"]),
        ("sub/*.md", ["sub/b.md"]),
        ("sub/**/*.md", ["sub/b.md", "sub/deep/c.md"]),
        ("?.md", ["a.md", "sub/b.md", "sub/deep/c.md"]),
        ("*.csv", ["x.csv"]),  # CSV is text
    ],
)
def test_glob_filters_files_inside_directories(tmp_path, pattern, expected):
    for name in ["a.md", "t.txt", "x.csv", "sub/b.md", "sub/t.txt", "sub/deep/c.md"]:
        write(tmp_path / "docs" / name, "x")
    found = [s for s in discover([str(tmp_path / "docs")], glob=pattern) if isinstance(s, Source)]
    assert sorted(os.path.relpath(s.path, tmp_path / "docs") for s in found) == sorted(expected)


def test_glob_does_not_filter_explicit_files(tmp_path):
    note = write(tmp_path / "note.txt", "x")
    assert list(discover([str(note)], glob="*.md")) == [Source(str(note), "text", 1)]


def test_missing_path_is_skipped(tmp_path):
    missing = str(tmp_path / "nope.txt")
    assert list(discover([missing])) == [Skipped(missing, "No such file or directory")]


def test_dash_means_stdin_once(tmp_path):
    found = list(discover(["-", "-"]))
    assert found[0] == Source("-", "stdin", None)
    assert isinstance(found[1], Skipped) and found[1].path == "-"


def test_fifo_is_skipped_without_opening_it(tmp_path, no_hang):
    fifo = tmp_path / "docs" / "pipe.txt"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    write(tmp_path / "docs" / "real.txt", "x")
    os.mkfifo(tmp_path / "docs" / "other-pipe.png")  # a binary type: ignored without a stat of its kind
    explicit = list(discover([str(fifo)]))
    assert explicit == [Skipped(str(fifo), "not a regular file (a FIFO)")]
    walked = list(discover([str(tmp_path / "docs")]))
    assert walked == [
        Ignored(str(tmp_path / "docs" / "other-pipe.png"), "type", ".png"),
        Skipped(str(fifo), "not a regular file (a FIFO)"),
        Source(str(tmp_path / "docs" / "real.txt"), "text", 1),
    ]


def test_file_replaced_by_fifo_after_discovery_does_not_block(tmp_path, no_hang):
    path = write(tmp_path / "doc.txt", "hello")
    source = source_for(path)
    path.unlink()
    os.mkfifo(path)
    assert extract_error(source) == "not a regular file (a FIFO)"
    with pytest.raises(ExtractError, match="FIFO"):
        sha256_of(source)


def test_device_is_skipped(no_hang):
    [skipped] = discover(["/dev/null"])
    assert skipped == Skipped("/dev/null", "not a regular file (a device)")


def test_symlink_cycle_terminates(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.md", "x")
    write(docs / "sub" / "b.md", "x")
    (docs / "sub" / "back").symlink_to(docs)  # sub/back -> docs: a cycle
    (docs / "sub" / "self").symlink_to(docs / "sub")
    found = list(discover([str(docs)]))
    assert rel(found, docs) == [
        ("markdown", "a.md"),
        ("markdown", "sub/b.md"),
        ("skipped", "sub/back"),
        ("skipped", "sub/self"),
    ]
    assert all("already visited" in s.reason for s in found if isinstance(s, Skipped))


def test_directory_reached_twice_is_walked_once(tmp_path):
    write(tmp_path / "shared" / "a.md", "x")
    (tmp_path / "link").symlink_to(tmp_path / "shared")
    found = list(discover([str(tmp_path / "shared"), str(tmp_path / "link")]))
    assert found[0] == Source(str(tmp_path / "shared" / "a.md"), "markdown", 1)
    assert isinstance(found[1], Skipped) and "already visited" in found[1].reason


def test_self_referencing_and_broken_symlinks(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "loop.md").symlink_to(docs / "loop.md")
    (docs / "dangling.txt").symlink_to(docs / "missing.txt")
    (docs / "dangling.bin").symlink_to(docs / "missing.bin")  # unsupported: ignored silently
    found = list(discover([str(docs)]))
    assert found == [
        Skipped(str(docs / "dangling.txt"), "broken symlink"),
        Skipped(str(docs / "loop.md"), "symlink loop (too many levels of symbolic links)"),
    ]
    [explicit] = discover([str(docs / "loop.md")])
    assert isinstance(explicit, Skipped) and "symlink loop" in explicit.reason


def test_symlinked_file_is_followed(tmp_path):
    target = write(tmp_path / "real.md", "hello")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "link.md").symlink_to(target)
    assert list(discover([str(tmp_path / "docs")])) == [Source(str(tmp_path / "docs" / "link.md"), "markdown", 5)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; see the simulated test below")
def test_permission_denied_real(tmp_path):
    secret = write(tmp_path / "secret.txt", "x")
    locked = tmp_path / "locked"
    write(locked / "a.txt", "x")
    secret.chmod(0)
    locked.chmod(0)
    try:
        found = list(discover([str(secret), str(locked)]))
    finally:
        secret.chmod(0o644)
        locked.chmod(0o755)
    assert found == [Skipped(str(secret), "Permission denied"), Skipped(str(locked), "Permission denied")]


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """The same as above, with EACCES injected at the two system calls (runs as root too)."""
    secret = write(tmp_path / "secret.txt", "x")
    locked = tmp_path / "locked"
    write(locked / "a.txt", "x")
    real_open, real_scandir = discovery._open_regular, os.scandir

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    def open_regular(path):
        if path == str(secret):
            raise denied(path)
        return real_open(path)

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise denied(path)
        return real_scandir(path)

    monkeypatch.setattr(discovery, "_open_regular", open_regular)
    monkeypatch.setattr(os, "scandir", scandir)
    found = list(discover([str(secret), str(locked), str(tmp_path)]))
    assert found == [
        Skipped(str(secret), "Permission denied"),
        Skipped(str(locked), "Permission denied"),
        Skipped(str(locked), "directory already visited (symlink loop or duplicate)"),
        Skipped(str(secret), "Permission denied"),
    ]
    assert extract_error(Source(str(secret), "text", 1)) == "cannot read file: Permission denied"


def test_unusual_file_names(tmp_path):
    docs = tmp_path / "docs"
    names = ["line\nbreak.md", "naïve café.txt", "日本語.md", " lead space.txt", "tab\tname.html"]
    for name in names:
        write(docs / name, f"<p>content of {name}</p>")
    found = list(discover([str(docs)]))
    assert sorted(os.path.basename(s.path) for s in found) == sorted(names)
    for source in found:
        assert "content of" in "".join(iter_text(source))
    explicit = docs / "line\nbreak.md"
    assert source_for(explicit).path == str(explicit)


def test_sha256_of_streams_raw_bytes(tmp_path):
    data = b"\xef\xbb\xbfhello\r\n" * 1000
    path = write(tmp_path / "a.txt", data)
    assert sha256_of(source_for(path)) == hashlib.sha256(data).hexdigest()
    assert sha256_of(Source("-", "stdin", None)) is None


def test_file_vanishing_between_discover_and_read(tmp_path):
    path = write(tmp_path / "gone.md", "soon gone")
    source = source_for(path)
    path.unlink()
    assert extract_error(source) == "cannot read file: No such file or directory"
    with pytest.raises(ExtractError, match="No such file or directory"):
        sha256_of(source)


def test_file_becoming_unreadable_while_read(tmp_path, monkeypatch):
    path = write(tmp_path / "flaky.txt", b"y" * 100_000)
    source = source_for(path)
    monkeypatch.setattr(discovery, "_open_regular", lambda _: ShortReads(b"y" * 100_000, fail_after=50_000))
    assert extract_error(source) == "cannot read file: Input/output error"


# --------------------------------------------------------------------------- names and streams


def test_a_source_is_named_by_its_path_and_opens_its_bytes(tmp_path):
    path = write(tmp_path / "a.md", "# hello")
    source = source_for(path)
    assert source.name == source.path == str(path)
    with source.open() as stream:
        assert stream.read() == b"# hello"
    assert Source("-", "stdin", None).name == "-"
    assert Source.from_file(path) == source  # what discover makes of it


def test_stdin_source_carries_the_stream_it_was_given():
    piped = io.BytesIO(b"from a pipe\r\n")
    [source] = discover(["-"], stdin=piped)
    assert source == Source("-", "stdin", None) and source.open() is piped
    assert list(iter_text(source)) == ["from a pipe\n"]
    forced = Source.from_stdin(io.BytesIO(b"# notes"), type="markdown", encoding="latin-1")
    assert (forced.name, forced.kind, forced.forced, forced.encoding) == ("-", "stdin", True, "iso8859-1")
    assert "".join(iter_text(forced)) == "# notes"


def test_from_file_names_an_uploaded_copy_as_the_client_did(tmp_path, no_hang):
    """A server reads a client's files from copies: their Sources carry the client's names, and a
    copy's kind comes from its content and the client's suffix, as discover would find them."""
    copy = write(tmp_path / "upload" / "0" / "copy", "<p>a &amp; b</p>")
    source = Source.from_file(copy, name="/home/ann/page.html")
    assert (source.name, source.path, source.kind, source.size) == ("/home/ann/page.html", str(copy), "html", 16)
    assert text_of_source(source) == "a & b"
    notes = Source.from_file(write(tmp_path / "upload" / "1" / "notes.md", "# x"), name="notes.md", type="text")
    assert (notes.name, notes.kind, notes.forced) == ("notes.md", "text", True)
    assert Source.from_file(tmp_path / "gone", name="/home/ann/gone.txt") == Skipped("/home/ann/gone.txt",
                                                                                  "No such file or directory")
    os.mkfifo(tmp_path / "pipe")
    assert Source.from_file(tmp_path / "pipe", name="p.txt") == Skipped("p.txt", "not a regular file (a FIFO)")
    with pytest.raises(ValueError, match="--type"):
        Source.from_file(copy, name="x", type="word")
    with pytest.raises(ValueError, match="unknown encoding"):
        Source.from_stdin(encoding="no-such-codec")
