"""K models of one config shape trained as one batched model: many seeds for the cost of one run.

Each member is built exactly as the solo trainer builds it (``torch.manual_seed(seed);
build_model(cfg.model)``) and the members' weights are stacked: a ``BatchedLinear`` holds a
(K, out, in) weight and a (K, 1, out) bias and runs one ``torch.baddbmm`` for all K. The loss
is the sum over members of each member's mean binary cross-entropy, so each member's gradient
is exactly its own; SGD and Adam update element by element, so one optimizer step over the
stacked tensors is K solo steps. Each member shuffles with its own generator seeded like the
solo trainer's, so member k starts from the weights and sees the batches that seed k would
alone, and follows the same trajectory up to float rounding.

Example:
    >>> from gradflow.experiments.config import load_config
    >>> from gradflow.experiments.data import load_dataset
    >>> cfg = load_config("configs/deep_relu.yaml", ["train.epochs=2"])
    >>> model = build_batched(cfg.model, [0, 1, 2])
    >>> results = fit_batched(model, load_dataset(cfg.data), cfg.optimizer, cfg.train, [0, 1, 2])
    >>> [r.epochs_run for r in results]
    [2, 2, 2]

Callbacks are the trainer's, with per-member metrics: ``after_backward(step)``,
``epoch_end(epoch, metrics)`` where ``metrics`` is a list of K dicts (None for a member that
has stopped), and optional ``member_stopped(k)``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gradflow.experiments.config import to_dict
from gradflow.experiments.data import load_dataset
from gradflow.experiments.models import build_model
from gradflow.experiments.outputs import write_outputs
from gradflow.experiments.recording import MembersMonitorCallback, write_tensorboard_layout
from gradflow.experiments.rundir import write_config
from gradflow.experiments.train import EpochScalars, TrainResult, _progress, prepare, trained_taps
from gradflow.monitor import GradientMonitor

if TYPE_CHECKING:
    from gradflow.experiments.config import Config, ModelConfig, OptimizerConfig, TrainConfig
    from gradflow.experiments.data import Dataset

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class BatchedLinear(nn.Module):
    """K independent ``nn.Linear`` layers as one: weight (K, out, in), bias (K, 1, out).

    Input (K, batch, in) -> output (K, batch, out); member k's slice is ``linear_k(x[k])``.

    Example:
        >>> layers = [nn.Linear(2, 3) for _ in range(4)]
        >>> batched = BatchedLinear.stack(layers)
        >>> x = torch.randn(4, 5, 2)
        >>> torch.allclose(batched(x)[1], layers[1](x[1]), atol=1e-6)
        True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    @classmethod
    def stack(cls, layers: Sequence[nn.Linear]) -> BatchedLinear:
        """Copy the members' weights into one stacked layer (the members are left untouched)."""
        with torch.no_grad():
            weight = torch.stack([layer.weight.detach() for layer in layers]).clone()
            bias = torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1).clone()
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        members, out, inp = self.weight.shape
        return f"members={members}, in_features={inp}, out_features={out}"


def stack_models(models: Sequence[nn.Sequential]) -> nn.Sequential:
    """One batched ``nn.Sequential`` from K models of the same shape.

    Linear layers are stacked; every other module (the activations) is taken from the first
    member, with the same names, so the monitor's activation taps see ``tanh_1``, ``relu_3``...

    Example:
        >>> _ = torch.manual_seed(0)
        >>> m = stack_models([nn.Sequential(nn.Linear(2, 4), nn.Tanh()) for _ in range(3)])
        >>> tuple(m[0].weight.shape), type(m[1]).__name__
        ((3, 4, 2), 'Tanh')
    """
    children = OrderedDict()
    for name, module in models[0].named_children():
        if isinstance(module, nn.Linear):
            module = BatchedLinear.stack([dict(m.named_children())[name] for m in models])
        children[name] = module
    return nn.Sequential(children)


def build_batched(cfg: ModelConfig, seeds: Sequence[int], in_features: int = 2) -> nn.Sequential:
    """The batched model of ``seeds``: member k starts from exactly the solo seed-k weights.

    Example:
        >>> from gradflow.experiments.config import ModelConfig
        >>> m = build_batched(ModelConfig(depth=2), [0, 7])
        >>> _ = torch.manual_seed(7)
        >>> torch.equal(m.dense_1.weight[1], build_model(ModelConfig(depth=2)).dense_1.weight)
        True
    """
    members = []
    for seed in seeds:
        torch.manual_seed(seed)  # as train_from_config does before build_model
        members.append(build_model(cfg, in_features=in_features))
    return stack_models(members)


