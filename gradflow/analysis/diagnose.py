"""Diagnosis: say in words whether gradients vanish, explode or die, show the evidence, and
suggest the fix. Pure logic over recorded windows: no matplotlib, no command line.

Example:
    >>> diagnosis = diagnose_run("runs/deep_tanh-20250101-120000-seed0")      # doctest: +SKIP
    >>> print(diagnosis.line())                                                # doctest: +SKIP
    Verdict: vanishing, saturated (dense_3 gradient vs the output layer's, early on: 513x smaller; ...)

A verdict is one or more of ``healthy``, ``vanishing``, ``exploding``, ``saturated``,
``dead-units``, ``stalled``; ``healthy`` means no rule fired.

Measures (a "layer" is a parameter name minus its last dotted part; its gradient size is the
mean |g| per element of its ``weight``, else of its first parameter, so that layers of different
sizes compare; parameters come in recording order, input layer first, output layer last):

- gradient ratio: a hidden layer's mean |g| over the output layer's, each the median over the
  early windows (the first EARLY_FRACTION of the run, at least one window). The trend is the
  same ratio in the middle and last windows.
- update ratio per step: ||w_end - w_start|| / ||w_start|| over a window, divided by the
  window's steps. NaN (a parameter that started at zero, such as a fresh bias) is missing.
- saturated fraction: share of a bounded activation's outputs with |a| > 0.97 of its range,
  median over windows (the monitor's SATURATION_LEVEL).
- dead fraction: share of a rectifier's units that were never positive in the last window.

Rules and thresholds, calibrated on the tutorial configs, 10 seeds each, 500 epochs, SGD
(docs/calibration.md has the table and the misses; "measured" quotes those runs):

- vanishing: the weakest hidden layer's early gradient ratio < VANISHING_RATIO = 1/50.
  Measured: deep tanh with U(0,1) weights 1/820-1/230; deep ReLU with He init 1/4.8-1/1.0;
  Xavier tanh 1/4.9-1/1.7; shallow tanh 1/5.9-1/1.3. Source: Glorot & Bengio 2010 (gradients
  shrink layer by layer in saturating nets) and the tutorial's first-versus-last-layer plot.
  The first hidden layer alone separates less well here (deep tanh 1/28-1/8.2, because its input
  is the raw data, not saturated units), so the rule reads the weakest hidden layer and the
  report also shows the first one and its trend.
- exploding: any non-finite gradient or epoch loss; or weights that move more than
  EXPLODING_UPDATE = 0.3 of their norm per step in some window (measured maxima: deep ReLU
  <= 0.0066, shallow tanh <= 0.014, deep tanh <= 0.062, deep ReLU at lr=10 1.2-6000); or the
  largest layer gradient growing GRADIENT_GROWTH = 1000x over the largest early one (Pascanu et
  al. 2013: exploding norms grow geometrically; a guard that no calibration run reached).
  Karpathy's rule of thumb puts a healthy update near HEALTHY_UPDATE = 1e-3 of the weight per
  step (measured: per-layer medians 2e-5 to 1.1e-3 in every config that did not blow up); it is
  reported, not judged.
- saturated: a hidden bounded activation (tanh, sigmoid) whose median share of outputs with
  |a| > 0.97 of its range exceeds SATURATED_FRACTION = 0.4. Measured worst layer: deep tanh
  U(0,1) 0.44-0.80; Xavier tanh 0.18-0.34 (it learns: saturation alone is not fatal); shallow
  tanh 0.06-0.31. A thin margin on both sides. Source of 0.97: Glorot & Bengio 2010.
  The last activation is left out when it is bounded and named differently from the one
  before it (``sigmoid_6`` after ``tanh_5``): it is then taken for the output's squashing
  function, where saturation means confident predictions. (gradflow's trainer computes the loss
  from logits, so its output sigmoid never fires in training anyway.)
- dead-units: a rectifier layer whose units are all dead in the last window (DEAD_FRACTION =
  1.0: a fully dead layer passes no gradient at all), or every gradient exactly zero in the
  last window. Measured: healthy deep ReLU has at most 2 of 5 units dead in a layer; every
  failed 20-layer ReLU run (DESIGN.md: loss 0.693, all gradients zero) has whole layers dead.
- stalled: the loss (when known) fell by less than STALL_DROP = 5% from the end of the early
  part to the end of the run (the median of its last EARLY_FRACTION of epochs); or every
  gradient is exactly zero in the last window.
  Measured: deep ReLU 12-38%, Xavier tanh 14-45%, shallow tanh 29-41%; failed 20-layer ReLU
  -1% to 0.1%; deep tanh U(0,1) 1-39% (most seeds creep; one learns): a secondary verdict.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gradflow.analysis.windows import GRADIENTS_FILE, layer_of, load_windows

VERDICTS = ("healthy", "vanishing", "exploding", "saturated", "dead-units", "stalled")

EARLY_FRACTION = 0.1        # the "early" windows / epochs: this share of the run, at least one
VANISHING_RATIO = 1 / 50    # weakest hidden layer's mean |g| / output layer's, early windows
EXPLODING_UPDATE = 0.3      # weights move by more than this share of their norm per step
GRADIENT_GROWTH = 1000.0    # the largest layer mean |g| this many times the largest early one
SATURATED_FRACTION = 0.4    # share of a hidden tanh/sigmoid layer's outputs with |a| > 0.97
DEAD_FRACTION = 1.0         # share of a ReLU layer's units never positive in the last window
STALL_DROP = 0.05           # the loss must fall at least this much (relative) after the early part
HEALTHY_UPDATE = 1e-3       # Karpathy's rule of thumb for update / weight per step (evidence only)


@dataclass
class Diagnosis:
    """A verdict with its evidence and a recommendation.

    ``evidence`` holds ``layers`` (per layer: gradient sizes, ratios to the output layer,
    update ratio, non-finite count), ``activations`` (per activation module: saturated and dead
    fractions), ``loss`` (first, early, best, last) and ``checks`` (per verdict: whether it
    fired, the measured value, the threshold and a phrase saying why).

    Example:
        >>> d = Diagnosis(["healthy"], {"checks": {}}, "Nothing to fix.")
        >>> d.line()
        'Verdict: healthy'
    """

    verdicts: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    recommendation: str = ""

    @property
    def healthy(self) -> bool:
        return self.verdicts == ["healthy"]

    def line(self) -> str:
        """One line: ``Verdict: vanishing, saturated (why; why)``."""
        reasons = [check["why"] for name, check in self.evidence.get("checks", {}).items()
                   if check.get("fired") and name in self.verdicts]
        text = f"Verdict: {', '.join(self.verdicts)}"
        return f"{text} ({'; '.join(reasons)})" if reasons else text

    def report(self) -> str:
        """Several lines for a person: the verdict, an evidence table per layer, the advice."""
        lines = [self.line(), ""]
        lines += _layer_table(self.evidence.get("layers", {}))
        lines += _activation_table(self.evidence.get("activations", {}))
        loss = self.evidence.get("loss")
        if loss:
            lines.append("loss: first {first:.4g}, after the early part {early:.4g}, best later {best:.4g}, "
                         "at the end {tail:.4g} (median), last {last:.4g}".format(**loss))
        lines += ["", "Checks:"]
        for name, check in self.evidence.get("checks", {}).items():
            mark = "yes" if check["fired"] else "no "
            lines.append(f"  {mark} {name}: {check['why']}")
        lines += ["", "Recommendation: " + self.recommendation]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and inf become None)."""
        return {"verdicts": list(self.verdicts), "line": self.line(), "recommendation": self.recommendation,
                "evidence": _json_ready(self.evidence)}


