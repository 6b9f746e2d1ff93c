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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gradflow.analysis.windows import GRADIENTS_FILE, layer_of, load_windows

VERDICTS = ("healthy", "vanishing", "exploding", "saturated", "dead-units", "stalled", "insufficient")

EARLY_FRACTION = 0.1        # the "early" windows / epochs: this share of the run, at least one
VANISHING_RATIO = 1 / 50    # weakest hidden layer's ||g||/||w|| / the head's, early windows
INPUT_END_RATIO = 1 / 7     # ... and the first hidden layer's must be under this share of the head's
MIN_WINDOWS = 5             # fewer windows than this: "insufficient" instead of "healthy"
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
        lines += [f"note: {note}" for note in self.evidence.get("notes", [])]
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


def parameter_kinds(model: Any) -> dict[str, str]:
    """Parameter name -> ``norm``, ``embedding``, ``recurrent`` or ``other``, from the module that
    owns it, plus ``@head`` -> the parameter that is the output head's weight when the head is
    tied to an embedding (a Linear whose weight is an earlier module's, as in GPT-2 and nanoGPT).

    Example:
        >>> from torch import nn
        >>> parameter_kinds(nn.Sequential(nn.Embedding(5, 2), nn.LayerNorm(2)))["1.weight"]
        'norm'
    """
    from torch import nn

    first: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, nn.Embedding):
            kind = "embedding"
        elif isinstance(module, nn.RNNBase):
            kind = "recurrent"
        elif "norm" in cls.lower():
            kind = "norm"
        else:
            kind = "other"
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            owner = first.get(id(p), full)
            if owner != full and pname == "weight" and kinds.get(owner) == "embedding":
                kinds["@head"] = owner                # tied: the head is the embedding
            kinds.setdefault(owner, kind)
    return kinds


_RNN_PARAMETER = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
_EMBEDDING_NAME = re.compile(r"(wte|wpe|embed|embedding|emb)", re.IGNORECASE)
_NORM_NAME = re.compile(r"(norm|^(bn|ln|gn)(\d|_|$))", re.IGNORECASE)
_HEAD_NAMES = {"lm_head", "head", "fc", "classifier", "output", "out", "decoder", "score", "proj_out"}


def group_of(parameter: str) -> str:
    """The layer a parameter belongs to: ``layer_of`` except for stacked RNNs, whose
    ``lstm.weight_ih_l1`` and ``lstm.bias_hh_l1`` are layer ``lstm.l1`` (``_reverse`` kept).

    Example:
        >>> group_of("encoder.lstm.weight_hh_l2"), group_of("dense_1.weight")
        ('encoder.lstm.l2', 'dense_1')
    """
    module, _, last = parameter.rpartition(".")
    match = _RNN_PARAMETER.match(last)
    if match:
        return f"{module + '.' if module else ''}l{match.group(3)}{match.group(4) or ''}"
    return layer_of(parameter)


def _is_bias(parameter: str) -> bool:
    last = parameter.rpartition(".")[2]
    return last == "bias" or last.startswith("bias_") or last.endswith("_bias")


def _layer_kind(layer: str, parameters: Sequence[str], kinds: Mapping[str, str] | None) -> str:
    """``norm``, ``embedding``, ``recurrent`` or ``weight``: from the model when given, else the name."""
    if kinds:
        found = {kinds.get(p, "other") for p in parameters}
        for kind in ("recurrent", "embedding", "norm"):
            if kind in found:
                return kind
        return "weight"
    last = layer.rpartition(".")[2]
    if any(_RNN_PARAMETER.match(p.rpartition(".")[2]) for p in parameters):
        return "recurrent"
    if _NORM_NAME.search(last):
        return "norm"
    if _EMBEDDING_NAME.search(last):
        return "embedding"
    return "weight"


def _ordered(names: list[str], order: Sequence[str] | None) -> list[str]:
    """``names`` in forward order where ``order`` knows them, recorded order otherwise."""
    if not order:
        return names
    rank = {name: i for i, name in enumerate(order)}
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    return known + [n for n in names if n not in rank]


