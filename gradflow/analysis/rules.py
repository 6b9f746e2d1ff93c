"""Rules: the checks that turn measures into verdicts, each with its threshold.

Each check returns ``{"fired", "why", "value", "threshold"}``; ``diagnose`` runs them all.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

VANISHING_RATIO = 1 / 50    # weakest hidden layer's ||g||/||w|| / the head's, early windows
INPUT_END_RATIO = 1 / 7     # ... and the first hidden layer's must be under this share of the head's
MIN_WINDOWS = 5             # fewer windows than this: "insufficient" instead of "healthy"
EXPLODING_UPDATE = 0.3      # weights move by more than this share of their norm per step
GRADIENT_GROWTH = 1000.0    # the largest layer mean |g| this many times the largest early one
SATURATED_FRACTION = 0.4    # share of a hidden tanh/sigmoid layer's outputs with |a| > 0.97
DEAD_FRACTION = 1.0         # share of a ReLU layer's units never positive in the last window
STALL_DROP = 0.05           # the loss must fall at least this much (relative) after the early part
HEALTHY_UPDATE = 1e-3       # Karpathy's rule of thumb for update / weight per step (evidence only)
OVERFLOW_FRACTION = 0.5     # of the last window's steps skipped by a GradScaler: the gradient keeps overflowing


def _check(fired: bool, why: str, value: float | None = None, threshold: float | None = None) -> dict[str, Any]:
    return {"fired": bool(fired), "why": why, "value": value, "threshold": threshold}


def _relative(ratio: float) -> str:
    """0.01 -> ``100x smaller``; 3 -> ``3x larger``; 0 -> ``zero``."""
    if not math.isfinite(ratio):
        return "n/a"
    if ratio <= 0:
        return "zero"
    return f"{_times(1 / ratio)} smaller" if ratio < 1 else f"{_times(ratio)} larger"


def _times(factor: float) -> str:
    return f"{factor:.2g}x" if factor < 10 else f"{factor:,.0f}x"


def check_vanishing(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The weakest hidden layer's early gradient against the head's, and the input end's.

    Fires when the weakest hidden layer is under VANISHING_RATIO of the head's AND the first
    hidden layer (the input end) is under INPUT_END_RATIO of it: a gradient that vanishes on
    its way back is small at the input end, while one weak layer near the output with a strong
    input end (a ResNet's last conv before ``fc``) is not vanishing. Normalisation layers and
    the head are not hidden layers.
    """
    head = next((l for l, row in layers.items() if row.get("role") == "head"), None)
    if head is None and layers:
        head = list(layers)[-1]
    hidden = [l for l, row in layers.items() if l != head and row.get("role", "hidden") == "hidden"]
    if not hidden:
        return _check(False, "only one layer: nothing to compare with the output layer")
    weakest = min(hidden, key=lambda l: _sortable(layers[l]["ratio_early"]))
    ratio = layers[weakest]["ratio_early"]
    first = layers[hidden[0]]
    why = (f"{weakest} gradient vs the output layer's ({head}), early on: {_relative(ratio)}; "
           f"first hidden layer ({hidden[0]}): {_relative(first['ratio_early'])} early, "
           f"{_relative(first['ratio_last'])} last")
    input_end = first["ratio_early"]
    fired = (math.isfinite(ratio) and ratio < VANISHING_RATIO
             and not (math.isfinite(input_end) and input_end >= INPUT_END_RATIO))
    return _check(fired, why, ratio, VANISHING_RATIO)


