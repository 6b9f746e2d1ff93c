"""Measures: what the diagnosis reads from recorded windows, before any rule (``rules.py``)
judges it.

A "layer" is a group of parameters: ``layer_of`` (the name minus its last dotted part), except
stacked ``nn.LSTM``/``nn.GRU`` parameters, grouped per stacked layer (``lstm.l0``, ``lstm.l1``).
Each layer has a kind (``weight``, ``norm``, ``embedding``, ``recurrent``: from the model's modules
when it is passed (``analysis_kinds``), else from names: ``diagnose_run`` has no model, so a
BatchNorm inside an ``nn.Sequential`` (``shortcut.1``) counts as a weight layer there) and a role
(``head``, ``hidden``, ``norm``, ``embedding``). Layers come input first: in the model's forward
order when known (the monitor's ``forward_order``: modules by their first forward call; gradflow's
run tables are written in that order), else in the recorded order.

- size: ``||g|| / ||w||`` over the layer's weights together (biases only where a layer has no
  weight), ``||g||`` the mean over a window's steps and ``||w||`` at its end. Scale-free, so a
  3x3x512x512 conv and a 512x10 head compare (issue 14: per-element mean |g| called a learning
  ResNet-34 ``vanishing``). Windows without gradient and weight norms (old recordings) fall back
  to the per-element mean |g| of the layer's weight (``measure``: ``mean_abs``).
- gates: a recurrent layer's ``gates`` are the same size and ratios per gate (input, forget,
  cell, output; GRU: reset, update, new), over the gate's rows of ``weight_ih`` and ``weight_hh``
  (``Window.gates``, recorded by the monitor's ``gates.py``); shown with the layer, not judged
  apart from it. Gate activations (sigmoid saturation) are not observable: the fused LSTM/GRU
  kernels expose no gate output to a hook.
- embeddings: measured on the rows that received gradient (size / sqrt(1 - zero fraction), rows
  of similar norm assumed) and shown, not judged (their ||w|| is their init's: N(0, 1) in torch,
  N(0, 0.02) in GPT-2), unless tied to the head. Normalisation layers are shown, not judged.
- the head, from the graph and never from a name: the embedding a tied head uses (from the
  kinds); else the last layer in forward order that is neither a normalisation, an untied
  embedding nor a top-level parameter (tables without kinds: a first embedding with no
  head-like last layer is a tied head, as GPT-2 lists it once).
- placement: ``nn.MultiheadAttention.out_proj`` never runs as a module (no forward hook sees
  it): placed right after its attention's ``in_proj_weight``. Parameters the model itself owns
  (a ViT's ``cls_token``, ``pos_embed``) are ``top_level``, with the role ``embedding``: they
  act where they join the input; shown, not judged.
- early / middle / last: the median over the first EARLY_FRACTION = 10% of windows (at least
  one), the middle window, the last window; each layer's ratio to the head at those points.
- update ratio per step: ``||w_end - w_start|| / ||w_start||`` over a window divided by its
  steps; per layer the largest over its weights, then the median, the max and the last over
  windows. ``normalised`` marks a conv followed by a normalisation layer (scale-invariant
  weights: a large relative step grows ||w|| and so shrinks the next one).
- projection shortcuts (``downsample.0``, ``shortcut.0``: 1x1 convs beside a block's main
  path) have the role ``shortcut``: shown, not judged for vanishing. He init by fan_out gives a
  1x1 conv 3x the per-element scale of a 3x3 conv of the same width, so its ||g||/||w|| sits
  lowest of a healthy ResNet (1/46 - 1/27 of the head, docs/calibration.md) for its init, not
  for its gradient; a gradient that vanishes on its way back shows in the main path too. NaN
  (a parameter that started at zero, such as a fresh bias) is missing.
- activations: per tap, the median share of a bounded activation's outputs with |a| > 0.97 of
  its range (saturated), and the share of a rectifier's units never positive in the last window
  it fired in (dead); the last tap is marked ``output`` when bounded and of another kind than
  the one before it (``sigmoid_6`` after ``tanh_5``: the output's squashing function).
- loss: first, at the end of the early part, best after it, the median of the last
  EARLY_FRACTION (``tail``), last, and the count of non-finite values.

Example:
    >>> from gradflow.monitor import Window
    >>> w = Window(0, 1, gradients={"a.weight": {"mean_abs": 0.01}, "b.weight": {"mean_abs": 1.0}})
    >>> measure_layers([w])["b"]["role"]
    'head'
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradflow.monitor.kinds import TIED_HEAD
from gradflow.monitor.order import in_order, layer_of

EARLY_FRACTION = 0.1        # the "early" windows / epochs: this share of the run, at least one


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


def analysis_kinds(model: Any) -> dict[str, str]:
    """The analysis' kinds of a model's parameters (the monitor's ``parameter_kinds`` is the module
    kind alone): parameter name -> ``norm``, ``embedding``, ``recurrent`` or another module kind
    (``gradflow.monitor.kinds``: ``linear``, ``conv``, ``attention``, ``other``), from the module
    that owns it, plus ``@head`` -> the parameter that is the output head's weight when the head
    is tied to an embedding (a Linear whose weight is an earlier module's, as in GPT-2 and nanoGPT).
    Names are the user's, as the monitor records them (``model_checks.user_name``): ``fc.weight``
    for a parametrized weight's ``fc.parametrizations.weight.original``.

    Example:
        >>> from torch import nn
        >>> analysis_kinds(nn.Sequential(nn.Embedding(5, 2), nn.LayerNorm(2)))["1.weight"]
        'norm'
    """
    from gradflow.monitor.kinds import parameter_kinds as module_kinds
    from gradflow.monitor.model_checks import user_name

    # under the names the monitor records: a parametrized weight (fc.parametrizations.weight.original) is fc.weight
    return _from_module_kinds({user_name(name): kind for name, kind in module_kinds(model).items()})


def recorded_kinds(windows: Sequence[Any]) -> dict[str, str] | None:
    """The kinds the monitor recorded with the windows (``Window.kinds``, the ``kind`` column of
    gradients.csv) in ``analysis_kinds``' form; None when there are none (tables written before
    the column existed: kinds are then told by name)."""
    found: dict[str, str] = {}
    for window in windows:
        found.update(getattr(window, "kinds", None) or {})
    return _from_module_kinds(found) if found else None


def _from_module_kinds(kinds: Mapping[str, str]) -> dict[str, str]:
    """A tied head (``embedding+head``) becomes an ``embedding`` plus ``@head``."""
    out: dict[str, str] = {}
    for name, kind in kinds.items():
        if kind == TIED_HEAD:
            out["@head"], kind = name, "embedding"
        out[name] = kind
    return out


# Projection shortcuts: torchvision's ``downsample.0``, CIFAR ResNets' ``shortcut.0``, timm's ``downsample.conv``.
_SHORTCUT_NAME = re.compile(r"(^|\.)(downsample|shortcut)(\.0|\.conv)?$")
_CONV_NAME = re.compile(r"conv|downsample|shortcut", re.IGNORECASE)


def _mark_normalised(layers: dict[str, dict[str, Any]], groups: Mapping[str, Sequence[str]],
                     kinds: Mapping[str, str] | None) -> None:
    """``normalised``: a convolution whose next layer in forward order is a normalisation layer
    (conv -> BatchNorm). Its output is renormalised, so its weights are scale-invariant: a step
    that is large against ||w|| grows ||w|| and the next relative step shrinks (Hoffer et al.
    2018, "Norm matters"; Arora et al. 2019, "auto rate-tuning by batch normalization")."""
    names = list(layers)
    for layer, after in zip(names, names[1:]):
        if kinds:
            conv = any(kinds.get(p) == "conv" for p in groups[layer])
        else:
            conv = bool(_CONV_NAME.search(layer.rpartition(".")[2] or layer)) or bool(_SHORTCUT_NAME.search(layer))
        layers[layer]["normalised"] = conv and layers[after]["kind"] == "norm"


_RNN_PARAMETER = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
_EMBEDDING_NAME = re.compile(r"(wte|wpe|embed|embedding|emb)", re.IGNORECASE)
_NORM_NAME = re.compile(r"(norm|^(bn|ln|gn)(\d|_|$))", re.IGNORECASE)


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


def _find_head(layers: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str] | None) -> str | None:
    """The output head, from the graph, never from a name: the embedding a tied head uses
    (``@head`` in the kinds); else the last layer in forward order (the parameter owner that
    runs last, whose output reaches the loss) that is neither a normalisation nor an untied
    embedding nor a top-level parameter; for tables without kinds whose first layer is an
    embedding and whose last is no weight layer after it, that embedding (GPT-2 lists its tied
    head once)."""
    candidates = [layer for layer, row in layers.items() if row["kind"] not in ("norm", "embedding")
                  and not row.get("top_level")] or [layer for layer, row in layers.items() if row["kind"] != "norm"] or list(layers)
    if not candidates:
        return None
    if kinds and "@head" in kinds:
        tied = group_of(kinds["@head"])
        if tied in layers:
            return tied
    names = list(layers)
    if not kinds and layers[names[0]]["kind"] == "embedding" and candidates[-1] != names[0]:
        # Tables written before the kind column: a tied head is listed once, as the first
        # embedding (GPT-2); told by the last layer's name, the one place a name still decides.
        last = candidates[-1].rpartition(".")[2].lower()
        if not any(word in last for word in ("head", "out", "fc", "classifier", "decoder", "logits")):
            return names[0]
    return candidates[-1]


_MHA_INPUT = re.compile(r"(.*)\.(in_proj_weight|q_proj_weight)$")


def place_where_they_act(names: list[str]) -> list[str]:
    """Parameter names with those of modules that never run as modules moved to where they
    act: ``nn.MultiheadAttention.out_proj`` is called inside the attention's forward, so a
    forward pre-hook never sees it and the forward order puts it after everything that ran
    (after the head); it belongs right after its attention's ``in_proj_weight``.

    Example:
        >>> place_where_they_act(["a.in_proj_weight", "head.weight", "a.out_proj.weight"])
        ['a.in_proj_weight', 'a.out_proj.weight', 'head.weight']
    """
    attentions = {m.group(1) for m in map(_MHA_INPUT.match, names) if m}
    moved = [n for n in names if n.rpartition(".out_proj.")[0] in attentions]
    if not moved:
        return names
    out = [n for n in names if n not in moved]
    for attention in attentions:
        inside = [n for n in moved if n.rpartition(".out_proj.")[0] == attention]
        last = max(i for i, n in enumerate(out) if n.startswith(attention + ".") and ".out_proj." not in n)
        out[last + 1:last + 1] = inside
    return out


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


def _gate_sizes(windows: Sequence[Any], parameters: Sequence[str]) -> dict[str, np.ndarray]:
    """Per gate of a recurrent layer (``Window.gates``): per window ||g|| / ||w|| over the gate's
    rows of the layer's gated weights together (``weight_ih`` and ``weight_hh``); {} if none."""
    recorded = [getattr(w, "gates", None) or {} for w in windows]
    gated = [p for p in parameters if any(p in gates for gates in recorded)]
    names = list(dict.fromkeys(g for gates in recorded for p in gated for g in gates.get(p, {})))
    out = {}
    for gate in names:
        def series(p: str, key: str, gate: str = gate) -> np.ndarray:
            return np.array([_number(gates.get(p, {}).get(gate, {}).get(key)) for gates in recorded], dtype=float)
        g2 = sum(series(p, "norm") ** 2 for p in gated)
        w2 = sum(series(p, "weight_norm") ** 2 for p in gated)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[gate] = np.where(np.isfinite(w2) & (w2 > 0), np.sqrt(g2) / np.sqrt(w2), math.nan)
    return out


