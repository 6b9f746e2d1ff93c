"""Per-gate gradient and weight norms of ``nn.LSTM`` and ``nn.GRU`` layers.

An LSTM's ``weight_ih_lK`` (4H, in) and ``weight_hh_lK`` (4H, H, or (4H, proj_size) with
``proj_size``) stack the weights of its four gates as contiguous blocks of H rows, in the order
input, forget, cell, output (PyTorch's ``nn.LSTM`` docs: ``W_ii|W_if|W_ig|W_io``); a GRU's are
(3H, ...) in the order reset, update, new (``W_ir|W_iz|W_in``). So ``grad.view(G, -1)`` has one
row per gate, and one ``_foreach_norm`` over those rows gives each gate's L2 norm. Bidirectional
layers (``_reverse``) are split alike; ``weight_hr_lK`` (the projection) has no gates and is not
split, nor are the biases (their statistics stay whole in the parameter's row).

What this cannot show: the gates' activations (how saturated each sigmoid is). ``nn.LSTM`` and
``nn.GRU`` compute the gates inside one fused kernel (cuDNN, or ATen's fused cell), with no
module or hook in between, so no gate pre-activation is ever visible to a hook. Only the
weights' and gradients' slices are.

Per window, per gated parameter and gate: ``norm``, the mean over the steps of that step's L2
norm of the gate's gradient rows (as the parameter rows' ``norm``), and ``weight_norm``, the L2
norm of the gate's weight rows at the window's end. Recorded for ``members`` == 1 only: a
batched model (``members`` K > 1) stacks every parameter on a leading member dimension, which a
stock ``nn.LSTM``/``nn.GRU`` does not have. A sharded model (DTensor weights: FSDP2, HSDP) gets
``ShardedGates``: a shard may hold part of a gate, so each step's local squared gate norms are
summed over the shard group at the window's close before the square root.

Example:
    >>> lstm = nn.LSTM(3, 2, num_layers=2)
    >>> names = [n for n, _ in lstm.named_parameters()]
    >>> [(names[i], gates[1]) for i, gates in gated_parameters(lstm, names)][:2]
    [('weight_ih_l0', 'forget'), ('weight_hh_l0', 'forget')]
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from gradflow.monitor import columns as C
from gradflow.monitor import stats as S
from gradflow.monitor.part import Part, Reduced, Setup, moved
from gradflow.monitor.sharding import local, local_rows
from gradflow.monitor.steps import ALL
from gradflow.monitor.window import tag_path

LSTM_GATES = ("input", "forget", "cell", "output")   # nn.LSTM: W_ii|W_if|W_ig|W_io
GRU_GATES = ("reset", "update", "new")               # nn.GRU: W_ir|W_iz|W_in
_GATED = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")


def gated_parameters(model: nn.Module, names: list[str]) -> list[tuple[int, tuple[str, ...]]]:
    """(index into ``names``, gate names) of every LSTM/GRU weight whose rows are gate blocks."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.RNNBase) or module.mode not in ("LSTM", "GRU"):
            continue
        gates = LSTM_GATES if module.mode == "LSTM" else GRU_GATES
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if _GATED.match(pname) and full in index and p.dim() == 2 and p.shape[0] % len(gates) == 0:
                out.append((index[full], gates))
    return out


