"""A window's statistics: read back from the accumulators, turned into rows, scalars and histograms.

``Window`` is what ``GradientMonitor.history`` keeps; ``WindowReader`` turns one read-back of
the accumulators into per-parameter rows, TensorBoard scalars and histogram requests
(``histograms.py`` builds the histograms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradflow.monitor import stats as S
from gradflow.monitor.histograms import LINEAR_BINS, HistogramRequests


def tag_path(name: str) -> str:
    """TensorBoard path of a parameter or module name: ``dense_1.weight`` -> ``dense_1/weight``."""
    return name.replace(".", "/")


@dataclass
class Window:
    """What one window recorded: per-parameter gradient and weight rows, per-module activations."""

    step: int
    steps: int
    member: int | None = None    # which member of a batched model (``members`` > 1)
    gradients: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    activations: dict[str, dict[str, float]] = field(default_factory=dict)
    # Window-level figures: steps, skipped_steps, total_norm, total_norm_max and, where the loop
    # called clip_grad_norm_ on the model, total_norm_before_clip and clipped_steps.
    overall: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)   # per parameter: non-finite values in skipped steps
    # LSTM/GRU weights per gate (gates.py): parameter -> gate -> norm, weight_norm, steps.
    gates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # parameter -> the kind of module that owns it (kinds.py: linear, conv, norm, embedding, ...).
    kinds: dict[str, str] = field(default_factory=dict)
    # Recurrent layers (through_time.py): "<module>.l<k>[_reverse]" -> (T,) float64, entry t the mean
    # over the window's profiled passes of ||dL/dh_t||_2; and each key's cell (RNN_TANH, LSTM, GRU, ...).
    time: dict[str, Any] = field(default_factory=dict)
    time_cells: dict[str, str] = field(default_factory=dict)


class WindowReader:
    """Rows, scalars and histogram requests of one window, from its read-back values."""

    def __init__(self, names: list[str], members: int, windows: list[Window], wanted: HistogramRequests) -> None:
        self.names = names
        self.members = members
        self.windows = windows
        self.scalars: list[dict[str, float]] = [{} for _ in range(members)]
        self.wanted = wanted

    def _slots(self, names: list[str]):
        """(slot, member, name, tag path) for every slot: member k of item i is slot i*K + k."""
        for slot in range(len(names) * self.members):
            index, member = divmod(slot, self.members)
            yield slot, member, names[index], tag_path(names[index])

    def gradients(self, values: dict[str, np.ndarray], steps: np.ndarray, slot_numel: list[int],
                  skipped: np.ndarray) -> None:
        """Per-parameter rows: the means over each parameter's steps of that step's value."""
        counts = values["counts"].reshape(-1, S.SIGN_EXPONENT_BINS)
        numel = np.asarray(slot_numel, dtype=np.float64)
        means = values["totals"] / np.maximum(steps, 1)[:, None]
        zeros = counts[:, S.ZERO_EXPONENT] + counts[:, S.EXPONENTS + S.ZERO_EXPONENT]
        nonfinite = counts[:, S.NONFINITE_EXPONENT] + counts[:, S.EXPONENTS + S.NONFINITE_EXPONENT]
        for slot, k, name, path in self._slots(self.names):
            index = slot // self.members
            if skipped[index]:
                self.windows[k].skipped[name] = int(values["skipped_nonfinite"][index])
            if steps[slot] == 0:
                continue
            row = {"mean": float(means[slot, 0] / numel[slot]), "mean_abs": float(means[slot, 1] / numel[slot]),
                   "norm": float(means[slot, 2]), "max_abs": float(means[slot, 3]),
                   "zero_fraction": float(zeros[slot] / (numel[slot] * steps[slot])),
                   "nonfinite": int(nonfinite[slot])}
            self.scalars[k].update({f"grad/{path}/{key}": value for key, value in row.items()})
            self.wanted.value(k, f"grad/{path}", counts[slot])
            self.wanted.log10(k, f"grad_log10/{path}", counts[slot])
            row["steps"] = int(steps[slot])
            row["skipped_steps"] = int(skipped[index])
            self.windows[k].gradients[name] = row

    def overall(self, step_squares: np.ndarray, recorded: int, skipped_steps: int,
                clipping: tuple[int, float, int] | None) -> None:
        """Window-level figures: steps, skipped steps, the total norm per step (mean and max)
        and, where ``clip_grad_norm_`` was called, the norm before clipping and the clipped steps."""
        norms = np.sqrt(step_squares[:recorded])               # (steps, members)
        for k, window in enumerate(self.windows):
            row = {"steps": window.steps, "skipped_steps": skipped_steps}
            if recorded:
                row["total_norm"] = float(norms[:, k].mean())
                row["total_norm_max"] = float(norms[:, k].max())
            if clipping is not None and clipping[0]:
                calls, norm_sum, clipped = clipping
                row.update(total_norm_before_clip=float(norm_sum / calls), clipped_steps=int(clipped), clip_calls=calls)
            window.overall = row
            self.scalars[k].update({f"grad/{key}": float(v) for key, v in row.items()})

    def weights(self, values: dict[str, np.ndarray]) -> None:
        l1, l2, moved, start = values["weights"].T
        with np.errstate(divide="ignore", invalid="ignore"):
            # A zero start (a fresh bias) has no relative update: NaN says so.
            ratios = np.where(start > 0, moved / start, np.nan)
        for slot, k, name, path in self._slots(self.names):
            row = {"l1": float(l1[slot]), "norm": float(l2[slot]), "update_ratio": float(ratios[slot])}
            self.windows[k].weights[name] = row
            if name in self.windows[k].gradients:
                self.windows[k].gradients[name].update({f"weight_{key}": v for key, v in row.items()})
            self.scalars[k].update({f"weight/{path}/{key}": value for key, value in row.items()})
            self.wanted.value(k, f"weight/{path}", values["weight_counts"][slot], state=True)

    def activations(self, values: dict[str, np.ndarray], taps: Any) -> None:
        counts = values["activation_counts"].reshape(-1, S.SIGN_EXPONENT_BINS)
        linear = values["activation_linear"][:-1].reshape(-1, LINEAR_BINS)    # the last count: NaN
        for slot, k, name, path in self._slots(taps.names):
            row = taps.read(slot, values["moments"][slot], values["positives"])
            if row is None:
                continue
            self.windows[k].activations[name] = row
            self.scalars[k].update({f"activation/{path}/{key}": v for key, v in row.items()})
            bounds = taps.bounds[slot // self.members]
            if bounds is None:
                self.wanted.value(k, f"activation/{path}", counts[slot])
            else:                                   # tanh, sigmoid: equal bins over the range
                self.wanted.linear(k, f"activation/{path}", linear[slot], bounds)


def read_back(parts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One device-to-host copy of everything a window accumulated, as float64 arrays."""
    first = next(iter(parts.values()))
    if first.device.type == "cpu":      # copies, not views: the sums are zeroed next
        return {key: tensor.numpy().astype(np.float64) for key, tensor in parts.items()}
    flat = torch.cat([t.reshape(-1).double() for t in parts.values()]).cpu().numpy()
    out, start = {}, 0
    for key, tensor in parts.items():
        out[key] = flat[start:start + tensor.numel()].reshape(tuple(tensor.shape))
        start += tensor.numel()
    return out


