"""HTML: the visible text, laid out, streamed, linear in the input whatever the markup."""

from __future__ import annotations

import pytest

from memcli.ingest.extract import PIECE_CHARS, iter_text

from .documents import extract_bounded, extract_error, source_for, text_of, write


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


def test_pathological_html_extracts_in_bounded_time_and_memory(tmp_path):
    """Item 21: one 8 MB tag of ~2M attributes (some quoted), then text; and 4 MB of '<' signs."""
    attributes = " ".join(f'a{i}="{i}"' if i % 2 else f"b{i}={i}" for i in range(1_000_000))
    path = write(tmp_path / "tag.html", "<p>before</p><div " + attributes + ">after</div>")
    assert path.stat().st_size > 8_000_000
    assert extract_bounded(path) == len("before\n\nafter")
    signs = write(tmp_path / "signs.html", "<p>" + "< " * 2_000_000 + "</p>")
    assert extract_bounded(signs) == len("< " * 2_000_000) - 1
    comments = write(tmp_path / "comment.html", "<!--" + "-" * 4_000_000 + "<p>x")
    with pytest.raises(AssertionError, match="no visible text"):
        extract_bounded(comments)