def _find_head(layers: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str] | None) -> str | None:
    """The output head: the embedding a tied head uses; else the last layer named like a head;
    else, when the first layer is an embedding and no head-named layer exists, that embedding
    (a tied head listed once); else the last layer that is not a normalisation."""
    candidates = [l for l, row in layers.items() if row["kind"] != "norm"] or list(layers)
    if not candidates:
        return None
    if kinds and "@head" in kinds:
        tied = group_of(kinds["@head"])
        if tied in layers:
            return tied
    named = [l for l in candidates if l.rpartition(".")[2].lower() in _HEAD_NAMES]
    if named:
        return named[-1]
    if not kinds and layers[candidates[0]]["kind"] == "embedding" and len(candidates) > 1:
        last = candidates[-1].rpartition(".")[2].lower()
        if not any(word in last for word in ("head", "out", "fc", "classifier", "decoder", "logits")):
            return candidates[0]
    return candidates[-1]


def _relative_sizes(windows: Sequence[Any], parameters: Sequence[str], embedding: bool) -> np.ndarray:
    """Per window: ||g|| / ||w|| over ``parameters`` together (each ``norm`` the mean over the
    window's steps, ``weight_norm`` at its end); for an embedding, on the rows that received
    gradient: divided by sqrt(1 - zero fraction) (rows of similar norm assumed)."""
    g2 = sum(_series(windows, p, "norm") ** 2 for p in parameters)
    w2 = sum(_series(windows, p, "weight_norm") ** 2 for p in parameters)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.sqrt(g2) / np.sqrt(w2)
        if embedding:
            zero = np.mean([_series(windows, p, "zero_fraction") for p in parameters], axis=0)
            active = np.where(np.isfinite(zero), 1.0 - zero, 1.0)
            size = np.where(active > 0, size / np.sqrt(np.maximum(active, 1e-12)), math.nan)
    return np.where(np.isfinite(w2) & (w2 > 0), size, math.nan)


