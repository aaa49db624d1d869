"""Train memcli-tiny: a 2-layer MemoryLLM that stores synthetic facts in its memory and answers them.

    python training/train.py --out runs/tiny --minutes 80            # 2 CPU cores (one thread)
    python training/train.py --out runs/tiny --device cuda --minutes 5

Phases (all reproducible from --seed):
  warm-up   facts and questions in one context, no memory: the retrieval (induction) circuit forms.
  memory    chunks injected through the real injection path (tiny.py), questions read the memory;
            the number of chunks per episode grows (curriculum), questions about every chunk's
            facts are packed into one row per episode.
At the end the model is written in memcli's checkpoint format and evaluated on held-out facts
(eval.py), once with this code and once through memcli's own engine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memcli.app import facts  # noqa: E402
from tiny import TinyConfig, TinyMemoryLLM, Vocab, load_tiny, pack_questions  # noqa: E402

FACTS_PER_CHUNK = 4


def chunk_ids(vocab: Vocab, chunk: list[facts.Fact]) -> list[int]:
    return vocab.ids(" ".join(f.sentence for f in chunk))


class Episodes:
    """Batches of episodes: `chunks` fact chunks injected in order, then `questions` questions about
    facts of any of them (the newest chunk's facts always included)."""

    def __init__(self, vocab: Vocab, seed: int, split: str = "train"):
        self.vocab = vocab
        self.world = facts.FactWorld(seed, split)
        self.rng = random.Random(seed + 1)

    same_relation = 0.0  # share of chunks whose facts all have one relation (the value's kind
    # then says nothing: only the name tells the facts apart)

    def batch(self, size: int, chunks: int, questions: int):
        ids = []  # [chunks][B] token lists
        asked = []  # [B] list of (chunk index, fact)
        for _ in range(size):
            names = self.world.names(chunks * FACTS_PER_CHUNK)
            episode = [
                self.world.chunk(names[c * 4 : c * 4 + 4],
                                 relation=self.rng.choice(facts.RELATIONS) if self.rng.random() < self.same_relation else None)
                for c in range(chunks)
            ]
            ids.append([chunk_ids(self.vocab, ch) for ch in episode])
            pool = [(c, f) for c, ch in enumerate(episode) for f in ch]
            newest = [(chunks - 1, f) for f in episode[-1]]
            rest = [p for p in pool if p[0] != chunks - 1]
            self.rng.shuffle(rest)
            picked = (newest + rest)[:questions]
            while len(picked) < questions:
                picked.append(self.rng.choice(pool))
            asked.append(picked)
        chunk_tensors = [torch.tensor([ids[b][c] for b in range(size)]) for c in range(chunks)]
        return chunk_tensors, asked


def question_batch(vocab: Vocab, asked, device="cpu"):
    rows, targets = [], []
    offsets = where = mask = None
    for picked in asked:
        q_ids, offsets, where, mask = pack_questions(vocab, [f for _, f in picked])
        rows.append(q_ids)
        targets.append([vocab.index[f.value] for _, f in picked])
    t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
    return t(rows), t(offsets), t(where), t(mask), t(targets)


def log_event(log, row: dict) -> None:
    log.write(json.dumps(row) + "\n")
    log.flush()
    print(json.dumps(row), flush=True)


def answer_loss(model: TinyMemoryLLM, hidden, ids, where, targets, vocab: Vocab):
    """Cross-entropy of the answer word (at the last prompt token) and of <eos> right after it.
    Also the accuracy overall and on the first four questions (the newest chunk's facts)."""
    logits_answer = model.logits(hidden[:, where])  # [B, Q, V]
    logits_eos = model.logits(hidden[:, where + 1])
    loss = F.cross_entropy(logits_answer.flatten(0, 1), targets.flatten())
    loss_eos = F.cross_entropy(logits_eos.flatten(0, 1), torch.full_like(targets.flatten(), vocab.eos))
    right = (logits_answer.argmax(-1) == targets).float()
    return loss + 0.2 * loss_eos, right.mean().item(), right[:, :FACTS_PER_CHUNK].mean().item()


def memory_forward(model: TinyMemoryLLM, vocab: Vocab, chunks, asked, gen):
    b = chunks[0].shape[0]
    device = model.memory.device
    memory = model.initial_memory(b)
    aux = 0.0
    for ids in chunks:
        ids = ids.to(device)
        delta = model.inject(memory, ids)
        if AUX_WEIGHT:
            # every layer's new rows: the question's own name token can then find them at layer 0
            for l in range(delta.shape[1]):
                aux = aux + name_loss(model, delta[:, l], ids) / (len(chunks) * delta.shape[1])
        memory, _ = model.update(memory, delta, gen)
    q_ids, offsets, where, mask, targets = question_batch(vocab, asked, device)
    outputs: list = []
    hidden = model.read(memory, q_ids, offsets, mask, layer_outputs=outputs)
    loss, acc, acc_newest = answer_loss(model, hidden, q_ids, where, targets, vocab)
    if AUX_WEIGHT:
        # the question's own name word finds its fact in memory at layer 0 (read through the
        # output head): then the last prompt row only has to copy from that word
        names_at = where - 4  # "Question : Where does Kai live ? Answer :": Kai is 4 words before the last ":"
        logits = model.logits(outputs[0][:, names_at])
        aux = aux + F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss + AUX_WEIGHT * aux, acc, acc_newest


# In a chunk of four five-word facts, the value is word 3 of each fact and the subject word 0.
VALUE_ROWS = torch.tensor([5 * i + 3 for i in range(FACTS_PER_CHUNK)])
NAME_ROWS = VALUE_ROWS - 3
AUX_WEIGHT = 0.0  # set from --name-loss


def name_loss(model: TinyMemoryLLM, fact_hidden, fact_ids):
    """Auxiliary: the hidden state of each value word predicts its fact's subject. It asks the
    chunk's own rows to carry who the value belongs to, the half of the binding questions need."""
    logits = model.logits(fact_hidden[:, VALUE_ROWS])
    return F.cross_entropy(logits.flatten(0, 1), fact_ids[:, NAME_ROWS].flatten())


def warmup_forward(model: TinyMemoryLLM, vocab: Vocab, chunks, asked):
    device = model.memory.device
    q_ids, offsets, where, mask, targets = question_batch(vocab, asked, device)
    fact_ids = chunks[-1].to(device)
    hidden, fact_hidden = model.read_in_context(fact_ids, q_ids, offsets, mask, with_facts=True)
    loss, acc, acc_newest = answer_loss(model, hidden, q_ids, where, targets, vocab)
    if AUX_WEIGHT:
        loss = loss + AUX_WEIGHT * name_loss(model, fact_hidden, fact_ids)
    return loss, acc, acc_newest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget for training")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    parser.add_argument("--warmup-fraction", type=float, default=0.3, help="most of the budget the warm-up may take")
    parser.add_argument("--warmup-until", type=float, default=0.9, help="in-context accuracy that ends the warm-up")
    parser.add_argument("--level-up", type=float, default=0.85, help="newest-chunk accuracy that adds a chunk")
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoint writes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-chunks", type=int, default=8)
    parser.add_argument("--start-level", type=int, default=1, help="chunks per episode to start the memory phase at")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--name-loss", type=float, default=0.5,
                        help="weight of the auxiliary loss: each value word's state predicts its subject")
    parser.add_argument("--theta", type=float, default=10000.0, help="RoPE base")
    parser.add_argument("--init", type=Path, help="start from this exported checkpoint folder")
    parser.add_argument("--skip-warmup", action="store_true", help="with --init: go straight to the memory phase")
    parser.add_argument("--same-relation", type=float, default=0.75,
                        help="share of chunks with one relation for all four facts (forces binding by name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()

    global AUX_WEIGHT
    AUX_WEIGHT = args.name_loss
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = Vocab()
    cfg = TinyConfig(vocab_size=len(vocab), hidden=args.hidden, layers=args.layers,
                     intermediate=args.intermediate, blocks=args.blocks, theta=args.theta)
    model = TinyMemoryLLM(cfg, seed=args.seed)
    if args.init is not None:
        model.load_state_dict(load_tiny(args.init).state_dict())
    model = model.to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    episodes = Episodes(vocab, args.seed, "train")
    episodes.same_relation = args.same_relation
    gen = torch.Generator().manual_seed(args.seed + 2)
    curriculum_rng = random.Random(args.seed + 3)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log = log_path.open("w")
    header = {"event": "start", "args": {k: str(v) for k, v in vars(args).items()},
              "params": sum(p.numel() for p in model.parameters()), "machine": machine()}
    log.write(json.dumps(header) + "\n")
    print(json.dumps(header), flush=True)
    budget = args.minutes * 60
    started = time.time()
    last_save = started
    step = 0
    level = args.start_level  # most chunks per memory episode; raised when the newest chunk is answered well
    warm = not args.skip_warmup
    smooth = {"loss": None, "acc": None, "acc_newest": None}

    def track(key, value, rate=0.02):
        smooth[key] = value if smooth[key] is None else (1 - rate) * smooth[key] + rate * value

    while True:
        elapsed = time.time() - started
        fraction = elapsed / budget if not args.max_steps else step / args.max_steps
        if fraction >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in opt.param_groups:
            group["lr"] = lr
        if warm and ((smooth["acc"] or 0) >= args.warmup_until or fraction >= args.warmup_fraction):
            warm = False  # the in-context circuit is there (or the warm-up budget is spent)
            smooth = {"loss": None, "acc": None, "acc_newest": None}
            log_event(log, {"event": "memory phase", "step": step, "seconds": round(elapsed, 1)})
        if warm:
            chunks, asked = episodes.batch(args.batch, 1, FACTS_PER_CHUNK)
            loss, acc, _ = warmup_forward(model, vocab, chunks, asked)
            n_chunks = 0
        else:
            n_chunks = curriculum_rng.randint(max(1, level - 2), level) if level > 1 else 1
            chunks, asked = episodes.batch(args.batch, n_chunks, args.questions if n_chunks > 1 else FACTS_PER_CHUNK)
            loss, acc, acc_newest = memory_forward(model, vocab, chunks, asked, gen)
            track("acc_newest", acc_newest)
            if step % 10 == 0:
                # keep the in-context circuit alive (cheap) while the memory path trains
                chunks_w, asked_w = episodes.batch(args.batch // 2, 1, FACTS_PER_CHUNK)
                loss_w, _, _ = warmup_forward(model, vocab, chunks_w, asked_w)
                loss = loss + 0.3 * loss_w
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        track("loss", loss.item())
        track("acc", acc)
        step += 1
        if not warm and level < args.max_chunks and (smooth["acc_newest"] or 0) >= args.level_up and step % 50 == 0:
            level += 1
            log_event(log, {"event": "level", "level": level, "step": step, "seconds": round(time.time() - started, 1)})
            smooth["acc_newest"] = None
        if step % args.log_every == 0:
            row = {"step": step, "seconds": round(time.time() - started, 1), "phase": "warmup" if warm else "memory",
                   "level": 0 if warm else level, "lr": round(lr, 6),
                   **{k: round(v, 4) for k, v in smooth.items() if v is not None}}
            log_event(log, row)
        if time.time() - last_save > args.save_every * 60:
            model.save(args.out / "model", vocab)
            last_save = time.time()
    model.save(args.out / "model", vocab)
    end = {"event": "end", "steps": step, "seconds": round(time.time() - started, 1)}
    log.write(json.dumps(end) + "\n")
    log.close()
    print(json.dumps(end), flush=True)


def machine() -> dict:
    import os

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    main()
