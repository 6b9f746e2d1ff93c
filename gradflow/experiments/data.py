"""Datasets behind a small registry: the tutorial's two circles, and moons (and, through
``sequences.py``, the long-range sequence tasks for recurrent nets).

Every dataset is made the tutorial's way: sklearn draws (X, y), a MinMaxScaler with
feature_range (-1, 1) is fitted on all of X, the first ``n_train`` rows train and the rest test.

Start-up: importing sklearn takes about as long as importing torch (1.2-1.6 s here, mostly
scipy through ``sklearn.base``) for 1000 points that never change. So the scaled arrays of a
built-in dataset are kept in a cache, keyed by the dataset's values and the versions of
scikit-learn and numpy that made them; a run finds them there and imports no sklearn. sklearn
still makes every array: the first run on a machine (or after an upgrade) draws and stores
them. The cache is ``$GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow``, else
``~/.cache/gradflow``; ``GRADFLOW_CACHE_DIR=off`` turns it off, and a cache that cannot be read
or written is passed by (the data are drawn).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

CACHE_FORMAT = 1  # bump when the arrays a key names change (a new scaling, say)


@dataclass(frozen=True)
class Dataset:
    """Float32 tensors; labels shaped (n, 1) with values 0.0 / 1.0."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _circles(n_samples: int, noise: float, random_state: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_circles

    return make_circles(n_samples=n_samples, noise=noise, random_state=random_state, factor=factor)


def _moons(n_samples: int, noise: float, random_state: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    del factor  # moons has no radius ratio; the argument keeps builders interchangeable
    return make_moons(n_samples=n_samples, noise=noise, random_state=random_state)


# name -> builder(n_samples, noise, random_state, factor) -> (X, y); add a line to plug in more.
DATASETS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "circles": _circles,
    "moons": _moons,
}
_CACHED = dict(DATASETS)  # the builders whose output is cached; one plugged in is drawn every time


def scale_and_split(x: np.ndarray, y: np.ndarray, n_train: int) -> Dataset:
    """Scale X to [-1, 1] (fitted on all rows, as the tutorial does) and split at ``n_train``.

    Example:
        >>> ds = scale_and_split(np.array([[0.0], [2.0], [4.0]]), np.array([0, 1, 0]), 2)
        >>> ds.x_test.tolist(), ds.y_train.shape
        ([[1.0]], torch.Size([2, 1]))
    """
    return _split(_scale(x), y, n_train)


def load_dataset(cfg: Any) -> Dataset:
    """Build the dataset a ``DataConfig`` describes (from the cache when it holds it).

    Example:
        >>> from gradflow.experiments.config import DataConfig
        >>> ds = load_dataset(DataConfig())          # the tutorial's two circles
        >>> ds.x_train.shape, ds.x_test.shape
        (torch.Size([500, 2]), torch.Size([500, 2]))
    """
    from gradflow.experiments.sequences import SEQUENCE_TASKS, sequence_arrays

    if cfg.name in SEQUENCE_TASKS:      # x (n, T, 1): no scaling, no cache (numpy draws them at once)
        return _split(*sequence_arrays(cfg), cfg.n_train)
    return _split(*scaled_arrays(cfg), cfg.n_train)


def scaled_arrays(cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X scaled to [-1, 1], y) for a ``DataConfig``: from the cache, else drawn (and stored)."""
    builder = DATASETS[cfg.name]
    path = _cache_path(cfg) if builder is _CACHED.get(cfg.name) else None
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as stored:
                return stored["x"], stored["y"]
        except (OSError, ValueError, KeyError):  # absent, partly written by hand, or another format
            pass
    x, y = builder(cfg.n_samples, cfg.noise, cfg.random_state, cfg.factor)
    x, y = _scale(x), np.asarray(y)
    if path is not None:
        _store(path, x, y)
    return x, y


def cache_dir() -> Path | None:
    """Where scaled datasets are kept, or None when ``GRADFLOW_CACHE_DIR=off``."""
    chosen = os.environ.get("GRADFLOW_CACHE_DIR")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradflow"


def _cache_path(cfg: Any) -> Path | None:
    from importlib.metadata import PackageNotFoundError, version

    directory = cache_dir()
    if directory is None:
        return None
    try:
        made_by = {"scikit-learn": version("scikit-learn"), "numpy": version("numpy")}
    except PackageNotFoundError:
        return None
    key = {"format": CACHE_FORMAT, "name": cfg.name, "n_samples": cfg.n_samples, "noise": cfg.noise,
           "random_state": cfg.random_state, "factor": cfg.factor, **made_by}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / "data" / f"{cfg.name}-{digest}.npz"


def _store(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write atomically (a reader sees the whole file or none); a failure only costs the next run time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(part, x=x, y=y)
        os.replace(part, path)
    except OSError:
        pass


def _scale(x: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import MinMaxScaler

    return MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)


def _split(x: np.ndarray, y: np.ndarray, n_train: int) -> Dataset:
    import torch

    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)
    return Dataset(xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:])
