"""Per-step gradient statistics, summed on the device over a window."""

from __future__ import annotations

import functools
import itertools
import math
import operator
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from gradflow.monitor import columns as C
from gradflow.monitor import stats as S
from gradflow.monitor.part import Part, Reduced, Setup, _graph_task_id, _sequence_nr, _thread, moved
from gradflow.monitor.sharding import local, local_numel
from gradflow.monitor.steps import ALL
from gradflow.monitor.tensors import (
    LARGE_PARAMETER,
    PENDING_ELEMENTS,
    _BoundedCache,
    _check_layout,
    _flat,
    _flat_copy,
)
from gradflow.monitor.window import host_view, tag_path

GRADIENT_FIELDS = C.GRADIENT_MOMENTS
# Small gradients that fill the pending budget in one step are reduced at that step. Where they
# average this many elements, each is reduced straight from .grad (one fused-kernel call each,
# about 10 us, no more than its arithmetic); smaller ones are copied flat and reduced in one call
# (nanoGPT's 4 x 128 layers: per-gradient calls cost 0.5 ms a step more than the copy).
UNCOPIED_AVERAGE = 1 << 13
# A step that reduces large gradients anyway takes up to JOINED_SMALL small ones into the same
# fused call, straight from .grad, where the large ones have JOINED_ELEMENTS elements per small
# one: there a copy kept between steps is memory that saves next to no time (a rank-16 LoRA's
# head: 16 KB a step, 1.6% of the adapters' 3 MB over a 3-step window). A joined gradient costs
# the step about 9 us more than its copy (a job of Scratch.fold: views, one kernel dispatch; 4 small
# beside two 65,536-element gradients: record() 138 -> 173 us, minimum of 11 runs of 400 steps);
# 2^18 values take about 170 us to fold (0.64 ns each, kernels.py): a joined step's fold is at
# most ~5% slower.
JOINED_SMALL = 4
JOINED_ELEMENTS = 1 << 18
# By default (GradientMonitor's histogram_every) a parameter's gradient is histogrammed at every
# HISTOGRAM_EVERY-th step of the window in which it has one, its first one included (so every
# parameter with a gradient in a window has a histogram, an expert of a mixture that is routed
# to now and then as well as the router); the other steps are folded without one. The
# histogram's counting loop is about half of a fold (one increment a value, bound by its stores:
# kernels.py), the one cost of a large model's step that grew with its size: resnet18 1.06x ->
# 1.03x, the wide MLP 1.07x -> 1.04x with none at all (benchmarks/overhead.py --clock cpu
# --malloc fixed). Keras and wandb.watch histogram one step in many too. Exact zeros and
# non-finite values are counted at every step (``tallies``), so zero_fraction and nonfinite
# stay exact.
HISTOGRAM_EVERY = 10
# bfloat16 and float16 gradients on the CPU are converted to float32 this many values at a time
# (256 KB, in L2) and folded by the fused kernels; float64 ones keep their range on torch ops.
CONVERTED_PIECE = 1 << 16
_FOLDED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

@dataclass
class _GradientPlan:
    """Which parameters have a gradient in a step, split into small and large ones."""

    small: list[int]             # parameters copied into one flat tensor, reduced later in batches
    large: list[int]             # parameters reduced at once, at each step (also every float64 one)
    small_numel: int
    large_slots: torch.Tensor    # the slots of the large parameters' members, in order
    large_slot_array: np.ndarray  # the same, as numpy (the fused kernels' path)
    present: np.ndarray          # the parameters with a gradient (int64 indices)


@dataclass
class _Batch:
    """How a run of pending small-gradient copies is reduced in one go."""

    lengths: torch.Tensor        # each row (one row per step and parameter): its length
    row_param: torch.Tensor      # each row: its parameter's slot
    row_step: torch.Tensor       # each row: its step's index in the run, times members, plus its member
    row_counted: np.ndarray      # each row: whether its histogram is counted (histogram_every), bool
    elements: int                # the run's length
    # The fused kernels' arguments (CPU): lengths, row_param, row_step as numpy, and row_counted.
    arrays: tuple = ()
    # Per element, made only on the torch-ops path (the fused kernels take the rows' lengths):
    segment: torch.Tensor | None = None       # each element: its row
    bin_offset: torch.Tensor | None = None    # each element: its parameter's offset into the counts (int32)

    def per_element(self, slots: int) -> None:
        """The per-element tensors; an uncounted row's elements are binned past the ``slots``
        parameters' counts (into bins that are dropped)."""
        if self.segment is None:
            self.segment = torch.repeat_interleave(torch.arange(len(self.lengths), device=self.lengths.device),
                                                   self.lengths)
            counted = torch.from_numpy(self.row_counted).to(self.row_param.device)
            row_offset = torch.where(counted, self.row_param, slots) * S.SIGN_EXPONENT_BINS
            self.bin_offset = row_offset[self.segment].int()


