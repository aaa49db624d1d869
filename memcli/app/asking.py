"""Asking a loaded model: the prompt fitted to its window, and the answer decoded from a memory state.

One way to fit a conversation (`fit`): as many of the newest items as fit the window beside
min(the answer's room, half the window), the oldest dropped first; the native ask fits its
(question, answer) turns with it (`answer_prompt`), the OpenAI endpoint its messages
(`conversation_prompt`: system messages dropped last, the final user message always kept).
`decode_answer` streams the answer's text as it comes and returns a `wire.Answer`; the wire's
`Sampling` becomes the engine's here, at the library's edge.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from memcli.base.errors import MemcliError
from memcli.wire import Answer, Sampling

if TYPE_CHECKING:  # pragma: no cover
    from memcli.app.models import LoadedModel

DEFAULT_ANSWER_TOKENS = 256


def fit(loaded: "LoadedModel", count: int, encode: Callable[[int], list[int]],
        max_new_tokens: int | None) -> tuple[int, list[int]]:
    """The prompt of the newest k of `count` items that fits the window with room for the answer:
    (k, ids). `encode(k)` builds the prompt of the newest k; the time depends on what is kept, not
    on how many items are dropped (`prompts.newest_that_fit`)."""
    from memcli.loading.prompts import newest_that_fit

    limit = loaded.max_input_tokens()
    reserve = min(DEFAULT_ANSWER_TOKENS if max_new_tokens is None else max_new_tokens, limit // 2)

    def attempt(k: int):
        ids = encode(k)
        return len(ids) + reserve <= limit, ids

    return newest_that_fit(count, attempt)


def answer_prompt(loaded: "LoadedModel", question: str, history, max_new_tokens: int | None) -> tuple[list[int], int, int]:
    """The prompt of `question` after the newest earlier turns that fit the model's window (the
    oldest dropped first), and the answer's token budget: (ids, max_new_tokens, turns kept)."""
    from memcli.loading.prompts import conversation_ids

    if not question or not question.strip():
        raise MemcliError("the question is empty")
    turns = list(history or [])
    question = question.strip()
    kept, ids = fit(loaded, len(turns), lambda k: conversation_ids(loaded.tokenizer, turns[len(turns) - k:], question),
                    max_new_tokens)
    return ids, answer_budget(loaded, len(ids), max_new_tokens, "question"), kept


def conversation_prompt(loaded: "LoadedModel", messages, max_new_tokens: int | None) -> tuple[list[int], int]:
    """An OpenAI conversation's prompt within the model's window, fitted as `answer_prompt` fits a
    history: the oldest messages are dropped first (system messages last of all); the final user
    message always stays. Returns (ids, messages dropped).

    The candidates, from the smallest: the final message after the newest k system messages
    (k = 0..S), then after every system message and the newest j other messages."""
    messages = list(messages)
    final = len(messages) - 1
    system = [i for i in range(final) if messages[i]["role"] == "system"]
    others = [i for i in range(final) if messages[i]["role"] != "system"]

    def kept(t: int) -> list[int]:
        if t <= len(system):
            return system[len(system) - t:] + [final]
        j = t - len(system)
        return sorted(system + others[len(others) - j:]) + [final]

    t, ids = fit(loaded, len(system) + len(others),
                 lambda t: messages_ids(loaded.tokenizer, [messages[i] for i in kept(t)]), max_new_tokens)
    return ids, len(messages) - len(kept(t))


