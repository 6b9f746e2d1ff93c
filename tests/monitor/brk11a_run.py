"""One rank of the brk11a multi-process break tests (started by test_brk11a_sharded.py through
sharded_launch.launch, 2 gloo ranks on the CPU).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/monitor/brk11a_run.py OUT CASE [CASE ...]

Each case trains a tiny model a few steps with a GradientMonitor on every rank and records the
oracle at every optimizer step: each gradient's full_tensor() (DTensor) or p.grad (DDP) in float64,
from a step pre-hook registered after the monitor's (sharded_run.Oracle). Writes
OUT/<case>.rank<k>.json with the monitor's windows and the oracle's.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from sharded_run import BATCH, STEPS, WINDOW, Block, Oracle, TPBlock, batch, full, run_cases  # noqa: E402

from gradflow.monitor import GradientMonitor, MonitorError  # noqa: E402


def local(step: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch(step)
    per = BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def run(model, optimizer, monitor, oracle, micro: int = 1, sync=None, forward=None, clip=None, data=None,
        before: list | None = None, evaluate: bool = False) -> list[dict]:
    """STEPS steps of ``micro`` micro-batches (``sync(flag)`` around all but the last); windows of WINDOW.
    ``clip(model)`` runs before each step; the full L2 norm before it is appended to ``before``."""
    out = []
    data = data or local
    handle = optimizer.register_step_pre_hook(oracle)
    for step in range(STEPS):
        x, y = data(step)
        optimizer.zero_grad()
        for m, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            last = m == micro - 1
            ctx = sync(last) if sync is not None else None
            if ctx is not None:
                ctx.__enter__()
            output = forward(model, xs) if forward is not None else model(xs)
            nn.functional.mse_loss(output, ys).backward()
            if ctx is not None:
                ctx.__exit__(None, None, None)
        if clip is not None:
            before.append(math.sqrt(sum(float(full(p.grad).square().sum()) for p in model.parameters()
                                        if p.grad is not None)))
            clip(model)
        optimizer.step()
        if evaluate:                                        # an evaluation forward (no backward) after each step
            with torch.no_grad():
                model(x[:2].bfloat16()) if forward is not None else model(x[:2])
        if (step + 1) % WINDOW == 0:
            monitor.log(step)
            window = monitor.history[-1]
            out.append({"rows": window.gradients, "overall": window.overall})
            oracle.close()
    handle.remove()
    return out


def fsdp(reshard: bool = True, mp: bool = False, frozen: bool = False, accumulate: bool = False,
         shard_dim: int = 0, clip=None, mesh_shape=None, bf16: bool = False, unfreeze: bool = False,
         evaluate: bool = False) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    mesh_shape = mesh_shape or (dist.get_world_size(),)
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = Block()
    if bf16:
        model.bfloat16()
    if frozen or unfreeze:
        model.up.bias.requires_grad_(False)                 # a frozen parameter inside a sharded module
    kw = {"mesh": mesh, "reshard_after_forward": reshard}
    if shard_dim:                                           # Linear(10, 3).weight on dim 1: 5 and 5; up (16, 10)
        kw["shard_placement_fn"] = lambda p: Shard(shard_dim if p.dim() > shard_dim else 0)
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in (model.up, model.head):
        fully_shard(module, **kw)
    fully_shard(model, **kw)
    forward = (lambda m, x: m(x.bfloat16()).float()) if mp or bf16 else None
    sync = None
    if accumulate:
        def sync(last):
            model.set_requires_gradient_sync(last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with GradientMonitor(model, None, activations=False) as monitor:
        oracle = Oracle(model)
        before: list[float] = []
        windows = run(model, optimizer, monitor, oracle, micro=2 if accumulate else 1, sync=sync, forward=forward,
                      clip=clip, before=before, evaluate=evaluate)
        if unfreeze:                                        # then train up.bias too: 2 more windows
            model.up.bias.requires_grad_(True)
            optimizer.add_param_group({"params": [model.up.bias]})
            windows += run(model, optimizer, monitor, oracle, forward=forward)
    return {"windows": windows, "oracle": oracle.windows, "before": before,
            "placements": {n: str(p.placements) for n, p in model.named_parameters()},
            "grad_dtypes": {n: str(p.grad.dtype) for n, p in model.named_parameters() if p.grad is not None}}


class Branchy(nn.Module):
    """A trunk; a branch only rank 0 uses; a branch no rank uses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(10, 3)
        self.rank0 = nn.Linear(10, 3)
        self.never = nn.Linear(10, 3)

    def forward(self, x):
        out = self.trunk(x)
        return out + self.rank0(x) if dist.get_rank() == 0 else out


