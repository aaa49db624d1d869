"""Replays every golden fixture found under MEMCLI_CONFORMANCE_DIR (FORMAT.md §3), fp32 on the CPU.

Every case starts from a fresh checkpoint state; every op's recorded outputs are compared with
FORMAT.md §6's tolerance (|got - ref| <= 1e-4 + 1e-4 |ref|), integers and ages exactly.
M+ layers whose LTM age order is a sort artifact of the reference (`order_ambiguous`) are replayed
with the recorded `ltm_order`; our own deterministic order is then checked against the
`+stable_argsort` alternative outputs, which used the same tie rule.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memcli.core.engine import Engine
from memcli.loading.checkpoints import initial_state, load_model
from memcli.loading.prompts import load_tokenizer

from .support import CONFORMANCE

ATOL = RTOL = 1e-4
STABLE = "flash_attention_2_emulated+stable_argsort"


def _variants() -> list[Path]:
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p.parent for p in CONFORMANCE.glob("*/cases.json"))


def _cases():
    params = []
    for folder in _variants():
        spec = json.loads((folder / "cases.json").read_text())
        for case in spec["cases"]:
            params.append(pytest.param(folder, case["name"], id=f"{folder.name}/{case['name']}"))
    return params or [pytest.param(None, None, id="no-fixtures")]


@lru_cache(maxsize=None)
def _load(folder: Path):
    spec = json.loads((folder / "cases.json").read_text())
    tensors = load_file(folder / spec["tensors_file"])
    model, reader = load_model(folder / spec["checkpoint"], dtype=torch.float32, rope_precision="fp32")
    tokenizer = load_tokenizer(folder / spec["checkpoint"])
    return spec, tensors, model, reader, tokenizer


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    got = got.detach().to(torch.float64).cpu().reshape(ref.shape)
    ref = ref.to(torch.float64)
    bad = (got - ref).abs() > ATOL + RTOL * ref.abs()
    if bad.any():
        worst = ((got - ref).abs() - RTOL * ref.abs()).max().item()
        pytest.fail(f"{what}: {int(bad.sum())} of {ref.numel()} values off (worst excess {worst:.3g})")


def _exact(got, ref, what: str) -> None:
    got = torch.as_tensor(got).cpu()
    if got.shape != ref.shape or not torch.equal(got.to(ref.dtype), ref):
        pytest.fail(f"{what}: got {got.tolist()} expected {ref.tolist()}")


@pytest.mark.parametrize("folder,case_name", _cases())
def test_fixture_case(folder, case_name):
    if folder is None:
        pytest.skip(f"no conformance fixtures under {CONFORMANCE}")
    spec, tensors, model, reader, tokenizer = _load(folder)
    case = next(c for c in spec["cases"] if c["name"] == case_name)
    state = initial_state(reader, model.cfg, dtype=torch.float32, seed=case["seed"])
    engine = Engine(model)
    stable_ok = spec.get("attn_implementations", {}).get(STABLE, {}).get("status") in ("ok", "golden")
    for index, op in enumerate(case["ops"]):
        where = f"{case_name} op {index} ({op['op']})"
        if op["op"] == "set_initialized":
            state.initialized = bool(op["value"])
            continue
        ids = tensors[op["inputs"]["input_ids"]]
        _check_source(tokenizer, op.get("source"), ids, where)
        if op["op"] == "inject":
            _replay_inject(engine, state, op, tensors, where)
        elif op["op"] in ("logits", "generate"):
            meta = op.get("ltm_retrieval") or []
            ambiguous = [m.get("order_ambiguous", False) for m in meta]
            forced = None
            if any(ambiguous):
                forced = [
                    tensors[op["outputs"][f"ltm_order/l{l}"]] if amb else None for l, amb in enumerate(ambiguous)
                ]
            _replay_read(engine, state, op, tensors, ids, forced, op["outputs"], where)
            if any(ambiguous) and stable_ok:
                expected = dict(op["outputs"])
                expected.update(op.get("alt_outputs", {}).get(STABLE, {}))
                _replay_read(engine, state, op, tensors, ids, None, expected, where + " [stable order]")
        else:
            pytest.fail(f"unknown op {op['op']!r} in {where}")


def _check_source(tokenizer, source, ids, where):
    """The recorded ids are what our prompt helpers make of the recorded text."""
    from memcli.loading.prompts import chat_prompt_ids

    if not source:
        return
    if source["kind"] == "chat":
        expected = chat_prompt_ids(tokenizer, source["messages"])
    else:
        expected = tokenizer(source["text"], add_special_tokens=False).input_ids
        if source["kind"] == "text_prefix":
            expected = expected[: source["num_tokens"]]
    _exact(torch.tensor([expected]), ids, f"{where} input ids from source")


def _replay_inject(engine, state, op, tensors, where):
    out = op["outputs"]
    delta = engine.inject(state, tensors[op["inputs"]["input_ids"]])
    _close(delta[None], tensors[out["delta_memory"]], f"{where} delta_memory")
    if not op["update_memory"]:
        return
    kept = op.get("replay_inputs", {}).get("kept_indices")
    engine.update(state, delta, kept=tensors[kept] if kept else None)
    if "memory_after" in out:
        _close(state.memory(), tensors[out["memory_after"]], f"{where} memory_after")
    if state.ltm is None:
        return
    cfg, ltm = engine.cfg, state.ltm
    if "memory_ages_after" in out:
        ages = torch.gather(state.stm_ages, 1, state.order)
        _exact(ages, tensors[out["memory_ages_after"]].double(), f"{where} memory_ages_after")
    for l in range(state.num_layers):
        ids = ltm.ids[l]
        fields = {
            "ltm_after": ltm.rows[l, ids],
            "ltm_keys_after": ltm.keys[l, ids],
        }
        for name, value in fields.items():
            if f"{name}/l{l}" in out:
                _close(value, tensors[out[f"{name}/l{l}"]], f"{where} {name}/l{l}")
        if f"ltm_ages_after/l{l}" in out:
            _exact(ltm.ages(ids, l, state.update_count, cfg.num_tokens),
                   tensors[out[f"ltm_ages_after/l{l}"]].double(), f"{where} ltm_ages_after/l{l}")
        if f"ltm_recall_frequencies_after/l{l}" in out:
            _exact(ltm.recall[l], tensors[out[f"ltm_recall_frequencies_after/l{l}"]].double(),
                   f"{where} ltm_recall_frequencies_after/l{l}")
    cache = ltm.cache_ids()
    if "cached_dropped_memories_after" in out:
        _close(ltm.rows[:, cache], tensors[out["cached_dropped_memories_after"]], f"{where} cached rows")
        _close(ltm.keys[:, cache], tensors[out["cached_dropped_keys_after"]], f"{where} cached keys")
        ages = torch.stack([ltm.ages(cache, l, state.update_count, cfg.num_tokens) for l in range(state.num_layers)])
        _exact(ages, tensors[out["cached_dropped_memory_ages_after"]].double(), f"{where} cached ages")
    if "update_step_after" in op:
        assert ltm.update_step == op["update_step_after"], where
    if "cached_dropped_count_after" in op:
        assert len(cache) == op["cached_dropped_count_after"], where
    if "ltm_sizes_after" in op:
        assert [len(i) for i in ltm.ids] == op["ltm_sizes_after"], where


def _replay_read(engine, state, op, tensors, ids, forced, expected, where):
    if op["op"] == "logits":
        logits, retrieval = engine.logits(state, ids, ltm_order=forced, record=True)
        _close(logits[None], tensors[expected["logits"]], f"{where} logits")
    else:
        gen = engine.generate(state, ids, max_new_tokens=op["max_new_tokens"],
                              stop_ids=tuple(op["eos_token_id"]), ltm_order=forced,
                              keep_logits=True, record=True)
        assert len(gen.tokens) == op["num_new_tokens"], where
        sequences = torch.cat((ids[0], torch.tensor(gen.tokens)))[None]
        _exact(sequences, tensors[expected["sequences"]], f"{where} sequences")
        _close(gen.step_logits, tensors[expected["step_logits"]], f"{where} step_logits")
        retrieval = gen.retrieval
    for l, record in enumerate(retrieval):
        if f"ltm_order/l{l}" in expected:
            _exact(record.order, tensors[expected[f"ltm_order/l{l}"]], f"{where} ltm_order/l{l}")
        if f"ltm_order_ages/l{l}" in expected:
            _exact(record.ages, tensors[expected[f"ltm_order_ages/l{l}"]].double(), f"{where} ltm_order_ages/l{l}")
        if f"ltm_scores/l{l}" in expected:
            assert record.scores is not None, f"{where}: layer {l} took the {record.path} path, expected topk"
            _close(record.scores, tensors[expected[f"ltm_scores/l{l}"]], f"{where} ltm_scores/l{l}")
