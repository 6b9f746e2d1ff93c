"""Optimizers by name, with Keras-equivalent settings: the registry that config validates against."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# The builders take an ``OptimizerConfig`` (gradflow.experiments.config), typed here as Any:
# config imports this registry to validate names, so this module imports nothing back.

def _sgd(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    # No dampening: torch's v = m v + g; w -= lr v is Keras' v = m v - lr g; w += v.
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, dampening=0.0)


def _adam(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta_1, cfg.beta_2), eps=cfg.epsilon)


# name -> builder(params, OptimizerConfig) -> torch optimizer
OPTIMIZERS: dict[str, Callable[[Iterable[torch.Tensor], Any], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
}


def make_optimizer(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    """Optimizer named by ``cfg.name`` with Keras-equivalent settings.

    Example:
        >>> from gradflow.experiments.config import OptimizerConfig
        >>> make_optimizer([torch.zeros(2, requires_grad=True)], OptimizerConfig()).defaults["momentum"]
        0.9
    """
    return OPTIMIZERS[cfg.name](params, cfg)
