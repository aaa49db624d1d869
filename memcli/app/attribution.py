"""Which sources a question read: attention mass over memory rows, grouped by each row's source.

A read forward of the question over [bos ; memory] is recomputed here with the attention weights
kept (the engine's fast path never materialises them). For every layer, the last prompt row's
attention — the row that predicts the first answer token — is averaged over heads, and the mass on
each short-term memory row is added to the source that wrote the row (`state.origin` holds the
injection chunk of every slot; the pool's log maps chunks to files). Rows that came with the
checkpoint are no user's source: their mass is reported apart as "(initial memory)". bos and the
question's own rows are left out, so shares sum to the mass on memory, not to one.

Which layers carry the signal is a measurement, not a guess: `layer_mass` reports each layer on its
own; the ranking averages the layers a model's config.json names under `memcli_source_layers`
(measured: training/measure_sources.py; memcli-tiny: layer 0, where the question's name word looks
its fact up), else all layers. Per source the prompt row with the most mass on it counts ("peak").
For M+, rows retrieved from long-term memory are not attributed (only the short-term memory is).

What a user sees is each source's *share* and its rank (`shares`): in every chosen layer, the head
and question row that looked hardest into one of the user's sources (the look-up: for the tiny
model, the question's name word finding its fact) is taken, and its attention on memory is split
among the sources, the initial memory included, so the shares sum to 100 %. The source ranked first
is the one with the largest peak, as before; the shares tell it apart from the others (a source
with 100 % peak beside the initial memory's 99.8 % said nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memcli.core.model import DECODER, KV, Transformer, apply_rotary
from memcli.core.state import CHECKPOINT_ORIGIN, MemoryState
from memcli.wire import INITIAL_MEMORY as INITIAL  # the rows that came with the checkpoint

SOURCE_LAYERS_KEY = "memcli_source_layers"  # config.json: layers whose attention names the source


@dataclass
class SourceShare:
    source: str
    mass: float  # mean over the chosen layers of the attention mass on this source's rows
    rows: int  # rows of this source still in memory (summed over layers)

    def to_json(self) -> dict:
        return {"source": self.source, "mass": round(self.mass, 6), "rows": self.rows}


@torch.inference_mode()
def memory_attention(model: Transformer, state: MemoryState, ids: list[int]) -> torch.Tensor:
    """Attention of every head and prompt row on every logical memory row, per layer:
    [L, H, q, N] (fp32). A plain reimplementation of the engine's read forward (reference path)."""
    if not state.initialized:
        heads = model.cfg.num_heads
        return torch.zeros(state.num_layers, heads, len(ids), state.num_rows)
    cfg = model.cfg
    n = state.num_rows
    x = model.embed_tokens(torch.tensor([ids], device=model.device))
    q_len = x.shape[1]
    total = 1 + n + q_len
    # bos at 0, memory rows at their logical positions, the question after them; for M+ the
    # retrieved long-term block would sit between bos and the memory: its positions are skipped
    # (its rows are left out, so M+ shares are an approximation)
    skip = cfg.ltm_retrieval_rows
    positions = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(1 + skip, 1 + skip + n + q_len)))
    cos, sin = model.rotary.cos_sin(positions.to(model.device), model.dtype)
    out = []
    for l, layer in enumerate(model.layers):
        prefix = torch.cat((model.bos_embedding[l], state.memory(l).to(device=model.device, dtype=model.dtype)))[None]
        attn = layer.self_attn
        pk, pv = layer.prefix_keys_values(prefix, cos[: 1 + n], sin[: 1 + n], DECODER)
        xn = layer.input_layernorm(x)
        q = attn.q_proj(xn, DECODER).view(1, q_len, attn.num_heads, attn.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos[1 + n :], sin[1 + n :])
        k, v = attn.keys_values(xn, cos[1 + n :], sin[1 + n :], DECODER)
        keys = torch.cat((pk, k), 2)
        if attn.num_kv_heads != attn.num_heads:
            keys = keys.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        scores = (q.float() @ keys.float().transpose(-1, -2)) / attn.head_dim**0.5  # [1, H, q, 1 + n + q]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=scores.device).tril()
        visible = torch.cat((torch.ones(q_len, 1 + n, dtype=torch.bool, device=scores.device), causal), 1)
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)[0]  # [H, q, 1 + n + q]
        out.append(weights[:, :, 1 : 1 + n].cpu())
        # advance x through the layer exactly as the engine does
        kv = KV(torch.empty(1, cfg.num_kv_heads, total, cfg.head_dim, dtype=model.dtype, device=model.device),
                torch.empty(1, cfg.num_kv_heads, total, cfg.head_dim, dtype=model.dtype, device=model.device), 1 + n)
        kv.k[:, :, : 1 + n], kv.v[:, :, : 1 + n] = pk, pv
        x = layer(x, cos[1 + n :], sin[1 + n :], kv, DECODER)
    return torch.stack(out)


def chunk_sources(sources_log: list[dict]) -> dict[int, str]:
    """Provenance serial (chunk) -> source path, from a pool's injection log."""
    owner = {}
    for entry in sources_log:
        for chunk in range(entry["first_chunk"], entry["first_chunk"] + entry["chunks"]):
            owner[chunk] = entry["path"]
    return owner


def row_sources(state: MemoryState, owner: dict[int, str]) -> list[list[str]]:
    """The source of every logical memory row, per layer."""
    out = []
    for l in range(state.num_layers):
        origins = state.origin[l, state.order[l]].tolist()
        out.append([INITIAL if o == CHECKPOINT_ORIGIN else owner.get(o, f"chunk {o}") for o in origins])
    return out


