"""Man pages: rendered by mandoc or groff, or skipped with the reason when neither is installed."""

from __future__ import annotations

import shutil

import pytest

from memcli.ingest.extract.man import man_renderer

from .documents import extract_error, source_for, text_of, write


MAN_PAGE = b""".TH FOO 1
.SH NAME
foo \\- does things
.SH DESCRIPTION
\\fBfoo\\fR is a \\fIgood\\fP tool.
"""


@pytest.mark.skipif(man_renderer() is None, reason="neither mandoc nor groff is installed")
def test_man_pages_are_rendered(tmp_path):
    import gzip

    for path in (write(tmp_path / "foo.1", MAN_PAGE), write(tmp_path / "man1" / "foo.1.gz", gzip.compress(MAN_PAGE))):
        source = source_for(path)
        assert source.kind == "man"
        text = text_of(path)
        assert "NAME" in text and "foo - does things" in text and "foo is a good tool." in text
        assert "\x08" not in text and "\x1b" not in text and ".TH" not in text


def test_man_page_without_renderer_is_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    message = extract_error(source_for(write(tmp_path / "foo.1", MAN_PAGE)))
    assert "no renderer" in message and "--type text" in message
