"""gradflow: make gradient flow visible and diagnosable in PyTorch.

Import the pieces you need, e.g. ``from gradflow.experiments.config import load_config``.
The package import is free: ``gradflow.GradientMonitor`` imports the monitor (torch and
numpy) on first use, so ``gradflow --help`` and ``import gradflow.cli`` load no torch.
"""

from typing import Any

__all__ = ["GradientMonitor", "MonitorError"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``from gradflow import GradientMonitor`` imports the monitor (and torch) only then."""
    if name in __all__:
        from gradflow import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'gradflow' has no attribute {name!r}")
