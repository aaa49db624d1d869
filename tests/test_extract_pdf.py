"""PDF: pages joined, damaged, encrypted or empty files, a bad page skipped and logged."""

from __future__ import annotations

import io
import logging

import pypdf
import pytest

from memcli.ingest.discover import Source
from memcli.ingest.extract import iter_text

from .documents import BROKEN_PAGE, encrypt_pdf, extract_error, make_pdf, source_for, text_of, text_page, write


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
    with caplog.at_level(logging.WARNING, logger="memcli.ingest.extract.pdf"):
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


def test_a_bad_page_is_logged_under_the_source_name(tmp_path, caplog):
    """A copy read for a client (a server's upload) is logged by the client's name, not the copy's."""
    copy = write(tmp_path / "upload" / "0" / "mixed.pdf", make_pdf([text_page("good one"), BROKEN_PAGE]))
    with caplog.at_level(logging.WARNING, logger="memcli.ingest.extract.pdf"):
        assert "".join(iter_text(Source.from_file(copy, name="/home/ann/mixed.pdf"))) == "good one"
    assert "'/home/ann/mixed.pdf': skipping unreadable page 2" in caplog.text and str(copy) not in caplog.text
