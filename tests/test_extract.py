from __future__ import annotations

import codecs
import errno
import hashlib
import io
import logging
import os
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pypdf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memcli.ingest import extract
from memcli.ingest.extract import (
    PIECE_CHARS,
    SUPPORTED_SUFFIXES,
    ExtractError,
    Ignored,
    Skipped,
    Source,
    discover,
    iter_text,
    sha256_of,
)

# --------------------------------------------------------------------------- helpers


def make_pdf(pages: list[bytes | None]) -> bytes:
    """A minimal valid PDF: one page per content stream (None: a page without content)."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    next_id = 4
    for content in pages:
        page_id, next_id = next_id, next_id + 1
        kids.append(page_id)
        page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
        if content is not None:
            stream_id, next_id = next_id, next_id + 1
            objects[stream_id] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content)
            page += b" /Contents %d 0 R" % stream_id
        objects[page_id] = page + b" >>"
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def text_page(text: str) -> bytes:
    return b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % text.encode("ascii")


# pypdf 7 raises PdfStreamError on a dictionary left open at the end of a content stream.
BROKEN_PAGE = text_page("lost") + b" <<"


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    # RC4 works without the optional cryptography package.
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_bytes(data.encode("utf-8"))
    else:
        path.write_bytes(data)
    return path


def source_for(path: Path) -> Source:
    [found] = list(discover([str(path)]))
    assert isinstance(found, Source), found
    return found


def text_of(path: Path) -> str:
    return "".join(iter_text(source_for(path)))


def text_of_source(source: Source) -> str:
    return "".join(iter_text(source))


def extract_error(source: Source, stdin=None) -> str:
    with pytest.raises(ExtractError) as caught:
        list(iter_text(source, stdin=stdin))
    message = str(caught.value)
    assert message and "\n" not in message
    return message


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


# --------------------------------------------------------------------------- discover


def test_supported_suffixes():
    assert set(SUPPORTED_SUFFIXES) == {".pdf", ".txt", ".md", ".markdown", ".html", ".htm"}


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


def test_kind_comes_from_content_not_the_name(tmp_path):
    """Item 10 of issue 13: a Markdown file named .pdf is text; a real PDF named .txt is a PDF."""
    fake = write(tmp_path / "notes.pdf", "# Notes\n\nThe launch is on Monday.\n")
    [source] = discover([str(fake)])
    assert source.kind == "text" and text_of(fake).startswith("# Notes")
    real = write(tmp_path / "paper.txt", make_pdf([text_page("Hello world")]))
    assert source_for(real).kind == "pdf" and text_of(real) == "Hello world"
    page = write(tmp_path / "page", "<!DOCTYPE html><p>Hi &amp; bye</p>")
    assert source_for(page).kind == "html" and text_of(page) == "Hi & bye"


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


def test_every_text_file_is_read_binaries_skipped_with_reason(tmp_path):
    """Item 14 of issue 13: README, LICENSE, .rst, .org, .tex, .csv, .json, source code are text."""
    names = {"README": "read me", "LICENSE": "MIT License", "a.rst": "Title\n=====", "b.org": "* heading",
             "c.tex": "\\section{Intro}", "d.csv": "a,b\n1,2", "e.json": '{"k": 1}', "f.py": "print('hi')",
             "g.c": "int main(void) { return 0; }"}
    for name, text in names.items():
        write(tmp_path / name, text)
    for name, text in names.items():
        source = source_for(tmp_path / name)
        assert source.kind == "text" and text_of(tmp_path / name) == text, name
    zip_ = write(tmp_path / "archive.zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 8)
    assert "binary content" in extract_error(source_for(zip_))


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
    real_open, real_scandir = extract._open_regular, os.scandir

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

    monkeypatch.setattr(extract, "_open_regular", open_regular)
    monkeypatch.setattr(extract.os, "scandir", scandir)
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


# --------------------------------------------------------------------------- plain text


def test_text_and_markdown_pass_through(tmp_path):
    body = "# Title\n\n* item with `code` and <b>tags</b>\n\tindented é ü 😀\n"
    assert text_of(write(tmp_path / "a.md", body)) == body
    assert text_of(write(tmp_path / "a.txt", body)) == body


def test_newlines_are_normalised_and_nuls_removed(tmp_path):
    path = write(tmp_path / "a.txt", b"one\r\ntwo\rthree\n" + b"x" * 9000 + b"\x00tail")
    assert text_of(path) == "one\ntwo\nthree\n" + "x" * 9000 + "tail"


def test_crlf_split_across_read_blocks(tmp_path):
    # The first read is SNIFF_BYTES long, so the "\r" ends one block and "\n" opens the next.
    data = b"a" * (extract.SNIFF_BYTES - 1) + b"\r\n" + b"b" * 100
    assert text_of(write(tmp_path / "a.txt", data)) == "a" * (extract.SNIFF_BYTES - 1) + "\n" + "b" * 100


def test_multibyte_character_split_across_read_blocks(tmp_path):
    data = b"a" * (extract.SNIFF_BYTES - 1) + "é€😀".encode() * 3
    assert text_of(write(tmp_path / "a.txt", data)) == data.decode()


def test_utf8_bom_is_stripped(tmp_path):
    assert text_of(write(tmp_path / "a.txt", codecs.BOM_UTF8 + "héllo".encode())) == "héllo"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_bom(tmp_path, encoding):
    body = "Grüße, 世界 😀\r\nsecond line\n" * 2000  # spans several read blocks
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + body.encode("utf-16-be")
    else:
        data = body.encode(encoding)  # Python writes the native-order BOM
    assert text_of(write(tmp_path / "a.txt", data)) == body.replace("\r\n", "\n")


def test_latin1_text_is_detected(tmp_path):
    """Item 14 of issue 13: Latin-1 (or any encoding charset-normalizer finds) is read."""
    text = "Le comité a décidé: réunion à l'hôtel de ville, à côté du marché. " * 20
    path = write(tmp_path / "a.txt", text.encode("latin-1"))
    assert text_of(path) == text


def test_invalid_utf8_far_into_a_file_names_the_byte_offset_and_encoding_option(tmp_path):
    far = write(tmp_path / "far.txt", b"a" * 100_000 + b"\xe9t\xe9")  # latin-1 "été" after 100 kB of ASCII
    message = extract_error(source_for(far))
    assert "invalid UTF-8 at byte 100000" in message and "--encoding" in message
    [forced] = discover([str(far)], encoding="latin-1")
    assert text_of_source(forced).endswith("été")


def test_forced_type_and_bad_options(tmp_path):
    data = b"\x01\x02\x03 some text \x04\x05\x06\x07" * 40
    path = write(tmp_path / "odd.dat", data)
    assert "binary" in extract_error(source_for(path))
    [forced] = discover([str(path)], type="text")
    assert forced.kind == "text" and "some text" in text_of_source(forced)
    page = write(tmp_path / "page.html", "<p>a &amp; b</p>")
    [as_text] = discover([str(page)], type="text")
    assert text_of_source(as_text) == "<p>a &amp; b</p>"
    with pytest.raises(ValueError, match="--type"):
        list(discover([str(path)], type="word"))
    with pytest.raises(ValueError, match="unknown encoding"):
        list(discover([str(path)], encoding="no-such-codec"))


def test_invalid_sequence_across_read_block_reports_its_start(tmp_path):
    # "\xc3" begins a 2-byte sequence at the end of the first block; "(" does not continue it.
    data = b"a" * (extract.SNIFF_BYTES - 1) + b"\xc3(" + b"b" * 10
    assert f"at byte {extract.SNIFF_BYTES - 1};" in extract_error(source_for(write(tmp_path / "a.txt", data)))


def test_truncated_character_at_end_of_file(tmp_path):
    message = extract_error(source_for(write(tmp_path / "a.txt", b"price: 5 \xe2\x82")))
    assert message == "invalid UTF-8: incomplete character at end of file (byte 9)"


def test_binary_file_named_txt(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256)) * 4
    assert "binary content" in extract_error(source_for(write(tmp_path / "image.txt", png)))


def test_control_characters_without_nul_are_binary(tmp_path):
    data = bytes([1, 2, 3, 4, 5, 6, 7, 14, 15, 16]) * 100 + b"some text" * 50
    assert "binary content (many control characters)" in extract_error(source_for(write(tmp_path / "a.md", data)))


def test_text_with_tabs_and_escape_codes_is_not_binary(tmp_path):
    log = "\x1b[32mOK\x1b[0m\tstep\n" * 200
    assert text_of(write(tmp_path / "log.txt", log)) == log


def test_empty_file(tmp_path):
    assert extract_error(source_for(write(tmp_path / "empty.md", b""))) == "empty file"


def test_whitespace_only_file(tmp_path):
    assert extract_error(source_for(write(tmp_path / "blank.txt", " \n\t\r\n" * 1000))) == "only whitespace, no text"


def test_leading_whitespace_is_dropped_only_in_whole_blank_pieces(tmp_path):
    text = " " * (PIECE_CHARS + 10) + "word"
    assert text_of(write(tmp_path / "a.txt", text)).strip() == "word"


def test_big_single_line_file_streams_with_bounded_memory(tmp_path):
    size = 30 * 1024 * 1024
    path = tmp_path / "big.txt"
    with open(path, "wb") as out:
        block = b"a" * (1024 * 1024)
        for _ in range(size // len(block)):
            out.write(block)
    source = source_for(path)
    total = 0
    pieces = 0
    tracemalloc.start()
    try:
        for piece in iter_text(source):
            assert len(piece) <= PIECE_CHARS
            total += len(piece)
            pieces += 1
            del piece
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == size
    assert pieces == 30  # hard cuts: there is no whitespace to cut at
    assert peak < 8 * 1024 * 1024, f"peak Python allocations {peak / 2**20:.1f} MiB"


def test_pieces_are_cut_at_whitespace(tmp_path):
    text = "".join(f"word{i} " for i in range(400_000))  # ~4.5 MB
    pieces = list(iter_text(source_for(write(tmp_path / "words.txt", text))))
    assert len(pieces) > 1
    assert "".join(pieces) == text
    assert all(len(piece) <= PIECE_CHARS for piece in pieces)
    assert all(piece.startswith(" ") for piece in pieces[1:])  # no word is split


def test_sha256_of_streams_raw_bytes(tmp_path):
    data = b"\xef\xbb\xbfhello\r\n" * 1000
    path = write(tmp_path / "a.txt", data)
    assert sha256_of(source_for(path)) == hashlib.sha256(data).hexdigest()
    assert sha256_of(Source("-", "stdin", None)) is None


# --------------------------------------------------------------------------- stdin


def test_stdin_stream():
    stdin = io.BytesIO(b"from a pipe\r\n")
    assert list(iter_text(Source("-", "stdin", None), stdin=stdin)) == ["from a pipe\n"]


def test_stdin_defaults_to_sys_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("piped ü".encode())))
    assert "".join(iter_text(Source("-", "stdin", None))) == "piped ü"


def test_empty_stdin():
    assert extract_error(Source("-", "stdin", None), stdin=io.BytesIO(b"")) == "empty input"


class ShortReads(io.RawIOBase):
    """A pipe-like stream: a few bytes per read, then optionally an I/O error."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.position, self.fail_after = data, 0, fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.position >= self.fail_after:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        block = self.data[self.position : self.position + 7]
        self.position += len(block)
        return block