def member_state(model: nn.Sequential, k: int) -> dict[str, torch.Tensor]:
    """Member k's parameters shaped like a solo model's ``state_dict`` (copies).

    Example:
        >>> from gradflow.experiments.config import ModelConfig
        >>> state = member_state(build_batched(ModelConfig(depth=1), [3, 4]), 1)
        >>> {name: tuple(t.shape) for name, t in state.items()}
        {'dense_1.weight': (5, 2), 'dense_1.bias': (5,), 'dense_2.weight': (1, 5), 'dense_2.bias': (1,)}
    """
    state = {}
    for name, p in model.named_parameters():
        value = p.detach()[k]
        state[name] = (value.squeeze(0) if name.endswith("bias") else value).clone()
    return state


# --- the fit loop ----------------------------------------------------------------------------

def _member_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K,) each member's mean binary cross-entropy, from logits (never inf or NaN)."""
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=(1, 2))


def _member_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # logit > 0 <=> sigmoid > 0.5: Keras' binary accuracy, counted per member.
    return (logits > 0).eq(y > 0.5).sum(dim=(1, 2))


@torch.inference_mode()
def evaluate_members(body: nn.Module, x: torch.Tensor, y: torch.Tensor, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) losses and (K,) accuracies of every member on the same full set ``x``, ``y``.

    Example:
        >>> body = nn.Sequential(BatchedLinear(torch.zeros(2, 1, 2), torch.zeros(2, 1, 1)))
        >>> loss, acc = evaluate_members(body, torch.zeros(4, 2), torch.ones(4, 1), 2)
        >>> [round(v, 4) for v in loss.tolist()], acc.tolist()
        ([0.6931, 0.6931], [0.0, 0.0])
    """
    xs, ys = x.expand(members, *x.shape), y.expand(members, *y.shape)
    logits = body(xs)
    return _member_losses(logits, ys), _member_correct(logits, ys) / y.shape[0]


def fit_batched(
    model: nn.Sequential,
    data: Dataset,
    optimizer: OptimizerConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    callbacks: Iterable[Any] = (),
    progress: bool | None = False,
) -> list[TrainResult]:
    """``train.fit`` for a batched model: one ``TrainResult`` per member, in ``seeds`` order.

    ``train.seed`` is ignored: member k shuffles with ``torch.Generator().manual_seed(seeds[k])``.
    With ``train.on_nonfinite == "stop"`` a member whose epoch loss is not finite stops there
    (its history and accuracies are those a solo run would report) while the others go on.

    Example:
        >>> results = fit_batched(build_batched(cfg.model, [0, 1]), data, cfg.optimizer, cfg.train, [0, 1])  # doctest: +SKIP
    """
    k_all = len(seeds)
    callbacks = list(callbacks)
    dev, body, (x, y, x_val, y_val), opt, after_backward, epoch_end, starts, batch_sizes = prepare(
        model, data, optimizer, train.batch_size, callbacks, device)
    stopped_hooks = [cb.member_stopped for cb in callbacks if hasattr(cb, "member_stopped")]
    # One generator per member, seeded as the solo trainer seeds its own: the same permutations.
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    n, bs = x.shape[0], train.batch_size
    results = [TrainResult([], math.nan, math.nan, 0.0, 0, str(dev)) for _ in seeds]
    active = list(range(k_all))
    step = 0
    t0 = time.perf_counter()
    bar = _progress(train.epochs, progress)
    for epoch in range(train.epochs):
        model.train()
        perm = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(dev)  # (K, n)
        xs, ys = x[perm], y[perm]  # each member's epoch, in its own order
        losses, outputs = [], []  # detached per-batch results, reduced once per epoch
        for start in starts:
            xb, yb = xs[:, start : start + bs], ys[:, start : start + bs]
            logits = body(xb)
            member_loss = _member_losses(logits, yb)
            opt.zero_grad(set_to_none=True)
            member_loss.sum().backward()  # d(sum)/d(member k's weights) = member k's own gradient
            for hook in after_backward:
                hook(step)
            opt.step()
            step += 1
            losses.append(member_loss.detach())
            outputs.append(logits.detach())
        # Keras: batch-size-weighted means over the epoch's batches, per member.
        loss_sum = batch_sizes @ torch.stack(losses)
        correct = _member_correct(torch.cat(outputs, dim=1), ys)
        model.eval()
        val_loss, val_acc = evaluate_members(body, x_val, y_val, k_all)
        values = torch.stack([loss_sum / n, correct / n, val_loss, val_acc], dim=1).tolist()  # the sync
        metrics: list[dict[str, float] | None] = [None] * k_all
        for k in active:
            metrics[k] = dict(zip(METRICS, values[k]))
            results[k].history.append({"epoch": epoch, **metrics[k]})
        for hook in epoch_end:
            hook(epoch, metrics)
        active = _stop_nonfinite(active, values, epoch, train, results, body, (x, y, x_val, y_val), stopped_hooks)
        bar.update(1)
        if not active:
            break
    bar.close()
    _finish(results, [k for k in range(k_all) if results[k].stop_epoch is None], body, (x, y, x_val, y_val))
    seconds = time.perf_counter() - t0
    for result in results:
        result.seconds = seconds
        result.epochs_run = len(result.history)
        result.extra["members"] = k_all
    return results


def _stop_nonfinite(active, values, epoch, train, results, body, tensors, hooks) -> list[int]:
    """Members whose epoch loss is not finite stop (as the solo trainer stops); the rest go on."""
    if train.on_nonfinite != "stop":
        return active
    stopping = [k for k in active if not math.isfinite(values[k][0])]
    if not stopping:
        return active
    for k in stopping:
        results[k].stopped_early, results[k].stop_epoch = True, epoch
        results[k].stop_reason = f"non-finite training loss ({values[k][0]}) at epoch {epoch}"
        for hook in hooks:
            hook(k)
    _finish(results, stopping, body, tensors)  # a stopped member's accuracies are taken now
    return [k for k in active if k not in stopping]


def _finish(results: list[TrainResult], members: list[int], body: nn.Module, tensors) -> None:
    if not members:
        return
    x, y, x_val, y_val = tensors
    k_all = len(results)
    train_acc = evaluate_members(body, x, y, k_all)[1].tolist()
    test_acc = evaluate_members(body, x_val, y_val, k_all)[1].tolist()
    for k in members:
        results[k].train_accuracy, results[k].test_accuracy = train_acc[k], test_acc[k]


# --- per-member run directories --------------------------------------------------------------

class MemberEpochScalars:
    """``epoch/<metric>`` scalars of member k to writer k (what ``train.EpochScalars`` does solo)."""

    def __init__(self, writers: Sequence[Any]) -> None:
        self.members = [EpochScalars(writer) for writer in writers]

    def epoch_end(self, epoch: int, metrics: list[dict[str, float] | None]) -> None:
        for member, values in zip(self.members, metrics):
            if values is not None:
                member.epoch_end(epoch, values)


def member_config(cfg: Config, seed: int) -> Config:
    """A copy of ``cfg`` with ``train.seed = seed``: what a solo run of that seed resolves to."""
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


def train_members(
    cfg: Config,
    seeds: Sequence[int],
    run_dirs: Sequence[str | Path],
    *,
    device: str | torch.device = "cpu",
    progress: bool | None = False,
) -> list[dict[str, Any]]:
    """Train ``seeds`` of ``cfg`` as one batched model, writing one complete run directory per
    member (config.yaml, history.csv, summary.json, accuracy.png, gradients.csv,
    activations.csv, TensorBoard events) into the existing, empty ``run_dirs``.

    Returns each member's summary (what summary.json holds).

    Example:
        >>> summaries = train_members(cfg, [0, 1], [tmp / "s0", tmp / "s1"])  # doctest: +SKIP
        >>> summaries[1]["seed"], summaries[1]["test_accuracy"]  # doctest: +SKIP
        (1, 0.84)
    """
    from torch.utils.tensorboard import SummaryWriter

    run_dirs = [Path(d) for d in run_dirs]
    members = [member_config(cfg, seed) for seed in seeds]
    for member, run_dir in zip(members, run_dirs):
        write_config(run_dir, to_dict(member))
    data = load_dataset(cfg.data)
    model = build_batched(cfg.model, seeds, in_features=data.x_train.shape[1])
    writers = [SummaryWriter(log_dir=str(d)) for d in run_dirs]
    for writer in writers:
        write_tensorboard_layout(writer, [name for name, _ in model.named_parameters()])
    callbacks: list[Any] = [MemberEpochScalars(writers)]
    monitor = recorder = None
    try:
        if cfg.monitor.enabled:
            monitor, recorder = _attach_monitor(model, writers, run_dirs, cfg, len(seeds))
            callbacks.append(recorder)
        results = fit_batched(model, data, cfg.optimizer, cfg.train, seeds, device=device,
                              callbacks=callbacks, progress=progress)
    finally:
        if recorder is not None:
            recorder.close()
        if monitor is not None:
            monitor.remove()
        for writer in writers:
            writer.close()
    summaries = []
    for k, (member, result, run_dir) in enumerate(zip(members, results, run_dirs)):
        # The windows the tables hold, from memory as a solo run hands them on: reading the
        # tables back cost ~0.1 s a member.
        windows = recorder.member_windows(k) if recorder is not None else []
        summary, _ = write_outputs(run_dir, member, result, windows, members=result.extra.get("members", 1),
                                   title=f"{member.name} seed {member.train.seed}", gradients_plot=False)
        summaries.append(summary)
    return summaries


def _attach_monitor(model, writers, run_dirs, cfg, members):
    mon = cfg.monitor
    monitor = GradientMonitor(model, writers, histograms=mon.histograms, weights=mon.weights,
                              activations=trained_taps(model, mon.activations), activations_every=mon.activations_every,
                              histogram_every=mon.histogram_every, members=members)
    return monitor, MembersMonitorCallback(monitor, run_dirs, window_steps=mon.window_steps)
