"""Knowledge retention: inject facts, inject distractor chunks after them, ask, score.

The protocol of the official `test_qa_memory.py` (reference-semantics §9.1), on the synthetic facts
of `memcli.app.facts` so it runs anywhere:

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

from memcli.app import facts as world
from memcli.core.engine import Engine, Sampling
from memcli.loading.prompts import context_ids, question_ids, stop_ids
from memcli.core.state import MemoryState

DEFAULT_DISTRACTORS = (0, 1, 2, 4, 8, 16)
FACTS_PER_CHUNK = 4


@dataclass
class Curve:
    model: str
    episodes: int
    num_tokens: int  # K: rows each chunk writes, per layer
    memory_rows: int  # N: rows of memory per layer (pool info counts rows over all layers: N x layers)
    seed: int
    layers: int = 0  # L
    points: list[dict] = field(default_factory=list)  # per distractor count
    controls: dict = field(default_factory=dict)
    chance: float = 0.0
    examples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": self.model, "episodes": self.episodes, "questions_per_point": self.episodes * FACTS_PER_CHUNK,
            "num_tokens": self.num_tokens, "memory_rows": self.memory_rows, "memory_layers": self.layers,
            "rows_unit": "per layer", "seed": self.seed,
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


def steps(episodes: int, distractors: tuple[int, ...]) -> int:
    """The work of a run, counted as `run` reports it: every injected chunk and every question
    (the "other pool" control has no pool to read in the first episode)."""
    controls = 3 * FACTS_PER_CHUNK
    per_episode = 1 + max(distractors) + FACTS_PER_CHUNK * len(set(distractors)) + controls
    return episodes * per_episode - (FACTS_PER_CHUNK if episodes else 0)


def run(engine: Engine, tokenizer, initial: MemoryState, *, model_name: str, episodes: int = 25,
        distractors: tuple[int, ...] = DEFAULT_DISTRACTORS, seed: int = 0, max_new_tokens: int = 8,
        on_progress=None) -> Curve:
    """The curve. `on_progress(done, total, episode)` after every injected chunk and every question
    (`steps()` of them in all; first called with done = 0), `episode` counting from 1."""
    cfg = engine.cfg
    distractors = tuple(sorted(set(distractors)))
    if not distractors or distractors[0] < 0:
        raise ValueError("distractor counts must be non-negative integers")
    asker = Asker(engine, tokenizer, max_new_tokens)
    curve = Curve(model_name, episodes, cfg.num_tokens, initial.num_rows, seed, layers=initial.num_layers)
    total = steps(episodes, distractors)
    done_steps = 0
    episode = 0

    def step() -> None:
        nonlocal done_steps
        done_steps += 1
        if on_progress is not None:
            on_progress(done_steps, total, episode + 1)

    if on_progress is not None:
        on_progress(0, total, 1)
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
        step()
        injected = state.clone()
        done = 0
        for t in distractors:
            while done < t:
                other = test_world.chunk(test_world.names(FACTS_PER_CHUNK, exclude=set(names)), "any")
                asker.inject(state, world.note_text(other), origin=done + 1)
                done += 1
                step()
            kept[t] += rows_kept(state, 0, cfg.num_tokens)
            for fact in chunk:
                text = asker.answer(state, fact.question)
                hit = world.exact_hit(fact.value, text)
                hits[t] += hit
                step()
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
                step()
        previous = injected
        asked += FACTS_PER_CHUNK
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


def memory_words(curve: Curve) -> str:
    """The memory's size in the units `pool info` counts in: rows per layer, and in all layers."""
    n, layers = curve.memory_rows, curve.layers
    if not layers:
        return f"{n:,} rows per layer"
    return f"{n:,} rows per layer x {layers} layers = {n * layers:,} rows"


def plot(curve: Curve, path: Path) -> None:
    """The curve as a PNG (matplotlib): `figure(curve)` saved to `path`."""
    import matplotlib.pyplot as plt

    fig = figure(curve)
    try:
        fig.savefig(str(path))
    finally:
        plt.close(fig)


