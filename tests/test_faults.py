"""Injected faults: concurrent runs, an unwritable log directory, an exception mid-epoch,
long runs; interruption, resume, checkpoint crashes and non-finite training.

Each test names the fault it injects and checks that nothing is lost or overwritten and that
what is on disk stays readable (TensorBoard's own EventAccumulator loads it).
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from gradflow import GradientMonitor
from gradflow.cli import main
from gradflow.config import load_config
from gradflow.recording import GRADIENTS_FILE, MonitorCallback
from gradflow.train import build_from_config, fit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
DEEP_RELU = str(ROOT / "configs" / "deep_relu.yaml")


def environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def train(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python scripts/train.py ARGS`` (stderr a pipe, so no progress bar)."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=environ(),
                          capture_output=True, text=True, timeout=300)


def load_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events


def assert_histograms_complete(events) -> int:
    """Every histogram event is whole and finite; returns how many there are."""
    count = 0
    for tag in events.Tags()["histograms"]:
        for event in events.Histograms(tag):
            h = event.histogram_value
            assert len(h.bucket) == len(h.bucket_limit) > 0, tag
            assert sum(h.bucket) == h.num > 0, tag
            assert all(math.isfinite(v) for v in (h.min, h.max, h.sum, h.sum_squares)), tag
            count += 1
    return count


def assert_run_complete(run_dir: Path, epochs: int) -> dict:
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "history.csv", "summary.json", "accuracy.png"} <= names, names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + epochs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == epochs
    return summary


# --- 4. concurrency ------------------------------------------------------------------------------

# Each process imports everything, says it is ready, then waits for the same "go" file: the runs
# then create their run directories within a millisecond or so of each other, in the same second.
_AT_THE_SAME_MOMENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from gradflow.cli import main
barrier, me = Path(sys.argv[2]), sys.argv[3]
(barrier / f"ready-{me}").touch()
while not (barrier / "go").exists():
    time.sleep(0.001)
sys.exit(main(["train", *sys.argv[4:]]))
"""


def test_concurrent_runs_of_one_config_get_distinct_complete_directories(tmp_path):
    runs, barrier, n = tmp_path / "runs", tmp_path / "barrier", 4
    barrier.mkdir()
    args = [DEEP_RELU, "train.epochs=1", "--seed", "7", "--logdir", str(runs), "--device", "cpu", "--quiet"]
    procs = [subprocess.Popen([sys.executable, "-c", _AT_THE_SAME_MOMENT, str(ROOT), str(barrier), str(i), *args],
                              env=environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    deadline = time.monotonic() + 240
    while len(list(barrier.glob("ready-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    (barrier / "go").touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in outputs]
    reported = {Path(out.splitlines()[1].removeprefix("Run directory: ")) for out, _ in outputs}
    on_disk = set(runs.iterdir())
    assert reported == on_disk and len(on_disk) == n  # distinct, and nothing else
    summaries = [assert_run_complete(d, epochs=1) for d in on_disk]
    # The same seed gives the same run: identical results show no run wrote into another's files.
    assert len({(s["train_accuracy"], s["test_accuracy"]) for s in summaries}) == 1
    histories = {(d / "history.csv").read_text() for d in on_disk}
    assert len(histories) == 1


# --- 6. a log directory that cannot be written -------------------------------------------------

# Tests run as root in CI, and root writes through chmod 0o555. What root cannot write either:
# a path below a regular file (ENOTDIR), a path that is a file, and a directory inside /proc
# (a pseudo file system that refuses mkdir to everyone).
UNWRITABLE = {
    "below-a-regular-file": lambda tmp: tmp / "file" / "runs",
    "is-a-regular-file": lambda tmp: tmp / "file",
    "inside-proc": lambda tmp: Path("/proc/gradflow-runs"),
}


@pytest.mark.parametrize("make", list(UNWRITABLE.values()), ids=list(UNWRITABLE))
def test_unwritable_logdir_fails_before_training(tmp_path, make, capsys, monkeypatch):
    """In process (test_cli covers the subprocess path): the error comes before any training."""
    import gradflow.train

    (tmp_path / "file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr(gradflow.train, "fit", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", DEEP_RELU, "--logdir", str(make(tmp_path)), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("gradflow: error: --logdir: "), err
    assert sorted(tmp_path.rglob("*")) == before


# --- 5. hooks under faults ----------------------------------------------------------------------

class Boom(RuntimeError):
    """The injected failure."""


def _raise_at_call(n: int):
    calls = {"count": 0}

    def pre_hook(module, inputs):
        calls["count"] += 1
        if calls["count"] == n:
            raise Boom(f"injected failure in forward call {n}")

    return pre_hook


def test_exception_in_forward_mid_epoch_leaves_no_half_written_histogram(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    cfg = load_config(DEEP_RELU, ["train.epochs=5"])
    model, data = build_from_config(cfg)
    steps_per_epoch = math.ceil(data.x_train.shape[0] / cfg.train.batch_size)
    # Training forwards only (evaluation runs the body too: one call per epoch), mid-epoch 2.
    fail_at = 2 * (steps_per_epoch + 1) + 7
    injected = model.dense_3.register_forward_pre_hook(_raise_at_call(fail_at))
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(Boom):
        with GradientMonitor(model, writer) as monitor:
            recorder = MonitorCallback(monitor, tmp_path)
            try:
                fit(model, data, cfg.optimizer, cfg.train, callbacks=[recorder])
            finally:
                recorder.close()
    writer.close()
    injected.remove()

    # Every hook is gone, and the model takes a new monitor.
    assert not monitor.attached and len(_global_optimizer_pre_hooks) == 0
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    assert not GradientMonitor.detach(model)
    GradientMonitor(model).remove()

    # The two finished epochs are on disk, whole; the broken one left nothing.
    events = load_events(tmp_path)
    assert assert_histograms_complete(events) > 0
    for tag in events.Tags()["histograms"]:
        assert [e.step for e in events.Histograms(tag)] == [0, 1], tag
    with open(tmp_path / GRADIENTS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["window"] for row in rows} == {"0", "1"}
    assert all(None not in row.values() and "" not in (row["norm"], row["nonfinite"]) for row in rows)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_many_windows():
    """230 windows: after a warm-up, the count of live Python objects and the process's RSS stay
    put (the monitor's history is the only thing meant to grow; this loop drops it each window)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 2), torch.randn(32, 1)

    def windows(count: int) -> None:
        for _ in range(count):
            for _ in range(2):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            monitor.log(0)
            monitor.history.clear()

    with GradientMonitor(model) as monitor:
        windows(30)  # warm-up: plans, caches, allocator pools
        gc.collect()
        objects_before, rss_before = len(gc.get_objects()), _rss_bytes()
        windows(200)
        gc.collect()
        objects_after, rss_after = len(gc.get_objects()), _rss_bytes()
    assert objects_after - objects_before < 50, objects_after - objects_before
    assert rss_after - rss_before < 8 * 2**20, rss_after - rss_before
