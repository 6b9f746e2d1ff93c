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

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradflow import stats as S
from gradflow.stats import Histogram

# A parameter at least this large gets its own reductions; smaller ones are concatenated and
# reduced together, because on a small model each extra op costs more than its arithmetic.
LARGE_PARAMETER = 1 << 16
# Small gradients and activations wait, copied or referenced, until this many elements are
# pending (or the window closes), then are reduced together: a few ops per window, not per step.
PENDING_ELEMENTS = 1 << 20
GRADIENT_FIELDS = ("mean", "mean_abs", "norm", "max_abs")
SATURATION_LEVEL = 0.97            # |a| > 0.97 for tanh (Glorot & Bengio 2010), scaled per bounds

# Activation modules the monitor taps, and how to read them: a bounded activation is read
# for saturation; a rectifier is read for dead units (output <= 0 on every input).
SATURATING = {nn.Tanh: (-1.0, 1.0), nn.Sigmoid: (0.0, 1.0), nn.Hardtanh: None, nn.Softsign: (-1.0, 1.0),
              nn.Hardsigmoid: (0.0, 1.0)}
RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU)
OTHER_ACTIVATIONS = (nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish)

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GradientMonitor]" = weakref.WeakKeyDictionary()


class MonitorError(RuntimeError):
    """Raised when a monitor cannot attach."""


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


