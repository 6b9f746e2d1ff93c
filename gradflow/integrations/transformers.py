"""``GradflowTrainerCallback``: per-layer gradient statistics, histograms and a verdict for the
Hugging Face ``Trainer``.

    >>> from gradflow.integrations.transformers import GradflowTrainerCallback
    >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[GradflowTrainerCallback()])  # doctest: +SKIP
    >>> trainer.train()                                                                          # doctest: +SKIP
    gradflow: Verdict: healthy

Where it records. The Trainer clips (``max_grad_norm``) and then calls ``on_pre_optimizer_step``
right before ``optimizer.step()``; the callback records there, once per optimizer step (so once
per ``gradient_accumulation_steps`` micro-batches), after DDP's all-reduce and AMP's unscaling.
The per-layer rows and ``grad/total_norm`` therefore describe the gradient the optimizer applies,
*after clipping*; the norm before clipping, the one the Trainer logs as ``grad_norm``, comes from
the monitor's watch of torch's clipping (accelerate >= 1.10 clips through ``get_total_norm`` +
``clip_grads_with_norm_``; ``monitor/interception.py``) as ``grad/total_norm_before_clip``, with
``grad/clipped_steps``.

Where it writes, every ``logging_steps`` optimizer steps (or ``every_n_steps``), from the main
process only (``state.is_world_process_zero``). Every process attaches a monitor and closes the same
windows: a sharded (FSDP2) model's windows close with collectives every rank joins
(docs/sharding.md). DeepSpeed is refused at ``on_train_begin`` (ZeRO keeps gradients outside
``p.grad`` and steps inside ``backward``):

- ``report_to`` includes tensorboard: everything (scalars, histograms, the verdict as text) into
  the same directory as the Trainer's ``TensorBoardCallback``, so it shows in the same run;
- otherwise: the scalars go to the Trainer's other reporting callbacks (wandb, mlflow, ...) through
  their ``on_log``, at the Trainer's ``global_step``.

=====================================  ===========================================================
key                                    value (each a mean over the window's optimizer steps)
=====================================  ===========================================================
``grad/LAYER/PARAM/mean_abs``          mean |g| over the parameter's elements (after clipping)
``grad/LAYER/PARAM/norm``              L2 norm of the parameter's gradient
``grad/LAYER/PARAM/max_abs``           largest |g|
``grad/LAYER/PARAM/mean``              mean g
``grad/LAYER/PARAM/zero_fraction``     share of exact zeros (over all steps' elements)
``grad/LAYER/PARAM/nonfinite``         count of NaN/inf elements (a sum, not a mean)
``grad/total_norm``                    L2 norm over all parameters of the applied gradient
``grad/total_norm_before_clip``        the Trainer's ``grad_norm`` (the norm its clipping computed)
``grad/clipped_steps``                 steps whose norm exceeded ``max_grad_norm``
``grad/skipped_steps``                 steps the AMP GradScaler skipped on overflow
``weight/LAYER/PARAM/{l1,norm}``       weight norms at the window's end (``weights=True``)
``weight/LAYER/PARAM/update_ratio``    ||w_end - w_start|| / ||w_start|| over the window
``activation/MODULE/...``              saturation / dead-unit statistics (``activations=True``)
``grad/LAYER/PARAM`` (histogram)       gradient values; ``1_grad_log10/...``: log10 |g| (TensorBoard)
``diagnosis`` (text; TensorBoard)      the verdict and its evidence, once, at the end of training
``diagnosis/<verdict>``                1.0 or 0.0, at the end of training (other loggers)
=====================================  ===========================================================

The Trainer has no hook for a failed ``train()``: if training raises, the monitor stays attached
until this callback's next ``on_train_begin`` or ``callback.remove()``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gradflow.integrations import _common
from gradflow.monitor import GradientMonitor, MonitorError

_tf = _common.require("transformers", "transformers")
_common.require("accelerate", "transformers")


class GradflowTrainerCallback(_tf.TrainerCallback):
    """Records the gradient each optimizer step applies; writes windows and a verdict.

    Args:
        every_n_steps: optimizer steps per window; None follows ``args.logging_steps``.
        log_dir: write TensorBoard events here instead of the Trainer's TensorBoard directory.
        histograms: write value and log10 |g| histograms to TensorBoard: True at every window,
            an int N: each histogram sums N windows' counts (N times fewer histogram bytes;
            the last, partial one is written at the end), False: none.
        weights: also record weight norms, update ratios and weight histograms.
        activations: also tap activation modules (GELU, ReLU, tanh, ...) in training forward passes.
        nonfinite: find where the first NaN/inf came from (module, pass, step); the printed verdict
            names it (``GradientMonitor(nonfinite=True)``; off by default: see its cost there).
        verbose: print the verdict's line at the end of training.

    Example:
        >>> callback = GradflowTrainerCallback(every_n_steps=10)
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
        >>> callback.diagnosis.line()                                                 # doctest: +SKIP
        'Verdict: healthy'
    """

    def __init__(self, every_n_steps: int | None = None, *, log_dir: str | os.PathLike | None = None,
                 histograms: bool | int = True, weights: bool = True, activations: bool = True,
                 verbose: bool = True, nonfinite: bool = False) -> None:
        _common.check_positive_int("every_n_steps", every_n_steps)
        _common.check_histograms(histograms)
        for name, value in (("weights", weights), ("activations", activations),
                            ("verbose", verbose), ("nonfinite", nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
        self.every_n_steps = every_n_steps
        self.log_dir = log_dir
        self.histograms, self.weights, self.activations, self.verbose = histograms, weights, activations, verbose
        self.nonfinite = nonfinite
        self.losses: list[float] = []
        self.monitor: GradientMonitor | None = None
        self.diagnosis: Any = None
        self._recording = False          # between attach and remove
        self._writes = False             # the world's process zero: writes windows and the verdict
        self.writer: Any = None          # our SummaryWriter, when writing to TensorBoard
        self._reporters: list[Any] = []  # the Trainer's other reporting callbacks (scalars via on_log)
        self._logged_at = 0
        self._context: tuple = ()        # the latest (args, state, control), for the reporters' on_log

    # -- life cycle -----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.remove()                    # a previous train() that raised left its monitor attached
        self.diagnosis = None
        self.losses: list[float] = []    # the Trainer's logged training loss, one per logging step
        self._logged_at = state.global_step
        if getattr(args, "deepspeed", None) or getattr(getattr(args, "accelerator_config", None), "deepspeed_plugin", None):
            raise MonitorError("GradflowTrainerCallback cannot monitor a DeepSpeed run: ZeRO keeps gradients in "
                               "partitioned buffers outside p.grad and steps inside backward(); use FSDP2 "
                               "(fsdp=... with fsdp_version 2) or DDP")
        self._writes = state.is_world_process_zero
        if not self._writes:             # every process attaches (sharded windows close together); rank 0 writes
            self.monitor = GradientMonitor(model, None, automatic=False, histograms=self.histograms,
                                           weights=self.weights, activations=self.activations)
            self._recording = True
            return
        callbacks = _trainer_callbacks(self)
        tensorboard = [cb for cb in callbacks if type(cb).__name__ == "TensorBoardCallback"]
        wants_tensorboard = self.log_dir is not None or tensorboard or (not callbacks and "tensorboard" in (args.report_to or []))
        if wants_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir or _tensorboard_dir(args, tensorboard)))
        self._reporters = [cb for cb in callbacks if _is_reporter(cb) and not (self.writer and cb in tensorboard)]
        self._context = (args, state, control)
        sink = self._sink()
        self.monitor = GradientMonitor(model, sink, automatic=False, histograms=self.histograms,
                                       weights=self.weights, activations=self.activations,
                                       nonfinite=self.nonfinite)
        self._recording = True

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.monitor is None:
            return
        self._context = (args, state, control)
        try:
            if state.global_step > self._logged_at:
                self._write(state.global_step)
            self.diagnosis = _common.diagnose(self.monitor, self.losses)
            if self.diagnosis is not None and self._writes:
                if self.verbose:
                    print(f"gradflow: {self.diagnosis.line()}")
                self._write_diagnosis(state.global_step)
        finally:
            self.remove()

    def remove(self) -> None:
        """Detach the monitor and close the writer (done for you at the end of training)."""
        self._recording = False
        if self.monitor is not None:
            self.monitor.remove()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._reporters = []

    # -- recording ------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        if self._recording:
            # accelerate's AcceleratedOptimizer holds the fp16 scaler, which has unscaled by now
            # (the Trainer computes grad_norm through accelerator.clip_grad_norm_ every step).
            skipped = _common.step_skipped(getattr(optimizer, "scaler", None), getattr(optimizer, "optimizer", optimizer))
            self.monitor.record(optimizer=getattr(optimizer, "optimizer", optimizer), skipped=skipped)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self._recording and logs and isinstance(logs.get("loss"), (int, float)):
            self.losses.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._context = (args, state, control)
        # After the step is applied (and global_step counted), so the window's update includes it.
        every = self.every_n_steps or _logging_steps(args, state)
        if self._recording and state.global_step // every > self._logged_at // every:
            self._write(state.global_step)

    def _write(self, step: int) -> None:
        self.monitor.log(step)
        self._logged_at = step

    # -- where values go --------------------------------------------------------------------

    def _sink(self) -> Any:
        from gradflow.monitor.sinks import ScalarSink, TeeSink

        writers = [self.writer] if self.writer is not None else []
        if self._reporters:
            writers.append(ScalarSink(self._report))
        return TeeSink(*writers) if writers else None

    def _report(self, scalars: dict[str, float], step: int) -> None:
        """Scalars to the Trainer's reporters, as the Trainer logs (they log at ``state.global_step``)."""
        args, state, control = self._context
        for reporter in self._reporters:
            reporter.on_log(args, state, control, logs=dict(scalars))

    def _write_diagnosis(self, step: int) -> None:
        api = _common.diagnosis_api()
        if self.writer is not None:
            api.write_to_tensorboard(self.diagnosis, self.writer, step)
            self.writer.flush()
        if self._reporters:
            self._report(api.verdict_scalars(self.diagnosis), step)