def gaps(names: list[str], params: list[torch.Tensor], steps: np.ndarray, recorded: int, skipped: int,
         no_activations: bool) -> list[tuple[str, str]]:
    """What a window did not record although it could have, as (key, warning) pairs: gradients
    but no step, gradients that no monitored optimizer stepped, no activation output at all."""
    out = []
    with_grad = {name for name, p in zip(names, params) if p.grad is not None}
    if not recorded and with_grad and not skipped:
        out.append(("no-step", "log(): the parameters have gradients but no optimizer step was recorded in this "
                    "window; the monitor records at optimizer.step(). To look at gradients without stepping "
                    "(say, at initialisation), call monitor.record() after backward()"))
    elif recorded:
        missed = [name for name, n in zip(names, steps) if n == 0 and name in with_grad]
        if missed:
            out.append(("not-stepped", f"log(): {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''} had "
                        "gradients but no monitored optimizer stepped them in this window"))
    if recorded and no_activations:
        out.append(("no-activations", "log(): no activation output was recorded in this window although steps "
                    "were: either no training forward pass ran in it (steps recorded by hand), or the model runs "
                    "under torch.compile, where the activation taps stay off (a hook there would recompile every "
                    "step); gradients and weights are still recorded. Pass activations=False to silence this"))
    return out
