"""GradflowCallback in a Lightning fit: a deep tanh MLP on two circles; a few seconds on a CPU.

    python examples/lightning_example.py                 # events in runs/lightning_example/
    tensorboard --logdir runs/lightning_example
"""

import sys

import lightning.pytorch as pl
import torch
from torch import nn

from gradflow.integrations.lightning import GradflowCallback


class DeepTanh(pl.LightningModule):
    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        layers, width = [], 2
        for _ in range(depth):
            layers += [nn.Linear(width, 5), nn.Tanh()]
            width = 5
        self.net = nn.Sequential(*layers, nn.Linear(5, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def circles(n: int = 512) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    angle = torch.rand(n, generator=g) * 6.2832
    radius = torch.where(torch.arange(n) % 2 == 0, 1.0, 0.5)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)
    y = (radius == 0.5).float()[:, None]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


if __name__ == "__main__":
    logdir = sys.argv[1] if len(sys.argv) > 1 else "runs"
    torch.set_num_threads(1)       # a tiny model: extra threads only spin (and the run repeats exactly)
    pl.seed_everything(0, verbose=False)
    callback = GradflowCallback()
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", log_every_n_steps=16, gradient_clip_val=1.0,
                         logger=pl.loggers.TensorBoardLogger(logdir, name="lightning_example"),
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(DeepTanh(), circles())
    print(callback.diagnosis.report())
