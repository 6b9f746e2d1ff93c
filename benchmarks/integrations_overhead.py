"""What GradflowCallback costs in a Lightning fit, beside Lightning's own ``grad_norm`` utility.

Four fits of the same small MLP, interleaved over several rounds, each timed from
``on_train_start`` to ``on_train_end`` (the Trainer's set-up is left out): bare; with
the bare ``GradientMonitor`` (automatic, ``log`` every 50 batches); with
``GradflowCallback()`` (every optimizer step recorded, a window with histograms every
``log_every_n_steps``); with ``self.log_dict(grad_norm(self, 2))`` from ``on_before_optimizer_step``
every step (Lightning's recipe since ``track_grad_norm`` was removed). All write to a
TensorBoardLogger. Each ratio is the median of per-round ratios over the bare fit.

    python benchmarks/integrations_overhead.py                 # 5 rounds, 300 steps each
    python benchmarks/integrations_overhead.py --rounds 3 --steps 200 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from torch import nn

from gradflow import GradientMonitor
from gradflow.integrations.lightning import GradflowCallback


class MLP(pl.LightningModule):
    def __init__(self, with_grad_norm: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
        self.with_grad_norm = with_grad_norm

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        if self.with_grad_norm:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Clock(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


class BareMonitor(pl.Callback):
    """The monitor as a user of the plain library would add it: automatic (its own optimizer
    hook, which records after Lightning's closure), ``log`` every 50 batches."""

    def on_fit_start(self, trainer, pl_module):
        self.monitor = GradientMonitor(pl_module, trainer.logger.experiment)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % 50 == 0:
            self.monitor.log(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        self.monitor.remove()


CALLBACKS = {"bare": list, "monitor": lambda: [BareMonitor()], "gradflow": lambda: [GradflowCallback(verbose=False)],
             "grad_norm": list}


def fit(variant: str, steps: int, logdir: str) -> float:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(steps * 32, 32), torch.randn(steps * 32, 1))
    clock = Clock()
    callbacks = [clock] + CALLBACKS[variant]()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, log_every_n_steps=50, callbacks=callbacks,
                         logger=pl.loggers.TensorBoardLogger(logdir, name=variant), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MLP(with_grad_norm=variant == "grad_norm"), torch.utils.data.DataLoader(data, batch_size=32))
    return clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = ["bare", "monitor", "gradflow", "grad_norm"]
    ratios: dict[str, list[float]] = {v: [] for v in variants[1:]}
    with tempfile.TemporaryDirectory() as logdir:
        for variant in variants:                      # warm-up: imports, numba compilation
            fit(variant, 20, logdir)
        for _ in range(args.rounds):
            seconds = {v: fit(v, args.steps, logdir) for v in variants}
            for v in variants[1:]:
                ratios[v].append(seconds[v] / seconds["bare"])
    print(f"Lightning fit, MLP 32-128-128-128-1, {args.steps} steps, {args.threads} thread(s), "
          f"median of {args.rounds} rounds, time relative to the bare fit:")
    print(f"  bare GradientMonitor (automatic; window + histograms every 50): {statistics.median(ratios['monitor']):.2f}x")
    print(f"  GradflowCallback (every step; window + histograms every 50):   {statistics.median(ratios['gradflow']):.2f}x")
    print(f"  grad_norm logged every step (Lightning utility):               {statistics.median(ratios['grad_norm']):.2f}x")
    print(f"  GradflowCallback / bare monitor: "
          f"{statistics.median(g / m for g, m in zip(ratios['gradflow'], ratios['monitor'])):.2f}")
    print(f"  GradflowCallback / grad_norm: "
          f"{statistics.median(g / n for g, n in zip(ratios['gradflow'], ratios['grad_norm'])):.2f}")


if __name__ == "__main__":
    main()
