"""Datasets behind a small registry: the tutorial's two circles, and moons.

Every dataset is made the tutorial's way: sklearn draws (X, y), a MinMaxScaler with
feature_range (-1, 1) is fitted on all of X, the first ``n_train`` rows train and the rest test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from sklearn.datasets import make_circles, make_moons
from sklearn.preprocessing import MinMaxScaler


@dataclass(frozen=True)
class Dataset:
    """Float32 tensors; labels shaped (n, 1) with values 0.0 / 1.0."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _circles(n_samples: int, noise: float, random_state: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    return make_circles(n_samples=n_samples, noise=noise, random_state=random_state, factor=factor)


def _moons(n_samples: int, noise: float, random_state: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    del factor  # moons has no radius ratio; the argument keeps builders interchangeable
    return make_moons(n_samples=n_samples, noise=noise, random_state=random_state)


# name -> builder(n_samples, noise, random_state, factor) -> (X, y); add a line to plug in more.
DATASETS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "circles": _circles,
    "moons": _moons,
}


def scale_and_split(x: np.ndarray, y: np.ndarray, n_train: int) -> Dataset:
    """Scale X to [-1, 1] (fitted on all rows, as the tutorial does) and split at ``n_train``.

    Example:
        >>> ds = scale_and_split(np.array([[0.0], [2.0], [4.0]]), np.array([0, 1, 0]), 2)
        >>> ds.x_test.tolist(), ds.y_train.shape
        ([[1.0]], torch.Size([2, 1]))
    """
    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)
    return Dataset(xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:])


def load_dataset(cfg: Any) -> Dataset:
    """Build the dataset a ``DataConfig`` describes.

    Example:
        >>> from gradflow.experiments.config import DataConfig
        >>> ds = load_dataset(DataConfig())          # the tutorial's two circles
        >>> ds.x_train.shape, ds.x_test.shape
        (torch.Size([500, 2]), torch.Size([500, 2]))
    """
    x, y = DATASETS[cfg.name](cfg.n_samples, cfg.noise, cfg.random_state, cfg.factor)
    return scale_and_split(x, y, cfg.n_train)