def ddp(unused: bool = False, nosync: bool = False) -> dict:
    torch.manual_seed(0)
    inner = Branchy() if unused else Block()
    model = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=unused)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = None
    if nosync:
        def sync(last):
            import contextlib
            return contextlib.nullcontext() if last else model.no_sync()
    with GradientMonitor(model, None, activations=False) as monitor:
        oracle = Oracle(inner)
        windows = run(model, optimizer, monitor, oracle, micro=2 if nosync else 1, sync=sync)
    return {"windows": windows, "oracle": oracle.windows}


class Stacked(nn.Module):
    """K = 2 linear models trained as one: weight (K, 10, 3), bias (K, 1, 3)."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, 10, 3) * 0.3)
        self.bias = nn.Parameter(torch.zeros(k, 1, 3))

    def forward(self, x):                                   # x (B, 10) -> (K, B, 3)
        return torch.baddbmm(self.bias, x.expand(self.weight.shape[0], *x.shape), self.weight)


def ddp_members() -> dict:
    torch.manual_seed(0)
    inner = Stacked()
    model = nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    per_member: list[list[dict]] = [[], []]

    def oracle(opt, args, kwargs):
        for k in range(2):
            per_member[k].append({n: float(p.grad[k].double().norm()) for n, p in inner.named_parameters()})

    handle = optimizer.register_step_pre_hook(oracle)
    with GradientMonitor(model, None, members=2, activations=False) as monitor:
        for step in range(STEPS):
            x, y = local(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y.expand(2, *y.shape)).backward()
            optimizer.step()
        monitor.log(0)
        windows = [monitor.member_history(k)[-1].gradients for k in range(2)]
    handle.remove()
    expected = [{n: sum(s[n] for s in steps) / len(steps) for n in steps[0]} for steps in per_member]
    return {"norms": [{n: r["norm"] for n, r in w.items()} for w in windows], "expected": expected}


def fsdp_members() -> dict:
    """members=2 over FSDP2 DTensors: refused at attach (docs/sharding.md), on every rank, with no hang."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stacked()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    try:
        GradientMonitor(model, None, members=2, activations=False).remove()
    except MonitorError as e:
        return {"error": str(e)}
    return {"error": None}


def log_rank0_only() -> dict:
    """Rank 0 closes a window, rank 1 does not: rank 0's log() must fail (not wait forever)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Block()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = GradientMonitor(model, None, activations=False)
    x, y = local(0)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    start = time.monotonic()
    error = None
    done = Path(os.environ["BRK11A_RANK0_DONE"])        # rank 0 writes it once its log() has returned
    if dist.get_rank() == 0:
        try:
            monitor.log(0)
        except Exception as e:                              # noqa: BLE001 - the kind is what the test reads
            error = f"{type(e).__name__}: {e}"
        done.write_text("done")
    else:          # waits for rank 0's timeout, however slow a loaded machine makes rank 0 (at most 50 s)
        while not done.exists() and time.monotonic() - start < 50:
            time.sleep(0.1)
    monitor.remove()
    return {"error": error, "seconds": time.monotonic() - start}


def tp(clip=None, hidden: int = 16) -> dict:
    """Colwise up, Rowwise down (Replicate bias), SequenceParallel LayerNorm (Partial gradients), clipped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = TPBlock(hidden=hidden)
    parallelize_module(model, mesh, {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
                                     "down": RowwiseParallel(output_layouts=Shard(1))})
    rank = dist.get_rank()

    def data(step):
        x, y = batch(step, (2, 8, 8))
        return x[:, rank * 4:(rank + 1) * 4], y[:, rank * 4:(rank + 1) * 4]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, None, activations=False) as monitor:
        oracle, before = Oracle(model), []
        windows = run(model, optimizer, monitor, oracle, data=data, clip=clip, before=before)
    return {"windows": windows, "oracle": oracle.windows, "before": before,
            "local_shapes": {n: list(p.to_local().shape) for n, p in model.named_parameters()}}