def _segment_layout(lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two forms of a concatenation of segments of these lengths that the segment
    reductions take: each segment's length, and each element's segment."""
    lengths_t = torch.tensor(lengths, device=device, dtype=torch.long)
    return lengths_t, torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)


@dataclass
class _GradientPlan:
    """Which parameters have a gradient in a step, split into small and large ones."""

    small: list[int]             # parameters copied into one flat tensor, reduced later in batches
    large: list[int]             # parameters reduced at once, at each step
    small_numel: int
    large_slots: torch.Tensor    # the slots of the large parameters' members, in order


@dataclass
class _Batch:
    """How a run of pending small-gradient copies is reduced in one go."""

    lengths: torch.Tensor        # each row (one row per step and parameter): its length
    segment: torch.Tensor        # each element: its row
    row_param: torch.Tensor      # each row: its parameter
    bin_offset: torch.Tensor     # each element: its parameter's offset into the counts (int32)


class _GradientAccumulator:
    """Sums each step's per-parameter gradient statistics and histograms on the device.

    ``totals`` rows are per parameter: sum of g, sum of |g|, L2 norm and max |g|, each summed
    over steps; ``counts`` are the sign/exponent histograms summed over steps. Small parameters
    are copied at each step into one flat tensor and reduced many steps at a time (on a small
    model each op costs more than its arithmetic); large ones are reduced at once.

    With ``members`` K > 1 (K models trained as one, stacked on a leading dimension) each
    parameter has K slots, one per member: slot ``i * K + k`` is member k of parameter i. A
    flattened gradient lays the members out one after another, so the slots are segments.
    """

    def __init__(self, params: list[torch.Tensor], members: int = 1) -> None:
        self.params = params
        self.members = members
        device = params[0].device
        self.numel = [p.numel() for p in params]
        self.slot_numel = [p.numel() // members for p in params for _ in range(members)]
        slots = len(self.slot_numel)
        self.totals = torch.zeros(slots, len(GRADIENT_FIELDS), device=device)
        self.counts = torch.zeros(slots * S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=device)
        self._scratch = S.Scratch()                  # for the large tensors
        self.steps_by_pattern: dict[tuple[bool, ...], int] = {}
        self.pending: list[tuple[_GradientPlan, torch.Tensor]] = []
        self.pending_elements = 0
        self._plans: dict[tuple[bool, ...], _GradientPlan] = {}
        self._batches = _BoundedCache()

    def reset(self) -> None:
        self.pending.clear()
        self.pending_elements = 0
        torch._foreach_zero_([self.totals, self.counts])
        self.steps_by_pattern.clear()

    def steps(self) -> np.ndarray:
        """How many recorded steps each slot's parameter had a gradient in."""
        steps = np.zeros(len(self.params))
        for pattern, count in self.steps_by_pattern.items():
            steps[list(pattern)] += count
        return np.repeat(steps, self.members)

    def record(self) -> None:
        """Add the current ``.grad`` of every parameter that has one. No host sync.

        The hot path of the monitor: one list, one tuple and one ``cat`` per step on a small
        model (no ``no_grad`` context: gradients do not require grad unless the caller asked
        for a double backward, and then the copy is detached).
        """
        grads = [p.grad for p in self.params]
        pattern = tuple(g is not None for g in grads)
        if not any(pattern):
            return
        plan = self._plans.get(pattern) or self._make_plan(pattern)
        if plan.small:
            copy = _flat_copy([grads[i] for i in plan.small])
            self.pending.append((plan, copy.detach() if copy.requires_grad else copy))
            self.pending_elements += plan.small_numel
            if self.pending_elements >= PENDING_ELEMENTS:
                self.reduce()
        if plan.large:
            with torch.no_grad():
                self._reduce_large(plan, grads)
        self.steps_by_pattern[pattern] = self.steps_by_pattern.get(pattern, 0) + 1

    def _make_plan(self, pattern: tuple[bool, ...]) -> _GradientPlan:
        present = [i for i, has in enumerate(pattern) if has]
        small = [i for i in present if self.numel[i] < LARGE_PARAMETER]
        large = [i for i in present if self.numel[i] >= LARGE_PARAMETER]
        slots = [i * self.members + member for i in large for member in range(self.members)]
        plan = self._plans[pattern] = _GradientPlan(small, large, sum(self.numel[i] for i in small),
                                                    torch.tensor(slots, dtype=torch.long, device=self.totals.device))
        return plan

    @torch.no_grad()
    def reduce(self) -> None:
        """Fold the pending small-gradient copies into the totals. No host sync."""
        if not self.pending:
            return
        pending, self.pending, self.pending_elements = self.pending, [], 0
        key = tuple(id(plan) for plan, _ in pending)
        batch = self._batches.get(key) or self._batches.put(key, self._make_batch([p for p, _ in pending]))
        flat = torch.cat([copy for _, copy in pending]) if len(pending) > 1 else pending[0][1]
        _check_layout(flat, batch.segment)
        kernels = S.fused_kernels(flat.device)
        if kernels is not None:                       # one fused pass instead of a dozen ops
            rows = kernels.fold_rows(flat.numpy(), batch.lengths.numpy(), batch.row_param.numpy(),
                                     self.counts.view(-1, S.SIGN_EXPONENT_BINS).numpy())
            rows[:, 2] = np.sqrt(rows[:, 2])
            self.totals.index_add_(0, batch.row_param, torch.from_numpy(rows[:, :4]).to(self.totals.dtype))
            return
        magnitude = flat.abs()
        sums = S.segment_sums([flat, magnitude, flat * flat], batch.lengths, batch.segment)
        largest = S.segment_max(magnitude, batch.lengths, batch.segment)
        per_step = torch.stack([sums[0], sums[1], sums[2].sqrt(), largest], dim=1)
        self.totals.index_add_(0, batch.row_param, per_step)
        S.count_into(self.counts, S.sign_exponent_bins(flat).add_(batch.bin_offset))

    def _make_batch(self, plans: list[_GradientPlan]) -> _Batch:
        device = self.totals.device
        k = self.members
        row_param = [i * k + member for plan in plans for i in plan.small for member in range(k)]
        lengths, segment = _segment_layout([self.slot_numel[slot] for slot in row_param], device)
        params = torch.tensor(row_param, device=device, dtype=torch.long)
        return _Batch(lengths, segment, params, (params[segment] * S.SIGN_EXPONENT_BINS).int())

    def _reduce_large(self, plan: _GradientPlan, grads: list[torch.Tensor]) -> None:
        """Reduce the large gradients of a step at once, one job per member of each."""
        counts = self.counts.view(-1, S.SIGN_EXPONENT_BINS)
        jobs = [(flat, counts[slot], None) for i in plan.large
                for slot, flat in enumerate(_flat(grads[i]).view(self.members, -1), start=i * self.members)]
        folded = self._scratch.fold(jobs)
        folded[:, 2].sqrt_()                          # the sum of squares becomes the L2 norm
        self.totals.index_add_(0, plan.large_slots, folded[:, :4].to(self.totals.dtype))


def _check_layout(flat: torch.Tensor, segment: torch.Tensor) -> None:
    """The segment reductions trust their layout (no check that syncs with the device): make
    sure the values are the ones the layout was made for. A shape test, no host sync."""
    if flat.numel() != segment.numel():
        raise MonitorError(f"a monitored tensor changed size ({flat.numel()} elements pending, "
                           f"{segment.numel()} expected); create a new GradientMonitor after resizing parameters")


class _BoundedCache(dict):
    """Plans keyed by the shapes of a window; shapes that vary (say, sequence lengths) must
    not grow it without bound."""

    LIMIT = 16

    def put(self, key, value):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = value
        return value


def _flat_copy(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat float32 copy of dense tensors: a single C++ call (a third of the cost of a
    reshape per tensor and a cat, on the tutorial's twelve gradients); sparse ones go the slow way."""
    try:
        flat = torch._utils._flatten_dense_tensors(tensors)
    except RuntimeError:
        return torch.cat([_flat(t) for t in tensors])
    return flat if flat.dtype == torch.float32 else flat.float()


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D float32 view (or copy) of a gradient or activation, dense."""
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    return tensor.reshape(-1) if tensor.dtype == torch.float32 else tensor.reshape(-1).float()


class _WeightTracker:
    """L1 and L2 norm of each parameter and how far it moved over the window, in one pass."""

    def __init__(self, params: list[torch.Tensor], members: int = 1) -> None:
        self.params = params
        self.slots = len(params) * members
        self.sizes = [p.numel() // members for p in params for _ in range(members)]
        self.lengths, self.segment = _segment_layout(self.sizes, params[0].device)
        self.bin_offset = (self.segment * S.SIGN_EXPONENT_BINS).int()
        self.start = self._flatten()
        self._end: torch.Tensor | None = None    # the weights summary() saw: the next window's start

    @torch.no_grad()
    def _flatten(self) -> torch.Tensor:
        return torch.cat([_flat(p.detach()) for p in self.params])

    def snapshot(self) -> None:
        self.start = self._end if self._end is not None else self._flatten()
        self._end = None

    @torch.no_grad()
    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, 4) rows of L1 norm, L2 norm, distance moved and L2 norm at the start; and
        (slots, 512) histogram counts. The slots are contiguous segments of the flat weights,
        so each norm is one segment sum (a batched model has hundreds of slots)."""
        flat = self._end = self._flatten()
        kernels = S.fused_kernels(flat.device)
        if kernels is not None:
            rows, counts = kernels.fold_weights(flat.numpy(), self.start.numpy(), self.lengths.numpy())
            rows[:, 1:] = np.sqrt(rows[:, 1:])
            return torch.from_numpy(rows), torch.from_numpy(counts)
        moved = flat - self.start
        sums = S.segment_sums([flat.abs(), flat * flat, moved * moved, self.start * self.start],
                              self.lengths, self.segment)
        rows = torch.cat([sums[:1], sums[1:].sqrt()]).T
        counts = torch.zeros(self.slots * S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=flat.device)
        S.count_into(counts, S.sign_exponent_bins(flat).add_(self.bin_offset))
        return rows, counts.view(self.slots, S.SIGN_EXPONENT_BINS)


@dataclass
class _ActivationPlan:
    """How a run of pending outputs is reduced, for one sequence of (tap, shape).

    The outputs are concatenated flat; each output's members are contiguous rows of it.
    """

    lengths: torch.Tensor        # each row (one output, one member): its length
    segment: torch.Tensor        # each element: its row
    row_slot: torch.Tensor       # each row: its tap slot
    slot_elements: np.ndarray    # per slot: elements this run adds
    centre: torch.Tensor | None  # each element: the centre of its tap's range; None if no tap is bounded
    threshold: torch.Tensor | None  # each element: |a - centre| above this is saturated (inf if unbounded)
    unit: torch.Tensor           # each element: its unit's slot in ``positives`` (slot 0: none)
    bin_offset: torch.Tensor     # each element: its slot's offset into the counts (int32)
    bands: tuple[np.ndarray, np.ndarray]  # each row: centre and threshold (float32), for the fused kernels


class _ActivationAccumulator:
    """Forward hooks on activation modules: moments, saturation, dead units and histograms.

    A hook only keeps a reference to its output (autograd keeps most of them alive anyway);
    the optimizer step reduces every pending output of every tap at once, because on a small
    model a dozen small ops per hook would cost more than the training step itself.

    With ``members`` K > 1 an output's leading dimension is the member: slot ``i * K + k`` is
    member k of tap i, and units are counted per member.
    """

    def __init__(self, taps: list[tuple[str, nn.Module]], device, members: int = 1) -> None:
        self.names = [name for name, _ in taps]
        self.members = members
        self.bounds = [_bounds(module) for _, module in taps]
        self.rectifier = [isinstance(module, RECTIFIERS) for _, module in taps]
        count = len(taps)
        slots = count * members
        self.moments = torch.zeros(slots, 3, device=device)   # sum, sum of squares, saturated
        self.counts = torch.zeros(slots * S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=device)
        self._scratch = S.Scratch()                  # for the large tensors
        self.elements = np.zeros(slots, dtype=np.int64)
        self.units: list[int | None] = [None] * count          # unit count, fixed at first sight
        self.unit_start: list[int] = [0] * count
        self.positives = torch.zeros(1, device=device)         # per unit: count of outputs > 0; slot 0: none
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.pending_elements = 0
        self._plans = _BoundedCache()
        self._slot_rows = _BoundedCache()            # slots of the large outputs reduced together

    def hook(self, index: int):
        def on_forward(module, inputs, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                self.pending.append((index, output.detach()))
                self.pending_elements += output.numel()
                if self.pending_elements >= PENDING_ELEMENTS:
                    self.reduce()
            return None
        return on_forward

    def reset(self) -> None:
        self.pending.clear()
        self.pending_elements = 0
        torch._foreach_zero_([self.moments, self.counts, self.positives])
        self.elements[:] = 0

    @torch.no_grad()
    def reduce(self) -> None:
        """Fold every pending output into the window's sums. No host sync."""
        if not self.pending:
            return
        pending, self.pending, self.pending_elements = self.pending, [], 0
        small = [(index, a) for index, a in pending if a.numel() < LARGE_PARAMETER]
        if len(small) < len(pending):
            self._reduce_large([(index, a) for index, a in pending if a.numel() >= LARGE_PARAMETER])
        if not small:
            return
        key = tuple((index, a.shape) for index, a in small)
        plan = self._plans.get(key) or self._plans.put(key, self._make_plan(small))
        flat = _flat_copy([a for _, a in small])
        _check_layout(flat, plan.segment)
        self.elements += plan.slot_elements
        kernels = S.fused_kernels(flat.device)
        if kernels is not None:                       # one fused pass instead of a dozen ops
            values = flat.numpy()
            rows = kernels.fold_rows(values, plan.lengths.numpy(), plan.row_slot.numpy(),
                                     self.counts.view(-1, S.SIGN_EXPONENT_BINS).numpy(), plan.bands)
            self.moments.index_add_(0, plan.row_slot, torch.from_numpy(rows[:, 0::2]).to(self.moments.dtype))
            kernels.count_units(values, plan.unit.numpy(), self.positives.numpy())
            return
        values = [flat, flat * flat]
        if plan.centre is not None:
            values.append(((flat - plan.centre).abs_() > plan.threshold).float())
        sums = S.segment_sums(values, plan.lengths, plan.segment)
        self.moments[:, :len(values)].index_add_(0, plan.row_slot, sums.T)
        S.count_into(self.counts, S.sign_exponent_bins(flat).add_(plan.bin_offset))
        S.count_into(self.positives, plan.unit * (flat > 0))      # non-positives go to slot 0

    def _make_plan(self, pending) -> _ActivationPlan:
        device = self.moments.device
        k = self.members
        lengths, row_slot, centres, thresholds, units, bands = [], [], [], [], [], []
        slot_elements = np.zeros_like(self.elements)
        for index, a in pending:
            n = a.numel()
            bounds = self.bounds[index]
            centre, half = ((bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2) if bounds else (0.0, math.inf)
            bands += [(centre, SATURATION_LEVEL * half)] * k
            lengths += [n // k] * k
            row_slot += range(index * k, index * k + k)
            slot_elements[index * k:index * k + k] += n // k
            centres.append(torch.full((n,), centre, device=device))
            thresholds.append(torch.full((n,), SATURATION_LEVEL * half, device=device))
            units.append(self._unit_slots(index, a))
        lengths_t, segment = _segment_layout(lengths, device)
        slots = torch.tensor(row_slot, device=device)
        bounded = any(self.bounds[index] is not None for index, _ in pending)
        return _ActivationPlan(lengths_t, segment, slots, slot_elements,
                               torch.cat(centres) if bounded else None, torch.cat(thresholds) if bounded else None,
                               torch.cat(units), (slots[segment] * S.SIGN_EXPONENT_BINS).int(),
                               tuple(np.array(column, dtype=np.float32) for column in zip(*bands)))

    def _units_of(self, index: int, sample: torch.Tensor) -> int | None:
        """The unit count of a rectifier tap (fixed at first sight), or None if this output
        has no units to count (not a rectifier, a scalar, or another unit count)."""
        if not self.rectifier[index] or sample.dim() == 0:
            return None
        dim = _unit_dim(sample)
        if self.units[index] is None:
            self.units[index] = sample.shape[dim]
            self.unit_start[index] = self.positives.numel()
            self.positives = torch.cat([self.positives, self.positives.new_zeros(self.members * sample.shape[dim])])
        return self.units[index] if sample.shape[dim] == self.units[index] else None

    def _reduce_large(self, large: list[tuple[int, torch.Tensor]]) -> None:
        """Large outputs reduced on their own, one job per member of each: dense reductions
        beat segment sums here."""
        k = self.members
        counts = self.counts.view(-1, S.SIGN_EXPONENT_BINS)
        jobs, slots = [], []
        for index, a in large:
            bounds = self.bounds[index]
            band = ((bounds[0] + bounds[1]) / 2, SATURATION_LEVEL * (bounds[1] - bounds[0]) / 2) if bounds else None
            for member, flat in enumerate(_flat(a).view(k, -1)):
                slot = index * k + member
                jobs.append((flat, counts[slot], band))
                slots.append(slot)
                self.elements[slot] += flat.numel()
                self._count_positive(index, member, a[member] if k > 1 else a)
        folded = self._scratch.fold(jobs)
        key = tuple(slots)
        rows = self._slot_rows.get(key)
        if rows is None:                              # made once: a fresh device tensor per step would sync
            rows = self._slot_rows.put(key, torch.tensor(slots, device=self.moments.device))
        self.moments.index_add_(0, rows, folded[:, 0::2].to(self.moments.dtype))   # sum, squares, beyond the band

    def _count_positive(self, index: int, member: int, sample: torch.Tensor) -> None:
        units = self._units_of(index, sample)
        if units is not None:
            first = self.unit_start[index] + member * units
            self._scratch.count_positive(sample, _unit_dim(sample), self.positives[first:first + units])

    def _unit_slots(self, index: int, a: torch.Tensor) -> torch.Tensor:
        """Each element's unit slot in ``positives``; slot 0 collects what has no unit."""
        device = self.moments.device
        sample = a[0] if self.members > 1 and a.dim() >= 1 else a       # one member's output
        units = self._units_of(index, sample)
        if units is None:
            return torch.zeros(a.numel(), dtype=torch.long, device=device)
        dim = _unit_dim(sample)
        position = torch.arange(a.numel(), device=device)
        member, within = position // sample.numel(), position % sample.numel()
        inner = math.prod(sample.shape[dim + 1:])
        return self.unit_start[index] + member * units + within // inner % units

    def read(self, slot: int, moments: np.ndarray, positives: np.ndarray) -> dict[str, float] | None:
        """Statistics of one tap (one member of it) for the window, or None if it never fired."""
        index, member = divmod(slot, self.members)
        n = self.elements[slot]
        if n == 0:
            return None
        total, squares, saturated = moments
        mean = total / n
        row = {"mean": float(mean), "std": float(np.sqrt(max(squares / n - mean * mean, 0.0)))}
        if self.bounds[index] is not None:
            row["saturated_fraction"] = float(saturated / n)
        if self.rectifier[index] and self.units[index]:
            start = self.unit_start[index] + member * self.units[index]
            alive = positives[start:start + self.units[index]] > 0
            row["dead_fraction"] = float(1.0 - alive.mean())
        return row


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    for kind, bounds in SATURATING.items():
        if isinstance(module, kind):
            return bounds if bounds is not None else (float(module.min_val), float(module.max_val))
    return None


def _unit_dim(a: torch.Tensor) -> int:
    """The feature axis: channels of (N, C, ...) images, the last axis of (N, T, C) sequences."""
    return a.dim() - 1 if a.dim() in (1, 3) else 1


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, tuple(SATURATING) + RECTIFIERS + OTHER_ACTIVATIONS)


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
    from gradflow.sinks import TensorBoardSink  # imports TensorBoard's protos only when writing

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
