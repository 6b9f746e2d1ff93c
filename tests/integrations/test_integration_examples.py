"""The examples in examples/ run as a user runs them, print a verdict and leave TensorBoard events."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = [("lightning_example.py", "lightning.pytorch"), ("hf_trainer_example.py", "transformers")]


@pytest.mark.parametrize("script,framework", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(tmp_path, script, framework):
    pytest.importorskip(framework)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Verdict:" in run.stdout and "Recommendation:" in run.stdout
    assert glob.glob(str(tmp_path / "**/events.out.tfevents.*"), recursive=True)
