"""The diagnosis on standard architectures, over seeds 0, 1, 2 (benchmarks/calibrate_architectures.py).

Every healthy run that learns (ResNet-style CNN with BatchNorm, the issue's ResNet-34 (about a
minute of the test's time), tiny Hugging Face GPT-2 with the
full vocabulary and tied embeddings, nanoGPT, nn.TransformerEncoder LM, one-layer LSTM LM) is
``healthy``; every pathological one carries the right verdict. docs/calibration.md has the table.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("calibrate_architectures",
                                               ROOT / "benchmarks" / "calibrate_architectures.py")
calibration = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = calibration          # its dataclass looks its module up there
_spec.loader.exec_module(calibration)

SEEDS = (0, 1, 2)
LEARNS = {"resnet", "resnet34", "gpt2", "nanogpt", "encoder_lm", "lstm1"}   # the loss must fall by half or more


@pytest.mark.slow
@pytest.mark.parametrize("name", list(calibration.RUNS), ids=list(calibration.RUNS))
def test_architecture_verdicts_over_seeds(name, one_thread):
    spec = calibration.RUNS[name]
    if name == "gpt2":
        pytest.importorskip("transformers", reason="the tiny GPT-2 is built with transformers (extra: transformers)")
    for seed in SEEDS:
        windows, losses, order, model = calibration.train(spec, seed)
        diagnosis = calibration.judge(windows, losses, order, model)
        print(f"\n{name} seed {seed}: loss {losses[0]:.3g} -> {losses[-1]:.3g}: {diagnosis.line()}")
        if name in LEARNS:
            assert losses[-1] < losses[0] / 2, losses
        assert calibration.met(spec.expect, diagnosis.verdicts), diagnosis.report()
