"""The tutorial's outcome at the full 500 epochs, as rates over seeds 0-9, and its verdicts.

deep_relu learns the two circles, deep_tanh does not, shallow_tanh does; deep_relu is
``healthy`` in every seed. deep_tanh is judged by each seed's outcome (issue 23: a run that
learns is not called a pathology): a seed that did not learn (test accuracy < LEARNED) is not
``healthy``; one that learned (seed 5 learns, 0.806) is ``healthy`` and carries its saturation
as a note (docs/calibration.md, the tutorial's 10-seed calibration). Each config's 10 seeds
train as one batched model (``gradflow train --seeds``: each member on its solo trajectory),
about 25-50 s a config. Run with ``-s`` to see the per-seed accuracies and verdicts.
"""

import statistics
from pathlib import Path

import pytest

from gradflow.analysis.diagnose import diagnose_run
from gradflow.experiments.config import load_config
from gradflow.experiments.sweeps.seeds import train_seeds

ROOT = Path(__file__).resolve().parents[2]
SEEDS = tuple(range(10))
# Test accuracy at which a seed counts as learned (benchmarks/calibrate_diagnosis.py's LEARNED):
# deep_relu's worst seed, healthy, reaches 0.752; deep_tanh's seeds that did not learn at most
# 0.624, the one that learned 0.806 (docs/calibration.md's per-seed table).
LEARNED = 0.75

# config -> (comparison, threshold) on the median test accuracy over SEEDS, and the verdict
# expectation in every seed (docs/calibration.md): "healthy" exactly, "by outcome" (not healthy
# below LEARNED; healthy with a saturation note at or above it), or "-".
TARGETS = {
    "deep_relu": (">=", 0.80, "healthy"),
    "deep_tanh": ("<=", 0.65, "by outcome"),
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
    elif expected == "by outcome":
        for seed, (_, test), verdict in zip(SEEDS, accuracies, verdicts):
            if test < LEARNED:
                assert "healthy" not in verdict, (seed, test, verdict)
                continue
            assert verdict == ["healthy"], (seed, test, verdict)
            notes = diagnose_run(next(outcome.directory.glob(f"*-seed{seed}"))).evidence["notes"]
            assert any("saturated" in note for note in notes), (seed, notes)
