"""Evaluate a trained tiny model through memcli itself, and check the training code against memcli.

    python training/evaluate.py runs/tiny/model --episodes 50 --out training/results/memcli-tiny.json

1. parity: the same chunks, the same dropped rows, the same questions, once through training/tiny.py
   and once through memcli's loader + engine; greedy answers must agree (and logits be close).
2. the held-out retention table of `memcli.app.retention` (right after injection; after 1/2/4/8/16
   distractor chunks, with the share of rows kept against (1 - K/N)^t; the three controls),
   through memcli's engine only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memcli.app import facts  # noqa: E402
from memcli.app import retention
from memcli.core.engine import Engine  # noqa: E402
from memcli.loading.checkpoints import initial_state, load_model  # noqa: E402
from memcli.loading.prompts import load_tokenizer, question_ids  # noqa: E402
from tiny import Vocab, load_tiny  # noqa: E402
from train import machine  # noqa: E402


@torch.no_grad()
def parity(folder: Path, episodes: int, seed: int = 5) -> dict:
    vocab = Vocab()
    tiny = load_tiny(folder)
    model, reader = load_model(folder, device="cpu", dtype=torch.float32)
    engine = Engine(model)
    tokenizer = load_tokenizer(folder)
    world = facts.FactWorld(seed, "any")
    rng = random.Random(seed)
    n, k = tiny.cfg.n_rows, tiny.cfg.k_rows
    agree = total = 0
    worst = 0.0
    for episode in range(episodes):
        chunks = [world.chunk(world.names(4)) for _ in range(rng.randint(1, 4))]
        state = initial_state(reader, model.cfg, "cpu", torch.float32, seed=episode)
        engine.forget_prefix()
        memory = tiny.initial_memory(1)
        for chunk in chunks:
            text = facts.note_text(chunk)
            ids = torch.tensor([vocab.ids(text)])
            assert tokenizer(text, add_special_tokens=False).input_ids == ids[0].tolist(), "tokenizer differs"
            kept = torch.stack([torch.randperm(n)[: n - k].sort().values for _ in range(tiny.cfg.layers)])
            delta_tiny = tiny.inject(memory, ids)
            survivors = torch.gather(memory, 2, kept[None, ..., None].expand(1, -1, -1, memory.shape[-1]))
            memory = torch.cat((survivors, delta_tiny), 2)
            delta = engine.inject(state, ids)
            worst = max(worst, float((delta - delta_tiny[0]).abs().max()))
            engine.update(state, delta, kept=kept)
        for fact in chunks[-1]:
            q = question_ids(tokenizer, fact.question)
            offsets = torch.arange(len(q))
            mask = torch.ones(len(q), len(q), dtype=torch.bool).tril()
            hidden = tiny.read(memory, torch.tensor([q]), offsets, mask)
            ours = tiny.logits(hidden[0, -1:])[0]
            theirs, _ = engine.logits(state, torch.tensor([q]), all_rows=False)
            worst = max(worst, float((ours - theirs[0]).abs().max()))
            agree += int(ours.argmax()) == int(theirs[0].argmax())
            total += 1
    return {"questions": total, "greedy_agree": agree, "max_abs_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--parity-episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--log", type=Path, nargs="*", default=[], help="training logs to embed, in order")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    report = {"machine": machine(), "parity": parity(args.folder, args.parity_episodes)}
    print(json.dumps(report["parity"]), flush=True)
    model, reader = load_model(args.folder, device="cpu", dtype=torch.float32)
    engine = Engine(model)
    tokenizer = load_tokenizer(args.folder)
    initial = initial_state(reader, model.cfg, "cpu", torch.float32, seed=0)
    curve = retention.run(engine, tokenizer, initial, model_name="memcli-tiny", episodes=args.episodes, seed=args.seed)
    report["retention"] = curve.to_json()
    for row in retention.table(curve):
        print("  ".join(f"{c:>12}" for c in row))
    print(json.dumps(curve.controls), "chance", round(curve.chance, 4))
    report["eval_seconds"] = round(time.time() - started, 1)
    if args.log:
        report["training_runs"] = [
            {"log": str(path), "rows": [json.loads(line) for line in path.read_text().splitlines() if line.strip()]}
            for path in args.log
        ]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        retention.plot(curve, args.plot)


if __name__ == "__main__":
    main()
