"""What a file is, from its content: kinds, binary sniffing, BOMs and detected encodings; --type and
--encoding."""

from __future__ import annotations

import codecs

import pytest

from memcli.ingest.discover import discover
from memcli.ingest.extract.detect import SUPPORTED_SUFFIXES

from .documents import extract_error, make_pdf, source_for, text_of, text_of_source, text_page, write


def test_supported_suffixes():
    assert set(SUPPORTED_SUFFIXES) == {".pdf", ".txt", ".md", ".markdown", ".html", ".htm"}


def test_kind_comes_from_content_not_the_name(tmp_path):
    """Item 10 of issue 13: a Markdown file named .pdf is text; a real PDF named .txt is a PDF."""
    fake = write(tmp_path / "notes.pdf", "# Notes\n\nThe launch is on Monday.\n")
    [source] = discover([str(fake)])
    assert source.kind == "text" and text_of(fake).startswith("# Notes")
    real = write(tmp_path / "paper.txt", make_pdf([text_page("Hello world")]))
    assert source_for(real).kind == "pdf" and text_of(real) == "Hello world"
    page = write(tmp_path / "page", "<!DOCTYPE html><p>Hi &amp; bye</p>")
    assert source_for(page).kind == "html" and text_of(page) == "Hi & bye"


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


def test_binary_file_named_txt(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256)) * 4
    assert "binary content" in extract_error(source_for(write(tmp_path / "image.txt", png)))


def test_control_characters_without_nul_are_binary(tmp_path):
    data = bytes([1, 2, 3, 4, 5, 6, 7, 14, 15, 16]) * 100 + b"some text" * 50
    assert "binary content (many control characters)" in extract_error(source_for(write(tmp_path / "a.md", data)))


def test_text_with_tabs_and_escape_codes_is_not_binary(tmp_path):
    log = "\x1b[32mOK\x1b[0m\tstep\n" * 200
    assert text_of(write(tmp_path / "log.txt", log)) == log
