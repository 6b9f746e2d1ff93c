"""Weight norms, their histograms and how far the weights moved over a window."""

from __future__ import annotations

import numpy as np
import torch

from gradflow.monitor import columns as C
from gradflow.monitor import stats as S
from gradflow.monitor.part import Part, Reduced, Setup
from gradflow.monitor.tensors import _flat, _segment_layout


class Weights(Part):
    """L1 and L2 norm of each parameter and how far it moved over the window, in one pass."""

    name = "weights"

    @classmethod
    def create(cls, model, setup: Setup) -> Weights | None:
        return cls(model, setup) if setup.options.get("weights", True) else None

    def __init__(self, model, setup: Setup) -> None:
        super().__init__(model, setup)
        params, members = setup.params, setup.members
        self.params = params
        self.slots = len(params) * members
        self.sizes = [p.numel() // members for p in params for _ in range(members)]
        self.lengths, self.segment = _segment_layout(self.sizes, params[0].device)
        self.bin_offset = (self.segment * S.SIGN_EXPONENT_BINS).int()
        self._spare: torch.Tensor | None = None  # a flat buffer to reuse
        self.start = self._flatten()
        self._end: torch.Tensor | None = None    # the weights summary() saw: the next window's start

    def bind(self, params: list[torch.Tensor]) -> None:
        """Follow replacement tensors (same shapes): the window restarts from their values."""
        self.params = params
        self._end = None
        self.start = self._flatten()

    @torch.no_grad()
    def _flatten(self) -> torch.Tensor:
        """The weights, flat, copied into the spare buffer when there is one: on the CPU a fresh
        tensor of a large model's size is mapped anew each time, and its page faults cost
        several times the copy (resnet18's 45 MB: 70 ms against 9)."""
        out, self._spare = self._spare, None
        return torch.cat([_flat(p.detach()) for p in self.params], out=out)

    def reset(self) -> None:
        self.snapshot()

    def snapshot(self) -> None:
        if self._end is None:
            self._spare = self.start
            self.start = self._flatten()
        else:
            self._spare, self.start, self._end = self.start, self._end, None

    @torch.no_grad()
    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, 4) rows of L1 norm, L2 norm, distance moved and L2 norm at the start; and
        (slots, 512) histogram counts. The slots are contiguous segments of the flat weights,
        so each norm is one segment sum (a batched model has hundreds of slots)."""
        flat = self._end = self._flatten()
        kernels = S.fused_kernels(flat.device)
        if kernels is not None:
            rows, counts = kernels.fold_weights(flat.numpy(), self.start.numpy(), self.lengths.numpy())
            rows[:, 1:] = np.sqrt(rows[:, 1:])
            return torch.from_numpy(rows), torch.from_numpy(counts)
        moved = flat - self.start
        sums = S.segment_sums([flat.abs(), flat * flat, moved * moved, self.start * self.start],
                              self.lengths, self.segment)
        rows = torch.cat([sums[:1], sums[1:].sqrt()]).T
        counts = torch.zeros(self.slots * S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=flat.device)
        S.count_into(counts, S.sign_exponent_bins(flat).add_(self.bin_offset))
        return rows, counts.view(self.slots, S.SIGN_EXPONENT_BINS)

    def device_tensors(self) -> dict[str, Reduced]:
        rows, counts = self.summary()
        return {"rows": Reduced(rows), "counts": Reduced(counts)}

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        """Rows ``columns.WEIGHT``, also joined to the gradient rows as ``weight_<column>``."""
        l1, l2, moved, start = values["rows"].T
        with np.errstate(divide="ignore", invalid="ignore"):
            # A zero start (a fresh bias) has no relative update: NaN says so.
            ratios = np.where(start > 0, moved / start, np.nan)
        for slot, k, name, path in reader.slots(self.setup.names):
            row = dict(zip(C.WEIGHT, (float(l1[slot]), float(l2[slot]), float(ratios[slot]))))
            reader.windows[k].weights[name] = row
            if name in reader.windows[k].gradients:
                reader.windows[k].gradients[name].update({f"weight_{key}": v for key, v in row.items()})
            reader.scalars[k].update({f"weight/{path}/{key}": value for key, value in row.items()})
            reader.wanted.value(k, f"weight/{path}", values["counts"][slot], state=True)
