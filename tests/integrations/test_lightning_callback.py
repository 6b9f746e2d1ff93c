"""GradflowCallback in real Lightning fits, checked against an oracle that copies every ``p.grad``
at the optimizer's step post-hook (what the step applied, after Lightning's clipping) and in
Lightning's own ``on_before_optimizer_step`` (before it); the values compared are the ones read
back from TensorBoard's event files."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from oracle_tools import compare, grad_row, has_tag, scalar_series, tensorboard, windows  # noqa: E402

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402
from gradflow.monitor import GradientMonitor  # noqa: E402

TOLERANCE = 1e-5     # float32 scalars in the event file against float64 oracles


class Net(pl.LightningModule):
    def __init__(self, manual: bool = False, clip: float | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        self.automatic_optimization = not manual
        self.clip = clip

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.body(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Oracle(pl.Callback):
    """Statistics of every p.grad at each optimizer step: as the step applied it (``records``, its
    post-hook) and as the framework's own hook saw it, before Lightning clips (``raw``)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.raw: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.records.append(grad_row(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.raw.append(grad_row(pl_module))


def loader(n: int = 48, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x[:, :1] * 3 + x[:, 1:2] ** 2
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def fit(tmp_path, model, callbacks, *, logger="tb", epochs=2, ckpt_path=None, **trainer_args):
    loggers = {"tb": pl.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
               "csv": pl.loggers.CSVLogger(str(tmp_path), name="csv")}[logger]
    trainer = pl.Trainer(max_epochs=epochs, logger=loggers, callbacks=callbacks, accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def fp16_with_a_scaler():
    """Lightning's 16-mixed has no GradScaler on the CPU; hand it one to test the unscaling."""
    from lightning.pytorch.plugins import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))


CASES = [
    ("accumulate_clip", lambda: dict(accumulate_grad_batches=2, gradient_clip_val=0.5), False),
    ("bf16_mixed", lambda: dict(accumulate_grad_batches=2, precision="bf16-mixed"), False),
    ("fp16_gradscaler", lambda: dict(accumulate_grad_batches=2, plugins=[fp16_with_a_scaler()]), False),
    ("manual_clip", lambda: dict(), True),
]


@pytest.mark.parametrize("name,trainer_args,manual", CASES, ids=[c[0] for c in CASES])
def test_tensorboard_matches_the_oracle(request, tmp_path, name, trainer_args, manual, capsys):
    torch.manual_seed(0)
    model = Net(manual=manual, clip=0.5 if manual else None)
    oracle, callback = Oracle(), GradflowCallback()
    trainer = fit(tmp_path, model, [oracle, callback], log_every_n_steps=2, **trainer_args())
    steps = len(oracle.records)
    assert steps == trainer.global_step == callback.steps == (12 if manual else 6)   # 12 batches, accumulated by 2
    expected = windows(oracle.records, list(range(2, steps + 1, 2)))
    accumulators = tensorboard(trainer.logger.log_dir)
    error = compare(expected, accumulators)
    assert error < TOLERANCE
    assert sorted(scalar_series(accumulators, "grad/body/0/weight/norm")) == sorted(expected)
    total = scalar_series(accumulators, "grad/total_norm")   # the applied gradient's: after Lightning clips
    total_error = max(abs(total[s] - expected[s][""]["total_norm"]) / expected[s][""]["total_norm"] for s in expected)
    assert total_error < TOLERANCE
    before = scalar_series(accumulators, "grad/total_norm_before_clip")
    if name == "accumulate_clip":   # Lightning clips after its hook: clip_grad_norm_ saw the hook's norm
        raw = windows(oracle.raw, list(expected))
        assert max(abs(before[s] - raw[s][""]["total_norm"]) / raw[s][""]["total_norm"] for s in expected) < TOLERANCE
        assert all(total[s] <= 0.5 + 1e-5 < before[s] for s in expected)
    if name == "manual_clip":       # the user clips before opt.step(), so before the hook: recorded after clipping
        assert all(total[s] <= 0.5 + 1e-5 and before[s] >= total[s] for s in expected)
    if "clip" in name:
        assert sum(scalar_series(accumulators, "grad/clipped_steps").values()) >= 1
    assert has_tag(accumulators, "histograms", "grad/body/0/weight")
    assert has_tag(accumulators, "tensors", "diagnosis/text_summary") or has_tag(accumulators, "tensors", "diagnosis")
    assert callback.diagnosis is not None and "Verdict:" in capsys.readouterr().out
    with capsys.disabled():   # for the record: pytest -s shows the comparison
        print(f"\n{request.node.name}: max relative error TensorBoard vs oracle {error:.2e} (per parameter), "
              f"{total_error:.2e} (total norm)")
    assert not callback.monitor.attached and GradientMonitor.detach(model) is False


def test_a_step_the_scaler_skips_is_counted_apart(tmp_path):
    """16-mixed with a GradScaler, one batch with an inf: that step is skipped (Lightning still calls
    on_before_optimizer_step); it is counted in grad/skipped_steps and left out of the means."""

    class Overflow(Oracle):
        def on_train_start(self, trainer, pl_module):     # no clipping: the hook's gradient is the applied one
            pass

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            finite = all(torch.isfinite(p.grad).all() for p in pl_module.parameters() if p.grad is not None)
            self.records.append(grad_row(pl_module) if finite else None)

    x, y = next(iter(loader(n=48, batch=48)))
    x[20] = float("inf")                                 # batch 2 (of 6): optimizer step 2 overflows
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    oracle, callback = Overflow(), GradflowCallback(every_n_steps=3, verbose=False)
    trainer = pl.Trainer(max_epochs=1, logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
                         callbacks=[oracle, callback], accelerator="cpu", plugins=[fp16_with_a_scaler()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), data)
    assert [r is None for r in oracle.records] == [False, False, True, False, False, False]
    accumulators = tensorboard(trainer.logger.log_dir)
    assert scalar_series(accumulators, "grad/skipped_steps") == {3: 1.0, 6: 0.0}
    assert callback.monitor.history[0].overall["skipped_steps"] == 1
    assert compare(windows(oracle.records, [3, 6]), accumulators) < TOLERANCE


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_the_recorded_gradient_is_the_clipped_one_the_step_applied(tmp_path, algorithm):
    """A tiny clip value, by norm (clip_grad_norm_) or by value (clip_grad_value_): Lightning clips
    after on_before_optimizer_step, and the recorded gradient is the clipped one the step applied,
    within the clip value; the norm before clipping is the oracle's total norm of the raw gradients."""
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=3)
    fit(tmp_path, Net(), [oracle, callback], gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm, epochs=1)
    assert callback.steps == 6 and callback.windows == 2
    rows = callback.monitor.history[-1].gradients
    assert rows["body.4.weight"]["norm" if algorithm == "norm" else "max_abs"] <= 1e-3 * (1 + 1e-4)
    overall = callback.monitor.history[-1].overall
    assert overall["clipped_steps"] == overall["steps"] == 3
    applied = windows(oracle.records, [3, 6])[6][""]["total_norm"]
    assert overall["total_norm"] == pytest.approx(applied, rel=1e-6)
    expected = windows(oracle.raw, [3, 6])[6][""]["total_norm"]
    assert overall["total_norm_before_clip"] == pytest.approx(expected, rel=1e-6) and expected > 10 * applied
