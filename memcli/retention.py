"""Knowledge retention: inject facts, inject distractor chunks after them, ask, score.

The protocol of the official `test_qa_memory.py` (reference-semantics §9.1), on the synthetic facts
of `memcli.facts` so it runs anywhere:

  for each episode (the pool is reset to the model's initial memory every time):
    inject one chunk of held-out facts (provenance 0), ask every fact: the "0 distractors" point;
    inject distractor chunks (facts about other people) one by one and ask again after
    t = 1, 2, 4, 8, 16 of them.
  Greedy answers, exact hit (the value is a substring of the answer), the drop generator seeded per
  episode. Beside the accuracy it records the share of the fact chunk's rows still in memory
  (from the rows' provenance) and the expectation (1 - K/N)^t of that share.

Controls, each asked the same questions: nothing injected (the model's initial memory), zeroed
memory, and another episode's memory (right after *its* facts went in).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import facts as world
from .engine import Engine, Sampling
from .prompts import context_ids, question_ids, stop_ids
from .state import MemoryState

DEFAULT_DISTRACTORS = (0, 1, 2, 4, 8, 16)
FACTS_PER_CHUNK = 4


@dataclass
class Curve:
    model: str
    episodes: int
    num_tokens: int  # K
    memory_rows: int  # N
    seed: int
    points: list[dict] = field(default_factory=list)  # per distractor count
    controls: dict = field(default_factory=dict)
    chance: float = 0.0
    examples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": self.model, "episodes": self.episodes, "questions_per_point": self.episodes * FACTS_PER_CHUNK,
            "num_tokens": self.num_tokens, "memory_rows": self.memory_rows, "seed": self.seed,
            "decoding": "greedy", "pool_reset_per_episode": True, "metric": "exact hit (value is a substring of the answer)",
            "chance": self.chance, "points": self.points, "controls": self.controls, "examples": self.examples,
        }


class Asker:
    """Questions to one model, greedy, answers as text."""

    def __init__(self, engine: Engine, tokenizer, max_new_tokens: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stops = stop_ids(tokenizer, engine.cfg.eos_token_id)

    def answer(self, state: MemoryState, question: str) -> str:
        ids = question_ids(self.tokenizer, question)
        gen = self.engine.generate(state, torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                                   stop_ids=self.stops, sampling=Sampling())
        return self.tokenizer.decode([t for t in gen.tokens if t not in self.stops], skip_special_tokens=True)

    def inject(self, state: MemoryState, text: str, origin: int) -> None:
        ids = context_ids(self.tokenizer, text)
        delta = self.engine.inject(state, torch.tensor([ids]))
        self.engine.update(state, delta, origin=origin)


def rows_kept(state: MemoryState, origin: int, num_tokens: int) -> float:
    """Share of the rows chunk `origin` wrote that are still in memory, averaged over layers."""
    return float((state.origin == origin).sum()) / (num_tokens * state.num_layers)


def run(engine: Engine, tokenizer, initial: MemoryState, *, model_name: str, episodes: int = 25,
        distractors: tuple[int, ...] = DEFAULT_DISTRACTORS, seed: int = 0, max_new_tokens: int = 8,
        on_progress=None) -> Curve:
    cfg = engine.cfg
    distractors = tuple(sorted(set(distractors)))
    if not distractors or distractors[0] < 0:
        raise ValueError("distractor counts must be non-negative integers")
    asker = Asker(engine, tokenizer, max_new_tokens)
    curve = Curve(model_name, episodes, cfg.num_tokens, initial.num_rows, seed)
    hits = {t: 0 for t in distractors}
    kept = {t: 0.0 for t in distractors}
    controls = {"no_injection": 0, "zeroed_memory": 0, "other_pool": 0}
    asked = 0
    previous: MemoryState | None = None
    test_world = world.FactWorld(seed, "test")
    relation_chance = []
    for episode in range(episodes):
        names = test_world.names(FACTS_PER_CHUNK)
        chunk = test_world.chunk(names, "test")
        relation_chance += [world.chance(f.relation) for f in chunk]
        state = initial.clone()
        state.generator.manual_seed(seed * 100003 + episode)
        engine.forget_prefix()
        asker.inject(state, world.note_text(chunk), origin=0)
        injected = state.clone()
        done = 0
        for t in distractors:
            while done < t:
                other = test_world.chunk(test_world.names(FACTS_PER_CHUNK, exclude=set(names)), "any")
                asker.inject(state, world.note_text(other), origin=done + 1)
                done += 1
            kept[t] += rows_kept(state, 0, cfg.num_tokens)
            for fact in chunk:
                text = asker.answer(state, fact.question)
                hit = world.exact_hit(fact.value, text)
                hits[t] += hit
                if episode == 0:
                    curve.examples.append({"distractors": t, "question": fact.question, "expected": fact.value,
                                           "answer": text, "right": hit})
        zeroed = initial.clone()
        zeroed.slots.zero_()
        for label, other_state in (("no_injection", initial), ("zeroed_memory", zeroed), ("other_pool", previous)):
            if other_state is None:
                continue
            engine.forget_prefix()
            for fact in chunk:
                controls[label] += world.exact_hit(fact.value, asker.answer(other_state, fact.question))
        previous = injected
        asked += FACTS_PER_CHUNK
        if on_progress is not None:
            on_progress(episode + 1, episodes)
    n, k = initial.num_rows, cfg.num_tokens
    for t in distractors:
        curve.points.append({
            "distractors": t,
            "accuracy": hits[t] / asked,
            "rows_kept": kept[t] / episodes,
            "expected_rows_kept": (1 - k / n) ** t,
        })
    curve.controls = {
        "no_injection": controls["no_injection"] / asked,
        "zeroed_memory": controls["zeroed_memory"] / asked,
        "other_pool": controls["other_pool"] / max(asked - FACTS_PER_CHUNK, 1),
    }
    curve.chance = sum(relation_chance) / len(relation_chance)
    return curve


def table(curve: Curve) -> list[list[str]]:
    rows = [["distractors", "accuracy", "rows kept", "(1-K/N)^t"]]
    for p in curve.points:
        rows.append([str(p["distractors"]), f"{p['accuracy']:.1%}", f"{p['rows_kept']:.1%}",
                     f"{p['expected_rows_kept']:.1%}"])
    return rows


def write_json(curve: Curve, path: Path) -> None:
    Path(path).write_text(json.dumps(curve.to_json(), indent=2) + "\n")


def plot(curve: Curve, path: Path) -> None:
    """Accuracy and rows kept against distractors, controls as horizontal lines (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["distractors"] for p in curve.points]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(t, [p["accuracy"] for p in curve.points], "o-", label="exact answers")
    ax.plot(t, [p["rows_kept"] for p in curve.points], "s--", label="fact rows still in memory")
    k, n = curve.num_tokens, curve.memory_rows
    dense = [i / 4 for i in range(0, 4 * max(t) + 1)] if max(t) > 0 else [0]
    ax.plot(dense, [(1 - k / n) ** x for x in dense], ":", color="grey", label=f"(1-K/N)^t, K={k}, N={n}")
    for (label, value), style in zip(curve.controls.items(), ("-.", (0, (1, 3)), (0, (5, 5)))):
        ax.axhline(value, linewidth=0.9, linestyle=style, color="tab:red", alpha=0.7,
                   label=f"control: {label.replace('_', ' ')} ({value:.1%})")
    ax.axhline(curve.chance, color="black", linewidth=0.5, label=f"chance ({curve.chance:.1%})")
    ax.set_xlabel("distractor chunks injected after the facts")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"knowledge retention: {curve.model}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


