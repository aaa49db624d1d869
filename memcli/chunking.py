"""Cut a document's token stream into the chunks that are injected into memory.

Every chunk but the last has exactly `chunk_tokens` ids. The last one follows the tail
rule:

* A tail of at least `MIN_CHUNK_TOKENS` ids is a chunk of its own, just shorter.
* A shorter tail never goes in alone. The MemoryLLM model card says contexts of fewer than
  16 tokens disturb the memory (16 was the hard minimum in training), so instead the last
  chunk becomes the last `chunk_tokens` ids of the text: it overlaps the chunk before it
  and ends with the tail. Dropping the tail would lose text; this way nothing is lost, no
  chunk is shorter than the minimum and none longer than `chunk_tokens`. The price is
  that the overlapped ids are injected twice, at most `chunk_tokens - 1` of them once per
  document.
* A whole text shorter than the minimum cannot be injected at all: ChunkingError.

Chunking streams: it holds the chunk it last completed back until it knows whether a
short tail must borrow from it, so at most about two chunks of ids are held at once
(besides the piece being read).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

MIN_CHUNK_TOKENS = 16


class ChunkingError(ValueError):
    """A text that cannot be cut into chunks (it is too short to inject)."""


def chunk_token_ids(
    pieces: Iterable[Sequence[int]],
    chunk_tokens: int = 512,
    min_tokens: int = MIN_CHUNK_TOKENS,
) -> Iterator[list[int]]:
    """Yield chunks of `chunk_tokens` ids from `pieces` (token id lists, in order).

    See the module docstring for the rule on the last chunk. Arguments are checked at
    once (ValueError); ChunkingError comes when the input runs out too short.
    """
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a positive integer, not {min_tokens!r}")
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool):
        raise ValueError(f"--chunk-tokens must be an integer, not {chunk_tokens!r}")
    if chunk_tokens < min_tokens:
        raise ValueError(f"--chunk-tokens must be at least {min_tokens}")
    # The checks above run at call time; the generator below runs only when iterated.
    return _chunks(pieces, chunk_tokens, min_tokens)


def _chunks(pieces: Iterable[Sequence[int]], size: int, min_tokens: int) -> Iterator[list[int]]:
    held: list[int] | None = None  # last full chunk, not yet yielded: a short tail may need it
    partial: list[int] = []  # ids after `held`, always fewer than `size`
    for piece in pieces:
        position = 0
        while position < len(piece):
            take = min(size - len(partial), len(piece) - position)
            partial.extend(piece[position : position + take])
            position += take
            if len(partial) == size:
                if held is not None:
                    yield held
                held, partial = partial, []

    if held is None:
        if len(partial) < min_tokens:
            raise ChunkingError(f"text is only {len(partial)} tokens; at least {min_tokens} are needed")
        yield partial
        return
    yield held
    if not partial:
        return
    if len(partial) >= min_tokens:
        yield partial
    else:
        yield (held + partial)[-size:]


def encode_pieces(texts: Iterable[str], encode: Callable[[str], Sequence[int]]) -> Iterator[list[int]]:
    """Tokenize each text piece on its own and yield the id lists.

    `encode` must not add special tokens (no BOS/EOS), or every piece would carry them.
    Pieces from `extract.iter_text` are cut at whitespace, so encoding them one by one
    gives (nearly) the tokens of the whole text.
    """
    for text in texts:
        yield list(encode(text))
