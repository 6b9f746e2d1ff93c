"""gradflow: make gradient flow visible and diagnosable in PyTorch.

Import the pieces you need, e.g. ``from gradflow.config import load_config``.
The package import stays light: nothing here pulls in tensorboard or matplotlib.
"""

# from gradflow.monitor import GradientMonitor  (added with the monitor)

__version__ = "0.1.0"
