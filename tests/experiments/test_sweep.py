"""Sweeps: seeds parsing, sweep-file validation, grid expansion and grouping, resume, the CLI
end to end, and the Ray backend."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gradflow.cli import main
from gradflow.errors import ConfigError
from gradflow.experiments.sweeps import executors, grid, results, runner

ROOT = Path(__file__).resolve().parents[2]
DEEP_TANH = str(ROOT / "configs" / "deep_tanh.yaml")


def write_sweep(tmp_path: Path, **spec) -> Path:
    spec.setdefault("base", DEEP_TANH)
    spec.setdefault("overrides", {"train.epochs": 2, "monitor.histograms": False})
    spec.setdefault("grid", {"model.depth": [1, 2]})
    spec.setdefault("seeds", "0-1")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- seeds -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seeds", [
    ("0-9", list(range(10))), ("1,4,7", [1, 4, 7]), ("0-2,8", [0, 1, 2, 8]), ("5", [5]), (" 3 - 4 ", [3, 4]),
    ([2, 0], [0, 2]),
], ids=["range", "list", "range-and-list", "single", "spaces", "yaml-list"])
def test_parse_seeds(text, seeds):
    assert grid.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "9-0", "1,1", "-3", "1,,2", "0-99999", [], [1.5], [True]],
                         ids=["empty", "word", "backwards", "duplicate", "negative", "empty-item", "too-many",
                              "empty-list", "float", "bool"])
def test_bad_seeds_name_the_problem(text):
    with pytest.raises(ConfigError, match="seeds"):
        grid.parse_seeds(text)


# --- expansion and grouping ------------------------------------------------------------------

def test_grid_expands_first_axis_slowest_with_variants():
    sweep = grid.sweep_from_dict({
        "base": {"train": {"epochs": 1}},
        "grid": {"model.depth": [1, 3], "variant": {"plain": {}, "adam": {"optimizer.name": "adam", "optimizer.lr": 0.001}}},
        "seeds": "0-1"})
    points = grid.expand(sweep)
    assert [p.values for p in points] == [(1, "plain"), (1, "adam"), (3, "plain"), (3, "adam")]
    assert [(p.config.model.depth, p.config.optimizer.name) for p in points] == [
        (1, "sgd"), (1, "adam"), (3, "sgd"), (3, "adam")]


def test_same_shape_runs_share_one_batched_task():
    sweep = grid.sweep_from_dict({"base": {}, "grid": {"model.depth": [1, 2], "optimizer.lr": [0.01, 0.1]}, "seeds": "0-4"})
    runs = [grid.PlannedRun(p, s) for p in grid.expand(sweep) for s in sweep.seeds]
    tasks = grid.plan(runs, workers=1)
    assert len(tasks) == 4 and all(len(t.runs) == 5 for t in tasks)
    assert all(len({grid._shape_key(r.point.config) for r in t.runs}) == 1 for t in tasks)
    assert tasks[0].config["model"]["depth"] == 2  # costliest first
    assert sorted(len(t.runs) for t in grid.plan(runs[:5], workers=2)) == [2, 3]  # one shape, two workers


# --- bad input: exit 2, one line, nothing written --------------------------------------------

BAD_SWEEPS = {
    "unknown-sweep-key": ({"grids": {}}, "grids: unknown sweep key"),
    "missing-seeds": ({"seeds": None}, "seeds: missing"),
    "grid-not-mapping": ({"grid": [1, 2]}, "grid: expected a mapping"),
    "axis-not-list": ({"grid": {"model.depth": 3}}, "grid.model.depth: expected a non-empty list"),
    "axis-empty": ({"grid": {"model.depth": []}}, "grid.model.depth: expected a non-empty list"),
    "unknown-config-key": ({"grid": {"model.detph": [1]}}, "model.detph: unknown key"),
    "bad-value": ({"grid": {"model.activation": ["tanh", "swishy"]}},
                  "grid point model.activation=swishy: model.activation: unknown activation"),
    "wrong-type": ({"grid": {"model.depth": [1, "two"]}}, "model.depth: expected int"),
    "seed-in-grid": ({"grid": {"train.seed": [1, 2]}}, "seeds go in the sweep's seeds"),
    "both-override-and-axis": ({"overrides": {"model.depth": 2}}, "both in overrides and in grid"),
    "bad-seeds": ({"seeds": "3-1"}, "runs backwards"),
    "missing-base": ({"base": "nowhere.yaml"}, "config file not found"),
    "duplicate-value": ({"grid": {"model.depth": [1, 1]}}, "listed twice"),
}


@pytest.mark.parametrize("change, message", list(BAD_SWEEPS.values()), ids=list(BAD_SWEEPS))
def test_bad_sweep_file_exits_2_with_one_line(tmp_path, capsys, change, message):
    spec = {"base": DEEP_TANH, "grid": {"model.depth": [1, 2]}, "seeds": "0-1"}
    spec.update(change)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["sweep", "missing.yaml"], "config file not found"),
    (["sweep", "{yaml}", "--workers", "0"], "--workers must be a positive int"),
    (["sweep", "{yaml}", "--backend", "spark"], "invalid choice: 'spark'"),
    (["sweep", "{yaml}", "--address", "auto"], "--address: only with --backend ray"),
    (["train", DEEP_TANH, "--seeds", "1-x"], "--seeds: cannot read '1-x'"),
    (["train", DEEP_TANH, "--seeds", "4-2"], "--seeds: range '4-2' runs backwards"),
    (["train", DEEP_TANH, "--seeds", "1,1"], "--seeds: seed listed twice"),
    (["train", DEEP_TANH, "--seeds", "0-1", "--seed", "3"], "--seed and --seeds: pass one"),
    (["train", DEEP_TANH, "--seeds", "0-1", "model.depth=0"], "model.depth: must be > 0"),
    (["train", DEEP_TANH, "--workers", "2"], "--workers: only with --seeds"),
    (["train", DEEP_TANH, "--seeds", "0-1", "--workers", "0"], "--workers must be a positive int"),
    (["train", DEEP_TANH, "--seeds", "3"], "--seeds 3: a single number is ambiguous; for 3 seeds write --seeds 0-2"),
], ids=["missing-file", "workers", "backend", "address-without-ray", "seeds-word", "seeds-backwards",
        "seeds-twice", "seed-and-seeds", "seeds-bad-override", "workers-without-seeds", "seeds-workers-0",
        "seeds-one-number"])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, message):
    yaml_path = str(write_sweep(tmp_path))
    args = [a.replace("{yaml}", yaml_path) for a in args] + ["--logdir", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "runs").exists()


# --- resume ----------------------------------------------------------------------------------

def test_resume_skips_finished_runs_and_writes_nothing_twice(tmp_path, monkeypatch):
    sweep = grid.load_sweep(write_sweep(tmp_path, grid={"model.depth": [1, 2, 3]}))
    out = tmp_path / "out"
    calls = []
    real = executors.run_task

    def crash_on_second_task(config, seeds, run_dirs, device="cpu"):
        calls.append(config["model"]["depth"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is stopped while the second task trains
        return real(config, seeds, run_dirs, device)

    monkeypatch.setattr(executors, "run_task", crash_on_second_task)
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(sweep, out, workers=1, log=lambda line: None)
    first = rows(out)
    assert [r["model.depth"] for r in first] == ["3", "3"]  # costliest first; only it finished
    assert len(list((out / "runs").iterdir())) == 6  # run directories made, 4 never finished
    with open(out / "results.csv", "a") as f:
        f.write("2,0,0.5")  # a torn row, as a crash in the middle of a write leaves

    calls.clear()
    monkeypatch.setattr(executors, "run_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    outcome = runner.run_sweep(sweep, out, workers=1, log=lambda line: None)
    assert (outcome.trained, outcome.skipped) == (4, 2) and len(calls) == 2
    final = rows(out)
    keys = [(r["model.depth"], r["seed"]) for r in final]
    assert sorted(keys) == sorted((str(d), str(s)) for d in (1, 2, 3) for s in (0, 1)) and len(set(keys)) == 6
    assert final[:2] == first  # the finished rows are untouched
    assert {r["run_dir"] for r in final} == {f"runs/{p.name}" for p in (out / "runs").iterdir()}

    again = runner.run_sweep(sweep, out, workers=1, log=lambda line: None)
    assert (again.trained, again.skipped) == (0, 6) and rows(out) == final


def test_resume_refuses_a_different_base(tmp_path):
    out = tmp_path / "out"
    runner.run_sweep(grid.load_sweep(write_sweep(tmp_path, grid={"model.depth": [1]}, seeds="0")), out, log=lambda line: None)
    changed = write_sweep(tmp_path, grid={"model.depth": [1]}, seeds="0", overrides={"train.epochs": 3})
    with pytest.raises(ConfigError, match="different base config"):
        runner.run_sweep(grid.load_sweep(changed), out, log=lambda line: None)


# --- end to end through the command line -----------------------------------------------------

def gradflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gradflow.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sweep_end_to_end(tmp_path):
    path = write_sweep(tmp_path, grid={"model.depth": [1, 2], "model.activation": ["tanh", "relu"]}, seeds="0-1")
    proc = gradflow("sweep", str(path), "--workers", "2", "--logdir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs" / "sweeps" / "tiny"
    table = rows(out)
    assert len(table) == 2 * 2 * 2
    assert list(table[0]) == ["model.depth", "model.activation", *results.RESULT_FIELDS]
    assert (out / "sweep.png").stat().st_size > 0 and (out / "summary.md").exists()
    assert re.search(r"^\| 2 \| relu \| 2 \| ", proc.stdout, re.M), proc.stdout
    for row in table:
        run_dir = out / row["run_dir"]
        assert (run_dir / "summary.json").exists() and (run_dir / "gradients.csv").exists()
    rerun = gradflow("sweep", str(path), "--workers", "2", "--logdir", str(tmp_path / "runs"), cwd=tmp_path)
    assert rerun.returncode == 0 and "8 runs already in results.csv, 0 to go" in rerun.stdout
    assert len(rows(out)) == 8


def test_train_seeds_end_to_end(tmp_path):
    proc = gradflow("train", DEEP_TANH, "--seeds", "0-2", "train.epochs=2", "--logdir", str(tmp_path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [re.match(r"seed (\d): Train: \d\.\d{3}, Test: \d\.\d{3}", line).group(1) for line in lines[:3]] == ["0", "1", "2"]
    assert re.fullmatch(r"Train: mean \d\.\d{3}, std \d\.\d{3}, median \d\.\d{3} over 3 seeds", lines[3])
    assert re.fullmatch(r"Test: mean \d\.\d{3}, std \d\.\d{3}, median \d\.\d{3} over 3 seeds", lines[4])
    parent = Path(re.fullmatch(r"Run directory: (.+)", lines[5]).group(1))
    assert re.fullmatch(r"deep_tanh-\d{8}-\d{6}-seeds0-2", parent.name) and parent.parent == tmp_path
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == [f"deep_tanh-seed{s}" for s in range(3)]
    assert [r["seed"] for r in rows(parent)] == ["0", "1", "2"]


def test_train_seeds_split_over_workers_trains_the_same_runs(tmp_path, capsys):
    """Three seeds over two processes (two seeds and one) give each seed exactly the run that
    one process training all three as one batched model gives it."""
    parents = {}
    for workers in ("1", "2"):
        logdir = tmp_path / f"workers{workers}"
        args = ["train", DEEP_TANH, "--seeds", "0-2", "train.epochs=3", "--logdir", str(logdir), "--quiet",
                "--workers", workers]
        assert main(args) == 0
        parents[workers] = next(logdir.iterdir())
    capsys.readouterr()
    one, two = (rows(parents[w]) for w in ("1", "2"))
    assert [(r["seed"], r["train_accuracy"], r["test_accuracy"]) for r in one] == \
           [(r["seed"], r["train_accuracy"], r["test_accuracy"]) for r in two]
    for seed in range(3):  # batches of 3 and of 2 members round differently: float tolerance
        histories = [np.loadtxt(parents[w] / f"deep_tanh-seed{seed}" / "history.csv", delimiter=",", skiprows=1)
                     for w in ("1", "2")]
        np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)


def test_two_numeric_axes_draw_a_heatmap(tmp_path):
    sweep = grid.sweep_from_dict({"base": {}, "grid": {"model.width": [5, 25], "model.depth": [1, 2, 3]}, "seeds": "0-1"})
    table = [{"model.width": str(w), "model.depth": str(d), "seed": str(s), "train_accuracy": "0.8",
              "test_accuracy": str(0.5 + 0.05 * d), "verdict": "healthy"}
             for w in (5, 25) for d in (1, 2, 3) for s in (0, 1)]
    results.plot_sweep(sweep, table, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "| 25 | 3 | 2 | 0.800 | 0.650 |" in results.summary_table(sweep, table)


# --- Ray -------------------------------------------------------------------------------------

def test_ray_backend_runs_a_small_sweep(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    sweep = grid.load_sweep(write_sweep(tmp_path, seeds="0"))
    outcome = runner.run_sweep(sweep, tmp_path / "out", workers=2, backend="ray", log=lambda line: None)
    assert outcome.trained == 2
    assert sorted(r["model.depth"] for r in rows(tmp_path / "out")) == ["1", "2"]