# -- measuring ---------------------------------------------------------------------------


def layer_parameters(windows: Sequence[Any]) -> dict[str, str]:
    """Layer -> the parameter that stands for it (its weight, else its first), input first."""
    chosen: dict[str, str] = {}
    for window in windows:
        for name in window.gradients:
            layer = layer_of(name)
            if layer not in chosen or (name.endswith("weight") and not chosen[layer].endswith("weight")):
                chosen[layer] = name
    return chosen


def _series(windows: Sequence[Any], parameter: str, key: str) -> np.ndarray:
    return np.array([_number(w.gradients.get(parameter, {}).get(key)) for w in windows], dtype=float)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def _early(count: int) -> int:
    return max(1, int(count * EARLY_FRACTION))


def _update_per_step(windows: Sequence[Any], parameter: str) -> np.ndarray:
    ratios = _series(windows, parameter, "weight_update_ratio")
    steps = np.array([max(w.steps, 1) for w in windows], dtype=float)
    return ratios / steps


def measure_layers(windows: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Per layer, input first: gradient size early / middle / last and its peak after the early
    part, ratio to the output layer at those points, update ratio per step (median and max),
    non-finite count, zero fraction in the last window.

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 1, gradients={"a.weight": {"mean_abs": 0.01}, "b.weight": {"mean_abs": 1.0}})
        >>> measure_layers([w])["a"]["ratio_early"]
        0.01
    """
    chosen = layer_parameters(windows)
    if not chosen:
        return {}
    n, early = len(windows), _early(len(windows))
    sizes = {layer: _series(windows, p, "mean_abs") for layer, p in chosen.items()}
    output = sizes[list(chosen)[-1]]
    points = {"early": slice(0, early), "middle": slice(n // 2, n // 2 + 1), "last": slice(n - 1, n)}
    layers: dict[str, dict[str, float]] = {}
    for layer, parameter in chosen.items():
        row: dict[str, float] = {"parameter": parameter}
        for point, part in points.items():
            size, out = _median(sizes[layer][part]), _median(output[part])
            row[f"gradient_{point}"] = size
            row[f"ratio_{point}"] = size / out if out > 0 else math.nan
        later = sizes[layer][early:]
        row["gradient_peak"] = float(np.nanmax(later)) if np.isfinite(later).any() else math.nan
        updates = _update_per_step(windows, parameter)
        row["update_ratio"] = _median(updates)
        row["update_ratio_max"] = float(np.nanmax(updates)) if np.isfinite(updates).any() else math.nan
        counts = [_number(r.get("nonfinite")) for w in windows for p, r in w.gradients.items() if layer_of(p) == layer]
        row["nonfinite"] = int(sum(c for c in counts if math.isfinite(c)))
        last = [_number(row_.get("zero_fraction")) for p, row_ in windows[-1].gradients.items() if layer_of(p) == layer]
        row["zero_last"] = min(last) if last else math.nan
        layers[layer] = row
    return layers


def measure_activations(windows: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Per activation module: median saturated fraction (bounded ones) and the dead fraction
    of the last window it fired in (rectifiers); ``output`` marks a presumed output squashing
    (the last tap, bounded, of another kind than the one before it).

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 1, activations={"relu_1": {"dead_fraction": 0.2}})
        >>> measure_activations([w])["relu_1"]["dead"]
        0.2
    """
    names: list[str] = []
    for window in windows:
        names += [name for name in window.activations if name not in names]
    rows: dict[str, dict[str, float]] = {}
    for name in names:
        seen = [w.activations[name] for w in windows if name in w.activations]
        row: dict[str, Any] = {}
        saturated = np.array([_number(r.get("saturated_fraction")) for r in seen])
        if np.isfinite(saturated).any():
            row["saturated"] = _median(saturated)
        if "dead_fraction" in seen[-1]:
            row["dead"] = _number(seen[-1]["dead_fraction"])
        rows[name] = row
    if len(rows) > 1 and "saturated" in rows[names[-1]] and _kind(names[-1]) != _kind(names[-2]):
        rows[names[-1]]["output"] = True
    return rows


