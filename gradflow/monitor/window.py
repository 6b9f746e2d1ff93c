"""A window's statistics: what ``GradientMonitor.history`` keeps, and the one read-back that fills it.

``read_parts`` folds every part and copies their device sums to the host at once (``read_back``);
``read_window`` then has each part read its own values into the ``Window`` (rows), TensorBoard
scalars, texts and histogram requests that a ``WindowReader`` holds (``histograms.py`` builds the
histograms); ``keep`` adds the windows to the history, a ring of a settable length.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradflow.monitor.compact import RECENT, Layouts, compact_rows
from gradflow.monitor.histograms import HistogramRequests
from gradflow.monitor.tensors import MonitorError

SUM = "sum"      # Reduced.reduce: copies on several processes add up (sums, sums of squares, counts)
MAX = "max"      # the largest of them is the answer (max |g|)
REDUCTIONS = (SUM, MAX)


@dataclass(frozen=True)
class Reduced:
    """A device tensor a part hands to the window's read-back, and how copies of it on
    several processes combine (``SUM`` or ``MAX``)."""

    tensor: torch.Tensor
    reduce: str = SUM
    # ``tensor.numpy()``, where the part keeps this object while the tensor lives (``host_view``):
    # ``read_back`` hands it over on the CPU instead of making a view each window.
    host: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"Reduced.reduce must be one of {REDUCTIONS}, got {self.reduce!r}")


def host_view(tensor: torch.Tensor, reduce: str = SUM) -> Reduced:
    """``Reduced(tensor, reduce)`` with its numpy view made once, where ``read_back`` would make
    one (a CPU float64 or int64 tensor), for a part that keeps its ``device_tensors()`` between
    windows: fifteen views a window were about 30 us of the tutorial's ``log()``."""
    viewed = tensor.device.type == "cpu" and tensor.dtype in (torch.float64, torch.int64)
    return Reduced(tensor, reduce, tensor.numpy() if viewed else None)


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
    # ``weights[p]`` is the canonical weight row (columns.WEIGHT). Each gradient row repeats it as
    # weight_l1, weight_norm, weight_update_ratio: log()'s rows and gradients.csv are one row per
    # parameter, and the analysis reads gradients.csv, so the copy is part of that format.
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    activations: dict[str, dict[str, float]] = field(default_factory=dict)
    # Window-level figures: steps, skipped_steps, total_norm, total_norm_max and, where the loop
    # called clip_grad_norm_ on the model, total_norm_before_clip and clipped_steps.
    overall: dict[str, float] = field(default_factory=dict)
    # Per parameter: the non-finite VALUES in the window's skipped steps (AMP overflows); the
    # skipped STEPS are counted in overall["skipped_steps"] and each gradient row's skipped_steps.
    skipped_nonfinite: dict[str, int] = field(default_factory=dict)
    # LSTM/GRU weights per gate (gates.py): parameter -> gate -> norm, weight_norm, steps.
    gates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # parameter -> the kind of module that owns it (kinds.py: linear, conv, norm, embedding, ...).
    kinds: dict[str, str] = field(default_factory=dict)
    # Parameters an optimizer that stepped in this window holds, but that got no gradient in
    # any of its steps (an idle expert, a branch not taken): not in ``gradients``, named here.
    idle: list[str] = field(default_factory=list)
    # Where the window's first NaN/inf came from (nonfinite.Source: module, phase, step), or None;
    # first_overflow: the same for a step a GradScaler skipped (an AMP overflow, not a NaN source).
    first_nonfinite: Any = None
    first_overflow: Any = None
    # Recurrent layers (through_time.py): "<module>.l<k>[_reverse]" -> (T,) float64, entry t the mean
    # over the window's profiled passes of ||dL/dh_t||_2; and each key's cell (RNN_TANH, LSTM, GRU, ...).
    time: dict[str, Any] = field(default_factory=dict)
    time_cells: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, int]:
        """Deprecated name of ``skipped_nonfinite`` (it counts values, not steps)."""
        warnings.warn("Window.skipped is renamed Window.skipped_nonfinite: it counts the non-finite values "
                      "of skipped steps; the steps are in overall['skipped_steps']", DeprecationWarning, stacklevel=2)
        return self.skipped_nonfinite


class WindowReader:
    """What the parts fill as they read one window: its rows (``windows``, one per member),
    TensorBoard scalars (``scalars``, one dict per member), texts (``texts``, one dict per
    member: tag -> Markdown, for the few things said in words) and histogram requests (``wanted``)."""

    def __init__(self, members: int, windows: list[Window], wanted: HistogramRequests) -> None:
        self.members = members
        self.windows = windows
        self.scalars: list[dict[str, float]] = [{} for _ in range(members)]
        self.texts: list[dict[str, str]] = [{} for _ in range(members)]
        self.wanted = wanted

    def slots(self, names: list[str]) -> tuple[tuple[int, int, str, str], ...]:
        """(slot, member, name, tag path) for every slot: member k of item i is slot i*K + k."""
        return _slots(tuple(names), self.members)


