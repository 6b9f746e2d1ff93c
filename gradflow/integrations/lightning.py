"""``GradflowCallback``: per-layer gradient statistics, histograms and a verdict for any Lightning fit.

Add one callback; it writes to the loggers the trainer already has:

    >>> from gradflow.integrations.lightning import GradflowCallback
    >>> trainer = lightning.Trainer(callbacks=[GradflowCallback()])        # doctest: +SKIP
    >>> trainer.fit(model)                                                 # doctest: +SKIP
    Verdict: healthy

The key table, and where it records: ``help(GradflowCallback)``.
"""

from __future__ import annotations

from typing import Any

from gradflow.integrations import _common
from gradflow.integrations.recorder import Recorder
from gradflow.monitor.model_checks import check_positive


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


_WRONG_FRAMEWORK = ("GradflowCallback is for Lightning; a Hugging Face Trainer takes GradflowTrainerCallback "
                    "(from gradflow.integrations.transformers import GradflowTrainerCallback)")


def _returned_loss(trainer: Any, pl_module: Any, outputs: Any) -> Any:
    """The loss ``training_step`` returned, else None. Under automatic optimization Lightning hands
    ``on_train_batch_end`` that loss divided by ``accumulate_grad_batches`` (the value it used, which a
    ``GradientAccumulationScheduler`` may change between epochs): multiplied back."""
    loss = _common.loss_of(outputs)
    if loss is not None and pl_module.automatic_optimization:
        loss = loss * trainer.accumulate_grad_batches
    return loss