MEASURE_LABEL = {"relative": "||g|| / ||w||", "mean_abs": "mean |g|"}    # the one name of each measure


def layer_series(windows: Sequence[Any]) -> tuple[str, dict[str, np.ndarray]]:
    """(measure, layer -> size per window), input first: the size ``measure_layers`` judges,
    ``||g|| / ||w||`` over each layer's weights (``relative``), or per-element mean |g| of its
    weight (``mean_abs``) for windows without gradient and weight norms. NaN where a window
    has none. ``compare`` and ``gradients.png`` draw this, so every view shows one measure.

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 1, gradients={"a.weight": {"mean_abs": 0.1, "norm": 2.0, "weight_norm": 4.0}})
        >>> layer_series([w])
        ('relative', {'a': array([0.5])})
    """
    names = list(dict.fromkeys(n for w in windows for n in w.gradients))
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    relative = all(math.isfinite(_number(w.gradients[p].get("weight_norm"))) and "norm" in w.gradients[p]
                   for w in windows for p in w.gradients)
    out = {}
    for layer, parameters in groups.items():
        weights = [p for p in parameters if not _is_bias(p)] or parameters
        out[layer] = _relative_sizes(windows, weights, False) if relative else _series(windows, weights[0], "mean_abs")
    return ("relative" if relative else "mean_abs"), out


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
    names = place_where_they_act(in_order(names, order))
    nested = any("." in name for name in names)
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
        if nested and all("." not in p for p in parameters) and kind not in ("recurrent",):
            # A parameter the model itself owns (a ViT's cls_token, pos_embed): it acts where it
            # is added to the input, as a lookup table does; shown, not judged.
            layers[layer]["top_level"] = True
    head = _find_head(layers, kinds)
    _mark_normalised(layers, groups, kinds)
    output = sizes[head]
    points = {"early": slice(0, early), "middle": slice(n // 2, n // 2 + 1), "last": slice(n - 1, n)}
    for layer, parameters in groups.items():
        row = layers[layer]
        # An embedding is a lookup table, not a layer the gradient flows through, and its ||w||
        # is whatever its init chose (N(0, 1) in torch, N(0, 0.02) in GPT-2): shown, not judged.
        row["role"] = "head" if layer == head else (row["kind"] if row["kind"] in ("norm", "embedding") else
                                                    "embedding" if row.get("top_level") else
                                                    "shortcut" if _SHORTCUT_NAME.search(layer) else "hidden")
        row["measure"] = "relative" if relative else "mean_abs"
        for point, part in points.items():
            size, out = _median(sizes[layer][part]), _median(output[part])
            row[f"gradient_{point}"] = size
            row[f"ratio_{point}"] = size / out if out > 0 else math.nan
        if row["kind"] == "recurrent":
            gates = {}
            for gate, size in _gate_sizes(windows, parameters).items():
                gates[gate] = {"gradient_early": _median(size[points["early"]])}
                for point, part in points.items():
                    out = _median(output[part])
                    gates[gate][f"ratio_{point}"] = _median(size[part]) / out if out > 0 else math.nan
            if gates:
                row["gates"] = gates
        later = sizes[layer][early:]
        row["gradient_peak"] = float(np.nanmax(later)) if np.isfinite(later).any() else math.nan
        weights = [p for p in parameters if not _is_bias(p)] or parameters
        stack = np.vstack([_update_per_step(windows, p) for p in weights])
        updates = np.array([max((v for v in column if math.isfinite(v)), default=math.nan) for column in stack.T])
        row["update_ratio"] = _median(updates)
        row["update_ratio_max"] = float(np.nanmax(updates)) if np.isfinite(updates).any() else math.nan
        row["update_ratio_last"] = float(updates[-1])
        counts = [_number(w.gradients.get(p, {}).get("nonfinite")) for w in windows for p in parameters]
        row["nonfinite"] = int(sum(c for c in counts if math.isfinite(c)))
        last = [_number(windows[-1].gradients[p].get("zero_fraction")) for p in parameters
                if p in windows[-1].gradients]
        row["zero_last"] = min(last) if last else math.nan
    return layers


_BOUNDS = {"sigmoid": (0.0, 1.0), "hardsigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0)}


def activation_bounds(windows: Sequence[Any], model: Any = None) -> dict[str, tuple[float, float]]:
    """Tap name -> the range of its bounded activation (sigmoid (0, 1), tanh (-1, 1)), from the
    model's module classes when given, else from the tap's name (``sigmoid_6``)."""
    names = {name for w in windows for name in w.activations}
    types: dict[str, str] = {}
    if model is not None:
        types = {name: type(m).__name__.lower() for name, m in model.named_modules() if name in names}
    out = {}
    for name in names:
        label = types.get(name) or name.lower()
        for word in sorted(_BOUNDS, key=len, reverse=True):
            if word in label:
                out[name] = _BOUNDS[word]
                break
    return out


def measure_activations(windows: Sequence[Any], bounds: Mapping[str, tuple[float, float]] | None = None
                        ) -> dict[str, dict[str, float]]:
    """Per activation module: median saturated fraction (bounded ones), the dead fraction of
    the last window it fired in with finite outputs (rectifiers; NaN if none: a NaN input makes a
    ReLU's output NaN, never positive, not dead; ``dead_first``: in the first window), and for a bounded one with known ``bounds``
    (``activation_bounds``) ``end``: the median over the last half of the windows (a layer
    driven to an end during training, Glorot & Bengio 2010 Fig. 2) of the mean output's distance from
    the nearer end of the range, as a share of the range (a sigmoid layer at mean 0.02: 0.02);
    ``output`` marks a presumed output squashing (the last tap, bounded, of another kind than
    the one before it).

    Example:
        >>> from gradflow.monitor import Window
        >>> w = Window(0, 1, activations={"relu_1": {"dead_fraction": 0.2}})
        >>> measure_activations([w])["relu_1"]["dead"]
        0.2
    """
    bounds = bounds or {}
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
            if name in bounds:
                low, high = bounds[name]
                means = np.array([_number(r.get("mean")) for r in seen[len(seen) // 2:]])
                row["end"] = _median(np.minimum(means - low, high - means) / (high - low))
        if "dead_fraction" in seen[-1]:
            # A rectifier fed NaN outputs NaN, never positive: read its units where they were finite.
            finite = [r for r in seen if math.isfinite(_number(r.get("mean", 0.0)))]
            row["dead"] = _number(finite[-1]["dead_fraction"]) if finite else math.nan
            row["dead_first"] = _number(seen[0].get("dead_fraction"))
        rows[name] = row
    if len(rows) > 1 and "saturated" in rows[names[-1]] and _unindexed(names[-1]) != _unindexed(names[-2]):
        rows[names[-1]]["output"] = True
    return rows


def _unindexed(name: str) -> str:
    """``sigmoid_6`` -> ``sigmoid``; ``head.act`` -> ``head.act``: a module name without its index
    (what tells the output activation from the hidden ones; not a module kind, monitor.kinds)."""
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
