"""Operations on (model, memory state): inject, update, logits, generate.

This is where the official code's semantics live (reference-semantics §4-§7, FORMAT.md §4); the
transformer itself is in `model.py`. An `Engine` is a loaded model plus three parts, one job each:

* `prefix.py`: the memory prefix's keys/values (`PrefixCache`), kept in the state they belong to
  and updated incrementally, so a repeated ask, or the ask after an inject, rebuilds nothing.
* `memory.py`: writing (`MemoryWriter`): the injection forward, the update with its random drop,
  and for M+ the move into the long-term bank and its merge.
* `generate.py`: reading (`MemoryReader`): logits and decoding, with M+ retrieval
  (`retrieval.py`) per layer and a decode step of fixed shapes that `compile_decode` compiles.

`reference=True` turns the cache off and recomputes the prefix on every call, like the original;
it exists to check the cached path against.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from memcli.core.generate import Generation, MemoryReader, Sampling
from memcli.core.memory import MemoryWriter
from memcli.core.model import Transformer
from memcli.core.prefix import LTM_DEVICE_BUDGET_BYTES, PrefixCaches
from memcli.core.retrieval import Retrieval
from memcli.core.state import MemoryState

__all__ = ["Engine", "Generation", "Retrieval", "Sampling"]  # what callers of the engine need


class Engine:
    """A loaded model plus the operations the official classes offer, on any compatible state.

    `cached_states`: how many states keep their memory K/V at once (the least recently read loses
    its cache first; device memory is the limit). `ltm_device_budget_bytes`: M+ long-term rows are
    mirrored on the model's device while the bank fits this budget (default 4 GiB: 32 layers x
    16k rows x 4096 x bf16), so a question gathers its retrieved rows there instead of copying
    ~0.7 GB from the host. `compile_decode`: on CUDA, run the decode step
    through `torch.compile(mode="reduce-overhead")` (CUDA graphs), falling back to eager if that
    fails. `reference=True` recomputes the prefix on every call, like the official code.
    `kv_keep_budget_bytes`: a state's memory K/V up to this size survives an inject and is updated
    incrementally (default: `prefix.default_kv_keep_budget`, a quarter of the device's memory); a
    larger one is freed when an inject starts.
    """

    def __init__(self, model: Transformer, reference: bool = False, scratch_rows: int | None = None,
                 cached_states: int = 1, compile_decode: bool = False,
                 ltm_device_budget_bytes: int = LTM_DEVICE_BUDGET_BYTES,
                 kv_keep_budget_bytes: int | None = None):
        self.model = model
        self.cfg = model.cfg
        # rows after the prefix: sized once for the model's window, so no question + answer
        # within it ever regrows (and copies) the memory K/V buffer
        self.prefixes = PrefixCaches(model, scratch_rows or self.cfg.window, cached_states,
                                     kv_keep_budget_bytes, reference)
        self.writer = MemoryWriter(model, self.prefixes)
        self.reader = MemoryReader(model, self.prefixes, ltm_device_budget_bytes, compile_decode)
        self._token = self.prefixes.token  # names this engine's entry in a state's derived data

    @property
    def reference(self) -> bool:
        return self.prefixes.reference

    @property
    def kv_keep_budget_bytes(self) -> int:
        return self.prefixes.keep_bytes

    @property
    def cached_states(self) -> int:
        return self.prefixes.cached_states

    @property
    def scratch_rows(self) -> int:
        return self.prefixes.scratch_rows

    @property
    def ltm_device_budget_bytes(self) -> int:
        return self.reader.ltm_device_budget_bytes

    @property
    def compiled(self) -> bool:
        """Whether the decode step runs compiled (False again after a compilation failure)."""
        return self.reader.compiled

    # ------------------------------------------------------------------ writing
    def inject(self, state: MemoryState, ids: Tensor) -> Tensor:
        """One injection forward (encoder adapter): the new memory rows [L, K', d]; state unchanged.

        K' = K, except for an uninitialized pool where it is min(K, c) (reference-semantics §4.1).
        """
        return self.writer.inject(state, ids)

    def choose_kept(self, state: MemoryState) -> Tensor:
        """Random drop from the state's own generator: [L, N-K] ascending logical rows to keep."""
        return self.writer.choose_kept(state)

    def update(self, state: MemoryState, delta: Tensor, kept: Tensor | None = None, origin: int | Tensor = 0) -> None:
        """Write new rows into the state: drop K rows (or `kept` explicitly) and append `delta`;
        `origin` tags the new rows for provenance (one serial, or one per new row)."""
        self.writer.update(state, delta, kept=kept, origin=origin)

    # ------------------------------------------------------------------ reading
    def logits(self, state: MemoryState, ids: Tensor, ltm_order: list[Tensor] | None = None,
               all_rows: bool = True, record: bool = False) -> tuple[Tensor, list[Retrieval]]:
        """Logits of a plain (non-injection) forward over `ids` with the full memory: [T, V] fp32.
        M+ retrieval records come back only when `record` is set."""
        return self.reader.logits(state, ids, ltm_order=ltm_order, all_rows=all_rows, record=record)

    def generate(self, state: MemoryState, ids: Tensor, max_new_tokens: int = 64, stop_ids: tuple[int, ...] = (),
                 sampling: Sampling | None = None, on_token: Callable[[int], None] | None = None,
                 ltm_order: list[Tensor] | None = None, keep_logits: bool = False,
                 record: bool = False) -> Generation:
        """Decode with a KV cache after one prefill over [prefix ; ids] (`MemoryReader.generate`).
        `keep_logits`: also return every step's fp32 logits (tests); `record`: M+ retrieval records."""
        return self.reader.generate(state, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling,
                                    on_token=on_token, ltm_order=ltm_order, keep_logits=keep_logits, record=record)

    def forget_prefix(self) -> None:
        """Drop every memory K/V cache this engine made (frees their device memory)."""
        self.prefixes.forget()
