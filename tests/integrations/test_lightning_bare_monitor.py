"""A plain GradientMonitor (automatic, no gradflow callback) inside a Lightning fit: Lightning
steps with ``optimizer.step(closure)``, so the monitor must record after the closure's
backward, once per optimizer step, after accumulation and after Lightning's clipping (the
gradient the step applies)."""

from __future__ import annotations

import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="extra: lightning")

from oracle_tools import grad_row  # noqa: E402
from test_lightning_callback import Net, fit  # noqa: E402

from gradflow import GradientMonitor  # noqa: E402


class Attach(pl.Callback):
    """Attach a bare monitor at fit start and close one window per epoch; the oracle is an
    optimizer step post-hook, where ``.grad`` still holds what the step applied."""

    def __init__(self) -> None:
        self.monitor = None
        self.records: list[dict] = []
        self.windows: list[list[dict]] = [[]]

    def on_fit_start(self, trainer, pl_module):
        self.monitor = GradientMonitor(pl_module, activations=False)
        optimizer = trainer.optimizers[0]
        self.handle = optimizer.register_step_post_hook(lambda *_: self.windows[-1].append(grad_row(pl_module)))

    def on_train_epoch_end(self, trainer, pl_module):
        self.monitor.log(trainer.current_epoch)
        self.windows.append([])

    def on_fit_end(self, trainer, pl_module):
        self.monitor.remove()
        self.handle.remove()


def test_bare_monitor_records_each_accumulated_clipped_step_once(tmp_path):
    torch.manual_seed(0)
    attach = Attach()
    fit(tmp_path, Net(), [attach], epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.05)
    history = attach.monitor.history
    assert [w.steps for w in history] == [3, 3]                # 6 batches of 8, accumulated by 2
    for window, records in zip(history, attach.windows):
        assert len(records) == window.steps
        for name, row in window.gradients.items():
            for key in ("mean_abs", "norm", "max_abs"):
                expected = sum(r[name][key] for r in records) / len(records)
                assert math.isclose(row[key], expected, rel_tol=1e-5), (name, key, row[key], expected)
        applied = sum(r[""]["total_norm"] for r in records) / len(records)
        assert window.overall["total_norm"] == pytest.approx(applied, rel=1e-5)
        assert window.overall["total_norm"] <= 0.05 * (1 + 1e-4)          # what the step applied: clipped
        assert window.overall["clipped_steps"] == 3 and window.overall["total_norm_before_clip"] > 0.05
