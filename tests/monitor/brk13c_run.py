"""One rank of the brk13c multi-process break tests (started by test_brk13c_sharded.py through
sharded_launch.launch, 2 gloo ranks on the CPU).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/monitor/brk13c_run.py OUT CASE [CASE ...]

Each case trains a tiny model a few steps with a GradientMonitor on every rank and records the
oracle at every optimizer step: each gradient the step applies (a DTensor's full_tensor(), a plain
one as it is, divided by a fused optimizer's grad_scale) in float64, from a step pre-hook
registered after the monitor's (sharded_run.Oracle). Writes OUT/<case>.rank<k>.json with the
monitor's windows, the oracle's and the monitor's warnings. test_brk13c_sharded.py runs a few of the
cases (a 2-rank run's start-up is most of its time); the others were tried by hand and were fine:

    PYTHONPATH=$PWD python -c "import sys; sys.path.insert(0, 'tests/monitor'); from pathlib import Path; \
        from sharded_launch import launch; print(launch(Path('/tmp'), 2, ['fsdp-tied'], script=Path('tests/monitor/brk13c_run.py')))"
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from sharded_run import STEPS, WINDOW, Block, Oracle, batch, run_cases  # noqa: E402

from gradflow.monitor import GradientMonitor  # noqa: E402


def local(step: int):
    """This rank's half of the step's batch of 8 rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch(step)
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


class Applied(Oracle):
    """The oracle of the gradient a step applies (a sparse one made dense): a fused optimizer stepped by a GradScaler unscales
    inside its step, so its ``.grad`` at the pre-hook is still scaled: divided here by its grad_scale."""

    def __call__(self, optimizer, args, kwargs) -> None:
        scale = getattr(optimizer, "grad_scale", None)
        if getattr(optimizer, "found_inf", None) is not None and optimizer.found_inf.item():
            return                                  # a fused optimizer's skipped step: nothing applied
        held = {p: p.grad for p in self.model.parameters()}
        try:
            for p, g in held.items():
                if g is not None:
                    g = g.to_dense() if g.is_sparse else g
                    p.grad = g if scale is None else g / scale.item()
            super().__call__(optimizer, args, kwargs)
        finally:
            for p, g in held.items():
                p.grad = g


def train(model, optimizer, monitor, oracle, data=local, scaler=None, micro: int = 1, sync=None,
          set_to_none: bool = True, window: int = WINDOW, steps: int = STEPS, overflow: bool = False,
          second=None) -> list[dict]:
    """``steps`` steps of ``micro`` micro-batches (``sync(last)``: a context around each); ``log()``
    every ``window`` steps. ``overflow``: the first step's scale is inf (skipped), 1024 after.
    ``second``: another optimizer over the other parameters, stepped first. Returns the monitor's
    windows (its returned rows, history's rows, its skipped steps' non-finite counts)."""
    out = []
    handle = optimizer.register_step_pre_hook(oracle) if oracle is not None else None
    optimizers = [second, optimizer] if second is not None else [optimizer]
    for step in range(steps):
        x, y = data(step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=set_to_none)
        for m, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            with sync(m == micro - 1) if sync is not None else contextlib.nullcontext():
                loss = nn.functional.mse_loss(model(xs), ys)
                (scaler.scale(loss) if scaler is not None else loss).backward()
        for opt in optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
            if overflow and step == 0:
                scaler.update(1024.0)
        if (step + 1) % window == 0:
            returned = monitor.log(step)
            last = monitor.history[-1]
            out.append({"rows": last.gradients, "overall": last.overall, "weights": last.weights,
                        "returned": returned, "skipped_nonfinite": last.skipped_nonfinite})
            if oracle is not None:
                oracle.close()
    if handle is not None:
        handle.remove()
    return out


