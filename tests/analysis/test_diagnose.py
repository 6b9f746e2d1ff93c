"""Diagnosis: each verdict class on synthetic histories, on recorded run directories, and on a
few short real runs; the line, report and JSON forms; the TensorBoard scalars."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import (
    DEAD_FRACTION,
    EXPLODING_UPDATE,
    MIN_WINDOWS,
    SATURATED_FRACTION,
    VANISHING_RATIO,
    VERDICTS,
    Diagnosis,
    diagnose,
    diagnose_monitor,
    diagnose_run,
    measure_activations,
    parameter_kinds,
    recommend,
    scalars,
    write_to_tensorboard,
)
from gradflow.monitor import Window
from gradflow.experiments.recording import MonitorCallback
from recorded_runs import record_run


def history(epochs=20, sizes=(0.1, 0.1, 0.1), update=1e-3, saturated=None, dead=None, nonfinite=0,
            zero=0.0, grow=1.0):
    """Windows of a 3-layer model: ``sizes`` = mean |g| per layer (input first) in every
    window, times ``grow ** epoch``; activations per hidden layer if given."""
    windows = []
    for epoch in range(epochs):
        gradients = {}
        for i, size in enumerate(sizes, start=1):
            g = size * grow ** epoch
            gradients[f"dense_{i}.weight"] = {"mean_abs": g, "norm": 3 * g, "max_abs": 2 * g, "zero_fraction": zero,
                                              "nonfinite": nonfinite if epoch == epochs - 1 else 0,
                                              "weight_update_ratio": update * 16, "steps": 16}
            gradients[f"dense_{i}.bias"] = {"mean_abs": g, "norm": g, "max_abs": g, "zero_fraction": zero,
                                            "nonfinite": 0, "weight_update_ratio": math.nan, "steps": 16}
        activations = {}
        for i in range(1, len(sizes)):
            if saturated is not None:
                activations[f"tanh_{i}"] = {"mean": 0.0, "std": 0.9, "saturated_fraction": saturated}
            if dead is not None:
                activations[f"relu_{i}"] = {"mean": 0.1, "std": 0.2, "dead_fraction": dead}
        windows.append(Window(epoch, 16, gradients=gradients, activations=activations))
    return windows


FALLING = [0.7 * 0.95 ** e for e in range(20)]
FLAT = [0.693] * 20

CASES = [
    (history(), FALLING, ["healthy"]),
    (history(sizes=(1e-4, 1e-3, 0.1)), FALLING, ["vanishing"]),
    (history(nonfinite=3), FALLING, ["exploding"]),
    (history(), FALLING[:-1] + [math.nan], ["exploding"]),
    (history(update=EXPLODING_UPDATE * 2), FALLING, ["exploding"]),
    (history(grow=2.0), FALLING, ["exploding"]),
    (history(saturated=0.9), FALLING, ["saturated"]),
    (history(saturated=SATURATED_FRACTION / 2), FALLING, ["healthy"]),
    (history(dead=DEAD_FRACTION), FALLING, ["dead-units"]),
    (history(dead=0.4), FALLING, ["healthy"]),
    (history(), FLAT, ["stalled"]),
    (history(zero=1.0), None, ["dead-units", "stalled"]),
    (history(sizes=(1e-5, 1e-3, 0.1), saturated=0.9), FLAT, ["vanishing", "saturated", "stalled"]),
]
IDS = ["healthy", "vanishing", "nonfinite-gradient", "nonfinite-loss", "huge-update", "growing-gradient",
       "saturated", "saturated-below-threshold", "dead-layer", "some-dead-units", "flat-loss", "zero-gradients",
       "vanishing-saturated-stalled"]


@pytest.mark.parametrize("windows, losses, expected", CASES, ids=IDS)
def test_each_verdict_on_synthetic_histories(windows, losses, expected):
    diagnosis = diagnose(windows, losses)
    assert diagnosis.verdicts == expected
    assert set(diagnosis.verdicts) <= set(VERDICTS)
    assert diagnosis.line().startswith("Verdict: " + ", ".join(expected))
    for verdict in expected:
        if verdict != "healthy":
            assert diagnosis.evidence["checks"][verdict]["fired"]


def test_vanishing_threshold_is_on_the_weakest_hidden_layer():
    # dense_1 (the input end) under INPUT_END_RATIO of the head, dense_2 the weakest
    just_above = diagnose(history(sizes=(0.01, VANISHING_RATIO * 1.5 * 0.1, 0.1)))
    just_below = diagnose(history(sizes=(0.01, VANISHING_RATIO * 0.5 * 0.1, 0.1)))
    assert just_above.verdicts == ["healthy"] and just_below.verdicts == ["vanishing"]
    assert "dense_2 gradient" in just_below.line()


def test_layer_evidence_uses_weights_and_reads_trend():
    windows = history(sizes=(0.001, 0.01, 0.1))
    for w in windows[10:]:                      # the first layer recovers later in the run
        w.gradients["dense_1.weight"]["mean_abs"] = 0.05
    layers = diagnose(windows).evidence["layers"]
    assert list(layers) == ["dense_1", "dense_2", "dense_3"]
    assert layers["dense_1"]["parameter"] == "dense_1.weight"
    assert layers["dense_1"]["ratio_early"] == pytest.approx(0.01)
    assert layers["dense_1"]["ratio_last"] == pytest.approx(0.5)
    assert layers["dense_1"]["update_ratio"] == pytest.approx(1e-3)        # NaN bias ratios are missing
    assert layers["dense_3"]["ratio_early"] == 1.0


def test_output_squashing_is_not_judged_for_saturation():
    windows = history(saturated=0.1)
    for w in windows:
        w.activations["sigmoid_3"] = {"mean": 0.5, "std": 0.5, "saturated_fraction": 1.0}
    activations = measure_activations(windows)
    assert activations["sigmoid_3"]["output"] and "output" not in activations["tanh_2"]
    assert diagnose(windows).verdicts == ["healthy"]


def test_parameters_without_gradient_in_some_windows():
    windows = history()
    del windows[0].gradients["dense_1.weight"], windows[0].gradients["dense_1.bias"]
    assert diagnose(windows).verdicts == ["healthy"]


def test_empty_history_is_an_error():
    with pytest.raises(ValueError, match="monitor.log"):
        diagnose([])


def test_json_form_is_strict_json():
    diagnosis = diagnose(history(sizes=(1e-5, 1e-3, 0.1), zero=0.0), FLAT)
    text = json.dumps(diagnosis.to_dict(), allow_nan=False)      # NaN evidence became null
    data = json.loads(text)
    assert data["verdicts"] == ["vanishing", "stalled"]
    assert data["line"].startswith("Verdict: vanishing, stalled (")
    assert data["evidence"]["layers"]["dense_1"]["ratio_early"] == pytest.approx(1e-4)
    assert data["evidence"]["checks"]["vanishing"]["threshold"] == VANISHING_RATIO
    assert data["recommendation"]


def test_report_has_tables_checks_and_advice():
    report = diagnose(history(saturated=0.9), FALLING).report()
    assert report.splitlines()[0].startswith("Verdict: saturated")
    assert "dense_2" in report and "tanh_1" in report and "90%" in report
    assert "Checks:" in report and "Recommendation:" in report and "Xavier" in report


@pytest.mark.parametrize("verdicts, words", [
    (["healthy"], "Nothing to fix"),
    (["vanishing", "saturated"], "He initialization"),
    (["exploding"], "learning rate"),
    (["dead-units"], "fewer layers"),
], ids=["healthy", "tanh", "exploding", "dead"])
def test_recommendation_in_plain_words(verdicts, words):
    assert words in recommend(verdicts)


class FakeWriter:
    def __init__(self):
        self.scalars, self.texts = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_text(self, tag, text, step):
        self.texts[tag] = (text, step)


def test_tensorboard_scalars_and_text():
    diagnosis = diagnose(history(sizes=(1e-5, 1e-3, 0.1)))
    writer = FakeWriter()
    write_to_tensorboard(diagnosis, writer, 19)
    assert writer.scalars["diagnosis/vanishing"] == (1.0, 19)
    assert writer.scalars["diagnosis/healthy"] == (0.0, 19)
    assert {f"diagnosis/{v}" for v in VERDICTS} <= set(writer.scalars)
    assert writer.scalars["diagnosis/vanishing/value"][0] == pytest.approx(1e-4)
    assert writer.scalars["diagnosis/dense_1/ratio_early"][0] == pytest.approx(1e-4)
    text, step = writer.texts["diagnosis"]
    assert step == 19 and "Verdict: vanishing" in text
    assert all(math.isfinite(v) for v, _ in writer.scalars.values())


def test_scalars_of_a_bare_diagnosis():
    assert scalars(Diagnosis(["healthy"], {"checks": {}}))["diagnosis/healthy"] == 1.0


# -- live monitor and run directories ------------------------------------------------------


def test_diagnose_a_live_monitor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 2), torch.randn(64, 1)
    losses = []
    with GradientMonitor(model) as monitor:
        for epoch in range(5):
            for _ in range(4):
                optimizer.zero_grad()
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
        diagnosis = diagnose_monitor(monitor, losses)
    assert diagnosis.evidence["windows"] == 5
    assert list(diagnosis.evidence["layers"]) == ["0", "2"]
    assert "1" in diagnosis.evidence["activations"]
    assert set(diagnosis.verdicts) <= set(VERDICTS)


def test_batched_monitor_needs_a_member():
    windows = []
    for member, sizes in enumerate([(0.1, 0.1, 0.1), (1e-5, 1e-3, 0.1)]):
        for w in history(sizes=sizes):
            w.member = member
            windows.append(w)
    monitor = SimpleNamespace(history=windows)
    with pytest.raises(ValueError, match="member=k"):
        diagnose_monitor(monitor)
    assert diagnose_monitor(monitor, member=0).verdicts == ["healthy"]
    assert diagnose_monitor(monitor, member=1).verdicts == ["vanishing"]


def test_run_directory_matches_its_live_history(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        recorder = MonitorCallback(monitor, tmp_path)
        for epoch in range(4):
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(8, 2)).pow(2).mean().backward()
                optimizer.step()
            recorder.epoch_end(epoch, {})
        recorder.close()
    live, recorded = diagnose_monitor(monitor).to_dict(), diagnose_run(tmp_path).to_dict()
    assert recorded["verdicts"] == live["verdicts"]
    assert recorded["evidence"]["layers"].keys() == live["evidence"]["layers"].keys()
    for layer, row in live["evidence"]["layers"].items():
        for key, value in row.items():
            if isinstance(value, float):
                assert recorded["evidence"]["layers"][layer][key] == pytest.approx(value, rel=1e-9), (layer, key)
    assert recorded["evidence"]["activations"] == live["evidence"]["activations"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such run directory"),
    (lambda p: p, "no gradients.csv"),
], ids=["missing-dir", "no-gradients-csv"])
def test_run_directory_errors(tmp_path, make, message):
    with pytest.raises(FileNotFoundError, match=message):
        diagnose_run(make(tmp_path))


# -- short real runs: one per verdict class ------------------------------------------------

REAL = [
    ("configs/deep_relu.yaml", ["train.epochs=60", "train.seed=1"], {"healthy"}, set()),
    ("configs/deep_tanh.yaml", ["train.epochs=30", "train.seed=3"], {"vanishing", "saturated"}, {"healthy"}),
    ("configs/deep_relu.yaml", ["train.epochs=5", "optimizer.lr=10", "train.on_nonfinite=continue"],
     {"exploding"}, {"healthy"}),
    ("configs/deep_relu_20.yaml", ["train.epochs=60", "train.seed=1"], {"dead-units", "stalled"}, {"healthy"}),
]


@pytest.mark.parametrize("config, overrides, present, absent", REAL,
                         ids=["deep-relu-healthy", "deep-tanh-vanishing", "lr10-exploding", "relu20-dead"])
def test_real_short_runs(tmp_path, config, overrides, present, absent):
    run_dir = record_run(tmp_path / "run", config, overrides)
    diagnosis = diagnose_run(run_dir)
    assert present <= set(diagnosis.verdicts), diagnosis.report()
    assert not absent & set(diagnosis.verdicts), diagnosis.report()
    json.dumps(diagnosis.to_dict(), allow_nan=False)


# -- architectures: like with like, the real head, stacked RNNs, too little evidence -------------


def _windows(rows, count=10):
    """``count`` windows of per-parameter (grad norm, weight norm, zero fraction) rows."""
    return [Window(i, 4, gradients={name: {"mean_abs": g, "norm": g, "weight_norm": w, "zero_fraction": z,
                                           "nonfinite": 0, "weight_update_ratio": 4e-3, "steps": 4}
                                    for name, (g, w, z) in rows.items()}) for i in range(count)]


def test_layers_compare_gradient_relative_to_weight():
    # per element the conv gradient is 100x smaller, relative to its weight it is not
    windows = _windows({"conv.weight": (1.0, 10.0, 0.0), "fc.weight": (0.1, 1.0, 0.0)})
    layers = diagnose(windows, [1.0 - 0.05 * i for i in range(10)]).evidence["layers"]
    assert layers["conv"]["ratio_early"] == pytest.approx(1.0)
    assert layers["fc"]["role"] == "head"


def test_norm_layers_and_biases_are_not_evidence():
    windows = _windows({"conv1.weight": (0.1, 1.0, 0.0), "bn1.weight": (1e-6, 1.0, 0.0),
                        "conv2.weight": (0.1, 1.0, 0.0), "conv2.bias": (1e-9, 1.0, 0.0), "fc.weight": (0.1, 1.0, 0.0)})
    diagnosis = diagnose(windows, [1.0 - 0.05 * i for i in range(10)])
    assert diagnosis.verdicts == ["healthy"], diagnosis.report()
    assert diagnosis.evidence["layers"]["bn1"]["role"] == "norm"
    assert diagnosis.evidence["layers"]["conv2"]["ratio_early"] == pytest.approx(1.0)


def test_tied_head_is_the_embedding_and_rows_without_gradient_do_not_count():
    # GPT-2 lists the tied head once, as the embedding; ln_f comes last
    windows = _windows({"wte.weight": (0.1, 1.0, 0.0), "h.0.attn.weight": (0.1, 1.0, 0.0),
                        "ln_f.weight": (1e-5, 1.0, 0.0)})
    layers = diagnose(windows).evidence["layers"]
    assert layers["wte"]["role"] == "head" and layers["ln_f"]["role"] == "norm"
    rows = _windows({"embed.weight": (0.01, 1.0, 0.99), "fc.weight": (0.1, 1.0, 0.0), "head.weight": (0.1, 1.0, 0.0)})
    embed = diagnose(rows).evidence["layers"]["embed"]
    assert embed["ratio_early"] == pytest.approx(1.0) and embed["role"] == "embedding"


def test_tied_head_from_the_model():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "mix": nn.Linear(4, 4), "norm": nn.LayerNorm(4),
                           "lm_head": nn.Linear(4, 10, bias=False)})
    model["lm_head"].weight = model["emb"].weight
    kinds = parameter_kinds(model)
    assert kinds["@head"] == "emb.weight" and kinds["norm.weight"] == "norm"
    windows = _windows({"emb.weight": (0.1, 1.0, 0.0), "mix.weight": (0.1, 1.0, 0.0),
                        "norm.weight": (1e-6, 1.0, 0.0)})
    assert diagnose(windows, model=model).evidence["layers"]["emb"]["role"] == "head"


def test_forward_order_decides_input_and_output():
    windows = _windows({"head.weight": (0.1, 1.0, 0.0), "a.weight": (1e-5, 1.0, 0.0), "b.weight": (1e-4, 1.0, 0.0)})
    diagnosis = diagnose(windows, order=["a.weight", "b.weight", "head.weight"])
    assert list(diagnosis.evidence["layers"])[0] == "a" and "vanishing" in diagnosis.verdicts
    assert diagnosis.evidence["order"] == "forward"


def test_stacked_lstm_is_judged_per_layer():
    rows = {"embed.weight": (0.01, 1.0, 0.9)}
    for k, g in enumerate((1e-5, 1e-4, 1e-3, 0.05)):
        rows.update({f"lstm.weight_ih_l{k}": (g, 1.0, 0.0), f"lstm.weight_hh_l{k}": (g, 1.0, 0.0),
                     f"lstm.bias_ih_l{k}": (g, 1.0, 0.0)})
    rows["head.weight"] = (0.1, 1.0, 0.0)
    diagnosis = diagnose(_windows(rows), [5.0 - 0.1 * i for i in range(10)])
    assert [l for l in diagnosis.evidence["layers"] if l.startswith("lstm")] == ["lstm.l0", "lstm.l1", "lstm.l2", "lstm.l3"]
    assert diagnosis.verdicts == ["vanishing"]
    assert diagnosis.evidence["family"] == "recurrent" and "clip" in diagnosis.recommendation


def test_weak_layer_near_the_output_with_a_strong_input_end_is_not_vanishing():
    # ResNet-34 in the issue: the last conv 94x smaller than fc, the first conv 4.2x larger
    windows = _windows({"conv1.weight": (0.42, 1.0, 0.0), "layer4.conv2.weight": (0.1 / 94, 1.0, 0.0),
                        "fc.weight": (0.1, 1.0, 0.0)})
    assert diagnose(windows, [2.0 - 0.1 * i for i in range(10)]).verdicts == ["healthy"]


@pytest.mark.parametrize("count", [1, MIN_WINDOWS - 1], ids=["one-window", "just-too-few"])
def test_too_few_windows_are_insufficient_not_healthy(count):
    diagnosis = diagnose(history(epochs=count), FALLING[:count])
    assert diagnosis.verdicts == ["insufficient"]
    assert f"at least {MIN_WINDOWS}" in diagnosis.line() or f"at least {MIN_WINDOWS}" in diagnosis.report()
    assert diagnose(history(epochs=count, nonfinite=3)).verdicts == ["exploding"]     # a fired rule stands


@pytest.mark.parametrize("family, word", [("cnn", "batch normalization"), ("transformer", "warm"),
                                          ("recurrent", "clip"), ("mlp", "He initialization")],
                         ids=["cnn", "transformer", "recurrent", "mlp"])
def test_advice_by_family(family, word):
    assert word in recommend(["vanishing", "exploding"], family)


def test_steps_skipped_on_overflow_are_evidence():
    from gradflow.monitor import Window

    def window(step, skipped, steps=10):
        w = Window(step, steps, gradients={"dense_1.weight": {"mean_abs": 1e-2, "nonfinite": 0},
                                           "dense_2.weight": {"mean_abs": 1e-2, "nonfinite": 0}})
        w.overall = {"steps": steps, "skipped_steps": skipped}
        return w

    calibrating = diagnose([window(0, 3)] + [window(i, 0) for i in range(1, 6)])
    assert "exploding" not in calibrating.verdicts
    assert any("3 of 63 steps skipped on overflow" in note for note in calibrating.evidence["notes"])
    overflowing = diagnose([window(i, 0) for i in range(5)] + [window(5, 8, steps=2)])
    assert "exploding" in overflowing.verdicts
    assert "8 of 10 steps of the last window skipped on overflow" in overflowing.evidence["checks"]["exploding"]["why"]
