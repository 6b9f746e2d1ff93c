"""gradflow train on a run that goes non-finite: the exit-3 message and the verdict tell one story."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_stop_message_names_the_same_source_as_the_verdict(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "gradflow.cli", "train", str(ROOT / "configs/deep_relu.yaml"),
                           "optimizer.lr=1e8", "train.epochs=3", "--logdir", str(tmp_path), "--quiet"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 3, done.stderr
    stop = re.search(r"training stopped: the first non-finite value came from (\S+ \((?:forward|backward)\)) "
                     r"at epoch (\d+), step (\d+)", done.stderr)
    assert stop, done.stderr
    verdict = re.search(r"Verdict: .*exploding.*the first non-finite value came from (\S+ \((?:forward|backward)\)) "
                        r"at step (\d+)", done.stdout)
    assert verdict, done.stdout
    assert stop.group(1) == verdict.group(1)
    assert stop.group(3) == verdict.group(2)               # a fresh run: the monitor's step is the global step
    run_dir = next(tmp_path.glob("*/summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    from gradflow.analysis.diagnose import diagnose_run

    assert f"the first non-finite value came from {stop.group(1)} at step {stop.group(3)}" in diagnose_run(run_dir).line()
    assert f"{summary['first_nonfinite']['where']}" == stop.group(1)
    assert summary["stop_reason"].startswith(f"the first non-finite value came from {stop.group(1)}")
