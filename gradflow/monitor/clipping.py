"""The norm before clipping: each ``clip_grad_norm_`` call over the model's parameters in a window.

``interception.py`` tells the monitor of every call; this part keeps the window's count, the
sum of the norms the calls found and how many of them clipped, and adds
``columns.CLIPPING`` to the window's own row (``Window.overall``).

Under AMP, torch's recipe clips between ``scaler.unscale_`` and ``scaler.step``: a step the
scaler then skips on overflow had a clip call too, whose norm is inf or NaN. In a window with
skipped steps, the calls with a non-finite norm are those steps' and are left out of all three
columns (the step is counted in ``skipped_steps``), whichever comes first, the clip call or the
record (Lightning records before it clips). Without skipped steps a non-finite norm was applied
and is averaged in.
"""

from __future__ import annotations

import numpy as np
import torch

from gradflow.monitor import columns as C
from gradflow.monitor.interception import ClipTally
from gradflow.monitor.part import Part, Reduced


class Clipping(Part):
    """A window's clipping calls over the monitored parameters (``interception.ClipTally``)."""

    name = "clipping"

    def __init__(self, model, setup) -> None:
        super().__init__(model, setup)
        self.tally = ClipTally()
        self.skipped = 0                  # steps skipped in the window (a GradScaler overflow)

    def add(self, params: list[torch.Tensor], total: torch.Tensor, clipped: torch.Tensor) -> bool:
        """A clipping call over ``params`` found the norm ``total`` before clipping and ``clipped``
        (a 0-d device tensor: it changed a gradient); counted, and True, if any of ``params`` is
        monitored."""
        index_of = self.setup.index_of
        if not any(id(p) in index_of for p in params):
            return False
        self.tally.add(total, clipped)
        return True

    def device_tensors(self) -> dict[str, Reduced]:
        return {"sums": Reduced(self.tally.sums.to(self.setup.device))} if self.tally.calls else {}

    def skip(self, mask) -> None:
        self.skipped += 1

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        if not self.tally.calls:
            return
        sums = dict(zip(ClipTally.FIELDS, values["sums"].tolist()))
        calls, norm_sum, clipped = self.tally.calls, sums["norm_sum"], sums["clipped"]
        if self.skipped and sums["nonfinite_calls"]:       # the skipped steps' calls (module docstring)
            calls -= int(sums["nonfinite_calls"])
            norm_sum, clipped = sums["finite_norm_sum"], sums["finite_clipped"]
        if not calls:
            return
        row = dict(zip(C.CLIPPING, (float(norm_sum / calls), int(clipped), calls)))
        for k, window in enumerate(reader.windows):
            window.overall.update(row)
            reader.scalars[k].update({f"grad/{key}": float(v) for key, v in row.items()})

    def move(self, device: torch.device) -> None:
        self.tally.move(device)

    def reset(self) -> None:
        self.tally = ClipTally()
        self.skipped = 0