def _trainer_callbacks(callback: Any) -> list[Any]:
    """The Trainer's callbacks, read from the ``CallbackHandler`` that is calling ``callback``.

    A ``TrainerCallback`` is never handed the Trainer, yet needs two of its callbacks: the
    ``TensorBoardCallback`` (whose ``logging_dir`` is where the run's events go) and the other
    reporters (to pass scalars on). The handler is the caller of this hook (``call_event``), one
    or two frames up; if it is not found, the result is empty and the callback falls back on
    ``args.report_to`` and TensorBoard's default directory.
    """
    frame = sys._getframe(1)
    for _ in range(4):
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, _tf.trainer_callback.CallbackHandler) and callback in handler.callbacks:
            return list(handler.callbacks)
        frame = frame.f_back
    return []


def _is_reporter(callback: Any) -> bool:
    """One of the Trainer's ``report_to`` callbacks (TensorBoard, wandb, mlflow, ...)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return isinstance(callback, tuple(INTEGRATION_TO_CALLBACK.values()))


def _tensorboard_dir(args: Any, tensorboard: list[Any]) -> str:
    """The Trainer's TensorBoard directory: its TensorBoardCallback's (``logging_dir`` in
    transformers 5, its writer's ``log_dir`` in 4.x), else where that callback would put it
    (``args.logging_dir`` in 4.x; ``TENSORBOARD_LOGGING_DIR``, else ``output_dir/runs/<time>_<host>``)."""
    for cb in tensorboard:
        for where in (getattr(cb, "logging_dir", None), getattr(getattr(cb, "tb_writer", None), "log_dir", None)):
            if where:
                return where
    if getattr(args, "logging_dir", None):
        return args.logging_dir
    if os.getenv("TENSORBOARD_LOGGING_DIR"):
        return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(args.output_dir, default_logdir())


def _logging_steps(args: Any, state: Any) -> int:
    """``args.logging_steps`` as a step count (a float below 1 is a share of ``max_steps``)."""
    steps = state.logging_steps or args.logging_steps
    if isinstance(steps, float) and steps < 1:
        steps = steps * max(state.max_steps, 1)
    return max(int(round(steps)), 1)
