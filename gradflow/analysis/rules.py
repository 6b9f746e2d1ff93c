"""Rules: the checks that turn measures (``measures.py``) into verdicts, in one table.

``RULES`` holds every rule: its name (the verdict word), the measure it reads, its threshold,
the source of the threshold and the key of its advice (``advice.ADVICE``). ``diagnose``, the
advice and docs/calibration.md (the table there is ``rules_markdown()``, checked by a test) all
read it, so a new rule is one ``Rule`` entry: a check function ``check(evidence) -> dict``.

Each check returns ``{"fired", "why", "value", "threshold", "checked"}`` and, where the measure
crossed its threshold without the harm or persistence a verdict needs, a ``note`` (said in the
report, not a verdict). ``checked`` is False when the check had nothing to judge (no loss history,
no activation of its kind, the loss function unknown): the report marks it ``n/a``, not ``no``. A
verdict is every rule that fired; ``healthy`` when none did, or ``insufficient`` when none did
and the run is too short to say so.

Margins (docs/calibration.md): the tutorial configs (10 seeds, 500 epochs, SGD; "tut."), the
architecture runs of issue 14 (ResNets, GPT-2, nanoGPT, encoder LM, LSTM LM, and the
pathological resnet_lr50, sigmoid_mlp, lstm_deep, dead_relu) and of issue 23 (U-Nets, ViTs,
MLP-Mixer, pre-/post-LN transformers, a plain CNN with BatchNorm, LoRA, long-range RNN/LSTM,
and the classic pathologies: Glorot & Bengio 2010, He et al. 2015, Xiong et al. 2020, Pascanu
et al. 2013, one step at 1000x the learning rate); 3 seeds each ("arch."). Sizes are
``||g|| / ||w||`` per layer (``measures.measure_layers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VANISHING_RATIO = 1 / 50    # weakest hidden layer's ||g||/||w|| / the head's
INPUT_END_RATIO = 1 / 7     # ... and the first hidden layer's must be under this share of the head's
MIN_WINDOWS = 5             # fewer windows than this: "insufficient" instead of "healthy"
EXPLODING_UPDATE = 0.5      # weights move by more than this share of their norm per step
GRADIENT_GROWTH = 1000.0    # one step's total gradient norm this many times the early norm
CLIPPED_SHARE = 0.5         # of the steps that called clip_grad_norm_, the share that clipped
CLIP_EXCESS = 100.0         # the norm before clipping over the norm after, in those windows
LARGER_THAN_HEAD = 1e3      # a hidden layer's ||g||/||w|| this many times the head's, over the run
SATURATED_FRACTION = 0.4    # share of a hidden tanh/sigmoid layer's outputs with |a| > 0.97
SATURATED_END = 0.1         # a bounded layer's mean output within this share of its range of an end
SATURATED_DROP = 0.25       # a saturated share is harm while the loss falls less than this after the early part
                            # (tut. share > 0.4: not learned, test <= 0.68, fell 0.9% - 19%; learned, 0.806, 39%)
DEAD_FRACTION = 0.5         # share of a rectifier layer's units never positive in the last window (with harm)
STALL_DROP = 0.05           # the loss must fall at least this much (relative) after the early part
HEALTHY_UPDATE = 1e-3       # Karpathy's rule of thumb for update / weight per step (evidence only)
OVERFLOW_FRACTION = 0.5     # of the last window's steps skipped by a GradScaler: the gradient keeps overflowing
TINY_GRADIENT = 1e-4        # every judged layer's ||g||/||w||, median over the run, under this
OSCILLATION = 0.2           # swing of the loss between windows, relative to its level, late in the run
PROBABILITY_LOSSES = ("NLLLoss", "BCELoss", "KLDivLoss", "PoissonNLLLoss", "GaussianNLLLoss")
PROBABILITY_OUTPUTS = ("Softmax", "LogSoftmax", "Sigmoid", "Softmin")


@dataclass
class Evidence:
    """What the checks read: ``layers`` and ``activations`` (``measures.py``), ``loss``
    (``measures.measure_loss``, None without a loss history), the raw ``losses`` and
    ``windows``, and from the model where known: ``output`` (the class name of the module the
    model ends with) and ``loss_fn`` (the class name of the loss function); ``context``: where
    the windows came from (``loop``: a user's own loop; ``run``: a ``gradflow train`` run)."""

    layers: Mapping[str, Mapping[str, Any]]
    activations: Mapping[str, Mapping[str, Any]]
    loss: Mapping[str, float] | None
    windows: Sequence[Any]
    losses: Sequence[float] | None = None
    output: str | None = None
    loss_fn: str | None = None
    context: str = "loop"
    extra: dict[str, Any] = field(default_factory=dict)


def _check(fired: bool, why: str, value: float | None = None, threshold: float | None = None,
           note: str | None = None) -> dict[str, Any]:
    out = {"fired": bool(fired), "why": why, "value": value, "threshold": threshold, "checked": True}
    if note and not fired:
        out["note"] = note
    return out


# Said where no activation at all was recorded: the monitor taps activation modules only.
UNSEEN = (" (the monitor taps activation modules; a functional one, F.relu or torch.tanh called in a forward as "
          "nn.TransformerEncoderLayer does, is not seen)")


def _unchecked(why: str) -> dict[str, Any]:
    """A check with nothing to judge: not fired, ``checked`` False (the report's ``n/a``)."""
    return {**_check(False, why), "checked": False}


def _relative(ratio: float) -> str:
    """0.01 -> ``100x smaller``; 3 -> ``3x larger``; 0 -> ``zero``."""
    if not math.isfinite(ratio):
        return "n/a"
    if ratio <= 0:
        return "zero"
    return f"{_times(1 / ratio)} smaller" if ratio < 1 else f"{_times(ratio)} larger"


def _times(factor: float) -> str:
    """3 -> ``3x``; 852 -> ``852x``; past a million in scientific notation: ``2.4e+22x``."""
    return f"{factor:.2g}x" if factor < 10 else f"{factor:,.0f}x" if factor < 1e6 else f"{factor:.1e}x"


def layer_name(name: str) -> str:
    """A layer or module name as the check lines say it: quoted when it starts with a digit
    (nn.Sequential's ``0``, ``2.lin``: "layer '0' gradient", not "0 gradient"), else as is."""
    return f"layer '{name}'" if name[:1].isdigit() else name


def _quoted(name: str) -> str:
    """A name in parentheses after the word layer: ``'4'`` for a numeric one, else as is."""
    return f"'{name}'" if name[:1].isdigit() else name


def _sortable(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def fmt_number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "n/a"


# -- vanishing -------------------------------------------------------------------------------


def _head(layers: Mapping[str, Mapping[str, Any]]) -> str | None:
    head = next((layer for layer, row in layers.items() if row.get("role") == "head"), None)
    return head if head is not None or not layers else list(layers)[-1]


def _vanishing_at(layers: Mapping[str, Mapping[str, Any]], hidden: Sequence[str], point: str) -> tuple[bool, str, float]:
    """At ``point`` (early, middle, last): (the rule holds, the weakest hidden layer, its ratio)."""
    weakest = min(hidden, key=lambda layer: _sortable(layers[layer][f"ratio_{point}"]))
    ratio = layers[weakest][f"ratio_{point}"]
    input_end = layers[hidden[0]][f"ratio_{point}"]
    holds = (math.isfinite(ratio) and ratio < VANISHING_RATIO
             and not (math.isfinite(input_end) and input_end >= INPUT_END_RATIO))
    return holds, weakest, ratio


def check_vanishing(ev: Evidence) -> dict[str, Any]:
    """The weakest hidden layer's gradient against the head's, and the input end's, early on;
    a verdict only with persistent evidence or harm.

    The early rule: the weakest hidden layer under VANISHING_RATIO of the head's AND the first
    hidden layer (the input end) under INPUT_END_RATIO of it (a gradient that vanishes on its
    way back is small at the input end; one weak layer near the output with a strong input end,
    a ResNet's last conv before ``fc``, is not vanishing). It fires only when the rule still
    holds in the middle and last windows (the layers stay far behind, not only at init), or
    the loss stalls (``stalled``: the harm). Otherwise the early ratio is a note: attention's Q
    and K while attention is uniform, a U-Net's bottom, a patch embedding or a LoRA A under a
    zero B learn slowly at first and catch up. Normalisation layers, embeddings, shortcuts and
    the head are not hidden layers.
    """
    layers = ev.layers
    head = _head(layers)
    hidden = [layer for layer, row in layers.items() if layer != head and row.get("role", "hidden") == "hidden"]
    if not hidden:
        return _unchecked("only one layer: nothing to compare with the output layer")
    early, weakest, ratio = _vanishing_at(layers, hidden, "early")
    first = layers[hidden[0]]
    why = (f"{layer_name(weakest)} gradient vs the output layer's ({_quoted(head)}), early on: {_relative(ratio)}"
           f"{_weakest_gate(weakest, layers[weakest])}; first hidden layer ({_quoted(hidden[0])}): "
           f"{_relative(first['ratio_early'])} early, {_relative(first['ratio_last'])} last")
    if not early:
        return _check(False, why, ratio, VANISHING_RATIO)
    persistent = all(_vanishing_at(layers, hidden, point)[0] for point in ("middle", "last"))
    drop = loss_drop(ev.loss)
    harmed = drop is not None and drop < STALL_DROP
    if persistent or harmed:
        # The loss's fall is the stalled check's figure (it fires too): said there, once.
        reason = "and still in the middle and last windows" if persistent else "and the loss stalled"
        return _check(True, f"{why}; {reason}", ratio, VANISHING_RATIO)
    _, late, late_ratio = _vanishing_at(layers, hidden, "last")
    fell = f"; the loss still fell {drop:.0%}" if drop is not None else ""
    note = (f"{layer_name(weakest)}'s gradient is {_relative(ratio)} than the head's early on, but not persistently "
            f"(weakest at the end: {layer_name(late)}, {_relative(late_ratio)}){fell}: a slow start, not vanishing")
    return _check(False, why + "; not persistent and no harm", ratio, VANISHING_RATIO, note)


def _weakest_gate(layer: str, row: Mapping[str, Any]) -> str:
    """`` (weakest gate: lstm.l0 forget gate ||g||/||w|| 9,000x smaller than the head's)`` for a
    recurrent layer with gate evidence, else ''."""
    gates = row.get("gates") or {}
    if not gates:
        return ""
    gate = min(gates, key=lambda g: _sortable(gates[g]["ratio_early"]))
    return f" (weakest gate: {layer_name(layer)} {gate} gate ||g||/||w|| {_relative(gates[gate]['ratio_early'])} than the head's)"


# -- exploding -------------------------------------------------------------------------------


def check_exploding(ev: Evidence) -> dict[str, Any]:
    """Non-finite gradients or loss; huge weight updates; clipping that hides an explosion; one
    step's gradient far above the early ones; a hidden layer far larger than the head; a
    GradScaler that keeps skipping (``_overflow``). The first that fires names the mechanism."""
    notes = []
    for found in (_nonfinite(ev), _huge_update(ev), _clipping(ev), _spike(ev), _larger_than_head(ev), _overflow(ev)):
        if found["fired"]:
            return found
        if found.get("note"):
            notes.append(found["note"])
    largest = _huge_update(ev)
    return _check(False, f"all finite; {largest['why'].rpartition('; ')[2]}", largest["value"], EXPLODING_UPDATE,
                  "; ".join(notes) or None)


def _nonfinite(ev: Evidence) -> dict[str, Any]:
    """Non-finite values in the gradients the optimizer applied, in the losses given, or seen by
    the monitor's first-non-finite part (``nonfinite=True``: ``Window.first_nonfinite``) in a
    forward or backward pass whose step never came (a loop that skips the step on a NaN loss)."""
    nonfinite = sum(row["nonfinite"] for row in ev.layers.values())
    lost = ev.loss["nonfinite"] if ev.loss else 0
    sourced = sum(getattr(w, "first_nonfinite", None) is not None for w in ev.windows)
    if sourced and not (nonfinite or lost):
        return _check(True, f"non-finite values in the passes of {sourced} of {len(ev.windows)} windows, none in a "
                            "gradient the optimizer applied (a loop that skips the step on a NaN loss)", sourced, 0)
    return _check(bool(nonfinite or lost), f"{nonfinite} non-finite gradient values, {lost} non-finite losses",
                  nonfinite, 0)


def _huge_update(ev: Evidence) -> dict[str, Any]:
    # A conv followed by a normalisation layer is scale-invariant: its large early steps grow
    # ||w|| and shrink the next ones (a learning ResNet-34's stem conv: 0.30 in the first window,
    # 0.002 by the tenth), so it is judged on its last window, the others on their largest.
    updates = {layer: row.get("update_ratio_last", math.nan) if row.get("normalised") else row["update_ratio_max"]
               for layer, row in ev.layers.items()}
    updates = {layer: v for layer, v in updates.items() if math.isfinite(v)}
    if not updates:
        return _check(False, "no weight updates recorded")
    layer = max(updates, key=updates.get)
    return _check(updates[layer] > EXPLODING_UPDATE,
                  f"{layer_name(layer)} weights moved {_times(updates[layer])} their norm per step in one window "
                  f"(healthy: about {HEALTHY_UPDATE:g}); largest update ratio per step {fmt_number(updates[layer])}",
                  updates[layer], EXPLODING_UPDATE)


def clipping(windows: Sequence[Any]) -> tuple[int, int, float]:
    """(windows whose steps called clip_grad_norm_, of them those where most steps clipped, the
    median over those of the norm before clipping / the norm the step applied)."""
    called, mostly, excess = 0, 0, []
    for w in windows:
        overall = getattr(w, "overall", {}) or {}
        calls = overall.get("clip_calls") or 0
        if not calls:
            continue
        called += 1
        if overall.get("clipped_steps", 0) / calls >= CLIPPED_SHARE:
            mostly += 1
            after = overall.get("total_norm") or math.nan
            before = overall.get("total_norm_before_clip", math.nan)
            excess.append(before / after if after > 0 else math.nan)
    finite = [e for e in excess if math.isfinite(e)]
    return called, mostly, float(np.median(finite)) if finite else math.nan


def _clipping(ev: Evidence) -> dict[str, Any]:
    """Pascanu et al. 2013: clipping keeps an exploding gradient's steps bounded, so the updates
    look calm; the norm before clipping, far above the clip value in most steps, does not."""
    called, mostly, excess = clipping(ev.windows)
    if not called:
        return _check(False, "no clipping call seen (a hand-written clip is not seen)")
    fired = mostly > called / 2 and math.isfinite(excess) and excess > CLIP_EXCESS
    return _check(fired, f"clipping calls clipped most steps in {mostly} of {called} windows, the norm before "
                         f"clipping {fmt_number(excess)}x the norm applied (median)", excess, CLIP_EXCESS)


def _spike(ev: Evidence) -> dict[str, Any]:
    """One step's total norm (``overall['total_norm_max']``: the largest of a window's steps,
    not its mean) against the early windows' mean norm per step (Pascanu et al. 2013: an
    exploding norm grows geometrically, in a step or a few)."""
    windows = ev.windows
    means = np.array([(getattr(w, "overall", {}) or {}).get("total_norm", math.nan) for w in windows], dtype=float)
    peaks = np.array([(getattr(w, "overall", {}) or {}).get("total_norm_max", math.nan) for w in windows], dtype=float)
    early = max(1, len(windows) // 10)
    base = np.nanmedian(means[:early]) if np.isfinite(means[:early]).any() else math.nan
    if not (math.isfinite(base) and base > 0) or not np.isfinite(peaks).any():
        return _spike_from_layers(ev)
    index = int(np.nanargmax(peaks))
    growth = peaks[index] / base
    why = f"the largest one-step gradient norm (window {index}) is {_times(growth)} the early norm per step"
    drop = loss_drop(ev.loss)
    if growth > GRADIENT_GROWTH and drop is not None and drop >= STALL_DROP:
        # A spike the run recovered from (a learning LSTM at T=100: 2,400x in one step, loss to 0.01)
        # is not an explosion by itself: a verdict with harm, the loss stalled (or no loss to tell).
        return _check(False, why, float(growth), GRADIENT_GROWTH,
                      note=f"{why}, but the loss still fell {drop:.0%}: a spike the run recovered from")
    return _check(growth > GRADIENT_GROWTH, why, float(growth), GRADIENT_GROWTH)


def _spike_from_layers(ev: Evidence) -> dict[str, Any]:
    """Tables without the overall figures: the network's largest per-window gradient against
    its largest early one (a layer that vanished early and recovers grows without exploding)."""
    early = max((r["gradient_early"] for r in ev.layers.values() if math.isfinite(r["gradient_early"])), default=0.0)
    peak = max((r["gradient_peak"] for r in ev.layers.values() if math.isfinite(r["gradient_peak"])), default=0.0)
    growth = peak / early if early > 0 else math.nan
    return _check(math.isfinite(growth) and growth > GRADIENT_GROWTH,
                  f"the largest gradient grew {_times(growth) if math.isfinite(growth) else 'n/a'} over its early size",
                  growth, GRADIENT_GROWTH)


def _larger_than_head(ev: Evidence) -> dict[str, Any]:
    """A hidden layer whose ||g||/||w|| stays far above the head's (early, middle and last):
    the gradient grows on its way back (a recurrent layer through time, Pascanu et al. 2013)."""
    head = _head(ev.layers)
    hidden = {layer: min(r["ratio_early"], r["ratio_middle"], r["ratio_last"])
              for layer, r in ev.layers.items() if layer != head and r.get("role") == "hidden"}
    hidden = {layer: v for layer, v in hidden.items() if math.isfinite(v)}
    if not hidden:
        return _check(False, "no hidden layer to compare with the head")
    layer = max(hidden, key=hidden.get)
    return _check(hidden[layer] > LARGER_THAN_HEAD, f"{layer_name(layer)} gradient {_relative(hidden[layer])} than the head's "
                                                     "(its smallest of early, middle, last)", hidden[layer], LARGER_THAN_HEAD)


def skipped_steps(window: Any) -> tuple[int, int]:
    """(skipped, all) steps of a window: GradScaler skips are kept apart from applied steps."""
    skipped = int(getattr(window, "overall", {}).get("skipped_steps", 0) or 0)
    return skipped, int(getattr(window, "steps", 0) or 0) + skipped


def _overflow(ev: Evidence) -> dict[str, Any]:
    """Exploding also when a GradScaler skipped most of the last window's steps: the scale
    halves at each skip (torch.amp.GradScaler), so overflow that persists is a gradient that
    overflows at any scale, not calibration."""
    skipped, total = skipped_steps(ev.windows[-1])
    if not total or skipped / total < OVERFLOW_FRACTION:
        return _check(False, f"{skipped} of {total} steps of the last window skipped on overflow")
    return _check(True, f"{skipped} of {total} steps of the last window skipped on overflow (GradScaler)",
                  skipped / total, OVERFLOW_FRACTION)


# -- units -------------------------------------------------------------------------------------


def check_saturated(ev: Evidence) -> dict[str, Any]:
    """The most saturated hidden bounded layer, at either end of its range: the share of
    outputs past 0.97 of the range (both ends) over SATURATED_FRACTION, or a mean output within
    SATURATED_END of the range of one end (a sigmoid layer driven toward 0, Glorot & Bengio
    2010, Fig. 2: its derivative a(1 - a) there is under 0.09, against 0.25 at the centre).
    Either is a verdict only with harm, else a note (issue 23: a run that learns is not called a
    pathology). For the share, harm is the loss falling less than SATURATED_DROP after the early
    part (``loss_drop``), or no loss to judge by: tutorial deep_tanh seed 5 learned (test 0.806,
    loss fell 39%) with 47% of a layer past 0.97, while the seeds with a share over 0.4 that did
    not learn (test <= 0.68) fell 0.9% - 19%, most of them more than STALL_DROP (5%). For the
    end, harm is the loss stalled (< STALL_DROP)."""
    bounded = {n: r for n, r in ev.activations.items() if "saturated" in r and not r.get("output")}
    if not bounded:
        return _unchecked("no hidden tanh or sigmoid activations recorded" + ("" if ev.activations else UNSEEN))
    name = max(bounded, key=lambda n: bounded[n]["saturated"])
    value = bounded[name]["saturated"]
    why = f"{value:.0%} of {layer_name(name)} outputs saturated (|a| > 0.97 of the range)"
    drop = loss_drop(ev.loss)
    if value > SATURATED_FRACTION:
        if drop is None or drop < SATURATED_DROP:
            # Under STALL_DROP (a rise included) the stalled check fires and gives the figure: said once.
            harm = (", no loss to judge harm by" if drop is None else ", and the loss stalled" if drop < STALL_DROP
                    else f", and the loss fell only {drop:.1%} (< {SATURATED_DROP:.0%})")
            return _check(True, why + harm, value, SATURATED_FRACTION)
        return _check(False, why + f"; the loss still fell {drop:.0%}", value, SATURATED_FRACTION,
                      note=f"{why}, over {SATURATED_FRACTION:g}; the loss still fell {drop:.0%}: not a verdict")
    ends = {n: r["end"] for n, r in bounded.items() if math.isfinite(r.get("end", math.nan))}
    near = min(ends, key=ends.get) if ends else None
    if near is None or ends[near] >= SATURATED_END:
        return _check(False, why, value, SATURATED_FRACTION)
    # A gate that learned to stay mostly shut (a squeeze-excitation or GLU sigmoid) sits near an
    # end too: a verdict only with harm, the loss stalled.
    at_end = (f"{layer_name(near)} outputs sit at one end of the range: mean {ends[near]:.1%} of the range from it "
              "(median over the last half of the windows)")
    if drop is not None and drop < STALL_DROP:
        return _check(True, f"{at_end}, and the loss stalled", ends[near], SATURATED_END)
    return _check(False, why, value, SATURATED_FRACTION, note=f"{at_end}; the loss still fell: not a verdict")


def check_dead(ev: Evidence) -> dict[str, Any]:
    """Rectifier units dead (never positive) in the last window: a whole layer (it passes no
    gradient: a verdict by itself); most of a layer (DEAD_FRACTION or more) with harm, the loss
    stalled or non-finite, or the units alive at first and killed after a weight update past
    EXPLODING_UPDATE (else a note: a learning narrow net can carry a few dead units per layer);
    or every gradient exactly zero in the last window."""
    dead = {n: r["dead"] for n, r in ev.activations.items() if math.isfinite(r.get("dead", math.nan))}
    full = [n for n, value in dead.items() if value >= 1.0]
    if full:
        return _check(True, f"every unit of {_names(full)} dead (never positive) in the last window", 1.0, 1.0)
    if ev.layers and all(row["zero_last"] == 1.0 for row in ev.layers.values()):
        return _check(True, "every gradient exactly zero in the last window", 1.0, 1.0)
    if not dead:
        return _unchecked("no ReLU-type activations recorded" + ("" if ev.activations else UNSEEN))
    most = [n for n, value in dead.items() if value >= DEAD_FRACTION]
    name = max(dead, key=dead.get)
    why = f"at most {dead[name]:.0%} of a layer's units dead ({_quoted(name)})"
    if not most:
        return _check(False, why, dead[name], DEAD_FRACTION)
    drop = loss_drop(ev.loss)
    lost = bool(ev.loss and ev.loss["nonfinite"])
    # Killed by a step too large: alive in the first window, dead after an update past
    # EXPLODING_UPDATE (a learning-rate spike: the tutorial's lr=10, one step at 1000x).
    killed = [n for n in most if ev.activations[n].get("dead_first", 1.0) < DEAD_FRACTION / 2]
    jolted = bool(killed) and _huge_update(ev)["fired"]
    if lost or jolted or (drop is not None and drop < STALL_DROP):
        harm = ("the loss went non-finite" if lost else "the loss stalled" if drop is not None
                and drop < STALL_DROP else f"they died after a step too large ({_huge_update(ev)['why'].split(';')[0]})")
        return _check(True, f"{_share(dead, most)} of the units of {_names(most)} dead (never positive) in the last "
                            f"window, and {harm}", dead[name], DEAD_FRACTION)
    fell = f"; the loss still fell {drop:.0%}" if drop is not None else ""
    return _check(False, why, dead[name], DEAD_FRACTION,
                  note=f"{_share(dead, most)} of the units of {_names(most)} dead in the last window{fell}: "
                       "not a verdict while it learns")


def _share(dead: Mapping[str, float], names: Sequence[str]) -> str:
    low, high = min(dead[n] for n in names), max(dead[n] for n in names)
    return "every unit" if low == 1.0 else f"{low:.0%}" if low == high else f"{low:.0%} - {high:.0%}"


def _names(names: Sequence[str]) -> str:
    names = [layer_name(n) for n in names]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ... {names[-1]} ({len(names)} layers)"


# -- the loss ----------------------------------------------------------------------------------


def loss_drop(loss: Mapping[str, float] | None) -> float | None:
    """(early - tail) / early of ``measure_loss``'s figures; None when unknown or not finite."""
    if not loss:
        return None
    start, tail = loss["early"], loss["tail"]
    if not (math.isfinite(start) and math.isfinite(tail)) or start <= 0:
        return None
    return (start - tail) / start


def check_stalled(ev: Evidence) -> dict[str, Any]:
    """The loss no longer falls after the early part, or nothing can move any more."""
    layers, loss = ev.layers, ev.loss
    if layers and all(row["zero_last"] == 1.0 for row in layers.values()):
        return _check(True, "no gradient left: the weights cannot change", 0.0, STALL_DROP)
    if not loss:
        return _unchecked("no loss history to judge")
    # The end of the run, not the best epoch: a run that learned and then collapsed back to a
    # constant prediction (20-layer ReLU, seed 2) has stalled too.
    drop = loss_drop(loss)
    if drop is None:
        return {**_unchecked("loss not finite"), "threshold": STALL_DROP}
    moved = "did not move" if abs(drop) < 0.0005 else f"fell {drop:.1%}" if drop > 0 else f"rose {-drop:.1%}"
    why = f"loss {moved} after the early part ({loss['early']:.3g} -> {loss['tail']:.3g} at the end)"
    return _check(drop < STALL_DROP, why, drop, STALL_DROP)


def oscillation(losses: Sequence[float] | None) -> float:
    """How much the loss swings late in the run: over the last half of the values, the median
    |second difference| / 2 (a zig-zag's half height; a steady trend has none) over the median
    loss of the first tenth. NaN with fewer than 8 values."""
    if losses is None:
        return math.nan
    values = np.asarray(list(losses), dtype=float)
    late = values[len(values) // 2:]
    late = late[np.isfinite(late)]
    if late.size < 4 or len(values) < 8:
        return math.nan
    # Against the loss's scale at the start (the first tenth's median), not its late level: a
    # loss near 0 at the end would turn minibatch noise into a large relative swing.
    start = values[:max(1, len(values) // 10)]
    start = start[np.isfinite(start)]
    level = float(np.median(np.abs(start))) if start.size else math.nan
    swing = float(np.median(np.abs(np.diff(late, 2)))) / 2
    return swing / level if level > 0 else math.nan


def check_oscillating(ev: Evidence) -> dict[str, Any]:
    """The loss zig-zags between windows late in the run by more than OSCILLATION of its level
    (a learning rate near the edge of stability: the iterates bounce across a valley, Goodfellow
    et al. 2016, Sec. 8.3; published training-problem detectors flag it). A verdict when the loss
    does not converge (``stalled``); a note when it still falls."""
    value = oscillation(ev.losses)
    if not math.isfinite(value):
        return _unchecked("too few loss values to judge oscillation")
    why = f"the loss swings {value:.0%} of its level between windows in the last half"
    if value <= OSCILLATION:
        return _check(False, why, value, OSCILLATION)
    # Converging, read on medians (a zig-zag's single values say little): the last half's
    # median against the first half's.
    values = np.asarray(list(ev.losses), dtype=float)
    first, late = values[:len(values) // 2], values[len(values) // 2:]
    first, late = np.median(first[np.isfinite(first)]), np.median(late[np.isfinite(late)])
    drop = (first - late) / first if first > 0 else math.nan
    if not drop >= STALL_DROP:
        return _check(True, f"{why}, and it does not converge (median of the last half {late:.3g} against "
                            f"{first:.3g} in the first)", value, OSCILLATION)
    return _check(False, why, value, OSCILLATION, note=f"{why}; it still learns (median down {drop:.0%}), so a "
                                                        "symptom, not a verdict: a "
                                                        "smaller learning rate or a larger batch would steady it")


def check_output_mismatch(ev: Evidence) -> dict[str, Any]:
    """An output that does not fit the loss: a probability loss (``PROBABILITY_LOSSES``:
    NLLLoss wants log-probabilities, BCELoss probabilities) after a model that ends in a ReLU
    or a linear layer instead of a (log-)softmax or sigmoid (``PROBABILITY_OUTPUTS``). Named as
    the cause when the loss goes non-finite (log of a zero ReLU output) or negative (NLLLoss of
    an unnormalised output is unbounded below)."""
    if ev.context == "run" and not (ev.loss_fn and ev.output):
        return _unchecked("not checked: gradflow train's models end in a sigmoid under binary cross-entropy (from "
                          "its logits), which fit")
    if not ev.loss_fn or not ev.output:
        missing = [what for what, known in (("the model's output module", ev.output), ("the loss function",
                                                                                          ev.loss_fn)) if not known]
        wanted = [f"{key}=" for key, known in (("model", ev.output), ("loss_fn", ev.loss_fn)) if not known]
        return _unchecked(f"not checked: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} unknown; "
                          f"pass {' and '.join(wanted)} to diagnose_monitor (or diagnose)")
    if ev.loss_fn not in PROBABILITY_LOSSES:
        return _check(False, f"{ev.loss_fn} takes raw outputs")
    if ev.output in PROBABILITY_OUTPUTS:
        return _check(False, f"{ev.loss_fn} after {ev.output}: fits")
    lost = ev.loss["nonfinite"] if ev.loss else 0
    negative = bool(ev.losses) and any(math.isfinite(v) and v < 0 for v in ev.losses)
    harm = (f"; the cause of the {lost} non-finite losses" if lost else
            "; the loss went negative: unbounded below" if negative else "")
    return _check(True, f"{ev.loss_fn} expects probabilities but the model ends in {ev.output}{harm}", None, None)


def check_tiny(ev: Evidence) -> dict[str, Any]:
    """Every judged layer's gradient tiny against its weights alike (median over the run under
    TINY_GRADIENT, an absolute floor beside the ratios between layers): with plain SGD the
    weights cannot move. A verdict when the loss stalls; a note otherwise (Adam rescales a
    uniformly small gradient)."""
    sizes = {layer: float(np.nanmedian([r["gradient_early"], r["gradient_middle"], r["gradient_last"]]))
             for layer, r in ev.layers.items() if r.get("role") in ("hidden", "head")
             and np.isfinite([r["gradient_early"], r["gradient_middle"], r["gradient_last"]]).any()}
    if not sizes or next(iter(ev.layers.values())).get("measure") != "relative":
        return _unchecked("no ||g||/||w|| recorded")
    if any(r.get("zero_last") == 1.0 for r in ev.layers.values() if r.get("role") in ("hidden", "head")) \
            or min(sizes.values()) <= 0:
        return _check(False, "some layer's gradient is exactly zero: dead units, not a small gradient")
    layer = max(sizes, key=sizes.get)
    why = f"the largest layer gradient is {fmt_number(sizes[layer])} of its weights ({_quoted(layer)})"
    if sizes[layer] >= TINY_GRADIENT:
        return _check(False, why, sizes[layer], TINY_GRADIENT)
    drop = loss_drop(ev.loss)
    if drop is not None and drop < STALL_DROP:
        return _check(True, f"{why}, in every layer alike, and the loss stalled", sizes[layer], TINY_GRADIENT)
    return _check(False, why, sizes[layer], TINY_GRADIENT, note=f"{why} in every layer alike, but the loss still fell")


def check_insufficient(ev: Evidence) -> dict[str, Any]:
    """Too few windows to judge: said first in the verdict; the rules that fired stand beside it
    as early signs. A window that recorded no step (a ``log()`` before the first step, or two in a
    row) is no evidence and is not counted; a run directory's tables hold no such window."""
    count = sum(1 for window in ev.windows if _recorded_a_step(window))
    empty = len(ev.windows) - count
    left_out = f" ({empty} more with no step recorded, not counted)" if empty else ""
    if count < MIN_WINDOWS:
        return _check(True, f"too short to judge: only {count} window{'' if count == 1 else 's'} recorded{left_out}, "
                            f"at least {MIN_WINDOWS} needed; record more windows (gradflow train: one per epoch; "
                            "Lightning: one every log_every_n_steps steps; HF Trainer: every logging_steps steps; "
                            "your own loop: call monitor.log more often)", count, MIN_WINDOWS)
    return _check(False, f"{count} windows{left_out} (at least {MIN_WINDOWS} needed)", count, MIN_WINDOWS)


def _recorded_a_step(window: Any) -> bool:
    """Whether ``window`` holds a step: an applied one (``steps``) or one the GradScaler skipped."""
    overall = getattr(window, "overall", None) or {}
    return bool(getattr(window, "steps", 1) or overall.get("skipped_steps") or getattr(window, "gradients", None))


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule: ``name`` (the verdict), ``measure`` (what it reads), ``threshold`` (in words),
    ``source`` (where the threshold comes from), ``advice`` (the key of its advice in
    ``advice.ADVICE``), ``check`` (``Evidence`` -> the check's dict)."""

    name: str
    measure: str
    threshold: str
    source: str
    advice: str
    check: Callable[[Evidence], dict[str, Any]]


RULES: tuple[Rule, ...] = (
    Rule("vanishing", "weakest hidden layer's ||g||/||w|| / the head's, early (median of the first 10% of "
                      "windows); the first hidden layer's too",
         f"weakest < 1/{1 / VANISHING_RATIO:.0f} and first < 1/{1 / INPUT_END_RATIO:.0f}, and still so in the middle "
         f"and last windows or the loss stalled (< {STALL_DROP:.0%}); early only: a note",
         "Glorot & Bengio 2010; calibrated: tut. deep tanh 1/2180 - 1/336, healthy 1/44 and above; arch.",
         "vanishing", check_vanishing),
    Rule("exploding", "non-finite values; weight update per step ||dw||/||w||; clip_grad_norm_'s norm before "
                      "clipping / after; one step's total norm / the early norm; hidden ||g||/||w|| / the head's; "
                      "GradScaler skips",
         f"any non-finite; update > {EXPLODING_UPDATE:g}; most steps clipped at > {CLIP_EXCESS:g}x; "
         f"step > {GRADIENT_GROWTH:g}x; hidden > {LARGER_THAN_HEAD:g}x the head; skipped >= {OVERFLOW_FRACTION:.0%}",
         "Pascanu et al. 2013 (growth, clipping); DESIGN.md (non-finite); torch.amp.GradScaler; calibrated: arch.",
         "exploding", check_exploding),
    Rule("saturated", "hidden tanh/sigmoid layer: median share of outputs past 0.97 of the range; mean output's "
                      "distance from an end of the range",
         f"share > {SATURATED_FRACTION:g} and the loss falls < {SATURATED_DROP:.0%} after the early part (or no "
         f"loss); or mean within {SATURATED_END:.0%} of the range of an end and the loss stalls; else a note",
         "Glorot & Bengio 2010 (0.97; sigmoid top layer driven to 0); calibrated: tut. (share > 0.4: not learned "
         "fell <= 19%, learned 39%), arch.",
         "saturated", check_saturated),
    Rule("dead-units", "rectifier layer: share of units never positive in the last window; every gradient zero",
         f"every unit of a layer; or >= {DEAD_FRACTION:.0%} of a layer's units and the loss stalls or goes "
         f"non-finite, or they died after an update > {EXPLODING_UPDATE:g} (else a note)",
         "DESIGN.md (dead ReLU runs end at loss 0.693); calibrated: "
         "tut. healthy deep ReLU <= 40%, arch. one step at 1000x lr", "dead-units", check_dead),
    Rule("stalled", "loss drop from the end of the early part to the end (median of the last 10%)",
         f"< {STALL_DROP:.0%}", "calibrated: tut. healthy 12% and above, failed 20-layer ReLU <= 0.1%",
         "stalled", check_stalled),
    Rule("oscillating", "the loss's zig-zag in the last half: median |second difference| / 2 over the first "
                        "tenth's median loss",
         f"> {OSCILLATION:.0%} and the last half's median loss not {STALL_DROP:.0%} under the first half's; "
         "while it learns: a note",
         "published training-problem detectors (issue 23); calibrated: arch.", "oscillating", check_oscillating),
    Rule("output-mismatch", "the model's last module against the loss function's class",
         "a probability loss (NLLLoss, BCELoss, ...) after ReLU or linear output",
         "PyTorch docs of NLLLoss / BCELoss (log-probabilities, probabilities)", "output-mismatch",
         check_output_mismatch),
    Rule("tiny-gradient", "largest judged layer's ||g||/||w|| (median of early, middle, last)",
         f"< {TINY_GRADIENT:g} and the loss stalls; while it learns: a note",
         "calibrated: arch. healthy runs' largest layer 1e-3 and above", "tiny-gradient", check_tiny),
    Rule("insufficient", "number of windows that recorded a step (an empty one, `log()` with no step "
         "since the last, is not counted)", f"< {MIN_WINDOWS}",
         "a floor chosen, not calibrated (issue 14)", "insufficient", check_insufficient),
)


def rules_markdown() -> str:
    """The rules table as docs/calibration.md shows it (a test checks the page holds it)."""
    lines = ["| rule | measure | threshold | source | advice |", "|---|---|---|---|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines += [f"| {r.name} | {cell(r.measure)} | {cell(r.threshold)} | {cell(r.source)} | `{r.advice}` |" for r in RULES]
    return "\n".join(lines)


def run_rules(ev: Evidence, rules: Sequence[Rule] = RULES) -> dict[str, dict[str, Any]]:
    """Every rule's check over ``ev``, by rule name, in table order."""
    return {rule.name: rule.check(ev) for rule in rules}
