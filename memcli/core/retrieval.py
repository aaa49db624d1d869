"""M+ retrieval: which long-term rows a layer reads for one question (`get_ltm`, reference-semantics
§7.4), chosen from that layer's input rows just before it runs.

The bank's keys, ids and ages (and its rows, within a budget) are read from the prefix cache's
device copies (`LtmBank`), so a question costs no host round trip per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memcli.core.model import Transformer
from memcli.core.state import MemoryState


@dataclass
class Retrieval:
    """What M+ placed in one layer's LTM block for one question (FORMAT.md §2.2)."""

    path: str  # "topk" | "repeat"
    order: Tensor  # [R, 2] int64: (0, j) = LTM entry j, (1, j) = cache row j, in prefix order
    ages: Tensor  # [R] float64
    scores: Tensor | None  # [n + c] retriever scores (topk path only)


@dataclass
class LtmBank:
    """One question's view of the M+ bank, on the model's device where it fits."""

    keys: Tensor  # [L, capacity, s] selector keys
    rows: Tensor  # [L, capacity, d] rows (the host bank itself when over the device budget)
    birth_age: Tensor  # [L, capacity] float64
    birth_update: Tensor  # [capacity] int64
    ids: list[Tensor]  # per layer: that layer's LTM bank ids


def retrieve(model: Transformer, state: MemoryState, l: int, layer, x: Tensor, forced: Tensor | None,
             bank: LtmBank, record: bool) -> tuple[Retrieval | None, Tensor]:
    """M+ `get_ltm` for layer l (reference-semantics §7.4): choose R rows from the layer's input
    rows `x`, oldest first (or take `forced`, [R, 2] (source, index) pairs). Returns the record
    (with `record`, else None) and the rows [R, d], where the bank's rows are.

    Everything runs where the model runs (no host sync per layer when the bank is mirrored
    there). Scores are computed in fp32: in bf16, ties would decide the top-k."""
    cfg, ltm, device = model.cfg, state.ltm, model.device
    r = cfg.ltm_retrieval_rows
    ltm_ids = bank.ids[l]
    n = len(state.ltm.ids[l])
    if n == 0:
        raise RuntimeError("M+ long-term memory of layer %d is empty; nothing to retrieve" % l)
    all_ids = torch.cat((ltm_ids, torch.arange(ltm.cache_start, ltm.size, device=device)))
    scores = None
    if n < r:
        # Too few entries to score: the official code tiles the indices 0..n-1 (no cache rows).
        reps = -(-r // n)
        candidates = torch.arange(n, device=device).repeat(reps)[-r:]
        sources = torch.zeros(r, dtype=torch.int64, device=device)
        path = "repeat"
    else:
        query = layer.query_proj(layer.input_layernorm(x[0])).float()
        keys = bank.keys[l, all_ids.to(bank.keys.device)].float()
        scores = torch.sigmoid(query @ keys.T).mean(dim=0)
        chosen = torch.topk(scores, r).indices.sort().values
        sources = (chosen >= n).long()
        candidates = torch.where(chosen >= n, chosen - n, chosen)
        path = "topk"
    order_pairs = torch.stack((sources, candidates), dim=1)
    if forced is not None:
        order_pairs = forced.to(device=device, dtype=torch.int64)
    # (source, index): source 0 indexes the layer's LTM, 1 the cache (bank ids after it)
    bank_ids = all_ids[order_pairs[:, 1] + order_pairs[:, 0] * n]
    ages = bank.birth_age[l, bank_ids] + cfg.num_tokens * (state.update_count - bank.birth_update[bank_ids]).double()
    if forced is None:
        # Oldest first. The official code uses numpy's unstable argsort()[::-1]; we take the
        # stable sort reversed, so equal ages keep a deterministic order (later index first).
        order = torch.argsort(ages, stable=True).flip(0)
        order_pairs, bank_ids, ages = order_pairs[order], bank_ids[order], ages[order]
    rows = bank.rows[l, bank_ids.to(bank.rows.device)]
    found = None
    if record:
        found = Retrieval(path, order_pairs.cpu(), ages.cpu(), None if scores is None else scores.cpu())
    return found, rows
