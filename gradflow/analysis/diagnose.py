"""Diagnosis: say in words whether gradients vanish, explode or die, show the evidence, and
suggest the fix. Pure logic over recorded windows: no matplotlib, no command line.

Example:
    >>> diagnosis = diagnose_run("runs/deep_tanh-20250101-120000-seed0")      # doctest: +SKIP
    >>> print(diagnosis.line())                                                # doctest: +SKIP
    Verdict: vanishing, saturated (dense_3 gradient vs the output layer's (dense_6), early on: ...)

A verdict is ``healthy`` or one or more of the rules in ``rules.RULES`` (``vanishing``,
``exploding``, ``saturated``, ``dead-units``, ``stalled``, ``oscillating``, ``output-mismatch``,
``tiny-gradient``), or ``insufficient`` (no rule fired but the run is too short to call
healthy). Every rule, its measure, threshold, source and advice key is one entry of that table;
docs/calibration.md has the runs behind them. A measure past its threshold without the
persistence or harm a verdict needs is a note in the report.

The work is split by responsibility: ``measures`` (per-layer and activation measures, layer
kinds, forward order, the head), ``rules`` (the checks and their thresholds, each with its
measured margins and source), ``advice`` (what to do, by architecture family); this module
holds the ``Diagnosis`` type, the entry points (``diagnose``, ``diagnose_monitor``,
``diagnose_run``) and the output forms (line, report, JSON, TensorBoard).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradflow.analysis.advice import CONTEXTS, architecture_family, nonfinite_hint, optimizer_name, recommend
from gradflow.analysis.history import read_history
from gradflow.analysis.measures import (
    activation_bounds,
    analysis_kinds,
    measure_activations,
    measure_layers,
    measure_loss,
    recorded_kinds,
)
from gradflow.analysis.nonfinite import domain_hint, first_source, restore_source, with_source
from gradflow.analysis.rules import RULES, Evidence, fmt_number, layer_name, run_rules, skipped_steps
from gradflow.analysis.through_time import check_through_time, fold_into_checks, time_recommendation
from gradflow.analysis.windows import GRADIENTS_FILE, load_windows

# Every verdict: ``healthy``, then the rules' names in table order (rules.RULES).
VERDICTS = ("healthy",) + tuple(rule.name for rule in RULES)


@dataclass
class Diagnosis:
    """A verdict with its evidence and a recommendation.

    ``evidence`` holds ``layers`` (per layer: gradient sizes, ratios to the output layer,
    update ratio, non-finite count), ``activations`` (per activation module: saturated and dead
    fractions), ``loss`` (first, early, best, last) and ``checks`` (per verdict: whether it
    fired, the measured value, the threshold and a phrase saying why).

    ``print(d)`` prints ``d.report()``.

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

    def __str__(self) -> str:
        """``print(diagnosis)`` shows the report; ``repr`` keeps the raw fields."""
        return self.report()

    def report(self) -> str:
        """Several lines for a person: the verdict, an evidence table per layer, the advice. The
        cells are ``_cells``'s, as in ``markdown``."""
        cells = _cells(self)
        width = max([14] + [len(row[0]) + 2 for row in cells["layers"][1:] if len(row) == 8])
        lines = [self.line(), ""]
        for row in cells["layers"]:
            name = f"  {row[8]} gate" if len(row) == 9 else row[0]
            lines.append("".join(f"{cell:{align}{size}}" for cell, align, size in
                                 zip((name,) + row[1:8], "<<>>>>>>", (width, 10, 18, 14, 11, 9, 13, 11))).rstrip())
        lines += [""] if cells["layers"] else []
        lines += [f"{'activation':<14}{'saturated':>10}{'dead (last)':>13}"] if cells["activations"] else []
        for name, saturated, dead, output in cells["activations"]:
            lines.append(f"{name:<14}{saturated:>10}{dead:>13}{'  (output, not judged)' if output else ''}")
        lines += [""] if cells["activations"] else []
        lines += [f"loss: {cells['loss']}"] if cells["loss"] else []
        lines += [f"note: {note}" for note in cells["notes"]]
        lines += ["", "Checks:"] + [f"  {mark:<3} {name}: {why}" for mark, name, why in cells["checks"]]
        lines += ["", "Recommendation: " + self.recommendation]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and inf become None)."""
        return {"verdicts": list(self.verdicts), "line": self.line(), "recommendation": self.recommendation,
                "evidence": _json_ready(self.evidence)}


# -- entry points ------------------------------------------------------------------------


def diagnose(windows: Sequence[Any], losses: Sequence[float] | None = None, *, model: Any = None,
             order: Sequence[str] | None = None, optimizer: Any = None, loss_fn: Any = None,
             context: str = "loop", nonfinite_part: bool | None = None) -> Diagnosis:
    """The verdict over recorded windows (``monitor.history`` or ``load_windows(run_dir)``).

    ``losses``: the training loss per epoch, per window or per step, if known (floats or 0-d
    tensors, or a 1-D tensor; any length, read in order as a series over the run, so it need not
    match the windows); without it ``stalled`` can only mean "no gradient left". Anything else
    raises a one-line ValueError (``loss_values``). ``model``: the trained module, if at hand: it tells
    normalisation, embedding and recurrent parameters and a tied head apart (else the kinds the
    monitor recorded with the windows, ``Window.kinds``; else their names do), the range of
    each bounded activation, the family for the advice and the module the model ends with.
    ``order``: parameter names in the order their modules first ran forward (the monitor's
    ``forward_order``), else the recorded order stands for input-to-output. ``optimizer``: the
    optimizer (or its class, or class name) that trained the run, for the advice. ``loss_fn``:
    the loss function (or its class name), for ``output-mismatch``. ``context``: where the
    windows came from, ``loop`` (your own loop) or ``run`` (a ``gradflow train`` run directory):
    the advice names what you have there. ``nonfinite_part``: whether the monitor looked for the
    first non-finite value (``GradientMonitor(nonfinite=True)``; None: unknown); when it did not
    and the gradients went non-finite, the advice says how to turn it on.

    Example:
        >>> from gradflow.monitor import Window
        >>> rows = {"dense_1.weight": {"mean_abs": 1e-5, "nonfinite": 0},
        ...         "dense_2.weight": {"mean_abs": 1e-2, "nonfinite": 0}}
        >>> diagnose([Window(i, 10, gradients=rows) for i in range(5)]).verdicts
        ['vanishing']
        >>> diagnose([Window(0, 10, gradients=rows)]).verdicts   # too few windows: said first
        ['insufficient', 'vanishing']
    """
    if not windows:
        raise ValueError("diagnose needs at least one recorded window; call monitor.log(step) at least once")
    if context not in CONTEXTS:
        raise ValueError(f"diagnose: context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    losses = loss_values(losses)
    kinds = analysis_kinds(model) if model is not None else recorded_kinds(windows)
    layers = measure_layers(windows, order, kinds)
    activations = measure_activations(windows, activation_bounds(windows, model))
    loss = measure_loss(losses) if losses is not None else None
    ev = Evidence(layers, activations, loss, windows, losses,
                  output=_output_module(model), loss_fn=optimizer_name(loss_fn), context=context)
    checks = run_rules(ev)
    time, time_notes = check_through_time(windows, loss), []    # recurrent layers (through_time.py, issue 22)
    fold_into_checks(checks, time, time_notes)
    checks["exploding"], source_notes = with_source(checks["exploding"], windows)   # nonfinite.py (issue 24)
    verdicts = [name for name, check in checks.items() if check["fired"] and name != "insufficient"]
    if checks["insufficient"]["fired"]:
        # Too few windows: said first, so a rule that fired on one window reads as an early sign.
        verdicts = ["insufficient"] + verdicts
    elif not verdicts:
        verdicts = ["healthy"]
    family = architecture_family(layers, model)
    opt = optimizer_name(optimizer)
    evidence = {"layers": layers, "activations": activations, "loss": loss, "checks": checks,
                "windows": len(windows), "family": family, "optimizer": opt,
                "order": "forward" if order else "recorded",
                "notes": [c["note"] for c in checks.values() if c.get("note")] + _notes(layers, kinds)
                + _overflow_notes(windows) + source_notes + time_notes,
                "first_nonfinite": first_source(windows), "through_time": time["layers"]}
    others = _cause_first([v for v in verdicts if v != time["verdict"]], checks)
    failing = _failing_kind(verdicts, checks, layers)
    advice = time_recommendation(time, verdicts, recommend(others, family, opt, failing, context)
                                 if others or not time["fired"] else "", context)
    hint = nonfinite_hint(checks, evidence["first_nonfinite"], context, nonfinite_part)
    if checks["exploding"]["fired"]:      # a NaN made forward at small steps: that module's own code
        hint = " ".join(filter(None, [hint, domain_hint(windows, evidence["first_nonfinite"])]))
    return Diagnosis(verdicts, evidence, f"{advice} {hint}" if hint else advice)


def _cause_first(verdicts: list[str], checks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The verdicts in the order their advice is given: a whole layer dead (``dead-units`` at
    value 1.0: every unit never positive, or every gradient zero) passes no gradient back, so the
    layers below it read as vanishing; its advice comes before ``vanishing``'s, whose
    tanh-initialisation advice does not fix it. The verdicts themselves keep their order."""
    if "vanishing" not in verdicts or "dead-units" not in verdicts or checks["dead-units"].get("value") != 1.0:
        return verdicts
    rest = [v for v in verdicts if v != "dead-units"]
    at = rest.index("vanishing")
    return [*rest[:at], "dead-units", *rest[at:]]


