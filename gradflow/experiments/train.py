"""The training loop: Keras ``fit`` semantics, lean enough to cost what a bare PyTorch loop costs.

Keras parity: batches of ``batch_size`` sliced from a fresh permutation every epoch (the last
batch may be partial); history ``loss``/``accuracy`` are batch-size-weighted means over the
epoch's batches, ``val_*`` are full-test-set values after the epoch. Binary cross-entropy is
computed from the logits (the model without its final Sigmoid), so a saturated sigmoid never
gives an infinite or NaN loss.

Speed: the data lives on the device; per step there is no host work and no sync (loss and
accuracy sums accumulate on the device); one sync per epoch.

Extension points: callbacks with optional ``after_backward(step)`` (after ``loss.backward()``,
before ``optimizer.step()``) and ``epoch_end(epoch, metrics)``.

Reliability: ``checkpoint(state)`` is called every ``train.checkpoint_every`` epochs, at the end,
and when ``stop.is_set()`` (checked once per epoch: a signal handler sets it) after finishing the
epoch; ``resume=state`` goes on from such a state and, on CPU, ends exactly where an uninterrupted
run ends (model, optimizer, torch RNG, shuffle generator, history and step are all restored).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gradflow.errors import ConfigError
from gradflow.experiments.optimizers import make_optimizer

if TYPE_CHECKING:
    from gradflow.experiments.config import Config, OptimizerConfig, TrainConfig
    from gradflow.experiments.data import Dataset


class Callback(Protocol):
    """Both methods are optional; define only what you need.

    ``after_backward(step)``: gradients are final, the optimizer has not stepped (step counts
    from 0 over the whole run). ``epoch_end(epoch, metrics)``: epoch counts from 0 (as Keras'
    CSVLogger and TensorBoard callback do); metrics has loss, accuracy, val_loss, val_accuracy.
    """

    def after_backward(self, step: int) -> None: ...

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


class EpochScalars:
    """Callback writing ``epoch/<metric>`` scalars to a SummaryWriter once per epoch.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter   # doctest: +SKIP
        >>> fit(model, data, opt_cfg, train_cfg, callbacks=[EpochScalars(SummaryWriter(run_dir))])  # doctest: +SKIP
    """

    def __init__(self, writer: Any) -> None:
        from gradflow.monitor.sinks import TensorBoardSink

        self.writer = writer
        self._sink = TensorBoardSink(writer)

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        # One event for all of them: each event wakes the writer's thread, which then competes
        # with training for the GIL.
        self._sink.log({f"epoch/{key}": value for key, value in metrics.items()}, {}, epoch)


@dataclass
class TrainResult:
    """What a run produced. ``history`` has one dict per epoch run (epoch from 0)."""

    history: list[dict[str, float]]
    train_accuracy: float  # final model, full training set
    test_accuracy: float  # final model, full test set
    seconds: float  # wall time of the training loop (evaluation included), a resumed run's earlier part too
    epochs_run: int
    device: str
    stopped_early: bool = False  # True when a non-finite loss stopped the run
    stop_epoch: int | None = None  # the epoch (from 0) whose loss was non-finite
    stop_reason: str | None = None
    interrupted: bool = False  # True when ``stop`` was set: the run checkpointed and returned early
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``/``cuda`` as given.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str) -> torch.device:
    """``resolve_device``, but a CUDA request on a machine without CUDA is a ``ConfigError``.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but torch.cuda.is_available() is False; accepted here: auto, cpu")
    return resolve_device(device)


def _correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # logit > 0 <=> sigmoid > 0.5: Keras' binary accuracy at threshold 0.5.
    return (logits > 0).eq(y > 0.5).sum()


@torch.inference_mode()
def evaluate(body: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of logits ``body(x)`` against ``y``, as device tensors (no sync).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Sigmoid())
        >>> loss, acc = evaluate(m[:-1], torch.zeros(4, 2), torch.ones(4, 1))  # logits 0
        >>> round(loss.item(), 4), acc.item()
        (0.6931, 0.0)
    """
    logits = body(x)
    loss = F.binary_cross_entropy_with_logits(logits, y)
    return loss, _correct(logits, y) / y.shape[0]


class _NoBar:
    """The calls ``fit`` makes on its progress bar, doing nothing. A disabled tqdm is not enough:
    tqdm starts its monitor thread in ``tqdm.__new__``, also for a disabled bar, which never stops
    it (a thread waking every 10 s for the rest of the process)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(epochs: int, enabled: bool | None) -> tqdm | _NoBar:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    return tqdm(total=epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True)


