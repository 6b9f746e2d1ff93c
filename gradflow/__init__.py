"""gradflow: make gradient flow visible and diagnosable in PyTorch.

Import the pieces you need, e.g. ``from gradflow.experiments.config import load_config``.
The package import stays light: only the monitor (torch and numpy) is imported here;
nothing pulls in tensorboard or matplotlib until it is used.
"""

from gradflow.monitor import GradientMonitor, MonitorError

__all__ = ["GradientMonitor", "MonitorError"]

__version__ = "0.1.0"
