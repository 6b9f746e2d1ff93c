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
next window. Frameworks that know where the gradient is final (the Hugging Face Trainer's
``on_pre_optimizer_step``) pass ``automatic=False`` and call ``record()`` there.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loader = [(torch.randn(16, 2), torch.randn(16, 1)) for _ in range(4)]
    >>> with SummaryWriter("runs/mine") as writer, GradientMonitor(model, writer) as monitor:
    ...     for epoch in range(3):
    ...         for x, y in loader:
    ...             optimizer.zero_grad(); nn.functional.mse_loss(model(x), y).backward(); optimizer.step()
    ...         stats = monitor.log(epoch)
    >>> stats["0.weight"]["steps"], stats["0.weight"]["mean_abs"] > 0     # the last epoch's 4 steps
    (4, True)

This module depends on torch (and numpy for reading results) only, never on the trainer,
the config or the CLI.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import numpy as np
import torch
from torch import nn

from gradflow.monitor import interception
from gradflow.monitor.compact import Layouts
from gradflow.monitor.following import Follower
from gradflow.monitor.histograms import check_every
from gradflow.monitor.intercepted import Intercepted
from gradflow.monitor.model_checks import (
    check_attach,
    check_entered,
    check_positive,
    check_record,
    check_step,
    is_compiled,
    monitored_kinds,
    unwrap,
)
from gradflow.monitor.output import Output
from gradflow.monitor.part import OnceWarnings, Part, Schedule, Setup
from gradflow.monitor.parts import create_parts, recorders
from gradflow.monitor.registry import attached, claim, monitor_of, release
from gradflow.monitor.sharding import ShardLayout
from gradflow.monitor.steps import OptimizerMasks, StepWatch
from gradflow.monitor.tensors import MonitorError
from gradflow.monitor.window import Window, keep, member_windows, read_parts, read_window, tag_path

__all__ = ["GradientMonitor", "MonitorError", "Window", "tag_path", "unwrap"]


