"""A 2-process gloo Lightning fit under ModelParallelStrategy(data_parallel_size=2) (FSDP2 on CPU) with
GradflowCallback (run by test_lightning_sharded.py).

    python tests/integrations/fsdp2_lightning_run.py OUT_DIR

Lightning relaunches this script for rank 1. Each rank saves its oracle records (each gradient's
full_tensor() in on_before_optimizer_step, in float64) and the callback's windows to OUT_DIR/rank<k>.json.
"""

import json
import os
import sys
import warnings
from datetime import timedelta

import torch
from torch import nn

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402 - after the skip / thread setting above

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402 - after the skip / thread setting above


class ShardedNet(pl.LightningModule):
    """Linear(10, 3) head: shards of 2 and 1 rows on 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3), nn.ReLU(), nn.Linear(3, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.body[0], self.body[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.body, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class Oracle(pl.Callback):
    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        row = {}
        for name, p in pl_module.named_parameters():
            g = p.grad.full_tensor().double()
            row[name] = {"norm": float(g.norm()), "max_abs": float(g.abs().max()), "mean_abs": float(g.abs().mean())}
        self.records.append(row)


def loader(n: int = 32, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=2)
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                   timeout=timedelta(seconds=60))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy=strategy,
                         logger=pl.loggers.TensorBoardLogger(out, name="tb", version=0), callbacks=[oracle, callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ShardedNet(), loader())
    windows = [{"step": w.step, "rows": w.gradients, "overall": w.overall} for w in callback.monitor.history]
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"records": oracle.records, "windows": windows, "steps": callback.steps,
                   "verdict": callback.diagnosis.verdicts if callback.diagnosis else None}, f)