LOSSES_ACCEPTED = ("a sequence of numbers, one per epoch, window or step (floats, 0-d tensors or a 1-D tensor; "
                   "any length: read in order as a series over the run)")


def loss_values(losses: Any) -> list[float] | None:
    """``losses`` as floats (tensors detached: a loss that still requires grad is fine), None
    for None. Raises a one-line ValueError naming ``losses`` (or ``losses[i]``), what it got and
    what is accepted (``LOSSES_ACCEPTED``).

    Example:
        >>> import torch
        >>> loss_values([torch.tensor(0.5, requires_grad=True), 0.25])
        [0.5, 0.25]
    """
    if losses is None:
        return None
    if hasattr(losses, "detach"):                      # a tensor of losses
        losses = losses.detach().reshape(-1).tolist() if losses.dim() <= 1 else losses
    if isinstance(losses, (str, bytes)) or not isinstance(losses, (Sequence, np.ndarray)):
        shape = f" of shape {tuple(losses.shape)}" if hasattr(losses, "shape") else ""
        raise ValueError(f"losses must be {LOSSES_ACCEPTED}; got {type(losses).__name__}{shape}"
                         + (f" {losses[:40]!r}" if isinstance(losses, str) else ""))
    values = []
    for i, value in enumerate(losses):
        if hasattr(value, "detach") and getattr(value, "numel", lambda: 0)() == 1:
            value = value.detach().item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"losses[{i}] is {_described(value)}; losses must be {LOSSES_ACCEPTED}")
        values.append(float(value))
    return values


