"""Which layers' attention on memory says where an answer came from (for `memcli ask --sources`).

    python training/measure_sources.py memcli/models/memcli-tiny --trials 10 --out training/results/sources.json

Each trial: a fresh pool, six notes of four held-out facts (one chunk each) injected in order, every
fact asked. For every right answer and every choice of layers (each alone, all together), is the
note that holds the fact the source with the most attention mass? "share" is what `ask --sources`
ranks by (attribution.shares, on the layers the model's config.json names).

--one-line: every fact is a note of its own, four packed into each chunk as memcli packs short
notes (each note's five rows tagged with its own serial, chunking.share_rows): is the one-line note
holding the fact ranked first?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memcli.app import attribution  # noqa: E402
from memcli.app import facts
from memcli.app import retention
from memcli.core.engine import Engine  # noqa: E402
from memcli.loading.checkpoints import initial_state, load_model  # noqa: E402
from memcli.ingest.chunking import share_rows  # noqa: E402
from memcli.loading.prompts import context_ids, load_tokenizer, question_ids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--notes", type=int, default=6)
    parser.add_argument("--one-line", action="store_true", help="one fact per note, four notes packed per chunk")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-config", action="store_true",
                        help="record the best single layer (peak rows) as memcli_source_layers in config.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, reader = load_model(args.folder)
    engine = Engine(model)
    tokenizer = load_tokenizer(args.folder)
    asker = retention.Asker(engine, tokenizer, max_new_tokens=4)
    layers = model.cfg.num_layers
    choices = {}
    for rows in ("peak", "mean", "last"):
        label = {"peak": "peak prompt row", "mean": "mean of prompt rows", "last": "last prompt row"}[rows]
        choices |= {f"{label}, layer {l}": (rows, [l]) for l in range(layers)}
        choices[f"{label}, all layers"] = (rows, list(range(layers)))
    configured = json.loads((args.folder / "config.json").read_text()).get(attribution.SOURCE_LAYERS_KEY)
    choices["share (ask --sources)"] = ("share", configured)
    first = {name: 0 for name in choices}
    right = asked = 0
    world = facts.FactWorld(seed=1234, split="test")
    for trial in range(args.trials):
        state = initial_state(reader, model.cfg, seed=trial)
        engine.forget_prefix()
        names = world.names(4 * args.notes)
        notes = [world.chunk(names[4 * i : 4 * i + 4]) for i in range(args.notes)]
        for i, chunk in enumerate(notes):
            if args.one_line:  # one serial per fact: rows shared by tokens, as memcli packs short notes
                ids = [context_ids(tokenizer, f.sentence) for f in chunk]
                counts = share_rows([(j, len(t)) for j, t in enumerate(ids)], model.cfg.num_tokens)
                origin = torch.tensor([4 * i + j for j, n in enumerate(counts) for _ in range(n)])
                engine.update(state, engine.inject(state, torch.tensor([sum(ids, [])])), origin=origin)
            else:
                asker.inject(state, facts.note_text(chunk), origin=i)
        if args.one_line:
            owner = {4 * i + j: f"note {4 * i + j}" for i in range(args.notes) for j in range(4)}
        else:
            owner = {i: f"note {i}" for i in range(args.notes)}
        sources = attribution.row_sources(state, owner)
        for i, chunk in enumerate(notes):
            for j, fact in enumerate(chunk):
                asked += 1
                if not facts.exact_hit(fact.value, asker.answer(state, fact.question)):
                    continue
                right += 1
                q = question_ids(tokenizer, fact.question)
                weights = attribution.memory_attention(model, state, q)
                holder = f"note {4 * i + j}" if args.one_line else f"note {i}"
                for name, (rows, chosen) in choices.items():
                    if rows == "share":
                        part = attribution.shares(weights, sources, chosen)
                        top = max((k for k in part if k != attribution.INITIAL), key=part.get)
                        first[name] += top == holder
                        continue
                    ranked = [s for s in attribution.by_source(weights, sources, chosen, rows)
                              if s.source != attribution.INITIAL]
                    first[name] += ranked[0].source == holder
    report = {"asked": asked, "right": right,
              "source_ranked_first_among_right": {k: v / max(right, 1) for k, v in first.items()}}
    rates = report["source_ranked_first_among_right"]
    best = max(range(layers), key=lambda l: rates[f"peak prompt row, layer {l}"])
    report["chosen"] = {"rows": "peak", "layers": [best]}
    print(json.dumps(report, indent=2))
    if args.write_config:
        path = args.folder / "config.json"
        config = json.loads(path.read_text())
        config[attribution.SOURCE_LAYERS_KEY] = [best]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
