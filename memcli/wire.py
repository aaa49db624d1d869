"""What crosses between a command and the library, in one process or over HTTP: memcli's wire types.

Torch-free and standard library only, so a command that talks to a server never imports a model.
Each type has `to_json()` and `from_json()`; what the server streams is what the client returns
and what the command line prints (`ask --json`'s events, `inject --json`'s report):

    Sampling       temperature, top_p and seed, checked one way wherever they come from
    ModelUse       {"event": "model", …}: the model a request runs on, and whether it loads for it
    TextPiece      {"event": "text", "text": …}: a piece of an answer as it is decoded
    Answer         an answer and its facts (`event()`: {"event": "answer", "pool", "question", …})
    Event          an inject's progress: {"event": "file"|"chunk"|"commit"|"skip", …}
    FileResult     what became of one file of an inject
    InjectReport   what an inject did (`end_event()`: its stream's last line)
    AskRequest     the body of POST /api/ask        ChatRequest  the body of /v1/chat/completions
    InjectParams   the query of POST /api/inject    UploadHeader one file's header line in its body

Requests are checked here, field by field, within bounds (strings of at most `MAX_TEXT` characters,
at most `MAX_TURNS` turns, …): a violation is `BadRequest` (HTTP 400) naming the field. The body's
bytes are parsed by the bounded JSON parser before (the server's `read_json`).

Sampling temperatures: 0 decodes greedily; a positive temperature below `MIN_TEMPERATURE` (0.01)
decodes greedily too. At such temperatures sampling already picks the most likely token except for
ties closer than ~1e-4 in logit, and below ~1e-38 dividing the logits overflows (inf/nan
probabilities), so one floor keeps every accepted value meaningful and safe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Mapping

from memcli.base.errors import Conflict, Damaged, Interrupted, MemcliError, NotFound, UsageError

# --------------------------------------------------------------------------- bounds of a request
MAX_REQUEST_DEPTH = 16  # JSON nesting of a request body (ours need 4)
MAX_TEXT = 256 * 1024  # characters of one question, answer or message
MAX_TURNS = 100_000  # history turns of one /api/ask
MAX_MESSAGES = 100_000  # messages of one /v1/chat/completions
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_NEW_TOKENS = 1 << 20  # any answer longer than the window is refused later with the window's size
MAX_CHUNK_TOKENS = 1 << 20
MAX_MODEL_NAME = 512
MAX_OPTION = 64  # characters of an inject's --type or --encoding

# the entry points an answer comes through (the log of answers names them): the command line, a
# client of POST /api/ask that does not say, the OpenAI API, the MCP server, the llm plugin
VIA = ("cli", "server", "openai", "mcp", "llm")
MAX_CONVERSATION_ID = 64

INITIAL_MEMORY = "(initial memory)"  # attribution: the rows that came with the checkpoint, no user's source

MIN_TEMPERATURE = 0.01  # positive temperatures below this decode greedily
MAX_TEMPERATURE = 100.0
OPENAI_MAX_TEMPERATURE = 2.0  # what the OpenAI API accepts
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what torch's generator takes


class BadRequest(UsageError):
    """A request (command-line options, an HTTP body) with a field out of bounds; str() names it."""


class TooLarge(BadRequest):
    """A request body over its size limit."""

    http_status = 413


class SamplingError(BadRequest):
    """A sampling parameter out of range; str() is one line naming it."""


class InjectInterrupted(Interrupted):
    """An inject that ended before its end (Ctrl-C, SIGTERM, a client's stop): `report` says what
    was kept (every completed file and committed chunk)."""

    def __init__(self, report: "InjectReport"):
        super().__init__("interrupted; every completed file and committed chunk is kept")
        self.report = report


def error_of(status: int, message: str, kind: str = "") -> MemcliError:
    """The failure a server reported (HTTP status, one-line message, error type) as the taxonomy's
    kind, so a command ends it as it ends the same failure in its own process."""
    for cls in (NotFound, Conflict, Damaged, Interrupted):
        if kind == cls.kind:
            return cls(message)
    return MemcliError(message)


def _repr_shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _json_shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


# --------------------------------------------------------------------------- checked fields
def finite_number(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float when it is a finite number (not a bool) within [low, high] ((low, high]
    with `low_open`); SamplingError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name} must be a number, not {_repr_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise SamplingError(f"{name} must be a number between {low:g} and {high:g}, not {_repr_shown(value)}") from None
    if not math.isfinite(number):
        raise SamplingError(f"{name} must be a finite number, not {number}")
    if number < low or (low_open and number == low) or number > high:
        bounds = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise SamplingError(f"{name} must be {bounds}, not {_repr_shown(value)}")
    return number


def integer(data: Mapping, key: str, default: int | None = None, low: int | None = None, high: int | None = None,
            low_open: bool = False) -> int | None:
    """data[key] as an int within [low, high] (None or missing: `default`); BadRequest naming it."""
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, not {_json_shown(value)}")
    if low is not None and (value <= low if low_open else value < low):
        raise BadRequest(f"{key} must be {'>' if low_open else '>='} {low}, not {_json_shown(value)}")
    if high is not None and value > high:
        raise BadRequest(f"{key} must be <= {high}, not {_json_shown(value)}")
    return value


def text(value: object, what: str, limit: int = MAX_TEXT) -> str:
    """`value` when it is a string of at most `limit` characters; BadRequest naming `what`."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    if len(value) > limit:
        raise BadRequest(f"{what} is {len(value)} characters; at most {limit} are accepted")
    return value


def model_name(value: object) -> str | None:
    """A request's model (None: the server's setting): a non-empty string of bounded length."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest("model must be a non-empty string")
    if len(value) > MAX_MODEL_NAME or "\x00" in value:
        raise BadRequest(f"model must be a name of at most {MAX_MODEL_NAME} characters")
    return value


def _pool(value: object, what: str, check_pool: Callable[[str], object] | None) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what} must name a pool")
    if check_pool is not None:
        check_pool(value)  # the store's rules for a name (an invalid one is a 400)
    return value


def _flag(value: object) -> bool:
    return value in (True, "1", "true", "yes")


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    """How an answer is decoded: greedily when temperature is 0 (the default: the authors'
    evaluation decodes greedily)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def checked(cls, temperature: object = 0.0, top_p: object = 1.0, seed: object = None, *,
                max_temperature: float = MAX_TEMPERATURE, names=("temperature", "top_p", "seed"),
                top_p_zero: bool = False) -> "Sampling":
        """The one check of sampling parameters, wherever they come from: finite numbers in range
        (a positive temperature below 0.01 decodes greedily), or SamplingError naming the field
        (`names`: how the caller calls them, e.g. "--temperature"). `top_p_zero`: allow top_p 0
        (the command line's historical range; it keeps the single most likely token)."""
        t_name, p_name, s_name = names
        t = finite_number(t_name, temperature, 0.0, max_temperature)
        if t < MIN_TEMPERATURE:
            t = 0.0  # greedy (see the module docstring)
        p = finite_number(p_name, top_p, 0.0, 1.0, low_open=not top_p_zero)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise SamplingError(f"{s_name} must be an integer, not {_repr_shown(seed)}")
            if not MIN_SEED <= seed <= MAX_SEED:
                raise SamplingError(f"{s_name} must be between {MIN_SEED} and {MAX_SEED}, not {_repr_shown(seed)}")
        return cls(t, p, seed)

    @classmethod
    def from_json(cls, data: Mapping, max_temperature: float = MAX_TEMPERATURE) -> "Sampling":
        """temperature, top_p and seed of a request body (missing or null: the defaults)."""
        defaults = {"temperature": 0.0, "top_p": 1.0}
        values = [data.get(key) if data.get(key) is not None else defaults.get(key)
                  for key in ("temperature", "top_p", "seed")]
        return cls.checked(*values, max_temperature=max_temperature)

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


# --------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class ModelUse:
    """The model a request runs on, told first on its stream: `loading` when its weights load for
    this request (the command shows its loading note and, on a CPU, its warning as in-process)."""

    model: str
    device: str
    loading: bool = False

    def to_json(self) -> dict:
        return {"event": "model", "model": self.model, "device": self.device, "loading": self.loading}

    @classmethod
    def from_json(cls, data: Mapping) -> "ModelUse":
        return cls(str(data.get("model", "")), str(data.get("device", "")), data.get("loading") is True)


@dataclass(frozen=True)
class TextPiece:
    """A piece of an answer, streamed as it is decoded."""

    text: str

    def to_json(self) -> dict:
        return {"event": "text", "text": self.text}


@dataclass
class Answer:
    """An answer and its facts. `tokens` (the ids) only where it was decoded: over the wire the
    count comes (`new_tokens`)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds_to_first_token: float
    seconds: float
    decode_tokens_per_second: float | None
    stopped: bool  # ended on a stop token or string (not on max_new_tokens)
    turns_in_prompt: int = 0  # earlier conversation turns the prompt carried (chat)
    unknown_words: dict | None = None  # the question's words the model has never seen (vocabulary.py)
    question: str = ""
    pool: str = ""
    pool_version: int | None = None  # the pool version the answer was read from
    attribution: dict | None = None  # the sources the question read (`ask --sources`)
    model: str = ""  # the model that answered (where it was decoded; the log of answers keeps it)
    tokens: list[int] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def measured(cls, text: str, tokens: list[int], prompt_tokens: int, seconds_to_first_token: float,
                 seconds: float, stopped: bool, **facts) -> "Answer":
        """An answer just decoded: its decode rate from the tokens after the first and their time."""
        decode, decode_seconds = len(tokens) - 1, seconds - seconds_to_first_token
        rate = round(decode / decode_seconds, 2) if decode > 0 and decode_seconds > 0 else None
        return cls(text, prompt_tokens, len(tokens), seconds_to_first_token, seconds, rate, stopped,
                   tokens=list(tokens), **facts)

    def to_json(self) -> dict:
        """The answer's own facts (`chat --json`'s turn lines carry these)."""
        return {
            "answer": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds_to_first_token": round(self.seconds_to_first_token, 4),
            "seconds": round(self.seconds, 4),
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "stopped": self.stopped,
            "turns_in_prompt": self.turns_in_prompt,
            "unknown_words": self.unknown_words,
        }

    def event(self) -> dict:
        """`ask --json`'s last line and the server's: what was asked, the answer, the pool version it
        was read from, and its sources when they were asked for."""
        data = {"event": "answer", "pool": self.pool, "question": self.question.strip(), **self.to_json(),
                "pool_version": self.pool_version}
        if self.attribution is not None:
            data["attribution"] = self.attribution
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "Answer":
        """An answer event (or `to_json()`'s facts) as the server sent it."""
        return cls(text=data["answer"], prompt_tokens=data["prompt_tokens"], new_tokens=data["new_tokens"],
                   seconds_to_first_token=data["seconds_to_first_token"], seconds=data["seconds"],
                   decode_tokens_per_second=data.get("decode_tokens_per_second"), stopped=data["stopped"],
                   turns_in_prompt=data.get("turns_in_prompt") or 0, unknown_words=data.get("unknown_words"),
                   question=data.get("question", ""), pool=data.get("pool", ""),
                   pool_version=data.get("pool_version"), attribution=data.get("attribution"))


# --------------------------------------------------------------------------- injects
@dataclass
class Event:
    """Progress of an inject, for a progress display."""

    kind: str  # "file" | "chunk" | "skip" | "commit"
    path: str = ""
    chunks: int = 0  # chunks of this file injected by this run
    tokens: int = 0  # tokens of this file injected by this run
    file_index: int = 0  # "file k of n": k (1-based) ...
    files_total: int = 0  # ... and n, the files this run reads
    # how far into the file the chunk ends, in `unit`s (bytes of the file, pages of a PDF): an
    # estimate for an ETA; total None where unknown (stdin)
    done: float = 0
    total: int | None = None
    unit: str = "bytes"
    # wall time since this file's first chunk of this run began, and the position it began at
    # (a resumed file's skipped part counts neither in the rate nor in the ETA)
    seconds: float = 0.0
    start: float = 0
    reason: str = ""  # "skip": why

    def to_json(self) -> dict:
        return {"event": self.kind, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "kind"}}

    @classmethod
    def from_json(cls, data: Mapping) -> "Event":
        return cls(data["event"], **{f.name: data[f.name] for f in fields(cls) if f.name != "kind" and f.name in data})


