"""The extraction package's promise for every format: text, or one ExtractError of one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memcli.ingest.extract import PIECE_CHARS, ExtractError, iter_text

from .documents import BROKEN_PAGE, make_pdf, source_for, text_page, write


def test_extract_error_is_always_one_line():
    assert str(ExtractError("bad\nthing\r\n  happened")) == "bad thing happened"


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
