"""Words a model has never seen: what its tokenizer turns into the unknown token.

A model with a closed vocabulary (memcli-tiny: the few hundred words of its synthetic facts) reads
any other word as `<unk>`, so a note about "Bryn lives in Tromso." goes in without its name and
place, and a question about Bryn cannot be told from a question about anyone else. Inject and ask
name such words (the first few, and how many), so a wrong answer is not a surprise. Models whose
tokenizers have no unknown token (byte-level BPE: the published checkpoints) never have any: the
check costs them nothing. No torch here.
"""

from __future__ import annotations

from typing import Sequence

SHOWN = 5  # words named in the one-line note
KEPT = 20  # words kept in a --json report
MAX_SEEN = 100_000  # distinct words counted (a huge text of foreign words stays bounded)


class UnknownWords:
    """The distinct words of some texts that a tokenizer turns into its unknown token."""

    def __init__(self, tokenizer, model: str):
        self.tokenizer, self.model = tokenizer, model
        unk = getattr(tokenizer, "unk_token_id", None)
        self.unk = unk if isinstance(unk, int) else None
        self.words: list[str] = []  # the first KEPT, in order of appearance
        self.seen: set[str] = set()  # every distinct one (at most MAX_SEEN are told apart)

    @property
    def count(self) -> int:
        return len(self.seen)

    def scan(self, text: str, ids: Sequence[int] | None = None) -> None:
        """Note the unknown words of `text` (`ids`: its tokens, when already encoded: a text with
        no unknown token among them is not encoded again)."""
        if self.unk is None or not text or (ids is not None and self.unk not in ids):
            return
        for word in self._unknown(text):
            self.add(word)

    def add(self, word: str) -> None:
        if not word or word in self.seen or len(self.seen) >= MAX_SEEN:
            return
        self.seen.add(word)
        if len(self.words) < KEPT:
            self.words.append(word)

    def _unknown(self, text: str) -> list[str]:
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            spans = [text[a:b] for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
                     if token == self.unk]
        except (NotImplementedError, TypeError, KeyError, ValueError):  # a slow tokenizer: word by word
            spans = [w for w in text.split() if self.unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]]
        return [" ".join(span.split()) for span in spans]

    def to_json(self) -> dict:
        return {"model": self.model, "count": self.count, "first": list(self.words)}


def note(unknown: dict | None, where: str) -> str | None:
    """The one line that names the words a model has never seen (`unknown`: `UnknownWords.to_json()`),
    None when there are none."""
    if not isinstance(unknown, dict) or not unknown.get("count"):
        return None
    model = unknown.get("model") or "the model"
    count, first = unknown["count"], unknown.get("first", [])[:SHOWN]
    words = ", ".join(first) + (f" and {count - len(first)} more" if count > len(first) else "")
    them = "it" if count == 1 else "them"
    return (f"{model} has never seen {count} word{'s' if count != 1 else ''} of {where} ({words}): "
            f"it reads {them} as unknown and cannot answer about {them}")