STATUSES = ("injected", "changed", "resumed", "already", "skipped", "partial", "pending")


@dataclass
class FileResult:
    path: str
    status: str  # "injected" | "changed" | "resumed" | "already" | "skipped" ("pending": being packed)
    reason: str = ""
    chunks: int = 0
    tokens: int = 0
    packed: bool = False  # shorter than the model's minimum: packed into chunks shared with other texts

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> "FileResult":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class InjectReport:
    pool: str
    model: str
    files: list[FileResult] = field(default_factory=list)
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    # on interruption: the file that was being injected and how many of its chunks are committed
    # (kept; the next run resumes after them). None when it had no committed chunk.
    partial: FileResult | None = None
    # files inside folders left out without being read: suffix -> count (binary formats), and
    # how many did not match --glob
    ignored_by_type: dict[str, int] = field(default_factory=dict)
    ignored_by_glob: int = 0
    # the words of what was read that the model has never seen (vocabulary.UnknownWords.to_json)
    unknown_words: dict | None = None

    @property
    def skipped(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "skipped"]

    def count(self, *statuses: str) -> int:
        return sum(1 for f in self.files if f.status in statuses)

    def skipped_by_reason(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for f in self.skipped:
            reasons[f.reason] = reasons.get(f.reason, 0) + 1
        return reasons

    def summary(self) -> dict:
        """The per-run counts: injected / already in / changed / resumed / skipped by reason /
        ignored by type."""
        return {
            "injected": self.count("injected"),
            "changed": self.count("changed"),
            "resumed": self.count("resumed"),
            "already": self.count("already"),
            "packed": sum(1 for f in self.files if f.packed and f.status in ("injected", "changed")),
            "skipped": len(self.skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "ignored_by_type": dict(sorted(self.ignored_by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
            "ignored_by_glob": self.ignored_by_glob,
        }

    def count_ignored(self, found: Iterable) -> list:
        """What discovery found, less the files it left out without reading them (anything with a
        `why`: by "glob", else by type, counted here by suffix)."""
        items = []
        for item in found:
            why = getattr(item, "why", None)
            if why is None:
                items.append(item)
            elif why == "glob":
                self.ignored_by_glob += 1
            else:
                key = getattr(item, "suffix", "") or "(no suffix)"
                self.ignored_by_type[key] = self.ignored_by_type.get(key, 0) + 1
        return items

    def to_json(self) -> dict:
        return {
            "pool": self.pool,
            "model": self.model,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "interrupted": self.interrupted,
            "summary": self.summary(),
            "files": [f.to_json() for f in self.files],
            "partial": self.partial.to_json() if self.partial else None,
            "unknown_words": self.unknown_words,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "InjectReport":
        summary = data.get("summary") or {}
        partial = data.get("partial")
        return cls(pool=data["pool"], model=data["model"], files=[FileResult.from_json(f) for f in data["files"]],
                   chunks=data["chunks"], tokens=data["tokens"], seconds=data["seconds"],
                   interrupted=data["interrupted"], partial=FileResult.from_json(partial) if partial else None,
                   ignored_by_type=dict(summary.get("ignored_by_type") or {}),
                   ignored_by_glob=summary.get("ignored_by_glob") or 0, unknown_words=data.get("unknown_words"))

    def end_event(self) -> dict:
        """An inject stream's last line."""
        return {"done": True, "interrupted": self.interrupted, "report": self.to_json()}


# --------------------------------------------------------------------------- requests
def _history(value: object) -> tuple[tuple[str, str], ...]:
    """Earlier turns of a conversation: [[question, answer], ...], oldest first."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("history must be a list of [question, answer] string pairs")
    if len(value) > MAX_TURNS:
        raise BadRequest(f"history holds {len(value)} turns; at most {MAX_TURNS} are accepted")
    turns = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise BadRequest(f"history[{i}] must be a [question, answer] pair of strings")
        turns.append((text(turn[0], f"history[{i}][0]"), text(turn[1], f"history[{i}][1]")))
    return tuple(turns)


@dataclass(frozen=True)
class AskRequest:
    """POST /api/ask: a question on a pool, with the earlier turns of a conversation (oldest first)
    and the client's model setting (`model_explicit`: named for this run)."""

    pool: str
    question: str
    history: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int | None = None
    sampling: Sampling = Sampling()
    model: str | None = None
    model_explicit: bool = False
    sources: bool = False  # also which sources the question read (attribution)
    via: str = "server"  # the entry point, for the log of answers (VIA; a client that does not say: "server")
    conversation: str | None = None  # a chat's id and turn number, for the log of answers
    turn: int | None = None

    def to_json(self) -> dict:
        return {"pool": self.pool, "question": self.question, "max_new_tokens": self.max_new_tokens,
                **self.sampling.to_json(), "history": [list(turn) for turn in self.history],
                "model": self.model, "model_explicit": self.model_explicit, "sources": self.sources,
                "via": self.via, "conversation": self.conversation, "turn": self.turn}

    @classmethod
    def from_json(cls, data: Mapping, check_pool: Callable[[str], object] | None = None) -> "AskRequest":
        """The body, checked field by field (the fields' order is the order of the checks)."""
        question = text(data.get("question"), "question")
        if not question.strip():
            raise BadRequest("the question is empty")
        pool = _pool(data.get("pool"), "pool", check_pool)
        history = _history(data.get("history"))
        max_new = integer(data, "max_new_tokens", None, 1, MAX_NEW_TOKENS)
        sampling = Sampling.from_json(data)
        model = model_name(data.get("model"))
        via = data.get("via", "server")
        if via not in VIA:
            raise BadRequest(f"via must be one of {', '.join(VIA)}, not {_json_shown(via)}")
        conversation = data.get("conversation")
        if conversation is not None:
            conversation = text(conversation, "conversation", MAX_CONVERSATION_ID)
        turn = integer(data, "turn", None, 1, MAX_TURNS + 1)
        return cls(pool, question, history, max_new, sampling, model, _flag(data.get("model_explicit")),
                   _flag(data.get("sources")), via, conversation, turn)


def _messages(value: object) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"messages holds {len(value)} items; at most {MAX_MESSAGES} are accepted")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be system, user or assistant, not {_json_shown(role)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if len(content) > MAX_MESSAGES:
                raise BadRequest(f"messages[{i}].content holds {len(content)} parts; at most {MAX_MESSAGES}")
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": text(content, f"messages[{i}].content")})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise BadRequest("the last message must be a non-empty user message")
    return tuple(out)


def _stop_strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in value):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
    for i, stop in enumerate(value):
        text(stop, f"stop[{i}]", MAX_STOP_CHARS)
    return tuple(value)


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions (OpenAI): `model` names the pool; the messages' conversation is
    fitted to the model's window as the native ask fits its turns."""

    pool: str
    messages: tuple[dict, ...]
    max_tokens: int | None = None
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def from_json(cls, data: Mapping, check_pool: Callable[[str], object] | None = None) -> "ChatRequest":
        pool = _pool(data.get("model"), "model", check_pool)
        messages = _messages(data.get("messages"))
        max_tokens = integer(data, "max_completion_tokens", None, 1, MAX_NEW_TOKENS)
        max_tokens = integer(data, "max_tokens", max_tokens, 1, MAX_NEW_TOKENS)
        if integer(data, "n", 1, 1) != 1:
            raise BadRequest("n must be 1 (memcli answers one completion per request)")
        sampling = Sampling.from_json(data, max_temperature=OPENAI_MAX_TEMPERATURE)
        stop = _stop_strings(data.get("stop"))
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object")
        return cls(pool, messages, max_tokens, sampling, stop, stream, bool(options.get("include_usage")))


@dataclass(frozen=True)
class InjectParams:
    """The query of POST /api/inject (its body: the sources, `UploadHeader` lines and their bytes)."""

    pool: str
    model: str | None = None
    model_explicit: bool = False
    chunk_tokens: int | None = None
    force: bool = False

    def to_query(self) -> dict[str, str]:
        query = {"pool": self.pool}
        if self.model:
            query["model"] = self.model
        if self.model_explicit:
            query["model_explicit"] = "1"
        if self.chunk_tokens is not None:
            query["chunk_tokens"] = str(self.chunk_tokens)
        if self.force:
            query["force"] = "1"
        return query

    @classmethod
    def from_query(cls, query: Mapping[str, str], check_pool: Callable[[str], object] | None = None) -> "InjectParams":
        pool = _pool(query.get("pool"), "pool", check_pool)
        model = model_name(query.get("model") or None)
        chunk_tokens = None
        if query.get("chunk_tokens"):
            given = query["chunk_tokens"]
            if len(given) > 12 or not given.lstrip("-").isdigit():
                raise BadRequest(f"chunk_tokens must be an integer, not {given[:40]!r}")
            chunk_tokens = int(given)
            if chunk_tokens > MAX_CHUNK_TOKENS:
                raise BadRequest(f"chunk_tokens must be <= {MAX_CHUNK_TOKENS}, not {chunk_tokens}")
        return cls(pool, model, _flag(query.get("model_explicit")), chunk_tokens, _flag(query.get("force", "")))


@dataclass(frozen=True)
class UploadHeader:
    """One line of an inject's upload body, in the order discovery found them: a source (`size`
    bytes follow the line; `kind`, `compressed`, `encoding` and `forced` say how it is read, as the
    client found it) or a file the client could not read (`skipped`: why; no bytes follow), and
    once, first, the files inside folders the client left out (`ignored`: by type and by --glob)."""

    name: str = ""  # the source's name: what the pool logs it under ("-": stdin)
    size: int = 0
    kind: str = ""
    compressed: bool = False
    encoding: str | None = None
    forced: bool = False
    skipped: str | None = None
    ignored: dict | None = None  # {"by_type": {suffix: count}, "by_glob": count}

    def to_json(self) -> dict:
        if self.ignored is not None:
            return {"ignored": self.ignored}
        if self.skipped is not None:
            return {"path": self.name, "skipped": self.skipped}
        return {"path": self.name, "size": self.size, "kind": self.kind, "compressed": self.compressed,
                "encoding": self.encoding, "forced": self.forced}

    @classmethod
    def from_json(cls, data: object, kinds: Iterable[str] = ()) -> "UploadHeader":
        """A header line's JSON, checked (`kinds`: the kinds of source the server reads)."""
        if isinstance(data, dict) and "ignored" in data:
            ignored = data["ignored"]
            by_type = ignored.get("by_type") if isinstance(ignored, dict) else None
            by_glob = ignored.get("by_glob") if isinstance(ignored, dict) else None
            if not isinstance(by_type, dict) or not all(isinstance(k, str) and len(k) <= MAX_OPTION and
                                                        isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                        for k, v in by_type.items()) \
                    or isinstance(by_glob, bool) or not isinstance(by_glob, int) or by_glob < 0:
                raise BadRequest("an upload's ignored files must be {\"by_type\": {suffix: count}, \"by_glob\": count}")
            return cls(ignored={"by_type": dict(by_type), "by_glob": by_glob})
        if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
            raise BadRequest("an upload's file header needs a path")
        name = text(data["path"], "an upload's path", MAX_TEXT)
        if "skipped" in data:
            return cls(name, skipped=text(data["skipped"], "an upload's skip reason", MAX_TEXT))
        size = data.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest("an upload's file header needs a size (bytes, >= 0)")
        kind = data.get("kind") or ("stdin" if name == "-" else "text")
        if kind not in kinds:
            raise BadRequest(f"an upload's kind must be one of {', '.join(kinds)}, not {_json_shown(kind)}")
        encoding = data.get("encoding")
        if encoding is not None:
            encoding = text(encoding, "an upload's encoding", MAX_OPTION)
        return cls(name, size, kind, data.get("compressed") is True, encoding, data.get("forced") is True)
