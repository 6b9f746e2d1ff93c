"""Forward hooks on activation modules: moments, saturation, dead units and histograms.

Every tapped output is counted into the 512 sign/exponent bins (``stats.py``); a bounded one
(tanh, sigmoid, hardtanh, softsign, hardsigmoid) is also counted into ``LINEAR_BINS`` equal bins
over its range (``histograms.py``), which is what its TensorBoard histogram shows.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradflow.monitor import columns as C
from gradflow.monitor import stats as S
from gradflow.monitor.histograms import LINEAR_BINS, count_linear, linear_scale
from gradflow.monitor.part import Part, Reduced, Setup, drop_entries, moved, training_pass, watch_forward_starts
from gradflow.monitor.sharding import local
from gradflow.monitor.spent import LeavesCopiesAlone
from gradflow.monitor.tensors import (
    PENDING_ELEMENTS,
    MonitorError,
    _BoundedCache,
    _check_layout,
    _flat,
    _flat_copy,
)
from gradflow.monitor.window import host_view

SATURATION_LEVEL = 0.97            # |a| > 0.97 for tanh (Glorot & Bengio 2010), scaled per bounds
# An output at least this large (16 KB of float32) is reduced when its forward pass ends, straight
# from the tensor; smaller ones wait, by reference, to be reduced together (see ``Activations``).
DIRECT_OUTPUT = 1 << 12

# Activation modules the monitor taps, and how to read them: a bounded activation is read
# for saturation; a rectifier is read for dead units (output <= 0 on every input).
SATURATING = {nn.Tanh: (-1.0, 1.0), nn.Sigmoid: (0.0, 1.0), nn.Hardtanh: None, nn.Softsign: (-1.0, 1.0),
              nn.Hardsigmoid: (0.0, 1.0)}
RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU)
OTHER_ACTIVATIONS = (nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish)


class _Tap(LeavesCopiesAlone):
    """The forward hook on one activation module: keeps its output for the next reduction.

    It reads training forward passes only: grad mode on, the module in training mode (a pass after
    ``model.eval()`` with grad on is a validation pass), outside backward (a non-reentrant
    activation checkpoint reruns the forward inside backward; counting that rerun would count
    the same outputs twice), and outside torch.compile's tracing (a hook that touches Python
    state there becomes a guard that recompiles every step; the monitor says so at ``log``).

    A copy of the model (``copy.deepcopy``, ``torch.save``/``torch.load``) gets ``spent_forward_hook``
    in its place (``spent.py``), which removes itself on its first call: the copy is not
    monitored, and the hook's reference to the monitor is never pickled.
    """

    __slots__ = ("__weakref__", "accumulator", "index", "schedule")

    def __init__(self, accumulator: Activations, index: int) -> None:
        self.accumulator = accumulator
        self.index = index
        self.schedule = accumulator.setup.schedule

    def __call__(self, module, inputs, output):
        if torch.compiler.is_compiling() or not self.schedule.active:
            return
        if not torch.is_grad_enabled():
            self.accumulator.unseen["no_grad"] += 1         # reentrant checkpointing's forward, or no_grad
            self.accumulator.unseen_taps.add(self.index)
        elif torch._C._current_graph_task_id() != -1:
            self.accumulator.unseen["backward"] += 1        # a checkpoint's recompute inside backward
            self.accumulator.unseen_taps.add(self.index)
        elif not module.training:                           # an evaluation pass with grad on (after model.eval())
            self.accumulator.unseen["eval"] += 1
            self.accumulator.eval_taps.add(self.index)
        elif isinstance(output, torch.Tensor) and not output.is_complex():
            self.accumulator.take(self.index, output)
        else:                                               # a tuple, dict, None, complex: no real values
            self.accumulator.untensored.setdefault(self.index, _returned(output))
        return


class _ForwardEnd(LeavesCopiesAlone):
    """The model's forward hook (``always_call``: it also runs when the forward raised): the
    training forward pass ended, whole unless it raised."""

    __slots__ = ("__weakref__", "part")

    def __init__(self, part: Activations) -> None:
        self.part = part

    def __call__(self, module, inputs, output):
        if training_pass():
            # torch calls an always_call hook with no output while the forward's exception is
            # being handled; a forward that returned None inside a user's except block is not that:
            # the exception being handled then is the one the pass began in (``handled``).
            exception = sys.exc_info()[1]
            self.part.forward_ends(raised=output is None and exception is not None
                                   and exception is not self.part.handled)


class _Hook:
    """One forward hook of the taps, on its module for the profiled passes only. The first
    ``add`` registers it (``register_forward_hook``); later ones put the same hook back into the
    module's hook dict under the handle it had (as ``register_forward_hook`` puts it: prepended,
    or last, and marked ``always_call``), where the module's class registers hooks as
    ``nn.Module`` does and the dict is still the one the handle removes from: two dict operations
    where registering cost the tutorial's MLP 15 us per profiled pass for its six hooks."""

    __slots__ = ("always_call", "handle", "hook", "module", "prepend")

    def __init__(self, module: weakref.ref, hook, *, prepend: bool, always_call: bool) -> None:
        self.module, self.hook, self.prepend, self.always_call = module, hook, prepend, always_call
        self.handle = None

    def add(self) -> bool:
        """Put the hook on its module; False where the module is gone."""
        module = self.module()
        if module is None:
            return False
        handle = self.handle
        hooks = module._forward_hooks
        if (handle is None or handle.hooks_dict_ref() is not hooks
                or type(module).register_forward_hook is not nn.Module.register_forward_hook):
            if handle is not None:            # a dict copied from the handle's holds the hook under its old id
                self._drop_copies(module)
            self.handle = module.register_forward_hook(self.hook, prepend=self.prepend, always_call=self.always_call)
            return True
        hooks[handle.id] = self.hook
        if self.always_call:
            module._forward_hooks_always_called[handle.id] = True
        if self.prepend:
            hooks.move_to_end(handle.id, last=False)
        return True

    def keep_first(self) -> None:
        """Back in front of its module's hooks where the user prepended one since it was put on
        (``register_forward_hook(..., prepend=True)`` between the step that put the taps on and
        the profiled pass): the tap reads the module's own output, not what that hook returns."""
        handle = self.handle
        hooks = handle.hooks_dict_ref()
        try:        # another thread's monitor may be taking its taps off meanwhile: checked next pass
            first = next(iter(hooks), handle.id) if hooks is not None else handle.id   # emptied meanwhile: none
            # Another monitor's tap in front is one being replaced (removed in another thread): no move.
            if first != handle.id and handle.id in hooks and hooks[first].__class__ is not _Tap:
                hooks.move_to_end(handle.id, last=False)
        except (RuntimeError, KeyError):
            pass

    def remove(self) -> None:
        """Take the hook off: the handle's own ``remove()`` where the hook is also marked in the
        module's other hook dicts (``always_call``), else the one entry popped from the dict the
        handle removes from."""
        handle = self.handle
        if self.always_call:
            handle.remove()
        elif (hooks := handle.hooks_dict_ref()) is not None:
            hooks.pop(handle.id, None)
        module = self.module()
        if module is not None and module._forward_hooks is not hooks:
            self._drop_copies(module)

    def _drop_copies(self, module: nn.Module) -> None:
        """Take the hook out of the module's hook dicts where they are not the handle's: the user
        replaced one by a copy of itself (``module._forward_hooks = OrderedDict(...)``), which holds
        the hook under the handle's id, where the handle does not remove it from."""
        for key in drop_entries(module._forward_hooks, self.hook):
            module._forward_hooks_always_called.pop(key, None)