def test_stdin_short_reads():
    text = "é short reads still decode 😀 " * 1000
    assert "".join(iter_text(Source("-", "stdin", None), stdin=ShortReads(text.encode()))) == text


def test_stdin_read_error():
    stdin = ShortReads(b"x" * 100_000, fail_after=20_000)
    assert extract_error(Source("-", "stdin", None), stdin=stdin) == "cannot read input: Input/output error"


# --------------------------------------------------------------------------- vanishing files


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
    monkeypatch.setattr(extract, "_open_regular", lambda _: ShortReads(b"y" * 100_000, fail_after=50_000))
    assert extract_error(source) == "cannot read file: Input/output error"


# --------------------------------------------------------------------------- HTML


HTML_PAGE = """<!doctype html>
<html><head><title>The title</title>
<style>p { color: red }</style>
<script>var s = "<p>not text</p>"; if (a < b) {}</script>
</head>
<body>
<h1>Head &amp; line</h1>
<p>First   para
graph.</p><p>Second<br>line</p>
<ul><li>one</li><li>two</li></ul>
<noscript>enable javascript</noscript><template><p>template text</p></template>
<div>a</div><div>b</div>
<pre>  keep
   this</pre>
<!-- a comment -->
</body></html>
"""


def test_html_visible_text(tmp_path):
    assert text_of(write(tmp_path / "page.html", HTML_PAGE)) == (
        "The title\n\nHead & line\n\nFirst para graph.\n\nSecond\nline\n\none\ntwo\n\na\nb\n\n  keep\n   this"
    )