def trained_taps(model: nn.Sequential, activations: bool) -> Callable[[str, nn.Module], bool] | bool:
    """The monitor's ``activations=`` for a gradflow model: its activation modules but the
    output Sigmoid, which training never runs (the loss is computed from the logits,
    ``model[:-1]``: ``prepare``), so that its tap, never called, is not said to have given no
    output. False stays False."""
    if not activations:
        return False
    from gradflow.monitor.activations import is_activation
    output = model[-1]
    return lambda name, module: module is not output and is_activation(module)


class Prepared(NamedTuple):
    """What a training loop needs before its first epoch (see ``prepare``)."""

    device: torch.device
    body: nn.Module                   # the model without its output Sigmoid: logits
    tensors: tuple                    # x_train, y_train, x_test, y_test on the device
    optimizer: torch.optim.Optimizer
    after_backward: list              # the callbacks' bound methods, collected once
    epoch_end: list
    starts: range                     # first row of each batch
    batch_sizes: torch.Tensor         # rows in each batch (the last may be partial)


def prepare(model: nn.Sequential, data: Dataset, optimizer: OptimizerConfig, batch_size: int,
            callbacks: Iterable[Any], device: str | torch.device) -> Prepared:
    """Move the model and data to the device, make the optimizer, collect the callbacks.

    Shared by ``fit`` and the batched trainer, so both slice batches the same way.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev)
    tensors = (data.x_train.to(dev), data.y_train.to(dev), data.x_test.to(dev), data.y_test.to(dev))
    callbacks = list(callbacks)
    n = tensors[0].shape[0]
    starts = range(0, n, batch_size)
    return Prepared(
        dev,
        model[:-1],  # shares the modules: logits for a stable loss
        tensors,
        make_optimizer(model.parameters(), optimizer),
        [cb.after_backward for cb in callbacks if hasattr(cb, "after_backward")],
        [cb.epoch_end for cb in callbacks if hasattr(cb, "epoch_end")],
        starts,
        torch.tensor([min(batch_size, n - s) for s in starts], dtype=torch.float32, device=dev),
    )


def fit(
    model: nn.Sequential,
    data: Dataset,
    optimizer: OptimizerConfig,
    train: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    callbacks: Iterable[Any] = (),
    progress: bool | None = False,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    stop: Any | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (whose last module is the output Sigmoid) the way Keras ``fit`` does.

    ``progress``: True shows a tqdm bar, None shows it only when stderr is a terminal.
    ``checkpoint``: called with the training state (see ``_state``) every
    ``train.checkpoint_every`` epochs, at the end and on a stop request. ``stop``: anything with
    ``is_set()`` (a ``threading.Event``), read once per epoch. ``resume``: a state to go on from.

    Example:
        >>> from gradflow.experiments.config import load_config
        >>> cfg = load_config("configs/deep_relu.yaml", ["train.epochs=2"])
        >>> result = fit(build_model(cfg.model), load_dataset(cfg.data), cfg.optimizer, cfg.train)  # doctest: +SKIP
        >>> print(f"Train: {result.train_accuracy:.3f}, Test: {result.test_accuracy:.3f}")  # doctest: +SKIP
    """
    dev, body, (x, y, x_val, y_val), opt, after_backward, epoch_end, starts, batch_sizes = prepare(
        model, data, optimizer, train.batch_size, callbacks, device)
    # Own generator: shuffling is fixed by the seed and independent of the init draws.
    gen = torch.Generator().manual_seed(train.seed)
    n, bs = x.shape[0], train.batch_size
    history: list[dict[str, float]] = []
    result = TrainResult(history, math.nan, math.nan, 0.0, 0, str(dev))
    step = first = 0
    before = 0.0       # seconds the run trained before a checkpoint it resumes from (none in older checkpoints)
    if resume is not None:
        step, first = _restore(resume, model, opt, gen, history)
        before = resume.get("seconds", 0.0)
    every = getattr(train, "checkpoint_every", 0)

    def save(epoch: int) -> None:
        if checkpoint is not None:
            state = _state(epoch, step, model, opt, gen, history)
            state["seconds"] = before + time.perf_counter() - t0
            checkpoint(state)

    t0 = time.perf_counter()
    bar = _progress(train.epochs, progress)
    bar.update(first)
    for epoch in range(first, train.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        losses, outputs = [], []  # detached per-batch results, reduced once per epoch
        for start in starts:
            idx = perm[start : start + bs]
            xb, yb = x[idx], y[idx]
            logits = body(xb)
            loss = F.binary_cross_entropy_with_logits(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for hook in after_backward:
                hook(step)
            opt.step()
            step += 1
            losses.append(loss.detach())
            outputs.append(logits.detach())
        # Keras: batch-size-weighted means over the epoch's batches.
        loss_sum = torch.dot(torch.stack(losses), batch_sizes)
        correct = _correct(torch.cat(outputs), y[perm])
        model.eval()
        val_loss, val_acc = evaluate(body, x_val, y_val)
        values = torch.stack([loss_sum / n, correct / n, val_loss, val_acc]).tolist()  # the sync
        metrics = dict(zip(("loss", "accuracy", "val_loss", "val_accuracy"), values))
        history.append({"epoch": epoch, **metrics})
        for hook in epoch_end:
            hook(epoch, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{values[0]:.4f}", acc=f"{values[1]:.3f}", val_acc=f"{values[3]:.3f}", refresh=False)
        if not math.isfinite(values[0]) and train.on_nonfinite == "stop":
            result.stopped_early, result.stop_epoch = True, epoch
            result.stop_reason = f"non-finite training loss ({values[0]}) at epoch {epoch}"
            break
        if stop is not None and stop.is_set():  # once per epoch: the step itself pays nothing
            result.interrupted, result.stop_epoch = True, epoch
            save(epoch)
            break
        if epoch == train.epochs - 1 or (every and (epoch + 1) % every == 0):
            save(epoch)
    bar.close()
    result.train_accuracy = evaluate(body, x, y)[1].item()
    result.test_accuracy = evaluate(body, x_val, y_val)[1].item()
    result.seconds = before + time.perf_counter() - t0
    result.epochs_run = len(history)
    return result


def _state(epoch: int, step: int, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
           history: list[dict[str, float]]) -> dict[str, Any]:
    """Everything ``fit`` needs to go on after ``epoch`` (epochs count from 0)."""
    return {"epoch": epoch, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(), "generator": gen.get_state(), "history": list(history)}


def _restore(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
             history: list[dict[str, float]]) -> tuple[int, int]:
    """Load a ``_state`` into the live objects; returns (global step, first epoch to run)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    gen.set_state(state["generator"])
    history.extend(state["history"])
    return state["step"], state["epoch"] + 1


def train_from_config(
    cfg: Config,
    *,
    device: str | torch.device = "cpu",
    callbacks: Iterable[Any] = (),
    progress: bool | None = False,
) -> tuple[nn.Sequential, TrainResult]:
    """Seed, build the data and the model, and ``fit``; returns (model, result).

    Example:
        >>> from gradflow.experiments.config import load_config
        >>> model, result = train_from_config(load_config("configs/shallow_tanh.yaml", ["train.epochs=1"]))
        >>> result.epochs_run
        1
    """
    model, data = build_from_config(cfg)
    result = fit(model, data, cfg.optimizer, cfg.train, device=device, callbacks=callbacks, progress=progress)
    return model, result


def build_from_config(cfg: Config) -> tuple[nn.Sequential, Dataset]:
    """The data, then the model seeded with ``cfg.train.seed`` (its initial weights).

    Example:
        >>> from gradflow.experiments.config import load_config
        >>> model, data = build_from_config(load_config("configs/deep_relu.yaml"))
        >>> [name for name, _ in model.named_children()][:2]
        ['dense_1', 'relu_1']
    """
    from gradflow.experiments.data import load_dataset
    from gradflow.experiments.models import build_model

    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)  # fixes the initial weights
    return build_model(cfg.model, in_features=data.x_train.shape[-1]), data   # features: the last axis
