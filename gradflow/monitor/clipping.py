"""The norm before clipping: each step's clipping calls over the model's parameters in a window.

``interception.py`` tells the monitor of every call, with the L2 norm of the gradients it clips
as they were before it (whatever norm the call clipped by) and whether it changed one. This part
gathers a step's calls (those between two recorded or skipped steps) into one: its norm before
clipping is the L2 norm over the parameters its calls clipped, each as the first call over it
found it (a later call over the same parameters sees what the first left), and it clipped if any
of its calls did. The window keeps how many steps clipped, the sum of their norms and how many of
them clipped, and adds ``columns.CLIPPING`` to its own row (``Window.overall``): the mean norm,
``clipped_steps`` and ``clip_calls`` (steps with a clipping call, however many calls each made).

- A body and a head clipped apart in one step: the norm is sqrt(body^2 + head^2), the whole.
- The same parameters clipped twice (by value, then by norm): the first call's norm.
- A clipping call at each micro-batch of an accumulation: a training forward pass since the
  step's last call changed the gradient, so the step's norm, and whether it clipped, start again
  from the next call: the last micro-batch's call, the one whose result the optimizer applies.
  A pass is seen by the monitor's hook on the model, or, where the loop calls the model's layers
  and not the model (a LightningModule's ``training_step``), by autograd nodes made in the thread
  since the call (``torch._C._autograd._get_sequence_nr``; the clipping calls make none) when the
  new call clips parameters clipped before in the step (a body's and a head's calls with a
  logged weight norm between them stay one step).
  So is the clip that Lightning makes after it counted a step the GradScaler skips: the next
  step's call starts again, not the skipped step's norm and clipped flag.
- A call over some parameters already clipped in the step and some not: the step keeps the norm
  of its earlier calls, and a warning says so (the new ones' own norm is not known apart).

Under AMP, torch's recipe clips between ``scaler.unscale_`` and ``scaler.step``: a step the
scaler then skips on overflow had a clip call too, whose norm is inf or NaN. In a window with
skipped steps, the steps with a non-finite norm are those steps' and are left out of all three
columns (the step is counted in ``skipped_steps``), whichever comes first, the clip call or the
record (Lightning records before it clips). Without skipped steps a non-finite norm was applied
and is averaged in.
"""

from __future__ import annotations

import numpy as np
import torch

from gradflow.monitor import columns as C
from gradflow.monitor.interception import ClipTally
from gradflow.monitor.part import Part, Reduced, watch_forward_starts
from gradflow.monitor.stats import wide_dtype


class StepClips:
    """One step's clipping calls (see the module docstring): the parameters clipped so far, the
    L2 norm over them before clipping, whether any call clipped, and at its last call the training
    forward passes counted and the thread's autograd sequence number (either moved: a new pass,
    which starts the step again)."""

    __slots__ = ("clipped", "passes", "seen", "total")

    def __init__(self, passes: tuple[int, int]) -> None:
        self.seen: set[int] = set()
        self.total: torch.Tensor | None = None
        self.clipped: torch.Tensor | None = None
        self.passes = passes

    def add(self, ids: set[int], total: torch.Tensor, clipped: torch.Tensor, passes: tuple[int, int]) -> bool:
        """A call over parameters ``ids`` (0-d device tensors, read whole); False where it overlaps
        the step's earlier calls only in part (the step keeps their norm)."""
        if passes != self.passes:
            # A training pass since the step's last call: seen by the model's hook, or autograd nodes
            # made in between by a call over parameters clipped before (grad-mode work between a
            # body's and a head's calls, a logged weight norm, makes nodes too: not a new pass).
            if passes[0] != self.passes[0] or not ids.isdisjoint(self.seen):
                self.seen, self.total, self.clipped = set(), None, None
            self.passes = passes
        self.clipped = clipped if self.clipped is None else self.clipped | clipped.to(self.clipped.device)
        whole = True
        if self.total is None:
            self.total = total
        elif ids.isdisjoint(self.seen):
            wide = wide_dtype(total.device)
            self.total = torch.hypot(self.total.to(wide), total.to(self.total.device, wide))
        else:
            whole = ids <= self.seen           # all clipped before in this step: their norm stands
        self.seen |= ids
        return whole


