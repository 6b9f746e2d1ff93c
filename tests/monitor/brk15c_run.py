"""One rank of the brk15c multi-process break tests (started by test_brk15c_sharded.py through
sharded_launch.launch, 2 to 4 gloo ranks on the CPU).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/monitor/brk15c_run.py OUT CASE [CASE ...]

The cases put LSTM/GRU weights under FSDP2 (``Shard(0)`` rows cut inside a gate or on a gate's
boundary, ``Shard(1)`` columns), HSDP and gradient accumulation, and check the per-gate rows
(``Window.gates``) against the oracle: each gated gradient the step applies (``full_tensor()``) in
float64 from a step pre-hook, cut into its gates by hand, each gate's L2 norm averaged over the
window's steps; each gate's weight norm from the full weight at the window's end. Writes
OUT/<case>.rank<k>.json with the monitor's gate rows and gradient rows, the oracle's, and the
monitor's warnings.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from sharded_run import Oracle, TPBlock, batch, full, run_cases  # noqa: E402

from gradflow.monitor import GradientMonitor  # noqa: E402

STEPS, WINDOW = 4, 2


class Recurrent(nn.Module):
    """A bidirectional LSTM (20 gate rows of 5) into a GRU (9 rows of 3) and a head: on 2 ranks the
    LSTM's rows split on a gate boundary (10 + 10) and the GRU's inside one (5 + 4); on 3 ranks the
    other way round (7 + 7 + 6; 3 + 3 + 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 5, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(10, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        out, _ = self.lstm(x.view(x.shape[0], 5, 2))
        out, _ = self.gru(out)
        return self.head(out[:, -1])


class GateOracle:
    """At each optimizer step (a pre-hook), each gated weight's full gradient in float64 cut into gates."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[dict] = []
        self.windows: list[dict] = []

    def gated(self):
        for name, module in self.model.named_modules():
            if isinstance(module, nn.RNNBase):
                gates = 4 if module.mode == "LSTM" else 3
                for pname, p in module.named_parameters(recurse=False):
                    if pname.startswith("weight_ih") or pname.startswith("weight_hh"):
                        yield f"{name}.{pname}", p, gates

    def __call__(self, optimizer, args, kwargs) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.steps.append({name: full(p.grad).view(gates, -1).norm(dim=1).tolist()
                           for name, p, gates in self.gated() if p.grad is not None and id(p) in stepped})

    def close(self) -> None:
        steps, self.steps = self.steps, []
        out = {}
        for name, p, gates in self.gated():
            seen = [s[name] for s in steps if name in s]
            if not seen:                          # frozen: no gradient, no gate rows
                continue
            out[name] = {"norm": [sum(s[g] for s in seen) / len(seen) for g in range(gates)], "steps": len(seen),
                         "weight_norm": full(p.detach()).view(gates, -1).norm(dim=1).tolist()}
        self.windows.append(out)


def local(step: int, world_of_data: int, index: int):
    """This data-parallel rank's part of the step's batch of 12 sequences."""
    x, y = batch(step, (12, 10))
    per = 12 // world_of_data
    return x[index * per:(index + 1) * per], y[index * per:(index + 1) * per]


def sharded_recurrent(replicas: int = 1, columns: bool = False, micro: int = 1, clip: float | None = None,
                      mixed: bool = False, split: bool = False, frozen: bool = False, manual: bool = False) -> dict:
    """FSDP2 (or HSDP with ``replicas`` > 1) of Recurrent: the LSTM and the GRU units of their own and
    the root; ``columns``: the 2-D weights whose columns divide by the world sharded on dim 1
    (``shard_placement_fn``); ``micro`` micro-batches with the gradient sync off but on the last;
    ``clip``: clip_grad_norm_ over the DTensor gradients before each step; ``mixed``: the LSTM
    sharded alone, the GRU and head plain tensors, every rank on the whole batch (the plain
    gradients are then the applied ones); ``split``: SGD over the LSTM stepped before AdamW over the
    rest (one step of the monitor's); ``frozen``: the LSTM's reverse weight_hh frozen before sharding;
    ``manual``: automatic=False and record() before the step. Through time is on (the default):
    said, not recorded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = (init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
            if replicas > 1 else init_device_mesh("cpu", (world,)))
    torch.manual_seed(0)
    model = Recurrent()
    if frozen:
        model.lstm.weight_hh_l0_reverse.requires_grad_(False)
    kw = {"mesh": mesh}
    if columns:
        # FSDP2 shards dim 1 only evenly: the weights whose columns divide, the rest on rows
        kw["shard_placement_fn"] = lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else Shard(0)
    for unit in (model.lstm,) if mixed else (model.lstm, model.gru, model):
        fully_shard(unit, **kw)
    trained = [p for p in model.parameters() if p.requires_grad]
    lstm = {id(p) for p in model.lstm.parameters()}
    optimizers = ([torch.optim.SGD([p for p in trained if id(p) in lstm], lr=0.05),
                   torch.optim.AdamW([p for p in trained if id(p) not in lstm], lr=0.05)] if split
                  else [torch.optim.AdamW(trained, lr=0.05)])
    oracle = GateOracle(model)
    handles = [optimizer.register_step_pre_hook(oracle) for optimizer in optimizers]
    windows, times = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, None, activations=False, automatic=not manual) as monitor:
            for step in range(STEPS):
                x, y = local(step, 1, 0) if mixed else local(step, world, rank)
                for optimizer in optimizers:
                    optimizer.zero_grad()
                for m, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
                    last = m == micro - 1
                    (model.lstm if mixed else model).set_requires_gradient_sync(last)
                    nn.functional.mse_loss(model(xs), ys).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if manual:
                    monitor.record()
                for optimizer in optimizers:
                    optimizer.step()
                if (step + 1) % WINDOW == 0:
                    monitor.log(step)
                    window = monitor.history[-1]
                    windows.append({"gates": window.gates, "rows": {n: r["norm"] for n, r in window.gradients.items()}})
                    times.append(repr(window.time))
                    oracle.close()
    for handle in handles:
        handle.remove()
    return {"windows": windows, "oracle": oracle.windows, "time": times,
            "warnings": [str(w.message)[:300] for w in caught],
            "shards": {n: list((p.to_local() if hasattr(p, "to_local") else p).shape) for n, p in model.named_parameters()}}


def log_skew() -> dict:
    """FSDP2 of a Linear stack on 2 ranks, 4 steps: rank 0 calls log() after the optimizer step of
    steps 1 and 3, rank 1 after their backward, before the step (its windows hold steps 0; 1, 2; and
    3 after the loop). No collective of the training comes between, so nothing hangs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    totals, norms = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, None, activations=False) as monitor:
            for step in range(STEPS):
                x, y = local(step, world, rank)
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                norms.append(math.sqrt(sum(float(full(p.grad).square().sum()) for p in model.parameters())))
                late = (step + 1) % WINDOW == 0
                if late and rank == 1:
                    monitor.log(step)
                optimizer.step()
                if late and rank == 0:
                    monitor.log(step)
                if late:
                    totals.append(monitor.history[-1].overall["total_norm"])
    return {"totals": totals, "norms": norms, "warnings": [str(w.message)[:400] for w in caught]}


def fsdp_tp_plain_norm() -> dict:
    """FSDP2 over tensor parallel on a 2x2 (dp, tp) mesh, torchtitan's way, with a LayerNorm that has
    no tensor-parallel plan (sequence parallel off): its parameters are DTensors on the dp sub-mesh
    only (ranks 0, 2 or 1, 3), the Linear layers' on both dims."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = TPBlock()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    oracle = Oracle(model)
    handle = optimizer.register_step_pre_hook(oracle)
    dp = mesh.get_coordinate()[0]
    windows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, None, activations=False) as monitor:
            for step in range(STEPS):
                x, y = batch(step, (4, 6, 8))
                x, y = x[dp * 2:(dp + 1) * 2], y[dp * 2:(dp + 1) * 2]
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                if (step + 1) % WINDOW == 0:
                    monitor.log(step)
                    window = monitor.history[-1]
                    windows.append({"rows": window.gradients, "overall": window.overall})
                    oracle.close()
    handle.remove()
    return {"windows": windows, "oracle": oracle.windows, "warnings": [str(w.message)[:300] for w in caught],
            "placements": {n: f"{p.device_mesh.mesh.tolist()} {p.placements}" for n, p in model.named_parameters()}}


class Poison(nn.Module):
    """Multiplies by NaN while ``armed`` (set on one rank at one step), else passes its input on."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x):
        return x * float("nan") if self.armed else x * 1.0


def nan_in_one_ranks_layer() -> dict:
    """FSDP2 of a Linear stack on 2 ranks with nonfinite=True: at step 1 rank 1's module ``2`` makes a
    NaN in its forward; rank 0 sees it only through the gradient's reduce-scatter (its next forward).
    Every rank should name rank 1's module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), Poison(), nn.Linear(8, 3))
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, None, activations=False, nonfinite=True) as monitor:
        for step in range(3):
            model[2].armed = rank == 1 and step == 1
            x, y = local(step, world, rank)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        monitor.log(2)
    source = monitor.history[-1].first_nonfinite
    return {"source": None if source is None else [source.module, source.phase, source.step]}


CASES = {
    "nan-in-one-ranks-layer": nan_in_one_ranks_layer,
    "fsdp-tp-plain-norm": fsdp_tp_plain_norm,
    "log-skew": log_skew,
    "fsdp-gates": sharded_recurrent,
    "fsdp-gates-columns": lambda: sharded_recurrent(columns=True),
    "fsdp-gates-accumulate": lambda: sharded_recurrent(micro=3),
    "fsdp-gates-clip": lambda: sharded_recurrent(clip=0.05),
    "fsdp-gates-mixed": lambda: sharded_recurrent(mixed=True),
    "fsdp-gates-split": lambda: sharded_recurrent(split=True),
    "fsdp-gates-frozen": lambda: sharded_recurrent(frozen=True),
    "fsdp-gates-manual": lambda: sharded_recurrent(manual=True, micro=2),
    "hsdp-gates": lambda: sharded_recurrent(replicas=2),
}


def main() -> None:
    run_cases(CASES, tail=3000)


if __name__ == "__main__":
    main()
