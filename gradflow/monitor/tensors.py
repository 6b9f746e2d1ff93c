"""Flat views of gradients and activations, and the segment layouts the batched reductions take.

Shared by the accumulators: a step's small tensors are concatenated into one flat float32
tensor; a layout says which segment (parameter, tap, member) each element belongs to.
"""

from __future__ import annotations

import torch

# A parameter at least this large gets its own reductions; smaller ones are concatenated and
# reduced together, because on a small model each extra op costs more than its arithmetic.
LARGE_PARAMETER = 1 << 16
# Small gradients and activations wait, copied or referenced, until this many elements are
# pending (or the window closes), then are reduced together: a few ops per window, not per step.
# It is also all the monitor keeps of them between steps: 256 KB of float32, whatever the model
# (docs/memory.md; it was 1M elements, 4 MB, when batching alone set it).
PENDING_ELEMENTS = 1 << 16


class MonitorError(RuntimeError):
    """Raised when a monitor cannot attach."""


def _check_layout(flat: torch.Tensor, segment: torch.Tensor) -> None:
    """The segment reductions trust their layout (no check that syncs with the device): make
    sure the values are the ones the layout was made for. A shape test, no host sync."""
    if flat.numel() != segment.numel():
        raise MonitorError(f"a monitored tensor changed size ({flat.numel()} elements pending, "
                           f"{segment.numel()} expected); create a new GradientMonitor after resizing parameters")


class _BoundedCache(dict):
    """Plans keyed by the shapes of a window; shapes that vary (say, sequence lengths) must
    not grow it without bound."""

    LIMIT = 16

    def put(self, key, value):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = value
        return value


_FLOAT32 = torch.float32
_FLOAT64 = torch.float64
_flatten_dense = torch._C._nn.flatten_dense_tensors     # torch._utils._flatten_dense_tensors, less its Python frame
# Runs the flatten's thirteen ops past the autograd and view-tracking kernels, which a copy that
# nothing differentiates through does not need: the tutorial's twelve gradients 5.7 -> 3.9 us a
# step (tensors requiring grad, the weights or activations, 14.8 -> about 4). torch's own
# autograd-registration code enters it the same way (torch/_library/autograd.py); a torch
# without it gets the plain call.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", None)


def _flat_copy(tensors: list[torch.Tensor], keep_float64: bool = False) -> torch.Tensor:
    """One flat float32 copy of dense tensors, which requires no grad (as ``detach()`` would
    give): a single C++ call (a third of the cost of a reshape per tensor and a cat, on the
    tutorial's twelve gradients), below autograd; sparse ones go the slow way. With
    ``keep_float64``, a float64 copy where any of them is float64 (the caller sees that one is)."""
    try:
        if _below_autograd is None:
            flat = _flatten_dense(tensors)
        else:
            with _below_autograd():
                flat = _flatten_dense(tensors)
    except RuntimeError:
        return torch.cat([_flat(t, keep_float64) for t in tensors])
    if flat.dtype is not _FLOAT32 and not (keep_float64 and flat.dtype is _FLOAT64):
        return flat.float()
    # One contiguous tensor comes back as a view of itself: a copy, or a gradient reused in place
    # (zero_grad(set_to_none=False), accumulation) rewrites what waits to be reduced.
    return flat.clone() if len(tensors) == 1 and flat.data_ptr() == tensors[0].data_ptr() else flat


def _flat(tensor: torch.Tensor, keep_float64: bool = False) -> torch.Tensor:
    """A 1-D float32 view (or copy) of a gradient or activation, dense; float64 stays float64
    with ``keep_float64`` (its values may lie beyond float32's range)."""
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    keep = tensor.dtype == torch.float32 or (keep_float64 and tensor.dtype == torch.float64)
    return tensor.reshape(-1) if keep else tensor.reshape(-1).float()
