"""``GradflowCallback``: per-layer gradient statistics, histograms and a verdict for any Lightning fit.

Add one callback; it writes to the loggers the trainer already has:

    >>> from gradflow.integrations.lightning import GradflowCallback
    >>> trainer = lightning.Trainer(callbacks=[GradflowCallback()])        # doctest: +SKIP
    >>> trainer.fit(model)                                                 # doctest: +SKIP
    Verdict: healthy

Where it records. Lightning steps every optimizer with a closure (forward and backward run inside
``optimizer.step``), so an optimizer hook sees the previous step's gradient. The callback records in
``on_before_optimizer_step``, which Lightning calls after the closure: after gradient accumulation
(once per optimizer step, not per micro-batch), after DDP's all-reduce, unscaled under AMP
(``16-mixed``; not for fused optimizers that unscale inside ``step``), and before
``gradient_clip_val`` clips. The per-layer rows and ``grad/total_norm`` therefore describe the raw
gradient; where Lightning then clips, the monitor's watch of ``clip_grad_norm_`` (or, with
``gradient_clip_algorithm="value"``, ``clip_grad_value_``: the L2 norm before clamping, and a step
counts as clipped when a value was clamped) adds ``grad/total_norm_before_clip`` and
``grad/clipped_steps``. Manual optimization works the same way:
``optimizer.step()`` in ``training_step`` calls the same hook, so there the callback records after
whatever ``self.clip_gradients(...)`` the step did before ``optimizer.step()`` (the gradient applied),
and ``grad/total_norm_before_clip`` still gives the norm before it. With several optimizers each step
records only the parameters of the optimizer that steps.

What it writes, every ``log_every_n_steps`` optimizer steps (the trainer's own cadence unless
``every_n_steps`` is given), on global rank zero only. The monitor attaches on every rank and every
rank closes the same windows: under DDP their gradients are the same all-reduced ones; under
``ModelParallelStrategy`` or FSDP2 each rank holds shards, and closing a window reduces them with
collectives every rank joins (``gradflow.monitor.sharding``; docs/sharding.md):

=====================================  ===========================================================
key                                    value (each a mean over the window's optimizer steps)
=====================================  ===========================================================
``grad/LAYER/PARAM/mean_abs``          mean |g| over the parameter's elements
``grad/LAYER/PARAM/norm``              L2 norm of the parameter's gradient
``grad/LAYER/PARAM/max_abs``           largest |g|
``grad/LAYER/PARAM/mean``              mean g
``grad/LAYER/PARAM/zero_fraction``     share of exact zeros (over all steps' elements)
``grad/LAYER/PARAM/nonfinite``         count of NaN/inf elements (a sum, not a mean)
``grad/total_norm``                    L2 norm over all parameters, as ``clip_grad_norm_`` computes it
``grad/total_norm_before_clip``        the L2 norm before clipping (what ``clip_grad_norm_`` returned)
``grad/clipped_steps``                 steps whose norm exceeded the clip value
``grad/skipped_steps``                 steps the AMP GradScaler skipped on overflow
``weight/LAYER/PARAM/{l1,norm}``       weight norms at the window's end (``weights=True``)
``weight/LAYER/PARAM/update_ratio``    ||w_end - w_start|| / ||w_start|| over the window
``activation/MODULE/...``              saturation / dead-unit statistics (``activations=True``)
``grad/LAYER/PARAM`` (histogram)       gradient values; ``1_grad_log10/...``: log10 |g|
``weight/...``, ``activation/...``     histograms of weights and activation outputs
``diagnosis`` (text; TensorBoard), ``diagnosis/<verdict>`` (1.0 or 0.0; other loggers)  the verdict and its evidence, once, at fit end
=====================================  ===========================================================

``LAYER/PARAM`` is the parameter's name in the LightningModule with ``.`` -> ``/``. A
``TensorBoardLogger`` gets all of these (through its ``.experiment`` SummaryWriter); any other
logger gets the scalars through its ``log_metrics``. The window's step is the count of optimizer
steps so far (``trainer.global_step`` with one optimizer). At fit end the callback prints the
verdict's line, writes the verdict to the loggers and keeps it as ``callback.diagnosis``.
"""

from __future__ import annotations

from typing import Any

from gradflow.integrations import _common
from gradflow.monitor import GradientMonitor


def _framework() -> Any:
    """``lightning.pytorch``, else ``pytorch_lightning``, else a one-line error naming the extra."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = _common.require("pytorch_lightning", "lightning")
    return pl


_pl = _framework()


def is_tensorboard_logger(logger: Any) -> bool:
    """A Lightning ``TensorBoardLogger`` of either package (``lightning`` or ``pytorch_lightning``)."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def logger_writer(loggers: list[Any]) -> Any:
    """One writer for the monitor: each TensorBoardLogger's SummaryWriter, ``log_metrics`` of the rest."""
    from gradflow.monitor.sinks import ScalarSink, TeeSink

    writers = [logger.experiment if is_tensorboard_logger(logger) else ScalarSink(logger.log_metrics)
               for logger in loggers]
    if not writers:
        return None
    return TeeSink(*writers)


