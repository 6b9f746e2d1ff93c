"""``GradflowTrainerCallback``: per-layer gradient statistics, histograms and a verdict for the
Hugging Face ``Trainer``.

    >>> from gradflow.integrations.transformers import GradflowTrainerCallback
    >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[GradflowTrainerCallback()])  # doctest: +SKIP
    >>> trainer.train()                                                                          # doctest: +SKIP
    gradflow: Verdict: healthy

The key table, where it records and where it writes: ``help(GradflowTrainerCallback)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from gradflow.integrations import _common
from gradflow.integrations.recorder import Recorder
from gradflow.monitor import MonitorError
from gradflow.monitor.model_checks import check_positive

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
        histogram_every: a parameter's gradient histogram holds every N-th of its steps with a
            gradient in a window, its first included (default 10; 1: every step;
            ``GradientMonitor(histogram_every=N)``); the scalars count every step.
        weights: also record weight norms, update ratios and weight histograms.
        activations: also tap activation modules (GELU, ReLU, tanh, ...) in training forward passes.
        nonfinite: find where the first NaN/inf came from (module, pass, step); the printed verdict
            names it (``GradientMonitor(nonfinite=True)``; off by default: see its cost there).
        verbose: print the verdict's line at the end of training.

    Raises:
        ValueError: an argument of the wrong type or range, at construction.
        MonitorError: a DeepSpeed run, at ``on_train_begin``.

    A thin adapter: the life cycle (attach, windows, losses, verdict, remove) is
    ``gradflow.integrations.recorder.Recorder``; this class maps the Trainer's hooks onto it.

    Where it records. The Trainer clips (``max_grad_norm``) and then calls ``on_pre_optimizer_step``
    right before ``optimizer.step()``; from there the callback records at the end of that step (a
    step post-hook; ``.grad`` still holds what the step applied, whatever another callback did to it
    in the same hook), once per optimizer step (so once per ``gradient_accumulation_steps``
    micro-batches), after DDP's all-reduce and AMP's unscaling.
    The per-layer rows and ``grad/total_norm`` therefore describe the gradient the optimizer applies,
    *after clipping*; each step's norm before clipping (the Trainer's ``grad_norm`` of that step) comes
    from the monitor's watch of torch's clipping (accelerate >= 1.10 clips through ``get_total_norm`` +
    ``clip_grads_with_norm_``; ``monitor/interception.py``), written as its mean over the window,
    ``grad/total_norm_before_clip`` (the Trainer logs the logging step's ``grad_norm`` alone), with
    ``grad/clipped_steps`` and ``grad/clip_calls``. With ``max_grad_norm=0`` the Trainer still
    computes ``grad_norm`` but clips nothing: those three keys are absent, and ``grad/total_norm`` is
    the window's mean ``grad_norm``.

    Where it writes, every ``logging_steps`` optimizer steps (or ``every_n_steps``), from the main
    process only (``state.is_world_process_zero``). Every process attaches a monitor and closes the same
    windows: a sharded (FSDP2) model's windows close with collectives every rank joins
    (docs/sharding.md). DeepSpeed is refused at ``on_train_begin`` (ZeRO keeps gradients outside
    ``p.grad`` and steps inside ``backward``):

    - ``report_to`` includes tensorboard (or ``log_dir`` is given): everything (scalars, histograms,
      the verdict as text) into the Trainer's TensorBoard directory (or ``log_dir``), so it shows in
      the same run. Passed in ``callbacks=[...]``, the callback is never handed the Trainer, so it
      computes that directory as the ``TensorBoardCallback`` does (``TENSORBOARD_LOGGING_DIR``, else
      ``output_dir/runs/<time>_<host>``, the time to the second: the directory named a second
      earlier when that one exists and the current one does not); added with
      ``callback.attach(trainer)``, it reads the directory from that callback. With neither (and
      no reporter reached) it writes nothing and warns once at ``on_train_begin``: the windows are in
      ``callback.monitor.history``, the verdict in ``callback.diagnosis``;
    - the Trainer's other reporting callbacks (wandb, mlflow, ...) get the scalars through their
      ``on_log``, at the Trainer's ``global_step``, when the callback was added with
      ``attach(trainer)`` (which gives it ``trainer.callback_handler.callbacks``). Passed in
      ``callbacks=[...]`` with such a reporter in ``report_to``, it warns that they get nothing.

    =====================================  ===========================================================
    key                                    value (a mean over the window's optimizer steps unless said)
    =====================================  ===========================================================
    ``grad/LAYER/PARAM/mean_abs``          mean |g| over the parameter's elements (after clipping)
    ``grad/LAYER/PARAM/norm``              L2 norm of the parameter's gradient
    ``grad/LAYER/PARAM/max_abs``           largest |g|
    ``grad/LAYER/PARAM/mean``              mean g
    ``grad/LAYER/PARAM/zero_fraction``     share of exact zeros (over all steps' elements)
    ``grad/LAYER/PARAM/nonfinite``         count of NaN/inf elements (a sum, not a mean)
    ``grad/LAYER/PARAM/relative``          the window's ``norm`` over the weight's norm at its end, ||g|| / ||w||
    ``grad/steps``                         optimizer steps recorded in the window (a count)
    ``grad/total_norm``                    L2 norm over all parameters of the applied gradient
    ``grad/total_norm_max``                the largest of the window's per-step ``total_norm``
    ``grad/total_norm_before_clip``        the mean over the window's steps of the norm the Trainer's
                                           clipping computed (its logged ``grad_norm`` is the logging
                                           step's alone, so the two differ over a window of 2+ steps)
    ``grad/clipped_steps``                 steps whose norm exceeded ``max_grad_norm`` (a count)
    ``grad/clip_calls``                    steps with a clipping call (a count)
    ``grad/skipped_steps``                 steps the AMP GradScaler skipped on overflow (a count)
    ``grad/idle_parameters``               parameters of the optimizer that got no gradient in any
                                           of the window's steps (a count)
    ``grad/idle_parameters/text_summary``  their names (text; TensorBoard), in a window that has any
    ``weight/LAYER/PARAM/{l1,norm}``       weight norms at the window's end (``weights=True``)
    ``weight/LAYER/PARAM/update_ratio``    ||w_end - w_start|| / ||w_start|| over the window
    ``activation/MODULE/...``              saturation / dead-unit statistics (``activations=True``)
    ``grad/LAYER/PARAM`` (histogram)       gradient values; ``1_grad_log10/...``: log10 |g| (TensorBoard)
    ``weight/...``, ``activation/...``     histograms of weights and activation outputs (TensorBoard)
    ``diagnosis/text_summary``             the verdict and its evidence (text; TensorBoard), once, at the
                                           end of training
    ``diagnosis/<verdict>``                1.0 or 0.0, at the end of training (other loggers)
    =====================================  ===========================================================

    The Trainer has no hook for a failed ``train()``: if training raises, the monitor stays attached
    until this callback's next ``on_train_begin`` or ``callback.remove()``.

    Example:
        >>> callback = GradflowTrainerCallback(every_n_steps=10)
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
        >>> callback.diagnosis.line()                                                 # doctest: +SKIP
        'Verdict: healthy'
        >>> trainer = Trainer(model, args, train_dataset=data)                       # doctest: +SKIP
        >>> GradflowTrainerCallback().attach(trainer)    # also reaches wandb, mlflow  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int | None = None, *, log_dir: str | os.PathLike | None = None,
                 histograms: bool | int = True, weights: bool = True, activations: bool = True,
                 verbose: bool = True, nonfinite: bool = False, histogram_every: int = 10) -> None:
        every_n_steps = check_positive("every_n_steps", every_n_steps, none=True, error=ValueError)
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
        self.recorder = Recorder(histograms=histograms, weights=weights, activations=activations,
                                 nonfinite=nonfinite, verbose=verbose, histogram_every=histogram_every)
        self.every_n_steps = every_n_steps
        self.log_dir = log_dir
        self.histograms, self.weights, self.activations, self.verbose = histograms, weights, activations, verbose
        self.nonfinite = nonfinite
        self.writer: Any = None          # our SummaryWriter, when writing to TensorBoard
        self._callbacks: list[Any] | None = None   # the Trainer's callback list, given by attach()
        self._reporters: list[Any] = []  # the Trainer's other reporting callbacks (scalars via on_log)
        self._context: tuple = ()        # the latest (args, state, control), for the reporters' on_log

    monitor = _common.recorder_attribute("monitor", "the GradientMonitor of the latest train() (None before one)")
    diagnosis = _common.recorder_attribute("diagnosis", "the verdict of the latest train() (None without a window)")
    losses = _common.recorder_attribute("losses", "the Trainer's logged training loss, one per logging step")

    def attach(self, trainer: Any) -> GradflowTrainerCallback:
        """Add this callback to ``trainer`` (unless it already has it) and keep the Trainer's
        callback list (``trainer.callback_handler.callbacks``), so that at ``on_train_begin`` it finds
        the ``TensorBoardCallback``'s directory and the other reporters. Returns the callback.

        Raises:
            MonitorError: ``trainer`` has no ``callback_handler`` (not a transformers Trainer).
        """
        handler = getattr(trainer, "callback_handler", None)
        if not isinstance(getattr(handler, "callbacks", None), list):
            raise MonitorError(f"GradflowTrainerCallback.attach needs a transformers Trainer (one with "
                               f"callback_handler.callbacks), got {type(trainer).__name__}")
        if self not in handler.callbacks:
            trainer.add_callback(self)
        self._callbacks = handler.callbacks
        return self

    # -- handed to a Lightning Trainer: Lightning's first callback hook is ``setup`` (its ``_run``
    # calls it before any other); on the error, it calls ``on_exception`` on every callback, which
    # must exist so that this TypeError, not an AttributeError, is what the user sees (as must
    # ``state_key``, which it names each hook call by).

    state_key = "GradflowTrainerCallback"

    def setup(self, trainer: Any, pl_module: Any = None, stage: str | None = None) -> None:
        """Lightning's first hook: a Lightning Trainer was given this callback. Raises TypeError."""
        raise TypeError(_WRONG_FRAMEWORK)

    def on_exception(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's hook on a failed fit: nothing to do (keeps ``setup``'s TypeError visible)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.remove()                    # a previous train() that raised left its monitor attached
        if getattr(args, "deepspeed", None) or getattr(getattr(args, "accelerator_config", None), "deepspeed_plugin", None):
            raise MonitorError("GradflowTrainerCallback cannot monitor a DeepSpeed run: ZeRO keeps gradients in "
                               "partitioned buffers outside p.grad and steps inside backward(); use FSDP2 "
                               "(fsdp=... with fsdp_version 2) or DDP")
        self._context = (args, state, control)
        writes = state.is_world_process_zero         # every process attaches; the main one writes
        if writes:
            self._find_outputs(args)
        self.recorder.losses = []                    # per train(): the Trainer restarts its loss log
        self.recorder.start(model, writes=writes, step=state.global_step,
                            tensorboards=[self.writer] if self.writer is not None else [],
                            reports=[self._report] if self._reporters else [])

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        # accelerate's AcceleratedOptimizer holds the fp16 scaler, which has unscaled by now
        # (the Trainer computes grad_norm through accelerator.clip_grad_norm_ every step).
        # Recorded at the end of the step: a callback after this one may still change the gradient.
        self.recorder.record_at_step(optimizer, getattr(optimizer, "scaler", None))

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.recorder.recording and logs and isinstance(logs.get("loss"), (int, float)):
            self.recorder.losses.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._context = (args, state, control)
        # After the step is applied (and global_step counted), so the window's update includes it.
        if self.recorder.due(state.global_step, self.every_n_steps or _logging_steps(args, state)):
            self.recorder.write(state.global_step)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._context = (args, state, control)
        try:
            self.recorder.finish(state.global_step)
        finally:
            self.remove()

    def remove(self) -> None:
        """Detach the monitor and close the writer (done for you at the end of training)."""
        self.recorder.remove()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._reporters = []

    # -- where values go --------------------------------------------------------------------

    def _find_outputs(self, args: Any) -> None:
        """The SummaryWriter (``self.writer``) and the reporters, from ``attach``'s callback list
        or, without it, from ``args.report_to`` (saying out loud which reporters it cannot reach)."""
        report_to = list(args.report_to or [])
        callbacks = list(self._callbacks or [])
        tensorboard = [cb for cb in callbacks if type(cb).__name__ == "TensorBoardCallback"]
        if self.log_dir is not None or tensorboard or (self._callbacks is None and "tensorboard" in report_to):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir or _tensorboard_dir(args, tensorboard)))
        self._reporters = [cb for cb in callbacks if _is_reporter(cb) and not (self.writer and cb in tensorboard)]
        unreached = [name for name in report_to if name not in ("tensorboard", "none")]
        if self._callbacks is None and unreached:
            warnings.warn(f"GradflowTrainerCallback in callbacks=[...] cannot reach the Trainer's {unreached} "
                          "reporters (a TrainerCallback is never handed the Trainer); add it with "
                          "GradflowTrainerCallback(...).attach(trainer) to send them its scalars", stacklevel=2)
        elif self.writer is None and not self._reporters:
            verdict = "printed at the end and kept" if self.verbose else "kept"
            warnings.warn(f"GradflowTrainerCallback writes no TensorBoard events: the Trainer reports to "
                          f"{report_to or 'nothing'} (transformers 5's default is report_to=[]) and no log_dir= "
                          f"was given; its windows are in callback.monitor.history and the verdict is {verdict} "
                          "as callback.diagnosis; for events pass TrainingArguments(report_to=\"tensorboard\") or "
                          "GradflowTrainerCallback(log_dir=...)", stacklevel=2)

    def _report(self, scalars: dict[str, float], step: int) -> None:
        """Scalars to the Trainer's reporters, as the Trainer logs (they log at ``state.global_step``)."""
        args, state, control = self._context
        for reporter in self._reporters:
            reporter.on_log(args, state, control, logs=dict(scalars))