def _sortable(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def fmt_number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "n/a"


def check_exploding(layers: Mapping[str, Mapping[str, float]], loss: Mapping[str, float] | None) -> dict[str, Any]:
    """Non-finite gradients or loss, huge weight updates, or a gradient that grows without bound."""
    nonfinite = sum(row["nonfinite"] for row in layers.values())
    if nonfinite or (loss and loss["nonfinite"]):
        lost = loss["nonfinite"] if loss else 0
        return _check(True, f"{nonfinite} non-finite gradient values, {lost} non-finite epoch losses", nonfinite, 0)
    updates = {l: row["update_ratio_max"] for l, row in layers.items() if math.isfinite(row["update_ratio_max"])}
    if updates:
        layer = max(updates, key=updates.get)
        if updates[layer] > EXPLODING_UPDATE:
            return _check(True, f"{layer} weights moved {_times(updates[layer])} their norm per step in one window "
                                f"(healthy: about {HEALTHY_UPDATE:g})", updates[layer], EXPLODING_UPDATE)
    # Growth of the network's largest gradient, not of one layer's: a layer that vanished
    # early and recovers (deep ReLU, 20 layers) grows 1000x without anything exploding.
    early = max((row["gradient_early"] for row in layers.values() if math.isfinite(row["gradient_early"])), default=0.0)
    peak = max((row["gradient_peak"] for row in layers.values() if math.isfinite(row["gradient_peak"])), default=0.0)
    if early > 0 and peak / early > GRADIENT_GROWTH:
        return _check(True, f"the largest gradient grew {_times(peak / early)} over its early size",
                      peak / early, GRADIENT_GROWTH)
    largest = max(updates.values()) if updates else math.nan
    return _check(False, f"all finite; largest update ratio per step {fmt_number(largest)}", largest, EXPLODING_UPDATE)


def check_saturated(activations: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The most saturated hidden tanh/sigmoid layer."""
    bounded = {n: r["saturated"] for n, r in activations.items() if "saturated" in r and not r.get("output")}
    if not bounded:
        return _check(False, "no hidden tanh or sigmoid activations recorded")
    name = max(bounded, key=bounded.get)
    value = bounded[name]
    return _check(value > SATURATED_FRACTION, f"{value:.0%} of {name} outputs saturated (|a| > 0.97)",
                  value, SATURATED_FRACTION)


def check_dead(activations: Mapping[str, Mapping[str, Any]],
               layers: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Whole rectifier layers dead in the last window, or no gradient anywhere."""
    dead = {n: r["dead"] for n, r in activations.items() if math.isfinite(r.get("dead", math.nan))}
    full = [n for n, value in dead.items() if value >= DEAD_FRACTION]
    if full:
        return _check(True, f"every unit of {_names(full)} dead (never positive) in the last window",
                      len(full), DEAD_FRACTION)
    if layers and all(row["zero_last"] == 1.0 for row in layers.values()):
        return _check(True, "every gradient exactly zero in the last window", 1.0, 1.0)
    if not dead:
        return _check(False, "no ReLU-type activations recorded")
    name = max(dead, key=dead.get)
    return _check(False, f"at most {dead[name]:.0%} of a layer's units dead ({name})", dead[name], DEAD_FRACTION)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ... {names[-1]} ({len(names)} layers)"


def check_stalled(layers: Mapping[str, Mapping[str, float]], loss: Mapping[str, float] | None) -> dict[str, Any]:
    """The loss no longer falls after the early part, or nothing can move any more."""
    if layers and all(row["zero_last"] == 1.0 for row in layers.values()):
        return _check(True, "no gradient left: the weights cannot change", 0.0, STALL_DROP)
    if not loss:
        return _check(False, "no loss history to judge")
    # The end of the run, not the best epoch: a run that learned and then collapsed back to a
    # constant prediction (20-layer ReLU, seed 2) has stalled too.
    start, tail = loss["early"], loss["tail"]
    if not (math.isfinite(start) and math.isfinite(tail)) or start <= 0:
        return _check(False, "loss not finite", None, STALL_DROP)
    drop = (start - tail) / start
    moved = f"fell {drop:.1%}" if drop > -0.0005 else f"rose {-drop:.1%}"
    why = f"loss {moved} after the early part ({start:.3g} -> {tail:.3g} at the end)"
    return _check(drop < STALL_DROP, why, drop, STALL_DROP)



def check_insufficient(windows: Sequence[Any], loss: Mapping[str, float] | None) -> dict[str, Any]:
    """Too few windows to call a run healthy: only replaces ``healthy``, never a fired rule."""
    count = len(windows)
    if count < MIN_WINDOWS:
        return _check(True, f"only {count} window(s): log at least {MIN_WINDOWS} windows (for example one per "
                            f"epoch over {MIN_WINDOWS}+ epochs, or every N steps) to judge the trend", count,
                      MIN_WINDOWS)
    return _check(False, f"{count} windows (at least {MIN_WINDOWS} needed)", count, MIN_WINDOWS)



OVERFLOW_FRACTION = 0.5     # of the last window's steps skipped by a GradScaler: the gradient keeps overflowing


def skipped_steps(window: Any) -> tuple[int, int]:
    """(skipped, all) steps of a window: GradScaler skips are kept apart from applied steps."""
    skipped = int(getattr(window, "overall", {}).get("skipped_steps", 0) or 0)
    return skipped, int(getattr(window, "steps", 0) or 0) + skipped



def check_overflow(check: dict[str, Any], windows: Sequence[Any]) -> dict[str, Any]:
    """Exploding also when a GradScaler skipped most of the last window's steps: the scale
    halves at each skip (torch.amp.GradScaler), so overflow that persists is a gradient that
    overflows at any scale, not calibration."""
    skipped, total = skipped_steps(windows[-1])
    if check["fired"] or not total or skipped / total < OVERFLOW_FRACTION:
        return check
    return _check(True, f"{skipped} of {total} steps of the last window skipped on overflow (GradScaler)",
                  skipped / total, OVERFLOW_FRACTION)
