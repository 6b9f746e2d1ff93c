"""The one interface every part of the monitor has: bind, hook, record, hand over, read, reset.

A part is one kind of statistic (gradients, weights, activations, gates, ...). The
coordinator (``monitor.py``) makes one of each class in ``parts.PARTS`` that wants to be
there, and then only loops over them:

- ``Part.create(model, setup)``: the part, or None where it has nothing to record on this
  model with these options (no gated weights, ``weights=False``). Buffers are made here.
- ``hook(model)``: add the part's hooks to the model (forward hooks, tensor hooks), each
  handle kept with ``self.keep(handle)``. The coordinator attaches all parts or none: if one
  part's ``hook`` raises, every part's ``remove()`` runs and the model is as it was.
- ``bind(params)``: follow the monitored parameters (a first binding, or tensors that
  replaced them: ``load_state_dict(assign=True)``, ``.double()``).
- ``move(device)``: the parameters moved to another device (``model.to(device)`` after
  attach; ``conversions.py`` notices): fold what was taken on the old device into the sums, then
  re-create every device buffer on ``device`` (``moved``), carrying the window's sums; the
  next steps are recorded there. ``bind`` follows.
- ``record(mask)``: one optimizer step applied its gradient (``mask``: which monitored
  parameters the stepping optimizer holds: ``steps.ALL``, a tuple of bools, or None for
  all). Return False to say nothing was recorded: the parts after this one are then not
  called for that step (the gradients part does this when no parameter had a gradient).
  ``skip(mask)``: a step that was not applied (an AMP overflow).
- ``fold()``: fold pending work into the device sums (no host sync); called before the
  window is read and on ``remove()``.
- ``device_tensors()``: the window's sums, ``{key: Reduced(tensor, SUM | MAX)}``. The
  coordinator hands every part's tensors to one device-to-host copy (``window.read_back``);
  the reduction says how copies of the sum on several processes combine (a sharded model:
  SUM for sums of squares and counts, MAX for the largest |g|), as OLMo-core's
  ``record_metric(reduce_type=...)``.
- ``read(values, reader)``: fill the window (``reader.windows``, one per member), its
  TensorBoard scalars (``reader.scalars``) and histogram requests (``reader.wanted``) from
  ``values``: this part's keys of the read-back, as numpy arrays of the same shapes (float64;
  on the CPU int64 counts stay int64, and both are views of the part's own tensors, valid
  until its ``reset()``: copy what is kept past the window).
- ``reset()``: start the next window.
- ``remove()``: remove every hook the part added. Never raises.

Every method is a no-op by default, so a part defines only what it uses (Cockpit's
``quantities/quantity.py``; OLMo-core's callback base with empty hooks). What the parts share
is the ``Setup``: the monitored names and tensors (their dtypes and device), ``members``, the
monitor's options, the schedule of profiled steps, the monitor's ``warn`` and ``follow``.

Example (a part that counts steps)::

    class StepCount(Part):
        name = "step_count"

        def __init__(self, model, setup):
            super().__init__(model, setup)
            self.count = 0

        def record(self, mask):
            self.count += 1

        def read(self, values, reader):
            for window in reader.windows:
                window.overall["my_steps"] = self.count

        def reset(self):
            self.count = 0
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from gradflow.monitor.spent import LeavesCopiesAlone
from gradflow.monitor.stats import wide_dtype

# Reduced and its reductions live beside the read-back that takes them (window.py); named here too,
# as every part hands its tensors over in them.
from gradflow.monitor.window import MAX, REDUCTIONS, SUM, Reduced, WindowReader  # noqa: F401 - re-exported

_FIRST = object()        # Schedule.mask before the first recorded step


class Schedule:
    """Which training forward passes are profiled (activation taps, through-time hooks): the
    one after every ``every``-th counted step, and the first one. A step counts unless no training
    forward pass came since the last counted step (one optimizer per parameter, stepping inside
    backward, is one iteration, not one step per parameter; so are a body's and a head's optimizers
    stepping one after the other); where no training forward pass was ever seen (a compiled model,
    steps recorded by hand) every step counts. Parts that tap forward passes read ``active``, or
    ``listen(fn)`` to be told ``fn(active)`` when it changes (to add their module hooks only for the
    profiled passes); the coordinator calls ``step()`` once per recorded step.

    The model's ``ForwardStarts`` hook adds one to ``passes`` at each training forward pass it
    sees. It is on the model only while a pass must be seen (``watching``): a profiled pass (the
    parts' ``forward_starts``), a window's passes until its first recorded step (its count of
    training passes, ``watch_until_step``), the passes after a clipping call until the step (a new
    micro-batch), the passes until the second recorded step, and every pass where a part needs it
    (``watch_forward_starts(always=True)``: non-finite and through-time hooks, a compiled model) or
    the loop steps several optimizers (two steps in a row over other parameters) or was seen stepping
    twice with no pass between. The other passes run with no hook of the monitor on the model: a hook of any kind
    takes the model's call off torch's fast path (``Module._call_impl``), 3 us a forward pass of the
    tutorial's MLP, about 8 us a step with the hook's own work. Whether a training pass came since
    the last step is then read from the counts when the hook was on since that step, and otherwise
    from autograd: a training forward pass makes autograd nodes in its thread
    (``torch._C._autograd._get_sequence_nr`` moves), and steps inside one backward share its graph
    task. Only a loop that steps the same parameters at every step gets there (one optimizer, or
    ``record()`` by hand). The two tell apart the same loops of it, but for grad-mode work outside
    the model between two steps with no pass between them (read as a pass: two steps counted where
    the counts make one) and a pass made in another thread between two steps of this one (not read
    as one); the first time steps come with no pass between, the hook stays on for good and the
    counts decide."""

    __slots__ = ("active", "always", "every", "hook", "listeners", "mark", "mask", "passes", "passes_at_step",
                 "seen", "until_step", "watched")

    def __init__(self, every: int) -> None:
        self.every = every
        self.seen = 0
        self.active = True
        self.listeners: list[Callable[[bool], None]] = []
        self.passes = 0                  # training forward passes seen (while the hook was on)
        self.passes_at_step = 0          # ... when the last recorded step came
        self.hook: ForwardStarts | None = None   # the model's hook that sees passes start, once a part asked
        self.always = False              # that hook stays on at every pass
        self.until_step = True           # ... or until the next recorded step (a window's start, a clipping call)
        self.watched = True              # it has been on since the last recorded step: ``passes`` is exact since
        self.mark = (-1, 0, -1)          # at the last recorded step: its backward's graph task, thread, autograd nodes made
        self.mask: Any = _FIRST          # ... and its mask (``Part.record``'s)

    def listen(self, listener: Callable[[bool], None]) -> None:
        self.listeners.append(listener)

    @property
    def watching(self) -> bool:
        """Whether the next training forward pass must be seen from its start."""
        return self.always or self.active or self.until_step

    def watch_until_step(self) -> None:
        """Have every training pass seen until the next recorded step (a window's start, for its
        count of passes; a clipping call, for a pass after it)."""
        if not self.until_step:
            self.until_step = True
            self.place()

    def place(self) -> None:
        """The hook on the model or off it, as ``watching`` says."""
        if self.hook is not None:
            self.hook.place(self.watching)

    def step(self, mask=None) -> None:
        """One recorded step over the monitored parameters ``mask`` says (``Part.record``'s)."""
        mark = (_graph_task_id(), _thread(), _sequence_nr())
        if self.watched:                 # every pass since the last step was counted
            same = self.passes and self.passes == self.passes_at_step
            if same and self.hook is not None and self.hook.lost():
                same = self._no_pass_since(mark)   # the user cleared the model's pre-hooks: autograd says
        else:                            # the hook was off: read autograd (class docstring)
            same = self._no_pass_since(mark)
        self.mark = mark
        self.passes_at_step = self.passes
        previous, self.mask = self.mask, mask
        if previous is not _FIRST and previous is not mask and previous != mask:
            self.always = True           # several optimizers' steps: the counts decide
        self.until_step = previous is _FIRST          # the first step: the second is read from the counts too
        if same:                         # no forward pass since the last step: the same iteration
            self.always = True
        else:
            self.seen += 1
            active = self.seen % self.every == 0
            if active != self.active:
                self.active = active
                for listener in self.listeners:
                    listener(active)
        hook = self.hook
        if hook is not None:
            self.watched = hook.place(self.watching)

    def _no_pass_since(self, mark: tuple[int, int, int]) -> bool:
        """Whether no training forward pass came since the last recorded step, read from autograd:
        this step in the same backward's graph task as that one, or no autograd node made in its
        thread since (class docstring)."""
        last = self.mark
        return bool(self.passes) and ((mark[0] != -1 and mark[0] == last[0]) or (mark[1] == last[1] and mark[2] == last[2]))


@dataclass
class Setup:
    """What every part of one monitor shares (made by the coordinator, read by the parts).

    ``names`` and ``params`` are the monitored parameters (floating point, trainable or not,
    in ``named_parameters()`` order); ``params`` follows a rebinding, and ``dtypes`` and
    ``device`` are theirs as of the last one (a parameter's own dtype or device differs from them
    once the model was converted or moved and not yet followed). ``options`` are the monitor's
    keyword arguments (``weights``, ``activations``, ``histograms``, ...), and ``drawn``: whether
    any histogram is written (a writer, ``histograms`` not False). ``follow()`` (the
    coordinator's) rebinds every part to the model's parameters if they were replaced, converted
    or moved, and says whether it did.
    """

    names: list[str]
    params: list[torch.Tensor]
    members: int
    options: dict[str, Any]
    schedule: Schedule
    warn: Callable[[str, str], None]
    kinds: dict[str, str] = field(default_factory=dict)
    index_of: dict[int, int] = field(default_factory=dict)    # id(param) -> its index in params
    # During a record(): 1 / the GradScaler's scale when the gradients are still scaled (a fused
    # optimizer unscales inside its step); parts that read .grad multiply by it. None otherwise.
    unscale: torch.Tensor | None = None
    inner_step: bool = False      # during a record(): the step is an inner step of a running wrapper's step
    sharding: Any = None          # sharding.ShardLayout where parameters are DTensors (FSDP2, tensor parallel)
    follow: Callable[[], bool] = lambda: False
    stopped: Exception | None = None    # a change found in training that follow() could not follow (log() raises it)
    forward_watchers: list = field(default_factory=list)     # the parts the one ForwardStarts hook calls
    forward_starts: Any = None                               # that hook, once a part asked for it
    # the parts told when another part's forward hook replaced a module's output (through time's
    # unrolled one): called (module, old output, new output)
    output_replaced: list = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    device: torch.device = field(default=torch.device("cpu"))

    def __post_init__(self) -> None:
        self.rebind(self.params)

    def rebind(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self.dtypes = [p.dtype for p in params]
        self.device = params[0].device


class OnceWarnings:
    """A monitor's warnings, each key shown once per monitor (the first time it is said)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def warn(self, key: str, message: str, stacklevel: int = 3) -> None:
        """Warn ``message`` unless ``key`` was said; ``stacklevel`` counts from the caller of ``warn``."""
        if key not in self.said:
            self.said.add(key)
            warnings.warn(message, stacklevel=stacklevel)

    def from_part(self, key: str, message: str) -> None:
        """A part's warning (``Setup.warn``): shown at the user's line that led to it (its
        ``log()`` call, or the forward pass or step whose hook found it), the first frame
        outside gradflow's monitor and torch."""
        if key not in self.said:
            self.warn(key, message, stacklevel=_user_stacklevel())


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def _user_stacklevel() -> int:
    """The stacklevel, for ``OnceWarnings.warn`` called by ``from_part``, of the first frame that
    is not in gradflow's monitor or in torch (the user's code, or a framework's)."""
    frame, level = sys._getframe(2), 3            # from_part's caller; warn is level 1, from_part 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


class Part:
    """Base class of the monitor's parts: every hook is a no-op (see the module docstring)."""

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, setup: Setup) -> None:
        self.setup = setup
        self.handles: list = []

    @classmethod
    def create(cls, model: nn.Module, setup: Setup) -> Part | None:
        """The part for ``model``, or None where it has nothing to record there."""
        return cls(model, setup)

    def hook(self, model: nn.Module) -> None:
        """Add this part's hooks to ``model`` (keep each handle with ``keep``)."""

    def keep(self, handle) -> None:
        self.handles.append(handle)

    def bind(self, params: list[torch.Tensor]) -> None:
        """Follow these parameter tensors from now on."""

    def move(self, device: torch.device) -> None:
        """The parameters moved to ``device``: fold what is pending, then re-create every device
        buffer there (``moved``) with the window's sums. Parts without buffers only fold."""
        self.fold()

    def record(self, mask) -> bool | tuple | None:
        """One applied optimizer step. False: nothing recorded; later parts skip the step. A mask
        (a tuple of bools over the parameters): later parts record only those."""
        return None

    def skip(self, mask) -> None:
        """One optimizer step that was not applied (a GradScaler overflow)."""

    def fold(self) -> None:
        """Fold pending work into the device sums. No host sync."""

    def device_tensors(self) -> dict[str, Reduced]:
        """The window's device sums, for the one read-back."""
        return {}

    def read(self, values: dict[str, np.ndarray], reader: WindowReader) -> None:
        """Fill the window from this part's read-back ``values``."""

    def reset(self) -> None:
        """Start the next window."""

    def remove(self) -> None:
        """Remove every hook this part added. Never raises."""
        handles, self.handles = self.handles, []
        for handle in handles:
            with contextlib.suppress(Exception):
                handle.remove()


def moved(tensor: torch.Tensor, device: torch.device, wide: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` on ``device`` with the same values: always a new tensor, on the same
    device too, so that no part keeps a buffer of the device it left. ``wide``: a float sum,
    kept in the device's wide dtype (``stats.wide_dtype``: float64, float32 on MPS).

    Example:
        >>> sums = torch.tensor([1.5, 2.0], dtype=torch.float64)
        >>> copy = moved(sums, torch.device("cpu"), wide=True)
        >>> copy.tolist(), copy.data_ptr() != sums.data_ptr()
        ([1.5, 2.0], True)
    """
    return tensor.to(device=device, dtype=wide_dtype(device) if wide else tensor.dtype, copy=True)


def training_pass() -> bool:
    """Whether the code running now is a training forward pass: grad mode on, not traced by
    torch.compile, not a checkpoint's recompute inside backward."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() == -1


_grad_enabled, _is_compiling, _graph_task_id = (torch.is_grad_enabled, torch.compiler.is_compiling,
                                                torch._C._current_graph_task_id)
_sequence_nr, _thread = torch._C._autograd._get_sequence_nr, threading.get_ident


class ForwardStarts(LeavesCopiesAlone):
    """The model's forward pre-hook: counts each training forward pass (``training_pass``) for
    the schedule, and on the profiled ones calls ``forward_starts()`` of each part that asked
    (``watch_forward_starts``), in the parts' order. One hook for all of them, and nothing more
    on the other passes: a monitored step of the tutorial's MLP, of about 0.5 ms, spent 20-40 us
    more with every pass calling the parts (``benchmarks/tutorial_split.py``). It is on the model
    only while the schedule is ``watching`` (``place``): registered once, then put back into the
    model's hook dict under its handle, as the activation taps are (``activations._Hook``)."""

    __slots__ = ("__weakref__", "every_pass", "handle", "module", "on", "parts", "removed", "schedule")
    KIND = "pre"

    def __init__(self, parts: list[Part], schedule: Schedule, model: nn.Module) -> None:
        self.parts = parts
        self.every_pass: list[Part] = []        # those of them called at unprofiled passes too
        self.schedule = schedule
        self.module = weakref.ref(model)
        self.handle = model.register_forward_pre_hook(self)
        self.on = True
        self.removed = False

    def __call__(self, module, inputs):
        # training_pass(), inline: this runs at every forward pass it is on for
        if _grad_enabled() and not _is_compiling() and _graph_task_id() == -1:
            schedule = self.schedule
            schedule.passes += 1
            for part in self.parts if schedule.active else self.every_pass:
                part.forward_starts()

    def place(self, on: bool) -> bool:
        """Put the hook on the model (back under its handle, last among its pre-hooks; registered
        afresh where the model's hook dict is not the handle's) or take it off; whether it is on
        now. A model whose class registers hooks its own way keeps it on, as it was registered."""
        if on == self.on or self.removed:
            return self.on
        model = self.module()
        if model is None or type(model).register_forward_pre_hook is not nn.Module.register_forward_pre_hook:
            return self.on
        handle = self.handle
        hooks, current = handle.hooks_dict_ref(), model._forward_pre_hooks
        if hooks is not current:         # the model's dict replaced: a copy of the old one holds this hook
            drop_entries(current, self)  # under the old id (a registration afresh would make it two)
        if not on:
            if hooks is not None:
                hooks.pop(handle.id, None)
        elif hooks is current:
            hooks[handle.id] = self
        else:
            self.handle = handle = model.register_forward_pre_hook(self)
            hooks = current
        self.on = on
        if self.removed:                         # removed meanwhile (remove() in another thread): it stays off
            hooks.pop(handle.id, None)
        return on

    def lost(self) -> bool:
        """Whether the hook should be on the model but is not in its hook dict: the user cleared
        it (``model._forward_pre_hooks.clear()``) or replaced it by an empty one (as Lightning's
        DeepSpeed strategy does). Marked off, so that the next ``place`` puts it back."""
        model = self.module()
        if (not self.on or self.removed or model is None
                or type(model).register_forward_pre_hook is not nn.Module.register_forward_pre_hook
                or model._forward_pre_hooks.get(self.handle.id) is self):
            return False
        self.on = False
        return True

    def remove(self) -> None:
        """Off the model for good (the part that asked first keeps it: ``Part.keep``)."""
        self.removed = True
        self.handle.remove()
        model = self.module()
        if model is not None and self.handle.hooks_dict_ref() is not model._forward_pre_hooks:
            drop_entries(model._forward_pre_hooks, self)     # a copy of its dict, made while it was on


def drop_entries(hooks: dict, hook: Any) -> list[int]:
    """Remove every entry of ``hook`` from a module's hook dict and return their keys: a dict made
    as a copy of the one a handle was registered in (``module._forward_pre_hooks = OrderedDict(...)``)
    holds it under the handle's id, which the handle does not remove from."""
    keys = [key for key, value in hooks.items() if value is hook]
    for key in keys:
        del hooks[key]
    return keys


def watch_forward_starts(part: Part, model: nn.Module, *, call: bool = True, every_pass: bool = False,
                         always: bool = False) -> None:
    """Have ``part.forward_starts()`` called at each profiled training forward pass of ``model``
    (``Schedule.active``; from a part's ``hook``), or at every pass the hook sees with
    ``every_pass``; ``call=False``: only have training passes counted (``Schedule.passes``), for a
    part that reads the count. ``always``: the hook sees every training pass (not only those the
    schedule is ``watching`` for); a compiled model's hook always stays (hooks coming and going
    would give its forward a second graph). The first part to ask keeps the one hook: the
    coordinator adds and removes every part's hooks together."""
    setup = part.setup
    schedule = setup.schedule
    if setup.forward_starts is None:
        setup.forward_starts = schedule.hook = ForwardStarts(setup.forward_watchers, schedule, model)
        part.keep(setup.forward_starts)
    if call:
        setup.forward_watchers.append(part)
    if call and every_pass:
        setup.forward_starts.every_pass.append(part)
    if always or setup.options.get("compiled"):
        schedule.always = True
    schedule.place()