class Gradients(Part):
    """Sums each step's per-parameter gradient statistics and histograms on the device.

    ``totals`` rows are per parameter: sum of g, sum of |g|, L2 norm and max |g|, each summed
    over steps (in float64); ``tallies`` its exact zeros and non-finite values over every step;
    ``counts`` the sign/exponent histograms summed over the steps that are histogrammed (each
    parameter's every ``histogram_every``-th step with a gradient in the window, its first
    included: ``_histogrammed``);
    ``step_squares`` is each step's sum of g² over the parameters it recorded (its total norm,
    squared, as ``clip_grad_norm_`` computes it; optimizers stepping parts of one backward's
    gradients add to one step's row: ``_row_of``). Small parameters are copied at each step into
    one flat tensor and reduced many steps at a time (on a small model each op costs more than
    its arithmetic); large ones, and float64 ones (which keep their range), are reduced at once.

    A step records a subset of the parameters (``mask``): those of the optimizer that steps.
    Steps that an AMP ``GradScaler`` skipped are kept apart: ``skipped`` counts them per
    parameter and ``skipped_nonfinite`` their non-finite values.

    With ``members`` K > 1 (K models trained as one, stacked on a leading dimension) each
    parameter has K slots, one per member: slot ``i * K + k`` is member k of parameter i. A
    flattened gradient lays the members out one after another, so the slots are segments.
    """

    name = "gradients"

    def __init__(self, model, setup: Setup) -> None:
        super().__init__(model, setup)
        params, members = setup.params, setup.members
        self.members = members
        self.histogram_every = setup.options.get("histogram_every", HISTOGRAM_EVERY)
        self.sharding = setup.sharding               # a sharding.ShardLayout when parameters are DTensors
        device = local(params[0]).device
        self.bind(params)
        slots = len(self.slot_numel)
        dtype = S.wide_dtype(device)
        self.totals = torch.zeros(slots, len(GRADIENT_FIELDS), device=device, dtype=dtype)
        self.counts = torch.zeros(slots * S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=device)
        self.tallies = torch.zeros(slots, 2, dtype=torch.int64, device=device)   # exact zeros, non-finite
        self.step_squares = torch.zeros(64, members, device=device, dtype=dtype)
        # float64 gradients' squared norms scaled down and up (stats.wide_squares): their range past the plain sum's
        self.step_wide = torch.zeros(64, 2, members, device=device, dtype=dtype)
        self.skipped_nonfinite = torch.zeros(len(params), device=device, dtype=dtype)
        self.skipped = np.zeros(len(params), dtype=np.int64)
        self.recorded = 0                            # the window's steps (rows of step_squares)
        self.held: set = set()                       # the masks of the optimizers that stepped
        self.skipped_steps = 0                       # skip() calls in this window
        self.removed = False                         # remove() was called: nothing is recorded any more
        self._scratch = S.Scratch()                  # for the large tensors
        self.steps_by_pattern: dict[tuple[bool, ...], int] = {}
        # Each parameter's steps with a gradient in the window, once steps of several patterns were
        # recorded (None while every step had one pattern: its count is every parameter's).
        self._param_steps: np.ndarray | None = None
        # plan, copy, step, counted (a bool for all the plan's small parameters, or a tuple, one each)
        self.pending: list[tuple[_GradientPlan, torch.Tensor, int, bool | tuple[bool, ...]]] = []
        self.pending_elements = 0
        self._plans: dict[tuple[bool, ...], _GradientPlan] = {}
        self._batches = _BoundedCache()
        self._last: tuple | None = None              # the last recorded step's first and last gradient
        # The last row's (autograd's graph task, thread, sequence number) at its last record, and the
        # parameters recorded in it (_row_of); whether a row holds several records this window.
        self._row: tuple | None = None
        self._joined = False
        self._idle_said: list[str] = []              # the idle parameters the last text named
        # (id, _version) of each gradient as the last window with a step left it: left over, not missed
        self._logged: frozenset[tuple[int, int]] = frozenset()
        self._slot_tags: tuple[list[tuple[str, ...]], list[str], list[str]] | None = None
        self._row_divisors: np.ndarray | None = None
        self._reduced: tuple | None = None             # device_tensors (and _host_sums)

    def bind(self, params: list[torch.Tensor]) -> None:
        """Follow these tensors from now on (the same shapes and dtypes, or a first binding)."""
        self.params = params
        self._plans = {}                              # plans depend on the dtypes (float64 goes large)
        self._batches = _BoundedCache()
        self.numel = [local_numel(p) for p in params]             # this rank's shard of a DTensor
        self.float64 = [p.dtype == torch.float64 for p in params]
        self.slot_numel = [n // self.members for n in self.numel for _ in range(self.members)]
        self.full_numel = [p.numel() // self.members for p in params for _ in range(self.members)]
        self._row_divisors = None

    @property
    def device(self) -> torch.device:
        return self.totals.device

    def move(self, device: torch.device) -> None:
        """Fold the pending copies (the old device's), then carry the sums to ``device``."""
        self.reduce()
        self.totals, self.step_squares, self.step_wide, self.skipped_nonfinite = (
            moved(t, device, wide=True) for t in (self.totals, self.step_squares, self.step_wide,
                                                  self.skipped_nonfinite))
        self.counts, self.tallies = moved(self.counts, device), moved(self.tallies, device)
        self._plans, self._batches, self._scratch = {}, _BoundedCache(), S.Scratch()   # their tensors: the old device's
        self._reduced = None                          # views of the sums left behind

    def reset(self) -> None:
        self.pending.clear()
        self.pending_elements = 0
        if self.totals.is_cpu:                       # the fused kernels' views (made at most once per tensor)
            for view in self._host_sums():
                view.fill(0)
            self.step_wide.zero_()
        else:
            torch._foreach_zero_([self.totals, self.counts, self.tallies, self.step_squares, self.step_wide])
        if self.skipped_steps:                       # only skip() adds to these
            self.skipped_nonfinite.zero_()
            self.skipped[:] = 0
        self.recorded = 0
        self._row, self._joined = None, False
        self.skipped_steps = 0
        self.held.clear()
        self.steps_by_pattern.clear()
        self._param_steps = None
        self._last = None            # its weak references would stop a swap_tensors conversion (model.to)

    def remove(self) -> None:
        self._last = None
        self.removed = True          # log() after remove() says why its window is empty

    def step_done(self) -> None:
        """The step is over: no wrapper's inner step can repeat it, and the weak references
        ``_seen`` keeps would stop a ``swap_tensors`` conversion (``model.to`` under
        ``set_swap_module_params_on_conversion``) until the next window."""
        self._last = None

    def steps(self) -> np.ndarray:
        """How many recorded steps each slot's parameter had a gradient in."""
        if len(self.steps_by_pattern) == 1:           # one pattern (the common case): no loop
            ((pattern, count),) = self.steps_by_pattern.items()
            return np.repeat(np.array(pattern, dtype=np.float64) * count, self.members)
        steps = np.zeros(len(self.params))
        for pattern, count in self.steps_by_pattern.items():
            steps[list(pattern)] += count
        return np.repeat(steps, self.members)

    def record(self, mask: tuple[bool, ...] | None = None) -> bool:
        """Add the current ``.grad`` of every parameter that has one (of those in ``mask``, if
        given) as one step. No host sync. False if no parameter had a gradient.

        The hot path of the monitor: one list, one tuple and one ``cat`` per step on a small
        model (no ``no_grad`` context: gradients do not require grad unless the caller asked
        for a double backward, and then the copy is detached).
        """
        if mask is None or mask is ALL:
            grads = [p.grad for p in self.params]
        else:
            grads = [p.grad if wanted else None for p, wanted in zip(self.params, mask)]
        pattern = tuple([g is not None for g in grads])     # a list: no generator to resume per gradient
        if mask is not None:
            self.held.add(mask)
        first, last = grads[0], grads[-1]
        if first is None or last is None:
            if True not in pattern:
                return False
            first, last = grads[pattern.index(True)], grads[len(pattern) - 1 - pattern[::-1].index(True)]
        if self._last is None:                       # the step's first record (the common case)
            self._last = (weakref.ref(first), weakref.ref(last), (first._version, last._version), pattern)
        elif self._seen(first, last, pattern):
            return False
        step = self._row_of(pattern, grads)
        if self.sharding is not None:                # local shards, Partial sums resolved, unscaled (sharding.py)
            grads = self.sharding.local_grads(self.params, grads, step, self.setup.unscale)
        elif self.setup.unscale is not None:
            grads = [None if g is None else g * self.setup.unscale for g in grads]
        if step >= self.step_squares.size(0):        # grow on the device: no host sync
            self.step_squares = torch.cat([self.step_squares, torch.zeros_like(self.step_squares)])
            self.step_wide = torch.cat([self.step_wide, torch.zeros_like(self.step_wide)])
        plan = self._plans.get(pattern) or self._make_plan(pattern)
        by_pattern = self.steps_by_pattern
        seen = by_pattern.get(pattern, 0)
        if self._param_steps is None and len(by_pattern) == (1 if seen else 0):
            counted = seen % self.histogram_every == 0   # every step so far had this pattern: _histogrammed's first case
        else:
            counted = self._histogrammed(plan, pattern, seen)
        small = plan.small
        if small:
            copy = _flat_copy(grads if len(small) == len(grads) else [grads[i] for i in small], keep_float64=True)
            if copy.dtype is torch.float64:          # a float64 gradient of a parameter of another dtype
                plan, copy = self._widened(plan, pattern, grads, copy)
                small = plan.small
        if small:
            if copy.requires_grad:
                copy = copy.detach()
            self.pending.append((plan, copy, step, counted if counted.__class__ is bool
                                 else tuple(counted[small].tolist())))
            self.pending_elements += plan.small_numel
            if self.pending_elements >= PENDING_ELEMENTS:
                self.reduce()
        if plan.large:
            with torch.no_grad():
                self._reduce_large(plan, grads, step, counted)
        by_pattern[pattern] = seen + 1
        if step == self.recorded:
            self.recorded += 1
        return True

    def _row_of(self, pattern: tuple[bool, ...], grads: list) -> int:
        """This record's row of ``step_squares`` (its training step, whose total norm the row
        sums): the last row, where none of these parameters is in it and no autograd work came
        since its last record (the same graph task, thread and sequence number: no forward pass
        between), or both are inside a backward that is still running (steps inside backward,
        also across a checkpoint's recompute, a nested backward of a reentrant one, or the
        worker threads of several devices), or it was recorded inside a backward that has ended
        and no forward pass came since (``_backward_ended``: one optimizer per parameter inside
        it, another stepping the rest after it, clipped or not). So optimizers
        stepping parts of one backward's gradients one after the other (torch.optim.Muon over
        the matrices and AdamW over the rest, a body's and a head's) are one step. Else a new
        row: a GAN's G step comes after a forward pass, a parameter in two optimizers is stepped
        twice. Three C calls a step (about 0.15 us)."""
        key = (_graph_task_id(), _thread(), _sequence_nr())
        row = self._row
        if row is not None:
            mark, inside = row[0], key[0] != -1
            if mark is _ENDED:                       # inside a backward that began before it: it was nested
                # (task ids grow). Not told apart: a sibling nested backward after it (two reentrant
                # checkpoints in a row, the backward's first steps in them): a row of its own.
                joins = key[0] < row[3] if inside else row[4] == key[1:] or _left_by_backward(row[2], grads)
            else:
                joins = mark == key or inside and mark[0] != -1
            if joins and True not in map(operator.and_, row[1], pattern):
                # a running backward's row keeps its own key: its end (_backward_ended) looks for it
                self._row = (mark if inside and mark is not _ENDED else key, tuple(map(operator.or_, row[1], pattern)))
                if inside and mark is _ENDED:
                    self._end_with_backward(key)
                self._joined = True
                return self.recorded - 1
        if key[0] != -1:                             # inside a backward: its row may go on after it
            self._end_with_backward(key)
        self._row = (key, pattern)
        return self.recorded

    def _end_with_backward(self, key: tuple) -> None:
        """Have the running backward (``key``'s graph task) mark this row as ended at its end."""
        torch.autograd.Variable._execution_engine.queue_callback(
            functools.partial(_backward_ended, weakref.ref(self), key))

    def _widened(self, plan: _GradientPlan, pattern: tuple[bool, ...], grads: list,
                 copy: torch.Tensor) -> tuple[_GradientPlan, torch.Tensor | None]:
        """The step's plan and small copy where a small gradient is float64 and its parameter is
        not (``p.grad_dtype = torch.float64``, or None and a float64 tensor assigned): from now on
        it is reduced as a large one, as a float64 parameter's is. A float32 copy read finite
        1e300 gradients as inf and 1e-310 ones as zeros. The pending copies are folded with the
        plans they were made for first. Rare: the common step's copy is float32, no check more."""
        wide = [i for i in plan.small if grads[i].dtype is torch.float64 and self.numel[i]]
        if not wide:                                 # empty ones: nothing to lose
            return plan, copy.float()
        for i in wide:
            self.float64[i] = True
        self.reduce()
        self._plans, self._batches = {}, _BoundedCache()
        plan = self._make_plan(pattern)
        small = plan.small
        return plan, _flat_copy([grads[i] for i in small]) if small else None

    @torch.no_grad()
    def skip(self, mask: tuple[bool, ...] | None = None) -> None:
        """Count a step that was not applied (an AMP overflow): per parameter, the step and its
        non-finite values. Rare, so plain ops: one count per parameter."""
        self.skipped_steps += 1
        for i, p in enumerate(self.params):
            if p.grad is None or (mask is not None and mask is not ALL and not mask[i]):
                continue
            self.skipped[i] += 1
            grad = local(p.grad)
            grad = grad.to_dense() if grad.layout != torch.strided else grad
            self.skipped_nonfinite[i] += (~torch.isfinite(grad)).sum()

    def _seen(self, first: torch.Tensor, last: torch.Tensor, pattern: tuple[bool, ...]) -> bool:
        """Whether these gradients (the first and last of a step: the same tensors, not
        modified since) were recorded already: a wrapper's step and its inner optimizer's
        (ZeroRedundancyOptimizer, Lookahead) are one training step. Also an inner step over
        part of them (``pattern`` within the recorded step's, whose first and last gradients are
        unmodified): ZeroRedundancyOptimizer's inner optimizer on several ranks holds its shard,
        a wrapper may step one inner optimizer per kind of parameter. Kept by weak reference:
        a new tensor may reuse a freed one's id."""
        key = (first._version, last._version)
        held = self._last
        if held is not None:
            was_first, was_last = held[0](), held[1]()
            if was_first is first and was_last is last and held[2] == key:
                return True
            if all(had or not has for had, has in zip(held[3], pattern)):
                if was_first is not None and was_last is not None and held[2] == (was_first._version,
                                                                                   was_last._version):
                    return True
                if self.setup.inner_step:            # changed inside the wrapper's step that recorded them
                    self._said_changed(pattern)
                    return True
        self._last = (weakref.ref(first), weakref.ref(last), key, pattern)
        return False

    def _said_changed(self, pattern: tuple[bool, ...]) -> None:
        """An inner step of a wrapper's step, over part of the parameters the wrapper's step
        recorded, found their gradients changed since (a pre-hook of the inner optimizer rescaled
        them). The training step stays counted once, with the gradients the wrapper's step saw:
        said in a warning. (Where the inner optimizer holds every parameter of the wrapper, its
        step records alone, after its pre-hooks: steps.StepWatch._defers; over part of them, as
        ZeroRedundancyOptimizer's shard on several ranks, the wrapper's step records first.) Also a
        wrapper that steps its inner optimizer twice, with new gradients between (extra-gradient
        methods: an extrapolation step, a closure, the update): the first inner step's are kept."""
        names = [name for name, has in zip(self.setup.names, pattern) if has]
        self.setup.warn("changed-in-step", f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}: their "
                        "gradients changed between two steps inside one wrapper optimizer's step: a step pre-hook "
                        "on an inner optimizer over part of its parameters, or a wrapper that steps its inner "
                        "optimizer twice (extra-gradient). The training step is counted once, with the gradients "
                        "first recorded in it, before that change. Register such a hook on the wrapper to have it "
                        "in what is reported; call monitor.record() by hand (automatic=False) to choose another "
                        "moment")

    def _histogrammed(self, plan: _GradientPlan, pattern: tuple[bool, ...], seen: int) -> bool | np.ndarray:
        """Whether this step's gradients go into the histograms: each parameter's at its 0th,
        ``histogram_every``-th, ... step with a gradient in the window. One bool for all while every
        step of the window had this pattern (``seen`` of them before: the common case, no array
        op); else a bool per parameter (only the present ones' are read), from counts per
        parameter kept from the first step of another pattern on. Per parameter, not per pattern:
        in a mixture of experts each step routes to another few, and counted per pattern the
        router's gradient was histogrammed at 78 steps in 100 (helper brk4's probe)."""
        every = self.histogram_every
        if self._param_steps is None:
            if len(self.steps_by_pattern) == (0 if seen == 0 else 1):       # only this pattern so far
                return seen % every == 0
            self._param_steps = self.steps()[::self.members].astype(np.int64)
        present = plan.present
        before = self._param_steps[present]
        self._param_steps[present] += 1
        flags = np.zeros(len(self.params), dtype=bool)
        flags[present] = before % every == 0
        return flags

    def _make_plan(self, pattern: tuple[bool, ...]) -> _GradientPlan:
        present = [i for i, has in enumerate(pattern) if has]
        # An empty shard (a DTensor's, on some ranks) is small: nothing to fold, and no max of nothing.
        large = [i for i in present if self.numel[i] >= LARGE_PARAMETER or (self.float64[i] and self.numel[i])]
        small = [i for i in present if i not in large]
        small_numel = sum(self.numel[i] for i in small)
        # The step's small gradients fill the pending budget on their own and are not tiny (LoRA
        # adapters), or are a few beside many times their size in large ones: the fused kernels
        # reduce them at once, straight from .grad, like the large ones.
        uncopied = small_numel >= PENDING_ELEMENTS and small_numel >= UNCOPIED_AVERAGE * len(small)
        joined = len(small) <= JOINED_SMALL and sum(self.numel[i] for i in large) >= JOINED_ELEMENTS * len(small)
        if small and (uncopied or joined) and S.fused_kernels(self.device) is not None:
            large, small = [i for i in present if self.numel[i]], [i for i in present if not self.numel[i]]
        slots = [i * self.members + member for i in large for member in range(self.members)]
        plan = self._plans[pattern] = _GradientPlan(small, large, sum(self.numel[i] for i in small),
                                                    torch.tensor(slots, dtype=torch.long, device=self.device),
                                                    np.array(slots, dtype=np.int64), np.array(present, dtype=np.int64))
        return plan

    def fold(self) -> None:
        self.reduce()

    @torch.no_grad()
    def reduce(self) -> None:
        """Fold the pending small-gradient copies into the totals. No host sync."""
        if not self.pending:
            return
        pending, self.pending, self.pending_elements = self.pending, [], 0
        plans, copies, steps, counted = zip(*pending)          # one transpose, not a generator per field
        key = (tuple(map(id, plans)), counted)
        batch = self._batches.get(key) or self._batches.put(key, self._make_batch(list(zip(plans, counted))))
        flat = torch.cat(copies) if len(copies) > 1 else copies[0]
        if flat.numel() != batch.elements:
            _check_layout(flat, torch.empty(batch.elements, device="meta"))
        kernels = S.fused_kernels(flat.device)
        if kernels is not None:                       # one fused call: the pass and the adds to the sums
            kernels.fold_rows_into(flat.numpy(), *batch.arrays, _steps_array(steps, self._joined), self.members,
                                   *self._host_sums())
            return
        slots = len(self.slot_numel)
        batch.per_element(slots)
        wide = flat.to(self.totals.dtype)             # float64 sums: no overflow for finite gradients
        magnitude = wide.abs()
        sums = S.segment_sums([wide, magnitude, wide * wide, (flat == 0).to(wide.dtype),
                               (~torch.isfinite(flat)).to(wide.dtype)], batch.lengths, batch.segment)
        largest = S.segment_max(magnitude, batch.lengths, batch.segment)
        by_step = sums.new_zeros(len(pending) * self.members).index_add_(0, batch.row_step, sums[2])
        self._add_step_squares(steps, by_step)
        per_step = torch.stack([sums[0], sums[1], sums[2].sqrt(), largest], dim=1)
        self.totals.index_add_(0, batch.row_param, per_step)
        self.tallies.index_add_(0, batch.row_param, sums[3:].T.round().to(self.tallies.dtype))
        # Uncounted rows are binned into one more parameter's bins, dropped after (no host sync).
        counts = self.counts.new_zeros((slots + 1) * S.SIGN_EXPONENT_BINS)
        S.count_into(counts, S.sign_exponent_bins(flat).add_(batch.bin_offset))
        self.counts.add_(counts[:slots * S.SIGN_EXPONENT_BINS])

    def _host_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The window's CPU sums as numpy views for the fused kernels: counts (slots, 512), totals,
        tallies, step_squares: the views ``device_tensors`` keeps (made again only where a tensor
        was replaced), not new ones at each window."""
        views = self.device_tensors()
        return (views["counts"].host.reshape(-1, S.SIGN_EXPONENT_BINS), views["totals"].host,
                views["tallies"].host, views["step_squares"].host)

    def _add_step_squares(self, steps: tuple[int, ...], by_step: torch.Tensor) -> None:
        """Add a run's per-step squares, (len(steps) * members,), at those steps."""
        by_step = by_step.view(len(steps), self.members).to(self.step_squares.dtype)
        if steps[-1] - steps[0] + 1 == len(steps) and not self._joined:   # consecutive: a view, no index tensor
            self.step_squares[steps[0]:steps[-1] + 1].add_(by_step)
        else:
            self.step_squares.index_add_(0, torch.tensor(steps, device=self.device), by_step)

    def _make_batch(self, plans: list[tuple[_GradientPlan, bool | tuple[bool, ...]]]) -> _Batch:
        device = self.device
        k = self.members
        row_param = [i * k + member for plan, _ in plans for i in plan.small for member in range(k)]
        row_step = [step * k + member for step, (plan, _) in enumerate(plans) for _ in plan.small for member in range(k)]
        row_counted = np.array([counted if isinstance(counted, bool) else counted[j]
                                for plan, counted in plans for j in range(len(plan.small)) for _ in range(k)],
                               dtype=np.bool_)
        sizes = [self.slot_numel[slot] for slot in row_param]
        batch = _Batch(torch.tensor(sizes, device=device, dtype=torch.long),
                       torch.tensor(row_param, device=device, dtype=torch.long),
                       torch.tensor(row_step, device=device, dtype=torch.long), row_counted, sum(sizes))
        if device.type == "cpu":
            batch.arrays = (batch.lengths.numpy(), batch.row_param.numpy(), batch.row_step.numpy(), row_counted)
        return batch

    def _reduce_large(self, plan: _GradientPlan, grads: list[torch.Tensor], step: int,
                      counted: bool | np.ndarray) -> None:
        """Reduce the large gradients of a step at once, one job per member of each; their
        histograms where ``counted`` (all or none, or per parameter: ``_histogrammed``)."""
        kernels = S.fused_kernels(self.device)
        if kernels is not None and all(grads[i].dtype in _FOLDED_DTYPES and grads[i].layout == torch.strided
                                       for i in plan.large):
            self._fold_large(kernels, plan, grads, step, counted)
            return
        counts = self.counts.view(-1, S.SIGN_EXPONENT_BINS)
        flats = [_values_of(grads[i], self.members) for i in plan.large]
        jobs = [(flat, counts[slot] if _counted(counted, i) else None, None) for i, (values, _) in zip(plan.large, flats)
                for slot, flat in enumerate(values.view(self.members, -1), start=i * self.members)]
        tallies = self.tallies.new_zeros(len(jobs), 2)
        folded = self._scratch.fold(jobs, tallies)
        for row, (i, (_, zeros)) in enumerate(zip(plan.large, flats)):
            if zeros:                                 # a sparse gradient's unstored values: exact +0.0
                tallies[row, 0] += zeros
                if _counted(counted, i):
                    counts[i, S.EXPONENTS] += zeros
        self.tallies.index_add_(0, plan.large_slots, tallies)
        self.step_squares[step].add_(folded[:, 2].view(-1, self.members).sum(0).to(self.step_squares.dtype))
        folded[:, 2].sqrt_()                          # the sum of squares becomes the L2 norm
        for row, (flat, _, _) in enumerate(jobs):
            if flat.dtype == torch.float64:           # keep float64's range (squares overflow past 1e154)
                folded[row, 2] = S.scaled_norm(flat)
                if self.sharding is None:             # and the step's total norm (sharded: its own per-step rows)
                    self.step_wide[step, :, row % self.members] += S.wide_squares(folded[row, 2])
        self.totals.index_add_(0, plan.large_slots, folded[:, :4].to(self.totals.dtype))

    def _fold_large(self, kernels, plan: _GradientPlan, grads: list[torch.Tensor], step: int,
                    counted: bool | np.ndarray) -> None:
        """``_reduce_large`` for float32, bfloat16 and float16 CPU gradients: the fused kernels
        fold each float32 one straight from its numpy view, and the rows are added to the
        window's sums as numpy views of them (the sums are float64 CPU tensors). A torch op per
        gradient and per sum cost nanoGPT's step (8 large gradients) about 0.2 ms more than the
        arithmetic. A half-precision gradient is converted a piece at a time (``_fold_converted``)."""
        k = self.members
        all_counts = self.counts.numpy().reshape(-1, S.SIGN_EXPONENT_BINS)
        jobs, converted = [], {}                     # converted: row -> (its row, its tallies), folded already
        buffer = None                                # half-precision pieces' float32 buffer, freed on return
        for i in plan.large:
            counts = all_counts if _counted(counted, i) else None
            grad = grads[i]
            grad = grad.detach() if grad.requires_grad else grad
            if grad.dtype != torch.float32:
                if buffer is None:
                    # float32 whatever torch's default dtype (the fused kernels take float32)
                    buffer = torch.empty(1, min(CONVERTED_PIECE, max(grads[j].numel() for j in plan.large
                                                                     if grads[j].dtype != torch.float32)),
                                         dtype=torch.float32)
                for m, part in enumerate(grad.reshape(k, -1)):
                    converted[len(jobs)] = _fold_converted(kernels, part, None if counts is None else counts[i * k + m],
                                                           buffer)
                    jobs.append(None)
                continue
            # contiguous(): reshape(-1) keeps a 1-D strided view (every other value, an expanded one) as it is,
            # and the kernels read their values consecutively. A copy only where the gradient is strided.
            values = grad.reshape(-1).contiguous().numpy()
            if k == 1:
                jobs.append((values, None if counts is None else counts[i], 0.0, math.inf))
            else:
                jobs.extend((part, None if counts is None else counts[i * k + m], 0.0, math.inf)
                            for m, part in enumerate(values.reshape(k, -1)))
        if converted:
            folded = [row for row, job in enumerate(jobs) if job is not None]
            rows, tallies = np.zeros((len(jobs), 5)), np.zeros((len(jobs), 2), np.int64)
            if folded:
                rows[folded], tallies[folded] = self._fold_jobs(kernels, [jobs[row] for row in folded])
            for row, (values, tally) in converted.items():
                rows[row], tallies[row] = values, tally
        else:
            rows, tallies = self._fold_jobs(kernels, jobs)
        self.step_squares.numpy()[step] += rows[:, 2].reshape(-1, k).sum(axis=0)
        np.sqrt(rows[:, 2], out=rows[:, 2])                # the sum of squares becomes the L2 norm
        self.totals.numpy()[plan.large_slot_array] += rows[:, :4]
        self.tallies.numpy()[plan.large_slot_array] += tallies

    @staticmethod
    def _fold_jobs(kernels, jobs: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        tallies = np.zeros((len(jobs), 2), np.int64)
        return kernels.fold_all(jobs, tallies), tallies

    # -- the window -----------------------------------------------------------------------

    def device_tensors(self) -> dict[str, Reduced]:
        """The window's sums, each with its host view (``window.host_view``), made again only where
        a tensor was replaced (``move``, a longer ``step_squares``), as ``_host_sums``."""
        tensors = (self.totals, self.counts, self.tallies, self.step_squares, self.step_wide, self.skipped_nonfinite)
        held = self._reduced
        if held is None or not all(map(operator.is_, held[0], tensors)):
            held = self._reduced = (tensors, dict(zip(_SUMS, map(host_view, tensors))))
        return held[1]

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        """Per-parameter rows (``columns.GRADIENT``: the means over each parameter's steps of
        that step's value) and the window's own row (``columns.OVERALL``)."""
        steps, same = self._slot_steps()
        per_param = steps[::self.members]
        if not (self.recorded and all(per_param)):     # every parameter recorded: no gap (the common case)
            for key, message in _gaps(self.setup.names, self.params, per_param, self.recorded, self.skipped_steps,
                                      self.removed, self._logged, self.skipped.tolist()):
                self.setup.warn(key, message)
        if self.sharding is not None and self.sharding.misaligned:    # ranks that logged after other steps
            self.setup.warn("ranks-misaligned", self.sharding.misaligned)
        if self.recorded or self.skipped_steps:
            self._logged = _marks(self.params)
        most = max(steps, default=0)
        for window in reader.windows:
            window.steps = most
            window.kinds = self.setup.kinds
        self._rows(values, reader, steps, same)
        self._overall(values["step_squares"], values["step_wide"], values["tallies"], reader)
        self._idle(reader, per_param)

    def _slot_steps(self) -> tuple[list[int], int | None]:
        """``steps()`` as a list of ints, and the one count of every slot where all have the same
        (the common case: one optimizer, every parameter with a gradient at each step), else None."""
        if len(self.steps_by_pattern) == 1:
            ((pattern, count),) = self.steps_by_pattern.items()
            if all(pattern):
                return [count] * len(self.slot_numel), count
        steps = self.steps().astype(np.int64).tolist()
        return steps, steps[0] if steps and steps.count(steps[0]) == len(steps) else None

    def _idle(self, reader, steps: list[int]) -> None:
        """Name the trainable parameters a stepping optimizer holds that had no gradient all
        window (frozen ones, requires_grad False, are expected to have none: an optimizer built
        over a partly frozen model holds them); ``steps``: each parameter's."""
        if not self.held:
            return
        if all(steps):                             # every parameter had a step (the common case): none idle
            names: list[str] = []
        else:
            names = self._idle_names(steps)
        said = names or names != self._idle_said               # a text while any is idle, and when none is again
        self._idle_said = names
        for k, window in enumerate(reader.windows):
            window.idle = names
            reader.scalars[k]["grad/idle_parameters"] = float(len(names))
            if said:
                reader.texts[k]["grad/idle_parameters"] = idle_text(names, self.recorded)

    def _idle_names(self, steps: list[int]) -> list[str]:
        held = np.zeros(len(self.params), dtype=bool)
        for mask in self.held:
            held |= True if mask is ALL else np.asarray(mask, dtype=bool)
        trainable = np.array([p.requires_grad for p in self.params], dtype=bool)
        idle = held & trainable & (np.asarray(steps) == 0)
        return [name for name, flag in zip(self.setup.names, idle) if flag]

    def _rows(self, values: dict[str, np.ndarray], reader, steps: list[int], same: int | None) -> None:
        """The rows and their scalars, built a column table at a time: one ``tolist`` and C-level
        zips and maps, not a dict and a dozen calls per row (a window of the tutorial's MLP spent
        80 us here, most of its gradient part's read)."""
        k_members = self.members
        counts = values["counts"].reshape(-1, S.SIGN_EXPONENT_BINS)
        tallies = values["tallies"].reshape(-1, 2)
        rows = _row_table(values["totals"], tallies, steps, same, self._divisors())
        skipped = self.skipped.tolist()
        if any(skipped):
            for index, name in enumerate(self.setup.names):
                if skipped[index]:
                    for window in reader.windows:
                        window.skipped_nonfinite[name] = int(values["skipped_nonfinite"][index])
        tags, value_tags, log10_tags = self._tags()
        names, wanted = self.setup.names, reader.wanted
        slots = range(len(steps))
        present_by_member = []
        for k in range(k_members):              # scalars and histograms, from the rows' GRADIENT columns
            mine = slice(k, None, k_members)
            present = [n > 0 for n in steps[mine]]
            present_by_member.append(present)
            member_rows, member_slots = (rows, slots) if k_members == 1 else (rows[mine], slots[mine])
            if all(present):
                reader.scalars[k].update(zip(itertools.chain.from_iterable(tags),
                                             itertools.chain.from_iterable(member_rows)))
                wanted.rows(k, counts, member_slots, value_tags, log10_tags)
            else:
                reader.scalars[k].update(zip(itertools.chain.from_iterable(itertools.compress(tags, present)),
                                             itertools.chain.from_iterable(itertools.compress(member_rows, present))))
                wanted.rows(k, counts, itertools.compress(member_slots, present),
                            list(itertools.compress(value_tags, present)), list(itertools.compress(log10_tags, present)))
        # + steps and skipped_steps (GRADIENT_COUNTS): the rows are whole
        list(map(list.extend, rows, zip(steps, skipped if k_members == 1 else
                                        [n for n in skipped for _ in range(k_members)])))
        for k, present in enumerate(present_by_member):
            member_rows = rows if k_members == 1 else rows[k::k_members]
            if all(present):
                made = zip(names, map(dict, map(zip, itertools.repeat(_ROW_COLUMNS), member_rows)))
            else:
                made = zip(itertools.compress(names, present),
                           map(dict, map(zip, itertools.repeat(_ROW_COLUMNS), itertools.compress(member_rows, present))))
            reader.windows[k].gradients.update(made)

    def _divisors(self) -> np.ndarray:
        """(slots, 4) float64: each slot's element count (NaN for an empty parameter) under the
        mean and mean_abs columns, 1 under norm and max_abs (x / 1 is x: the rows stay exact)."""
        if self._row_divisors is None:
            numel = np.asarray(self.full_numel, dtype=np.float64)
            numel[numel == 0] = np.nan
            self._row_divisors = np.stack([numel, numel, np.ones_like(numel), np.ones_like(numel)], axis=1)
        return self._row_divisors

    def _tags(self) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
        """Each parameter's TensorBoard tags, made once (a window of a small model costs its string
        formatting as much as its arithmetic): its scalars' (``grad/<param>/<column>``), its value
        histogram's and its log10 |g| histogram's (the same for every member: the sinks prefix
        them). "1_": TensorBoard sorts the Histograms and Distributions sections by name, and
        log10 |g| is the view where vanishing shows (tanh and ReLU differ at a glance), so it
        opens first."""
        if self._slot_tags is None:
            paths = [tag_path(name) for name in self.setup.names]
            self._slot_tags = ([tuple(f"grad/{path}/{key}" for key in C.GRADIENT) for path in paths],
                               [f"grad/{path}" for path in paths], [f"1_grad_log10/{path}" for path in paths])
        return self._slot_tags

    def _overall(self, step_squares: np.ndarray, step_wide: np.ndarray, tallies: np.ndarray, reader) -> None:
        """Window-level figures: steps, skipped steps, the total norm per step (mean and max),
        over float64's range (``step_wide``)."""
        steps = self.recorded
        plain, high = step_squares[:steps], step_wide[:steps, 0]
        if np.isinf(plain).any():                    # float64 values past 1.3e154, or an inf value: which
            high = np.where(self._narrow_nonfinite(tallies), 0.0, high)
        norms = S.wide_root(plain, high, step_wide[:steps, 1])   # (steps, members)
        for k, window in enumerate(reader.windows):
            row = {"steps": window.steps, "skipped_steps": self.skipped_steps}
            if self.recorded:
                column = norms[:, k]
                # add.reduce / n and maximum.reduce: what .mean() and .max() compute, without their wrappers
                row["total_norm"] = float(np.add.reduce(column) / self.recorded)
                row["total_norm_max"] = float(np.maximum.reduce(column))
            window.overall.update(row)
            reader.scalars[k].update(zip(_OVERALL_TAGS[:len(row)], map(float, row.values())))

    def _narrow_nonfinite(self, tallies: np.ndarray) -> np.ndarray:
        """Per member: whether a parameter whose gradient is not float64 had a non-finite value
        in the window. Its square is in ``step_squares`` alone, not in ``step_wide``, so a step
        where it is inf must read inf, not the float64 values' scaled sum (which read 0 for a
        float32 model's inf gradient, or the float64 layers' norm beside it)."""
        nonfinite = tallies[:, 1].reshape(len(self.params), self.members) > 0
        return nonfinite[~np.array(self.float64, dtype=bool)].any(axis=0)


# Up to this many slots a window's table is divided in Python floats, above it in numpy: the
# same IEEE divisions either way, but three numpy calls cost the tutorial's 12-row window about
# 20 us where its rows take a few (the window's data is out of the caches by then).
PYTHON_ROWS = 64


def _row_table(totals: np.ndarray, tallies: np.ndarray, steps: list[int], same: int | None,
               divisors: np.ndarray) -> list[list]:
    """Each slot's ``columns.GRADIENT`` values as a list (floats, nonfinite an int): the means
    over its steps of ``totals`` (slots, 4), mean and mean_abs per element (``divisors``:
    ``Gradients._divisors``), zero_fraction and nonfinite from ``tallies`` (slots, 2). A slot
    without a step (left out by the caller) is divided by 1, not 0: no warning, no error."""
    nonfinite = tallies[:, 1].astype(np.int64, copy=False).tolist()
    if len(steps) <= PYTHON_ROWS:
        numel = divisors[:, 0].tolist()
        by = [max(n, 1) for n in steps] if same is None else [max(same, 1)] * len(steps)
        return [[t0 / c / n, t1 / c / n, t2 / c, t3 / c, zeros / (n * c), bad]
                for (t0, t1, t2, t3), zeros, n, c, bad in zip(totals.tolist(), tallies[:, 0].tolist(), numel, by,
                                                              nonfinite)]
    if same is None:
        per_slot = np.maximum(np.asarray(steps, dtype=np.float64), 1)
        by = per_slot[:, None]
    else:
        per_slot = by = max(same, 1)
    table = np.empty((len(steps), 5))
    np.divide(totals, by, out=table[:, :4])
    np.divide(table[:, :4], divisors, out=table[:, :4])      # mean and mean_abs per element; norm, max_abs / 1
    np.divide(tallies[:, 0], divisors[:, 0] * per_slot, out=table[:, 4])   # zero_fraction
    rows = table.tolist()                                                  # Python floats, one call
    list(map(list.append, rows, nonfinite))
    return rows


_ROW_COLUMNS = (*C.GRADIENT, *C.GRADIENT_COUNTS)
_SUMS = ("totals", "counts", "tallies", "step_squares", "step_wide", "skipped_nonfinite")     # device_tensors' keys
_OVERALL_TAGS = tuple(f"grad/{key}" for key in C.OVERALL)


_STEP_RUNS: dict[int, np.ndarray] = {}


def _steps_array(steps: tuple[int, ...], repeats: bool = False) -> np.ndarray:
    """``steps`` (non-decreasing step indices; ``repeats``: some may repeat, records joined into one
    step, ``Gradients._row_of``) as an int64 array: a window's run from step 0 with no repeat, the
    common case, is one kept ``arange`` per length (the kernels only read it)."""
    if steps[0] == 0 and steps[-1] == len(steps) - 1 and not repeats:
        run = _STEP_RUNS.get(len(steps))
        if run is None:
            run = _STEP_RUNS[len(steps)] = np.arange(len(steps), dtype=np.int64)
        return run
    return np.array(steps, dtype=np.int64)


def _counted(counted: bool | np.ndarray, index: int) -> bool:
    """Whether parameter ``index``'s gradient is histogrammed at this step (``_histogrammed``)."""
    return counted if isinstance(counted, bool) else bool(counted[index])


def idle_text(names: list[str], steps: int, shown: int = 50) -> str:
    """The Markdown that TensorBoard's Text tab shows for a window's idle parameters (held by an
    optimizer that stepped, without a gradient in any of the window's ``steps``): their names, the
    first ``shown`` of them, or that there is none again.

    Example:
        >>> print(idle_text(["e.1.weight", "e.1.bias"], 4))
        2 parameters got no gradient in any of the window's 4 steps although an optimizer that stepped holds them: `e.1.weight`, `e.1.bias`
    """
    if not names:
        return "none: every parameter of the optimizers that stepped got a gradient in this window"
    listed = ", ".join(f"`{name}`" for name in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    held = "holds it" if len(names) == 1 else "holds them"
    return (f"{len(names)} parameter{'s' * (len(names) > 1)} got no gradient in any of the window's {steps} steps "
            f"although an optimizer that stepped {held}: {listed}")


_ENDED = "the backward of this row's records ended"     # a row's key after _backward_ended


def _backward_ended(part_ref: weakref.ref, key: tuple) -> None:
    """Autograd's callback at the end of a backward that recorded a step inside it: the part's
    last row, if still that backward's, is marked as ended with what a step after the backward
    must find to join it: this thread and its sequence number, unchanged where no forward pass
    came since (the thread that called backward on the CPU; a clipping call may have changed
    the gradients in place), else the very gradients the backward left, unchanged (identity and
    version by index: a device's worker thread ends a CUDA backward); and the backward's graph
    task id (a reentrant checkpoint's backward, nested in the running one, ends before it)."""
    part = part_ref()
    if part is not None and part._row is not None and part._row[0] == key:
        part._row = (_ENDED, part._row[1],
                     {i: (id(p.grad), p.grad._version) for i, p in enumerate(part.params) if p.grad is not None},
                     key[0], (_thread(), _sequence_nr()))


def _left_by_backward(left: dict[int, tuple[int, int]], grads: list) -> bool:
    """Whether each gradient of a record is one that the ended backward left, unchanged."""
    return all(g is None or left.get(i) == (id(g), g._version) for i, g in enumerate(grads))


def _marks(params: list[torch.Tensor]) -> frozenset[tuple[int, int]]:
    """Each present gradient's identity and version: ints, no reference that would stop a
    ``swap_tensors`` conversion. A gradient that a later step or backward replaces or adds to
    has another one."""
    return frozenset((id(p.grad), p.grad._version) for p in params if p.grad is not None)


def _gaps(names: list[str], params: list[torch.Tensor], steps: list[int], recorded: int,
          skipped: int, removed: bool = False, logged: frozenset = frozenset(),
          skipped_by: list[int] | None = None) -> list[tuple[str, str]]:
    """What a window did not record although it could have, as (key, warning) pairs: gradients
    but no step (after ``remove()``: because the monitor was removed), gradients that no
    monitored optimizer stepped (``skipped_by``: each parameter's steps that a GradScaler skipped;
    a parameter whose every step was skipped was stepped, and is in ``skipped_nonfinite``).
    Gradients left as they were at the close of the last window with a step (``logged``,
    ``_marks``: ``log()`` twice with no step between) are no sign of a missed step."""
    out = []
    if recorded and all(steps):                   # every parameter recorded: nothing missed (the common case)
        return out
    with_grad = {name for name, p in zip(names, params)
                 if p.grad is not None and (id(p.grad), p.grad._version) not in logged}
    if removed and not recorded and not skipped:
        out.append(("removed", "log() after remove(): this monitor records no step once removed, so the window is "
                    "empty; attach a new GradientMonitor to record again"))
    elif not recorded and with_grad and not skipped:
        out.append(("no-step", "log(): the parameters have gradients but no optimizer step was recorded in this "
                    "window; the monitor records at a torch.optim optimizer's step(). A hand-written update "
                    "(p -= lr * p.grad) or an optimizer that is not a torch.optim.Optimizer is not seen: call "
                    "monitor.record() where the gradient is final, before the update (also to look at gradients "
                    "without stepping, say at initialisation)"))
    elif recorded:
        skipped_by = skipped_by or [0] * len(names)
        missed = [name for name, n, k in zip(names, steps, skipped_by) if n == 0 and not k and name in with_grad]
        if missed:
            out.append(("not-stepped", f"log(): {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''} had "
                        "gradients but no monitored optimizer stepped them in this window"))
    return out


def _values_of(grad: torch.Tensor, members: int) -> tuple[torch.Tensor, int]:
    """(1-D values, count of exact zeros they leave out) of a large gradient: a sparse one's
    coalesced stored values (nn.Embedding(sparse=True): its dense copy would be a second copy of
    the weight at every step) and how many it does not store; any other, ``_flat``'s view and 0.
    A batched model's (``members`` > 1) sparse gradient is made dense: its members' values are
    not apart in the stored ones."""
    if grad.layout != torch.sparse_coo or members != 1:
        return _flat(grad, keep_float64=True), 0
    values = grad.coalesce().values().reshape(-1)
    values = values if values.dtype in (torch.float32, torch.float64) else values.float()
    if values.numel() == 0:                       # no row stored: one zero stands for them (aminmax needs one)
        values = values.new_zeros(1)
    return values, grad.numel() - values.numel()


def _fold_converted(kernels, part: torch.Tensor, counts: np.ndarray | None,
                    buffer: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One member's row and tallies of a bfloat16 or float16 gradient, converted to float32
    ``CONVERTED_PIECE`` values at a time into ``buffer`` (float32, (1, >= a piece)): every value
    is exact in float32, so the row is the float32 fold's, without a float32 copy of the whole
    gradient (a 4 MB bfloat16 MLP peaked at 3.2x its bytes with one; helper brk6b). The buffer
    lives for one step's fold: kept between steps it was 256 KB held, 6% of that MLP's bytes."""
    row, tally = np.zeros(5), np.zeros((1, 2), np.int64)
    for (values,) in S.float32_pieces([part.reshape(-1)], CONVERTED_PIECE, buffer):
        piece_row = kernels.fold_all([(values, counts, 0.0, math.inf)], tally)[0]
        row[:3] += piece_row[:3]
        row[3] = np.maximum(row[3], piece_row[3])      # NaN wins, as in the kernels' max
        row[4] += piece_row[4]
    return row, tally[0]
