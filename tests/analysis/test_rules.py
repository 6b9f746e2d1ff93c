"""Rules: each verdict class on synthetic histories, the thresholds at their edges, the input-end
guard, too little evidence, steps skipped on overflow."""

import math

import pytest
from synthetic_windows import FALLING, FLAT, history, norm_windows

from gradflow.analysis.diagnose import VERDICTS, diagnose
from gradflow.analysis.rules import (
    DEAD_FRACTION,
    EXPLODING_UPDATE,
    MIN_WINDOWS,
    SATURATED_FRACTION,
    VANISHING_RATIO,
)
from gradflow.monitor import Window

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


def test_weak_layer_near_the_output_with_a_strong_input_end_is_not_vanishing():
    # ResNet-34 in the issue: the last conv 94x smaller than fc, the first conv 4.2x larger
    windows = norm_windows({"conv1.weight": (0.42, 1.0, 0.0), "layer4.conv2.weight": (0.1 / 94, 1.0, 0.0),
                        "fc.weight": (0.1, 1.0, 0.0)})
    assert diagnose(windows, [2.0 - 0.1 * i for i in range(10)]).verdicts == ["healthy"]


@pytest.mark.parametrize("count", [1, MIN_WINDOWS - 1], ids=["one-window", "just-too-few"])
def test_too_few_windows_are_insufficient_not_healthy(count):
    diagnosis = diagnose(history(epochs=count), FALLING[:count])
    assert diagnosis.verdicts == ["insufficient"]
    assert diagnosis.line().startswith(f"Verdict: insufficient (too short to judge: only {count} window")
    assert "Lightning: one every log_every_n_steps steps" in diagnosis.line()
    # A rule that fired on too few windows stands beside it, as an early sign.
    assert diagnose(history(epochs=count, nonfinite=3)).verdicts == ["insufficient", "exploding"]


def test_steps_skipped_on_overflow_are_evidence():
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


def _resnet_windows(updates, shortcut_size=1e-3, stem=1.0):
    """A stem conv -> BN, a block conv, a 1x1 projection shortcut (conv -> BN), and fc; the stem
    conv's update ratio per window from ``updates``."""
    windows = norm_windows({"conv1.weight": (stem, 1.0, 0.0), "bn1.weight": (0.1, 1.0, 0.0),
                            "layer1.0.conv1.weight": (0.5, 1.0, 0.0),
                            "layer2.0.downsample.0.weight": (shortcut_size, 1.0, 0.0),
                            "layer2.0.downsample.1.weight": (0.1, 1.0, 0.0), "fc.weight": (1.0, 1.0, 0.0)},
                           count=len(updates))
    kinds = {"conv1.weight": "conv", "bn1.weight": "norm", "layer1.0.conv1.weight": "conv",
             "layer2.0.downsample.0.weight": "conv", "layer2.0.downsample.1.weight": "norm", "fc.weight": "linear"}
    for window, update in zip(windows, updates):
        window.gradients["conv1.weight"]["weight_update_ratio"] = update * window.steps
        window.kinds = kinds
    return windows


def test_a_conv_before_a_norm_is_judged_on_its_last_update():
    """Scale-invariant weights (conv -> BN): a large first step that shrinks as ||w|| grows is a
    learning ResNet-34's stem (0.30 -> 0.002), not an explosion; one still large at the end is,
    and so is one large step of a layer with no normalisation after it."""
    big = EXPLODING_UPDATE * 2
    settling = diagnose(_resnet_windows([big, big / 2, 0.07, 0.04, 0.02, 0.01]), FALLING)
    assert settling.verdicts == ["healthy"] and settling.evidence["layers"]["conv1"]["normalised"]
    assert diagnose(_resnet_windows([big] * 6), FALLING).verdicts == ["exploding"]
    fc_first = _resnet_windows([0.01] * 6)
    for window in fc_first:                      # fc has no norm after it: judged on its largest step
        window.gradients["fc.weight"]["weight_update_ratio"] = (EXPLODING_UPDATE * 1.1 if window.step == 0 else
                                                                0.01) * window.steps
    assert diagnose(fc_first, FALLING).verdicts == ["exploding"]


def test_projection_shortcuts_are_shown_not_judged_for_vanishing():
    """A 1x1 projection at 1/1000 of the head with the input end at 1/10 (under the 1/7 guard):
    the shortcut is not a hidden layer, so the weakest is the stem, 1/10: not vanishing."""
    diagnosis = diagnose(_resnet_windows([0.01] * 6, shortcut_size=1e-3, stem=0.1), FALLING)
    layers = diagnosis.evidence["layers"]
    assert layers["layer2.0.downsample.0"]["role"] == "shortcut" and diagnosis.verdicts == ["healthy"]
    assert layers["layer2.0.downsample.1"]["role"] == "norm"
    assert diagnose(_resnet_windows([0.01] * 6, shortcut_size=1e-3, stem=1e-3), FALLING).verdicts == ["vanishing"]
