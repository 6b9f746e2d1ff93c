"""Calibrate gradflow's diagnosis: train configs over seeds and tabulate the verdicts.

Runs (from the repository root):

    python benchmarks/calibrate_diagnosis.py                         # every config, 10 seeds
    python benchmarks/calibrate_diagnosis.py --seeds 3 --configs deep_tanh deep_relu
    python benchmarks/calibrate_diagnosis.py --keep /tmp/calib       # keep the run directories
    python benchmarks/calibrate_diagnosis.py --reuse /tmp/calib      # re-diagnose kept runs, no training

Prints a Markdown table (config x seed x verdict x test accuracy) and, per config, how many
seeds met the expectation the issue states. Each run records gradients.csv and activations.csv
through a GradientMonitor and a MonitorCallback, and history.csv, exactly as a CLI run does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gradflow import GradientMonitor  # noqa: E402  (after the path set-up, as in overhead.py)
from gradflow.experiments.config import load_config  # noqa: E402
from gradflow.experiments.data import load_dataset  # noqa: E402
from gradflow.analysis.diagnose import diagnose_run  # noqa: E402
from gradflow.experiments.models import build_model  # noqa: E402
from gradflow.experiments.recording import MonitorCallback  # noqa: E402
from gradflow.experiments.rundir import write_history, write_summary  # noqa: E402
from gradflow.experiments.train import fit  # noqa: E402

# name -> (config file, overrides, expectation: "healthy" | "not healthy" | a verdict that must appear)
CONFIGS: dict[str, tuple[str, list[str], str]] = {
    "deep_tanh": ("configs/deep_tanh.yaml", [], "not healthy"),
    "deep_relu": ("configs/deep_relu.yaml", [], "healthy"),
    "deep_relu_15": ("configs/deep_relu_15.yaml", [], "-"),
    "deep_relu_20": ("configs/deep_relu_20.yaml", [], "not healthy"),
    "shallow_tanh": ("configs/shallow_tanh.yaml", [], "-"),
    "deep_tanh_xavier": ("configs/deep_tanh_xavier.yaml", [], "-"),
    "deep_tanh_adam": ("configs/deep_tanh_adam.yaml", [], "-"),
    "deep_relu_lr10": ("configs/deep_relu.yaml", ["optimizer.lr=10", "train.on_nonfinite=continue"], "exploding"),
}


def record_run(config: str, overrides: list[str], run_dir: Path) -> dict:
    """Train one config into ``run_dir`` with the monitor recording; returns its summary."""
    cfg = load_config(config, overrides)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, in_features=data.x_train.shape[1])
    monitor = GradientMonitor(model, None, histograms=False)
    recorder = MonitorCallback(monitor, run_dir)
    try:
        result = fit(model, data, cfg.optimizer, cfg.train, callbacks=[recorder])
    finally:
        recorder.close()
        monitor.remove()
    write_history(run_dir, result.history)
    summary = {"train_accuracy": result.train_accuracy, "test_accuracy": result.test_accuracy,
               "epochs": result.epochs_run, "seconds": round(result.seconds, 3)}
    write_summary(run_dir, summary)
    return summary


def met(expectation: str, verdicts: list[str]) -> bool | None:
    if expectation == "-":
        return None
    if expectation == "healthy":
        return verdicts == ["healthy"]
    if expectation == "not healthy":
        return "healthy" not in verdicts
    return expectation in verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--keep", type=Path, help="write run directories here (default: a temp dir)")
    parser.add_argument("--reuse", type=Path, help="diagnose run directories kept earlier; no training")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: more threads only cost
    root = args.reuse or args.keep or Path(tempfile.mkdtemp(prefix="gradflow-calibration-"))
    rows, tally = [], {}
    for name in args.configs:
        config, overrides, expectation = CONFIGS[name]
        for seed in range(args.seeds):
            run_dir = root / f"{name}-seed{seed}"
            if args.reuse and not (run_dir / "summary.json").exists():
                continue  # not (yet) trained: leave it out rather than guess
            if not args.reuse:
                run_dir.mkdir(parents=True, exist_ok=False)
                t0 = time.perf_counter()
                record_run(config, overrides + [f"train.seed={seed}", f"train.epochs={args.epochs}"], run_dir)
                print(f"{name} seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            summary = json.loads((run_dir / "summary.json").read_text())
            diagnosis = diagnose_run(run_dir)
            ok = met(expectation, diagnosis.verdicts)
            tally.setdefault(name, [0, 0, expectation])
            if ok is not None:
                tally[name][0] += ok
                tally[name][1] += 1
            rows.append((name, seed, ", ".join(diagnosis.verdicts), summary["test_accuracy"], ok, diagnosis.line()))
    print("| config | seed | verdict | test accuracy | as expected |")
    print("|---|---|---|---|---|")
    for name, seed, verdict, accuracy, ok, _ in rows:
        mark = "-" if ok is None else ("yes" if ok else "**no**")
        print(f"| {name} | {seed} | {verdict} | {accuracy:.3f} | {mark} |")
    print()
    print("| config | expected | seeds as expected | verdicts (seeds) | test accuracy |")
    print("|---|---|---|---|---|")
    for name, (hits, total, expectation) in tally.items():
        mine = [row for row in rows if row[0] == name]
        counts: dict[str, int] = {}
        for row in mine:
            for verdict in row[2].split(", "):
                counts[verdict] = counts.get(verdict, 0) + 1
        verdicts = ", ".join(f"{v} {n}" for v, n in sorted(counts.items(), key=lambda item: -item[1]))
        accuracy = f"{min(r[3] for r in mine):.3f}-{max(r[3] for r in mine):.3f}"
        met_text = f"{hits}/{total}" if total else "-"
        print(f"| {name} | {expectation} | {met_text} | {verdicts} | {accuracy} |")
    print()
    for name, seed, _, _, _, line in rows:
        print(f"{name} seed {seed}: {line}", file=sys.stderr)
    print(f"run directories: {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
