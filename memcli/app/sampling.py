"""Sampling parameters, checked one way wherever they come from (`memcli ask/chat --temperature`,
the server's /api/ask and /v1/chat/completions): finite numbers in range, or one line naming the
field. Light on purpose (no torch): the command line checks them before anything loads.

Temperature: 0 decodes greedily; a positive temperature below `MIN_TEMPERATURE` (0.01) decodes
greedily too. At such temperatures sampling already picks the most likely token except for ties
closer than ~1e-4 in logit, and below ~1e-38 dividing the logits overflows (inf/nan
probabilities), so one floor keeps every accepted value meaningful and safe.
"""

from __future__ import annotations

import math

MIN_TEMPERATURE = 0.01  # positive temperatures below this decode greedily
MAX_TEMPERATURE = 100.0
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what torch's generator takes


class SamplingError(ValueError):
    """A sampling parameter out of range; str() is one line naming it."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def finite_number(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float when it is a finite number (not a bool) within [low, high] ((low, high]
    with `low_open`); SamplingError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name} must be a number, not {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise SamplingError(f"{name} must be a number between {low:g} and {high:g}, not {_shown(value)}") from None
    if not math.isfinite(number):
        raise SamplingError(f"{name} must be a finite number, not {number}")
    if number < low or (low_open and number == low) or number > high:
        bounds = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise SamplingError(f"{name} must be {bounds}, not {_shown(value)}")
    return number


def check_sampling(temperature: object = 0.0, top_p: object = 1.0, seed: object = None, *,
                   max_temperature: float = MAX_TEMPERATURE, names=("temperature", "top_p", "seed"),
                   top_p_zero: bool = False) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed) ready for `memcli.core.engine.Sampling`, or SamplingError naming the
    field (`names`: how the caller calls them, e.g. "--temperature"). `top_p_zero`: allow top_p 0
    (the command line's historical range; it keeps the single most likely token)."""
    t_name, p_name, s_name = names
    t = finite_number(t_name, temperature, 0.0, max_temperature)
    if t < MIN_TEMPERATURE:
        t = 0.0  # greedy (see the module docstring)
    p = finite_number(p_name, top_p, 0.0, 1.0, low_open=not top_p_zero)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SamplingError(f"{s_name} must be an integer, not {_shown(seed)}")
        if not MIN_SEED <= seed <= MAX_SEED:
            raise SamplingError(f"{s_name} must be between {MIN_SEED} and {MAX_SEED}, not {_shown(seed)}")
    return t, p, seed
