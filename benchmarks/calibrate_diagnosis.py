"""Calibrate gradflow's diagnosis: train configs over seeds and tabulate the verdicts.

Runs (from the repository root):

    python benchmarks/calibrate_diagnosis.py                         # every config, 10 seeds
    python benchmarks/calibrate_diagnosis.py --seeds 3 --configs deep_tanh deep_relu
    python benchmarks/calibrate_diagnosis.py --keep /tmp/calib       # keep the run directories
    python benchmarks/calibrate_diagnosis.py --reuse /tmp/calib      # re-diagnose kept runs, no training
    python benchmarks/calibrate_diagnosis.py --batched --keep /tmp/calib   # each config's seeds as one batched
                                                                         # run (gradflow train --seeds): ~5x faster

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
from gradflow.analysis.diagnose import diagnose_run  # noqa: E402
from gradflow.analysis.history import write_history  # noqa: E402
from gradflow.experiments.config import load_config  # noqa: E402
from gradflow.experiments.data import load_dataset  # noqa: E402
from gradflow.experiments.models import build_model  # noqa: E402
from gradflow.experiments.recording import MonitorCallback  # noqa: E402
from gradflow.experiments.rundir import write_summary  # noqa: E402
from gradflow.experiments.train import fit  # noqa: E402

# name -> (config file, overrides, expectation: "healthy" | "not healthy" | "by outcome" | a verdict that
# must appear). "by outcome": a run that did not learn (test accuracy < LEARNED) is not healthy, one
# that learned carries no verdict (issue 23: a run that learns is not called a pathology).
CONFIGS: dict[str, tuple[str, list[str], str]] = {
    "deep_tanh": ("configs/deep_tanh.yaml", [], "by outcome"),   # "not healthy" before: seed 5 learns (0.806)
    "deep_relu": ("configs/deep_relu.yaml", [], "healthy"),
    "deep_relu_15": ("configs/deep_relu_15.yaml", [], "-"),
    "deep_relu_20": ("configs/deep_relu_20.yaml", [], "-"),   # "not healthy" before issue 23: seed 3 learns
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


def record_batched(config: str, overrides: list[str], seeds: int, epochs: int, root: Path, name: str) -> None:
    """Train ``seeds`` seeds of one config as one batched model (``gradflow train --seeds``, each
    member on its solo trajectory) and link each member's directory as ``root/<name>-seed<N>``."""
    from gradflow.experiments.sweeps.seeds import train_seeds

    cfg = load_config(config, overrides + [f"train.epochs={epochs}"])
    outcome = train_seeds(cfg, list(range(seeds)), root / f"{name}-batched", workers=1, progress=False)
    for seed in range(seeds):
        (root / f"{name}-seed{seed}").symlink_to(next(outcome.directory.glob(f"*-seed{seed}")))


def margins(diagnosis) -> tuple[float, float, float]:
    """(weakest hidden layer / head early, first hidden layer / head early, largest update per
    step): what the vanishing and exploding rules read."""
    layers = diagnosis.evidence["layers"]
    hidden = [row for row in layers.values() if row.get("role") == "hidden"]
    ratios = [row["ratio_early"] for row in hidden if row["ratio_early"] == row["ratio_early"]]
    updates = [row["update_ratio_max"] for row in layers.values() if row["update_ratio_max"] == row["update_ratio_max"]]
    return (min(ratios, default=float("nan")), hidden[0]["ratio_early"] if hidden else float("nan"),
            max(updates, default=float("nan")))


def _span(values: list[float], inverse: bool = False) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    if inverse:
        return f"1/{1 / low:.3g} - 1/{1 / high:.3g}" if high > 0 and low > 0 else f"{low:.3g} - {high:.3g}"
    return f"{low:.3g} - {high:.3g}"


# Test accuracy at which a two-circles run counts as learned: deep_relu's worst seed (all healthy)
# reaches 0.752, deep_tanh's seeds that did not learn at most 0.624 (docs/calibration.md).
LEARNED = 0.75


def met(expectation: str, verdicts: list[str], accuracy: float) -> bool | None:
    if expectation == "-":
        return None
    if expectation == "by outcome":
        return verdicts == ["healthy"] if accuracy >= LEARNED else "healthy" not in verdicts
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
    parser.add_argument("--batched", action="store_true", help="train each config's seeds as one batched model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: more threads only cost
    root = args.reuse or args.keep or Path(tempfile.mkdtemp(prefix="gradflow-calibration-"))
    rows, tally = [], {}
    for name in args.configs:
        config, overrides, expectation = CONFIGS[name]
        if args.batched and not args.reuse:
            t0 = time.perf_counter()
            root.mkdir(parents=True, exist_ok=True)
            record_batched(config, overrides, args.seeds, args.epochs, root, name)
            print(f"{name}, {args.seeds} seeds batched: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for seed in range(args.seeds):
            run_dir = root / f"{name}-seed{seed}"
            if args.reuse and not (run_dir / "summary.json").exists():
                continue  # not (yet) trained: leave it out rather than guess
            if not args.reuse and not args.batched:
                run_dir.mkdir(parents=True, exist_ok=False)
                t0 = time.perf_counter()
                record_run(config, overrides + [f"train.seed={seed}", f"train.epochs={args.epochs}"], run_dir)
                print(f"{name} seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            summary = json.loads((run_dir / "summary.json").read_text())
            diagnosis = diagnose_run(run_dir)
            ok = met(expectation, diagnosis.verdicts, summary["test_accuracy"])
            tally.setdefault(name, [0, 0, expectation])
            if ok is not None:
                tally[name][0] += ok
                tally[name][1] += 1
            rows.append((name, seed, ", ".join(diagnosis.verdicts), summary["test_accuracy"], ok, diagnosis.line(),
                         margins(diagnosis)))
    print("| config | seed | verdict | test accuracy | as expected |")
    print("|---|---|---|---|---|")
    for name, seed, verdict, accuracy, ok, *_ in rows:
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
    print("| config | weakest hidden / head, early (vanishing < 1/50) | input end / head, early (and < 1/7) "
          "| largest update per step (exploding > 0.5) |")
    print("|---|---|---|---|")
    for name in tally:
        mine = [row[6] for row in rows if row[0] == name]
        print(f"| {name} | {_span([m[0] for m in mine], True)} | {_span([m[1] for m in mine], True)} | "
              f"{_span([m[2] for m in mine])} |")
    print()
    for name, seed, _, _, _, line, _ in rows:
        print(f"{name} seed {seed}: {line}", file=sys.stderr)
    print(f"run directories: {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
