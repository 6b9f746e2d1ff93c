"""GradflowTrainerCallback in a real Hugging Face Trainer run of a tiny GPT-2 built from a config
(nothing is downloaded), checked against an oracle that reads every ``p.grad`` in the Trainer's own
``on_pre_optimizer_step`` and the norm the Trainer's clipping returned; the values compared are the
ones read back from the TensorBoard event files."""

from __future__ import annotations

import glob
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from oracle_tools import compare, grad_row, has_tag, scalar_series, tensorboard, windows  # noqa: E402

from gradflow.integrations.transformers import GradflowTrainerCallback  # noqa: E402
from gradflow.monitor import GradientMonitor, MonitorError  # noqa: E402

TOLERANCE = 1e-5


class Oracle(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.logged: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.records.append(grad_row(model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs, step=state.global_step))


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def dataset(n: int = 48, length: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, length), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(tmp_path, callbacks, *, report_to=("tensorboard",), max_steps=6, clip_norms=None, attach=None, **args):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    max_grad_norm=0.5, max_steps=max_steps, logging_steps=2, learning_rate=1e-3,
                    report_to=list(report_to), use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    defaults.update(args)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=transformers.TrainingArguments(**defaults),
                                   train_dataset=dataset(), callbacks=callbacks)
    if attach is not None:         # added as the docs show for reporters other than TensorBoard
        attach.attach(trainer)
    if clip_norms is not None:     # the framework's own pre-clip norm, as the Trainer computes it
        clip = trainer.accelerator.clip_grad_norm_

        def recording_clip(*a, **k):
            norm = clip(*a, **k)
            clip_norms.append(float(norm))
            return norm
        trainer.accelerator.clip_grad_norm_ = recording_clip
    trainer.train()
    return trainer


def test_tensorboard_matches_the_oracle(request, tmp_path, capsys):
    oracle, callback, norms = Oracle(), GradflowTrainerCallback(), []
    trainer = train(tmp_path, [oracle, callback], clip_norms=norms)
    assert len(oracle.records) == trainer.state.global_step == 6        # one record per optimizer step
    expected = windows(oracle.records, [2, 4, 6])
    accumulators = tensorboard(str(tmp_path / "runs"))
    error = compare(expected, accumulators)
    assert error < TOLERANCE
    assert has_tag(accumulators, "histograms", "grad/transformer/h/0/attn/c_attn/weight")
    # in the Trainer's own TensorBoard run: one directory holds its events and ours
    dirs = {os.path.dirname(p) for p in glob.glob(str(tmp_path / "runs/**/events.out.tfevents.*"), recursive=True)}
    assert len(dirs) == 1
    assert scalar_series(accumulators, "train/grad_norm"), "the Trainer's own scalars are in the same run"
    total = scalar_series(accumulators, "grad/total_norm")       # after clipping: what the optimizer applied
    total_error = max(abs(total[s] - expected[s][""]["total_norm"]) / expected[s][""]["total_norm"] for s in expected)
    assert total_error < TOLERANCE
    before = scalar_series(accumulators, "grad/total_norm_before_clip")   # the Trainer's grad_norm, window mean
    want = {s: sum(norms[s - 2:s]) / 2 for s in (2, 4, 6)}
    before_error = max(abs(before[s] - want[s]) / want[s] for s in want)
    assert before_error < TOLERANCE
    clipped = scalar_series(accumulators, "grad/clipped_steps")
    assert clipped == {s: float(sum(n > 0.5 for n in norms[s - 2:s])) for s in (2, 4, 6)}
    assert max(norms) > 0.5, "the test should clip"
    assert callback.diagnosis is not None and "Verdict:" in capsys.readouterr().out
    with capsys.disabled():   # for the record: pytest -s shows the comparison
        print(f"\n{request.node.name}: max relative error TensorBoard vs oracle {error:.2e} (per parameter), "
              f"{total_error:.2e} (total norm, clipped), {before_error:.2e} (norm before clipping vs the Trainer's)")
    assert not callback.monitor.attached and GradientMonitor.detach(trainer.model) is False


def test_without_tensorboard_the_reporters_get_the_scalars(tmp_path, monkeypatch):
    """report_to without tensorboard, the callback added with attach(trainer): no event file; the
    scalars reach the Trainer's reporters."""
    from transformers.integrations import integration_utils

    received = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append((state.global_step, dict(logs)))

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "fake", Reporter)
    oracle, callback = Oracle(), GradflowTrainerCallback(every_n_steps=3, verbose=False)
    trainer = train(tmp_path, [oracle], report_to=("fake",), attach=callback)
    assert trainer.callback_handler.callbacks.count(callback) == 1
    assert not glob.glob(str(tmp_path / "**/events.out.tfevents.*"), recursive=True)
    assert [w.step for w in callback.monitor.history] == [3, 6]
    ours = [(step, logs) for step, logs in received if "grad/transformer/wte/weight/norm" in logs]
    assert [step for step, _ in ours] == [3, 6]
    expected = windows(oracle.records, [3, 6])
    for step, logs in ours:
        for name in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"):
            for key in ("mean_abs", "norm", "max_abs"):
                want = expected[step][name][key]
                got = logs[f"grad/{name.replace('.', '/')}/{key}"]
                assert abs(got - want) / want < TOLERANCE
    assert any(any(k.startswith("diagnosis/") for k in logs) for _, logs in received)
    assert callback.diagnosis is not None


