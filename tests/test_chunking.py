from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcli.chunking import MIN_CHUNK_TOKENS, ChunkingError, chunk_token_ids, encode_pieces


def ids(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


def test_min_chunk_tokens_is_the_model_card_minimum():
    assert MIN_CHUNK_TOKENS == 16


def test_exact_multiple_gives_only_full_chunks():
    chunks = list(chunk_token_ids([ids(0, 1024)], chunk_tokens=512))
    assert chunks == [ids(0, 512), ids(512, 1024)]


def test_chunk_boundaries_ignore_piece_boundaries():
    pieces = [ids(0, 3), ids(3, 40), [], ids(40, 41), ids(41, 100)]
    chunks = list(chunk_token_ids(pieces, chunk_tokens=32))
    assert chunks == [ids(0, 32), ids(32, 64), ids(64, 96), ids(68, 100)]


def test_long_tail_is_its_own_shorter_chunk():
    chunks = list(chunk_token_ids([ids(0, 512 + 16)], chunk_tokens=512))
    assert chunks == [ids(0, 512), ids(512, 528)]


def test_short_tail_overlaps_previous_chunk():
    # 512 + 5: the 5-token tail must not go in alone, so the last chunk is the last 512 ids.
    chunks = list(chunk_token_ids([ids(0, 517)], chunk_tokens=512))
    assert chunks == [ids(0, 512), ids(5, 517)]


def test_short_tail_after_several_chunks_overlaps_only_the_last():
    chunks = list(chunk_token_ids([ids(0, 40)], chunk_tokens=16))
    assert chunks == [ids(0, 16), ids(16, 32), ids(24, 40)]


def test_text_shorter_than_a_chunk_but_long_enough_is_one_chunk():
    assert list(chunk_token_ids([ids(0, 16)], chunk_tokens=512)) == [ids(0, 16)]
    assert list(chunk_token_ids([ids(0, 300)], chunk_tokens=512)) == [ids(0, 300)]


@pytest.mark.parametrize("length", [0, 1, 15])
def test_text_under_minimum_raises(length):
    with pytest.raises(ChunkingError, match=f"text is only {length} tokens; at least 16 are needed"):
        list(chunk_token_ids([ids(0, length)], chunk_tokens=512))


def test_chunking_error_is_a_value_error():
    assert issubclass(ChunkingError, ValueError)


@pytest.mark.parametrize("chunk_tokens", [0, -1, 15])
def test_chunk_tokens_below_minimum_raises_at_call_time(chunk_tokens):
    with pytest.raises(ValueError, match="^--chunk-tokens must be at least 16$"):
        chunk_token_ids([ids(0, 100)], chunk_tokens=chunk_tokens)  # not iterated: eager check


@pytest.mark.parametrize("chunk_tokens", [16.0, "512", True])
def test_chunk_tokens_must_be_an_int(chunk_tokens):
    with pytest.raises(ValueError, match="--chunk-tokens must be an integer"):
        chunk_token_ids([ids(0, 100)], chunk_tokens=chunk_tokens)


def test_chunk_tokens_equal_to_minimum_is_allowed():
    assert list(chunk_token_ids([ids(0, 20)], chunk_tokens=16)) == [ids(0, 16), ids(4, 20)]


def test_custom_min_tokens():
    assert list(chunk_token_ids([ids(0, 10)], chunk_tokens=8, min_tokens=4)) == [ids(0, 8), ids(2, 10)]
    with pytest.raises(ChunkingError, match="at least 4"):
        list(chunk_token_ids([ids(0, 3)], chunk_tokens=8, min_tokens=4))


def test_streaming_consumes_input_lazily():
    consumed = 0

    def pieces():
        nonlocal consumed
        for index in range(10_000):
            consumed += 1
            yield [index] * 10

    chunks = chunk_token_ids(pieces(), chunk_tokens=100)
    assert consumed == 0
    first = next(chunks)
    # The first chunk is held back until the second is complete (tail lookahead), so about
    # two chunks' worth of pieces have been read, not all 10,000.
    assert first == [i for i in range(10) for _ in range(10)]
    assert consumed <= 21
    rest = list(chunks)
    assert consumed == 10_000
    assert len(rest) == 999 and all(len(chunk) == 100 for chunk in rest)


def test_huge_single_piece_is_chunked_without_quadratic_slowdown():
    length = 512 * 4000 + 5
    chunks = list(chunk_token_ids([list(range(length))], chunk_tokens=512))
    assert len(chunks) == 4001 and all(len(chunk) == 512 for chunk in chunks)
    assert chunks[-1] == ids(length - 512, length)  # the 5-token tail overlaps


def test_tuples_and_ranges_are_accepted_as_pieces():
    assert list(chunk_token_ids([range(10), (10, 11, 12, 13, 14, 15)], chunk_tokens=16)) == [ids(0, 16)]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 90), max_size=12),
    chunk_tokens=st.integers(16, 64),
)
def test_chunk_invariants(lengths, chunk_tokens):
    total = sum(lengths)
    pieces, start = [], 0
    for length in lengths:
        pieces.append(ids(start, start + length))
        start += length
    text = ids(0, total)
    if total < MIN_CHUNK_TOKENS:
        with pytest.raises(ChunkingError):
            list(chunk_token_ids(pieces, chunk_tokens))
        return
    chunks = list(chunk_token_ids(pieces, chunk_tokens))
    assert all(MIN_CHUNK_TOKENS <= len(chunk) <= chunk_tokens for chunk in chunks)
    assert all(len(chunk) == chunk_tokens for chunk in chunks[:-1])
    # Each chunk is a contiguous window of the text; together they cover it in order.
    for chunk in chunks:
        assert chunk == text[chunk[0] : chunk[0] + len(chunk)]
    assert chunks[0][0] == 0 and chunks[-1][-1] == total - 1
    covered = set(itertools.chain.from_iterable(chunks))
    assert covered == set(text)


def test_encode_pieces_encodes_each_piece_independently():
    calls = []

    def encode(text: str) -> tuple[int, ...]:
        calls.append(text)
        return tuple(ord(char) for char in text)

    result = encode_pieces(iter(["ab", " c", ""]), encode)
    assert calls == []  # lazy
    assert list(result) == [[97, 98], [32, 99], []]
    assert calls == ["ab", " c", ""]


def test_encode_then_chunk_pipeline():
    text_pieces = ["word " * 50, "more " * 3]
    chunks = list(chunk_token_ids(encode_pieces(text_pieces, lambda t: [ord(c) for c in t]), chunk_tokens=64))
    flat = [ord(c) for c in "".join(text_pieces)]
    assert chunks[0] == flat[:64]
    assert chunks[-1] == flat[-len(chunks[-1]) :]
