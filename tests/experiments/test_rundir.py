"""Run directory: fresh per run, never overwritten; its files."""

import csv
import json

import pytest

from gradflow.analysis.history import write_history
from gradflow.errors import ConfigError
from gradflow.experiments.rundir import check_logdir, create_run_dir, write_summary


def test_name_and_collisions(tmp_path):
    paths = [create_run_dir(tmp_path, "deep_relu", 3, now=0) for _ in range(3)]
    assert [p.name for p in paths] == [
        "deep_relu-19700101-000000-seed3",
        "deep_relu-19700101-000000-seed3-2",
        "deep_relu-19700101-000000-seed3-3",
    ]
    assert all(p.is_dir() for p in paths)


def test_creates_missing_logdir(tmp_path):
    assert create_run_dir(tmp_path / "a" / "b", "x", 0).parent == tmp_path / "a" / "b"


def test_logdir_under_a_file_is_rejected(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--logdir: .* is not a directory"):
        check_logdir(tmp_path / "file" / "runs")


def test_history_and_summary(tmp_path):
    rows = [{"epoch": 0, "loss": 0.7, "accuracy": 0.5, "val_loss": 0.69, "val_accuracy": 0.52}]
    with write_history(tmp_path, rows).open() as f:
        assert [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)] == rows
    summary = json.loads(write_summary(tmp_path, {"train_accuracy": 0.8, "loss": float("nan"),
                                                  "nested": {"x": [float("inf"), 1.0]}}).read_text())
    assert summary == {"train_accuracy": 0.8, "loss": None, "nested": {"x": [None, 1.0]}}   # as diagnose --json writes NaN
