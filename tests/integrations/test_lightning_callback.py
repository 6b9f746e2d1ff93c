"""GradflowCallback in real Lightning fits, checked against an oracle that copies every ``p.grad``
in Lightning's own ``on_before_optimizer_step`` at the same step; the values compared are the ones
read back from TensorBoard's event files."""

from __future__ import annotations

import csv
import os
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402
from gradflow.monitor import GradientMonitor  # noqa: E402
from oracle_tools import compare, grad_row, has_tag, scalar_series, tensorboard, windows  # noqa: E402

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
    """The framework's own hook: statistics of every p.grad at each optimizer step."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.records.append(grad_row(pl_module))


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
    total = scalar_series(accumulators, "grad/total_norm")   # before clipping: recorded before Lightning clips
    total_error = max(abs(total[s] - expected[s][""]["total_norm"]) / expected[s][""]["total_norm"] for s in expected)
    assert total_error < TOLERANCE
    before = scalar_series(accumulators, "grad/total_norm_before_clip")
    if name == "accumulate_clip":   # Lightning clips after the hook: clip_grad_norm_ saw the recorded norm
        assert max(abs(before[s] - total[s]) / total[s] for s in expected) < TOLERANCE
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


def test_recording_before_clipping_sees_the_raw_gradient(tmp_path):
    """A tiny clip value: the recorded norm is the raw one, far above the clip value."""
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=3)
    fit(tmp_path, Net(), [oracle, callback], gradient_clip_val=1e-3, epochs=1)
    assert callback.steps == 6 and callback.windows == 2
    rows = callback.monitor.history[-1].gradients
    assert rows["body.4.weight"]["norm"] > 1e-2
    overall = callback.monitor.history[-1].overall
    assert overall["clipped_steps"] == overall["steps"] == 3
    assert overall["total_norm_before_clip"] == pytest.approx(overall["total_norm"], rel=1e-6)


def test_other_loggers_get_the_scalars(tmp_path):
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=3, verbose=False)
    trainer = fit(tmp_path, Net(), [oracle, callback], logger="csv", epochs=1)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad/body/0/weight/mean_abs")]
    assert [int(r["step"]) for r in rows] == [3, 6]
    expected = windows(oracle.records, [3, 6])
    for r in rows:
        want = expected[int(r["step"])]["body.0.weight"]["mean_abs"]
        assert abs(float(r["grad/body/0/weight/mean_abs"]) - want) / want < TOLERANCE
    assert any(k.startswith("diagnosis/") for k in rows[0].keys())


def test_a_resumed_fit_goes_on_numbering(tmp_path):
    torch.manual_seed(0)
    model, first = Net(), GradflowCallback(every_n_steps=4, verbose=False)
    trainer = fit(tmp_path, model, [first], epochs=1)          # 6 steps: windows at 4 and 6 (fit end)
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    second = GradflowCallback(every_n_steps=4, verbose=False)
    fit(tmp_path, Net(), [second], epochs=2, ckpt_path=ckpt)
    assert second.steps == 12
    assert [w.step for w in second.monitor.history] == [8, 12]


def test_removed_when_the_fit_raises(tmp_path):
    class Boom(Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model, callback = Boom(), GradflowCallback(verbose=False)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, model, [callback])
    assert not callback.monitor.attached
    with GradientMonitor(model):      # the model takes a new monitor: nothing was left behind
        pass


def test_pooled_histograms_count_every_step_and_the_last_partial_pool_is_written(tmp_path):
    """histograms=4 with 6 windows of 2 steps: one histogram of windows 1-4, and the partial pool
    of windows 5-6 written when the fit ends; together they hold every step's gradient values."""
    model = Net()
    fit(tmp_path, model, [GradflowCallback(every_n_steps=2, histograms=4, verbose=False)])
    accumulators = tensorboard(str(tmp_path))
    events = [e for acc in accumulators if "grad/body/0/weight" in acc.Tags()["histograms"]
              for e in acc.Histograms("grad/body/0/weight")]
    assert [e.step for e in events] == [8, 12]
    values_per_step = model.body[0].weight.numel()
    assert [e.histogram_value.num for e in events] == [8 * values_per_step, 4 * values_per_step]
    assert len(scalar_series(accumulators, "grad/body/0/weight/norm")) == 6     # scalars stay per window


@pytest.mark.parametrize("kwargs,message", [
    (dict(every_n_steps=0), "every_n_steps must be a positive int"),
    (dict(every_n_steps=2.5), "every_n_steps must be a positive int"),
    (dict(histograms="yes"), "histograms must be True, False or an int N >= 1"),
    (dict(histograms=0), "histograms must be True, False or an int N >= 1"),
], ids=["zero", "float", "not_bool", "histograms_zero"])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradflowCallback(**kwargs)


def test_works_with_the_pytorch_lightning_package(tmp_path):
    """Users who import ``pytorch_lightning`` pass the same callback (Lightning calls hooks by name)."""
    ptl = pytest.importorskip("pytorch_lightning")

    class Tiny(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = GradflowCallback(every_n_steps=3, verbose=False)
    trainer = ptl.Trainer(max_epochs=1, callbacks=[callback], accelerator="cpu", logger=ptl.loggers.TensorBoardLogger(str(tmp_path)),
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), loader())
    assert [w.step for w in callback.monitor.history] == [3, 6]
    assert scalar_series(tensorboard(trainer.logger.log_dir), "grad/layer/weight/norm").keys() == {3, 6}


def test_the_loss_reaches_the_verdict(tmp_path):
    """What training_step returns is the loss the stalled check reads: a mean per window."""
    from gradflow.integrations.lightning import GradflowCallback

    class Stuck(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)      # nothing moves: the loss stalls

    torch.manual_seed(0)
    callback = GradflowCallback(every_n_steps=3, verbose=False)
    fit(tmp_path, Stuck(), [callback], epochs=4)
    assert len(callback.losses) == callback.windows == 8
    # lr 0: each epoch sees the same two 3-batch windows, so the window means repeat exactly.
    assert callback.losses[0] == pytest.approx(callback.losses[2]) and callback.losses[1] == pytest.approx(callback.losses[3])
    assert callback.diagnosis.evidence["checks"]["stalled"]["why"].startswith("loss ")
