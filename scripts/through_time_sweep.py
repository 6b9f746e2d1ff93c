"""The recurrent nets' length sweep (issue 22): the first_token task at several sequence lengths
and seeds, for a tanh RNN, an LSTM and a GRU (chrono init) and an LSTM at PyTorch's init; one
run directory per run (the same CLI path as ``gradflow train``), then one table.

    python scripts/through_time_sweep.py                       # lengths 10 20 50 100, seeds 0-2
    python scripts/through_time_sweep.py --lengths 10 100 --seeds 0 --out runs/through_time_sweep
    python scripts/through_time_sweep.py --rediagnose --out runs/through_time_sweep   # table again, no training

Success is a test accuracy of at least 0.9 (chance is 0.5). The table (Markdown) gives, per
model and length: successes over seeds, the verdicts, and the through-time evidence of the
last windows (reach: ||dL/dh|| at step 0 over its largest; horizon: steps within 1e-3 of it).
It is written to OUT/table.md and OUT/runs.csv, and printed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

MODELS = {  # label -> (config, overrides)
    "rnn_tanh": ("configs/rnn_tanh.yaml", []),
    "lstm (chrono 5)": ("configs/lstm.yaml", []),
    "gru (chrono 5)": ("configs/gru.yaml", []),
    "lstm (PyTorch init)": ("configs/lstm.yaml", ["model.chrono=0"]),
}
SUCCESS = 0.9


def run_one(config: str, overrides: list[str], out: Path) -> dict:
    from gradflow.experiments.solo import open_run, train_run

    cfg, run_dir = open_run(config, overrides, out, device="cpu")
    run = train_run(cfg, run_dir, torch.device("cpu"), progress=False)
    return {"run_dir": str(run_dir), "test_accuracy": run.result.test_accuracy, **_evidence(run.diagnosis),
            "seconds": run.result.seconds}


def table(rows: list[dict], lengths: list[int], seeds: list[int]) -> str:
    lines = [("| model | T | learned (test acc >= 0.9) | test accuracy | verdicts | reach at t=0, last windows | "
             "horizon (steps) |"), "|---|--:|--:|---|---|---|---|"]
    for label in dict.fromkeys(r["model"] for r in rows):
        for length in lengths:
            mine = [r for r in rows if r["model"] == label and r["T"] == length]
            if not mine:
                continue
            learned = sum(r["test_accuracy"] >= SUCCESS for r in mine)
            accuracies = " ".join(f"{r['test_accuracy']:.2f}" for r in mine)
            verdicts = "; ".join(r["verdict"] for r in mine)
            reaches = " ".join(f"{r['reach']:.0e}" for r in mine)
            horizons = " ".join(str(r["horizon"]) for r in mine)
            lines.append(f"| {label} | {length} | {learned}/{len(mine)} | {accuracies} | {verdicts} | {reaches} | "
                         f"{horizons} |")
    return "\n".join(lines)


def _evidence(diagnosis) -> dict:
    layer = next(iter(diagnosis.evidence.get("through_time", {}).values()), {})
    return {"verdict": " ".join(diagnosis.verdicts), "reach": layer.get("reach", math.nan),
            "reach_early": layer.get("reach_early", math.nan), "horizon": layer.get("horizon", ""),
            "growth_max": layer.get("growth_max", math.nan)}


def rediagnose(out: Path, lengths: list[int], seeds: list[int]) -> int:
    from gradflow.analysis.diagnose import diagnose_run

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update(_evidence(diagnose_run(row["run_dir"])))
        row["T"], row["test_accuracy"] = int(row["T"]), float(row["test_accuracy"])
    text = table(rows, lengths, seeds)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    parser.add_argument("--out", default="runs/through_time_sweep")
    parser.add_argument("--rediagnose", action="store_true", help="rebuild the table from OUT/runs.csv, "
                        "diagnosing each run directory again (after a change to the rules), without training")
    args = parser.parse_args(argv)
    if args.rediagnose:
        return rediagnose(Path(args.out), args.lengths, args.seeds)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.perf_counter()
    for label in args.models:
        config, overrides = MODELS[label]
        for length in args.lengths:
            for seed in args.seeds:
                row = run_one(config, overrides + [f"data.sequence_length={length}", f"train.seed={seed}"], out)
                rows.append({"model": label, "T": length, "seed": seed, **row})
                print(f"{label:22s} T={length:<4d} seed {seed}: test {row['test_accuracy']:.3f}, {row['verdict']}, "
                      f"reach {row['reach']:.1e}, horizon {row['horizon']}", file=sys.stderr, flush=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows, args.lengths, args.seeds)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n{len(rows)} runs in {time.perf_counter() - started:.0f} s; runs.csv and table.md in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
