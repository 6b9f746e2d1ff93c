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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from gradflow import GradientMonitor
from gradflow.analysis.windows import GRADIENTS_FILE
from gradflow.cli import main
from gradflow.experiments.config import load_config
from gradflow.experiments.recording import MonitorCallback
from gradflow.experiments.train import build_from_config, fit
from gradflow.monitor import steps as _steps
from gradflow.monitor.steps import _dispatch

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
    import gradflow.experiments.solo

    (tmp_path / "file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr(gradflow.experiments.solo, "fit", lambda *a, **k: pytest.fail("training started"))
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
    with pytest.raises(Boom), GradientMonitor(model, writer) as monitor:
        recorder = MonitorCallback(monitor, tmp_path)
        try:
            fit(model, data, cfg.optimizer, cfg.train, callbacks=[recorder])
        finally:
            recorder.close()
    writer.close()
    injected.remove()

    # Every hook is gone, and the model takes a new monitor.
    # gradflow's one process-wide step dispatcher may stay (steps.py); it holds no monitor.
    assert not monitor.attached and list(_global_optimizer_pre_hooks.values()) in ([], [_dispatch])
    assert not _steps._MONITORS
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


# --- 3. interruption and resume ----------------------------------------------------------------

RESUME_ARGS = [DEEP_RELU, "train.epochs=60", "--seed", "3", "--device", "cpu", "--quiet"]


def _windows_written(run_dir: Path) -> int:
    path = run_dir / GRADIENTS_FILE
    if not path.exists():
        return 0
    return len({line.split(",", 1)[0] for line in path.read_text().splitlines()[1:] if line})


def _raw_steps(run_dir: Path, tag: str) -> list[int]:
    """Steps of ``tag`` in every event file as written, before TensorBoard's own de-duplication."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_sigterm_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    baseline = train(*RESUME_ARGS, "--logdir", str(whole))
    assert baseline.returncode == 0, baseline.stderr
    (whole_dir,) = whole.iterdir()

    # Fault: SIGTERM once the run has logged a few epochs.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *RESUME_ARGS, "--logdir", str(parts)], env=environ(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (parts.exists() and any(_windows_written(d) >= 3 for d in parts.iterdir())):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out, err)
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    (run_dir,) = parts.iterdir()
    stopped = assert_run_complete(run_dir, epochs=len((run_dir / "history.csv").read_text().splitlines()) - 1)
    assert stopped["interrupted"] == "SIGTERM" and stopped["epochs"] < 60  # readable, flushed, partial
    assert (run_dir / "checkpoint.pt").exists()
    assert assert_histograms_complete(load_events(run_dir)) > 0

    resumed = train("--resume", str(run_dir), "--device", "cpu", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0] == baseline.stdout.splitlines()[0]  # the Train/Test line
    final, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, whole_dir))
    assert (final["train_accuracy"], final["test_accuracy"], final["epochs"]) == \
        (expected["train_accuracy"], expected["test_accuracy"], expected["epochs"])
    for name in ("history.csv", GRADIENTS_FILE, "activations.csv"):
        assert (run_dir / name).read_text() == (whole_dir / name).read_text(), name
    assert _raw_steps(run_dir, "epoch/loss") == list(range(60))  # every epoch once, none twice
    events = load_events(run_dir)
    assert [e.step for e in events.Scalars("epoch/loss")] == list(range(60))
    assert [e.value for e in events.Scalars("epoch/loss")] == [e.value for e in load_events(whole_dir).Scalars("epoch/loss")]
    # Histograms pool 25 epochs each; the stop flushed a partial pool at its epoch and the resumed
    # run pooled on from the next: other steps than the whole run's, but every step counted once.
    whole_events = load_events(whole_dir)
    for tag in events.Tags()["histograms"]:
        steps = [e.step for e in events.Histograms(tag)]
        assert steps == sorted(set(steps)) and steps[-1] == 59, tag
        if not tag.startswith("weight/"):                # weights: the state at each step, not counts
            assert _counted(events, tag) == _counted(whole_events, tag), tag


def _counted(events, tag: str) -> float:
    """Values counted over all the histograms of ``tag``."""
    return sum(e.histogram_value.num for e in events.Histograms(tag))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from gradflow.experiments import rundir

    state = {key: 1 for key in rundir.CHECKPOINT_KEYS} | {"model": {"w": torch.arange(4.0)}}
    rundir.save_checkpoint(tmp_path, state)
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):  # fault: half the bytes, then the disk "fails"
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        rundir.save_checkpoint(tmp_path, state | {"epoch": 2})
    monkeypatch.undo()
    loaded = rundir.load_checkpoint(tmp_path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


RESUME_FAULTS = {
    "missing-directory": lambda d: d / "nope",
    "no-checkpoint": lambda d: (d / "checkpoint.pt").unlink() or d,
    "garbage-checkpoint": lambda d: (d / "checkpoint.pt").write_bytes(b"\x00garbage" * 100) and d,
    "truncated-checkpoint": lambda d: (d / "checkpoint.pt").write_bytes((d / "checkpoint.pt").read_bytes()[:300]) and d,
    "not-a-gradflow-checkpoint": lambda d: torch.save({"epoch": 1}, d / "checkpoint.pt") or d,
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("finished")
    assert main(["train", DEEP_RELU, "train.epochs=2", "--logdir", str(logdir), "--device", "cpu", "--quiet"]) == 0
    return next(logdir.iterdir())


@pytest.mark.parametrize("fault", list(RESUME_FAULTS.values()), ids=list(RESUME_FAULTS))
def test_resume_of_a_missing_or_corrupt_run_exits_2(finished_run, tmp_path, fault, capsys):
    import shutil

    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    target = fault(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(target), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("gradflow: error: --resume: "), err


# --- 2. non-finite training ---------------------------------------------------------------------

@pytest.mark.parametrize(("switch", "status", "epochs"), [([], 3, 1), (["train.on_nonfinite=continue"], 0, 4)],
                         ids=["stop-by-default", "continue"])
def test_huge_learning_rate_is_counted_and_stops_cleanly(tmp_path, capsys, switch, status, epochs):
    """Fault: optimizer.lr=1e10 on deep_relu turns the loss and gradients NaN in epoch 0."""
    args = ["train", DEEP_RELU, "optimizer.lr=1e10", "train.epochs=4", *switch, "--logdir", str(tmp_path), "--device", "cpu", "--quiet"]
    assert main(args) == status
    err = capsys.readouterr().err
    (run_dir,) = tmp_path.iterdir()
    summary = assert_run_complete(run_dir, epochs=epochs)
    assert summary["nonfinite_gradients"] > 0 and summary["first_nonfinite_window"] == 0
    if status == 3:
        # one line that names the source the verdict names, then the trainer's reason (issue 24)
        assert err.count("\n") == 1 and "training stopped: the first non-finite value came from dense_" in err
        assert "(forward) at epoch 0, step " in err and "; non-finite training loss (nan) at epoch 0" in err
        assert summary["stopped_early"] and summary["stop_epoch"] == 0 and "non-finite" in summary["stop_reason"]
    else:
        assert err == "" and not summary["stopped_early"]
    assert assert_histograms_complete(load_events(run_dir)) >= 0  # loads; every histogram finite


def test_sigkill_after_a_checkpoint_then_resume_shows_every_step_once(tmp_path):
    """A hard kill gives no chance to flush: epochs logged after the last checkpoint are in the
    event files already, and the resumed run writes them again. TensorBoard's purge_step, set on
    resume, makes readers drop the stale ones."""
    args = [DEEP_RELU, "train.epochs=30", "train.checkpoint_every=5", "--seed", "5", "--device", "cpu", "--quiet"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    baseline = train(*args, "--logdir", str(whole))
    assert baseline.returncode == 0, baseline.stderr
    (whole_dir,) = whole.iterdir()

    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--logdir", str(parts)], env=environ(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (
            parts.exists() and any((d / "checkpoint.pt").exists() and _windows_written(d) >= 8 for d in parts.iterdir())):
        time.sleep(0.01)
    proc.kill()                                           # fault: SIGKILL, no handler runs
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = parts.iterdir()

    resumed = train("--resume", str(run_dir), "--device", "cpu", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0] == baseline.stdout.splitlines()[0]
    events, expected = load_events(run_dir), load_events(whole_dir)
    assert [e.step for e in events.Scalars("epoch/loss")] == list(range(30))
    assert [e.value for e in events.Scalars("epoch/loss")] == [e.value for e in expected.Scalars("epoch/loss")]
    # The first window alone, then one per 25 epochs, and one at each checkpoint (every 5 here), which flushes them.
    assert [e.step for e in events.Histograms("grad/dense_1/weight")] == [0, 4, 9, 14, 19, 24, 29]
    assert [e.histogram_value.num for e in events.Histograms("grad/dense_1/weight")] == \
        [e.histogram_value.num for e in expected.Histograms("grad/dense_1/weight")]
    written = _raw_steps(run_dir, "epoch/loss")
    print(f"epoch/loss written {len(written)} times for 30 epochs (stale after the kill: {len(written) - 30})")
    assert sorted(set(written)) == list(range(30))
    for name in ("history.csv", GRADIENTS_FILE):
        assert (run_dir / name).read_text() == (whole_dir / name).read_text(), name