def _described(value: Any) -> str:
    """``None``, ``a tensor of 2 elements``, ``str '0.4'``: a bad loss value in an error."""
    if value is None or hasattr(value, "numel"):
        return "None" if value is None else f"a tensor of {value.numel()} elements"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _output_module(model: Any) -> str | None:
    """The class name of the module the model ends with: its last leaf module in registration
    order (an ``nn.Sequential``'s last), or None without a model. Models whose forward calls
    modules out of registration order may end elsewhere: the output-mismatch rule says which
    module it read."""
    if model is None:
        return None
    leaves = [m for m in model.modules() if not list(m.children())]
    return type(leaves[-1]).__name__ if leaves else None


def _failing_kind(verdicts: Sequence[str], checks: Mapping[str, Any], layers: Mapping[str, Any]) -> str | None:
    """``recurrent`` when the layer a vanishing or exploding verdict names is recurrent."""
    for verdict in ("vanishing", "exploding"):
        if verdict in verdicts:
            why = checks[verdict]["why"]
            named = [layer for layer in layers if why.startswith(layer_name(layer) + " ") or f" {layer_name(layer)} " in why]
            if any(layers[layer].get("kind") == "recurrent" for layer in named):
                return "recurrent"
    return None


def _overflow_notes(windows: Sequence[Any]) -> list[str]:
    skipped = sum(skipped_steps(w)[0] for w in windows)
    if not skipped:
        return []
    total = sum(skipped_steps(w)[1] for w in windows)
    return [f"{skipped} of {total} steps skipped on overflow (GradScaler); a few early on are the scale "
            "calibrating, not an explosion"]





