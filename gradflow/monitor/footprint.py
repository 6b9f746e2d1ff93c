"""What a monitor holds in memory: the bytes of every tensor and numpy array reachable from it.

Peak RSS (``benchmarks/memory.py``) also counts where the C allocator happened to place things;
this counts the monitor's own buffers exactly. The model's parameters and gradients, which the
monitor refers to but does not own, are left out; a layer output the monitor keeps alive is
counted. Python objects (the history's dicts of floats) are not.

Example:
    >>> import torch
    >>> from gradflow.monitor import GradientMonitor
    >>> model = torch.nn.Linear(1000, 100)
    >>> with GradientMonitor(model) as monitor:
    ...     total, largest = held_bytes(monitor, model)
    >>> largest                 # the update ratios' copy of the 100 x 1000 weight and its bias, one buffer
    400400
"""

from __future__ import annotations

import gc
import types

import numpy as np
import torch
from torch import nn

_NOT_FOLLOWED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
                 types.MethodType, nn.Module)


def held(root: object, model: nn.Module) -> list[tuple[int, object]]:
    """(bytes, dtype) of each tensor storage and numpy array reachable from ``root`` through
    its objects' references, each piece of memory once; the storages of ``model``'s parameters
    and gradients are left out. A numpy array that lies in a CPU tensor's storage (``tensor.numpy()``,
    a view the monitor keeps to write into its sums) is that storage, not more memory. Modules,
    classes, functions and code are not followed."""
    theirs = [p.untyped_storage() for p in model.parameters()]
    theirs += [p.grad.untyped_storage() for p in model.parameters() if p.grad is not None]
    their_ptrs = {storage.data_ptr() for storage in theirs}
    seen, storages, arrays, stack = set(), {}, {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_FOLLOWED):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.layout == torch.strided:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in their_ptrs:
                    storages[(obj.device, storage.data_ptr())] = (storage.nbytes(), obj.dtype)
            continue
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            arrays[base.__array_interface__["data"][0]] = (base.nbytes, base.dtype)
            continue
        stack.extend(gc.get_referents(obj))
    cpu = [(ptr, ptr + size) for (device, ptr), (size, _) in storages.items() if device.type == "cpu"]
    cpu += [(storage.data_ptr(), storage.data_ptr() + storage.nbytes()) for storage in theirs
            if storage.device.type == "cpu"]
    own = [(size, dtype) for ptr, (size, dtype) in arrays.items()
           if not any(start <= ptr and ptr + size <= stop for start, stop in cpu)]
    return list(storages.values()) + own


def held_bytes(root: object, model: nn.Module) -> tuple[int, int]:
    """(total, largest) bytes of what ``held`` finds."""
    sizes = [size for size, _ in held(root, model)]
    return sum(sizes), max(sizes, default=0)
