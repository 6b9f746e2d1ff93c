"""Per-step gradient statistics, summed on the device over a window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradflow.monitor import stats as S
from gradflow.monitor.tensors import (
    LARGE_PARAMETER,
    PENDING_ELEMENTS,
    _BoundedCache,
    _check_layout,
    _flat,
    _flat_copy,
    _segment_layout,
)

GRADIENT_FIELDS = ("mean", "mean_abs", "norm", "max_abs")

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