def test_html_blank_lines_collapse(tmp_path):
    html = "<div>a</div>" + "<p></p><br><br><br>" * 50 + "<div>b</div>"
    assert text_of(write(tmp_path / "page.htm", html)) == "a\n\nb"


def test_html_with_only_scripts_and_styles(tmp_path):
    html = "<html><head><script>alert('hi')</script><style>body{}</style></head><body>\n \n</body></html>"
    assert extract_error(source_for(write(tmp_path / "app.html", html))) == (
        "no visible text in HTML (only scripts, styles or markup)"
    )


def test_html_is_streamed(tmp_path):
    paragraphs = [f"<p>paragraph {i} " + "lorem ipsum " * 20 + "</p>\n" for i in range(15_000)]  # ~4 MB
    pieces = list(iter_text(source_for(write(tmp_path / "big.html", "".join(paragraphs)))))
    assert len(pieces) > 1 and all(len(piece) <= PIECE_CHARS for piece in pieces)
    text = "".join(pieces)
    assert text.startswith("paragraph 0 lorem")
    assert text.endswith("paragraph 14999 " + "lorem ipsum " * 19 + "lorem ipsum")
    assert text.count("\n\n") == 14_999


def test_html_odd_markup_is_skipped(tmp_path):
    path = write(tmp_path / "odd.html", "<p>text</p><![bogus[ x ]]><a title='x>y' href=\"q\">link</a> 1 < 2 &amp")
    assert text_of(path) == "text\n\nlink 1 < 2 &"