def measure_layers(windows: Sequence[Any], order: Sequence[str] | None = None,
                   kinds: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per layer, input first (forward ``order`` of parameter names when known, else recorded
    order): kind (``weight``, ``norm``, ``embedding``, ``recurrent``), role (``head``, ``hidden``,
    ``norm``), gradient size early / middle / last and its peak after the early part, ratio to
    the head at those points, update ratio per step (median and max), non-finite count, zero
    fraction in the last window.

    The size is scale-free, ||g|| / ||w|| over the layer's weights (biases only when it has no
    weight), when the windows hold gradient and weight norms; else (``measure``: ``mean_abs``)
    the mean |g| per element of its weight, as before.

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 1, gradients={"a.weight": {"mean_abs": 0.01}, "b.weight": {"mean_abs": 1.0}})
        >>> measure_layers([w])["a"]["ratio_early"]
        0.01
    """
    names: list[str] = []
    for window in windows:
        names += [name for name in window.gradients if name not in names]
    names = _ordered(names, order)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    if not groups:
        return {}
    relative = all(_number(w.gradients[p].get("weight_norm")) == _number(w.gradients[p].get("weight_norm"))
                   and "norm" in w.gradients[p] for w in windows for p in w.gradients)
    n, early = len(windows), _early(len(windows))
    layers: dict[str, dict[str, Any]] = {}
    sizes: dict[str, np.ndarray] = {}
    for layer, parameters in groups.items():
        weights = [p for p in parameters if not _is_bias(p)] or parameters
        kind = _layer_kind(layer, parameters, kinds)
        if relative:
            sizes[layer] = _relative_sizes(windows, weights, kind == "embedding")
        else:
            sizes[layer] = _series(windows, weights[0], "mean_abs")
        layers[layer] = {"parameter": weights[0], "kind": kind}
    head = _find_head(layers, kinds)
    output = sizes[head]
    points = {"early": slice(0, early), "middle": slice(n // 2, n // 2 + 1), "last": slice(n - 1, n)}
    for layer, parameters in groups.items():
        row = layers[layer]
        # An embedding is a lookup table, not a layer the gradient flows through, and its ||w||
        # is whatever its init chose (N(0, 1) in torch, N(0, 0.02) in GPT-2): shown, not judged.
        row["role"] = "head" if layer == head else (row["kind"] if row["kind"] in ("norm", "embedding") else "hidden")
        row["measure"] = "relative" if relative else "mean_abs"
        for point, part in points.items():
            size, out = _median(sizes[layer][part]), _median(output[part])
            row[f"gradient_{point}"] = size
            row[f"ratio_{point}"] = size / out if out > 0 else math.nan
        later = sizes[layer][early:]
        row["gradient_peak"] = float(np.nanmax(later)) if np.isfinite(later).any() else math.nan
        weights = [p for p in parameters if not _is_bias(p)] or parameters
        stack = np.vstack([_update_per_step(windows, p) for p in weights])
        updates = np.array([max((v for v in column if math.isfinite(v)), default=math.nan) for column in stack.T])
        row["update_ratio"] = _median(updates)
        row["update_ratio_max"] = float(np.nanmax(updates)) if np.isfinite(updates).any() else math.nan
        counts = [_number(w.gradients.get(p, {}).get("nonfinite")) for w in windows for p in parameters]
        row["nonfinite"] = int(sum(c for c in counts if math.isfinite(c)))
        last = [_number(windows[-1].gradients[p].get("zero_fraction")) for p in parameters
                if p in windows[-1].gradients]
        row["zero_last"] = min(last) if last else math.nan
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


ADVICE["insufficient"] = ("Not enough evidence to call this run healthy: train longer and log more windows "
                          f"(at least {MIN_WINDOWS}), then diagnose again.")

# Advice by architecture family, replacing the MLP advice for the verdicts where it differs.
# Sources: residual connections, He et al. 2016 ("Deep Residual Learning"); batch
# normalisation, Ioffe & Szegedy 2015; He (Kaiming) initialisation, He et al. 2015; pre-LayerNorm
# and learning-rate warm-up for transformers, Xiong et al. 2020 ("On Layer Normalization in the
# Transformer Architecture") and Vaswani et al. 2017; scaled init of residual projections,
# Radford et al. 2019 (GPT-2); gradient clipping for recurrent nets, Pascanu et al. 2013 ("On the
# difficulty of training recurrent neural networks"); forget-gate bias 1, Jozefowicz et al. 2015;
# LSTM/GRU over plain RNNs, Hochreiter & Schmidhuber 1997.
FAMILY_ADVICE = {
    ("cnn", "vanishing"): "Gradients shrink on their way to the first convolutions. Add batch normalization after "
                          "each convolution and residual (skip) connections (ResNet basic blocks), use ReLU with "
                          "He (kaiming_normal_, fan_out) initialization instead of sigmoid/tanh.",
    ("cnn", "exploding"): "Updates are far too large: lower the learning rate (10x), use a warm-up of a few hundred "
                          "steps, and clip the gradient norm (torch.nn.utils.clip_grad_norm_); with BatchNorm, "
                          "weight decay keeps the weight norms, and so the effective step, in check.",
    ("transformer", "vanishing"): "Gradients shrink on their way to the first blocks. Use pre-LayerNorm blocks "
                                  "(x + f(LN(x))), keep the residual stream free of other operations, scale the "
                                  "init of residual projections by 1/sqrt(2 * layers) (GPT-2), and warm up the "
                                  "learning rate.",
    ("transformer", "exploding"): "Updates are far too large: lower the learning rate, warm it up linearly over the "
                                  "first few hundred to thousand steps, clip the gradient norm at 1.0 "
                                  "(torch.nn.utils.clip_grad_norm_), and prefer pre-LayerNorm blocks.",
    ("recurrent", "vanishing"): "Gradients shrink through time and down the stack. Use fewer stacked layers (1-2) "
                                "or residual connections between them, initialize the forget-gate bias to 1 "
                                "(not negative), prefer LSTM/GRU over plain RNN cells, and clip the gradient norm "
                                "(torch.nn.utils.clip_grad_norm_) so that a larger learning rate stays safe.",
    ("recurrent", "exploding"): "Gradients blow up through time: clip the gradient norm "
                                "(torch.nn.utils.clip_grad_norm_, max_norm 0.25-5, as in Pascanu et al. 2013) and "
                                "lower the learning rate.",
}


def recommend(verdicts: Sequence[str], family: str = "mlp") -> str:
    """Plain-words advice for a set of verdicts, most specific first, for an architecture
    ``family`` (``mlp``, ``cnn``, ``transformer``, ``recurrent``; see FAMILY_ADVICE's sources).

    Example:
        >>> recommend(["healthy"]).startswith("Nothing to fix")
        True
        >>> "clip" in recommend(["exploding"], "recurrent")
        True
    """
    return " ".join(FAMILY_ADVICE.get((family, v), ADVICE[v]) for v in verdicts) or ADVICE["healthy"]


# -- entry points ------------------------------------------------------------------------


def diagnose(windows: Sequence[Any], losses: Sequence[float] | None = None, *, model: Any = None,
             order: Sequence[str] | None = None) -> Diagnosis:
    """The verdict over recorded windows (``monitor.history`` or ``load_windows(run_dir)``).

    ``losses``: the training loss per epoch (or per window), if known; without it ``stalled``
    can only mean "no gradient left". ``model``: the trained module, if at hand: it tells
    normalisation, embedding and recurrent parameters and a tied head apart (else their names
    do). ``order``: parameter names in the order their modules first ran forward (the monitor's
    ``forward_order``), else the recorded order stands for input-to-output.

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 10, gradients={"dense_1.weight": {"mean_abs": 1e-5, "nonfinite": 0},
        ...                    "dense_2.weight": {"mean_abs": 1e-2, "nonfinite": 0}})
        >>> diagnose([w]).verdicts
        ['vanishing']
    """
    if not windows:
        raise ValueError("diagnose needs at least one recorded window; call monitor.log(step) at least once")
    kinds = parameter_kinds(model) if model is not None else None
    layers = measure_layers(windows, order, kinds)
    activations = measure_activations(windows)
    loss = measure_loss(losses) if losses is not None else None
    checks = {
        "vanishing": check_vanishing(layers),
        "exploding": _with_overflow(check_exploding(layers, loss), windows),
        "saturated": check_saturated(activations),
        "dead-units": check_dead(activations, layers),
        "stalled": check_stalled(layers, loss),
        "insufficient": check_insufficient(windows, loss),
    }
    verdicts = [name for name, check in checks.items() if check["fired"] and name != "insufficient"]
    if not verdicts:
        verdicts = ["insufficient"] if checks["insufficient"]["fired"] else ["healthy"]
    family = architecture_family(layers, model)
    evidence = {"layers": layers, "activations": activations, "loss": loss, "checks": checks,
                "windows": len(windows), "family": family, "order": "forward" if order else "recorded",
                "notes": _notes(layers, kinds) + _overflow_notes(windows)}
    return Diagnosis(verdicts, evidence, recommend(verdicts, family))


def check_insufficient(windows: Sequence[Any], loss: Mapping[str, float] | None) -> dict[str, Any]:
    """Too few windows to call a run healthy: only replaces ``healthy``, never a fired rule."""
    count = len(windows)
    if count < MIN_WINDOWS:
        return _check(True, f"only {count} window(s): log at least {MIN_WINDOWS} windows (for example one per "
                            f"epoch over {MIN_WINDOWS}+ epochs, or every N steps) to judge the trend", count,
                      MIN_WINDOWS)
    return _check(False, f"{count} windows (at least {MIN_WINDOWS} needed)", count, MIN_WINDOWS)


def architecture_family(layers: Mapping[str, Mapping[str, Any]], model: Any = None) -> str:
    """``recurrent``, ``transformer``, ``cnn`` or ``mlp``, from the model's modules when given,
    else from layer kinds and names.

    Example:
        >>> architecture_family({"lstm.l0": {"kind": "recurrent"}, "head": {"kind": "weight"}})
        'recurrent'
    """
    names = " ".join(layers).lower()
    if model is not None:
        types = " ".join(type(m).__name__.lower() for m in model.modules())
        names += " " + types
    if any(row.get("kind") == "recurrent" for row in layers.values()) or any(
            word in names for word in ("lstm", "gru", "rnn")):
        return "recurrent"
    if any(word in names for word in ("attn", "attention", "transformer")):
        return "transformer"
    if "conv" in names:
        return "cnn"
    return "mlp"


OVERFLOW_FRACTION = 0.5     # of the last window's steps skipped by a GradScaler: the gradient keeps overflowing


def _skipped(window: Any) -> tuple[int, int]:
    """(skipped, all) steps of a window: GradScaler skips are kept apart from applied steps."""
    skipped = int(getattr(window, "overall", {}).get("skipped_steps", 0) or 0)
    return skipped, int(getattr(window, "steps", 0) or 0) + skipped


def _overflow_notes(windows: Sequence[Any]) -> list[str]:
    skipped = sum(_skipped(w)[0] for w in windows)
    if not skipped:
        return []
    total = sum(_skipped(w)[1] for w in windows)
    return [f"{skipped} of {total} steps skipped on overflow (GradScaler); a few early on are the scale "
            "calibrating, not an explosion"]


def _with_overflow(check: dict[str, Any], windows: Sequence[Any]) -> dict[str, Any]:
    """Exploding also when a GradScaler skipped most of the last window's steps: the scale
    halves at each skip (torch.amp.GradScaler), so overflow that persists is a gradient that
    overflows at any scale, not calibration."""
    skipped, total = _skipped(windows[-1])
    if check["fired"] or not total or skipped / total < OVERFLOW_FRACTION:
        return check
    return _check(True, f"{skipped} of {total} steps of the last window skipped on overflow (GradScaler)",
                  skipped / total, OVERFLOW_FRACTION)


def _notes(layers: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str] | None) -> list[str]:
    notes = []
    if any(row.get("kind") == "embedding" for row in layers.values()):
        notes.append("embeddings measured on the rows that received gradient (||g|| / ||w|| divided by "
                     "sqrt(1 - zero fraction of the gradient), rows of similar norm assumed) and shown, not "
                     "judged, unless tied to the head: their ||w|| is set by their init, not by training")
    if any(row.get("kind") == "recurrent" for row in layers.values()):
        notes.append("recurrent layers per stacked layer (l0, l1, ...); per gate needs gate slices the "
                     "monitor does not record")
    if any(row.get("kind") == "norm" for row in layers.values()):
        notes.append("normalisation layers shown, not judged" + ("" if kinds else " (told apart by name)"))
    return notes


def diagnose_monitor(monitor: Any, losses: Sequence[float] | None = None, member: int | None = None,
                     model: Any = None) -> Diagnosis:
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
    order = getattr(monitor, "forward_order", None) or None
    return diagnose(windows, losses, model=model, order=list(order) if order else None)


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
    size = "|g|/|w| early" if next(iter(layers.values())).get("measure") == "relative" else "mean|g| early"
    width = max(14, max(len(layer) for layer in layers) + 2)
    lines = [f"{'layer':<{width}}{'role':<10}{size:>14}{'/head early':>14}{'middle':>9}{'last':>9}"
             f"{'update/step':>13}{'nonfinite':>11}"]
    for layer, row in layers.items():
        lines.append(f"{layer:<{width}}{row.get('role', ''):<10}{_fmt(row['gradient_early']):>14}{_fmt(row['ratio_early']):>14}"
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