def _kind(name: str) -> str:
    """``sigmoid_6`` -> ``sigmoid``; ``head.act`` -> ``head.act``: a module name without its index."""
    return name.rstrip("0123456789").rstrip("_.")


def measure_loss(losses: Sequence[float]) -> dict[str, float] | None:
    """First loss, loss at the end of the early part, best after it, median of the last
    EARLY_FRACTION of epochs (``tail``), last loss, and the count of non-finite ones.

    Example:
        >>> measure_loss([1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3])["tail"]
        0.3
    """
    values = np.asarray(list(losses), dtype=float)
    if values.size < 2:
        return None
    early = _early(values.size)
    rest = values[early:]
    finite = rest[np.isfinite(rest)]
    return {"first": float(values[0]), "early": float(values[early - 1]),
            "best": float(finite.min()) if finite.size else math.nan,
            "tail": _median(values[-early:]), "last": float(values[-1]),
            "nonfinite": int((~np.isfinite(values)).sum())}


# -- rules -------------------------------------------------------------------------------


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


def check_vanishing(layers: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The weakest hidden layer's early gradient against the output layer's."""
    hidden = list(layers)[:-1]
    if not hidden:
        return _check(False, "only one layer: nothing to compare with the output layer")
    weakest = min(hidden, key=lambda l: _sortable(layers[l]["ratio_early"]))
    ratio = layers[weakest]["ratio_early"]
    first = layers[hidden[0]]
    why = (f"{weakest} gradient vs the output layer's, early on: {_relative(ratio)}; first hidden layer: "
           f"{_relative(first['ratio_early'])} early, {_relative(first['ratio_last'])} last")
    return _check(math.isfinite(ratio) and ratio < VANISHING_RATIO, why, ratio, VANISHING_RATIO)


def _sortable(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _fmt(value: float) -> str:
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
    return _check(False, f"all finite; largest update ratio per step {_fmt(largest)}", largest, EXPLODING_UPDATE)


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


# -- recommendations ---------------------------------------------------------------------

ADVICE = {
    "healthy": "Nothing to fix: gradients of a useful size reach every layer and the weights move at a "
               "healthy rate.",
    "vanishing": "Gradients shrink on their way to the first layers, so those layers barely learn. With tanh "
                 "or sigmoid, use ReLU with He initialization (he_uniform), or keep tanh and use Xavier "
                 "(glorot_uniform) initialization; fewer layers, batch normalization or residual connections "
                 "also help.",
    "exploding": "Updates are far too large: lower the learning rate (try 10x smaller), clip the gradient norm "
                 "(torch.nn.utils.clip_grad_norm_), and check that the initial weights are not too large.",
    "saturated": "Units sit in the flat tails of tanh/sigmoid where the derivative is almost zero. Weights "
                 "drawn from U(0, 1) are all positive and too large for tanh: use Xavier (glorot_uniform) "
                 "initialization for tanh, or ReLU with He initialization; normalized inputs help too.",
    "dead-units": "Whole ReLU layers output zero for every input and pass no gradient back. Use fewer layers "
                  "(ReLU with He init learns at depth 5; at depth 20 and width 5 most seeds die), a smaller "
                  "learning rate, LeakyReLU, batch normalization or residual connections, or another seed.",
    "stalled": "The loss has stopped falling, so more epochs will not help; if nothing else is flagged, try "
               "another learning rate or optimizer (Adam).",
}


def recommend(verdicts: Sequence[str]) -> str:
    """Plain-words advice for a set of verdicts, most specific first.

    Example:
        >>> recommend(["healthy"]).startswith("Nothing to fix")
        True
    """
    return " ".join(ADVICE[v] for v in verdicts) or ADVICE["healthy"]


# -- entry points ------------------------------------------------------------------------


def diagnose(windows: Sequence[Any], losses: Sequence[float] | None = None) -> Diagnosis:
    """The verdict over recorded windows (``monitor.history`` or ``load_windows(run_dir)``).

    ``losses``: the training loss per epoch, if known; without it ``stalled`` can only mean
    "no gradient left".

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 10, gradients={"dense_1.weight": {"mean_abs": 1e-5, "nonfinite": 0},
        ...                    "dense_2.weight": {"mean_abs": 1e-2, "nonfinite": 0}})
        >>> diagnose([w]).verdicts
        ['vanishing']
    """
    if not windows:
        raise ValueError("diagnose needs at least one recorded window; call monitor.log(step) at least once")
    layers = measure_layers(windows)
    activations = measure_activations(windows)
    loss = measure_loss(losses) if losses is not None else None
    checks = {
        "vanishing": check_vanishing(layers),
        "exploding": check_exploding(layers, loss),
        "saturated": check_saturated(activations),
        "dead-units": check_dead(activations, layers),
        "stalled": check_stalled(layers, loss),
    }
    verdicts = [name for name, check in checks.items() if check["fired"]] or ["healthy"]
    evidence = {"layers": layers, "activations": activations, "loss": loss, "checks": checks,
                "windows": len(windows)}
    return Diagnosis(verdicts, evidence, recommend(verdicts))


def diagnose_monitor(monitor: Any, losses: Sequence[float] | None = None, member: int | None = None) -> Diagnosis:
    """The verdict over a live ``GradientMonitor``'s recorded history; for a batched monitor
    (``members`` > 1), the verdict of member ``member``.

    Example:
        >>> with GradientMonitor(model) as monitor:                      # doctest: +SKIP
        ...     train(...); monitor.log(epoch)
        >>> print(diagnose_monitor(monitor).report())                    # doctest: +SKIP
    """
    windows = monitor.history
    members = sorted({w.member for w in windows if getattr(w, "member", None) is not None})
    if members and member is None:
        raise ValueError(f"this monitor records {len(members)} members; pass member=k (0..{members[-1]})")
    if member is not None:
        windows = [w for w in windows if getattr(w, "member", None) == member]
    return diagnose(windows, losses)


def read_losses(run_dir: str | Path) -> list[float] | None:
    """The ``loss`` column of a run's history.csv, or None if there is none."""
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss") not in (None, "")]


