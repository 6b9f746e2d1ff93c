"""The run directory: one new directory per run, never reused, plus the files written into it.

Layout: ``<logdir>/<name>-<YYYYmmdd-HHMMSS>-seed<N>[-2, -3, ...]/`` holding config.yaml,
history.csv (its format: analysis/history.py), summary.json, accuracy.png and TensorBoard event files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gradflow.errors import ConfigError


def check_logdir(logdir: str | Path) -> Path:
    """Fail early (``ConfigError``) when ``logdir`` cannot hold run directories.

    Writes nothing: an existing directory must be writable; a missing one must have an
    existing, writable ancestor directory (it is created later, with the run directory).

    Example:
        >>> check_logdir("/tmp")
        PosixPath('/tmp')
    """
    path = Path(logdir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--logdir: {probe} is not a directory; pass a writable directory (default runs/)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--logdir: {probe} is not writable; pass a writable directory (default runs/)")
    return path


def create_run_dir(logdir: str | Path, name: str, seed: int, now: float | None = None) -> Path:
    """Create and return a fresh ``<logdir>/<name>-<time>-seed<N>``; ``-2``, ``-3``... on collision.

    ``os.mkdir`` is atomic, so concurrent runs never share a directory.

    Example:
        >>> import tempfile
        >>> create_run_dir(tempfile.mkdtemp(), "deep_relu", 0, now=0).name
        'deep_relu-19700101-000000-seed0'
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now) if now is not None else time.localtime())
    return create_unique_dir(logdir, f"{name}-{stamp}-seed{seed}")


def create_unique_dir(logdir: str | Path, base: str) -> Path:
    """Create and return ``<logdir>/<base>``, or ``<base>-2``, ``-3``... when taken.

    ``os.mkdir`` is atomic, so two processes never get the same directory.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> [create_unique_dir(root, "run").name for _ in range(2)]
        ['run', 'run-2']
    """
    logdir = Path(logdir)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--logdir: cannot create {logdir} ({exc.strerror}); pass a writable directory") from None
    for n in range(1, 10_000):
        path = logdir / (base if n == 1 else f"{base}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"--logdir: cannot create {path} ({exc.strerror}); pass a writable directory") from None
    raise ConfigError(f"--logdir: too many directories named {base} in {logdir}")


def write_config(run_dir: Path, config: Mapping[str, Any]) -> Path:
    """Write the resolved config as ``config.yaml`` (re-loadable by ``gradflow train``)."""
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float, however nested, as None: JSON has no NaN, and
    null is what ``gradflow diagnose --json`` writes for one too (analysis.diagnose)."""
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (train_accuracy, test_accuracy, epochs, seconds, ...)."""
    path = run_dir / "summary.json"
    data = {k: _json_safe(v) for k, v in summary.items()}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


# --- checkpoints -------------------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write ``checkpoint.pt`` atomically: a crash while writing leaves the previous one intact.

    The state goes to a temporary file in the same directory, is flushed and fsynced, then
    ``os.replace`` swaps it in (atomic on POSIX within one file system).

    Example:
        >>> import tempfile
        >>> save_checkpoint(Path(tempfile.mkdtemp()), {"epoch": 3}).name
        'checkpoint.pt'
    """
    import torch

    path = Path(run_dir) / CHECKPOINT_FILE
    tmp = path.with_name(f".{CHECKPOINT_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read a run directory's checkpoint; ``ConfigError`` (one line) when it is missing or corrupt.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = save_checkpoint(d, dict.fromkeys(CHECKPOINT_KEYS, 3))
        >>> load_checkpoint(d)["epoch"]
        3
    """
    import torch

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} is not a run directory; pass one that gradflow train made")
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; only runs that wrote a checkpoint can resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing fault
        raise ConfigError(f"--resume: {path} is unreadable ({type(exc).__name__}); it is corrupt or not a gradflow checkpoint") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f"--resume: {path} lacks {', '.join(missing)}; it is not a gradflow checkpoint")
    return state


# What a trainer checkpoint holds (see gradflow.experiments.train.fit); the CLI adds config and monitor.
CHECKPOINT_KEYS = ("epoch", "step", "model", "optimizer", "torch_rng", "generator", "history")


def truncate_table(path: Path, keep: int, column: str = "window") -> None:
    """Keep only the rows of CSV ``path`` whose ``column`` is below ``keep`` (atomically).

    A resumed run cuts its per-window tables back to the checkpoint, so a window written after
    the checkpoint (before a hard kill) is not there twice.
    """
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    index = rows[0].index(column)
    kept = [rows[0]] + [row for row in rows[1:] if len(row) == len(rows[0]) and int(row[index]) < keep]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)
