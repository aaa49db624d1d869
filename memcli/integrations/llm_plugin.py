"""Pools as simonw/llm models: the `llm` plugin shipped with memcli (entry point `memcli` in the
`llm` group; `pip install 'memcli[llm]'` or `llm install memcli`).

Every pool is a model `memcli/POOL`:

    llm models                                   # lists memcli/work, ... (one per pool)
    llm -m memcli/work "When is the launch?"     # answered from pool work's memory, streamed
    llm -m memcli/work -o temperature 0.7 -o top_p 0.9 -o max_tokens 64 "..."
    llm chat -m memcli/work                      # a conversation: earlier turns go into each prompt

`llm` imports every plugin when it starts, so this module is light: no torch, no server, no model
at import time. `register_models` lists the pools through a backend opened with `start=False`
(the running server's listing, else the pools' manifests read in this process); a damaged pool is
left out. The first answer opens the ONE backend every answer of this process goes through,
`server.launch.open_backend(settings, start=True, via="llm")`: the running memcli server (one is
started when none runs, unless config `server = false` or MEMCLI_SERVER=0), else the library in
this process. The log of answers names them `via llm`.

Options (`llm models --options`): temperature (0, the default, decodes greedily), top_p, seed and
max_tokens, checked by the one check of `memcli.wire` (`Sampling.checked`, `wire.integer`); a bad
value is one line (`Error: temperature must be >= 0 and <= 100, not 500.0`), as is every failure
of an answer (`PoolError`). Conversations: the earlier (question, answer) turns of `llm chat` or
`llm -c` (llm hands them over in `prompt.messages`, also when it reloads them from its log) are the
ask's `history`; a system prompt and attachments are refused (a pool answers from its memory).
Each response's `response_json` (`llm logs --json`) holds the answer's facts: its pool, the pool
version it was read from, its tokens and timings, the turns the prompt carried.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Iterator, Optional

import click
import llm
from pydantic import Field, ValidationInfo, field_validator

from memcli import wire

PREFIX = "memcli/"


class PoolError(llm.ModelError, click.ClickException):
    """A failure of a memcli model, in one line. An `llm.ModelError` (what llm's Python API
    documents) that is also a `click.ClickException`, so that `llm chat`, which lets a model's
    error through, ends with `Error: <the line>` as `llm prompt` does, not with a traceback."""

    def __init__(self, message: object):
        from memcli.base.text import one_line

        line = one_line(message)
        llm.ModelError.__init__(self, line)
        click.ClickException.__init__(self, line)

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- the pools as models
@llm.hookimpl
def register_models(register):
    for row in pool_rows():
        register(PoolModel(row["name"], row.get("model")))


def pool_rows() -> list[dict]:
    """The pools `memcli pool ls` lists, less the damaged ones: from the running server, else from
    the manifests here (no server started, no model loaded). A setting or store that cannot be
    read lists no pool and says why in one line on stderr (every llm command would fail otherwise)."""
    from memcli.app.settings import load_settings
    from memcli.base.errors import describe
    from memcli.server.launch import open_backend

    try:
        backend = open_backend(load_settings(), start=False, via="llm", say=_say)
        try:
            rows = backend.list_pools()
        finally:
            backend.close()
    except Exception as err:  # noqa: BLE001 - one line, and llm goes on without memcli's models
        _say(f"memcli: pools not listed as llm models: {describe(err).message}")
        return []
    return [row for row in rows if not row.get("error") and isinstance(row.get("name"), str)]


def _say(line: str) -> None:
    click.echo(line, err=True)


_backend = None
_backend_lock = threading.Lock()
_held: set[str] = set()  # the pools a conversation keeps loaded
# one answer at a time: a stream its reader left (a Python caller that stopped iterating) finishes
# on its thread before the next answer uses the backend
_asking = threading.Lock()


def shared_backend():
    """The one backend of this process's answers, opened at the first (`open_backend`)."""
    global _backend
    with _backend_lock:
        if _backend is None:
            from memcli.app.settings import load_settings
            from memcli.server.launch import open_backend

            _backend = open_backend(load_settings(), start=True, via="llm", say=_say, on_model=_loading,
                                    on_load=lambda model, device: _loading(wire.ModelUse(model, device, True)))
        return _backend


def _loading(use: wire.ModelUse) -> None:
    """One line on a terminal while a model's weights load for an answer (they can take minutes)."""
    if use.loading and sys.stderr.isatty():
        from memcli.base.text import shown

        _say(f"memcli: loading {shown(use.model)} on {use.device}...")


def close_backend() -> None:
    """Let go of the backend (its connection to the server); the next answer opens a fresh one
    (for a program that uses llm's Python API and changes memcli's settings meanwhile)."""
    global _backend
    with _backend_lock:
        if _backend is not None:
            _backend.close()
        _backend = None
        _held.clear()


# --------------------------------------------------------------------------- options
def _number(value: object) -> object:
    """A command-line option's text as a number when it reads as one (else as it came: the check
    names it)."""
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def _checked(check, *args, **kwargs):
    try:
        return check(*args, **kwargs)
    except wire.BadRequest as err:
        raise PoolError(err) from None