def diagnose_run(run_dir: str | Path) -> Diagnosis:
    """The verdict of a run directory (gradients.csv, activations.csv, history.csv).

    Raises FileNotFoundError when the directory or its gradients.csv is missing.

    Example:
        >>> diagnose_run("runs/deep_relu-20250101-120000-seed0").verdicts    # doctest: +SKIP
        ['healthy']
    """
    return diagnose(run_windows(run_dir), read_losses(run_dir))


def run_windows(run_dir: str | Path) -> list[Any]:
    """The monitor windows of a run directory; FileNotFoundError when there are none to read."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not (run_dir / GRADIENTS_FILE).exists():
        raise FileNotFoundError(f"{run_dir}: no {GRADIENTS_FILE}; train with the gradient monitor enabled")
    windows = load_windows(run_dir)
    if not windows:
        raise FileNotFoundError(f"{run_dir}: {GRADIENTS_FILE} has no windows")
    return windows


def scalars(diagnosis: Diagnosis) -> dict[str, float]:
    """``diagnosis/<verdict>`` flags (1/0) and the numeric evidence, as TensorBoard scalars.

    Example:
        >>> scalars(Diagnosis(["healthy"], {"checks": {}}))["diagnosis/healthy"]
        1.0
    """
    out = {f"diagnosis/{v}": float(v in diagnosis.verdicts) for v in VERDICTS}
    for name, check in diagnosis.evidence.get("checks", {}).items():
        if isinstance(check.get("value"), (int, float)) and math.isfinite(check["value"]):
            out[f"diagnosis/{name}/value"] = float(check["value"])
    for layer, row in diagnosis.evidence.get("layers", {}).items():
        for key in ("ratio_early", "ratio_last", "update_ratio"):
            if math.isfinite(row.get(key, math.nan)):
                out[f"diagnosis/{layer.replace('.', '/')}/{key}"] = float(row[key])
    return out


def write_to_tensorboard(diagnosis: Diagnosis, writer: Any, step: int) -> None:
    """Write ``diagnosis/*`` scalars and the report as text (``diagnosis``) at ``step``.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter                    # doctest: +SKIP
        >>> write_to_tensorboard(diagnose_run(run_dir), SummaryWriter(run_dir), 499)  # doctest: +SKIP
    """
    for tag, value in scalars(diagnosis).items():
        writer.add_scalar(tag, value, step)
    # TensorBoard renders text as Markdown: indent by four spaces to keep the table aligned.
    writer.add_text("diagnosis", "\n".join("    " + line for line in diagnosis.report().splitlines()), step)


# -- text --------------------------------------------------------------------------------


def _layer_table(layers: Mapping[str, Mapping[str, float]]) -> list[str]:
    if not layers:
        return []
    lines = [f"{'layer':<14}{'mean|g| early':>14}{'/output early':>14}{'middle':>9}{'last':>9}"
             f"{'update/step':>13}{'nonfinite':>11}"]
    for layer, row in layers.items():
        lines.append(f"{layer:<14}{_fmt(row['gradient_early']):>14}{_fmt(row['ratio_early']):>14}"
                     f"{_fmt(row['ratio_middle']):>9}{_fmt(row['ratio_last']):>9}"
                     f"{_fmt(row['update_ratio']):>13}{row['nonfinite']:>11}")
    return lines + [""]


def _activation_table(activations: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not activations:
        return []
    lines = [f"{'activation':<14}{'saturated':>10}{'dead (last)':>13}"]
    for name, row in activations.items():
        saturated = f"{row['saturated']:.0%}" if "saturated" in row else "-"
        dead = f"{row['dead']:.0%}" if math.isfinite(row.get("dead", math.nan)) else "-"
        note = "  (output, not judged)" if row.get("output") else ""
        lines.append(f"{name:<14}{saturated:>10}{dead:>13}{note}")
    return lines + [""]


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    return value
