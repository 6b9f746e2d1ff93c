"""Synthetic monitor windows for the diagnosis tests: a 3-layer MLP history (mean |g|, norms,
activations) and windows of per-parameter gradient and weight norms."""

import math

from gradflow.monitor import Window


def history(epochs=20, sizes=(0.1, 0.1, 0.1), update=1e-3, saturated=None, dead=None, nonfinite=0,
            zero=0.0, grow=1.0):
    """Windows of a 3-layer model: ``sizes`` = mean |g| per layer (input first) in every
    window, times ``grow ** epoch``; activations per hidden layer if given."""
    windows = []
    for epoch in range(epochs):
        gradients = {}
        for i, size in enumerate(sizes, start=1):
            g = size * grow ** epoch
            gradients[f"dense_{i}.weight"] = {"mean_abs": g, "norm": 3 * g, "max_abs": 2 * g, "zero_fraction": zero,
                                              "nonfinite": nonfinite if epoch == epochs - 1 else 0,
                                              "weight_update_ratio": update * 16, "steps": 16}
            gradients[f"dense_{i}.bias"] = {"mean_abs": g, "norm": g, "max_abs": g, "zero_fraction": zero,
                                            "nonfinite": 0, "weight_update_ratio": math.nan, "steps": 16}
        activations = {}
        for i in range(1, len(sizes)):
            if saturated is not None:
                activations[f"tanh_{i}"] = {"mean": 0.0, "std": 0.9, "saturated_fraction": saturated}
            if dead is not None:
                activations[f"relu_{i}"] = {"mean": 0.1, "std": 0.2, "dead_fraction": dead}
        windows.append(Window(epoch, 16, gradients=gradients, activations=activations))
    return windows


FALLING = [0.7 * 0.95 ** e for e in range(20)]
FLAT = [0.693] * 20


def norm_windows(rows, count=10):
    """``count`` windows of per-parameter (grad norm, weight norm, zero fraction) rows."""
    return [Window(i, 4, gradients={name: {"mean_abs": g, "norm": g, "weight_norm": w, "zero_fraction": z,
                                           "nonfinite": 0, "weight_update_ratio": 4e-3, "steps": 4}
                                    for name, (g, w, z) in rows.items()}) for i in range(count)]
