"""The tutorial's outcome at the full 500 epochs, as rates over seeds 0-9, and its verdicts.

deep_relu learns the two circles, deep_tanh does not, shallow_tanh does; deep_relu is
``healthy`` in every seed and deep_tanh in none (docs/calibration.md, the tutorial's 10-seed
calibration). Each config's 10 seeds train as one batched model (``gradflow train --seeds``:
each member on its solo trajectory), about 25-50 s a config. Run with ``-s`` to see the
per-seed accuracies and verdicts.
"""

import statistics
from pathlib import Path

import pytest

from gradflow.experiments.config import load_config
from gradflow.experiments.sweeps.seeds import train_seeds

ROOT = Path(__file__).resolve().parents[2]
SEEDS = tuple(range(10))

# config -> (comparison, threshold) on the median test accuracy over SEEDS, and the verdict
# expectation in every seed (docs/calibration.md): "healthy" exactly, "not healthy", or "-".
TARGETS = {
    "deep_relu": (">=", 0.80, "healthy"),
    "deep_tanh": ("<=", 0.65, "not healthy"),
    "shallow_tanh": (">=", 0.75, "-"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS), ids=list(TARGETS))
def test_tutorial_outcome_over_seeds(name, one_thread, tmp_path):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    outcome = train_seeds(cfg, list(SEEDS), tmp_path, workers=1, progress=False)
    accuracies = [(s["train_accuracy"], s["test_accuracy"]) for s in outcome.summaries]
    verdicts = [s["verdict"] for s in outcome.summaries]
    for seed, (train, test), verdict in zip(SEEDS, accuracies, verdicts):
        print(f"\n{name} seed {seed}: Train: {train:.3f}, Test: {test:.3f}, verdict {', '.join(verdict)}")
    median = statistics.median(test for _, test in accuracies)
    op, threshold, expected = TARGETS[name]
    print(f"{name}: median test accuracy {median:.3f} (target {op} {threshold})")
    assert median >= threshold if op == ">=" else median <= threshold, accuracies
    if expected == "healthy":
        assert all(v == ["healthy"] for v in verdicts), verdicts
    elif expected == "not healthy":
        assert all("healthy" not in v for v in verdicts), verdicts