def figure(curve: Curve):
    """Left: accuracy and rows kept against distractors, with the expected share. Right: the
    controls and chance as labelled bars, so that equal values stay apart (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["distractors"] for p in curve.points]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(8, 4), dpi=100, sharey=True,
                                   gridspec_kw={"width_ratios": [3, 1.2]})
    ax.plot(t, [p["accuracy"] for p in curve.points], "o-", label="exact answers")
    ax.plot(t, [p["rows_kept"] for p in curve.points], "s--", label="fact rows still in memory")
    k, n = curve.num_tokens, curve.memory_rows
    dense = [i / 4 for i in range(0, 4 * max(t) + 1)] if max(t) > 0 else [0]
    ax.plot(dense, [(1 - k / n) ** x for x in dense], ":", color="grey",
            label=f"(1-K/N)^t: K = {k} rows per chunk, N = {n:,} rows (per layer)")
    ax.set_xlabel("distractor chunks injected after the facts")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.08)
    ax.set_title(f"knowledge retention: {curve.model}\nmemory: {memory_words(curve)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    labels = [*(key.replace("_", " ") for key in curve.controls), "chance"]
    values = [*curve.controls.values(), curve.chance]
    colours = ["tab:red", "tab:orange", "tab:purple", "black"][:len(values)]
    bars = side.bar(range(len(values)), values, color=colours, alpha=0.75, width=0.7)
    for bar, value in zip(bars, values):
        side.annotate(f"{value:.1%}", (bar.get_x() + bar.get_width() / 2, value), xytext=(0, 2),
                      textcoords="offset points", ha="center", va="bottom", fontsize=7)
    side.set_xticks(range(len(values)), labels, rotation=35, ha="right", fontsize=7)
    side.set_title("controls (same questions)", fontsize=9)
    fig.tight_layout()
    return fig


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


def plot_hint() -> str:
    """How to install matplotlib for --plot, as it works for this installation: from a source
    folder (a clone, installed with pip install -e) the extra of that folder; else the package."""
    import shlex
    import sys

    import memcli

    root = Path(memcli.__file__).resolve().parent.parent
    python = shlex.quote(sys.executable)
    if (root / "pyproject.toml").is_file():
        return f"{python} -m pip install -e {shlex.quote(f'{root}[plot]')}  (or pip install matplotlib)"
    return f"{python} -m pip install matplotlib  (the extra memcli[plot])"


def command(app, episodes: int, distractors: str, seed: int, max_new_tokens: int, out_path, plot_path, *,
            as_json: bool = False, out, on_progress=None) -> Curve:
    """`memcli eval retention` on the app's current model: the table to `out` (the curve as JSON
    with `as_json`), the JSON to `out_path` and the plot to `plot_path` on request;
    `on_progress(done, total, episode)` as `run` calls it."""
    from memcli.base.errors import MemcliError
    from memcli.loading.checkpoints import initial_state

    try:
        counts = parse_distractors(distractors)
    except ValueError as err:
        raise MemcliError(str(err)) from None
    for path in (out_path, plot_path):
        if path is not None and not Path(path).parent.is_dir():
            raise MemcliError(f"cannot write {path}: folder {Path(path).parent} does not exist")
    if plot_path is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise MemcliError(f"--plot needs matplotlib, which is not installed: {plot_hint()}")
    loaded = app.model()
    initial = initial_state(loaded.reader, loaded.cfg, "cpu", loaded.state_dtype, seed=seed)
    curve = run(loaded.engine, loaded.tokenizer, initial, model_name=loaded.name, episodes=episodes,
                distractors=counts, seed=seed, max_new_tokens=max_new_tokens, on_progress=on_progress)
    if as_json:
        out(json.dumps(curve.to_json(), indent=2) + "\n")
    else:
        rows = table(curve)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            out("  ".join(c.rjust(w) for c, w in zip(r, widths)) + "\n")
        controls = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in curve.controls.items())
        out(f"controls: {controls}; chance {curve.chance:.1%}; {curve.episodes * FACTS_PER_CHUNK} questions per point\n")
        out(f"memory: {memory_words(curve)}; K = {curve.num_tokens} rows per chunk and layer\n")
    try:
        if out_path is not None:
            write_json(curve, out_path)
        if plot_path is not None:
            plot(curve, plot_path)
    except OSError as err:
        raise MemcliError(f"cannot write the results: {err.strerror or err}") from None
    return curve