class Gates(Part):
    """Sums each step's per-gate gradient norms on the device: one ``_foreach_norm`` over the
    gate rows of every gated parameter, one ``stack`` and one ``add_`` per step, no host sync.

    ``totals`` (rows,) in float64: row ``offsets[j] + g`` is gate g of gated parameter j, its
    per-step L2 norms summed over the window's steps (``steps[j]`` of them). The norms are taken
    in the gradient's dtype (a float32 gradient's gate norm overflows past 3.4e38).
    """

    name = "gates"

    @classmethod
    def create(cls, model, setup: Setup) -> Gates | None:
        if setup.members != 1:                    # no member dimension in a stock nn.LSTM
            return None
        gated = gated_parameters(model, setup.names)
        if not gated:
            return None
        return ShardedGates(model, setup, gated) if setup.sharding is not None else cls(model, setup, gated)

    def __init__(self, model, setup: Setup, gated: list[tuple[int, tuple[str, ...]]]) -> None:
        super().__init__(model, setup)
        params = setup.params
        self.indices = [i for i, _ in gated]
        self.gates = [gates for _, gates in gated]
        self.offsets = np.cumsum([0] + [len(g) for g in self.gates])[:-1].tolist()
        self.params = params
        device = params[0].device
        self.totals = torch.zeros(sum(len(g) for g in self.gates), device=device, dtype=S.wide_dtype(device))
        self.steps = np.zeros(len(self.indices), dtype=np.int64)
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def bind(self, params: list[torch.Tensor]) -> None:
        """Follow replacement tensors (same shapes)."""
        self.params = params

    def move(self, device: torch.device) -> None:
        self.totals = moved(self.totals, device, wide=True)
        self._rows = {}

    def reset(self) -> None:
        self.totals.zero_()
        self.steps[:] = 0

    def record(self, mask: tuple[bool, ...] | None = None) -> None:
        """Add the current gradients' per-gate norms as one step (those in ``mask``, if given)."""
        present, views = [], []
        for j, i in enumerate(self.indices):
            grad = local(self.params[i].grad)
            if grad is None or not (mask is None or mask is ALL or mask[i]) or grad.layout != torch.strided:
                continue
            present.append(j)
            views += grad.detach().reshape(len(self.gates[j]), -1).unbind(0)
        if not present:
            return
        norms = _norms(views)
        if self.setup.unscale is not None:
            norms = norms * self.setup.unscale
        if len(present) == len(self.indices):
            self.totals.add_(norms)
        else:
            self.totals.index_add_(0, self._rows_of(tuple(present)), norms.to(self.totals.dtype))
        self.steps[present] += 1

    def _rows_of(self, present: tuple[int, ...]) -> torch.Tensor:
        rows = self._rows.get(present)
        if rows is None:
            rows = self._rows[present] = torch.tensor(
                [self.offsets[j] + g for j in present for g in range(len(self.gates[j]))], device=self.totals.device)
        return rows

    @torch.no_grad()
    def weight_norms(self) -> torch.Tensor:
        """(rows,) the L2 norm of each gate's weight rows now."""
        views = [v for j, i in enumerate(self.indices)
                 for v in self.params[i].detach().reshape(len(self.gates[j]), -1).unbind(0)]
        return _norms(views).to(self.totals.dtype)

    def device_tensors(self) -> dict[str, Reduced]:
        return {"totals": Reduced(self.totals), "weights": Reduced(self.weight_norms())}

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        reader.windows[0].gates = self.rows(values["totals"], values["weights"], self.setup.names)
        reader.scalars[0].update(gate_scalars(reader.windows[0].gates))

    def rows(self, totals: np.ndarray, weights: np.ndarray, names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
        """Parameter -> gate -> ``norm`` (mean over the window's steps of the step's L2 norm),
        ``weight_norm`` (at the window's end), ``steps``; parameters with no step left out."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for j, i in enumerate(self.indices):
            steps = int(self.steps[j])
            if steps == 0:
                continue
            start = self.offsets[j]
            out[names[i]] = {gate: dict(zip(C.GATE, (float(totals[start + g] / steps), float(weights[start + g]), steps)))
                             for g, gate in enumerate(self.gates[j])}
        return out


def gate_runs(param: torch.Tensor, gates: int) -> list[tuple[int, int, int]]:
    """(start, stop, gate) of each run of this rank's local rows of ``param`` that belong to one
    gate (rows ``gate * H`` to ``(gate + 1) * H - 1`` of the full tensor): one run per gate whole
    on this rank, two where a shard boundary cuts a gate, none for an empty shard."""
    height = param.shape[0] // gates
    owner = (local_rows(param) // height).tolist()
    runs, start = [], 0
    for row in range(1, len(owner) + 1):
        if row == len(owner) or owner[row] != owner[start]:
            runs.append((start, row, owner[start]))
            start = row
    return runs


class ShardedGates(Gates):
    """Per-gate rows of a sharded model's LSTM/GRU weights (FSDP2, HSDP: DTensor ``Shard(0)`` rows
    cut anywhere, a gate split between ranks; ``Shard(1)`` columns), and of its plain ones.

    A shard holds part of a gate, so a step's gate norm is not a sum of local norms: each step's
    local squared norm of each gate's local rows (``gate_runs``) is kept per step, in the gradients'
    step rows (``steps``: (steps, gate rows + one presence column per gated parameter)), and at the
    window's close ``ShardLayout.reduce`` sums each column over its parameter's shard group in the
    gradients' own SUM all-reduce (``share_columns``: no collective of its own); ``read`` then takes
    each step's square root, as ``Gates`` keeps a step's norm. ``weights``: each gate's local squared
    weight norm, summed alike. Reads the local gradients ``ShardLayout.local_grads`` resolved
    (``Partial`` sums redistributed, unscaled) at the step.
    """

    def __init__(self, model, setup: Setup, gated: list[tuple[int, tuple[str, ...]]]) -> None:
        super().__init__(model, setup, gated)
        layout = setup.sharding
        self.width = int(self.totals.numel())
        self.runs = [gate_runs(setup.params[i], len(g)) for i, g in zip(self.indices, self.gates)]
        self.by_step = torch.zeros(8, self.width + len(self.indices), dtype=torch.float64,
                                   device=self.totals.device)
        owners = [i for i, g in zip(self.indices, self.gates) for _ in g]
        layout.share_columns("gates/steps", owners + self.indices, True, self.indices)
        layout.share_columns("gates/weights", owners, False, [])
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}    # _index_of's (not Gates._rows: other keys)

    def move(self, device: torch.device) -> None:
        super().move(device)
        self.by_step = moved(self.by_step, device, wide=True)
        self._indices = {}                        # the old device's

    def reset(self) -> None:
        super().reset()
        self.by_step.zero_()

    def record(self, mask: tuple[bool, ...] | None = None) -> None:
        """Add the step's local squared gate norms at the gradients' row of this step."""
        layout = self.setup.sharding
        kept, layout.kept = layout.kept, {}       # taken: no gradient is held past its step
        present, grads = [], []
        for j, i in enumerate(self.indices):
            grad = kept.get(i)
            if grad is None or grad.layout != torch.strided:
                continue
            present.append(j)
            grads.append((j, grad.detach().flatten(1)))     # rows; an empty shard's (0, in) too
        if not present:
            return
        step = layout.step
        while step >= self.by_step.shape[0]:      # grow on the device: no host sync
            self.by_step = torch.cat([self.by_step, torch.zeros_like(self.by_step)])
        row = self.by_step[step]
        self._add_gate_squares(row, grads)        # an empty shard adds only its presence
        row.index_add_(0, self._index_of(tuple(self.width + j for j in present)),
                       torch.ones(len(present), dtype=torch.float64, device=row.device))

    def _add_gate_squares(self, out: torch.Tensor, tensors) -> None:
        """Add to ``out`` (a row of gate columns) the local squared L2 norm of each gate's local
        rows (``gate_runs``) of ``tensors``: (j, this rank's rows x columns) pairs, j a gated
        parameter's place in ``indices``."""
        views, rows = [], []
        for j, tensor in tensors:
            for start, stop, gate in self.runs[j]:
                views.append(tensor[start:stop])
                rows.append(self.offsets[j] + gate)
        if views:
            out.index_add_(0, self._index_of(tuple(rows)), torch.stack(torch._foreach_norm(views)).double().square())

    def _index_of(self, rows: tuple[int, ...]) -> torch.Tensor:
        """An index tensor of these column numbers, made once per pattern."""
        index = self._indices.get(rows)
        if index is None:
            index = self._indices[rows] = torch.tensor(rows, device=self.by_step.device)
        return index

    @torch.no_grad()
    def weight_norms(self) -> torch.Tensor:
        """(rows,) each gate's local squared weight norm (summed over the shard group at the close)."""
        squares = torch.zeros(self.width, dtype=torch.float64, device=self.by_step.device)
        self._add_gate_squares(squares, ((j, local(self.params[i]).detach().flatten(1))
                                         for j, i in enumerate(self.indices)))
        return squares

    def device_tensors(self) -> dict[str, Reduced]:
        return {"steps": Reduced(self.by_step), "weights": Reduced(self.weight_norms())}

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        by_step = values["steps"]
        present = by_step[:, self.width:] > 0
        self.steps[:] = present.sum(0)
        totals = np.sqrt(by_step[:, :self.width]).sum(0)
        reader.windows[0].gates = self.rows(totals, np.sqrt(values["weights"]), self.setup.names)
        reader.scalars[0].update(gate_scalars(reader.windows[0].gates))


def gate_scalars(gates: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """TensorBoard scalars ``grad/<param path>/<gate>/norm`` and ``weight/<param path>/<gate>/norm``."""
    out = {}
    for name, entry in gates.items():
        path = tag_path(name)
        for gate, row in entry.items():
            out[f"grad/{path}/{gate}/norm"] = row["norm"]
            out[f"weight/{path}/{gate}/norm"] = row["weight_norm"]
    return out


def _norms(views: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each of ``views``: one ``_foreach_norm``; a float64 one's scaled by its
    largest |x| (``stats.scaled_norm``), whose sum of squares overflows past 1e154."""
    norms = torch.stack(torch._foreach_norm(views))
    if any(view.dtype is torch.float64 for view in views):
        norms = torch.stack([S.scaled_norm(view) if view.dtype is torch.float64 else norm
                             for view, norm in zip(views, norms)])
    return norms