def write_diagnosis(diagnosis: Any, loggers: list[Any], step: int) -> None:
    """The verdict as TensorBoard text; ``diagnosis/<verdict>`` flags to other loggers."""
    api = _common.diagnosis_api()
    for logger in loggers:
        if is_tensorboard_logger(logger):
            api.write_to_tensorboard(diagnosis, logger.experiment, step)
            logger.experiment.flush()
        else:
            logger.log_metrics(api.verdict_scalars(diagnosis), step)


class GradflowCallback(_pl.Callback):
    """Records the gradient each optimizer step applies; writes windows and a verdict to the loggers.

    Args:
        every_n_steps: optimizer steps per window; None follows ``trainer.log_every_n_steps``.
        histograms: write value and log10 |g| histograms to TensorBoard: True at every window,
            an int N: each histogram sums N windows' counts (N times fewer histogram bytes;
            the last, partial one is written at the end), False: none.
        weights: also record weight norms, update ratios and weight histograms.
        activations: also tap activation modules (tanh, ReLU, ...) in training forward passes.
        nonfinite: find where the first NaN/inf came from (module, pass, step); the printed verdict
            names it (``GradientMonitor(nonfinite=True)``; off by default: see its cost there).
        verbose: print the verdict's line at fit end.

    Example:
        >>> callback = GradflowCallback(every_n_steps=50)
        >>> trainer = lightning.Trainer(callbacks=[callback], gradient_clip_val=1.0)   # doctest: +SKIP
        >>> trainer.fit(model); callback.diagnosis.verdicts                          # doctest: +SKIP
        ['healthy']
    """

    def __init__(self, every_n_steps: int | None = None, *, histograms: bool | int = True, weights: bool = True,
                 activations: bool = True, verbose: bool = True, nonfinite: bool = False) -> None:
        _common.check_positive_int("every_n_steps", every_n_steps)
        _common.check_histograms(histograms)
        for name, value in (("weights", weights), ("activations", activations),
                            ("verbose", verbose), ("nonfinite", nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.every_n_steps = every_n_steps
        self.histograms, self.weights, self.activations, self.verbose = histograms, weights, activations, verbose
        self.nonfinite = nonfinite
        self.monitor: GradientMonitor | None = None
        self.diagnosis: Any = None
        self.steps = 0              # optimizer steps recorded, over every fit (kept in checkpoints)
        self.windows = 0            # windows written
        self.losses: list[float] = []  # mean training loss of each window (what training_step returned)
        self._loss_sum, self._loss_count = None, 0
        self._logged_at = 0         # self.steps when the last window closed
        self._recording = False     # between attach and remove (on every rank)
        self._writes = False        # global rank zero: writes windows and the verdict
        self._loggers: list[Any] = []

    # -- life cycle -----------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Every rank attaches (a sharded model's windows close with collectives); rank zero writes.
        self.diagnosis = None
        self._logged_at = self.steps
        self._writes = trainer.is_global_zero
        self._loggers = list(trainer.loggers) if self._writes else []
        self.monitor = GradientMonitor(pl_module, logger_writer(self._loggers), automatic=False,
                                       histograms=self.histograms, weights=self.weights,
                                       activations=self.activations, nonfinite=self.nonfinite)
        self._recording = True
        self._loss_sum, self._loss_count = None, 0

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            return
        try:
            if self.steps > self._logged_at:
                self._write()
            self.diagnosis = _common.diagnose(self.monitor, self.losses)
            if self.diagnosis is not None and self._writes:
                if self.verbose:
                    print(f"gradflow: {self.diagnosis.line()}")
                write_diagnosis(self.diagnosis, self._loggers, self.steps)
        finally:
            self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove()

    def _remove(self) -> None:
        self._recording = False
        if self.monitor is not None:
            self.monitor.remove()
        self._loggers = []

    # -- recording ------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._recording:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        # Under 16-mixed the scaler has unscaled by now and decides on overflow right after this hook.
        skipped = _common.step_skipped(getattr(trainer.precision_plugin, "scaler", None), optimizer)
        self.monitor.record(optimizer=optimizer, skipped=skipped)
        self.steps += 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _common.loss_of(outputs)
        if self._recording and loss is not None:       # summed on the device: read once per window
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        # After the step is applied, so the window's weight update includes its last step.
        every = self.every_n_steps or trainer.log_every_n_steps    # 0: no logging but the last window
        if self._recording and every and self.steps // every > self._logged_at // every:
            self._write()

    def _write(self) -> None:
        if self._loss_count:
            self.losses.append(float(self._loss_sum) / self._loss_count)
            self._loss_sum, self._loss_count = None, 0
        self.monitor.log(self.steps)
        self._logged_at = self.steps
        self.windows += 1

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "windows": self.windows, "losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.windows = int(state_dict.get("windows", 0))
        self.losses = [float(v) for v in state_dict.get("losses", [])]
        self._logged_at = self.steps
