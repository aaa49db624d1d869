"""Cut a document's token stream into the chunks that are injected into memory.

Every chunk but the last has exactly `chunk_tokens` ids. The last one follows the tail
rule:

* A tail of at least the minimum ids is a chunk of its own, just shorter.
* A shorter tail never goes in alone. The MemoryLLM model card says contexts of fewer than
  16 tokens disturb the memory (16 was the hard minimum in training), so instead the last
  chunk becomes the last `chunk_tokens` ids of the text: it overlaps the chunk before it
  and ends with the tail. Dropping the tail would lose text; this way nothing is lost, no
  chunk is shorter than the minimum and none longer than `chunk_tokens`. The price is
  that the overlapped ids are injected twice, at most `chunk_tokens - 1` of them once per
  document.
* A whole text shorter than the minimum cannot be injected alone: ChunkingError. `Packer` packs
  such short texts of one inject run together instead (below).

The minimum and the chunk size are the model's (`LoadedModel.min_chunk_tokens`, `chunk_tokens`):
the published checkpoints' 16 from their model card, memcli-tiny's 20 from its training.

Chunking streams: it holds the chunk it last completed back until it knows whether a
short tail must borrow from it, so at most about two chunks of ids are held at once
(besides the piece being read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Sequence

from memcli.base.errors import MemcliError
from memcli.loading.catalog import CARD_MIN_CHUNK_TOKENS


class ChunkingError(MemcliError, ValueError):
    """A text that cannot be cut into chunks (it is too short to inject): exit 1, HTTP 400."""


def chunk_token_ids(
    pieces: Iterable[Sequence[int]],
    chunk_tokens: int = 512,
    min_tokens: int = CARD_MIN_CHUNK_TOKENS,
) -> Iterator[list[int]]:
    """Yield chunks of `chunk_tokens` ids from `pieces` (token id lists, in order).

    See the module docstring for the rule on the last chunk. Arguments are checked at
    once (ValueError); ChunkingError comes when the input runs out too short.
    """
    _check_sizes(chunk_tokens, min_tokens)
    # The checks above run at call time; the generator below runs only when iterated.
    return _chunks(pieces, chunk_tokens, min_tokens)


def _check_sizes(chunk_tokens: int, min_tokens: int) -> None:
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a positive integer, not {min_tokens!r}")
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool):
        raise ValueError(f"--chunk-tokens must be an integer, not {chunk_tokens!r}")
    if chunk_tokens < min_tokens:
        raise ValueError(f"--chunk-tokens must be at least {min_tokens}")


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


# --------------------------------------------------------------------------- packing short texts
@dataclass
class Packed:
    """One chunk made of several texts: its ids and, in order, whose they are: (owner, tokens).

    `complete` lists the owners whose last token is in this chunk. In the chunk that ends a run's
    packing, the first pieces may be *borrowed*: tokens of the chunk injected just before it, read
    again as context (their owners are that chunk's)."""

    ids: list[int] = field(default_factory=list)
    pieces: list[tuple[Hashable, int]] = field(default_factory=list)
    complete: list[Hashable] = field(default_factory=list)
    borrowed: int = 0  # how many of the first ids are borrowed


class Packer:
    """Texts shorter than the minimum, packed into chunks of at most `chunk_tokens` ids.

    Whole texts go into a chunk while they fit; a chunk is given out as soon as it is full, or when
    the next text does not fit and it holds at least `min_tokens` ids. A chunk that would stay
    below the minimum is filled up with the start of the next text instead (the rest of that text
    begins the next chunk): only when `chunk_tokens < 2 * min_tokens`, e.g. memcli-tiny's 20 / 20.

    `finish(previous)` gives the last chunk: the rest on its own when it has the minimum; else the
    rest after as many ids of `previous` (the chunk injected just before it) as make it
    `chunk_tokens` long — the tail rule of `chunk_token_ids`, across texts. With no previous chunk
    nothing can be packed with the rest: `finish` returns None and `left` names its owners.
    """

    def __init__(self, chunk_tokens: int, min_tokens: int):
        _check_sizes(chunk_tokens, min_tokens)
        self.size, self.min = chunk_tokens, min_tokens
        self.current = Packed()
        self.left: list[Hashable] = []

    def add(self, owner: Hashable, ids: Sequence[int]) -> list[Packed]:
        """Pack one text; the chunks it filled (none, one or two)."""
        ids = list(ids)
        if not ids:
            raise ValueError("an empty text cannot be packed")
        out = []
        while ids:
            room = self.size - len(self.current.ids)
            if len(ids) > room and len(self.current.ids) >= self.min:
                out.append(self._give())  # the text goes whole into the next chunk
                continue
            take = ids[:room]
            self.current.ids.extend(take)
            self.current.pieces.append((owner, len(take)))
            ids = ids[len(take):]
            if not ids:
                self.current.complete.append(owner)
            if len(self.current.ids) == self.size:
                out.append(self._give())
        return out

    def _give(self) -> Packed:
        chunk, self.current = self.current, Packed()
        return chunk

    @property
    def pending(self) -> list[Hashable]:
        """The owners with ids packed but not yet given out."""
        return [owner for owner, _ in self.current.pieces]

    def finish(self, previous: Packed | None) -> Packed | None:
        """The last chunk (see the class); None when there is none or it cannot be made."""
        rest = self.current
        self.current = Packed()
        if not rest.ids:
            return None
        if len(rest.ids) >= self.min:
            return rest
        if previous is None or not previous.ids:
            self.left = [owner for owner, _ in rest.pieces]
            return None
        borrow = min(self.size - len(rest.ids), len(previous.ids))
        pieces: list[tuple[Hashable, int]] = []
        need = borrow
        for owner, tokens in reversed(previous.pieces):  # the previous chunk's last `borrow` ids
            if need <= 0:
                break
            take = min(tokens, need)
            pieces.insert(0, (owner, take))
            need -= take
        return Packed(ids=previous.ids[len(previous.ids) - borrow:] + rest.ids, pieces=pieces + rest.pieces,
                      complete=rest.complete, borrowed=borrow)


def share_rows(pieces: Sequence[tuple[Hashable, int]], rows: int) -> list[int]:
    """How many of a chunk's `rows` new memory rows each piece gets: shares of its tokens (largest
    remainder), in order, and at least one for every piece while there are rows enough."""
    total = sum(tokens for _, tokens in pieces)
    if not pieces or total <= 0:
        raise ValueError("no pieces to share rows among")
    exact = [rows * tokens / total for _, tokens in pieces]
    counts = [int(x) for x in exact]
    order = sorted(range(len(pieces)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: rows - sum(counts)]:
        counts[i] += 1
    if rows >= len(pieces):
        for i in range(len(counts)):
            if counts[i] == 0:  # from the piece with most rows: no piece vanishes from memory
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts
