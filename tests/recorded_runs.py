"""Short real training runs recorded into a run directory, as the CLI records them."""

from __future__ import annotations

from pathlib import Path

import torch

from gradflow import GradientMonitor
from gradflow.analysis.history import write_history
from gradflow.experiments.config import load_config
from gradflow.experiments.data import load_dataset
from gradflow.experiments.models import build_model
from gradflow.experiments.recording import MonitorCallback
from gradflow.experiments.rundir import write_summary
from gradflow.experiments.train import fit


def record_run(run_dir: Path, config: str, overrides: list[str]) -> Path:
    """Train ``config`` with ``overrides`` into ``run_dir`` (created) with the monitor recording:
    gradients.csv, activations.csv, history.csv and summary.json. Returns ``run_dir``."""
    torch.set_num_threads(1)  # tiny models: more threads only cost
    run_dir.mkdir(parents=True)
    cfg = load_config(config, overrides)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, in_features=data.x_train.shape[1])
    with GradientMonitor(model, None, histograms=False) as monitor:
        recorder = MonitorCallback(monitor, run_dir)
        try:
            result = fit(model, data, cfg.optimizer, cfg.train, callbacks=[recorder])
        finally:
            recorder.close()
    write_history(run_dir, result.history)
    write_summary(run_dir, {"train_accuracy": result.train_accuracy, "test_accuracy": result.test_accuracy,
                            "epochs": result.epochs_run})
    return run_dir