def _notes(layers: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str] | None) -> list[str]:
    notes = []
    if any(row.get("kind") == "embedding" for row in layers.values()):
        notes.append("embeddings measured on the rows that received gradient (||g|| / ||w|| divided by "
                     "sqrt(1 - zero fraction of the gradient), rows of similar norm assumed) and shown, not "
                     "judged, unless tied to the head: their ||w|| is set by their init, not by training")
    if any(row.get("kind") == "recurrent" for row in layers.values()):
        notes.append("recurrent layers per stacked layer (l0, l1, ...), with each gate's ||g||/||w|| over its rows "
                     "of weight_ih and weight_hh where recorded; the gates' activations (sigmoid saturation) are "
                     "not observable: nn.LSTM/nn.GRU compute them inside one fused kernel")
    if any(row.get("kind") == "norm" for row in layers.values()):
        notes.append("normalisation layers shown, not judged" + ("" if kinds else " (told apart by name)"))
    return notes


def diagnose_monitor(monitor: Any, losses: Sequence[float] | None = None, member: int | None = None,
                     model: Any = None, optimizer: Any = None, loss_fn: Any = None) -> Diagnosis:
    """The verdict over a live ``GradientMonitor``'s recorded history; for a batched monitor
    (``members`` > 1), the verdict of member ``member``. ``losses``, ``model``, ``optimizer``
    and ``loss_fn`` are ``diagnose``'s (the optimizer defaults to the one the monitor watches);
    ``model`` and ``loss_fn`` together let ``output-mismatch`` be checked.

    Example:
        >>> with GradientMonitor(model) as monitor:                      # doctest: +SKIP
        ...     train(...); monitor.log(epoch)
        >>> print(diagnose_monitor(monitor).report())                    # doctest: +SKIP

    Raises:
        TypeError: ``monitor`` is not a monitor (no ``history``): the model or the losses passed first.
    """
    if not hasattr(monitor, "history"):   # a model or the losses passed first: say so, not AttributeError
        raise TypeError(f"diagnose_monitor(monitor, losses) takes the GradientMonitor you called log() on, got "
                        f"{type(monitor).__name__}; a run directory's verdict is diagnose_run(RUN_DIR)")
    windows = monitor.history
    members = sorted({w.member for w in windows if getattr(w, "member", None) is not None})
    if members and member is None:
        raise ValueError(f"this monitor records {len(members)} members; pass member=k (0..{members[-1]})")
    if member is not None:
        windows = [w for w in windows if getattr(w, "member", None) == member]
    order = getattr(monitor, "forward_order", None) or None
    if optimizer is None:       # the optimizer the monitor watches, when it was given one
        watched = getattr(monitor, "_optimizer", None)
        optimizer = watched() if callable(watched) else None
    parts = getattr(monitor, "parts", None)
    return diagnose(windows, losses, model=model, order=list(order) if order else None, optimizer=optimizer,
                    loss_fn=loss_fn, nonfinite_part="nonfinite" in parts if isinstance(parts, Mapping) else None)


