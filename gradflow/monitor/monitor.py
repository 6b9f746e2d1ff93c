"""GradientMonitor: per-layer gradient, weight and activation statistics for any nn.Module.

The monitor records the gradient each optimizer step applies. It hooks the optimizer's step (a
pre-hook), not the parameters' gradients, so what it sees is the gradient after accumulation
over micro-batches, after DistributedDataParallel's all-reduce, and after
``GradScaler.unscale_`` under AMP: the hooks that tensor-hook tools use fire before all three.
With a closure (``optimizer.step(closure)``) it records right after the closure's backward;
each step records the parameters of the optimizer that steps (``steps.py``). Steps that a
``GradScaler`` skipped on overflow are counted apart, and ``clip_grad_norm_`` calls give the
norm before clipping (``interception.py``). Every step's statistics are summed on the device;
``log(step)`` reads the window back to the host once, writes it to its sink and starts the
next window. Frameworks that know where the gradient is final (Lightning's
``on_before_optimizer_step``) pass ``automatic=False`` and call ``record()`` there.

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

import warnings
import weakref

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradflow.monitor import interception
from gradflow.monitor.activations import _ActivationAccumulator, is_activation
from gradflow.monitor.gradients import _GradientAccumulator, accumulator_dtype
from gradflow.monitor.steps import OptimizerMasks, closure_of, recording_closure, replace_closure
from gradflow.monitor.tensors import MonitorError
from gradflow.monitor.weights import _WeightTracker
from gradflow.monitor.window import HistogramRequests, Window, WindowReader, tag_path

__all__ = ["GradientMonitor", "MonitorError", "Window", "tag_path", "unwrap"]

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


class GradientMonitor:
    """Records per-parameter gradient statistics at every optimizer step of ``model``.

    Args:
        model: any nn.Module (also wrapped in DistributedDataParallel or torch.compile).
        writer: where each window goes: a ``SummaryWriter``; None to only return and keep
            statistics; a ``gradflow.monitor.sinks.Sink``, ``ScalarSink(fn)`` for loggers that take
            scalars only, or ``TeeSink(...)`` for several. Anything else is a ``MonitorError``.
        optimizer: watch this optimizer's steps only; by default any torch.optim optimizer
            that steps this model's parameters is watched, each recording its own parameters.
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
        automatic: record at each optimizer step (the default). False: record only when
            ``record()`` is called, for frameworks that know where the gradient is final.

    A window's ``steps`` is the largest number of steps any one parameter recorded: the
    optimizer steps for one optimizer, the training iterations for a GAN's two optimizers or
    for one optimizer per parameter. Each row's own ``steps`` counts that parameter's.

    Raises:
        MonitorError: a second monitor on the same model, a parameter on the meta device or
            not yet initialised (lazy modules), a writer of an unknown kind, bad ``members``.

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
                 members: int = 1, automatic: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientMonitor needs an nn.Module, got {type(model).__name__}")
        inner = unwrap(model)
        previous = _ATTACHED.get(inner)
        if previous is not None and previous.attached:
            raise MonitorError(
                f"this {type(inner).__name__} already has a GradientMonitor attached; call .remove() on "
                "that monitor (or GradientMonitor.detach(model)) before attaching another")
        named = _monitored_parameters(inner)
        _check_members(named, members)
        self._sinks = _sinks(writer, members)
        params = [p for _, p in named]
        self.names = [name for name, _ in named]
        self.members = members
        self.automatic = automatic
        self.histograms = histograms
        self.history: list[Window] = []
        self._model = weakref.ref(inner)
        self._gradients = _GradientAccumulator(params, members)
        self._weights = _WeightTracker(params, members) if weights else None
        taps = [(n, m) for n, m in inner.named_modules() if is_activation(m)] if activations else []
        self._activations = _ActivationAccumulator(taps, params[0].device, members)
        self._index_of = {id(p): i for i, p in enumerate(params)}
        self._masks = OptimizerMasks(len(params), lambda: self._index_of)
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._handles: list = []
        self._warned: set[str] = set()
        self._start_window()
        self._attach(inner, taps)

    # -- life cycle -----------------------------------------------------------------------

    def _attach(self, model: nn.Module, taps) -> None:
        if self.automatic:
            self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_step))
        for index, (_, module) in enumerate(taps):
            self._handles.append(module.register_forward_hook(self._activations.hook(index)))
        interception.watch(self)
        _ATTACHED[model] = self

    @property
    def attached(self) -> bool:
        return bool(self._handles) or self in interception._WATCHERS

    def remove(self) -> None:
        """Remove every hook this monitor added. Safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        interception.unwatch(self)
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

    def _on_optimizer_step(self, optimizer, args=(), kwargs=None):
        if self._optimizer is not None and optimizer is not self._optimizer():
            return None
        mask = self._mask(optimizer)
        if mask is None:
            return None
        if getattr(optimizer, "_step_supports_amp_scaling", False) and (kwargs or {}).get("grad_scaler") is not None:
            self._warn_once("fused-amp", f"{type(optimizer).__name__} unscales its gradients inside step(): the "
                            "monitor records them still scaled by the GradScaler's scale")
        closure, by_keyword = closure_of(args, kwargs or {})
        if closure is None:
            self._gradients.record(mask)
            return None
        # The closure runs forward and backward inside step(): record after it, not before.
        wrapped = recording_closure(closure, lambda: self._gradients.record(mask))
        return replace_closure(args, kwargs or {}, wrapped, by_keyword)

    def record(self, optimizer: torch.optim.Optimizer | None = None, *, skipped: bool = False) -> None:
        """Record the current gradients as one step: those of ``optimizer``'s parameters, or of
        every monitored parameter. Called for you at each optimizer step (``automatic=True``);
        call it yourself where your loop's gradient is final if it has no torch.optim optimizer,
        or with ``automatic=False``. ``skipped=True``: the step was not applied (an AMP overflow);
        it is counted as skipped with its non-finite values, not averaged into the statistics."""
        mask = None if optimizer is None else self._mask(optimizer)
        if optimizer is not None and mask is None:
            self._warn_once("foreign-optimizer", f"record({type(optimizer).__name__}): that optimizer holds none of "
                            "this monitor's parameters; nothing was recorded")
            return
        if skipped:
            self._gradients.record_skipped(mask)
            self._skipped_steps += 1
        else:
            self._gradients.record(mask)

    def _mask(self, optimizer: torch.optim.Optimizer) -> tuple[bool, ...] | None:
        mask = self._masks.mask(optimizer)
        if mask is None and self._masks.foreign(optimizer) and self._follow():
            mask = self._masks.mask(optimizer)      # the model's parameters were replaced: follow them
        return mask

    def _on_skipped(self, optimizer: torch.optim.Optimizer) -> None:
        """GradScaler skipped ``optimizer``'s step (interception)."""
        if not self.automatic or (self._optimizer is not None and optimizer is not self._optimizer()):
            return
        mask = self._mask(optimizer)
        if mask is not None:
            self._gradients.record_skipped(mask)
            self._skipped_steps += 1

    def _on_clip(self, params: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> None:
        """clip_grad_norm_ ran over ``params`` and found ``total`` (interception)."""
        if not any(id(p) in self._index_of for p in params):
            return
        total = total.detach()
        if self._clip is None or self._clip.device != total.device:
            self._clip = torch.zeros(2, device=total.device, dtype=accumulator_dtype(total.device))
        # torch clips when max_norm / (total + 1e-6) < 1 (torch/nn/utils/clip_grad.py).
        self._clip.add_(torch.stack([total, total + 1e-6 > max_norm]).to(self._clip.dtype))
        self._clip_calls += 1

    # -- reading --------------------------------------------------------------------------

    def log(self, step: int) -> dict[str, dict[str, float]] | list[dict[str, dict[str, float]]]:
        """Close the window: write its statistics at ``step`` and return them per parameter.

        Each parameter's ``mean``, ``mean_abs``, ``norm`` and ``max_abs`` are the means over the
        window's steps of that step's value; ``nonfinite`` counts every non-finite element of
        every applied step and ``zero_fraction`` every zero one; ``steps`` and ``skipped_steps``
        count that parameter's steps. Parameters that had no gradient in the window are left
        out. Weight statistics join as ``weight_l1``, ``weight_norm`` and
        ``weight_update_ratio``; activations are in ``history[-1].activations`` and the
        window-level figures (total norm per step, skipped and clipped steps) in
        ``history[-1].overall``. With ``members`` K > 1, a list of K such dicts, one per member.

        Raises:
            MonitorError: the model's parameters were replaced by tensors of another shape,
                dtype or device since the monitor attached.
        """
        self._follow()
        self._gradients.reduce()
        self._activations.reduce()
        values = self._read_back()
        steps = self._gradients.steps()
        self._warn_about_gaps(steps)
        windows = [Window(step, int(steps.max(initial=0)), member=k if self.members > 1 else None)
                   for k in range(self.members)]
        reader = WindowReader(self.names, self.members, windows, HistogramRequests())
        reader.gradients(values, steps, self._gradients.slot_numel, self._gradients.skipped)
        clipping = (self._clip_calls, *values["clip"]) if "clip" in values else None
        reader.overall(values["step_squares"], self._gradients.recorded, self._skipped_steps, clipping)
        if self._weights is not None:
            reader.weights(values)
        reader.activations(values, self._activations)
        histograms = reader.wanted.build(self.members) if self.histograms and self._sinks else None
        for k, sink, prefix in self._sinks:
            sink.log({prefix + tag: v for tag, v in reader.scalars[k].items()},
                     {prefix + tag: h for tag, h in (histograms[k] if histograms else {}).items()}, step)
        self.history.extend(windows)
        self._start_window()
        return windows[0].gradients if self.members == 1 else [w.gradients for w in windows]

    def member_history(self, member: int) -> list[Window]:
        """The windows of one member of a batched model (``members`` > 1)."""
        return [w for w in self.history if w.member == member]

    def _read_back(self) -> dict[str, np.ndarray]:
        """One device-to-host copy of everything the window accumulated."""
        g, a = self._gradients, self._activations
        parts = {"totals": g.totals, "counts": g.counts, "step_squares": g.step_squares,
                 "skipped_nonfinite": g.skipped_nonfinite, "moments": a.moments, "activation_counts": a.counts,
                 "positives": a.positives}
        if self._clip is not None:
            parts["clip"] = self._clip.to(g.device)
        if self._weights is not None:
            parts["weights"], parts["weight_counts"] = self._weights.summary()
        if g.device.type == "cpu":      # copies, not views: the sums are zeroed next
            return {key: tensor.numpy().astype(np.float64) for key, tensor in parts.items()}
        flat = torch.cat([t.reshape(-1).double() for t in parts.values()]).cpu().numpy()
        out, start = {}, 0
        for key, tensor in parts.items():
            out[key] = flat[start:start + tensor.numel()].reshape(tuple(tensor.shape))
            start += tensor.numel()
        return out

    def _start_window(self) -> None:
        self._gradients.reset()
        self._activations.reset()
        if self._weights is not None:
            self._weights.snapshot()
        self._skipped_steps = 0
        self._clip: torch.Tensor | None = None
        self._clip_calls = 0

    # -- keeping up with the model --------------------------------------------------------

    def _follow(self) -> bool:
        """Rebind to the model's parameters if they were replaced (``load_state_dict(...,
        assign=True)``, ``to_empty()``) by tensors of the same shape, dtype and device; True if
        so. MonitorError if they changed in a way the window's sums cannot follow."""
        model = self._model()
        if model is None:
            return False
        current = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        params = self._gradients.params
        if len(current) == len(params) and all(p is q for (_, p), q in zip(current, params)):
            _check_device(current, self._gradients.device)
            return False
        if [name for name, _ in current] != self.names:
            raise MonitorError(f"the model's parameters changed after the monitor attached (now {len(current)}, "
                               f"were {len(params)}); remove() this monitor and attach a new one")
        for (name, p), q in zip(current, params):
            _check_materialised(name, p)
            if (p.shape, p.dtype, p.device) != (q.shape, q.dtype, q.device):
                raise MonitorError(f"{name} was replaced by a tensor of another shape, dtype or device "
                                   f"({tuple(q.shape)} {q.dtype} {q.device} -> {tuple(p.shape)} {p.dtype} {p.device}); "
                                   "remove() this monitor and attach a new one after replacing parameters")
        new = [p for _, p in current]
        self._gradients.bind(new)
        if self._weights is not None:
            self._weights.bind(new)
        self._index_of = {id(p): i for i, p in enumerate(new)}
        self._masks.forget()
        return True

    def _warn_about_gaps(self, steps: np.ndarray) -> None:
        """Say so when gradients exist that this window did not record."""
        with_grad = [name for name, p in zip(self.names, self._gradients.params) if p.grad is not None]
        if not self._gradients.recorded and with_grad and not self._skipped_steps:
            self._warn_once("no-step", "log(): the parameters have gradients but no optimizer step was recorded in "
                            "this window; the monitor records at optimizer.step(). To look at gradients without "
                            "stepping (say, at initialisation), call monitor.record() after backward()")
        elif self._gradients.recorded:
            per_param = steps.reshape(-1, self.members)[:, 0]
            missed = [name for name, n in zip(self.names, per_param) if n == 0 and name in with_grad]
            if missed:
                self._warn_once("not-stepped", f"log(): {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''} "
                                "had gradients but no monitored optimizer stepped them in this window")
        if self._gradients.recorded and self._activations.names and not self._activations.elements.any():
            self._warn_once("no-activations", "log(): no activation output was recorded in this window although "
                            "steps were; under torch.compile the activation taps stay off (a hook there would "
                            "recompile every step); gradients and weights are still recorded. Pass "
                            "activations=False to silence this")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def _monitored_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        raise MonitorError(f"{type(model).__name__} has no floating-point parameters to monitor")
    for name, p in named:
        _check_materialised(name, p)
    return named


def _check_materialised(name: str, p: torch.Tensor) -> None:
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise MonitorError(f"{name} is not initialised yet (a lazy module); run one forward pass before attaching")
    if p.is_meta:
        raise MonitorError(f"{name} is on the meta device; attach after model.to_empty(device=...) and "
                           "initialisation (or load_state_dict(..., assign=True))")


def _check_device(named: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
    if named and named[0][1].device != device:
        name, p = named[0]
        raise MonitorError(f"{name} moved from {device} to {p.device} after the monitor attached; "
                           "attach the monitor after model.to(device), or remove() it and attach a new one")


def _sinks(writer, members: int) -> list[tuple[int, object, str]]:
    """(member, sink, tag prefix) for each member: one writer per member, or one for all with
    ``member_<k>/`` tags."""
    if writer is None:
        return []
    from gradflow.monitor.sinks import as_sink  # imports TensorBoard's protos only when writing

    if isinstance(writer, (list, tuple)):
        if len(writer) != members:
            raise MonitorError(f"got {len(writer)} writers for members={members}; pass one writer per member or one in all")
        return [(k, as_sink(w), "") for k, w in enumerate(writer)]
    sink = as_sink(writer)
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