def messages_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat models: their chat template, every message as it is. Base models: the prompt of
    `prompts.conversation_ids` (earlier `Question: ... Answer: ...` lines), system messages as
    lines in front."""
    from memcli.loading.prompts import chat_prompt_ids, context_ids, conversation_ids, has_chat_template

    if has_chat_template(tokenizer):
        return chat_prompt_ids(tokenizer, messages)
    lines = [m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip()]
    turns, asked = [], None
    for message in messages:
        if message["role"] == "user":
            if asked is not None:
                turns.append((asked, ""))
            asked = message["content"].strip()
        elif message["role"] == "assistant":
            turns.append((asked or "", message["content"].strip()))
            asked = None
    prompt = conversation_ids(tokenizer, turns, asked or "")
    if not lines:
        return prompt
    return context_ids(tokenizer, "\n".join(lines) + "\n") + prompt


def ask_pool(loaded: "LoadedModel", pool, question: str, *, history=None, max_new_tokens: int | None = None,
             sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None,
             checkpoint: Callable[[], None] | None = None, sources: bool = False) -> Answer:
    """The one way a pool answers a question (in-process and on a server): the prompt fitted to
    the window (`answer_prompt`), then `answer_from`."""
    return answer_from(loaded, pool, answer_prompt(loaded, question, history, max_new_tokens), question,
                       sampling=sampling, on_text=on_text, checkpoint=checkpoint, sources=sources)


def answer_from(loaded: "LoadedModel", pool, prompt: tuple[list[int], int, int], question: str, *,
                sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None,
                checkpoint: Callable[[], None] | None = None, sources: bool = False) -> Answer:
    """The answer to a fitted `prompt` (`answer_prompt`'s ids, budget and turns kept) from the
    pool's memory state, named with the pool and its version; `sources`: with the attribution of
    the question on that very state (`attribution.of_state`)."""
    ids, budget, turns = prompt
    answer = decode_answer(loaded, pool.state, ids, budget, sampling=sampling, on_text=on_text,
                           checkpoint=checkpoint, turns_in_prompt=turns, question=question)
    answer.pool, answer.pool_version = pool.name, pool.version
    if sources:
        from memcli.app.attribution import of_state

        answer.attribution = of_state(loaded, pool, question)
    return answer


def answer_budget(loaded: "LoadedModel", prompt_tokens: int, max_new_tokens: int | None, what: str = "prompt",
                  option: str = "--max-new-tokens") -> int:
    """Tokens the answer may take: `max_new_tokens`, or up to 256 / what the window leaves; a
    one-line refusal when the prompt and the answer do not fit the window."""
    limit = loaded.max_input_tokens()
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_ANSWER_TOKENS, limit - prompt_tokens)
        if max_new_tokens < 1:
            raise MemcliError(f"the {what} is {prompt_tokens} tokens; {loaded.name} reads at most {limit}")
    if prompt_tokens + max_new_tokens > limit:
        raise MemcliError(
            f"the {what} is {prompt_tokens} tokens and the answer may take {max_new_tokens}; "
            f"{loaded.name} reads at most {limit} tokens after its memory (shorten it or lower {option})"
        )
    return max_new_tokens


def engine_sampling(sampling: Sampling | None):
    """The engine's sampling parameters for the wire's (None: greedy)."""
    from memcli.core.engine import Sampling as EngineSampling

    if sampling is None:
        return None
    return EngineSampling(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)


class _StopString(Exception):
    """A stop string appeared: the answer ends before it."""


def decode_answer(loaded: "LoadedModel", state, ids: list[int], max_new_tokens: int, *,
                  sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None,
                  stop: tuple[str, ...] = (), checkpoint: Callable[[], None] | None = None,
                  turns_in_prompt: int = 0, question: str | None = None) -> Answer:
    """Decode an answer to the prompt `ids` from a memory state, passing text to `on_text` as it
    comes: an incomplete UTF-8 sequence is held back until the next token completes it, and so is
    text that may be the start of a stop string (`stop`: the answer ends before the first one).
    `checkpoint()` runs before each token (a server stops there when its client left). Given the
    `question`, the answer names its words the model has never seen (`unknown_words`)."""
    import torch

    from memcli.loading.prompts import stop_ids
    from memcli.loading.vocabulary import UnknownWords

    unknown = None
    if question is not None:
        words = UnknownWords(loaded.tokenizer, loaded.name)
        words.scan(question)
        unknown = words.to_json()

    tokenizer = loaded.tokenizer
    stops = stop_ids(tokenizer, loaded.cfg.eos_token_id)
    hold = max((len(s) for s in stop), default=1) - 1
    tokens: list[int] = []
    sent = 0  # characters of the answer already passed to on_text
    first_token_at: list[float] = []
    cut: list[str] = []
    started = time.perf_counter()

    def visible(text: str, final: bool) -> str:
        for s in stop:
            at = text.find(s)
            if at >= 0:
                cut.append(text[:at])
                return text[:at]
        return text if final or not hold else text[: max(len(text) - hold, sent)]

    shown: list[str] = []  # the pieces streamed: the answer is what was shown, even where a later
    # token decodes an earlier byte sequence differently (random weights' byte soup)

    def emit(text: str) -> None:
        nonlocal sent
        if len(text) > sent:
            shown.append(text[sent:])
            if on_text is not None:
                on_text(text[sent:])
        sent = max(sent, len(text))

    def on_token(token: int) -> None:
        if checkpoint is not None:
            checkpoint()
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        tokens.append(token)
        if token in stops:
            return
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        emit(visible(text, final=False))
        if cut:
            raise _StopString()

    try:
        generated = loaded.engine.generate(state, torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                           stop_ids=stops, sampling=engine_sampling(sampling),
                                           on_token=on_token).tokens
        text = visible(tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True), True)
    except _StopString:
        generated, text = list(tokens), cut[0]
    finished = time.perf_counter()
    emit(text)
    return Answer.measured(
        "".join(shown), list(generated), len(ids),
        seconds_to_first_token=(first_token_at[0] if first_token_at else finished) - started,
        seconds=finished - started,
        stopped=bool(cut) or (bool(generated) and generated[-1] in stops),
        turns_in_prompt=turns_in_prompt, unknown_words=unknown, question=question or "", model=loaded.name,
    )