def read_losses(run_dir: str | Path) -> list[float] | None:
    """The ``loss`` column of a run's history.csv, or None if there is none."""
    history = read_history(run_dir)
    return None if history is None else [row["loss"] for row in history if "loss" in row]


def diagnose_run(run_dir: str | Path, windows: list[Any] | None = None) -> Diagnosis:
    """The verdict of a run directory (gradients.csv, activations.csv, history.csv; ``windows``:
    its windows when already read, ``run_windows``). Its advice is a ``gradflow train`` run's
    when it has summary.json, else a user's loop's (``run_context``).

    Raises FileNotFoundError when the directory or its gradients.csv is missing.

    Example:
        >>> diagnose_run("runs/deep_relu-20250101-120000-seed0").verdicts    # doctest: +SKIP
        ['healthy']
    """
    windows = run_windows(run_dir) if windows is None else windows
    restore_source(windows, run_dir)          # the first non-finite source, kept in summary.json
    context, part = run_context(run_dir)
    return diagnose(windows, read_losses(run_dir), optimizer=read_optimizer(run_dir), context=context,
                    nonfinite_part=part)


def run_context(run_dir: str | Path) -> tuple[str, bool | None]:
    """(``diagnose``'s ``context``, ``nonfinite_part``) of a run directory: a ``gradflow train``
    run (it has summary.json) looks for the first non-finite value unless its seeds trained
    batched (summary.json's ``batched``); a directory without summary.json was recorded from a
    user's own loop (``MonitorCallback``), which says nothing of it."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        return "loop", None
    return "run", not summary.get("batched")


def read_optimizer(run_dir: str | Path) -> str | None:
    """The optimizer a gradflow run used (``optimizer.name`` in its config.yaml), or None."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    name = (config.get("optimizer") or {}).get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


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


TENSORBOARD_TAG = "diagnosis/text_summary"     # what TensorBoard shows for add_text("diagnosis", ...)


def markdown(diagnosis: Diagnosis) -> str:
    """The report as Markdown, as TensorBoard's Text tab renders it: the verdict and every reason
    in full (paragraphs wrap, where a code block cut the line off), the evidence as tables, the
    checks, the advice.

    Example:
        >>> markdown(Diagnosis(["healthy"], {"checks": {}}, "Nothing to fix.")).splitlines()[0]
        '**Verdict: healthy**'
    """
    cells = _cells(diagnosis)
    lines = [f"**Verdict: {', '.join(diagnosis.verdicts)}**", ""]
    lines += [f"- {_md(reason)}" for reason in cells["reasons"]] + ([""] if cells["reasons"] else [])
    if cells["layers"]:
        header, *rows = cells["layers"]
        lines += ["| " + " | ".join(_md(cell) for cell in header) + " |", "|---|---|--:|--:|--:|--:|--:|--:|"]
        lines += ["| " + " | ".join(_md(cell) for cell in row[:8]) + " |" for row in rows] + [""]
    if cells["activations"]:
        lines += ["| activation | saturated | dead (last) |", "|---|--:|--:|"]
        lines += [f"| {_md(name)}{' (output, not judged)' if output else ''} | {saturated} | {dead} |"
                  for name, saturated, dead, output in cells["activations"]] + [""]
    lines += [f"Loss: {cells['loss']}.", ""] if cells["loss"] else []
    lines += [f"- note: {_md(note)}" for note in cells["notes"]] + ([""] if cells["notes"] else [])
    lines += ["**Checks**", ""] + [f"- {'**yes**' if mark == 'yes' else mark} {name}: {_md(why)}"
                                   for mark, name, why in cells["checks"]]
    return "\n".join(lines + ["", f"**Advice:** {diagnosis.recommendation}"])


def _md(text: str) -> str:
    """Text safe inside Markdown tables and lists: pipes and asterisks escaped."""
    return str(text).replace("|", "\\|").replace("*", "\\*")


