"""What the framework callbacks share besides the ``Recorder``: the missing-extra error, argument
checks, the verdict at the end and the recorder's attributes under the callbacks' names."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from gradflow.monitor import MonitorError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise a one-line MonitorError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MonitorError(f"gradflow's {extra} integration needs {module.split('.')[0]} ({error}); "
                           f"install it from your gradflow checkout with: pip install -e '.[{extra}]' "
                           "(gradflow-torch is not on PyPI yet)") from None


def diagnosis_api() -> Any:
    """The diagnosis module, imported when first needed (it pulls in no framework)."""
    from gradflow.analysis import diagnose

    return diagnose


def diagnose(monitor: Any, losses: list[float] | None = None) -> Any:
    """The verdict over what ``monitor`` recorded, or None when it recorded no window.
    ``losses``: the training loss per window, if the framework gave it (the ``stalled`` check
    reads it)."""
    if not monitor.history:
        return None
    return diagnosis_api().diagnose_monitor(monitor, losses=losses or None)


def loss_of(outputs: Any) -> Any:
    """The loss tensor in what a training step returned (a tensor, or a mapping with ``loss``), else None."""
    import torch

    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs.detach() if isinstance(outputs, torch.Tensor) and outputs.numel() == 1 else None


def step_skipped(scaler: Any, optimizer: Any) -> bool:
    """Whether an AMP ``GradScaler`` found inf/NaN in ``optimizer``'s unscaled gradients, so that
    it skips this step (the frameworks unscale before the hooks these callbacks record in). False
    without a scaler. One host read of a flag per device, as ``GradScaler.step`` does anyway."""
    if scaler is None:
        return False
    from gradflow.monitor.interception import found_inf

    return found_inf(scaler, optimizer)


def recorder_attribute(name: str, doc: str) -> property:
    """A callback attribute that reads and sets ``self.recorder.<name>`` (``callback.monitor``, ...)."""
    return property(lambda self: getattr(self.recorder, name),
                    lambda self, value: setattr(self.recorder, name, value), doc=doc)
