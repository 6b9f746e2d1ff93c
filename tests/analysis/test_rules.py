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
    SATURATED_DROP,
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
    (history(saturated=0.9), FLAT, ["saturated", "stalled"]),
    (history(saturated=0.9), FALLING, ["healthy"]),
    (history(saturated=SATURATED_FRACTION / 2), FALLING, ["healthy"]),
    (history(dead=1.0), FALLING, ["dead-units"]),
    (history(dead=DEAD_FRACTION), FLAT, ["dead-units", "stalled"]),
    (history(dead=0.4), FALLING, ["healthy"]),
    (history(), FLAT, ["stalled"]),
    (history(zero=1.0), None, ["dead-units", "stalled"]),
    (history(sizes=(1e-5, 1e-3, 0.1), saturated=0.9), FLAT, ["vanishing", "saturated", "stalled"]),
]
IDS = ["healthy", "vanishing", "nonfinite-gradient", "nonfinite-loss", "huge-update", "growing-gradient",
       "saturated-and-stalled", "saturated-while-learning", "saturated-below-threshold", "dead-layer",
       "most-units-dead-and-stalled", "some-dead-units",
       "flat-loss", "zero-gradients",
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


# -- issue 23: persistence or harm, the graph's head, mechanisms, new detectors ----------------


def _recovering(layer_early=1e-4, recover_at=4, windows=20):
    """A 3-layer history whose first layer starts 1000x behind the head, then catches up."""
    out = history(epochs=windows, sizes=(layer_early, 0.1, 0.1))
    for w in out[recover_at:]:
        for p in ("dense_1.weight", "dense_1.bias"):
            w.gradients[p]["mean_abs"] = 0.1
            w.gradients[p]["norm"] = 0.3 if p.endswith("weight") else 0.1
    return out


def test_an_early_weak_layer_that_catches_up_is_a_note_while_the_loss_falls():
    diagnosis = diagnose(_recovering(), FALLING)
    assert diagnosis.verdicts == ["healthy"], diagnosis.report()
    assert any("dense_1" in note and "not persistently" in note for note in diagnosis.evidence["notes"])
    assert diagnose(_recovering(), FLAT).verdicts == ["vanishing", "stalled"]          # harm: a verdict
    assert diagnose(_recovering(recover_at=20), FALLING).verdicts == ["vanishing"]     # persistent: a verdict


def _named_head(head: str):
    from synthetic_windows import norm_windows
    return norm_windows({"body.0.weight": (1e-4, 1.0, 0.0), "body.1.weight": (0.05, 1.0, 0.0),
                         f"{head}.weight": (0.1, 1.0, 0.0)})


def test_the_head_is_the_last_layer_in_forward_order_whatever_its_name():
    verdicts = {}
    for name in ("head", "to_logits", "zz_not_a_head_name"):
        diagnosis = diagnose(_named_head(name), FALLING[:10])
        assert next(layer for layer, r in diagnosis.evidence["layers"].items() if r["role"] == "head") == name
        verdicts[name] = diagnosis.verdicts
    assert len({tuple(v) for v in verdicts.values()}) == 1, verdicts


def test_out_proj_is_placed_with_its_attention_and_top_level_parameters_are_not_hidden_layers():
    from synthetic_windows import norm_windows
    rows = {"cls_token": (1.0, 1.0, 0.0), "patch.weight": (0.05, 1.0, 0.0), "blocks.0.attn.in_proj_weight": (0.05, 1.0, 0.0),
            "blocks.0.mlp.weight": (0.05, 1.0, 0.0), "to_logits.weight": (0.1, 1.0, 0.0),
            "blocks.0.attn.out_proj.weight": (0.05, 1.0, 0.0)}
    order = list(rows)          # as the monitor's forward order has it: out_proj never ran, so last
    layers = diagnose(norm_windows(rows), FALLING[:10], order=order).evidence["layers"]
    assert list(layers) == ["cls_token", "patch", "blocks.0.attn", "blocks.0.attn.out_proj", "blocks.0.mlp", "to_logits"]
    assert layers["to_logits"]["role"] == "head" and layers["cls_token"]["role"] == "embedding"


def _clipped(before, clipped=5, windows=10):
    out = history(epochs=windows)
    for w in out:
        w.overall = {"steps": 5, "total_norm": 1.0, "total_norm_max": 1.0, "total_norm_before_clip": before,
                     "clipped_steps": clipped, "clip_calls": 5}
    return out


def test_exploding_from_clipping_evidence():
    from gradflow.analysis.rules import CLIP_EXCESS
    diagnosis = diagnose(_clipped(CLIP_EXCESS * 10), FLAT)
    assert "exploding" in diagnosis.verdicts and "clip" in diagnosis.evidence["checks"]["exploding"]["why"]
    assert diagnose(_clipped(3.0), FALLING).verdicts == ["healthy"]               # clipping at 3x: calm
    assert diagnose(_clipped(CLIP_EXCESS * 10, clipped=1), FALLING).verdicts == ["healthy"]   # rarely clipped


def test_a_one_step_spike_is_read_per_step_not_averaged_over_its_window():
    from gradflow.analysis.rules import GRADIENT_GROWTH
    windows = history(epochs=10)
    for w in windows:
        w.overall = {"steps": 16, "total_norm": 1.0, "total_norm_max": 1.0}
    # one step of 16 at 2 * GRADIENT_GROWTH: the window's mean is only 1/8 of that
    windows[6].overall.update(total_norm=1.0 + 2 * GRADIENT_GROWTH / 16, total_norm_max=2 * GRADIENT_GROWTH)
    assert windows[6].overall["total_norm"] < GRADIENT_GROWTH
    assert "exploding" in diagnose(windows, FLAT[:10]).verdicts          # with harm: the loss stalled
    learned = diagnose(windows, FALLING[:10])                             # recovered: a note, not a verdict
    assert "exploding" not in learned.verdicts
    assert any("a spike the run recovered from" in note for note in learned.evidence["notes"])


def test_saturation_at_either_end_of_a_bounded_activation():
    windows = history()
    for w in windows:      # Glorot & Bengio 2010: a sigmoid top layer near 0, none past 0.97 of its range
        w.activations = {"sigmoid_1": {"mean": 0.02, "std": 0.01, "saturated_fraction": 0.0},
                         "sigmoid_2": {"mean": 0.5, "std": 0.2, "saturated_fraction": 0.0}}
    diagnosis = diagnose(windows, FLAT)
    assert "saturated" in diagnosis.verdicts and "sigmoid_1" in diagnosis.evidence["checks"]["saturated"]["why"]
    learning = diagnose(windows, FALLING)        # a gate that learned to stay shut: a note while it learns
    assert learning.verdicts == ["healthy"] and any("one end" in n for n in learning.evidence["notes"])
    for w in windows:
        w.activations["sigmoid_1"]["mean"] = 0.3
    assert diagnose(windows, FLAT).verdicts == ["stalled"]


def test_a_saturated_share_is_a_verdict_with_harm_and_a_note_while_the_loss_falls():
    # issue 23: tutorial deep_tanh seed 5 learned (test 0.806) with over 0.4 of a layer past 0.97
    windows = history(saturated=SATURATED_FRACTION + 0.05)
    stalled = diagnose(windows, FLAT).evidence["checks"]["saturated"]
    assert stalled["fired"] and "and the loss stalled" in stalled["why"] and "45%" in stalled["why"]
    learning = diagnose(windows, FALLING)                      # falls 59% after the early part
    assert learning.verdicts == ["healthy"]
    note = [n for n in learning.evidence["notes"] if "saturated" in n]
    assert note and "45%" in note[0] and "still fell 59%" in note[0]
    # falling, but less than SATURATED_DROP: harm (deep_tanh seeds 2, 6, 8, 9 fell 5% - 14%, test <= 0.62)
    slow = [0.7 * (1 - 0.8 * SATURATED_DROP * min(e, 10) / 10) for e in range(20)]
    assert diagnose(windows, slow).verdicts == ["saturated"]
    fast = [0.7 * (1 - 1.2 * SATURATED_DROP * min(e, 10) / 10) for e in range(20)]
    assert diagnose(windows, fast).verdicts == ["healthy"]
    assert "saturated" in diagnose(windows).verdicts          # no loss to judge harm by: the share decides
    assert diagnose(history(saturated=SATURATED_FRACTION - 0.05), FLAT).verdicts == ["stalled"]


def test_oscillating_loss_is_a_verdict_when_it_does_not_converge_and_a_note_while_it_learns():
    zigzag = [0.7 + (0.3 if i % 2 else -0.3) for i in range(20)]
    assert "oscillating" in diagnose(history(), zigzag).verdicts
    learning = [1.0 - 0.03 * i + (0.25 if i % 2 else -0.25) for i in range(20)]
    diagnosis = diagnose(history(), learning)
    assert "oscillating" not in diagnosis.verdicts
    assert any("swings" in note for note in diagnosis.evidence["notes"])
    assert "oscillating" not in diagnose(history(), FALLING).verdicts


def test_an_output_that_does_not_fit_a_probability_loss():
    from torch import nn
    relu_out = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    losses = FALLING[:-1] + [math.inf]
    diagnosis = diagnose(history(), losses, model=relu_out, loss_fn=nn.NLLLoss())
    assert "output-mismatch" in diagnosis.verdicts
    assert "non-finite" in diagnosis.evidence["checks"]["output-mismatch"]["why"]
    fits = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2), nn.LogSoftmax(-1))
    assert "output-mismatch" not in diagnose(history(), FALLING, model=fits, loss_fn=nn.NLLLoss()).verdicts
    assert "output-mismatch" not in diagnose(history(), FALLING, model=relu_out, loss_fn=nn.MSELoss()).verdicts


