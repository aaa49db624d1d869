from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcli.loading.catalog import CARD_MIN_CHUNK_TOKENS as MIN_CHUNK_TOKENS
from memcli.ingest.chunking import ChunkingError, Packed, Packer, chunk_token_ids, encode_pieces, share_rows


def ids(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


def test_min_chunk_tokens_is_the_model_card_minimum():
    assert MIN_CHUNK_TOKENS == 16
    assert list(chunk_token_ids([ids(0, 20)], chunk_tokens=512)) == [ids(0, 20)]  # the default minimum


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


# --------------------------------------------------------------------------- packing short texts
def pack_all(texts: dict[str, list[int]], chunk_tokens: int, min_tokens: int, previous: Packed | None = None):
    packer = Packer(chunk_tokens, min_tokens)
    chunks = [c for owner, t in texts.items() for c in packer.add(owner, t)]
    last = packer.finish(chunks[-1] if chunks else previous)  # the chunk injected just before
    return chunks + ([last] if last is not None else []), packer.left


def test_whole_texts_fill_a_chunk_and_a_full_chunk_is_given_at_once():
    packer = Packer(20, 20)
    assert packer.add("a", ids(0, 5)) == [] and packer.add("b", ids(5, 10)) == []
    assert packer.add("c", ids(10, 15)) == []
    [full] = packer.add("d", ids(15, 20))
    assert full.ids == ids(0, 20) and full.pieces == [("a", 5), ("b", 5), ("c", 5), ("d", 5)]
    assert full.complete == ["a", "b", "c", "d"] and full.borrowed == 0
    assert packer.pending == []


def test_twenty_five_token_notes_make_five_tiny_chunks():
    notes = {f"n{i}": ids(5 * i, 5 * i + 5) for i in range(20)}
    chunks, left = pack_all(notes, 20, 20)
    assert [c.ids for c in chunks] == [ids(20 * k, 20 * k + 20) for k in range(5)] and left == []
    assert [owner for c in chunks for owner in c.complete] == list(notes)


def test_a_text_that_does_not_fit_starts_the_next_chunk_when_the_chunk_has_the_minimum():
    notes = {"a": ids(0, 10), "b": ids(10, 20), "c": ids(20, 32)}  # 10 + 10 + 12 > 30
    chunks, left = pack_all(notes, 30, 8)
    assert [c.pieces for c in chunks] == [[("a", 10), ("b", 10)], [("c", 12)]] and left == []


def test_a_chunk_below_the_minimum_is_filled_up_with_the_start_of_the_next_text():
    # memcli-tiny's case (chunk = minimum = 20): 6-token texts are cut at chunk boundaries
    notes = {k: ids(6 * i, 6 * i + 6) for i, k in enumerate("abcd")}
    chunks, left = pack_all(notes, 20, 20)
    first, last = chunks
    assert first.ids == ids(0, 20) and first.pieces == [("a", 6), ("b", 6), ("c", 6), ("d", 2)]
    assert first.complete == ["a", "b", "c"]  # d goes on in the next chunk
    # 4 ids of d are left: the last chunk borrows the first chunk's last 16 ids as context
    assert last.ids == ids(4, 24) and last.borrowed == 16
    assert last.pieces == [("a", 2), ("b", 6), ("c", 6), ("d", 2), ("d", 4)] and last.complete == ["d"] and left == []


def test_a_short_rest_borrows_from_the_chunk_injected_before_it():
    previous = Packed(ids=ids(100, 120), pieces=[("file", 20)])
    chunks, left = pack_all({"a": ids(0, 5)}, 20, 20, previous)
    [only] = chunks
    assert only.ids == ids(105, 120) + ids(0, 5) and only.pieces == [("file", 15), ("a", 5)]
    assert only.borrowed == 15 and only.complete == ["a"]


def test_short_texts_are_refused_only_when_nothing_can_be_packed_with_them():
    chunks, left = pack_all({"a": ids(0, 5), "b": ids(5, 9)}, 512, 16)
    assert chunks == [] and left == ["a", "b"]
    chunks, left = pack_all({"a": ids(0, 9), "b": ids(9, 18)}, 512, 16)  # together they have the minimum
    assert [c.ids for c in chunks] == [ids(0, 18)] and left == []


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 19), min_size=1, max_size=40), chunk_tokens=st.integers(20, 64),
       min_tokens=st.integers(1, 20), previous=st.booleans())
def test_packing_invariants(lengths, chunk_tokens, min_tokens, previous):
    texts, start = {}, 0
    for i, length in enumerate(lengths):
        texts[i] = ids(start, start + length)
        start += length
    before = Packed(ids=ids(1000, 1000 + chunk_tokens), pieces=[("before", chunk_tokens)]) if previous else None
    chunks, left = pack_all(texts, chunk_tokens, min_tokens, before)
    if left:
        assert not previous and sum(lengths) < min_tokens and not chunks and left == list(texts)
        return
    assert all(min_tokens <= len(c.ids) <= chunk_tokens for c in chunks)
    for c in chunks:
        assert sum(t for _, t in c.pieces) == len(c.ids)
    # every text's ids go in once, in order (borrowed ids aside), and every text is completed once
    fresh = [i for c in chunks for i in c.ids[c.borrowed:]]
    assert fresh == ids(0, start)
    assert sorted(o for c in chunks for o in c.complete) == list(texts)


def test_rows_are_shared_by_tokens_in_order_and_no_piece_goes_without():
    assert share_rows([("a", 5), ("b", 5), ("c", 5), ("d", 5)], 20) == [5, 5, 5, 5]
    assert share_rows([("a", 15), ("b", 5)], 20) == [15, 5]
    assert share_rows([("a", 500), ("b", 12)], 256) == [250, 6]
    assert share_rows([("a", 510), ("b", 1), ("c", 1)], 256) == [254, 1, 1]
    assert share_rows([("a", 1), ("b", 1), ("c", 1)], 2) == [1, 1, 0]  # fewer rows than pieces
    with pytest.raises(ValueError):
        share_rows([], 20)


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(1, 600), min_size=1, max_size=50), rows=st.integers(1, 300))
def test_share_rows_gives_out_every_row(tokens, rows):
    counts = share_rows([(i, t) for i, t in enumerate(tokens)], rows)
    assert sum(counts) == rows and all(c >= 0 for c in counts)
    if rows >= len(tokens):
        assert all(c >= 1 for c in counts)