def parse_distractors(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--distractors must be comma-separated integers, not {text!r}") from None
    if not values or min(values) < 0 or max(values) > 10000:
        raise ValueError(f"--distractors must be integers from 0 to 10000, not {text!r}")
    return values


def expected(t: int, k: int, n: int) -> float:
    return math.pow(1 - k / n, t)


def command(app, episodes: int, distractors: str, seed: int, max_new_tokens: int, json_path, plot_path,
            out, progress) -> Curve:
    """`memcli eval retention` on the app's current model: table to `out`, JSON and plot on request."""
    from .api import MemcliError
    from .loading import initial_state

    try:
        counts = parse_distractors(distractors)
    except ValueError as err:
        raise MemcliError(str(err)) from None
    for path in (json_path, plot_path):
        if path is not None and not Path(path).parent.is_dir():
            raise MemcliError(f"cannot write {path}: folder {Path(path).parent} does not exist")
    if plot_path is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise MemcliError("--plot needs matplotlib: pip install 'memcli[plot]' (or matplotlib)")
    loaded = app.model()
    initial = initial_state(loaded.reader, loaded.cfg, "cpu", loaded.state_dtype, seed=seed)
    curve = run(loaded.engine, loaded.tokenizer, initial, model_name=loaded.name, episodes=episodes,
                distractors=counts, seed=seed, max_new_tokens=max_new_tokens,
                on_progress=lambda done, total: progress(f"episode {done}/{total}") if done % 5 == 0 or done == total else None)
    rows = table(curve)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out("  ".join(c.rjust(w) for c, w in zip(r, widths)) + "\n")
    controls = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in curve.controls.items())
    out(f"controls: {controls}; chance {curve.chance:.1%}; {curve.episodes * FACTS_PER_CHUNK} questions per point\n")
    try:
        if json_path is not None:
            write_json(curve, json_path)
        if plot_path is not None:
            plot(curve, plot_path)
    except OSError as err:
        raise MemcliError(f"cannot write the results: {err.strerror or err}") from None
    return curve
