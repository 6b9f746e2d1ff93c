"""Rules: the checks that turn measures (``measures.py``) into verdicts, each with its threshold,
the margins measured around it and its source.

Each check returns ``{"fired", "why", "value", "threshold"}``; ``diagnose`` runs them all. A
verdict is every rule that fired; ``healthy`` when none did, or ``insufficient`` when none did
and the run is too short to say so.

Margins come from docs/calibration.md: the tutorial configs (10 seeds, 500 epochs, SGD, today's
measure; "tut." below) and the architecture runs of issue 14 (3 seeds each: ResNet-style CNN
with BatchNorm, ResNet-34, tiny GPT-2 with tied embeddings, nanoGPT, nn.TransformerEncoder LM,
one-layer LSTM LM; and the pathological resnet_lr50, sigmoid_mlp, lstm_deep, dead_relu; "arch."
below). Sizes are ``||g|| / ||w||`` per layer (``measures.measure_layers``).

- vanishing (``check_vanishing``): the weakest hidden layer's early size (median over the first
  EARLY_FRACTION of windows) over the head's, under VANISHING_RATIO = 1/50, AND the first hidden
  layer (the input end) under INPUT_END_RATIO = 1/7 of the head. Hidden means neither the head
  nor a normalisation layer nor an embedding nor a projection shortcut (``downsample.0``,
  ``shortcut.0``: its He fan_out init makes its ||w|| 3x a 3x3 conv's per element, so its
  ||g||/||w|| sits lowest in a healthy ResNet for its init's sake: 1/46 - 1/27, shown only).
  Measured, weakest / head: deep tanh U(0, 1) 1/2180 - 1/336 (tut.); sigmoid_mlp ~1/1e8;
  lstm_deep 1/9050 - 1/6400 (arch.); healthy: deep ReLU He 1/3.1 - 1/0.59, Xavier tanh 1/5.7 -
  1/0.82, shallow tanh 1/12 - 1/1.3 (tut.); GPT-2 1.2 - 1.8, encoder LM 1/5.1 - 1/4.3, nanoGPT
  1/13.7 - 1/11.7, LSTM LM 1/2.4 - 1/2.3, ResNet 1/27 - 1/20, ResNet-34 1/28 - 1/24.5 (arch.:
  the thinnest healthy margin, 1.8x). Input end / head: deep tanh 1/67 - 1/14, sigmoid_mlp
  ~1e-8, lstm_deep ~1.6e-4; ResNet 1/4.9 - 1/2.9, ResNet-34 4.8 - 5.9. Near misses: deep_relu_15
  reads down to 1/44 (tut.), deep_tanh_adam 4 of 10 seeds ``vanishing`` (1/230 - 1/6.7).
  Source: Glorot & Bengio 2010 (gradients shrink layer by layer in saturating nets); the
  tutorial's first-versus-last-layer view; the guard: a gradient that vanishes on its way back
  is small at the input end, while one weak layer next to the head with a strong input end
  (a ResNet's last conv before ``fc``) is not vanishing.
- exploding (``check_exploding``, ``check_overflow``): any non-finite gradient value or epoch
  loss (DESIGN.md: count them, flag them); or a layer whose weights move more than
  EXPLODING_UPDATE = 0.5 of their norm per step in some window (a conv followed by a
  normalisation layer: in its last window, as its weights are scale-invariant and a large early
  step grows ||w|| and shrinks the next one; Hoffer et al. 2018, Arora et al. 2019); or the
  network's largest gradient growing GRADIENT_GROWTH = 1000x over its largest early size
  (Pascanu et al. 2013: exploding norms grow geometrically; a guard no calibration run reached);
  or a GradScaler that skipped at least OVERFLOW_FRACTION = 1/2 of the last window's steps (the
  scale halves at each skip, so overflow that persists is not calibration; torch.amp.GradScaler).
  Measured, largest judged update per step: deep ReLU <= 0.0066, shallow tanh <= 0.014, deep
  tanh <= 0.062 (tut.); LSTM LM 0.11 - 0.12, GPT-2 ~0.10, ResNet ~0.07, ResNet-34 ~0.04, nanoGPT
  0.243 - 0.246 (arch.: AdamW 3e-3 in its first window, then 0.11 and falling); blown up: deep
  ReLU at lr=10 1.18 - 6000 (tut., in the first window only), resnet_lr50 373 - 19900 (arch.).
  0.5 (0.3 before) is about the geometric mean of nanoGPT's 0.246 and lr=10's 1.18: 2.0x and
  2.4x margins. The ResNet-34's stem conv (BN after it) moves 0.30 - 0.32 per step in its first
  window and 0.0023 in its last. HEALTHY_UPDATE = 1e-3 (Karpathy, CS231n: updates ~1e-3 of the
  weights per step) is quoted in the evidence, not judged.
- saturated (``check_saturated``): a hidden tanh/sigmoid layer whose median share of outputs
  with |a| > 0.97 of its range exceeds SATURATED_FRACTION = 0.4. Measured worst layer: deep tanh
  U(0, 1) 0.44 - 0.80; Xavier tanh 0.18 - 0.34 (it learns), shallow tanh 0.06 - 0.31 (tut.): a
  thin margin both sides; in every deep tanh seed it comes with ``vanishing``. The output's
  squashing function (the last tap, bounded, of another kind than the one before) is left out.
  Source of 0.97: Glorot & Bengio 2010.
- dead-units (``check_dead``): a rectifier layer with every unit never positive in the last
  window (DEAD_FRACTION = 1.0: a fully dead layer passes no gradient), or every gradient exactly
  zero in the last window. Measured: healthy deep ReLU has at most 2 of 5 units of a layer dead;
  every failed 15- and 20-layer ReLU run has whole layers dead (tut.); dead_relu (biases -5,
  arch.) 3/3. Source: DESIGN.md, failed deep ReLU runs end at loss 0.693 with every gradient zero.
- stalled (``check_stalled``): the loss fell by less than STALL_DROP = 5% from the end of the
  early part to the end of the run (median of its last EARLY_FRACTION of epochs), or every
  gradient is exactly zero in the last window. Measured drop: deep ReLU 12 - 38%, Xavier tanh
  14 - 45%, shallow tanh 29 - 41%; failed 20-layer ReLU -1% - 0.1%; deep tanh 1 - 39% (a
  secondary verdict: 5 of 10 deep tanh seeds). The end, not the best epoch: a run that learned
  and collapsed back (20-layer ReLU) has stalled too.
- insufficient (``check_insufficient``): fewer than MIN_WINDOWS = 5 windows. It only replaces
  ``healthy``, never a rule that fired: a 1-epoch run is no evidence of health (issue 14), while
  a non-finite gradient in its one window is evidence of an explosion. 5 is a floor chosen, not
  calibrated: the shortest calibration runs have 10 windows (GPT-2: 30 steps, a window every 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

VANISHING_RATIO = 1 / 50    # weakest hidden layer's ||g||/||w|| / the head's, early windows
INPUT_END_RATIO = 1 / 7     # ... and the first hidden layer's must be under this share of the head's
MIN_WINDOWS = 5             # fewer windows than this: "insufficient" instead of "healthy"
EXPLODING_UPDATE = 0.5      # weights move by more than this share of their norm per step
GRADIENT_GROWTH = 1000.0    # the largest layer gradient this many times the largest early one
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
    head = next((name for name, row in layers.items() if row.get("role") == "head"), None)
    if head is None and layers:
        head = list(layers)[-1]
    hidden = [name for name, row in layers.items() if name != head and row.get("role", "hidden") == "hidden"]
    if not hidden:
        return _check(False, "only one layer: nothing to compare with the output layer")
    weakest = min(hidden, key=lambda name: _sortable(layers[name]["ratio_early"]))
    ratio = layers[weakest]["ratio_early"]
    first = layers[hidden[0]]
    why = (f"{weakest} gradient vs the output layer's ({head}), early on: {_relative(ratio)}{_weakest_gate(weakest, layers[weakest])}; "
           f"first hidden layer ({hidden[0]}): {_relative(first['ratio_early'])} early, "
           f"{_relative(first['ratio_last'])} last")
    input_end = first["ratio_early"]
    fired = (math.isfinite(ratio) and ratio < VANISHING_RATIO
             and not (math.isfinite(input_end) and input_end >= INPUT_END_RATIO))
    return _check(fired, why, ratio, VANISHING_RATIO)


def _weakest_gate(layer: str, row: Mapping[str, Any]) -> str:
    """`` (weakest gate: lstm.l0 forget gate ||g||/||w|| 9,000x smaller than the head's)`` for a
    recurrent layer with gate evidence, else ''."""
    gates = row.get("gates") or {}
    if not gates:
        return ""
    gate = min(gates, key=lambda g: _sortable(gates[g]["ratio_early"]))
    return f" (weakest gate: {layer} {gate} gate ||g||/||w|| {_relative(gates[gate]['ratio_early'])} than the head's)"


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
    # A conv followed by a normalisation layer is scale-invariant: its large early steps grow
    # ||w|| and shrink the next ones (a learning ResNet-34's stem conv: 0.30 in the first window,
    # 0.002 by the tenth), so it is judged on its last window, the others on their largest.
    updates = {name: row.get("update_ratio_last", math.nan) if row.get("normalised") else row["update_ratio_max"]
               for name, row in layers.items()}
    updates = {name: v for name, v in updates.items() if math.isfinite(v)}
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
    """Too few windows to judge: said first in the verdict; the rules that fired stand beside it
    as early signs."""
    count = len(windows)
    if count < MIN_WINDOWS:
        return _check(True, f"too short to judge: only {count} window{'' if count == 1 else 's'} recorded, "
                            f"at least {MIN_WINDOWS} needed; record more windows (gradflow train: one per epoch; "
                            "Lightning: one every log_every_n_steps steps; HF Trainer: every logging_steps steps; "
                            "your own loop: call monitor.log more often)", count, MIN_WINDOWS)
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
