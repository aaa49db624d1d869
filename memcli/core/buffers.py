"""What every engine operation starts from: the question's (or chunk's) token ids as one batch row,
and a scratch key/value buffer for rows that are not the memory prefix's."""

from __future__ import annotations

import torch
from torch import Tensor

from memcli.core.model import KV, Transformer


def token_ids(ids, device: torch.device) -> Tensor:
    """`ids` as a [1, T] int64 tensor on `device`; ValueError for a batch or no tokens."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ValueError("memcli runs batch size 1 (the official update keeps only batch element 0)")
    if ids.shape[1] == 0:
        raise ValueError("no tokens to run")
    return ids


def scratch_kv(model: Transformer, rows: int, zeros: bool = False) -> KV:
    """One layer's K/V buffer of `rows` rows (zeros where a step attends over unwritten rows behind
    a mask: masked garbage could be NaN, and 0 * NaN = NaN in the weighted sum of values)."""
    shape = (1, model.cfg.num_kv_heads, rows, model.cfg.head_dim)
    make = torch.zeros if zeros else torch.empty
    return KV(make(shape, dtype=model.dtype, device=model.device),
              make(shape, dtype=model.dtype, device=model.device), 0)