def _running(frame) -> bool:
    """Whether ``frame`` is on the current call stack (an ancestor of the caller's caller)."""
    f = sys._getframe(2)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


@dataclass
class _ActivationPlan:
    """How a run of pending outputs is reduced, for one sequence of (tap, shape).

    The outputs are concatenated flat; each output's members are contiguous rows of it. The
    fused kernels need the rows (their lengths, slots, bands and units, as numpy arrays made
    once here), plus each element's linear bin where a bounded tap is in the run; the segment
    layout and each element's unit are made on the torch-ops path alone.
    """

    lengths: torch.Tensor        # each row (one output, one member): its length
    row_slot: torch.Tensor       # each row: its tap slot
    slot_elements: np.ndarray    # per slot: elements this run adds
    elements: int                # the run's length
    bands: tuple[np.ndarray, np.ndarray]  # each row: centre and threshold (float32), for the fused kernels
    row_units: np.ndarray        # each row: [first unit's slot in ``positives`` (0: no units), units, inner] (int64)
    arrays: tuple                # (lengths, row_slot, bands, row_units) as the fused kernel takes them
    linear: _LinearPlan | None   # how the bounded taps' elements are binned; None if no tap is bounded
    # Per element, made only on the torch-ops path (``_segments``):
    unit: torch.Tensor | None = None         # each element: its unit's slot in ``positives`` (slot 0: none)
    segment: torch.Tensor | None = None      # each element: its row
    bin_offset: torch.Tensor | None = None   # each element: its slot's offset into the counts (int32)
    centre: torch.Tensor | None = None       # each element: the centre of its tap's range; None if no tap is bounded
    threshold: torch.Tensor | None = None    # each element: |a - centre| above this is saturated (inf if unbounded)


@dataclass
class _LinearPlan:
    """The linear bins of the bounded taps' elements of a run (``histograms.count_linear``):
    bin floor((x - shift) * scale) + offset, kept within its slot's [first, last]."""

    index: torch.Tensor | None   # positions of the bounded elements in the flat run; None: all of them
    shift: torch.Tensor | None   # None: 0 (the exact ranges)
    scale: torch.Tensor
    offset: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor


class Activations(Part):
    """Forward hooks on activation modules: moments, saturation, dead units and histograms.

    Memory: an output of ``DIRECT_OUTPUT`` elements or more is reduced when the model's forward
    pass that made it ends (at the optimizer step where the model's own forward hook does not run),
    straight from the tensor (no copy; so is a float64 one, which keeps its range), so the monitor
    never keeps a layer's output alive past its forward pass (a LoRA model's batch x 4096 GELU
    output, a transformer's batch x sequence x 4d one). A smaller output is kept by reference until
    ``PENDING_ELEMENTS`` are pending (inside a forward pass: at its end) or the window closes, and
    then reduced with the others in one flat copy and, on the CPU, one compiled call that also adds
    the run to the window's sums (``kernels.fold_activation_rows``): on a small model a dozen small
    ops per hook would cost more than the training step itself. What the monitor holds of the
    model's outputs is thus at most ``PENDING_ELEMENTS`` elements of outputs smaller than
    ``DIRECT_OUTPUT``, whatever the model. Of those small outputs' runs the plans keep per-element
    linear bins (bounded taps), which batch a tiny model's counting; the fused kernels need nothing
    else per element, and the torch-ops path adds its segment layout and unit slots.

    With ``members`` K > 1 an output's leading dimension is the member: slot ``i * K + k`` is
    member k of tap i, and units are counted per member.

    ``linear`` holds ``LINEAR_BINS`` counts per slot (a bounded tap's equal bins over its range;
    zeros for the others) and, last, one shared count of NaN outputs that are never drawn.
    """

    name = "activations"

    @classmethod
    def create(cls, model: nn.Module, setup: Setup) -> Activations | None:
        taps = choose_taps(model, setup.options.get("activations", True))
        return cls(model, setup, taps) if taps else None

    def __init__(self, model: nn.Module, setup: Setup, taps: list[tuple[str, nn.Module]]) -> None:
        super().__init__(model, setup)
        device, members = setup.device, setup.members
        self.names = [name for name, _ in taps]
        self.members = members
        self.bounds = [_bounds(module) for _, module in taps]
        self.scales = [linear_scale(b) if b else None for b in self.bounds]   # (shift, scale, offset) of the linear bins
        self.rectifier = [is_rectifier(module) for _, module in taps]
        count = len(taps)
        slots = count * members
        # sum, sum of squares, saturated; wide (float64): the squares of outputs past 1.8e19 (a diverging
        # net) overflow float32, and the window's std read inf; then float64 outputs' squares scaled down
        # and up (stats.wide_squares), which past 1.3e154 overflow float64 too
        self.moments = torch.zeros(slots, 5, device=device, dtype=S.wide_dtype(device))
        self.counts = torch.zeros(slots * S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=device)
        self.linear = torch.zeros(slots * LINEAR_BINS + 1, dtype=torch.int64, device=device)
        self._scratch = S.Scratch()                  # for the large tensors
        self.elements = np.zeros(slots, dtype=np.int64)
        self.units: list[int | None] = [None] * count          # unit count, fixed at first sight
        self.unit_start: list[int] = [0] * count
        self.positives = torch.zeros(1, device=device)         # per unit: count of outputs > 0; slot 0: none
        # Made again where a sum is replaced (a new unit, move()): numpy views of the sums for the
        # fused kernel, and the sums as the read-back takes them (Reduced: frozen)
        self._host: tuple[np.ndarray, ...] | None = None
        self._reduced: dict[str, Reduced] | None = None
        # (tap, output, its version counter when taken): detach() shares the counter, so an in-place
        # change after the tap moves it (_say_changed)
        self.pending: list[tuple[int, torch.Tensor, int]] = []
        self.pending_elements = 0                     # of the pending outputs reduced in runs (not _direct)
        self.direct = 0                               # pending outputs reduced on their own (_direct)
        self.tapped = False                           # a recorded step's forward pass was tapped in this window
        self.forward_start: int | None = None         # pending's length when a forward pass still running began
        self.depth = 0                                # calls of the model inside a profiled pass still running (self(...) in forward)
        self.handled: BaseException | None = None     # the exception the user's code was handling as that pass began
        self.caller = None                            # the frame of that pass's call of the model (torch's _call_impl)
        self.caller_thread = 0                        # ... and the thread it runs in
        self.passes_before = 0                        # the schedule's count of training passes at the window's start
        self.unseen = {"no_grad": 0, "backward": 0, "eval": 0}   # tap calls not taken, by why (no_activations_cause)
        self.unseen_taps: set[int] = set()            # the taps of the no_grad and backward calls (_say_untapped)
        self.eval_taps: set[int] = set()              # ... and of the calls in eval mode
        self.untensored: dict[int, str] = {}          # taps whose module returned no real tensor -> what (_returned)
        self.other_units: set[int] = set()            # rectifier taps that gave outputs of another unit count
        self._plans = _BoundedCache()
        self._slot_rows = _BoundedCache()            # slots of the large outputs reduced together
        self._taps: list[_Hook] = []                 # the hooks on their modules now, while the schedule is active
        self._hooks: list[_Hook] = []                # every hook the taps are made of, on or off
        self._enclosing: dict[str, list[weakref.ref]] = {}   # each tap's name -> its module and the blocks around it
        self._tapped_modules: list[weakref.ref] = []
        self._layout: list[tuple] | None = None      # per slot, what read() needs (_read_layout)
        self.attached = True                         # False once removed: a late schedule change adds no tap

    def hook(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self._tapped_modules = [weakref.ref(modules[name]) for name in self.names]
        # Each tap's module and the blocks around it, to tell a compiled block from the model's root down.
        self._enclosing = {name: [weakref.ref(modules[".".join(name.split(".")[:k])]) for k in range(1, name.count(".") + 2)]
                           for name in self.names}
        self._model = weakref.ref(model)
        # The pass ending, on the model (as forward_starts is called: with the taps only); then each
        # tap, first among its module's hooks: the tap reads the module's own output, whatever hooks
        # the user added before or since (a hook that returns a new output changes what later hooks
        # see, and the taps come and go).
        self._hooks = [_Hook(self._model, _ForwardEnd(self), prepend=False, always_call=True)]
        self._hooks += [_Hook(ref, _Tap(self, index), prepend=True, always_call=False)
                        for index, ref in enumerate(self._tapped_modules)]
        self._set_taps(self.setup.schedule.active)
        self.setup.schedule.listen(self._retap)
        watch_forward_starts(self, model)

    def _set_taps(self, active: bool) -> None:
        """The taps are on the activation modules for the profiled passes only: a module with
        any forward hook leaves torch's fast call path, which cost the tutorial's MLP 13 us a
        forward pass (five ReLUs) when every pass carried them. Registering and removing them
        cost about 3 us per module per profiled pass (``activations_every``); each hook is now
        registered once and then put back under its handle (``_Hook.add``)."""
        if self.setup.options.get("compiled"):
            return      # a compiled forward is not tapped; hooks coming and going would give it a second graph
        if active and not self._taps and self.attached:
            for hook in self._hooks:
                if hook.add():
                    self._taps.append(hook)      # the list as it is now: remove() may have replaced it meanwhile
            if not self.attached:      # removed meanwhile (remove() in another thread): these stay off
                self._remove_taps()
        elif not active:
            self._remove_taps()

    def _retap(self, active: bool) -> None:
        """The schedule's listener: the taps on or off, inside the user's optimizer step. A module
        that took its tap at attach but refuses it now stops the taps with a warning: never an
        exception out of the step (at attach, a refusal is raised, and nothing is attached)."""
        try:
            self._set_taps(active)
        except Exception as error:
            self._remove_taps()
            self.attached = False                     # no tap is added again; no window is said untapped
            self.setup.warn("tap-refused", f"activations: a module refused its tap during training "
                            f"({type(error).__name__}: {error}): activations are not recorded from here on; "
                            "gradients and weights still are")

    def _remove_taps(self) -> None:
        taps, self._taps = self._taps, []
        for hook in taps:
            try:        # noqa: SIM105 - contextlib.suppress's object per hook cost six hooks 2 us a pass
                hook.remove()
            except Exception:   # each hook is tried; removing never raises
                pass

    def remove(self) -> None:
        self.attached = False
        self._remove_taps()
        super().remove()

    def record(self, mask) -> None:
        self.depth = 0                                # a step runs outside any forward pass
        self.handled = self.caller = None
        if self.forward_start is not None:            # a profiled pass that never ended (drop_partial)
            self.drop_partial()
        if self.direct:                               # taps of a forward whose model hook did not run
            self.reduce_direct()
        self.tapped |= self.setup.schedule.active and self.attached

    def forward_starts(self) -> None:
        """A profiled forward pass of the model begins: a pass that began before and never ended
        raised halfway, and what it tapped is dropped. The model called again inside its own
        forward (``self(...)``) is the same pass, one level deeper (``depth``), while the pass's
        own call is still running: a pass ended by a KeyboardInterrupt never reached its end hook
        (torch runs always_call hooks on an Exception only), and the next pass is a new one."""
        if self.depth and _running(self.caller):
            self.depth += 1
            return
        self.drop_partial()
        for hook in self._taps:
            if hook.prepend:
                hook.keep_first()
        self.forward_start = len(self.pending)
        self.depth = 1
        self.handled = sys.exc_info()[1]
        self.caller = sys._getframe(2)                # forward_starts <- ForwardStarts <- the model's call
        self.caller_thread = threading.get_ident()

    @property
    def forwards(self) -> int:
        """Training forward passes of the model seen in the window, profiled or not: those the
        monitor watched (``part.Schedule.watching``: the profiled ones, those before the window's
        first step, ...)."""
        return self.setup.schedule.passes - self.passes_before

    def forward_ends(self, raised: bool = False) -> None:
        """The model's forward pass ended: whole, its large outputs are reduced now, not kept;
        ``raised``, what it tapped is left for ``drop_partial`` to drop and say (at the next pass,
        step or ``log()``, from the user's line). An inner call of the model ending is not the end."""
        if self.depth > 1:
            self.depth -= 1
            return
        self.depth = 0
        self.handled = self.caller = None             # not kept: they hold frames (and their tensors)
        if raised:
            return
        self.forward_start = None
        if self.direct:
            self.reduce_direct()
        if self.pending_elements >= PENDING_ELEMENTS:
            self.reduce()

    @torch.no_grad()
    def reduce_direct(self) -> None:
        """Reduce the pending outputs of ``DIRECT_OUTPUT`` elements or more (and float64 ones:
        ``_direct``), each straight from its tensor, and drop them: nothing of their size is held
        past the forward pass."""
        direct = [entry for entry in self.pending if _direct(entry[1])]
        self.pending = [entry for entry in self.pending if not _direct(entry[1])]
        self.direct = 0
        self._say_changed(direct)
        self._reduce_large(direct)

    def _say_changed(self, outputs: list[tuple[int, torch.Tensor, int]]) -> None:
        """Say once if an output about to be reduced was changed in place after its module ran
        (its version counter moved since ``take``): outputs are read after the forward pass
        (small ones at the window's end), so the window's statistics of that module are of the
        changed values."""
        changed = [index for index, a, version in outputs if a._version != version]
        if changed:
            name = self.names[changed[0]]
            self.setup.warn("changed-output", f"the output of {name} was changed in place after {name} ran (an "
                            "in-place op on it: x += ..., x.mul_(), dropout or an activation with inplace=True after it) "
                            "before the monitor read it: its activation statistics in this window are of the changed "
                            "values. Outputs are read after the forward pass, not copied; change a copy instead "
                            "(x = x + ...) where the statistics matter")

    def drop_partial(self) -> None:
        if self.forward_start is None:
            return
        dropped, self.pending = self.pending[self.forward_start:], self.pending[:self.forward_start]
        self.pending_elements -= sum(a.numel() for _, a, _ in dropped if not _direct(a))
        self.direct -= sum(map(_direct, (a for _, a, _ in dropped)))
        self.forward_start = None
        if self.caller is not None and self._still_running():
            done = "removed" if not self.attached else "read (log())"
            self.setup.warn("cut-forward", f"the monitor was {done} while a forward pass of the model was running "
                            "(in another thread, or from inside the pass): the activations it had produced were left "
                            "out of the window (only whole forward passes are counted)")
            return
        self.setup.warn("partial-forward", "a forward pass of the model raised halfway: the activations it had "
                        "produced were left out of the window (only whole forward passes are counted)")

    def _still_running(self) -> bool:
        """Whether the pass that has not ended runs still: in this thread, its call frame is on
        the stack (else a KeyboardInterrupt ended it: torch runs the end hook on an Exception
        only); in another, that thread lives (only the main thread gets KeyboardInterrupt;
        another thread's frames cannot be read safely while it runs)."""
        if self.caller_thread != threading.get_ident():
            return any(thread.ident == self.caller_thread for thread in threading.enumerate())
        frame = sys._getframe(1)
        while frame is not None:
            if frame is self.caller:
                return True
            frame = frame.f_back
        return False

    def fold(self) -> None:
        """Fold in what is pending, less what a forward pass that never ended tapped (at
        ``log()``, ``remove()`` or a conversion right after a pass that raised halfway)."""
        self.drop_partial()
        self.reduce()

    def take(self, index: int, output: torch.Tensor) -> None:
        # a DTensor output (tensor parallel): this rank's part; a plain tensor skips asking (0.25 us a tap)
        output = output.detach() if type(output) is torch.Tensor else local(output.detach())
        self.pending.append((index, output, output._version))
        n = output.numel()
        if n >= DIRECT_OUTPUT or output.dtype is torch.float64:      # _direct(output), inline
            self.direct += 1
        else:
            self.pending_elements += n
            # Inside the model's forward pass the budget waits for its end: a pass that raises
            # halfway is dropped whole (drop_partial), never half reduced into the window.
            if self.pending_elements >= PENDING_ELEMENTS and self.forward_start is None:
                self.reduce()

    def reset(self) -> None:
        self.pending.clear()
        self.pending_elements = 0
        self.direct = 0
        self.forward_start = None
        self.depth = 0
        self.handled = self.caller = None
        self._zero_sums()
        self.elements.fill(0)
        self.tapped = False
        self.passes_before = self.setup.schedule.passes
        self.unseen = {"no_grad": 0, "backward": 0, "eval": 0}
        self.unseen_taps = set()
        self.eval_taps = set()
        self.untensored = {}

    def _zero_sums(self) -> None:
        """Zero the window's sums: on the CPU through the fused kernel's numpy views of them
        (``_host``, where made), else in one ``torch._foreach_zero_``; the linear bins only where
        a tap has them (a bounded activation's: ``scales``), as nothing else counts into them.
        In the tutorial's window (ReLUs) a ``_foreach_zero_`` or a ``.numpy()`` here cost 6-7 us
        in place, their code out of the cache after the steps; fills through kept views, 2 us."""
        host = self._host
        if host is None:
            torch._foreach_zero_([self.moments, self.counts, self.positives, self.linear])
            return
        counts, moments, _, positives = host
        counts.fill(0)
        moments.fill(0)
        positives.fill(0)
        if any(scale is not None for scale in self.scales):
            self.linear.zero_()

    def reduce(self) -> None:
        """Fold every pending output into the window's sums. No host sync."""
        if not self.pending:
            return
        pending, direct = self.pending, self.direct
        self.pending, self.pending_elements, self.direct = [], 0, 0
        self._say_changed(pending)
        small = pending
        if direct:
            small = [entry for entry in pending if not _direct(entry[1])]
            self._reduce_large([entry for entry in pending if _direct(entry[1])])
        if not small:
            return
        key = tuple([(index, a.shape) for index, a, _ in small])
        plan = self._plans.get(key) or self._plans.put(key, self._make_plan([(index, a) for index, a, _ in small]))
        flat = _flat_copy([a for _, a, _ in small])
        if flat.numel() != plan.elements:
            _check_layout(flat, torch.empty(plan.elements, device="meta"))
        if plan.linear is not None:
            self._count_linear(flat, plan.linear)
        kernels = S.fused_kernels(flat.device)
        if kernels is not None:                       # one compiled call: the pass and the adds to the sums
            if self._host is None:
                self._host = (self.counts.view(-1, S.SIGN_EXPONENT_BINS).numpy(), self.moments.numpy(), self.elements,
                              self.positives.numpy())
            kernels.fold_activation_rows(flat.numpy(), *plan.arrays, *self._host)
            return
        self._reduce_with_torch(flat, plan, small)

    @torch.no_grad()
    def _reduce_with_torch(self, flat: torch.Tensor, plan: _ActivationPlan, small) -> None:
        """``reduce``'s sums with torch ops (any device): segment sums of the flat run."""
        self.elements += plan.slot_elements
        self._segments(plan, [(index, a) for index, a, _ in small])
        wide = flat.to(self.moments.dtype)            # the squares in float64, as the kernels take them
        values = [wide, wide * wide]
        if plan.centre is not None:
            values.append(((flat - plan.centre).abs_() > plan.threshold).to(wide.dtype))
        sums = S.segment_sums(values, plan.lengths, plan.segment)
        self.moments[:, :len(values)].index_add_(0, plan.row_slot, sums.T)
        S.count_into(self.counts, S.sign_exponent_bins(flat).add_(plan.bin_offset))
        if plan.unit is not None:
            S.count_into(self.positives, plan.unit * (flat > 0))      # non-positives go to slot 0
            self.positives[:1].zero_()

    def _make_plan(self, pending) -> _ActivationPlan:
        """The rows of a run: each output's members, their slots, saturation bands and units (a
        rectifier's unit count is fixed here at its first sight), and the bounded taps' linear bins."""
        device = self.moments.device
        k = self.members
        lengths, row_slot, bands, row_units = [], [], [], []
        slot_elements = np.zeros_like(self.elements)
        for index, a in pending:
            n = a.numel()
            bands += [self._band(index)] * k
            lengths += [n // k] * k
            row_slot += range(index * k, index * k + k)
            slot_elements[index * k:index * k + k] += n // k
            row_units += self._row_units(index, a)
        bands = tuple(np.array(column, dtype=np.float32) for column in zip(*bands))
        host = np.array(lengths, dtype=np.int64), np.array(row_slot, dtype=np.int64)
        units = np.array(row_units, dtype=np.int64).reshape(-1, 3)
        bounded = any(self.bounds[index] is not None for index, _ in pending)
        return _ActivationPlan(torch.tensor(lengths, device=device, dtype=torch.long),
                               torch.tensor(row_slot, device=device), slot_elements, sum(lengths), bands, units,
                               (*host, bands, units), self._linear_plan(pending) if bounded else None)

    def _row_units(self, index: int, a: torch.Tensor) -> list[list[int]]:
        """Per member of tap ``index``'s output ``a``: [its first unit's slot in ``positives``,
        units, inner] (the member is (outer, units, inner) in C order), or [0, 0, 0] where it
        has no units to count (not a rectifier, a scalar, another unit count, or empty)."""
        sample = a[0] if self.members > 1 and a.dim() >= 1 else a       # one member's output
        units = self._units_of(index, sample)
        inner = math.prod(sample.shape[_unit_dim(sample) + 1:]) if units else 0
        if not units or not inner:
            return [[0, 0, 0]] * self.members
        return [[self.unit_start[index] + member * units, units, inner] for member in range(self.members)]

    def _band(self, index: int) -> tuple[float, float]:
        """(centre, threshold) of a tap: |a - centre| > threshold is saturated (inf: unbounded)."""
        bounds = self.bounds[index]
        if not bounds:
            return 0.0, math.inf
        return (bounds[0] + bounds[1]) / 2, SATURATION_LEVEL * (bounds[1] - bounds[0]) / 2

    def _segments(self, plan: _ActivationPlan, pending) -> None:
        """Per element, what the torch-ops path's segment reductions take (made once per plan,
        on that path only): its row, its counts' offset, its unit's slot in ``positives`` where a
        tap of the run is a rectifier, its tap's centre and threshold."""
        if plan.segment is not None:
            return
        device = self.moments.device
        plan.segment = torch.repeat_interleave(torch.arange(len(plan.lengths), device=device), plan.lengths,
                                               output_size=plan.elements)      # no host sync
        plan.bin_offset = (plan.row_slot[plan.segment] * S.SIGN_EXPONENT_BINS).int()
        if plan.row_units[:, 0].any():
            plan.unit = torch.cat([_unit_column(first, units, inner, length, device)
                                   for (first, units, inner), length in zip(plan.row_units.tolist(), plan.arrays[0].tolist())])
        if plan.linear is not None:
            bands = [self._band(index) for index, _ in pending]
            plan.centre = torch.cat([torch.full((a.numel(),), c, device=device) for (_, a), (c, _) in zip(pending, bands)])
            plan.threshold = torch.cat([torch.full((a.numel(),), t, device=device)
                                        for (_, a), (_, t) in zip(pending, bands)])

    def _linear_plan(self, pending) -> _LinearPlan:
        """Per bounded element: where it is in the flat run, and its bin's scale, offset and limits."""
        k, position = self.members, 0
        index, shift, scale, offset, first = [], [], [], [], []
        for tap, a in pending:
            n = a.numel()
            if self.scales[tap] is not None:
                tap_shift, tap_scale, tap_offset = self.scales[tap]
                slot_first = np.repeat(np.arange(tap * k, tap * k + k) * LINEAR_BINS, n // k)
                index.append(np.arange(position, position + n))
                first.append(slot_first)
                offset.append(slot_first + tap_offset)
                shift.append(np.full(n, tap_shift))
                scale.append(np.full(n, tap_scale))
            position += n
        device = self.moments.device

        def column(parts, dtype=torch.float32):
            return torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=dtype)

        every = sum(len(i) for i in index) == position
        shifts = np.concatenate(shift)
        return _LinearPlan(None if every else column(index, torch.long), column(shift) if shifts.any() else None,
                           column(scale), column(offset), column(first), column(first) + (LINEAR_BINS - 1))

    def _count_linear(self, flat: torch.Tensor, plan: _LinearPlan) -> None:
        values = flat if plan.index is None else flat.index_select(0, plan.index)
        count_linear(self.linear, values, plan.shift, plan.scale, plan.offset, plan.first, plan.last,
                     self.linear.numel() - 1)

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
            self._host = self._reduced = None
        if sample.shape[dim] == self.units[index]:
            return self.units[index]
        self.other_units.add(index)                   # said at log(): _say_other_units
        return None

    def _reduce_large(self, large: list[tuple[int, torch.Tensor, int]]) -> None:
        """Large outputs reduced on their own, one job per member of each: dense reductions
        beat segment sums here."""
        k = self.members
        counts = self.counts.view(-1, S.SIGN_EXPONENT_BINS)
        jobs, slots = [], []
        if not large:
            return
        for index, a, _ in large:
            bounds = self.bounds[index]
            band = self._band(index) if bounds else None
            for member, flat in enumerate(_flat(a, keep_float64=True).view(k, -1)):
                slot = index * k + member
                if bounds:
                    self._count_linear_member(index, member, flat)
                jobs.append((flat, counts[slot], band))
                slots.append(slot)
                self.elements[slot] += flat.numel()
                self._count_positive(index, member, a[member] if k > 1 else a)
        folded = self._scratch.fold(jobs)
        key = tuple(slots)
        rows = self._slot_rows.get(key)
        if rows is None:                              # made once: a fresh device tensor per step would sync
            rows = self._slot_rows.put(key, torch.tensor(slots, device=self.moments.device))
        self.moments[:, :3].index_add_(0, rows, folded[:, 0::2].to(self.moments.dtype))   # sum, squares, beyond the band
        wide = [row for row, (flat, _, _) in enumerate(jobs) if flat.dtype == torch.float64 and flat.numel()]
        if wide:                                      # float64 outputs: their squares over float64's range
            norms = torch.stack([S.scaled_norm(jobs[row][0]) for row in wide])
            self.moments[:, 3:].index_add_(0, rows[wide], S.wide_squares(norms).T.to(self.moments.dtype))

    def _count_linear_member(self, index: int, member: int, flat: torch.Tensor) -> None:
        """Add member ``member`` of bounded tap ``index``'s 1-D output ``flat`` to its linear bins."""
        shift, scale, offset = self.scales[index]
        first = (index * self.members + member) * LINEAR_BINS
        count_linear(self.linear, flat, shift or None, scale, first + offset, first, first + LINEAR_BINS - 1,
                     self.linear.numel() - 1)

    def _count_positive(self, index: int, member: int, sample: torch.Tensor) -> None:
        units = self._units_of(index, sample)
        if units is not None:
            first = self.unit_start[index] + member * units
            self._scratch.count_positive(sample, _unit_dim(sample), self.positives[first:first + units])

    def device_tensors(self) -> dict[str, Reduced]:
        if self._reduced is None:
            self._reduced = {"moments": host_view(self.moments), "counts": host_view(self.counts),
                             "positives": host_view(self.positives), "linear": host_view(self.linear)}
        return self._reduced

    def move(self, device: torch.device) -> None:
        """Fold the outputs taken on the old device, carry the sums to ``device``; outputs of a
        forward pass that already ran there (parameters replaced, found at the step) stay pending."""
        self.drop_partial()
        here = self.moments.device
        later = [entry for entry in self.pending if entry[1].device != here]
        self.pending = [entry for entry in self.pending if entry[1].device == here]
        self.direct = sum(map(_direct, (a for _, a, _ in self.pending)))
        self.reduce()
        self.moments = moved(self.moments, device, wide=True)
        self.counts, self.positives, self.linear = (
            t.to(device, copy=True) for t in (self.counts, self.positives, self.linear))
        self.pending = later
        self.pending_elements = sum(a.numel() for _, a, _ in later if not _direct(a))
        self.direct = sum(map(_direct, (a for _, a, _ in later)))
        self._plans, self._slot_rows, self._scratch = _BoundedCache(), _BoundedCache(), S.Scratch()
        self._host = self._reduced = None

    def no_activations_cause(self) -> str:
        """Why a window whose steps were tapped saw no activation output, told by what the taps
        and the model's own forward hooks saw (never guessed): no training forward pass of the
        model at all (steps recorded by hand, or a compiled model, whose forward the monitor sees
        as a whole); the activation modules called only under no_grad or inside backward
        (reentrant activation checkpointing: its forward runs without autograd and is recomputed
        in backward); or training forward passes in which no activation module ran (activations
        computed with functions, ``F.gelu`` inside a layer's forward)."""
        if not self.forwards:
            why = ("no training forward pass of the model was seen in this window: the steps were recorded by hand "
                   "(record()) without one, or the model ran compiled (torch.compile), whose forward the monitor "
                   "sees as a whole, so its activation modules are not tapped (a hook inside would recompile)")
        elif compiled := self.compiled_taps():
            names = ", ".join(compiled[:4])
            why = (f"the activation modules ({names}) run inside compiled blocks (Module.compile() or torch.compile "
                   "on a submodule): the monitor's taps do nothing in compiled code (a hook that records there "
                   "would recompile every step); choose taps outside them (activations=fn) or pass activations=False")
        elif self.unseen["no_grad"] or self.unseen["backward"]:
            why = (f"the activation modules ran only under no_grad ({self.unseen['no_grad']} calls) or inside "
                   f"backward ({self.unseen['backward']} calls), as under reentrant activation checkpointing "
                   "(torch.utils.checkpoint with use_reentrant=True runs the forward without autograd and recomputes "
                   "it in backward): those outputs are not the training pass's; use_reentrant=False has them tapped")
        elif self.unseen["eval"]:
            why = (f"the activation modules ran only in eval mode ({self.unseen['eval']} calls, after model.eval(), "
                   "with grad on): those are evaluation passes, which are not counted; training passes run after "
                   "model.train()")
        elif self.untensored:
            said = ", ".join(f"{self.names[index]} returned {what}" for index, what in list(self.untensored.items())[:4])
            why = (f"the activation modules ran, but {said}, not a real tensor: a tap reads a module's output only "
                   "where it is one real tensor; choose modules that return one (activations=fn)")
        else:
            names = ", ".join(self.names[:4]) + (" ..." if len(self.names) > 4 else "")
            why = (f"training forward passes ran, but none of the activation modules ({names}) did: "
                   "the model computes its activations with functions (F.gelu, torch.relu inside a forward), which "
                   "have no module to tap")
        return NO_ACTIVATIONS + why + STILL

    def _say_untapped(self) -> None:
        """Say once which taps gave no output in a window where others did, each with the cause
        its own tap calls tell (``no_activations_cause`` for the whole model): called only under
        no_grad or inside backward (reentrant activation checkpointing), only in eval mode, inside a
        compiled block, returning no real tensor (a tuple, a dict, None, a complex one), or never
        called in a tapped training pass (the model computes that activation with a function in its
        place, ``F.gelu`` beside an unused ``nn.GELU``, or does not use it there).
        A tap with no row is then never silently absent."""
        silent = np.flatnonzero(~self.elements.reshape(-1, self.members).any(axis=1)).tolist()
        if not silent:                                # a member without output, its tap with some: not this
            return
        compiled = set(self.compiled_taps())
        by_cause: dict[str, list[str]] = {}
        for index in silent:
            name = self.names[index]
            cause = ("ran only under no_grad or inside backward: a part run under torch.no_grad() (a frozen "
                     "teacher), or reentrant activation checkpointing (torch.utils.checkpoint with "
                     "use_reentrant=True; use_reentrant=False has them tapped)"
                     if index in self.unseen_taps else
                     "ran only in eval mode (after model.eval() on them: evaluation passes are not counted)"
                     if index in self.eval_taps else
                     f"returned {self.untensored[index]}, not a real tensor: a tap reads a module's output only "
                     "where it is one real tensor (choose one that returns one with activations=fn)"
                     if index in self.untensored else
                     "ran inside compiled blocks, where the taps do nothing" if name in compiled else
                     "did not run in a tapped training pass: the model computes these activations with functions "
                     "(F.gelu, torch.relu inside a forward) instead, or does not use the modules there")
            by_cause.setdefault(cause, []).append(name)
        said = "; ".join(f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} {cause}"
                         for cause, names in by_cause.items())
        self.setup.warn("some-activations", f"log(): {len(silent)} of {len(self.names)} activation modules gave no "
                        f"output in this window while others did, and have no row: {said}{STILL}")

    def _say_other_units(self) -> None:
        """Say once which rectifier taps ran on outputs of another unit count than their first
        (one nn.ReLU shared by layers of different widths): those outputs are in the tap's mean and
        std but have no units in its dead_fraction (``_units_of``)."""
        said = ", ".join(f"{self.names[index]} ({self.units[index]} units)" for index in sorted(self.other_units)[:4])
        self.setup.warn("other-units", f"log(): the dead_fraction of {said} counts only the units of the first "
                        "output the module gave: it also ran on outputs of other widths (one module shared by layers "
                        "of different widths), which are in its mean and std but not in its dead_fraction; give "
                        "each layer its own activation module to have their units counted")

    def compiled_taps(self) -> list[str]:
        """The taps whose module, or a block around it, is compiled (``Module.compile()`` sets
        ``_compiled_call_impl``; ``torch.compile(submodule)`` puts it under ``_orig_mod``)."""
        def compiled(name: str) -> bool:
            blocks = [ref() for ref in self._enclosing.get(name, [])]
            return "_orig_mod" in name.split(".") or any(
                getattr(block, "_compiled_call_impl", None) is not None for block in blocks if block is not None)
        return [name for name in self.names if compiled(name)]

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        """Rows ``columns.ACTIVATION`` per tap, and their scalars, built in one pass; a window
        whose recorded steps were tapped but saw no output is said.

        A row (``Window.activations[name]``): ``mean`` and ``std`` (population) of the window's
        outputs, ``saturated_fraction`` (bounded taps: the share of |a - centre| beyond
        ``SATURATION_LEVEL`` of the half-range) and ``dead_fraction`` (rectifiers: the share of
        units with no output > 0 in the window). A tap that never fired has no row."""
        elements = self.elements.tolist()
        if not any(elements):
            if self.tapped:
                self.setup.warn("no-activations", self.no_activations_cause())
            return
        if not all(elements) and self.tapped:
            self._say_untapped()
        if self.other_units:
            self._say_other_units()
        if self._layout is None:               # made once: a small model's window costs its formatting
            self._layout = self._read_layout(reader)
        counts = values["counts"].reshape(-1, S.SIGN_EXPONENT_BINS)
        linear = values["linear"][:-1].reshape(-1, LINEAR_BINS)    # the last count: NaN
        moments = values["moments"].tolist()
        alive = None                           # per unit slot, the cumulative count of units with an output > 0
        mean_, std_, saturated_, dead_ = C.ACTIVATION
        for slot, index, member, name, tags, histogram in self._layout:
            n = elements[slot]
            if not n:
                continue
            total, squares, saturated, high, low = moments[slot]
            mean = total / n
            std = S.wide_spread(n, total, squares, high, low)
            row = {mean_: mean, std_: std}
            scalars = reader.scalars[member]
            scalars[tags[0]], scalars[tags[1]] = mean, std
            bounds = self.bounds[index]
            if bounds is not None:
                row[saturated_] = scalars[tags[2]] = saturated / n
            units = self.units[index] if self.rectifier[index] else None
            if units:
                if alive is None:
                    alive = [0, *(values["positives"] > 0).cumsum().tolist()]
                start = self.unit_start[index] + member * units
                row[dead_] = scalars[tags[3]] = 1.0 - (alive[start + units] - alive[start]) / units
            reader.windows[member].activations[name] = row
            if bounds is None:
                reader.wanted.value(member, histogram, counts, slot)
            else:                                   # tanh, sigmoid: equal bins over the range
                reader.wanted.linear(member, histogram, linear, slot, bounds)

    def _read_layout(self, reader) -> list[tuple]:
        """Per slot: (slot, tap index, member, name, its scalars' tags in ``columns.ACTIVATION``
        order, its histogram's tag)."""
        return [(slot, slot // self.members, k, name, tuple(f"activation/{path}/{key}" for key in C.ACTIVATION),
                 f"activation/{path}") for slot, k, name, path in reader.slots(self.names)]


NO_ACTIVATIONS = "log(): no activation output was recorded in this window although steps were: "
STILL = "; gradients and weights are still recorded. Pass activations=False to silence this"


def choose_taps(model: nn.Module, activations) -> list[tuple[str, nn.Module]]:
    """The activation modules to tap: none, gradflow's choice (``is_activation``), or the
    user's (a callable ``(name, module) -> bool``)."""
    if activations is True:
        return [(n, m) for n, m in model.named_modules() if is_activation(m)]
    if activations is False or activations is None:
        return []
    if callable(activations):
        return [(n, m) for n, m in model.named_modules() if activations(n, m)]
    raise MonitorError(f"activations must be True, False or a callable (name, module) -> bool, got {activations!r}")


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    for kind, bounds in SATURATING.items():
        if isinstance(module, kind):
            return bounds if bounds is not None else (float(module.min_val), float(module.max_val))
    return None


def _unit_column(first: int, units: int, inner: int, length: int, device: torch.device) -> torch.Tensor:
    """Each element's unit slot in ``positives`` of a row of ``length`` values laid out (outer,
    units, inner), its first unit at slot ``first``; all 0 (no unit) where ``first`` is 0."""
    if not first:
        return torch.zeros(length, dtype=torch.long, device=device)
    return first + torch.arange(length, device=device) // inner % units


def _returned(output) -> str:
    """What a tapped module returned that has no real values to read, in words: ``a tuple``,
    ``a dict``, ``None``, ``a complex tensor`` (complex parameters are not recorded either)."""
    if output is None:
        return "None"
    return "a complex tensor" if isinstance(output, torch.Tensor) else f"a {type(output).__name__}"


def _direct(a: torch.Tensor) -> bool:
    """Whether an output is reduced on its own (``_reduce_large``), not in a run's float32 copy:
    ``DIRECT_OUTPUT`` elements or more, or float64, whose values may lie beyond float32's range
    (1e45 read as inf; 1e-50 as 0, a live unit as a dead one)."""
    return a.numel() >= DIRECT_OUTPUT or a.dtype is torch.float64


def _unit_dim(a: torch.Tensor) -> int:
    """The feature axis: channels of (N, C, ...) images, the last axis of (N, T, C) sequences."""
    return a.dim() - 1 if a.dim() in (1, 3) else 1


# Activation modules of other libraries, known by class name: Hugging Face's GELUActivation,
# NewGELUActivation, QuickGELUActivation, FastGELUActivation, ClippedGELUActivation, GELUTanh,
# SiLUActivation, MishActivation, ReLUSquaredActivation, timm's GELUTanh, QuickGELU, Swish ...
# (transformers/activations.py, timm/layers/activations.py). The name with any "Activation"
# suffix removed must contain one of these words; "linear" and "identity" are not activations.
ACTIVATION_WORDS = ("gelu", "silu", "swish", "mish", "relu", "elu", "tanh", "sigmoid", "softplus", "hardswish",
                    "laplace", "squareplus")
NOT_ACTIVATIONS = ("linear", "identity")


def is_activation(module: nn.Module) -> bool:
    """Whether the monitor taps ``module``: torch's activation classes, and parameter-free modules
    whose class name says they are one (``NewGELUActivation``, ``QuickGELU``, ``Swish``).

    Example:
        >>> is_activation(nn.Tanh()), is_activation(nn.Linear(2, 2))
        (True, False)
    """
    if isinstance(module, tuple(SATURATING) + RECTIFIERS + OTHER_ACTIVATIONS):
        return True
    name = type(module).__name__.lower().removesuffix("activation")
    if any(word in name for word in NOT_ACTIVATIONS) or next(module.parameters(recurse=False), None) is not None:
        return False
    return any(word in name for word in ACTIVATION_WORDS) and not list(module.children())


def is_rectifier(module: nn.Module) -> bool:
    """A ReLU-like activation, read for dead units (torch's classes, or "relu" in the class name)."""
    return isinstance(module, RECTIFIERS) or "relu" in type(module).__name__.lower()