@functools.lru_cache(maxsize=64)
def _slots(names: tuple[str, ...], members: int) -> tuple[tuple[int, int, str, str], ...]:
    # Made once per monitor and part: every window of a small model read them (a tag path a name).
    return tuple((slot, slot % members, names[slot // members], tag_path(names[slot // members]))
                 for slot in range(len(names) * members))


def read_back(parts: dict[str, Reduced], reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
              ) -> dict[str, np.ndarray]:
    """One device-to-host copy of everything a window accumulated, as float64 arrays; on the
    CPU, float64 and int64 tensors (the sums, the histogram counts) are handed over as they
    are: numpy views, no copy, valid until their part's ``reset()`` zeroes them (``log()``
    writes and keeps the window before it starts the next one). Readers must copy what they
    keep past the window, and never write into these arrays.

    ``reduce(flat, how)``, where given, combines the window's sums across processes before the
    copy: it is called once per reduction (``part.SUM``, ``part.MAX``) with the float64
    concatenation of every tensor that declared it, and returns the combined tensor (one
    all-reduce per kind of reduction, not one per tensor).
    """
    if not parts:
        return {}
    first = next(iter(parts.values())).tensor
    if reduce is None and first.device.type == "cpu":
        # Views, not float64 copies: on a rank-16 LoRA the copies of the gradient and activation
        # counts were 104 KB of log()'s peak (docs/memory.md). Counts stay int64, exact either way.
        return {key: part.host if part.host is not None else part.tensor.numpy()
                if part.tensor.dtype in (torch.float64, torch.int64) else part.tensor.numpy().astype(np.float64)
                for key, part in parts.items()}
    out: dict[str, np.ndarray] = {}
    for how in REDUCTIONS:
        keys = [key for key, part in parts.items() if part.reduce == how]
        if not keys:
            continue
        flat = torch.cat([parts[key].tensor.reshape(-1).to(first.device, torch.float64) for key in keys])
        if reduce is not None:
            flat = reduce(flat, how)
        host, start = flat.cpu().numpy(), 0
        for key in keys:
            tensor = parts[key].tensor
            out[key] = host[start:start + tensor.numel()].reshape(tuple(tensor.shape))
            start += tensor.numel()
    return {key: out[key] for key in parts}


def read_parts(parts: dict[str, Any], sharding: Any = None, recorded: int = 0) -> dict[str, np.ndarray]:
    """Every part's device sums as ``<part name>/<key>``: each part folded, then one read-back; with
    ``sharding`` (a ``sharding.ShardLayout``: DTensor parameters) first reduced to the full
    tensors' values, on every rank (``recorded``: the steps the window recorded)."""
    tensors = {}
    for name, part in parts.items():
        part.fold()
        tensors.update({f"{name}/{key}": t for key, t in part.device_tensors().items()})
    if sharding is not None:
        tensors = sharding.reduce(tensors, recorded)
    return read_back(tensors)


def read_window(parts: dict[str, Any], values: dict[str, np.ndarray], step: int, members: int) -> WindowReader:
    """One ``Window`` per member at ``step``, filled by each part's ``read`` from its own keys of
    ``values`` (``read_parts``), unprefixed."""
    windows = [Window(step, 0, member=k if members > 1 else None) for k in range(members)]
    reader = WindowReader(members, windows, HistogramRequests())
    by_part: dict[str, dict[str, np.ndarray]] = {name: {} for name in parts}
    for key, value in values.items():
        name, _, own = key.partition("/")
        if name in by_part:                   # a key of no part (none today) is left out, as before
            by_part[name][own] = value
    for name, part in parts.items():
        part.read(by_part[name], reader)
    return reader


def keep(history: list[Window], windows: list[Window], length: int | None, shared: Layouts | None = None) -> None:
    """Add one window per member to ``history``, which keeps the last ``length`` windows of each
    member (None: every window), the oldest dropped first. With ``shared`` (the history's
    ``compact.Layouts``), the windows that have just become ``compact.RECENT`` windows old get
    their rows in compact form (``compact_window``)."""
    history.extend(windows)
    if length is not None and len(history) > length * len(windows):
        del history[:len(history) - length * len(windows)]
    aged = len(history) - (RECENT + 1) * len(windows)
    if shared is not None and aged >= 0:
        for window in history[aged:aged + len(windows)]:
            compact_window(window, shared)


def compact_window(window: Window, shared: Layouts) -> None:
    """The window's tables of rows (gradients, weights, activations) as read-only ``RowTable``s:
    an eighth of the memory (compact.py)."""
    window.gradients = compact_rows(window.gradients, shared)
    window.weights = compact_rows(window.weights, shared)
    window.activations = compact_rows(window.activations, shared)


def member_windows(history: list[Window], member: int, members: int) -> list[Window]:
    """Member ``member``'s windows of ``history``; MonitorError unless 0 <= member < members."""
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < members:
        raise MonitorError(f"member must be an int from 0 to {members - 1} (members={members}), got {member!r}")
    return list(history) if members == 1 else [w for w in history if w.member == member]