def verdict_scalars(diagnosis: Diagnosis) -> dict[str, float]:
    """For loggers that take only numbers (a CSV logger, a Trainer reporter): one
    ``diagnosis/<verdict>`` flag per verdict, 1.0 when it fired, else 0.0. TensorBoard gets the
    text instead (``write_to_tensorboard``)."""
    return {f"diagnosis/{verdict}": float(verdict in diagnosis.verdicts) for verdict in VERDICTS}


def write_to_tensorboard(diagnosis: Diagnosis, writer: Any, step: int) -> None:
    """Write the diagnosis as one Markdown text at ``step``, under ``TENSORBOARD_TAG``
    (``diagnosis/text_summary``: ``add_text`` appends ``/text_summary``). No scalars: a verdict
    and its evidence are one point at the end of a run, which a chart shows as a lone dot.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter                    # doctest: +SKIP
        >>> write_to_tensorboard(diagnose_run(run_dir), SummaryWriter(run_dir), 499)  # doctest: +SKIP
    """
    writer.add_text(TENSORBOARD_TAG.rpartition("/")[0], markdown(diagnosis), step)


# -- text --------------------------------------------------------------------------------


def _cells(diagnosis: Diagnosis) -> dict[str, Any]:
    """The report's cells, drawn as text by ``Diagnosis.report`` and as Markdown by ``markdown``:
    ``reasons`` (the fired verdicts' whys); ``layers`` (a header, then per layer 8 cells: layer,
    role, gradient early, /head early, middle, last, update/step, non-finite; a gate's row has a
    9th cell, the gate's name, and blank update and non-finite cells); ``activations`` (name,
    saturated, dead, whether it is the output); ``loss`` (one sentence, or None); ``notes``;
    ``checks`` (mark, name, why: the mark ``yes`` when it fired, ``n/a`` when it had nothing to
    judge, else ``no``)."""
    evidence = diagnosis.evidence
    checks = evidence.get("checks", {})
    layers = evidence.get("layers", {})
    layer_rows: list[tuple[str, ...]] = []
    if layers:
        size = "||g||/||w|| early" if next(iter(layers.values())).get("measure") == "relative" else "mean |g| early"
        layer_rows.append(("layer", "role", size, "/head early", "/h middle", "/h last", "update/step", "non-finite"))
    for layer, row in layers.items():
        layer_rows.append((layer, row.get("role", ""), *_ratios(row), fmt_number(row["update_ratio"]), str(row["nonfinite"])))
        layer_rows += [(f"{layer} {gate} gate", "gate", *_ratios(g), "", "", gate) for gate, g in row.get("gates", {}).items()]
    activations = [(name, f"{row['saturated']:.0%}" if "saturated" in row else "-",
                    f"{row['dead']:.0%}" if math.isfinite(row.get("dead", math.nan)) else "-", bool(row.get("output")))
                   for name, row in evidence.get("activations", {}).items()]
    loss = evidence.get("loss")
    return {"reasons": [check["why"] for name, check in checks.items() if check.get("fired") and name in diagnosis.verdicts],
            "layers": layer_rows, "activations": activations,
            "loss": "first {first:.4g}, after the early part {early:.4g}, best later {best:.4g}, at the end "
                    "{tail:.4g} (median), last {last:.4g}".format(**loss) if loss else None,
            "notes": list(evidence.get("notes", [])),
            "checks": [(_mark(check), name, check["why"]) for name, check in checks.items()]}


def _mark(check: Mapping[str, Any]) -> str:
    """``yes`` (fired), ``n/a`` (nothing to judge: ``checked`` False) or ``no``."""
    return "yes" if check.get("fired") else "no" if check.get("checked", True) else "n/a"


def _ratios(row: Mapping[str, float]) -> tuple[str, ...]:
    """A layer's or gate's gradient early and its ratios to the head early, middle and last, as text."""
    return tuple(fmt_number(row[key]) for key in ("gradient_early", "ratio_early", "ratio_middle", "ratio_last"))


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
