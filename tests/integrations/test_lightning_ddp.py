"""GradflowCallback under a 2-process gloo DDP fit: every rank attaches, rank zero alone writes, and what it
writes is the all-reduced gradient (the same on both ranks' oracles), read back from TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning.pytorch")

from oracle_tools import compare, tensorboard, windows  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_lightning_run.py")


def test_every_rank_attaches_and_rank_zero_writes_the_all_reduced_gradient(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["attached"] and ranks[1]["attached"]
    assert ranks[0]["windows"] == ranks[1]["windows"] == [2, 4]
    assert ranks[0]["steps"] == len(ranks[0]["records"]) == 4           # 32 samples / 2 ranks / batch 4
    for a, b in zip(ranks[0]["records"], ranks[1]["records"]):          # all-reduced: the same on both ranks
        assert a["body.0.weight"]["norm"] == pytest.approx(b["body.0.weight"]["norm"], rel=1e-6)
    assert ranks[0]["windows"] == [2, 4]
    error = compare(windows(ranks[0]["records"], [2, 4]), tensorboard(str(tmp_path / "tb")))
    assert error < 1e-5