def clip_norm(limit: float, norm_type: float = 2.0):
    return lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), limit, norm_type=norm_type)


def fsdp_after_attach() -> dict:
    """The monitor attached to the plain model, then fully_shard (a framework that shards after the
    user's GradientMonitor(model)): the parameters become DTensors after attaching. Training must go
    on (no exception out of the step); log() must say so instead of reporting local shards."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Block()
    error, stepped, rows = None, 0, None
    with warnings.catch_warnings(record=True) as said, GradientMonitor(model, None, activations=False) as monitor:
        warnings.simplefilter("always")
        fully_shard(model.up)
        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(2):
            x, y = local(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            stepped += 1
        try:
            rows = monitor.log(1)
        except MonitorError as e:
            error = str(e)
    return {"error": error, "stepped": stepped, "rows": rows is not None,
            "warnings": [str(w.message) for w in said if "GradientMonitor" in str(w.message)]}


def two_monitors() -> dict:
    """Two FSDP2 models (a GAN's G and D), each with its own monitor and optimizer, logged in turn;
    then G's monitor removed and a new one attached to G (a rerun cell) for two more steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    g, d = Block(), nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    for model in (g, d):
        fully_shard(model, mesh=mesh)
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.05), torch.optim.AdamW(d.parameters(), lr=0.01)
    oracle_g, oracle_d = Oracle(g), Oracle(d)
    opt_g.register_step_pre_hook(oracle_g)
    opt_d.register_step_pre_hook(oracle_d)
    windows = {"g": [], "d": []}

    def train(mon_g, mon_d, steps):
        for step in range(steps):
            x, _ = local(step)
            opt_d.zero_grad()
            d(g(x).detach()).square().mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-d(g(x)).mean()).backward()
            opt_g.step()
        for name, mon, oracle in (("g", mon_g, oracle_g), ("d", mon_d, oracle_d)):
            if mon is not None:
                mon.log(steps)
                windows[name].append({"rows": mon.history[-1].gradients, "overall": mon.history[-1].overall})
                oracle.close()

    mon_d = GradientMonitor(d, None, activations=False)
    with GradientMonitor(g, None, activations=False) as mon_g:
        train(mon_g, mon_d, 2)
    oracle_g.steps.clear()
    with GradientMonitor(g, None, activations=False) as mon_g:
        train(mon_g, mon_d, 2)
    mon_d.remove()
    return {"g": {"windows": windows["g"], "oracle": oracle_g.windows},
            "d": {"windows": windows["d"], "oracle": oracle_d.windows}}


def log_twice() -> dict:
    """log() again with no step since the last: {} as in one process (docs/monitor.md), on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Block()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, None, activations=False) as monitor:
        x, y = local(0)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        first = monitor.log(0)
        second = monitor.log(1)
    return {"first": sorted(first), "second": second}


CASES = {
    "fsdp-evaluate": lambda: fsdp(evaluate=True),
    "log-twice": log_twice,
    "two-monitors": two_monitors,
    "fsdp-bf16": lambda: fsdp(bf16=True),
    "fsdp-unfreeze": lambda: fsdp(unfreeze=True),
    "fsdp-after-attach": fsdp_after_attach,
    "fsdp-shard1": lambda: fsdp(shard_dim=1),
    "fsdp-clip-inf": lambda: fsdp(clip=clip_norm(0.05, float("inf"))),
    "fsdp-clip-accumulate": lambda: fsdp(accumulate=True, clip=clip_norm(0.3)),
    "hsdp-2x1": lambda: fsdp(mesh_shape=(2, 1)),
    "hsdp-1x2": lambda: fsdp(mesh_shape=(1, 2)),
    "tp-clip": lambda: tp(clip=clip_norm(0.3)),
    "fsdp-noreshard": lambda: fsdp(reshard=False),
    "fsdp-mixed": lambda: fsdp(mp=True),
    "fsdp-frozen": lambda: fsdp(frozen=True),
    "fsdp-accumulate": lambda: fsdp(accumulate=True),
    "ddp-unused": lambda: ddp(unused=True),
    "ddp-nosync": lambda: ddp(nosync=True),
    "ddp-members": ddp_members,
    "fsdp-members": fsdp_members,
    "log-rank0-only": log_rank0_only,
}


def main() -> None:
    run_cases(CASES, tail=3000)


if __name__ == "__main__":
    main()
