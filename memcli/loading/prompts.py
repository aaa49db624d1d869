"""Tokenizer loading and the prompts the official README builds (reference-semantics §6.1).

The models never see a BOS token: each layer has its own trained `bos_embedding` in front of the
memory. So contexts and base-model questions are encoded without special tokens, and the chat
template's leading BOS is cut off.
"""

from __future__ import annotations

from pathlib import Path

BASE_QUESTION = "Question: {question} Answer:"


def load_tokenizer(folder: Path):
    """The checkpoint's own tokenizer. Never runs remote code."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        # transformers reads config.json too and warns about the published files' legacy keys
        warnings.simplefilter("ignore", FutureWarning)
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def context_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def question_ids(tokenizer, question: str) -> list[int]:
    """Chat models get their chat template; base models a `Question: ... Answer:` prompt."""
    return conversation_ids(tokenizer, [], question)


def conversation_ids(tokenizer, turns: list[tuple[str, str]], question: str) -> list[int]:
    """The prompt of `question` after the earlier (question, answer) `turns`: chat models get them
    as user/assistant messages of their chat template, base models as earlier
    `Question: ... Answer: ...` lines."""
    if has_chat_template(tokenizer):
        messages = []
        for asked, answered in turns:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        return chat_prompt_ids(tokenizer, messages + [{"role": "user", "content": question}])
    lines = [BASE_QUESTION.format(question=asked) + " " + answered for asked, answered in turns]
    return context_ids(tokenizer, "\n".join(lines + [BASE_QUESTION.format(question=question)]))


def stop_ids(tokenizer, eos_token_id: int | None) -> tuple[int, ...]:
    """eos plus, where the vocabulary has it, `<|eot_id|>` (the chat model's two terminators)."""
    ids = {i for i in (eos_token_id, tokenizer.eos_token_id) if i is not None}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot is not None:
        ids.add(eot)
    return tuple(sorted(ids))


def newest_that_fit(count: int, attempt):
    """The most items, counted from the newest end, whose prompt fits: `attempt(k)` builds the
    prompt with the newest k of `count` items and returns (fits, result). Returns (k, result) for
    the largest k that fits (k = 0 is taken without asking whether it fits: the caller says when
    even that is too long).

    Galloping from the newest end (k = 1, 2, 4, ... then bisecting): about 2·log2(k) prompts of at
    most 2k items are built, so the time depends on what is kept, never on how many older items
    are dropped (a prompt only grows as items are added in front)."""
    _, best = attempt(0)
    good, bad = 0, None  # the largest k known to fit, the smallest known not to
    step = 1
    while bad is None and good < count:
        k = min(good + step, count)
        fits, result = attempt(k)
        if fits:
            good, best = k, result
            step *= 2
        else:
            bad = k
    while bad is not None and bad - good > 1:
        k = (good + bad) // 2
        fits, result = attempt(k)
        if fits:
            good, best = k, result
        else:
            bad = k
    return good, best