def test_html_in_latin1(tmp_path):
    assert text_of(write(tmp_path / "a.html", "<p>café crème brûlée</p>".encode("latin-1"))) == "café crème brûlée"


def test_html_utf16(tmp_path):
    data = "<p>héllo</p>".encode("utf-16")
    assert text_of(write(tmp_path / "a.html", data)) == "héllo"


# --------------------------------------------------------------------------- PDF


def test_pdf_pages_joined_by_blank_line(tmp_path):
    path = write(tmp_path / "doc.pdf", make_pdf([text_page("Hello world"), None, text_page("Page three")]))
    assert list(iter_text(source_for(path))) == ["Hello world", "\n\nPage three"]


def test_pdf_without_text_layer(tmp_path):
    path = write(tmp_path / "scan.pdf", make_pdf([None, None]))
    assert extract_error(source_for(path)) == "no extractable text (scanned PDF?)"


def test_pdf_encrypted_with_password(tmp_path):
    path = write(tmp_path / "locked.pdf", encrypt_pdf(make_pdf([text_page("secret")]), user_password="pw"))
    assert extract_error(source_for(path)) == "PDF is encrypted (password protected)"


def test_pdf_encrypted_with_empty_user_password_is_read(tmp_path):
    # Permission-only encryption: any reader opens it without a password.
    path = write(tmp_path / "restricted.pdf", encrypt_pdf(make_pdf([text_page("open text")]), user_password=""))
    assert text_of(path) == "open text"


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_pdf_truncated(tmp_path, keep):
    data = make_pdf([text_page("Hello"), text_page("World")])
    path = write(tmp_path / "cut.pdf", data[: int(len(data) * keep)])
    assert extract_error(source_for(path)).startswith("corrupt or truncated PDF: ")


