"""GradientMonitor: per-layer gradient, weight and activation statistics for any nn.Module.

The monitor records the gradient the optimizer applies. It hooks the optimizer's step (a
pre-hook), not the parameters' gradients, so what it sees is the gradient after accumulation
over micro-batches, after DistributedDataParallel's all-reduce, and after
``GradScaler.unscale_`` under AMP: the hooks that tensor-hook tools use fire before all three.
Every step's statistics are summed on the device; ``log(step)`` reads the window back to the
host once, writes it to TensorBoard and starts the next window.

Example:
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> with GradientMonitor(model, SummaryWriter("runs/mine")) as monitor:
    ...     for epoch in range(10):
    ...         for x, y in loader:
    ...             optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    ...         stats = monitor.log(epoch)
    >>> stats["dense_1.weight"]["mean_abs"]

This module depends on torch (and numpy for reading results) only, never on the trainer,
the config or the CLI.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradflow.monitor import stats as S
from gradflow.monitor.activations import _ActivationAccumulator, is_activation
from gradflow.monitor.gradients import _GradientAccumulator
from gradflow.monitor.stats import Histogram
from gradflow.monitor.tensors import MonitorError
from gradflow.monitor.weights import _WeightTracker

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GradientMonitor]" = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel, DataParallel or torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def tag_path(name: str) -> str:
    """TensorBoard path of a parameter or module name: ``dense_1.weight`` -> ``dense_1/weight``."""
    return name.replace(".", "/")


@dataclass
class Window:
    """What one window recorded: per-parameter gradient and weight rows, per-module activations."""

    step: int
    steps: int
    member: int | None = None    # which member of a batched model (``members`` > 1)
    gradients: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    activations: dict[str, dict[str, float]] = field(default_factory=dict)


class GradientMonitor:
    """Records per-parameter gradient statistics at every optimizer step of ``model``.

    Args:
        model: any nn.Module (also wrapped in DistributedDataParallel or torch.compile).
        writer: a ``SummaryWriter`` to stream to, or None to only return and keep statistics.
        optimizer: watch this optimizer's steps only; by default any torch.optim optimizer
            that steps this model's parameters is watched.
        histograms: write value and log10 |g| histograms (the counts behind the zero and
            non-finite statistics are kept either way).
        weights: also record weight norms, update ratios and weight histograms.
        activations: tap activation modules (tanh, ReLU, ...) in training forward passes. Their
            outputs are read later in batches, so an output modified in place after the
            activation (rare) is read as modified.
        members: K > 1 for K models trained as one (every parameter and activation stacked on
            a leading dimension of K): statistics are kept per member, ``log`` returns one dict
            per member, ``member_history(k)`` gives a member's windows, and ``writer`` may be a
            list of K writers (else tags are prefixed ``member_<k>/``).

    The monitor keeps no reference to ``model`` itself, adds nothing to it, and removes every
    hook it added on ``remove()`` or on leaving ``with``.

    Example:
        >>> monitor = GradientMonitor(model, writer)
        >>> ...; loss.backward(); optimizer.step()
        >>> monitor.log(step=0)["dense_1.weight"]["norm"]
        >>> monitor.remove()
    """

    def __init__(self, model: nn.Module, writer=None, *, optimizer: torch.optim.Optimizer | None = None,
                 histograms: bool = True, weights: bool = True, activations: bool = True,
                 members: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientMonitor needs an nn.Module, got {type(model).__name__}")
        inner = unwrap(model)
        previous = _ATTACHED.get(inner)
        if previous is not None and previous.attached:
            raise MonitorError(
                f"this {type(inner).__name__} already has a GradientMonitor attached; call .remove() on "
                "that monitor (or GradientMonitor.detach(model)) before attaching another")
        named = [(name, p) for name, p in inner.named_parameters() if p.is_floating_point()]
        if not named:
            raise MonitorError(f"{type(inner).__name__} has no floating-point parameters to monitor")
        _check_members(named, members)
        params = [p for _, p in named]
        self.names = [name for name, _ in named]
        self.members = members
        self._sinks = _sinks(writer, members)
        self.histograms = histograms
        self.history: list[Window] = []
        self._model = weakref.ref(inner)
        self._gradients = _GradientAccumulator(params, members)
        self._weights = _WeightTracker(params, members) if weights else None
        taps = [(n, m) for n, m in inner.named_modules() if is_activation(m)] if activations else []
        self._activations = _ActivationAccumulator(taps, params[0].device, members)
        self._optimizers: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()
        self._handles: list = []
        self._window_steps = 0
        self._attach(inner, optimizer, taps)

    # -- life cycle -----------------------------------------------------------------------

    def _attach(self, model: nn.Module, optimizer, taps) -> None:
        if optimizer is not None:
            self._optimizers[optimizer] = True
            self._handles.append(optimizer.register_step_pre_hook(self._on_optimizer_step))
        else:
            self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_step))
        for index, (_, module) in enumerate(taps):
            self._handles.append(module.register_forward_hook(self._activations.hook(index)))
        _ATTACHED[model] = self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook this monitor added. Safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # Fold in what is pending (and let go of it): a later log() still reports it.
        self._gradients.reduce()
        self._activations.reduce()
        model = self._model()
        if model is not None and _ATTACHED.get(model) is self:
            del _ATTACHED[model]

    @classmethod
    def detach(cls, model: nn.Module) -> bool:
        """Remove whichever monitor is attached to ``model``; True if there was one."""
        monitor = _ATTACHED.get(unwrap(model))
        if monitor is None:
            return False
        monitor.remove()
        return True

    def __enter__(self) -> "GradientMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- recording ------------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer, args=None, kwargs=None) -> None:
        owns = self._optimizers.get(optimizer)
        if owns is None:  # first step of an optimizer we were not told about: is it ours?
            mine = {id(p) for p in self._gradients.params}
            owns = any(id(p) in mine for group in optimizer.param_groups for p in group["params"])
            self._optimizers[optimizer] = owns
        if owns:
            self.record()
        return None

    def record(self) -> None:
        """Record the current gradients as one step. Called for you at each optimizer step;
        call it yourself after ``backward()`` only if your loop has no torch.optim optimizer."""
        self._gradients.record()
        self._window_steps += 1

    # -- reading --------------------------------------------------------------------------

    def log(self, step: int) -> dict[str, dict[str, float]] | list[dict[str, dict[str, float]]]:
        """Close the window: write its statistics at ``step`` and return them per parameter.

        Each parameter's ``mean``, ``mean_abs``, ``norm`` and ``max_abs`` are the means over the
        window's steps of that step's value; ``nonfinite`` counts every non-finite element of
        every step and ``zero_fraction`` every zero one. Parameters that had no gradient in the
        window are left out. Weight statistics join as ``weight_l1``, ``weight_norm`` and
        ``weight_update_ratio``; activations are in ``history[-1].activations``. With
        ``members`` K > 1, a list of K such dicts, one per member.
        """
        self._gradients.reduce()
        self._activations.reduce()
        values = self._read_back()
        members = range(self.members)
        windows = [Window(step, self._window_steps, member=k if self.members > 1 else None) for k in members]
        scalars: list[dict[str, float]] = [{} for _ in members]
        wanted = _HistogramRequests()
        self._read_gradients(values, windows, scalars, wanted)
        if self._weights is not None:
            self._read_weights(values, windows, scalars, wanted)
        self._read_activations(values, windows, scalars, wanted)
        histograms = wanted.build(self.members) if self.histograms and self._sinks else [{} for _ in members]
        for k, sink, prefix in self._sinks:
            sink.log({prefix + tag: v for tag, v in scalars[k].items()},
                     {prefix + tag: h for tag, h in histograms[k].items()}, step)
        self.history.extend(windows)
        self._start_window()
        return windows[0].gradients if self.members == 1 else [w.gradients for w in windows]

    def member_history(self, member: int) -> list[Window]:
        """The windows of one member of a batched model (``members`` > 1)."""
        return [w for w in self.history if w.member == member]

    def _read_back(self) -> dict[str, np.ndarray]:
        """One device-to-host copy of everything the window accumulated."""
        parts = {"totals": self._gradients.totals, "counts": self._gradients.counts,
                 "moments": self._activations.moments, "activation_counts": self._activations.counts,
                 "positives": self._activations.positives}
        if self._weights is not None:
            parts["weights"], parts["weight_counts"] = self._weights.summary()
        if self._gradients.totals.device.type == "cpu":      # copies, not views: the sums are zeroed next
            return {key: tensor.numpy().astype(np.float64) for key, tensor in parts.items()}
        flat = torch.cat([t.reshape(-1).double() for t in parts.values()]).cpu().numpy()
        out, start = {}, 0
        for key, tensor in parts.items():
            out[key] = flat[start:start + tensor.numel()].reshape(tuple(tensor.shape))
            start += tensor.numel()
        return out

    def _slots(self, names: list[str]):
        """(slot, member, name, tag path) for every slot: member k of item i is slot i*K + k."""
        for slot in range(len(names) * self.members):
            index, member = divmod(slot, self.members)
            yield slot, member, names[index], tag_path(names[index])

    def _read_gradients(self, values, windows, scalars, wanted: "_HistogramRequests") -> None:
        counts = values["counts"].reshape(-1, S.SIGN_EXPONENT_BINS)
        steps = self._gradients.steps()
        numel = np.asarray(self._gradients.slot_numel, dtype=np.float64)
        means = values["totals"] / np.maximum(steps, 1)[:, None]
        zeros = counts[:, S.ZERO_EXPONENT] + counts[:, S.EXPONENTS + S.ZERO_EXPONENT]
        nonfinite = counts[:, S.NONFINITE_EXPONENT] + counts[:, S.EXPONENTS + S.NONFINITE_EXPONENT]
        for slot, k, name, path in self._slots(self.names):
            if steps[slot] == 0:
                continue
            row = {"mean": float(means[slot, 0] / numel[slot]), "mean_abs": float(means[slot, 1] / numel[slot]),
                   "norm": float(means[slot, 2]), "max_abs": float(means[slot, 3]),
                   "zero_fraction": float(zeros[slot] / (numel[slot] * steps[slot])),
                   "nonfinite": int(nonfinite[slot])}
            scalars[k].update({f"grad/{path}/{key}": value for key, value in row.items()})
            wanted.value(k, f"grad/{path}", counts[slot])
            wanted.log10(k, f"grad_log10/{path}", counts[slot])
            row["steps"] = int(steps[slot])
            windows[k].gradients[name] = row

    def _read_weights(self, values, windows, scalars, wanted: "_HistogramRequests") -> None:
        l1, l2, moved, start = values["weights"].T
        with np.errstate(divide="ignore", invalid="ignore"):
            # A zero start (a fresh bias) has no relative update: NaN says so.
            ratios = np.where(start > 0, moved / start, np.nan)
        for slot, k, name, path in self._slots(self.names):
            row = {"l1": float(l1[slot]), "norm": float(l2[slot]), "update_ratio": float(ratios[slot])}
            windows[k].weights[name] = row
            if name in windows[k].gradients:
                windows[k].gradients[name].update({f"weight_{key}": v for key, v in row.items()})
            scalars[k].update({f"weight/{path}/{key}": value for key, value in row.items()})
            wanted.value(k, f"weight/{path}", values["weight_counts"][slot])

    def _read_activations(self, values, windows, scalars, wanted: "_HistogramRequests") -> None:
        taps = self._activations
        counts = values["activation_counts"].reshape(-1, S.SIGN_EXPONENT_BINS)
        for slot, k, name, path in self._slots(taps.names):
            row = taps.read(slot, values["moments"][slot], values["positives"])
            if row is None:
                continue
            windows[k].activations[name] = row
            scalars[k].update({f"activation/{path}/{key}": v for key, v in row.items()})
            wanted.value(k, f"activation/{path}", counts[slot])

    def _start_window(self) -> None:
        self._gradients.reset()
        self._activations.reset()
        if self._weights is not None:
            self._weights.snapshot()
        self._window_steps = 0


class _HistogramRequests:
    """Histograms a window asks for, built together: two numpy passes over all the rows instead
    of a few per family (on a small model the window's fixed costs are what the monitor costs)."""

    def __init__(self) -> None:
        self._value: list[tuple[int, str, np.ndarray]] = []
        self._log10: list[tuple[int, str, np.ndarray]] = []

    def value(self, member: int, tag: str, counts: np.ndarray) -> None:
        self._value.append((member, tag, counts))

    def log10(self, member: int, tag: str, counts: np.ndarray) -> None:
        self._log10.append((member, tag, counts))

    def build(self, members: int) -> list[dict[str, Histogram]]:
        """Per member, tag -> histogram; a row with no finite value gets none (TensorBoard
        cannot draw an empty histogram)."""
        out: list[dict[str, Histogram]] = [{} for _ in range(members)]
        for requests, kind in ((self._value, S.value_histograms), (self._log10, S.log10_abs_histograms)):
            if not requests:
                continue
            for (member, tag, _), histogram in zip(requests, kind(np.stack([c for _, _, c in requests]))):
                if histogram is not None:
                    out[member][tag] = histogram
        return out


def _sinks(writer, members: int) -> list[tuple[int, object, str]]:
    """(member, sink, tag prefix) for each member: one writer per member, or one for all with
    ``member_<k>/`` tags."""
    if writer is None:
        return []
    from gradflow.monitor.sinks import (
        TensorBoardSink,  # imports TensorBoard's protos only when writing
    )

    if isinstance(writer, (list, tuple)):
        if len(writer) != members:
            raise MonitorError(f"got {len(writer)} writers for members={members}; pass one writer per member or one in all")
        return [(k, TensorBoardSink(w), "") for k, w in enumerate(writer)]
    sink = TensorBoardSink(writer)
    return [(k, sink, f"member_{k}/" if members > 1 else "") for k in range(members)]


def _check_members(named: list[tuple[str, torch.Tensor]], members: int) -> None:
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise MonitorError(f"members must be a positive int, got {members!r}")
    if members == 1:
        return
    for name, p in named:
        if p.dim() == 0 or p.shape[0] != members:
            raise MonitorError(f"members={members} needs every parameter stacked on a leading dimension of "
                               f"{members}; {name} has shape {tuple(p.shape)}")
