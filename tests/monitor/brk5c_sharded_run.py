"""One rank of the brk5c sharded clipping run (started by test_brk5c_sharded_clipping.py through
sharded_launch.launch): FSDP2 on 2 gloo ranks of a model whose parameters shard unevenly (3 rows:
2 and 1; 1 row and a 1-element parameter: 1 and 0, an empty local shard), clipped by value.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/monitor/brk5c_sharded_run.py OUT CASE

Writes OUT/<case>.rank<k>.json: the monitor's window and the oracle's (from each gradient's
full_tensor() in float64, before clipping and at the optimizer step)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)

from sharded_run import run_cases  # noqa: E402 - the shared runner (this script's folder is on the path)

from gradflow.monitor import GradientMonitor  # noqa: E402 - after the thread setting

STEPS = 4


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)                         # 3 rows on 2 ranks: 2 and 1
        self.one = nn.Parameter(torch.tensor([0.7]))     # 1 element: 1 and 0 (empty)
        self.b = nn.Linear(3, 1)                         # 1 row: 1 and 0 (empty)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.one


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).double()


def value_clipping() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = Odd()
    for module in (model.a, model.b):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    applied, before, clipped = [], [], 0
    optimizer.register_step_pre_hook(lambda *_: applied.append(
        {n: float(full(p.grad).norm()) for n, p in model.named_parameters() if p.grad is not None}))
    with GradientMonitor(model, None, activations=False) as monitor:
        for step in range(STEPS):
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))[rank * 4:(rank + 1) * 4]
            optimizer.zero_grad()
            model(x).square().mean().backward()
            grads = [full(p.grad) for p in model.parameters() if p.grad is not None]
            before.append(math.sqrt(sum(float(g.square().sum()) for g in grads)))
            largest = max(float(g.abs().max()) for g in grads)
            limit = largest * (0.5 if step % 2 else 2.0)
            clipped += largest > limit
            torch.nn.utils.clip_grad_value_(model.parameters(), limit)
            optimizer.step()
        monitor.log(0)
    window = monitor.history[-1]
    norms = {n: sum(a[n] for a in applied) / len(applied) for n in applied[0]}
    return {"overall": window.overall, "norms": {n: r["norm"] for n, r in window.gradients.items()},
            "oracle_norms": norms, "before": sum(before) / len(before), "clipped": clipped,
            "local_rows": {n: list(p.to_local().shape) for n, p in model.named_parameters()}}


CASES = {"value-clipping": value_clipping}


def main() -> None:
    run_cases(CASES, tail=3000)


if __name__ == "__main__":
    main()