def test_pdf_that_is_not_a_pdf(tmp_path):
    assert text_of(write(tmp_path / "fake.pdf", "just text")) == "just text"
    junk = write(tmp_path / "junk.pdf", bytes(range(256)) * 4)
    assert extract_error(source_for(junk)).startswith("corrupt or truncated PDF")


def test_pdf_bad_page_is_skipped(tmp_path, caplog):
    path = write(tmp_path / "mixed.pdf", make_pdf([text_page("good one"), BROKEN_PAGE, text_page("good two")]))
    with caplog.at_level(logging.WARNING, logger="memcli.ingest.extract"):
        assert text_of(path) == "good one\n\ngood two"
    assert "skipping unreadable page 2" in caplog.text


def test_pdf_all_pages_bad(tmp_path):
    path = write(tmp_path / "broken.pdf", make_pdf([BROKEN_PAGE, BROKEN_PAGE]))
    assert extract_error(source_for(path)).startswith("no page of the PDF could be read (first error: ")


def test_pdf_without_pages(tmp_path):
    out = io.BytesIO()
    pypdf.PdfWriter().write(out)
    assert extract_error(source_for(write(tmp_path / "none.pdf", out.getvalue()))) == "PDF has no pages"


def test_empty_pdf_file(tmp_path):
    assert extract_error(source_for(write(tmp_path / "zero.pdf", b""))) == "empty file"


def test_extract_error_is_always_one_line():
    assert str(ExtractError("bad\nthing\r\n  happened")) == "bad thing happened"


# --------------------------------------------------------------------------- fuzzing


SAMPLE_PDF = make_pdf([text_page("Hello"), BROKEN_PAGE, None, text_page("World")])


def _mutate(edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(SAMPLE_PDF[:cut])
    for position, value in edits:
        if position < len(data):
            data[position] = value
    return bytes(data)


_HTML_TOKENS = ["<p>", "</p>", "<script>", "</script>", "<style>", "<br/>", "<!--", "-->", "&amp;", "&#", "&#x110000;",
                "<![CDATA[", "]]>", "<!doctype", "<?", "<a href='", "'>", "<", ">", "text", " ", "\n", "é", "\x00",
                "</", "<noscript>", "<pre>", "<template>", "=", '"', "<![x["]  # fmt: skip

_TEXT_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=3000).map(lambda text: text.encode("utf-8")),
    st.text(max_size=500).map(lambda text: text.encode("utf-16")),
)
_HTML_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.sampled_from(_HTML_TOKENS), max_size=200).map(lambda tokens: "".join(tokens).encode("utf-8")),
)
_PDF_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        _mutate,
        st.lists(st.tuples(st.integers(0, len(SAMPLE_PDF) - 1), st.integers(0, 255)), max_size=6),
        st.one_of(st.just(len(SAMPLE_PDF)), st.integers(0, len(SAMPLE_PDF))),  # mostly uncut: reach page parsing
    ),
)


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.one_of(st.tuples(st.just(".txt"), _TEXT_BYTES), st.tuples(st.just(".html"), _HTML_BYTES),
                      st.tuples(st.just(".pdf"), _PDF_BYTES)))  # fmt: skip
def test_arbitrary_bytes_yield_text_or_extract_error(fuzz_dir, case):
    suffix, data = case
    path = write(fuzz_dir / f"fuzz{suffix}", data)
    try:
        for piece in iter_text(source_for(path)):
            assert isinstance(piece, str) and piece
            assert len(piece) <= PIECE_CHARS
            assert "\x00" not in piece and "\r" not in piece
    except ExtractError as error:
        assert str(error) and "\n" not in str(error)