class GradientMonitor:
    """Records per-parameter gradient statistics at every optimizer step of ``model``.

    Args:
        model: any nn.Module (also wrapped in DistributedDataParallel or torch.compile).
        writer: where each window goes: a ``SummaryWriter``; None to only return and keep
            statistics; a ``gradflow.monitor.sinks.Sink``, ``ScalarSink(fn)`` for loggers that take
            scalars only, or ``TeeSink(...)`` for several. Anything else is a ``MonitorError``.
        optimizer: watch this optimizer's steps only; by default any torch.optim optimizer
            that steps this model's parameters is watched, each recording its own parameters.
        histograms: TensorBoard histograms (value and log10 |g| of gradients, weights,
            activations): True at every window; an int N >= 1: each histogram sums the counts
            of N windows (their histogrammed steps' values, ``histogram_every``; weights: the
            last window's) and is written at the step of its last window, while scalars stay
            per window: N times fewer histogram bytes. Windows still pooling are written by
            ``flush()``, which ``remove()`` and leaving ``with`` call. False: none.
        histogram_every: a parameter's gradient histogram holds its 1st, (N+1)-th, (2N+1)-th, ...
            step with a gradient in the window (default N = 10; 1: every step), counted per
            parameter, so a GAN's two networks and a mixture's experts each get theirs (23 steps
            of one optimizer: 3 steps' values). The other steps are folded without the
            histogram, about half the pass over each gradient: resnet18 and the wide MLP cost
            1.06-1.07x a step with every step histogrammed, 1.04-1.05x with every 10th
            (benchmarks/overhead.py --clock cpu --malloc fixed). The statistics (zero_fraction and nonfinite
            included) count every element of every step either way.
        weights: also record weight norms, update ratios and weight histograms.
        activations: tap activation modules in training forward passes: True for torch's
            activation classes and modules named like one (``NewGELUActivation``), or a callable
            ``(name, module) -> bool`` choosing them (``gradflow.monitor.is_activation`` is the default's test). Their
            outputs are read later in batches, so an output modified in place after the
            activation (rare) is read as modified, and a warning says so.
        members: K > 1 for K models trained as one (every parameter and activation stacked on
            a leading dimension of K): statistics are kept per member, ``log`` returns one dict
            per member, ``member_history(k)`` gives a member's windows, and ``writer`` may be a
            list of K writers (else tags are prefixed ``member_<k>/``).
        activations_every: tap activations in the forward pass of every N-th optimizer step
            (default 10; 1: every step). Gradients and weights are recorded at every step either
            way. Measured on convolutional and transformer nets (benchmarks/overhead.py),
            activations every step cost 2-3% of a step on their own, which every 10th step cuts
            by nine tenths; a window's activation statistics then describe its tapped steps.
            Steps with no training forward pass between them count once (one optimizer per
            parameter, stepping inside backward, is one iteration).
        automatic: record at each optimizer step (the default). False: record only when
            ``record()`` is called, for frameworks that know where the gradient is final.
        history_length: how many windows ``history`` keeps (per member), the oldest dropped
            first: a ring, so a run that logs every step does not grow without bound. Settable
            later as ``monitor.history_length``; None keeps every window. All but the last two
            windows per member hold their rows in compact form, read-only (``compact.py``):
            about 0.12 KB per parameter and window, past 2 KB of fixed part.
        nonfinite: find where each window's first NaN/inf came from (``nonfinite.py``): the
            module, the pass and the step, in ``history[-1].first_nonfinite``. Off by default:
            it reads every watched module's output and input gradient once more (one sum
            each), measured alone at 1.08x a step on nanoGPT, 1.07x resnet18, 1.03x the ResNet
            CNN, 1.02x the LSTM LM, 1.01x the transformer LM (benchmarks/overhead.py --variants
            first-nonfinite --clock cpu, 11 rounds, a shared 2-core machine): above 1.02x.
        through_time: profile ||dL/dh_t|| at every time step of each ``nn.RNN``/``nn.LSTM``/``nn.GRU``
            layer and direction (``through_time.py``; ``history[-1].time``): on every
            ``through_time_every``-th optimizer step the recurrence is recomputed cell by cell.
        through_time_every: profile the forward pass of every N-th optimizer step (default 50:
            a profiled step of the LSTM benchmark costs 1.8-1.9x a plain one; docs/through_time.md).

    Sharded models (DTensor parameters: FSDP2 ``fully_shard``, HSDP, tensor parallel): attach on
    every rank and call ``log`` on every rank; each window is then reduced to the full tensors'
    statistics with a few batched collectives, the same on every rank (``sharding.py``,
    docs/sharding.md). DeepSpeed engines and FSDP1 are refused with a ``MonitorError``.

    A window's ``steps`` is the largest number of steps any one parameter recorded: the
    optimizer steps for one optimizer, the training iterations for a GAN's two optimizers or
    for one optimizer per parameter. Each row's own ``steps`` counts that parameter's.

    Raises:
        MonitorError: a second monitor on the same model, a parameter on the meta device or
            not yet initialised (lazy modules), a writer of an unknown kind, an ``optimizer``
            that is not one, a switch (``weights``, ``automatic``, ...) that is not a bool, bad
            ``members``, ``histograms``, ``histogram_every`` or ``activations_every``.

    The monitor keeps no reference to ``model`` itself, adds nothing to it, and removes every
    hook it added on ``remove()`` or on leaving ``with``: removed, it stays removed, and
    ``with`` on it raises MonitorError.

    Attributes:
        names: the monitored parameters' ``named_parameters()`` names, the keys of ``log()``'s rows
            (``write_custom_scalars(writer, monitor.names)``).
        history: the closed windows, oldest first (``gradflow.monitor.window.Window``: ``gradients``,
            ``weights``, ``activations``, ``overall``, ``idle``, ``time``, ...), at most
            ``history_length`` of them per member; ``diagnose_monitor(monitor, losses)`` reads it.
        kinds: parameter name -> the kind of module that owns it (``linear``, ``conv``, ``norm``, ...).
        attached: whether the monitor's hooks are on (False after ``remove()``).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = GradientMonitor(model)            # no writer: log() only returns the statistics
        >>> model(torch.ones(2, 3)).sum().backward(); optimizer.step()
        >>> round(monitor.log(step=0)["weight"]["norm"], 4)   # three gradients of 2.0: sqrt(12)
        3.4641
        >>> monitor.remove()
    """

    attaching = False    # between claiming the model and adding its last hook (_attach)
    _unhooking = threading.RLock()   # _unhook's: shared by all monitors (removal is rare and quick)

    def __init__(self, model: nn.Module, writer=None, *, optimizer: torch.optim.Optimizer | None = None,
                 histograms: bool | int = True, weights: bool = True, activations=True,
                 members: int = 1, automatic: bool = True, activations_every: int = 10,
                 history_length: int | None = 10_000, nonfinite: bool = False,
                 through_time: bool = True, through_time_every: int = 50, histogram_every: int = 10) -> None:
        inner, named = check_attach(model, attached(), members=members, activations_every=activations_every,
                                    through_time_every=through_time_every, history_length=history_length,
                                    histogram_every=histogram_every, optimizer=optimizer,
                                    switches={"weights": weights, "automatic": automatic, "nonfinite": nonfinite,
                                              "through_time": through_time})
        # Python ints from here on (a numpy integer is accepted: a count read from an array or a config)
        members, activations_every, through_time_every, histogram_every = (
            int(members), int(activations_every), int(through_time_every), int(histogram_every))
        self._output = Output(writer, members, check_every(histograms))
        self.members, self.automatic, self.histograms = members, automatic, histograms
        self.history: list[Window] = []
        self.activations_every, self.history_length = activations_every, history_length
        self._layouts = Layouts()            # what the compact old windows of history share (compact.py)
        self._model = weakref.ref(inner)
        self._warnings = OnceWarnings()
        self._options = dict(weights=weights, activations=activations, histograms=histograms, nonfinite=nonfinite,
                             histogram_every=histogram_every, through_time=through_time, drawn=self._output.draws,
                             through_time_every=through_time_every, compiled=is_compiled(model))
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._build(inner, named)

    def _build(self, inner: nn.Module, named: list) -> None:
        """Make the parts for ``named`` and attach them: at attach, and where layers were added
        or removed, at the close of the window they changed in (``Follower.relayout``)."""
        self.names = [name for name, _ in named]
        self.kinds = monitored_kinds(inner, self.names)
        self._setup = Setup(self.names, [p for _, p in named], self.members, self._options,
                            Schedule(self.activations_every), self._warnings.from_part, self.kinds,
                            follow=lambda: self._follower.in_training())
        # DTensor parameters (FSDP2, HSDP, tensor parallel): collectives at each window's close; every
        # rank must attach (sharding.py). None for plain tensors, DDP included.
        self._setup.sharding = self._sharding = ShardLayout.of(self.names, self._setup.params, self.members,
                                                               f"nonfinite={bool(self._options['nonfinite'])}")
        self.parts: dict[str, Part] = create_parts(inner, self._setup)
        self._recorders = recorders(self.parts)          # only these are called at each step (the hot path)
        # the parts kept on the model's current tensors (.double(), assign=True; following.py)
        self._follower = Follower(self._model, self.names, self._setup, self.parts, self._sharding,
                                  self._warnings.from_part, self._unhook)
        self._masks = self._follower.masks = OptimizerMasks(len(self.names), lambda: self._setup.index_of,
                                                            self._follower.refresh)
        # after the outermost watched step (its post-hook): the gradients' wrapper check ends there
        self._steps = StepWatch(self._masks, self._optimizer and self._optimizer(), self._record,
                                self.parts["gradients"].step_done, self._warnings.from_part, self._skip)
        # what interception tells it: clipping calls, GradScaler's scaled and skipped steps (intercepted.py)
        self._intercepted = Intercepted(self.parts, self._masks, self.automatic, self._optimizer, self._skip)
        self._start_window()
        self._attach(inner)

    # -- life cycle -----------------------------------------------------------------------

    def _attach(self, model: nn.Module) -> None:
        """Claim ``model`` (``registry.claim``), then add every hook, or none: a part that fails
        to hook leaves the model as it was."""
        claim(model, self)
        try:
            for part in self.parts.values():
                part.hook(model)
            if self.automatic:        # after the parts: a part that refuses leaves torch's global step hooks uninstalled
                self._steps.start()
            interception.watch(self._intercepted)
        except BaseException:
            self._unhook()
            release(model, self)
            raise
        finally:
            self.attaching = False

    def _unhook(self) -> None:
        # One thread at a time: remove() in one thread and detach() of the same monitor in another
        # both come here, and a part's remove() checks a handle, then drops it.
        with self._unhooking:
            self._steps.stop()
            for part in self.parts.values():
                part.remove()
            interception.unwatch(self._intercepted)

    @property
    def attached(self) -> bool:
        """Whether the monitor's hooks are on: True from attaching until ``remove()``."""
        return self._steps.on or self._intercepted in interception._WATCHERS

    @property
    def history_length(self) -> int | None:
        """How many windows ``history`` keeps per member (None: every one). Settable: a shorter
        length drops the oldest windows at once; MonitorError unless a positive int or None."""
        return self._history_length

    @history_length.setter
    def history_length(self, length: int | None) -> None:
        length = check_positive("history_length", length, "None: keep every window", none=True)
        self._history_length = length
        if length is not None and len(self.history) > length * self.members:
            del self.history[:len(self.history) - length * self.members]

    def remove(self) -> None:
        """Remove every hook this monitor added. Safe to call more than once; never raises
        (what fails after the hooks are gone, say a closed writer, is a warning)."""
        self._unhook()
        release(self._model(), self)
        try:
            for part in self.parts.values():     # fold in what is pending: a later log() still reports it
                part.fold()
            self.flush()
        except Exception as error:
            warnings.warn(f"GradientMonitor.remove(): the hooks are removed, but writing what was pending failed: "
                          f"{type(error).__name__}: {error}", stacklevel=2)
        self._output.release()     # the sinks' open files (an event file's descriptor): a kept monitor holds none

    @classmethod
    def detach(cls, model: nn.Module) -> bool:
        """Remove whichever monitor is attached to ``model``; True if there was one.

        Raises:
            MonitorError: ``model`` is not an nn.Module.
        """
        if not isinstance(model, nn.Module):
            raise MonitorError(f"GradientMonitor.detach(model) takes an nn.Module, got {type(model).__name__}")
        monitor = monitor_of(unwrap(model))
        if monitor is None:
            return False
        monitor.remove()
        return True

    def __enter__(self) -> GradientMonitor:
        check_entered(self.attached)          # MonitorError: a removed monitor records nothing
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- recording ------------------------------------------------------------------------

    @property
    def forward_order(self) -> list[str]:
        """Parameter names in the order their modules first ran in a training forward pass
        (input side first); ``named_parameters()`` order until a forward pass was seen (or
        under torch.compile, where it is not watched)."""
        return self.parts["order"].names()

    def record(self, optimizer: torch.optim.Optimizer | None = None, *, skipped: bool = False) -> None:
        """Record the current gradients as one step: those of ``optimizer``'s parameters, or of
        every monitored parameter. Called for you at each optimizer step (``automatic=True``);
        call it yourself where your loop's gradient is final if it has no torch.optim optimizer,
        or with ``automatic=False``. ``skipped=True``: the step was not applied (an AMP overflow);
        it is counted as skipped with its non-finite values, not averaged into the statistics.
        It reads ``.grad`` as it is: under a ``GradScaler``, call ``scaler.unscale_(optimizer)``
        first (a fused optimizer unscales only inside its step, so its ``.grad`` is still scaled
        before it; the automatic recording divides the scale out there itself). Gradients this
        window recorded already (the same tensors, unmodified since: ``record()`` twice with no
        backward between, a wrapper's step and its inner optimizer's) are one step, not counted again.

        Raises:
            MonitorError: ``optimizer`` is neither None nor an optimizer (``param_groups``), or
                ``skipped`` is not a bool.
        """
        check_record(optimizer, skipped)
        mask = None if optimizer is None else self._masks.mask(optimizer)
        if optimizer is not None and mask is None:
            self._warnings.warn("foreign-optimizer", f"record({type(optimizer).__name__}): that optimizer holds "
                                "none of this monitor's parameters; nothing was recorded")
            return
        (self._skip if skipped else self._record)(mask)

    def _record(self, mask, unscale: torch.Tensor | None = None, inner: bool = False) -> None:
        """One applied step, part by part (a part returning False ends it: no gradient); then
        the schedule decides whether the next forward pass is profiled. ``inner``: an inner step
        of a running wrapper's step (steps.StepWatch)."""
        if torch.is_inference_mode_enabled():      # a step under inference_mode: buffers made here stay writable
            with torch.inference_mode(False):
                return self._record(mask, unscale, inner)
        self._setup.unscale, self._setup.inner_step = unscale, inner
        try:
            for part in self._recorders:
                done = part.record(mask)
                if done is False:
                    return
                if type(done) is tuple:  # a narrower mask: tensors replaced under the stepping optimizer (conversions)
                    mask = done
        finally:
            self._setup.unscale, self._setup.inner_step = None, False
        self._setup.schedule.step(mask)

    def _skip(self, mask) -> None:
        for part in self.parts.values():
            part.skip(mask)

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
        ``history[-1].overall``. LSTM/GRU weights are also split per gate in
        ``history[-1].gates`` (``gates.py``; TensorBoard ``grad/<param>/<gate>/norm``), and
        ``history[-1].kinds`` says what kind of module owns each parameter (``kinds.py``). With
        ``members`` K > 1, a list of K such dicts, one per member.

        A model converted after the monitor attached (``model.to(device)``, ``.double()``) is
        followed: the window's sums move with it and the window goes on (``conversions.py``).
        Layers added or removed (``add_param_group`` with a new layer's parameters, ``del
        model[2]``): the window's rows hold the parameters that stayed, a warning names the
        change, and the next window records the new set (``following.py``).

        Raises:
            MonitorError: ``step`` is not an int >= 0 (numpy and 0-d torch integers are taken; the
                window stays open), or the model's parameters were replaced by tensors of another
                shape, split over several devices or put on the meta device since the monitor attached;
                or a sink raised while the window was written (the window is closed and kept all the same).
        """
        step = check_step(step)
        self._follower.follow()
        reader = read_window(self.parts, self._read_back(), step, self.members)
        try:   # a sink that fails (MonitorError) still closes the window: the next holds only its own steps
            self._output.write(reader.scalars, reader.wanted, step, final=not self.attached, texts=reader.texts)
        finally:
            keep(self.history, reader.windows, self.history_length, self._layouts)
            self._start_window()
            if self._follower.relayout is not None:       # layers added or removed: the new set from now on
                self._relayout()
        return reader.windows[0].gradients if self.members == 1 else [w.gradients for w in reader.windows]

    def _relayout(self) -> None:
        """Rebuild the parts for the model's new set of layers, if still attached: a removed
        monitor stays removed (and a collected model has no layers to follow)."""
        layout, self._follower.relayout = self._follower.relayout, None
        model = self._model()
        if self.attached and model is not None:
            self._unhook()
            self._build(model, layout)

    def _read_back(self) -> dict[str, np.ndarray]:
        """Every part's device sums (``<part>/<key>``), folded and read back in one copy."""
        return read_parts(self.parts, self._sharding, self.parts["gradients"].recorded)

    def flush(self) -> None:
        """Write the histograms of windows still pooling (``histograms=N``: the windows since
        the last written histogram) at the step of the last of them. ``remove()`` calls it, so
        remove the monitor (or leave its ``with``) before closing the writer; call it yourself
        before saving a checkpoint, so that the event file holds every window the checkpoint
        does. Nothing to do with ``histograms=True`` or ``False``."""
        self._output.flush()

    def member_history(self, member: int) -> list[Window]:
        """The windows of member ``member`` (0 <= member < ``members``) of a batched model; with
        ``members`` == 1, member 0's windows are the whole history.

        Raises:
            MonitorError: ``member`` is not one of the monitor's members.
        """
        return member_windows(self.history, member, self.members)

    def _start_window(self) -> None:
        for part in self.parts.values():
            part.reset()
        if self._sharding is not None:
            self._sharding.reset()

    # -- keeping up with the model --------------------------------------------------------
