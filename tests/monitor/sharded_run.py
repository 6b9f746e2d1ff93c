"""One rank of a multi-process gloo run of sharded cases (started by test_sharding.py, one process per rank).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/monitor/sharded_run.py OUT CASE [CASE ...]

Each case builds a model, shards it (FSDP2, HSDP, tensor parallel), trains a few steps with a
GradientMonitor attached on every rank, and records at every step an oracle: each gradient's
``full_tensor()`` at the optimizer step, in float64. The rank writes OUT/<case>.rank<k>.json with the
monitor's windows, the oracle's windows, and the single-process reference (the same model unsharded,
trained on the whole batch in this process). The cases ``attach-rank0-only`` and ``raise-on-rank1``
check that a misuse ends in an error, not a hang.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)

from gradflow.monitor import GradientMonitor, MonitorError  # noqa: E402 - after the skip / thread setting above
from gradflow.monitor import stats as S  # noqa: E402 - after the skip / thread setting above
from gradflow.monitor.gradients import HISTOGRAM_EVERY  # noqa: E402 - after the skip / thread setting above
from gradflow.monitor.sinks import Sink  # noqa: E402 - after the skip / thread setting above

STEPS, WINDOW, BATCH = 4, 2, 8          # 4 optimizer steps, windows of 2; global batch of 8 rows


class Block(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, and a head Linear(10, 3): uneven and empty shards on 4 ranks."""

    def __init__(self, width: int = 10, hidden: int = 16, unused: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.head = nn.Linear(width, 3)
        self.act = nn.ReLU()                                 # tapped: activations stay this rank's own
        self.spare = nn.Linear(3, 3) if unused else None     # never used: no gradient on any rank

    def forward(self, x):
        return self.head(x + self.down(self.act(self.up(self.norm(x)))))


class TPBlock(nn.Module):
    """Tensor-parallel block on sequences: SequenceParallel LayerNorm (Partial gradients), Colwise up,
    Rowwise down (Replicate bias)."""

    def __init__(self, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


class Capture(Sink):
    """Keeps each window's histograms' (limits, counts), for the oracle's bins."""

    def __init__(self) -> None:
        self.histograms: list[dict[str, list]] = []

    def log(self, scalars, histograms, step):
        self.histograms.append({tag: [h.limits, h.counts] for tag, h in histograms.items() if tag.startswith("grad/")})


def batch(step: int, shape=(BATCH, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(*shape, generator=g)
    return x, torch.randn(*shape[:-1], 3 if len(shape) == 2 else shape[-1], generator=g)


def optimizer_of(name: str, params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9) if name == "sgd" else torch.optim.AdamW(params, lr=0.01)


class Oracle:
    """Per step, from each gradient's full_tensor() in float64 at the optimizer step; per window, means."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[dict] = []
        self.seen: dict[str, int] = {}
        self.windows: list[dict] = []
        self.start = self.weights()

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: full(p.detach()) for n, p in self.model.named_parameters()}

    def __call__(self, optimizer, args, kwargs) -> None:
        rows, total = {}, 0.0
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            g = full(p.grad)
            squares = float((g * g).sum())
            total += squares
            rows[name] = {"mean": float(g.mean()), "mean_abs": float(g.abs().mean()), "norm": math.sqrt(squares),
                          "max_abs": float(g.abs().max()), "zeros": int((g == 0).sum()), "numel": g.numel(),
                          "counts": S.sign_exponent_counts(g.float()).numpy() * histogrammed(self.seen, name)}
        self.steps.append({"rows": rows, "total": math.sqrt(total)})

    def close(self) -> None:
        steps, self.steps = self.steps, []
        self.seen.clear()
        out = {}
        for name in steps[0]["rows"]:
            seen = [s["rows"][name] for s in steps if name in s["rows"]]
            row = {k: sum(r[k] for r in seen) / len(seen) for k in ("mean", "mean_abs", "norm", "max_abs")}
            row["zero_fraction"] = sum(r["zeros"] for r in seen) / sum(r["numel"] for r in seen)
            row["steps"] = len(seen)
            counts = sum(r["counts"] for r in seen)
            h = S.value_histograms(counts)[0]
            row["histogram"] = [h.limits, h.counts]
            out[name] = row
        end = self.weights()
        for name, w in end.items():
            if name in out:
                out[name]["weight_l1"] = float(w.abs().sum())
                out[name]["weight_norm"] = float(w.norm())
                start = float(self.start[name].norm())
                out[name]["weight_update_ratio"] = float((w - self.start[name]).norm()) / start if start else None
        self.start = end
        totals = [s["total"] for s in steps]
        self.windows.append({"rows": out, "total_norm": sum(totals) / len(totals), "total_norm_max": max(totals)})


def histogrammed(seen: dict[str, int], name: str) -> bool:
    """Whether the monitor histograms parameter ``name``'s gradient at this step: its 0th,
    HISTOGRAM_EVERY-th, ... step with a gradient in the window (``seen``: its count so far)."""
    before = seen.get(name, 0)
    seen[name] = before + 1
    return before % HISTOGRAM_EVERY == 0


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).double()


def train(model, optimizer, monitor, oracle, data, clip: float | None = None, scale: float = 1.0) -> list[dict]:
    """STEPS steps; ``data(step)`` gives this rank's (x, y); the loss is scaled by ``scale``. Returns the
    monitor's windows."""
    out = []
    handle = optimizer.register_step_pre_hook(oracle) if oracle is not None else None
    for step in range(STEPS):
        x, y = data(step)
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) * scale).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if (step + 1) % WINDOW == 0:
            monitor.log(step)
            window = monitor.history[-1]
            out.append({"rows": window.gradients, "overall": window.overall})
            if oracle is not None:
                oracle.close()
    if handle is not None:
        handle.remove()
    return out


def reference(make, opt: str, data, clip=None) -> list[dict]:
    """The same model unsharded in this process, on the whole batch (no collectives)."""
    torch.manual_seed(0)
    model = make()
    optimizer = optimizer_of(opt, model.parameters())
    with GradientMonitor(model, None, activations=False) as monitor:
        return train(model, optimizer, monitor, None, data, clip)


def fsdp_case(world: int, opt: str, mesh_shape: tuple[int, ...], unused: bool = False, clip=None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    dims = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=dims)
    torch.manual_seed(0)
    model = Block(unused=unused)
    for module in (model.up, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per_rank = BATCH // world

    def local_data(step):
        x, y = batch(step)
        return x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]

    capture, oracle = Capture(), Oracle(model)
    optimizer = optimizer_of(opt, model.parameters())
    with GradientMonitor(model, capture, activations_every=1) as monitor:
        windows = train(model, optimizer, monitor, oracle, local_data, clip)
    return {"windows": windows, "oracle": oracle.windows, "histograms": capture.histograms,
            "reference": reference(lambda: Block(unused=unused), opt, batch, clip),
            "placements": {n: str(p.placements) for n, p in model.named_parameters()},
            "local_shapes": {n: list(p.to_local().shape) for n, p in model.named_parameters()}}


def tp_case(opt: str) -> dict:
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
    model = TPBlock()
    parallelize_module(model, mesh, {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
                                     "down": RowwiseParallel(output_layouts=Shard(1))})

    world, rank = dist.get_world_size(), dist.get_rank()

    def data(step):
        return batch(step, (2, 4 * world, 8))

    def local_data(step):            # sequence parallel: inputs and outputs are sharded on the sequence dim
        x, y = data(step)
        return x[:, rank * 4:(rank + 1) * 4], y[:, rank * 4:(rank + 1) * 4]

    capture, oracle = Capture(), Oracle(model)
    optimizer = optimizer_of(opt, model.parameters())
    with GradientMonitor(model, capture, activations=False) as monitor:    # each rank's loss: its part of the mean
        windows = train(model, optimizer, monitor, oracle, local_data, scale=1 / world)
    grads = {n: str(p.grad.placements) if hasattr(p.grad, "placements") else "plain" for n, p in model.named_parameters()}
    return {"windows": windows, "oracle": oracle.windows, "histograms": capture.histograms,
            "reference": reference(TPBlock, opt, data), "grad_placements": grads}


def fsdp_tp_case(opt: str) -> dict:
    """FSDP2 over tensor parallel on a 2x2 (dp, tp) mesh: the TP block's parameters sharded on both dims."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"], mesh["tp"]
    torch.manual_seed(0)
    model = TPBlock()
    parallelize_module(model, tp, {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
                                   "down": RowwiseParallel(output_layouts=Shard(1))})
    fully_shard(model, mesh=dp)
    d, t, tps = dp.get_local_rank(), tp.get_local_rank(), tp.size()

    def data(step):
        return batch(step, (4, 4 * tps, 8))

    def local_data(step):            # this dp rank's half of the batch, this tp rank's part of the sequence
        x, y = data(step)
        return x[2 * d:2 * d + 2, 4 * t:4 * t + 4], y[2 * d:2 * d + 2, 4 * t:4 * t + 4]

    capture, oracle = Capture(), Oracle(model)
    optimizer = optimizer_of(opt, model.parameters())
    with GradientMonitor(model, capture, activations=False) as monitor:
        windows = train(model, optimizer, monitor, oracle, local_data, scale=1 / tps)
    return {"windows": windows, "oracle": oracle.windows, "histograms": capture.histograms,
            "reference": reference(TPBlock, opt, data),
            "placements": {n: str(p.placements) for n, p in model.named_parameters()}}


def attach_rank0_only() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Block()
    fully_shard(model, mesh=mesh)
    if dist.get_rank() != 0:
        return {"error": None}
    try:
        GradientMonitor(model, None, activations=False)      # the last case of a run: nothing attaches after it
    except MonitorError as error:
        return {"error": str(error)}
    return {"error": None}


def uneven_records() -> dict:
    """Rank 0 records two steps in a window, rank 1 one: the window still closes on both (no hang), the
    per-step rows padded to the longer window."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Block()
    fully_shard(model, mesh=mesh)
    with GradientMonitor(model, None, activations=False) as monitor:
        x, y = batch(0)
        nn.functional.mse_loss(model(x), y).backward()
        for count in range(2 if dist.get_rank() == 0 else 1):
            if count:                 # a new step's gradient, not the same one recorded twice (the
                for p in model.parameters():   # monitor counts a wrapper's repeat of one step once)
                    p.grad.mul_(1.0)
            monitor.record()
        rows = monitor.log(0)
    return {"steps": rows["head.weight"]["steps"], "total_norm": monitor.history[-1].overall["total_norm"]}


def writer_on_rank0() -> dict:
    """Rank 0 writes histograms, rank 1 has no writer (a common setup): the weights' counts, kept
    only where a histogram is drawn, are kept on both, so the window's reduction matches."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = Block()
    fully_shard(model, mesh=mesh)
    capture = Capture() if dist.get_rank() == 0 else None
    with GradientMonitor(model, capture, activations=False) as monitor:
        x, y = batch(0)
        nn.functional.mse_loss(model(x), y).backward()
        monitor.record()
        monitor.log(0)
    full = {n: p.full_tensor().detach().double().norm().item() for n, p in model.named_parameters()}
    return {"norms": {n: row["norm"] for n, row in monitor.history[-1].weights.items()}, "full": full,
            "histograms": len(capture.histograms[0]) if capture else None}


def raise_on_rank1() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Block()
    fully_shard(model, mesh=mesh)
    monitor = GradientMonitor(model, None, activations=False)
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    monitor.record()
    if dist.get_rank() == 1:
        os._exit(3)                               # dies between two steps, as a crashed rank does
    try:
        monitor.log(0)
    except Exception as error:                    # noqa: BLE001 - gloo's error type differs by failure
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return {"error": None}


def nonfinite_on_rank1() -> dict:
    """A NaN planted in rank 1's input at step 2 only (so its ``norm`` goes non-finite first). Rank 0's
    own first source is a step later (the NaN reaches every rank's weights through the gradient's
    reduce-scatter); every rank names rank 1's, the earliest on any rank (issue 24)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = Block()
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, None, activations=False, nonfinite=True) as monitor:
        for step in range(4):
            x, y = batch(step)
            if dist.get_rank() == 1 and step == 2:
                x = x.clone()
                x[0, 0] = float("nan")
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        monitor.log(0)
    source = monitor.history[-1].first_nonfinite
    return {"source": None if source is None else [source.module, source.phase, source.step]}


def groups_released() -> dict:
    """Attach and drop a monitor three times: the monitor's own process groups go with it, so
    repeated attaches do not pile up groups (the default group's map holds what it held)."""
    import gc

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Block()
    fully_shard(model, mesh=mesh)
    gc.collect()                          # the earlier cases' monitors, already dropped
    before = len(dist.distributed_c10d._world.pg_map)
    during = []
    for _ in range(3):
        with GradientMonitor(model, None, activations=False) as monitor:
            x, y = batch(0)
            nn.functional.mse_loss(model(x), y).backward()
            monitor.record()
            monitor.log(0)
            during.append(len(dist.distributed_c10d._world.pg_map))
        del monitor
        gc.collect()
    return {"before": before, "during": during, "after": len(dist.distributed_c10d._world.pg_map)}


CASES = {
    "fsdp-sgd": lambda: fsdp_case(dist.get_world_size(), "sgd", (dist.get_world_size(),)),
    "fsdp-adamw-clip": lambda: fsdp_case(dist.get_world_size(), "adamw", (dist.get_world_size(),), clip=0.5),
    "fsdp-unused": lambda: fsdp_case(dist.get_world_size(), "sgd", (dist.get_world_size(),), unused=True),
    "hsdp-adamw": lambda: fsdp_case(dist.get_world_size(), "adamw", (2, dist.get_world_size() // 2)),
    "tp-sgd": lambda: tp_case("sgd"),
    "fsdp-tp-adamw": lambda: fsdp_tp_case("adamw"),
    "tp-adamw": lambda: tp_case("adamw"),
    "uneven-records": uneven_records,
    "attach-rank0-only": attach_rank0_only,
    "raise-on-rank1": raise_on_rank1,
    "writer-on-rank0": writer_on_rank0,
    "nonfinite-on-rank1": nonfinite_on_rank1,
    "groups-released": groups_released,
}


def run_cases(table: dict, *, stop_at_crash: bool = False, tail: int | None = None) -> None:
    """Run the cases named on the command line (``out_dir case ...``) from ``table`` on this rank in
    one gloo group, writing each result to ``<out>/<case>.rank<r>.json`` (a crash as its traceback,
    its last ``tail`` characters; ``stop_at_crash``: no case after it). Shared by the runner scripts."""
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        for case in cases:
            try:
                result = table[case]()
            except Exception:                     # noqa: BLE001 - written for the test to show
                crash = traceback.format_exc()
                result = {"crash": crash[-tail:] if tail else crash}
            with open(os.path.join(out, f"{case}.rank{rank}.json"), "w") as f:
                json.dump(result, f, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
            if stop_at_crash and "crash" in result:
                break
    finally:
        dist.destroy_process_group()


def main() -> None:
    run_cases(CASES, stop_at_crash=True)


if __name__ == "__main__":
    main()