class GradflowCallback(_pl.Callback):
    """Records the gradient each optimizer step applies; writes windows and a verdict to the loggers.

    Args:
        every_n_steps: optimizer steps per window; None follows ``trainer.log_every_n_steps``.
        histograms: write value and log10 |g| histograms to TensorBoard: True at every window,
            an int N: each histogram sums N windows' counts (N times fewer histogram bytes;
            the last, partial one is written at the end), False: none.
        histogram_every: a parameter's gradient histogram holds every N-th of its steps with a
            gradient in a window, its first included (default 10; 1: every step;
            ``GradientMonitor(histogram_every=N)``); the scalars count every step.
        weights: also record weight norms, update ratios and weight histograms.
        activations: also tap activation modules (tanh, ReLU, ...) in training forward passes.
        nonfinite: find where the first NaN/inf came from (module, pass, step); the printed verdict
            names it (``GradientMonitor(nonfinite=True)``; off by default: see its cost there).
        verbose: print the verdict's line at fit end.

    Raises:
        ValueError: an argument of the wrong type or range, at construction.

    A thin adapter: the life cycle (attach, windows, losses, verdict, remove) is
    ``gradflow.integrations.recorder.Recorder``; this class maps Lightning's hooks onto it.

    Where it records. Lightning calls ``on_before_optimizer_step`` after the closure's backward
    (after gradient accumulation, after DDP's all-reduce, unscaled under AMP ``16-mixed``; not for
    fused optimizers that unscale inside ``step``) but before ``gradient_clip_val`` clips, and once
    per closure evaluation (LBFGS evaluates several per step). The callback records the gradient the
    step applies, once per optimizer step: from that hook it arms a post-hook on the optimizer and
    records at the end of the step, where ``.grad`` still holds what the step applied (clipped); a
    step that the AMP GradScaler skips on overflow runs no step hook and is recorded as skipped at
    once (``Recorder.record_at_step``). The per-layer rows and ``grad/total_norm`` therefore describe
    the applied, clipped gradient; the monitor's watch of ``clip_grad_norm_`` (or, with
    ``gradient_clip_algorithm="value"``, ``clip_grad_value_``: the L2 norm before clamping, and a step
    counts as clipped when a value was clamped) adds ``grad/total_norm_before_clip`` and
    ``grad/clipped_steps``. Manual optimization works the same way: ``optimizer.step()`` in
    ``training_step`` calls the same hook, after whatever ``self.clip_gradients(...)`` the step did
    (with several optimizers each one's clipped step counts in ``grad/clipped_steps``).
    With several optimizers each step records only the parameters of the optimizer that steps.

    What it writes, every ``log_every_n_steps`` optimizer steps (the trainer's own cadence unless
    ``every_n_steps`` is given), on global rank zero only. The monitor attaches on every rank and every
    rank closes the same windows: under DDP their gradients are the same all-reduced ones; under
    ``ModelParallelStrategy`` or FSDP2 each rank holds shards, and closing a window reduces them with
    collectives every rank joins (``gradflow.monitor.sharding``; docs/sharding.md):

    =====================================  ===========================================================
    key                                    value (a mean over the window's optimizer steps unless said)
    =====================================  ===========================================================
    ``grad/LAYER/PARAM/mean_abs``          mean |g| over the parameter's elements
    ``grad/LAYER/PARAM/norm``              L2 norm of the parameter's gradient
    ``grad/LAYER/PARAM/max_abs``           largest |g|
    ``grad/LAYER/PARAM/mean``              mean g
    ``grad/LAYER/PARAM/zero_fraction``     share of exact zeros (over all steps' elements)
    ``grad/LAYER/PARAM/nonfinite``         count of NaN/inf elements (a sum, not a mean)
    ``grad/LAYER/PARAM/relative``          the window's ``norm`` over the weight's norm at its end, ||g|| / ||w||
    ``grad/steps``                         optimizer steps recorded in the window (a count)
    ``grad/total_norm``                    L2 norm over all parameters of the applied (clipped) gradient
    ``grad/total_norm_max``                the largest of the window's per-step ``total_norm``
    ``grad/total_norm_before_clip``        the L2 norm before clipping (by norm or value), mean over
                                           the window's steps with a clipping call (clipped or not)
    ``grad/clipped_steps``                 steps whose clipping changed the gradient (a count)
    ``grad/clip_calls``                    steps with a clipping call, however many calls each (a count)
    ``grad/skipped_steps``                 steps the AMP GradScaler skipped on overflow (a count)
    ``grad/idle_parameters``               parameters of a stepping optimizer that got no gradient in
                                           any of the window's steps (a count)
    ``grad/idle_parameters/text_summary``  their names (text; TensorBoard), in a window that has any
    ``weight/LAYER/PARAM/{l1,norm}``       weight norms at the window's end (``weights=True``)
    ``weight/LAYER/PARAM/update_ratio``    ||w_end - w_start|| / ||w_start|| over the window
    ``activation/MODULE/...``              saturation / dead-unit statistics (``activations=True``)
    ``grad/LAYER/PARAM`` (histogram)       gradient values; ``1_grad_log10/...``: log10 |g|
    ``weight/...``, ``activation/...``     histograms of weights and activation outputs
    ``diagnosis/text_summary``             the verdict and its evidence (text; TensorBoard), once, at fit end
    ``diagnosis/<verdict>``                1.0 or 0.0, once, at fit end (other loggers)
    =====================================  ===========================================================

    ``LAYER/PARAM`` is the parameter's name in the LightningModule with ``.`` -> ``/``. A
    ``TensorBoardLogger`` gets all of these (through its ``.experiment`` SummaryWriter); any other
    logger gets the scalars through its ``log_metrics``. The window's step is the count of optimizer
    steps so far (``trainer.global_step`` with one optimizer). At fit end the callback prints the
    verdict's line, writes the verdict to the loggers and keeps it as ``callback.diagnosis``.

    Example:
        >>> callback = GradflowCallback(every_n_steps=50)
        >>> trainer = lightning.Trainer(callbacks=[callback], gradient_clip_val=1.0)   # doctest: +SKIP
        >>> trainer.fit(model); callback.diagnosis.verdicts                          # doctest: +SKIP
        ['healthy']
    """

    def __init__(self, every_n_steps: int | None = None, *, histograms: bool | int = True, weights: bool = True,
                 activations: bool = True, verbose: bool = True, nonfinite: bool = False,
                 histogram_every: int = 10) -> None:
        every_n_steps = check_positive("every_n_steps", every_n_steps, none=True, error=ValueError)
        self.recorder = Recorder(histograms=histograms, weights=weights, activations=activations,
                                 nonfinite=nonfinite, verbose=verbose, histogram_every=histogram_every)
        self.every_n_steps = every_n_steps
        self.histograms, self.weights, self.activations, self.verbose = histograms, weights, activations, verbose
        self.nonfinite = nonfinite
        self._restored = False       # load_state_dict ran in this fit (a resume)

    # What the recorder holds, under the names the callback always had.
    monitor = _common.recorder_attribute("monitor", "the GradientMonitor of the latest fit (None before one)")
    diagnosis = _common.recorder_attribute("diagnosis", "the verdict of the latest fit (None without a window)")
    losses = _common.recorder_attribute("losses", "mean training loss of each window (what training_step returned)")
    steps = _common.recorder_attribute("steps", "optimizer steps recorded over the fits of one run (kept in "
                                       "checkpoints; a fit on a new Trainer, not resumed, starts again at 0; "
                                       "resumed from a checkpoint without this callback's state, at the "
                                       "trainer's global_step)")
    windows = _common.recorder_attribute("windows", "windows written (kept in checkpoints)")

    # -- handed to a Hugging Face Trainer: its __init__ calls ``on_init_end`` on every callback it
    # was given; one added later (``trainer.add_callback``) is first called at ``on_train_begin``.

    def on_init_end(self, *args: Any, **kwargs: Any) -> None:
        """The Hugging Face Trainer's first hook: it was given this callback. Raises TypeError."""
        if not (args and isinstance(args[0], _pl.Trainer)):   # pytorch_lightning < 1.8 had a hook of this name
            raise TypeError(_WRONG_FRAMEWORK)

    def on_train_begin(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's hook (nothing to do); a Hugging Face Trainer calling it gets a TypeError."""
        if not isinstance(trainer, _pl.Trainer):
            raise TypeError(_WRONG_FRAMEWORK)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == 0 and not self._restored:   # a new run (not resumed, not continued):
            self.steps, self.windows, self.losses = 0, 0, []    # labelled by its own global_step
        loggers = list(trainer.loggers) if trainer.is_global_zero else []   # rank zero writes
        self.recorder.start(pl_module, writes=trainer.is_global_zero, step=self.steps,
                            tensorboards=[lg.experiment for lg in loggers if is_tensorboard_logger(lg)],
                            reports=[lg.log_metrics for lg in loggers if not is_tensorboard_logger(lg)])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Resumed from a checkpoint that holds no state of this callback (added only on resume):
        # the loops are restored after on_fit_start (global_step read 0 there), so the count
        # takes the trainer's step here, before the first batch, as its windows' labels.
        if not self._restored and self.steps == 0 and trainer.global_step:
            self.steps = self.recorder.logged_at = trainer.global_step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Under 16-mixed the scaler has unscaled by now and decides on overflow right after this hook;
        # Lightning clips after it: recorded at the end of the step, as applied.
        self.recorder.record_at_step(optimizer, getattr(trainer.precision_plugin, "scaler", None))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.recorder.add_loss(_returned_loss(trainer, pl_module, outputs))
        # After the step is applied, so the window's weight update includes its last step.
        if self.recorder.due(self.steps, self.every_n_steps or trainer.log_every_n_steps):  # 0: last window only
            self.recorder.write(self.steps)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.recorder.finish(self.steps)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.recorder.remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.recorder.remove()
        self._restored = False       # (some strategies restore after on_fit_start: cleared here)

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "windows": self.windows, "losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.windows = int(state_dict.get("windows", 0))
        self.losses = [float(v) for v in state_dict.get("losses", [])]
        self.recorder.logged_at = self.steps
        self._restored = True