_WRONG_FRAMEWORK = ("GradflowTrainerCallback is for the Hugging Face Trainer; a Lightning Trainer takes "
                    "GradflowCallback (from gradflow.integrations.lightning import GradflowCallback)")


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
    return _default_tensorboard_dir(args.output_dir)


def _default_tensorboard_dir(output_dir: str) -> str:
    """``output_dir/runs/<time>_<host>`` (transformers' ``default_logdir``, to the second). The
    ``TensorBoardCallback`` made its directory in its ``on_train_begin``, just before ours: if the
    clock's second turned in between, that directory is the one named a second earlier."""
    import socket
    from datetime import datetime, timedelta

    from transformers.integrations.integration_utils import default_logdir

    now = os.path.join(output_dir, default_logdir())
    before = (datetime.now() - timedelta(seconds=1)).strftime("%b%d_%H-%M-%S")
    earlier = os.path.join(output_dir, "runs", f"{before}_{socket.gethostname()}")
    return earlier if not os.path.isdir(now) and os.path.isdir(earlier) else now


def _logging_steps(args: Any, state: Any) -> int:
    """``args.logging_steps`` as a step count (a float below 1 is a share of ``max_steps``)."""
    steps = state.logging_steps or args.logging_steps
    if isinstance(steps, float) and steps < 1:
        steps = steps * max(state.max_steps, 1)
    return max(int(round(steps)), 1)