class Clipping(Part):
    """A window's clipping steps over the monitored parameters (``interception.ClipTally``)."""

    name = "clipping"

    def __init__(self, model, setup) -> None:
        super().__init__(model, setup)
        self.tally = ClipTally()
        self.step: StepClips | None = None   # the calls since the last recorded or skipped step
        self.skipped = 0                     # steps skipped in the window (a GradScaler overflow)

    def hook(self, model) -> None:
        watch_forward_starts(self, model, call=False)      # Schedule.passes counts every training pass

    def scope(self, params: list[torch.Tensor], ids: set[int]) -> list[torch.Tensor] | None:
        """Where ``params`` (``ids``: theirs) hold a gradient that is not monitored (another
        model's), the monitored ones with a gradient (perhaps none): the norm before clipping is
        then taken over these alone, as the norm the window divides it by is. None where every
        gradient there is monitored (the common case, every parameter monitored: one set
        comparison)."""
        index_of = self.setup.index_of
        if ids <= index_of.keys():
            return None
        own, foreign = [], False
        for p in params:
            if p.grad is not None:
                if id(p) in index_of:
                    own.append(p)
                else:
                    foreign = True
        return own if foreign else None

    def mixed_meshes(self) -> None:
        """Clipping calls that share one ``total_norm`` (one per device mesh), some over the
        monitored gradients only and some over others' too: said once (the step's norm is not
        the monitored gradients' alone)."""
        self.setup.warn("clip-mixed-meshes", "clip_grads_with_norm_ calls sharing one total_norm (one per device "
                        "mesh) clipped this monitor's gradients alone in one call and other gradients in "
                        "another: total_norm_before_clip for those steps holds the others' too (monitor the "
                        "whole model, or clip its gradients in calls of their own)")

    def add(self, params: list[torch.Tensor], total: torch.Tensor, clipped: torch.Tensor,
            ids: set[int] | None = None) -> bool:
        """A clipping call over ``params`` (``ids``: theirs, if made already) found the L2 norm
        ``total`` before clipping and ``clipped`` (a 0-d device tensor: it changed a gradient);
        kept for this step, and True, if any of ``params`` is monitored."""
        index_of = self.setup.index_of
        ids = {id(p) for p in params} if ids is None else ids
        if not any(i in index_of for i in ids):
            return False
        total, clipped = _whole(total.detach()), _whole(clipped)
        passes = (self.setup.schedule.passes, _sequence_nr())
        step = self.step             # one read: remove() in another thread folds it away meanwhile
        new = step is None
        if new:
            step = StepClips(passes)
            self.setup.schedule.watch_until_step()    # a training pass before the step: a new micro-batch
        whole = step.add(ids, total, clipped, passes)
        if new:                      # seen by fold() only once it holds a norm
            self.step = step
        if not whole:
            self.setup.warn("clip-overlap", "a clipping call covered some parameters that an earlier call in "
                            "the same step clipped and some it did not: total_norm_before_clip keeps the "
                            "earlier calls' norm for that step")
        return True

    def unscale(self, scale: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """A GradScaler is about to unscale ``optimizer``'s gradients: the pending step's calls over
        them saw them scaled. Their norm divided by ``scale`` (a 0-d device tensor), and said once:
        the calls' limit met scaled gradients. Not where the calls are an earlier step's: the
        model's hook saw a training pass since, or autograd nodes were made since and the norm is
        inf/NaN (the clip Lightning makes after it counted a step the GradScaler skips; one host
        read, on this rare path only: in the recipe's order no call is pending at ``unscale_``)."""
        step = self.step
        if (step is None or step.total is None or step.passes[0] != self.setup.schedule.passes
                or step.seen.isdisjoint(id(p) for group in optimizer.param_groups for p in group["params"])):
            return
        if step.passes[1] != _sequence_nr() and not bool(step.total.isfinite()):
            return
        step.total = step.total / scale.to(step.total.device)
        self.setup.warn("clip-scaled", "a clipping call came before scaler.unscale_(optimizer): it clipped the "
                        "gradients still multiplied by the GradScaler's scale, so its limit was compared with "
                        "scaled values (torch's AMP recipe: scaler.unscale_(optimizer), then clip, then "
                        "scaler.step); total_norm_before_clip reports the norm unscaled")

    def record(self, mask) -> None:
        if self.step is not None:          # at every step: nothing to do unless a clipping call came
            self.fold()

    def skip(self, mask) -> None:
        self.fold()
        self.skipped += 1

    def fold(self) -> None:
        """The pending step's calls, as one, into the window's tally."""
        step, self.step = self.step, None
        if step is not None and step.total is not None:   # None: its call is still being added (another thread)
            self.tally.add(step.total, step.clipped)

    def device_tensors(self) -> dict[str, Reduced]:
        self.fold()
        return {"sums": Reduced(self.tally.sums.to(self.setup.device))} if self.tally.calls else {}

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        if not self.tally.calls:
            return
        sums = dict(zip(ClipTally.FIELDS, values["sums"].tolist()))
        calls, norm_sum, clipped = self.tally.calls, sums["norm_sum"], sums["clipped"]
        if self.skipped and sums["nonfinite_calls"]:       # the skipped steps' calls (module docstring)
            calls -= int(sums["nonfinite_calls"])
            norm_sum, clipped = sums["finite_norm_sum"], sums["finite_clipped"]
        if not calls:
            return
        row = dict(zip(C.CLIPPING, (float(norm_sum / calls), int(clipped), calls)))
        for k, window in enumerate(reader.windows):
            window.overall.update(row)
            reader.scalars[k].update({f"grad/{key}": float(v) for key, v in row.items()})

    def move(self, device: torch.device) -> None:
        self.fold()
        self.tally.move(device)

    def reset(self) -> None:
        self.tally = ClipTally()
        self.step = None
        self.skipped = 0


_sequence_nr = torch._C._autograd._get_sequence_nr     # autograd nodes made in this thread so far


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A DTensor norm (or comparison) of sharded gradients as its full value: one collective,
    inside a clipping call that every rank makes; any other tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
