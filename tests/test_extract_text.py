"""Plain text and stdin: decoding across read blocks, newlines, error offsets, pieces cut at
whitespace, bounded memory; gzip."""

from __future__ import annotations

import io
import sys
import tracemalloc

from memcli.ingest.discover import Source, discover
from memcli.ingest.extract import PIECE_CHARS, iter_text
from memcli.ingest.extract.detect import SNIFF_BYTES

from .documents import ShortReads, extract_bounded, extract_error, source_for, text_of, text_of_source, write


def test_text_and_markdown_pass_through(tmp_path):
    body = "# Title\n\n* item with `code` and <b>tags</b>\n\tindented é ü 😀\n"
    assert text_of(write(tmp_path / "a.md", body)) == body
    assert text_of(write(tmp_path / "a.txt", body)) == body


def test_newlines_are_normalised_and_nuls_removed(tmp_path):
    path = write(tmp_path / "a.txt", b"one\r\ntwo\rthree\n" + b"x" * 9000 + b"\x00tail")
    assert text_of(path) == "one\ntwo\nthree\n" + "x" * 9000 + "tail"


def test_crlf_split_across_read_blocks(tmp_path):
    # The first read is SNIFF_BYTES long, so the "\r" ends one block and "\n" opens the next.
    data = b"a" * (SNIFF_BYTES - 1) + b"\r\n" + b"b" * 100
    assert text_of(write(tmp_path / "a.txt", data)) == "a" * (SNIFF_BYTES - 1) + "\n" + "b" * 100


def test_multibyte_character_split_across_read_blocks(tmp_path):
    data = b"a" * (SNIFF_BYTES - 1) + "é€😀".encode() * 3
    assert text_of(write(tmp_path / "a.txt", data)) == data.decode()


def test_invalid_utf8_far_into_a_file_names_the_byte_offset_and_encoding_option(tmp_path):
    far = write(tmp_path / "far.txt", b"a" * 100_000 + b"\xe9t\xe9")  # latin-1 "été" after 100 kB of ASCII
    message = extract_error(source_for(far))
    assert "invalid UTF-8 at byte 100000" in message and "--encoding" in message
    [forced] = discover([str(far)], encoding="latin-1")
    assert text_of_source(forced).endswith("été")


def test_invalid_sequence_across_read_block_reports_its_start(tmp_path):
    # "\xc3" begins a 2-byte sequence at the end of the first block; "(" does not continue it.
    data = b"a" * (SNIFF_BYTES - 1) + b"\xc3(" + b"b" * 10
    assert f"at byte {SNIFF_BYTES - 1};" in extract_error(source_for(write(tmp_path / "a.txt", data)))


def test_truncated_character_at_end_of_file(tmp_path):
    message = extract_error(source_for(write(tmp_path / "a.txt", b"price: 5 \xe2\x82")))
    assert message == "invalid UTF-8: incomplete character at end of file (byte 9)"


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


def test_stdin_stream():
    stdin = io.BytesIO(b"from a pipe\r\n")
    assert list(iter_text(Source("-", "stdin", None), stdin=stdin)) == ["from a pipe\n"]


def test_stdin_defaults_to_sys_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("piped ü".encode())))
    assert "".join(iter_text(Source("-", "stdin", None))) == "piped ü"


def test_empty_stdin():
    assert extract_error(Source("-", "stdin", None), stdin=io.BytesIO(b"")) == "empty input"


def test_stdin_short_reads():
    text = "é short reads still decode 😀 " * 1000
    assert "".join(iter_text(Source("-", "stdin", None), stdin=ShortReads(text.encode()))) == text


def test_stdin_read_error():
    stdin = ShortReads(b"x" * 100_000, fail_after=20_000)
    assert extract_error(Source("-", "stdin", None), stdin=stdin) == "cannot read input: Input/output error"


def test_gzip_text_is_read(tmp_path):
    import gzip

    path = write(tmp_path / "changelog.gz", gzip.compress(b"version 2: fixed the parser\n" * 50))
    source = source_for(path)
    assert source.compressed and source.kind == "text"
    assert text_of(path) == "version 2: fixed the parser\n" * 50
    packed = gzip.compress(" ".join(str(i * 7919 % 100_003) for i in range(20_000)).encode())
    broken = write(tmp_path / "cut.txt.gz", packed[: len(packed) // 2])
    assert "gzip" in extract_error(source_for(broken))


def test_pathological_text_extracts_in_bounded_time_and_memory(tmp_path):
    """A 64 MB single line without whitespace, and 16 MB of control-free latin-1 on one line."""
    line = write(tmp_path / "line.txt", b"x" * (64 << 20))
    assert extract_bounded(line) == 64 << 20
    latin = write(tmp_path / "latin.txt", "é".encode("latin-1") * (16 << 20))
    assert extract_bounded(latin) == 16 << 20
