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
stock ``nn.LSTM``/``nn.GRU`` does not have.

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
from gradflow.monitor.sharding import local
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
        if setup.sharding is not None:            # a shard holds no whole gate rows: those weights get no gate rows
            sharded = [setup.names[i] for i, _ in gated if setup.sharding.keys[i] is not None]
            if sharded:
                setup.warn("gates-sharded", f"per-gate rows are not recorded for sharded (DTensor) LSTM/GRU weights "
                           f"({', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''}): a shard holds no whole "
                           "gate; their statistics stay whole in the parameter's row (Window.gates leaves them out)")
            gated = [(i, gates) for i, gates in gated if setup.sharding.keys[i] is None]
        return cls(model, setup, gated) if gated else None

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