def test_in_callbacks_a_reporter_it_cannot_reach_is_said_out_loud(tmp_path, monkeypatch):
    """Passed in callbacks=[...], the callback has no way to the Trainer's reporters: it warns, naming
    them and attach(trainer), and they get none of its scalars."""
    from transformers.integrations import integration_utils

    received = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            received.append(dict(logs))

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "fake", Reporter)
    callback = GradflowTrainerCallback(verbose=False)
    with pytest.warns(UserWarning, match=r"cannot reach the Trainer's \['fake'\] reporters.*attach\(trainer\)"):
        train(tmp_path, [callback], report_to=("fake",), max_steps=2)
    assert received and not any(k.startswith(("grad/", "diagnosis/")) for logs in received for k in logs)
    assert callback.diagnosis is not None


def test_attached_it_writes_into_the_tensorboard_callbacks_own_directory(tmp_path):
    callback = GradflowTrainerCallback(verbose=False, histograms=False)
    trainer = train(tmp_path, [], max_steps=2, attach=callback)
    board = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback")
    dirs = {os.path.dirname(p) for p in glob.glob(str(tmp_path / "runs/**/events.out.tfevents.*"), recursive=True)}
    assert dirs == {board.logging_dir}
    assert scalar_series(tensorboard(board.logging_dir), "grad/total_norm").keys() == {2}


def test_the_default_directory_is_the_one_made_a_second_earlier_when_the_clock_turned(tmp_path):
    """In callbacks=[...], the TensorBoardCallback named its directory (to the second) just before
    ours: if the second turned in between, ours is the one a second back, not a new one."""
    import socket
    from datetime import datetime, timedelta

    from gradflow.integrations.transformers import _default_tensorboard_dir

    for _ in range(3):           # the clock may turn again between making the directory and the call
        earlier = (datetime.now() - timedelta(seconds=1)).strftime("%b%d_%H-%M-%S")
        made = tmp_path / "runs" / f"{earlier}_{socket.gethostname()}"
        made.mkdir(parents=True, exist_ok=True)
        if _default_tensorboard_dir(str(tmp_path)) == str(made):
            return
    pytest.fail(f"{_default_tensorboard_dir(str(tmp_path))} is not the directory made a second earlier")


def test_attach_refuses_what_is_not_a_trainer():
    with pytest.raises(MonitorError, match="attach needs a transformers Trainer .* got object"):
        GradflowTrainerCallback().attach(object())


@pytest.mark.parametrize("kwargs,message", [
    (dict(every_n_steps=-1), "every_n_steps must be a positive int"),
    (dict(log_dir=3), "log_dir must be a path"),
    (dict(weights=None), "weights must be True or False"),
    (dict(histograms=2.5), r"histograms must be True \(every window\), False \(none\) or an int N >= 1"),
    (dict(histogram_every=0), r"histogram_every must be a positive int \(1: every step\), got 0"),
], ids=["negative", "log_dir", "not_bool", "histograms_float", "histogram_every"])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradflowTrainerCallback(**kwargs)


def test_the_trainers_logged_loss_reaches_the_verdict(tmp_path):
    from gradflow.integrations.transformers import GradflowTrainerCallback

    callback = GradflowTrainerCallback(verbose=False)
    train(tmp_path, [callback], report_to=[], max_steps=12)
    assert len(callback.losses) == 6 and all(v == v and v > 0 for v in callback.losses)     # every 2 steps
    assert callback.diagnosis.evidence["checks"]["stalled"]["why"].startswith("loss ")


def test_with_nowhere_to_write_it_says_where_the_records_are_once(tmp_path, recwarn):
    """report_to=[] (transformers 5's default) and no log_dir: no event file, and one warning at train
    begin naming callback.monitor.history, the verdict and the two ways to TensorBoard events."""
    callback = GradflowTrainerCallback(verbose=False)
    train(tmp_path, [callback], report_to=[], max_steps=2)
    said = [str(w.message) for w in recwarn if "GradflowTrainerCallback" in str(w.message)]
    assert len(said) == 1, said
    for part in ("writes no TensorBoard events", "callback.monitor.history", "callback.diagnosis",
                 'report_to="tensorboard"', "log_dir="):
        assert part in said[0], part
    assert not glob.glob(str(tmp_path / "**/events.out.tfevents.*"), recursive=True)
    assert [w.step for w in callback.monitor.history] == [2]


@pytest.mark.parametrize("report_to, log_dir", [(["tensorboard"], False), ([], True)])
def test_with_somewhere_to_write_it_says_nothing(tmp_path, recwarn, report_to, log_dir):
    callback = GradflowTrainerCallback(verbose=False, histograms=False, log_dir=tmp_path / "tb" if log_dir else None)
    train(tmp_path, [callback], report_to=report_to, max_steps=2)
    assert not [w for w in recwarn if "GradflowTrainerCallback" in str(w.message)]
    assert glob.glob(str(tmp_path / "**/events.out.tfevents.*"), recursive=True)
