"""CLI end to end, through real subprocesses: outputs, run directory, and bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
DEEP_RELU = str(ROOT / "configs" / "deep_relu.yaml")


def train(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """Run ``python scripts/train.py ARGS`` with stderr a pipe (so no progress bar)."""
    environ = {**os.environ, **env}
    environ.pop("PYTHONPATH", None)  # the script must work from a bare clone
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("runs")
    proc = train(DEEP_RELU, "train.epochs=3", "--seed", "4", "--logdir", str(logdir), "--device", "cpu", cwd=logdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no bar when stderr is not a terminal
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"Train: \d\.\d{3}, Test: \d\.\d{3}", lines[0])
    path = Path(re.fullmatch(r"Run directory: (.+)", lines[1]).group(1))
    assert re.fullmatch(r"Verdict: [a-z-]+(, [a-z-]+)*( \(.+\))?", lines[2])   # the run ends with its verdict
    assert path.parent == logdir and re.fullmatch(r"deep_relu-\d{8}-\d{6}-seed4", path.name)
    return path


def test_run_directory_contents(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "history.csv", "summary.json", "accuracy.png", "gradients.png",
            "gradients.csv", "activations.csv"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["seed"] == 4 and summary["device"] == "cpu"
    assert {"train_accuracy", "test_accuracy", "seconds", "stopped_early"} <= set(summary)
    assert summary["verdict"] and set(summary["verdict"]) <= {
        "healthy", "vanishing", "exploding", "saturated", "dead-units", "stalled", "insufficient"}
    assert summary["verdict_line"].startswith("Verdict: ") and summary["recommendation"]


def test_tensorboard_epoch_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    epoch_tags = sorted(tag for tag in tags if tag.startswith("epoch/"))
    assert epoch_tags == ["epoch/accuracy", "epoch/loss", "epoch/val_accuracy", "epoch/val_loss"]
    assert [e.step for e in events.Scalars("epoch/loss")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("grad/dense_1/weight/mean_abs")] == [0, 1, 2]


def test_saved_config_reruns_and_never_overwrites(run_dir):
    proc = train(str(run_dir / "config.yaml"), "train.epochs=1", "--logdir", str(run_dir.parent), "--quiet")
    assert proc.returncode == 0, proc.stderr
    new = Path(proc.stdout.splitlines()[1].removeprefix("Run directory: "))
    assert new != run_dir and new.name.startswith("deep_relu-")  # name kept from the saved config
    assert len((run_dir / "history.csv").read_text().splitlines()) == 4  # the first run is intact


def test_nonfinite_loss_exits_3(tmp_path):
    proc = train(DEEP_RELU, "optimizer.lr=1e30", "train.epochs=3", "--logdir", str(tmp_path))
    assert proc.returncode == 3
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["stopped_early"] is True and summary["stop_epoch"] == 0


def test_console_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gradflow.cli", "train", DEEP_RELU, "train.epochs=1", "--logdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Train: ")


BAD_INPUTS = {
    "missing-file": (["configs/nope.yaml"], "not found"),
    "yaml-syntax": (["{bad}"], "YAML syntax error"),
    "unknown-key": ([DEEP_RELU, "model.depht=3"], "model.depht: unknown key"),
    "unknown-section-in-file": (["{trian}"], "trian: unknown key"),
    "wrong-type": ([DEEP_RELU, "train.epochs=ten"], "train.epochs: expected int"),
    "bool-for-int": ([DEEP_RELU, "model.depth=true"], "model.depth: expected int"),
    "unknown-activation": ([DEEP_RELU, "model.activation=swoosh"], "unknown activation 'swoosh'; accepted:"),
    "unknown-initializer": ([DEEP_RELU, "model.initializer=kaiming"], "unknown initializer 'kaiming'; accepted:"),
    "unknown-optimizer": ([DEEP_RELU, "optimizer.name=rmsprop"], "unknown optimizer 'rmsprop'; accepted: adam, sgd"),
    "unknown-dataset": ([DEEP_RELU, "data.name=mnist"], "unknown dataset 'mnist'; accepted: circles, first_token, moons"),
    "zero-depth": ([DEEP_RELU, "model.depth=0"], "model.depth: must be > 0"),
    "negative-width": ([DEEP_RELU, "model.width=-3"], "model.width: must be > 0"),
    "zero-batch": ([DEEP_RELU, "train.batch_size=0"], "train.batch_size: must be > 0"),
    "negative-epochs": ([DEEP_RELU, "train.epochs=-1"], "train.epochs: must be > 0"),
    "list-length": ([DEEP_RELU, "model.width=[5,5]"], "per-layer list has 2 entries"),
    "not-key-value": ([DEEP_RELU, "depth"], "unrecognized arguments: depth"),
    "unknown-option": ([DEEP_RELU, "--bogus"], "unrecognized arguments: --bogus"),
    "bad-device": ([DEEP_RELU, "--device", "tpu"], "--device: invalid choice"),
    "zero-threads": ([DEEP_RELU, "--threads", "0"], "--threads must be a positive int"),
    "unwritable-logdir": ([DEEP_RELU], "--logdir:"),
}


@pytest.mark.parametrize(("args", "message"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    logdir = tmp_path / "runs"
    logdir.mkdir()
    (tmp_path / "{bad}").write_text("model:\n  depth: 3\n   width: 4\n")
    (tmp_path / "{trian}").write_text("trian:\n  epochs: 3\n")
    args = [str(tmp_path / a) if a.startswith("{") else a for a in args]
    target = logdir
    if message == "--logdir:":
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "runs"  # under a regular file: unwritable even for root
    proc = train(*args, "--logdir", str(target), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("gradflow: error: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert list(logdir.iterdir()) == []
    assert not (tmp_path / "runs" / "runs").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_without_cuda_exits_2(tmp_path):
    proc = train(DEEP_RELU, "--device", "cuda", "--logdir", str(tmp_path))
    assert proc.returncode == 2 and "--device: cuda requested" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("switches, files, absent_tags", [
    (["monitor.enabled=false"], {"gradients.csv": False, "gradients.png": False}, ["grad/dense_1/weight/norm"]),
    (["monitor.activations=false", "monitor.histograms=false", "monitor.weights=false"],
     {"gradients.csv": True, "gradients.png": True}, ["activation/relu_1/mean", "weight/dense_1/weight/l1"]),
], ids=["monitor-off", "parts-off"])
def test_monitor_section_switches_parts_off(tmp_path, switches, files, absent_tags):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = train(DEEP_RELU, "train.epochs=2", *switches, "--logdir", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run,) = tmp_path.iterdir()
    for name, present in files.items():
        assert (run / name).exists() == present, name
    events = EventAccumulator(str(run), size_guidance={"histograms": 0}).Reload()
    assert not events.Tags()["histograms"]
    assert not set(absent_tags) & set(events.Tags()["scalars"])
    assert "epoch/loss" in events.Tags()["scalars"]


def test_monitor_window_every_n_steps(tmp_path):
    proc = train(DEEP_RELU, "train.epochs=2", "monitor.window_steps=5", "--logdir", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    (run,) = tmp_path.iterdir()
    steps = sorted({int(line.split(",")[1]) for line in (run / "gradients.csv").read_text().splitlines()[1:]})
    assert steps == [5, 10, 15, 20, 25, 30]                 # 2 epochs of 16 steps, a window per 5
