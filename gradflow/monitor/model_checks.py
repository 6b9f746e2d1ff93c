"""What the monitor checks about the user's model: which parameters it watches, that they are
materialised, and whether they were replaced after it attached.

Example:
    >>> named = monitored_parameters(model)             # MonitorError for meta or lazy parameters
    >>> replaced_parameters(model, names, params, device)  # None if unchanged, else the new tensors
"""

from __future__ import annotations

import torch
from torch import nn

from gradflow.monitor.tensors import MonitorError


def monitored_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        raise MonitorError(f"{type(model).__name__} has no floating-point parameters to monitor")
    for name, p in named:
        _check_materialised(name, p)
    return named


def _check_materialised(name: str, p: torch.Tensor) -> None:
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise MonitorError(f"{name} is not initialised yet (a lazy module); run one forward pass before attaching")
    if p.is_meta:
        raise MonitorError(f"{name} is on the meta device; attach after model.to_empty(device=...) and "
                           "initialisation (or load_state_dict(..., assign=True))")


def _check_device(named: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
    if named and named[0][1].device != device:
        name, p = named[0]
        raise MonitorError(f"{name} moved from {device} to {p.device} after the monitor attached; "
                           "attach the monitor after model.to(device), or remove() it and attach a new one")


def replaced_parameters(model: nn.Module, names: list[str], params: list[torch.Tensor],
                        device: torch.device) -> list[torch.Tensor] | None:
    """The model's parameters if they replaced ``params`` (``load_state_dict(..., assign=True)``,
    ``to_empty()``) with tensors of the same names, shapes, dtypes and device; None if nothing
    was replaced. MonitorError if they changed in a way a window's sums cannot follow."""
    current = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if len(current) == len(params) and all(p is q for (_, p), q in zip(current, params)):
        _check_device(current, device)
        return None
    if [name for name, _ in current] != names:
        raise MonitorError(f"the model's parameters changed after the monitor attached (now {len(current)}, "
                           f"were {len(params)}); remove() this monitor and attach a new one")
    for (name, p), q in zip(current, params):
        _check_materialised(name, p)
        if (p.shape, p.dtype, p.device) != (q.shape, q.dtype, q.device):
            raise MonitorError(f"{name} was replaced by a tensor of another shape, dtype or device "
                               f"({tuple(q.shape)} {q.dtype} {q.device} -> {tuple(p.shape)} {p.dtype} {p.device}); "
                               "remove() this monitor and attach a new one after replacing parameters")
    return [p for _, p in current]


def check_members(named: list[tuple[str, torch.Tensor]], members: int) -> None:
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise MonitorError(f"members must be a positive int, got {members!r}")
    if members == 1:
        return
    for name, p in named:
        if p.dim() == 0 or p.shape[0] != members:
            raise MonitorError(f"members={members} needs every parameter stacked on a leading dimension of "
                               f"{members}; {name} has shape {tuple(p.shape)}")
