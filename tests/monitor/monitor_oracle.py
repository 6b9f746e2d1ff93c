"""Oracle statistics computed straight from ``p.grad``, for the monitor tests."""

from __future__ import annotations

import math

import numpy as np
import torch

from gradflow.monitor.gradients import HISTOGRAM_EVERY


def sign_exponent_bin(x: float) -> int:
    """The monitor's histogram bin of one float32 value, from its definition."""
    sign = 0 if math.copysign(1.0, x) < 0 else 256
    if not math.isfinite(x):
        return sign + 255
    magnitude = abs(x)
    if magnitude == 0:                   # +0 and -0 alone
        return sign
    if magnitude < 2.0 ** -126:          # a subnormal: the lowest non-zero bin of its sign
        return sign + 1
    return sign + math.floor(math.log2(magnitude)) + 127


def step_statistics(grad: torch.Tensor) -> dict[str, float]:
    g = grad.detach().double().reshape(-1)
    return {
        "mean": g.mean().item(),
        "mean_abs": g.abs().mean().item(),
        "norm": g.norm().item(),
        "max_abs": g.abs().max().item(),
        "zeros": int((g == 0).sum()),
        "nonfinite": int((~torch.isfinite(g)).sum()),
        "numel": g.numel(),
    }


def histogrammed(seen: dict[str, int], name: str, every: int = HISTOGRAM_EVERY) -> bool:
    """Whether parameter ``name``'s gradient at this step is histogrammed: its 0th, every-th, ...
    step with a gradient in the window, counted in ``seen`` (per parameter so far, updated here)."""
    before = seen.get(name, 0)
    seen[name] = before + 1
    return before % every == 0


class GradientOracle:
    """Collects each step's statistics of every parameter's gradient, then averages them; the
    histogram bins of the steps that are histogrammed (``histogrammed``)."""

    def __init__(self, named_parameters) -> None:
        self.params = dict(named_parameters)
        self.steps: dict[str, list[dict[str, float]]] = {name: [] for name in self.params}
        self.bins: dict[str, np.ndarray] = {name: np.zeros(512, dtype=np.int64) for name in self.params}
        self.seen: dict[str, int] = {}

    def capture(self) -> None:
        """Call where the optimizer is about to step (an optimizer over every parameter)."""
        for name, p in self.params.items():
            grad = p.grad
            if grad is None:
                continue
            self.steps[name].append(step_statistics(grad))
            if histogrammed(self.seen, name):
                for value in grad.detach().float().reshape(-1).tolist():
                    self.bins[name][sign_exponent_bin(value)] += 1

    def window(self, name: str) -> dict[str, float]:
        rows = self.steps[name]
        out = {key: float(np.mean([row[key] for row in rows])) for key in ("mean", "mean_abs", "norm", "max_abs")}
        out["zero_fraction"] = sum(row["zeros"] for row in rows) / sum(row["numel"] for row in rows)
        out["nonfinite"] = sum(row["nonfinite"] for row in rows)
        out["steps"] = len(rows)
        return out

    def reset(self) -> None:
        self.seen.clear()
        for name in self.params:
            self.steps[name].clear()
            self.bins[name][:] = 0


def assert_matches_oracle(logged: dict, oracle: GradientOracle, rtol: float = 1e-5, atol: float = 1e-8) -> None:
    seen = {name for name, rows in oracle.steps.items() if rows}
    assert set(logged) == seen, f"logged {sorted(logged)} but gradients existed for {sorted(seen)}"
    for name in seen:
        expected = oracle.window(name)
        for key, value in expected.items():
            assert math.isclose(logged[name][key], value, rel_tol=rtol, abs_tol=atol), (
                f"{name}.{key}: monitor {logged[name][key]!r}, oracle {value!r}")