def test_a_gradient_tiny_in_every_layer_alike():
    from synthetic_windows import norm_windows

    from gradflow.analysis.rules import TINY_GRADIENT
    tiny = {f"dense_{i}.weight": (TINY_GRADIENT / 10, 1.0, 0.0) for i in range(1, 4)}
    assert "tiny-gradient" in diagnose(norm_windows(tiny), [0.693] * 10).verdicts
    diagnosis = diagnose(norm_windows(tiny), FALLING[:10])
    assert "tiny-gradient" not in diagnosis.verdicts and any("every layer alike" in n for n in diagnosis.evidence["notes"])


def test_the_rules_table_is_the_one_in_the_docs():
    """docs/calibration.md shows rules.RULES as rules_markdown() writes it; regenerate with
    ``python -c "from gradflow.analysis.rules import rules_markdown; print(rules_markdown())"``."""
    from pathlib import Path

    from gradflow.analysis.advice import ADVICE
    from gradflow.analysis.rules import RULES, rules_markdown
    docs = (Path(__file__).resolve().parents[2] / "docs" / "calibration.md").read_text()
    assert rules_markdown() in docs
    assert all(rule.advice in ADVICE for rule in RULES)
    assert ("healthy",) + tuple(rule.name for rule in RULES) == VERDICTS


def test_most_units_killed_by_a_step_too_large_are_dead_units_even_while_the_loss_falls():
    windows = history(dead=0.05)
    for w in windows[3:]:
        for tap in w.activations.values():
            tap["dead_fraction"] = 0.75
    windows[3].gradients["dense_2.weight"]["weight_update_ratio"] = 16 * 2 * EXPLODING_UPDATE   # the jolt
    diagnosis = diagnose(windows, FALLING)
    assert diagnosis.verdicts == ["exploding", "dead-units"], diagnosis.line()
    assert "step too large" in diagnosis.evidence["checks"]["dead-units"]["why"]
    calm = history(dead=0.05)
    for w in calm[3:]:
        for tap in w.activations.values():
            tap["dead_fraction"] = 0.75
    assert diagnose(calm, FALLING).verdicts == ["healthy"]          # no jolt, still learning: a note
