"""The monitor library: hooks on any nn.Module that record the gradient each optimizer step applies.

Room 1 of gradflow's layout (see docs/architecture.md): it imports torch and numpy only (and
TensorBoard's protos when it writes), never the experiments, the analysis or the CLI.
"""

from gradflow.monitor.activations import is_activation
from gradflow.monitor.monitor import (
    GradientMonitor,
    MonitorError,
    Window,
    tag_path,
    unwrap,
)

__all__ = ["GradientMonitor", "MonitorError", "Window", "is_activation", "tag_path", "unwrap"]