@contextlib.contextmanager
def said():
    """The monitor's warnings inside (the launcher sets PYTHONWARNINGS=ignore)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def result(windows, oracle, caught, **extra) -> dict:
    return {"windows": windows, "oracle": oracle.windows, "warnings": [str(w.message)[:300] for w in caught], **extra}


# -- DDP --------------------------------------------------------------------------------------


def ddp(scaler: bool = False, static: bool = False, inner_attached: bool = False) -> dict:
    """DDP of Block: GradScaler("cpu") with a fused Adam (unscaled inside its step), static_graph with
    gradient_as_bucket_view and zero_grad(set_to_none=False), or the monitor on the inner module."""
    torch.manual_seed(0)
    inner = Block()
    kw = {"static_graph": True, "gradient_as_bucket_view": True} if static else {}
    model = nn.parallel.DistributedDataParallel(inner, **kw)
    optimizer = (torch.optim.Adam(model.parameters(), lr=0.01, fused=True) if scaler
                 else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    amp = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None
    with said() as caught, GradientMonitor(inner if inner_attached else model, None, activations=False) as monitor:
        oracle = Applied(inner)
        windows = train(model, optimizer, monitor, oracle, scaler=amp, set_to_none=not static)
    return result(windows, oracle, caught)


class Bag(nn.Module):
    """A sparse-gradient embedding bag and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(20, 10, mode="sum", sparse=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.embed((x.abs() * 7).long() % 20))


def ddp_sparse() -> dict:
    """DDP all-reduces the embedding's sparse gradient (gloo): the monitor reads it as the step does."""
    torch.manual_seed(0)
    inner = Bag()
    model = nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with said() as caught, GradientMonitor(model, None, activations=False) as monitor:
        oracle = Applied(inner)
        windows = train(model, optimizer, monitor, oracle)
    return result(windows, oracle, caught)


def ddp_boundaries() -> dict:
    """DDP, no collective in log(): rank 0 closes windows of 2 steps, rank 1 of 3; each is right."""
    torch.manual_seed(0)
    inner = Block()
    model = nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with said() as caught, GradientMonitor(model, None, activations=False) as monitor:
        oracle = Applied(inner)
        windows = train(model, optimizer, monitor, oracle, window=2 + dist.get_rank(), steps=6)
    return result(windows, oracle, caught)


# -- FSDP2 ------------------------------------------------------------------------------------


class Odd(nn.Module):
    """Awkward shapes for 2 ranks: a Linear(10, 5) (rows 3 and 2), a (1,) scale (rank 1 empty), a
    (3,) offset (rows 2 and 1) and a Linear(5, 3). (fully_shard refuses a 0-dim parameter.)"""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 5)
        self.scale = nn.Parameter(torch.ones(1) * 0.7)
        self.offset = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * self.scale) + self.offset


class Tied(nn.Module):
    """An embedding whose weight the output head shares (a language model's tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 10)
        self.mid = nn.Linear(10, 10)
        self.out = nn.Linear(10, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.embed((x.abs() * 5).long() % 12).mean(1))))[:, :3]


def fsdp(make=Block, units=("up", "head"), root: bool = True, same_data: bool = False, opt: str = "adamw",
         scaler: bool = False, set_to_none: bool = True, double: bool = False, micro: int = 1,
         overflow: bool = False, split: bool = False) -> dict:
    """FSDP2 of ``make()``: ``units`` sharded on their own, the root too unless ``root`` is False
    (then the other parameters stay plain tensors: ``same_data`` gives every rank the whole batch,
    so their local gradients are the applied ones)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = make()
    if double:
        model.double()
    for name in units:
        fully_shard(model.get_submodule(name), mesh=mesh)
    if root:
        fully_shard(model, mesh=mesh)
    model, optimizer, second, amp = prepared(model, opt, scaler, overflow, split)
    from torch.distributed.tensor import DTensor

    def data(step):
        x, y = batch(step) if same_data else local(step)
        return (x.double(), y.double()) if double else (x, y)

    sync = (lambda last: contextlib.nullcontext(model.set_requires_gradient_sync(last))) if micro > 1 else None
    with said() as caught, GradientMonitor(model, None, activations=False) as monitor:
        oracle = Applied(model)
        windows = train(model, optimizer, monitor, oracle, data=data, scaler=amp, set_to_none=set_to_none,
                        micro=micro, sync=sync, overflow=overflow, second=second)
        from gradflow.analysis.diagnose import diagnose_monitor

        verdict = diagnose_monitor(monitor).report()
        extra = {"time": {k: v.tolist() for k, v in monitor.history[-1].time.items()},
                 "gates": repr(getattr(monitor.history[-1], "gates", None))[:500]}
    reference = None
    if overflow or split:                           # the same training unsharded, whole batch, this process
        torch.manual_seed(0)
        plain, optimizer, second, amp = prepared(make(), opt, scaler, overflow, split)
        with GradientMonitor(plain, None, activations=False) as monitor:
            reference = train(plain, optimizer, monitor, None, data=batch, scaler=amp, overflow=overflow,
                              second=second)
    return result(windows, oracle, caught, verdict=verdict, reference=reference, **extra,
                  kinds={n: type(p).__name__ for n, p in model.named_parameters()},
                  numel={n: p.numel() for n, p in model.named_parameters()},
                  sharded=[n for n, p in model.named_parameters() if isinstance(p, DTensor)])


