"""``Recorder``: the life cycle both framework callbacks share, with no framework import.

Each callback (``lightning.GradflowCallback``, ``transformers.GradflowTrainerCallback``) is a thin
adapter that maps its framework's hooks onto these calls, the split Lightning itself uses for its
spike detection (``fabric/utilities/spike.py`` under ``pytorch/callbacks/spike.py``):

==============================  ==============================================================
call                            when the adapter makes it
==============================  ==============================================================
``start(model, ...)``           training begins; on every rank, ``writes=True`` on rank zero only
``record(optimizer, scaler)``   once per optimizer step, after the gradient is final
``record_at_step(opt, scaler)``  in a hook that comes before the step's last change to the gradient
                                (Lightning clips after its hook; a Trainer callback after ours may
                                change it): recorded at the end of the step
``add_loss(loss)``              a training step's loss (a 1-element tensor or a float)
``due(step, every)`` + ``write``  after the step is applied; a window every ``every`` steps
``finish(step)``                training ends: the last window, the verdict printed and written
``remove()``                    training ends or fails: detach the monitor (idempotent)
==============================  ==============================================================
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from gradflow.integrations import _common
from gradflow.monitor import GradientMonitor
from gradflow.monitor.histograms import check_every
from gradflow.monitor.model_checks import check_positive
from gradflow.monitor.steps import outside_compile

Report = Callable[[dict[str, float], int], Any]   # fn(scalars, step), a logger's log_metrics


class Recorder:
    """One monitor per training run: attach, windows, losses, the verdict, remove.

    Args:
        histograms: True (every window), False, or an int N >= 1 (each histogram sums N windows).
        histogram_every, weights, activations, nonfinite: passed to ``GradientMonitor``.
        verbose: print the verdict's line at the end (rank zero only).

    Raises:
        ValueError: an argument of the wrong type, naming it and the accepted forms.

    Attributes: ``monitor`` (None before ``start``), ``diagnosis`` (None until ``finish`` found a
    window), ``losses`` (one mean per window from ``add_loss``; an adapter may append the
    framework's own logged loss instead), ``steps`` (optimizer steps recorded over every run),
    ``windows`` (windows written), ``logged_at`` (the step of the last window).
    """

    def __init__(self, *, histograms: bool | int = True, weights: bool = True, activations: bool = True,
                 nonfinite: bool = False, verbose: bool = True, histogram_every: int = 10) -> None:
        check_every(histograms, error=ValueError)   # as for the callbacks' other arguments
        histogram_every = check_positive("histogram_every", histogram_every, "1: every step", error=ValueError)
        for name, value in (("weights", weights), ("activations", activations),
                            ("verbose", verbose), ("nonfinite", nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.options = dict(histograms=histograms, weights=weights, activations=activations, nonfinite=nonfinite,
                            histogram_every=histogram_every)
        self.verbose = verbose
        self.monitor: GradientMonitor | None = None
        self.diagnosis: Any = None
        self.losses: list[float] = []
        self.steps = 0
        self.windows = 0
        self.logged_at = 0
        self.recording = False      # between start and remove (on every rank)
        self.writes = False         # rank zero: writes windows and the verdict
        self._tensorboards: list[Any] = []
        self._reports: list[Report] = []
        self._loss_sum: Any = None
        self._loss_count = 0
        self._step_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # optimizer -> post-hook handle
        self._armed: weakref.WeakSet = weakref.WeakSet()     # optimizers whose running step records at its end

    def start(self, model: Any, *, writes: bool, step: int, tensorboards: list[Any] = (),
              reports: list[Report] = ()) -> None:
        """Attach a monitor to ``model`` (every rank: a sharded model's windows close with
        collectives). Where ``writes``: windows go to each SummaryWriter in ``tensorboards``
        (everything) and each ``fn(scalars, step)`` in ``reports`` (scalars only). ``step``: the
        step count now (a window closes when ``due`` says the count crossed a multiple)."""
        self.remove()                          # a run that raised without a remove left one attached
        self.diagnosis = None
        self.logged_at = step
        self.writes = writes
        self._tensorboards = list(tensorboards) if writes else []
        self._reports = list(reports) if writes else []
        self._loss_sum, self._loss_count = None, 0
        sink = self._sink()
        self.monitor = GradientMonitor(model, sink, automatic=False, **self.options)
        self.recording = True

    def _sink(self) -> Any:
        from gradflow.monitor.sinks import ScalarSink, TeeSink

        writers = [*self._tensorboards, *(ScalarSink(report) for report in self._reports)]
        return TeeSink(*writers) if writers else None

    def record(self, optimizer: Any, scaler: Any = None) -> None:
        """Record the gradient ``optimizer`` is about to apply (a framework's wrapper is unwrapped
        through ``.optimizer``); ``scaler``: an AMP GradScaler that has unscaled by now (a step it
        skips on overflow counts in ``grad/skipped_steps``). Nothing before ``start``."""
        if not self.recording:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.monitor.record(optimizer=optimizer, skipped=_common.step_skipped(scaler, optimizer))
        self.steps += 1

    def record_at_step(self, optimizer: Any, scaler: Any = None) -> None:
        """Record the gradient ``optimizer``'s running step applies, where a framework's hook comes
        before the step's last change to it (Lightning's ``on_before_optimizer_step`` precedes its
        ``gradient_clip_val`` clipping): at the end of that step (a step post-hook; ``.grad`` still
        holds what the step applied), once however often the hook ran in the step (LBFGS evaluates
        its closure several times: the last evaluation's gradient). A step that the AMP ``scaler``
        skips (it found inf/NaN after unscaling) runs no step hook: recorded as skipped at once; an
        optimizer that is not a ``torch.optim.Optimizer`` (no step hooks) is recorded at once."""
        if not self.recording:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if not hasattr(optimizer, "register_step_post_hook"):   # not a torch Optimizer: no step hooks
            self.record(optimizer, scaler)
            return
        if _common.step_skipped(scaler, optimizer):
            self.monitor.record(optimizer=optimizer, skipped=True)
            self.steps += 1
            return
        self._armed.add(optimizer)
        if optimizer not in self._step_hooks:      # torch runs a post-hook added during the step at its end
            self._step_hooks[optimizer] = optimizer.register_step_post_hook(outside_compile(self._after_step))

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer in self._armed:
            self._armed.discard(optimizer)
            self.record(optimizer)

    def add_loss(self, loss: Any) -> None:
        """A training step's loss, summed where it lives (a device tensor is read once per window)."""
        if self.recording and loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1

    def due(self, step: int, every: int | None) -> bool:
        """Whether ``step`` crossed a multiple of ``every`` since the last window (0/None: never)."""
        return bool(self.recording and every and step // every > self.logged_at // every)

    def write(self, step: int) -> None:
        """Close a window at ``step``: the mean loss since the last one, the monitor's scalars."""
        if self._loss_count:
            self.losses.append(float(self._loss_sum) / self._loss_count)
            self._loss_sum, self._loss_count = None, 0
        self.monitor.log(step)
        self.logged_at = step
        self.windows += 1

    def finish(self, step: int) -> None:
        """The last (partial) window, the verdict (kept in ``diagnosis``; printed and written on
        rank zero: text to TensorBoard, ``diagnosis/<verdict>`` flags to ``reports``), then remove."""
        if self.monitor is None:
            return
        try:
            if self.recording and step > self.logged_at:
                self.write(step)
            self.diagnosis = _common.diagnose(self.monitor, self.losses)
            if self.diagnosis is not None and self.writes:
                if self.verbose:
                    print(f"gradflow: {self.diagnosis.line()}")
                self._write_diagnosis(step)
        finally:
            self.remove()

    def _write_diagnosis(self, step: int) -> None:
        api = _common.diagnosis_api()
        for writer in self._tensorboards:
            api.write_to_tensorboard(self.diagnosis, writer, step)
            writer.flush()
        for report in self._reports:
            report(api.verdict_scalars(self.diagnosis), step)

    def remove(self) -> None:
        """Detach the monitor (safe to call more than once)."""
        self.recording = False
        if self.monitor is not None:
            self.monitor.remove()
        self._tensorboards, self._reports = [], []
        hooks, self._step_hooks = list(self._step_hooks.values()), weakref.WeakKeyDictionary()
        for handle in hooks:
            handle.remove()
        self._armed = weakref.WeakSet()