class Options(llm.Options):
    """memcli's sampling options. Each is checked where llm reads it (`-o NAME VALUE`), by the
    check every memcli entry point uses; a bad value raises `PoolError` (not pydantic's error, so
    that llm shows it in one line)."""

    temperature: Optional[float] = Field(
        None, description="0 (the default) decodes greedily; higher samples more freely (at most 100)")
    top_p: Optional[float] = Field(None, description="nucleus sampling: the smallest set of tokens of this "
                                                     "probability (> 0 and <= 1; default 1)")
    seed: Optional[int] = Field(None, description="the seed of the sampler (a sampled answer repeats with it)")
    max_tokens: Optional[int] = Field(None, description="the most tokens of the answer (default: 256, or what "
                                                        "the model's window leaves)")

    @field_validator("temperature", "top_p", "seed", mode="before")
    @classmethod
    def _sampling(cls, value, info: ValidationInfo):
        """Checked as every sampling parameter is (`wire.Sampling.checked`), one field at a time."""
        if value is None:
            return None
        name = info.field_name
        return getattr(_checked(wire.Sampling.checked, **{name: _number(value)}), name)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, value):
        return _checked(wire.integer, {"max_tokens": _number(value)}, "max_tokens", None, 1, wire.MAX_NEW_TOKENS)


# --------------------------------------------------------------------------- a pool as a model
class PoolModel(llm.Model):
    """Pool `pool` as the llm model `memcli/<pool>`."""

    can_stream = True
    supports_conversation = True
    Options = Options

    def __init__(self, pool: str, bound_model: str | None = None):
        self.pool = pool
        self.model_id = PREFIX + pool
        self.bound_model = bound_model  # the model the pool was made with (memcli pool ls)

    def __str__(self) -> str:
        return f"memcli pool: {self.model_id}" + (f" ({self.bound_model})" if self.bound_model else "")

    def execute(self, prompt, stream, response, conversation) -> Iterator[str]:
        question = prompt.prompt
        if prompt.system:
            raise PoolError(f"{self.model_id} takes no system prompt: a pool answers from its memory")
        if not question or not question.strip():
            raise PoolError("the question is empty")
        history = turns(prompt.messages)
        options = prompt.options
        sampling = _checked(wire.Sampling.checked,
                            0.0 if options.temperature is None else options.temperature,
                            1.0 if options.top_p is None else options.top_p, options.seed)
        backend = self._backend(conversation)
        ask = dict(history=history, sampling=sampling, max_new_tokens=options.max_tokens)
        if stream:
            answer = yield from _streamed(backend, self.pool, question, ask)
        else:
            with _asking:
                answer = _answered(backend, self.pool, question, ask)
            yield answer.text
        response.set_usage(input=answer.prompt_tokens, output=answer.new_tokens)
        facts = answer.event()
        facts.pop("question", None)
        facts.pop("answer", None)
        response.response_json = facts

    def _backend(self, conversation):
        try:
            backend = shared_backend()
            if conversation is not None and self.pool not in _held:
                # a conversation asks the same pool again: keep its state loaded between turns
                backend.hold(self.pool)
                _held.add(self.pool)
        except Exception as err:  # noqa: BLE001 - every failure is one line (describe: its kind)
            raise _error(err) from None
        return backend


def turns(messages) -> list[tuple[str, str]]:
    """The earlier (question, answer) turns of a conversation from llm's messages, oldest first:
    each user message with the assistant's answer after it (the last user message is the question
    itself; a question without an answer is left out)."""
    from llm.parts import TextPart

    pairs: list[tuple[str, str]] = []
    asked: str | None = None
    for message in list(messages)[:-1]:
        text = "".join(part.text for part in message.parts if isinstance(part, TextPart) and part.text)
        if message.role == "user":
            asked = text
        elif message.role == "assistant" and asked is not None:
            pairs.append((asked, text))
            asked = None
    return pairs


def _error(err: BaseException) -> PoolError:
    from memcli.base.errors import describe

    return PoolError(describe(err).message)


def _answered(backend, pool: str, question: str, ask: dict, on_text=None):
    try:
        return backend.ask(pool, question, on_text=on_text, **ask)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is one line (describe: its kind)
        raise _error(err) from None


def _streamed(backend, pool: str, question: str, ask: dict):
    """Yield the answer's pieces as the backend decodes them (its `on_text` callback, on a thread
    of its own, feeds a queue this generator reads); returns the `Answer`."""
    pieces: queue.Queue = queue.Queue()
    end = object()
    outcome: dict = {}

    def work() -> None:
        try:
            with _asking:
                outcome["answer"] = _answered(backend, pool, question, ask, on_text=pieces.put)
        except BaseException as err:  # noqa: BLE001 - handed to the reading thread as it is
            outcome["error"] = err
        pieces.put(end)

    threading.Thread(target=work, name="memcli-llm-answer", daemon=True).start()
    streamed = False
    while True:
        piece = pieces.get()
        if piece is end:
            break
        if piece:
            streamed = True
            yield piece
    if "error" in outcome:
        raise outcome["error"]
    answer = outcome["answer"]
    if not streamed and answer.text:
        yield answer.text  # a backend that did not stream: the whole answer at once
    return answer