def by_source(weights: torch.Tensor, sources: list[list[str]], layers: list[int] | None = None,
              rows: str = "peak") -> list[SourceShare]:
    """Attention mass per source, ranked (largest first). `weights` [L, q, N] from `memory_attention`.

    Per layer, head and prompt row the mass on each source's rows is summed; `rows` then takes, per
    source, the largest over the (head, prompt row) pairs ("peak": the head and row that looked a
    fact up — for the tiny model the question's name word — concentrate on one source), the mean
    over them ("mean") or the last prompt row's mean over heads ("last", the row predicting the
    answer); the chosen layers are averaged.
    """
    if rows not in ("peak", "mean", "last"):
        raise ValueError(f"rows must be peak, mean or last, not {rows!r}")
    layers = list(range(weights.shape[0])) if layers is None else layers
    mass: dict[str, float] = {}
    count: dict[str, int] = {}
    for l in range(weights.shape[0]):
        for source in sources[l]:
            count[source] = count.get(source, 0) + 1
    for l in layers:
        names = sorted(set(sources[l]))
        index = {name: i for i, name in enumerate(names)}
        owner = torch.tensor([index[s] for s in sources[l]])
        w = weights[l].float()  # [H, q, N]
        per = torch.zeros(w.shape[0], w.shape[1], len(names)).index_add_(2, owner, w)  # [H, q, S]
        if rows == "peak":
            reduced = per.flatten(0, 1).max(0).values
        elif rows == "mean":
            reduced = per.mean((0, 1))
        else:
            reduced = per[:, -1].mean(0)
        for name, value in zip(names, reduced.tolist()):
            mass[name] = mass.get(name, 0.0) + value / len(layers)
    shares = [SourceShare(s, mass.get(s, 0.0), count[s]) for s in count]
    return sorted(shares, key=lambda share: -share.mass)


def shares(weights: torch.Tensor, sources: list[list[str]], layers: list[int] | None = None) -> dict[str, float]:
    """Each source's share of the look-up (see the module docstring): per chosen layer, the (head,
    prompt row) with the most attention on any one user source, its attention on memory divided
    among the sources (summing to 1); the chosen layers averaged. With no user source in memory,
    the initial memory has it all."""
    layers = list(range(weights.shape[0])) if layers is None else layers
    out: dict[str, float] = {}
    for l in layers:
        names = sorted(set(sources[l]))
        index = {name: i for i, name in enumerate(names)}
        owner = torch.tensor([index[s] for s in sources[l]])
        w = weights[l].float()  # [H, q, N]
        per = torch.zeros(w.shape[0] * w.shape[1], len(names)).index_add_(1, owner, w.flatten(0, 1))  # [H*q, S]
        user = torch.tensor([name != INITIAL for name in names])
        if user.any():
            pair = int(per[:, user].max(1).values.argmax())
        else:
            pair = 0
        row = per[pair]
        total = float(row.sum())
        for name, value in zip(names, row.tolist()):
            out[name] = out.get(name, 0.0) + (value / total if total > 0 else float(name == INITIAL)) / len(layers)
    return out


def layer_mass(weights: torch.Tensor, sources: list[list[str]], rows: str = "peak") -> list[dict[str, float]]:
    """Per layer, the attention mass of every source (for measuring which layers carry provenance)."""
    return [{s.source: s.mass for s in by_source(weights, sources, [l], rows)} for l in range(weights.shape[0])]


def for_question(app, pool_name: str, question: str, layers: list[int] | None = None) -> dict:
    """Attribution of one question on a pool through the Python API (`of_state` on the pool as
    the app opens it)."""
    loaded, pool = app.open_pool(pool_name)
    return of_state(loaded, pool, question, layers)


def of_state(loaded, pool, question: str, layers: list[int] | None = None) -> dict:
    """Attribution of one question on a loaded pool (its state and its log): ranked sources and
    per-layer masses, as JSON-ready data (`ask --sources`, in-process and on a server alike)."""
    from memcli.loading.prompts import question_ids

    if layers is None:
        # a model may name the layers measured to carry provenance (training/measure_sources.py)
        layers = loaded.cfg.raw.get(SOURCE_LAYERS_KEY)
    ids = question_ids(loaded.tokenizer, question.strip())
    weights = memory_attention(loaded.engine.model, pool.state, ids)
    sources = row_sources(pool.state, chunk_sources(pool.sources))
    part = shares(weights, sources, layers)
    ranked = sorted(by_source(weights, sources, layers), key=lambda share: (-part.get(share.source, 0.0), -share.mass))
    initial = next((share.mass for share in ranked if share.source == INITIAL), 0.0)
    listed = [share for share in ranked if share.source != INITIAL]
    return {
        # the checkpoint's own rows are no source a user gave; their share is reported apart.
        # share: of the look-up (sums to 1 with initial_memory_share); rank: 1 = read most;
        # mass: the most attention any one head and question row put on the source's rows
        "sources": [{**share.to_json(), "share": round(part.get(share.source, 0.0), 6), "rank": rank}
                    for rank, share in enumerate(listed, 1)],
        "initial_memory_share": round(part.get(INITIAL, 0.0), 6),
        "initial_memory_mass": round(initial, 6),
        "layers": list(range(weights.shape[0])) if layers is None else layers,
        "layer_mass": [{k: round(v, 6) for k, v in sorted(m.items(), key=lambda kv: -kv[1])}
                       for m in layer_mass(weights, sources)],
    }