def prepared(model, opt: str, scaler: bool, overflow: bool, split: bool):
    """(model, its optimizer, a second optimizer over the head or None, a GradScaler or None)."""
    params = list(model.parameters())
    second = None
    if split:                                       # the head's parameters stepped by their own SGD
        head = set(model.head.parameters())
        second = torch.optim.SGD(list(head), lr=0.05)
        params = [p for p in params if p not in head]
    optimizer = {"adamw": lambda: torch.optim.AdamW(params, lr=0.01),
                 "foreach": lambda: torch.optim.AdamW(params, lr=0.01, foreach=True),
                 "fused": lambda: torch.optim.AdamW(params, lr=0.01, fused=True),
                 "sgd": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=False)}[opt]()
    amp = torch.amp.GradScaler("cpu", init_scale=float("inf") if overflow else 1024.0) if scaler else None
    return model, optimizer, second, amp


def one_rank_overflows() -> dict:
    """FSDP2 of a Linear(10, 3) (rows 0-1 on rank 0, row 2 on rank 1) under a GradScaler; at step 1
    rank 1's target is huge in column 2 only, so the scaled gradient overflows in row 2 alone: rank
    1's shard; torch's GradScaler finds it on every rank (both skip the step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Linear(10, 3)
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    skipped = []
    with said() as caught, GradientMonitor(model, None, activations=False) as monitor:
        for step in range(2):
            x, y = local(step)
            if step == 1 and dist.get_rank() == 1:
                y = y.clone()
                y[:, 2] = 3e38
            optimizer.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped.append(scaler.get_scale() < before)
        rows = monitor.log(1)
        window = monitor.history[-1]
    return {"rows": rows, "overall": window.overall, "skipped_nonfinite": window.skipped_nonfinite,
            "skipped": skipped, "warnings": [str(w.message)[:400] for w in caught]}


class Recurrent(nn.Module):
    """An LSTM over the 10 features read as 5 steps of 2, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.lstm(x.view(x.shape[0], 5, 2))
        return self.head(out[:, -1])


CASES = {
    "ddp-scaler-fused": lambda: ddp(scaler=True),
    "ddp-static": lambda: ddp(static=True),
    "ddp-inner": lambda: ddp(inner_attached=True),
    "ddp-sparse": ddp_sparse,
    "ddp-boundaries": ddp_boundaries,
    "fsdp-odd": lambda: fsdp(Odd, units=("a",)),
    "fsdp-tied": lambda: fsdp(Tied, units=("mid",)),
    "fsdp-plain-mixed": lambda: fsdp(root=False, same_data=True),
    "fsdp-scaler": lambda: fsdp(scaler=True),
    "fsdp-scaler-fused": lambda: fsdp(scaler=True, opt="fused"),
    "fsdp-foreach-keep": lambda: fsdp(opt="foreach", set_to_none=False),
    "fsdp-sgd-accum4": lambda: fsdp(opt="sgd", set_to_none=False, micro=4),
    "fsdp-double": lambda: fsdp(double=True),
    "fsdp-overflow": lambda: fsdp(scaler=True, overflow=True),
    "fsdp-overflow-fused": lambda: fsdp(scaler=True, overflow=True, opt="fused"),
    # total_norm differs from this oracle's (the norm over both optimizers' parameters per iteration):
    # each optimizer's step is a total-norm step of its own, as unsharded (its reference matches)
    "fsdp-two-optimizers": lambda: fsdp(split=True),
    "one-rank-overflows": one_rank_overflows,
    "fsdp-lstm": lambda: fsdp(Recurrent, units=("lstm",)),
}


def main() -> None:
    run_cases(CASES, tail=3000)


if __name__ == "__main__":
    main()
