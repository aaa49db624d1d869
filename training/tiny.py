"""The tiny MemoryLLM: its checkpoint layout, its tokenizer, and a batched, differentiable copy of
memcli's injection, memory update and read, so a model can be trained *through* the memory.

The computation is memcli's (reference-semantics §3-§6, 8b family without LoRA):
  read    per layer l, the rows of a question attend to [bos_l ; M_l (N rows, positions 0..N)]
          and causally to each other; positions continue at N+1.
  inject  per layer l, a chunk of exactly K tokens attends to [bos_l ; last K rows of M_l]
          (positions 0..K), sits at positions K+1..2K, gets `new_memory_positional_emb` added to
          its layer input; the layer's K output rows are the new memory rows of layer l.
  update  per layer, K rows dropped uniformly at random, survivors keep their order, the new rows
          are appended at the end.
Chunks are always exactly K tokens here, so every memory row of a chunk is that chunk's own
hidden state (the case c = K of §4.1). `check_against_memcli` in train.py confirms that memcli's
engine, loading the exported files, gives the same greedy answers.

This file is training code: the memcli package never imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memcli.app import facts

SPECIALS = ["<unk>", "<bos>", "<eos>"]


# --------------------------------------------------------------------------- vocabulary / tokenizer
class Vocab:
    def __init__(self):
        self.words = SPECIALS + facts.vocabulary()
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk, self.bos, self.eos = 0, 1, 2

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, text: str) -> list[int]:
        """The word-level tokenization tokenizer.json does: split on whitespace and punctuation."""
        import re

        return [self.index.get(w, self.unk) for w in re.findall(r"\w+|[^\w\s]+", text)]

    def write_tokenizer(self, folder: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(self.words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
        tok.add_special_tokens(SPECIALS)
        tok.save(str(folder / "tokenizer.json"))
        special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<eos>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=1024,
                      clean_up_tokenization_spaces=False)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- config
@dataclass
class TinyConfig:
    vocab_size: int
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    k_rows: int = 20  # rows written per update = tokens per chunk
    blocks: int = 8  # N = blocks * k_rows
    theta: float = 10000.0
    eps: float = 1e-5

    @property
    def n_rows(self) -> int:
        return self.blocks * self.k_rows

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config_json(self, vocab: Vocab) -> dict:
        """An 8b-family config.json (memcli detects the family from `lora_config`; none here)."""
        return {
            "_name_or_path": "memcli-tiny",
            "architectures": ["MemoryLLM"],
            "model_type": "llama",
            "lora_config": None,
            "add_bos_embedding": True,
            "drop_memory_per_layer": True,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "num_tokens": self.k_rows,
            "num_blocks": self.blocks,
            "rms_norm_eps": self.eps,
            "rope_theta": self.theta,
            "rope_scaling": None,
            "vocab_size": self.vocab_size,
            "bos_token_id": vocab.bos,
            "eos_token_id": vocab.eos,
            "pad_token_id": vocab.eos,
            # chunks and questions are read K tokens at a time (memcli's chunk size and prompt limit)
            "max_seq_length": self.k_rows,
            "max_position_embeddings": self.n_rows + 2 * self.k_rows + 1,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "memcli_note": "toy model trained on synthetic facts (training/train.py); not a language model",
            # what memcli reads about the model (memcli/loading/catalog.py): every chunk of its training was
            # exactly K tokens; it is made for the CPU; what it knows (its words: the tokenizer's)
            "memcli_min_chunk_tokens": self.k_rows,
            "memcli_made_for_cpu": True,
            "memcli_label": f"toy model, {len(vocab) - len(SPECIALS)} words, for the CPU",
            "memcli_description": (
                f"a toy, not a language model: it knows {len(vocab) - len(SPECIALS)} words (invented names, "
                "cities, companies, things, games) and answers only questions like 'Where does Kai live?' "
                "(live, work, own, play) about notes in those words, like 'Kai lives in Turin .'; any other "
                "word is unknown to it"),
        }


# --------------------------------------------------------------------------- model
class TinyMemoryLLM(nn.Module):
    def __init__(self, cfg: TinyConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        d, i, v, L = cfg.hidden, cfg.intermediate, cfg.vocab_size, cfg.layers

        def w(*shape, std=0.02):
            return nn.Parameter(torch.randn(*shape, generator=gen) * std)

        self.embed = w(v, d, std=0.3)
        self.lm_head = w(v, d)
        self.norm = nn.Parameter(torch.ones(d))
        self.bos = w(L, 1, d, std=0.3)
        self.e = nn.Parameter(torch.zeros(1, 1, d))
        self.memory = w(L, cfg.n_rows, d, std=0.3)
        self.blocks = nn.ModuleList()
        for _ in range(L):
            b = nn.Module()
            b.in_norm, b.post_norm = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
            b.q, b.k, b.v, b.o = (w(d, d) for _ in range(4))
            b.gate, b.up, b.down = w(i, d), w(i, d), w(d, i)
            self.blocks.append(b)
        hd = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.theta ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)

    # ---- pieces
    def rms(self, x: Tensor, weight: Tensor) -> Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps))

    def rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, H, T, D], positions [T]."""
        freqs = positions.float()[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), -1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * emb.cos() + rotated * emb.sin()

    def heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.cfg.heads, self.cfg.head_dim).transpose(1, 2)

    def layer(self, l: int, x: Tensor, xpos: Tensor, prefix: Tensor, ppos: Tensor, mask: Tensor,
              want_attn: bool = False):
        """One decoder layer: `x` [B, T, d] gets queries; `prefix` [B, P, d] gives keys/values only.
        mask [T, P + T] bool, True = may attend."""
        blk = self.blocks[l]
        xn, pn = self.rms(x, blk.in_norm), self.rms(prefix, blk.in_norm)
        q = self.rope(self.heads(xn @ blk.q.T), xpos)
        k = torch.cat((self.rope(self.heads(pn @ blk.k.T), ppos), self.rope(self.heads(xn @ blk.k.T), xpos)), 2)
        v = torch.cat((self.heads(pn @ blk.v.T), self.heads(xn @ blk.v.T)), 2)
        attn_w = None
        if want_attn:
            scores = (q @ k.transpose(-1, -2)) / self.cfg.head_dim**0.5
            attn_w = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
            out = attn_w @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        h = x + out.transpose(1, 2).reshape(b, t, -1) @ blk.o.T
        hn = self.rms(h, blk.post_norm)
        return h + (F.silu(hn @ blk.gate.T) * (hn @ blk.up.T)) @ blk.down.T, attn_w

    def logits(self, x: Tensor) -> Tensor:
        return self.rms(x, self.norm) @ self.lm_head.T

    # ---- memory operations
    def initial_memory(self, batch: int) -> Tensor:
        return self.memory[None].expand(batch, -1, -1, -1)

    def inject(self, memory: Tensor, ids: Tensor) -> Tensor:
        """memory [B, L, N, d], ids [B, K] -> new rows [B, L, K, d]."""
        cfg = self.cfg
        k = cfg.k_rows
        assert ids.shape[1] == k, "training chunks are exactly K tokens"
        b = ids.shape[0]
        x = self.embed[ids]
        dev = ids.device
        ppos = torch.arange(0, k + 1, device=dev)
        xpos = torch.arange(k + 1, 2 * k + 1, device=dev)
        mask = torch.ones(k, 2 * k + 1, dtype=torch.bool, device=dev).tril(k + 1)
        deltas = []
        for l in range(cfg.layers):
            prefix = torch.cat((self.bos[l][None].expand(b, -1, -1), memory[:, l, -k:]), 1)
            x, _ = self.layer(l, x + self.e, xpos, prefix, ppos, mask)
            deltas.append(x)
        return torch.stack(deltas, 1)

    def update(self, memory: Tensor, delta: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Drop K random rows per (episode, layer), keep the order, append delta. Returns
        (memory, kept logical indices [B, L, N-K])."""
        b, L, n, d = memory.shape
        k = delta.shape[2]
        kept = torch.rand(b, L, n, generator=gen).argsort(-1)[..., : n - k].sort(-1).values.to(memory.device)
        survivors = torch.gather(memory, 2, kept[..., None].expand(-1, -1, -1, d))
        return torch.cat((survivors, delta), 2), kept

    def read(self, memory: Tensor, ids: Tensor, offsets: Tensor, mask_x: Tensor, want_attn: bool = False,
             layer_outputs: list | None = None):
        """Packed questions after the memory: ids [B, T], offsets [T] (position within its own
        question), mask_x [T, T] (block-causal). Returns final hidden [B, T, d] (+ attention maps)."""
        cfg = self.cfg
        b, t = ids.shape
        n = memory.shape[2]
        x = self.embed[ids]
        dev = ids.device
        ppos = torch.arange(0, n + 1, device=dev)
        xpos = n + 1 + offsets
        mask = torch.cat((torch.ones(t, n + 1, dtype=torch.bool, device=dev), mask_x), 1)
        maps = []
        for l in range(cfg.layers):
            prefix = torch.cat((self.bos[l][None].expand(b, -1, -1), memory[:, l]), 1)
            x, a = self.layer(l, x, xpos, prefix, ppos, mask, want_attn)
            maps.append(a)
            if layer_outputs is not None:
                layer_outputs.append(x)
        return (x, maps) if want_attn else x

    def read_in_context(self, fact_ids: Tensor, ids: Tensor, offsets: Tensor, mask_x: Tensor,
                        with_facts: bool = False):
        """Warm-up: the facts are ordinary tokens where the newest K memory rows would be
        (positions N-K+1..N) after the older initial rows; the packed questions follow."""
        cfg = self.cfg
        b = ids.shape[0]
        n, k = cfg.n_rows, cfg.k_rows
        x = torch.cat((self.embed[fact_ids], self.embed[ids]), 1)
        t = ids.shape[1]
        dev = ids.device
        ppos = torch.arange(0, n - k + 1, device=dev)
        xpos = torch.cat((torch.arange(n - k + 1, n + 1, device=dev), n + 1 + offsets))
        facts_mask = torch.cat((torch.ones(k, k, dtype=torch.bool, device=dev).tril(),
                                torch.zeros(k, t, dtype=torch.bool, device=dev)), 1)
        q_mask = torch.cat((torch.ones(t, k, dtype=torch.bool, device=dev), mask_x), 1)
        mask = torch.cat((torch.ones(k + t, n - k + 1, dtype=torch.bool, device=dev), torch.cat((facts_mask, q_mask), 0)), 1)
        mem = self.initial_memory(b)
        for l in range(cfg.layers):
            prefix = torch.cat((self.bos[l][None].expand(b, -1, -1), mem[:, l, : n - k]), 1)
            x, _ = self.layer(l, x, xpos, prefix, ppos, mask)
        return (x[:, k:], x[:, :k]) if with_facts else x[:, k:]

    # ---- export in memcli's checkpoint format
    def state_for_checkpoint(self) -> dict[str, Tensor]:
        out = dict(_named_checkpoint_params(self), initialized=torch.ones((), dtype=torch.uint8))
        return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}

    def save(self, folder: Path, vocab: Vocab) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_for_checkpoint(), str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.cfg.config_json(vocab), indent=2, sort_keys=True) + "\n")
        vocab.write_tokenizer(folder)


# --------------------------------------------------------------------------- packing questions
def pack_questions(vocab: Vocab, questions: list[facts.Fact]) -> tuple[list[int], list[int], list[int], Tensor]:
    """Questions as memcli asks them ("Question: ... Answer:" then the answer and <eos>), packed in
    one row. Returns ids, offsets, the index of every answer-predicting row, and the block mask."""
    from memcli.loading.prompts import BASE_QUESTION

    ids, offsets, where = [], [], []
    spans = []
    for fact in questions:
        q = vocab.ids(BASE_QUESTION.format(question=fact.question)) + [vocab.index[fact.value], vocab.eos]
        start = len(ids)
        ids += q
        offsets += list(range(len(q)))
        where.append(start + len(q) - 3)  # the last prompt token predicts the answer
        spans.append((start, len(ids)))
    t = len(ids)
    mask = torch.zeros(t, t, dtype=torch.bool)
    for s, e in spans:
        mask[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return ids, offsets, where, mask


def load_tiny(folder: Path) -> TinyMemoryLLM:
    """The training-side model from an exported checkpoint folder (for checks against memcli)."""
    from safetensors.torch import load_file

    raw = json.loads((folder / "config.json").read_text())
    cfg = TinyConfig(vocab_size=raw["vocab_size"], hidden=raw["hidden_size"], layers=raw["num_hidden_layers"],
                     heads=raw["num_attention_heads"], intermediate=raw["intermediate_size"],
                     k_rows=raw["num_tokens"], blocks=raw["num_blocks"], theta=raw["rope_theta"],
                     eps=raw["rms_norm_eps"])
    model = TinyMemoryLLM(cfg)
    tensors = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        for name, param in _named_checkpoint_params(model).items():
            param.copy_(tensors[name])
    return model


def _named_checkpoint_params(model: TinyMemoryLLM) -> dict[str, Tensor]:
    out = {"memory": model.memory, "new_memory_positional_emb": model.e, "bos_embedding": model.bos,
           "model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm, "lm_head.weight": model.lm_head}
    for l, b in enumerate(model.blocks):
        p = f"model.layers.{l}."
        for name, t in (("self_attn.q_proj", b.q), ("self_attn.k_proj", b.k), ("self_attn.v_proj", b.v),
                        ("self_attn.o_proj", b.o), ("mlp.gate_proj", b.gate), ("mlp.up_proj", b.up),
                        ("mlp.down_proj", b.down)):
            out[p + name + ".weight"] = t
        out[p + "input_layernorm.weight"] = b.in_norm
        out[p + "post_attention_layernorm.weight"] = b.post_norm
    return out
