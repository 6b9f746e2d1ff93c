"""Rules: each verdict class on synthetic histories, the thresholds at their edges, the input-end
guard, too little evidence, steps skipped on overflow."""

import math

import pytest

from gradflow.analysis.diagnose import VERDICTS, diagnose
from gradflow.analysis.rules import (
    DEAD_FRACTION,
    EXPLODING_UPDATE,
    MIN_WINDOWS,
    SATURATED_FRACTION,
    VANISHING_RATIO,
)
from gradflow.monitor import Window
from synthetic_windows import FALLING, FLAT, history, norm_windows

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