# --------------------------------------------------------------------------- gzip, man pages, bounds (issue 13)

MAN_PAGE = b""".TH FOO 1
.SH NAME
foo \\- does things
.SH DESCRIPTION
\\fBfoo\\fR is a \\fIgood\\fP tool.
"""


def test_gzip_text_is_read(tmp_path):
    import gzip

    path = write(tmp_path / "changelog.gz", gzip.compress(b"version 2: fixed the parser\n" * 50))
    source = source_for(path)
    assert source.compressed and source.kind == "text"
    assert text_of(path) == "version 2: fixed the parser\n" * 50
    packed = gzip.compress(" ".join(str(i * 7919 % 100_003) for i in range(20_000)).encode())
    broken = write(tmp_path / "cut.txt.gz", packed[: len(packed) // 2])
    assert "gzip" in extract_error(source_for(broken))


@pytest.mark.skipif(extract.man_renderer() is None, reason="neither mandoc nor groff is installed")
def test_man_pages_are_rendered(tmp_path):
    import gzip

    for path in (write(tmp_path / "foo.1", MAN_PAGE), write(tmp_path / "man1" / "foo.1.gz", gzip.compress(MAN_PAGE))):
        source = source_for(path)
        assert source.kind == "man"
        text = text_of(path)
        assert "NAME" in text and "foo - does things" in text and "foo is a good tool." in text
        assert "\x08" not in text and "\x1b" not in text and ".TH" not in text


def test_man_page_without_renderer_is_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(extract.shutil, "which", lambda name: None)
    message = extract_error(source_for(write(tmp_path / "foo.1", MAN_PAGE)))
    assert "no renderer" in message and "--type text" in message


_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
from memcli.ingest.extract import discover, iter_text
[source] = discover([sys.argv[1]])
total = sum(len(piece) for piece in iter_text(source))
print(total)
"""


def _extract_bounded(path: Path, mem: int = 400 << 20, cpu: int = 120) -> int:
    """Extract in a child process under an address-space and CPU-time limit; returns the text length.

    The bounds are far above what linear extraction needs (a few seconds, tens of MB) and far below
    what the quadratic behaviour of issue 13 item 21 took (over 5 minutes, 1.4 GiB)."""
    import subprocess

    from .support import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _BOUNDED.format(mem=mem, cpu=cpu), str(path)], env=env,
                          capture_output=True, text=True, timeout=cpu * 3)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout)


def test_pathological_html_extracts_in_bounded_time_and_memory(tmp_path):
    """Item 21: one 8 MB tag of ~2M attributes (some quoted), then text; and 4 MB of '<' signs."""
    attributes = " ".join(f'a{i}="{i}"' if i % 2 else f"b{i}={i}" for i in range(1_000_000))
    path = write(tmp_path / "tag.html", "<p>before</p><div " + attributes + ">after</div>")
    assert path.stat().st_size > 8_000_000
    assert _extract_bounded(path) == len("before\n\nafter")
    signs = write(tmp_path / "signs.html", "<p>" + "< " * 2_000_000 + "</p>")
    assert _extract_bounded(signs) == len("< " * 2_000_000) - 1
    comments = write(tmp_path / "comment.html", "<!--" + "-" * 4_000_000 + "<p>x")
    with pytest.raises(AssertionError, match="no visible text"):
        _extract_bounded(comments)


def test_pathological_text_extracts_in_bounded_time_and_memory(tmp_path):
    """A 64 MB single line without whitespace, and 16 MB of control-free latin-1 on one line."""
    line = write(tmp_path / "line.txt", b"x" * (64 << 20))
    assert _extract_bounded(line) == 64 << 20
    latin = write(tmp_path / "latin.txt", "é".encode("latin-1") * (16 << 20))
    assert _extract_bounded(latin) == 16 << 20
