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
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from sharded_run import STEPS, WINDOW, Block, Oracle, TPBlock, batch, full, run_cases  # noqa: E402

from gradflow.monitor import GradientMonitor  # noqa: E402
from gradflow.monitor.sinks import Sink  # noqa: E402


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


WHOLE = ("step", "steps", "gradients", "weights", "overall", "skipped_nonfinite", "gates", "kinds", "idle",
         "first_nonfinite", "first_overflow")      # a Window's fields but this rank's own (activations, time)


class Written(Sink):
    """The scalars and texts a writer would get, but the activations' (this rank's batch)."""

    def __init__(self) -> None:
        self.scalars: list[dict] = []
        self.texts: list[dict] = []

    def log(self, scalars, histograms, step):
        self.scalars.append({tag: value for tag, value in scalars.items() if not tag.startswith("act")})

    def text(self, texts, step):
        self.texts.append(texts)


def params_of(model):
    return model.__self__.parameters() if hasattr(model, "__self__") else model.parameters()


def titan_clip(model, limit: float, whole: bool):
    """torchtitan's clip of FSDP2 gradients: get_total_norm (a DTensor), made whole with full_tensor()
    (``whole``) or given as it is, then clip_grads_with_norm_."""
    def clip():
        params = [p for p in model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if whole and hasattr(total, "full_tensor"):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, limit, total)
    return clip


def train(model, optimizer, monitor, oracle, data=local, scaler=None, micro: int = 1, sync=None,
          set_to_none: bool = True, window: int = WINDOW, steps: int = STEPS, overflow: bool = False,
          second=None, manual=None, clip=None, before: list | None = None) -> list[dict]:
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
        if clip is not None:                        # the full L2 norm before it, in float64
            before.append(math.sqrt(sum(float(full(p.grad).square().sum()) for p in params_of(model)
                                        if p.grad is not None)))
            clip()
        if manual is not None:                      # automatic=False: the loop records, before the step
            manual.record()
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
                        "returned": returned, "skipped_nonfinite": last.skipped_nonfinite,
                        "whole": {key: repr(getattr(last, key)) for key in WHOLE}})
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
         overflow: bool = False, split: bool = False, mp=None, replicas: int = 1, manual: bool = False,
         given: bool = False, clip: str | None = None) -> dict:
    """FSDP2 of ``make()``: ``units`` sharded on their own, the root too unless ``root`` is False
    (then the other parameters stay plain tensors: ``same_data`` gives every rank the whole batch,
    so their local gradients are the applied ones)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    mesh = (init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
            if replicas > 1 else init_device_mesh("cpu", (world,)))
    torch.manual_seed(0)
    model = make()
    if double:
        model.double()
    kw = {"mesh": mesh}
    if mp is not None:                              # (param_dtype, reduce_dtype)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp[0], reduce_dtype=mp[1])
    for name in units:
        fully_shard(model.get_submodule(name), **kw)
    if root:
        fully_shard(model, **kw)
    model, optimizer, second, amp = prepared(model, opt, scaler, overflow, split)
    from torch.distributed.tensor import DTensor

    def data(step):
        x, y = batch(step) if same_data else local(step)
        return (x.double(), y.double()) if double else (x, y)

    def sync(last):                                 # HSDP: the replicas' all-reduce too
        model.set_requires_gradient_sync(last) if replicas == 1 else model.set_requires_all_reduce(last)
        return contextlib.nullcontext()

    def forward(x):                                 # parameters in bfloat16 take bfloat16 inputs
        return model(x.bfloat16()).float() if mp is not None else model(x)

    forward.__self__ = model                        # params_of(forward): the model's
    before: list[float] = []
    clipper = titan_clip(model, 0.3, clip == "whole") if clip else None
    written = Written()
    with said() as caught, GradientMonitor(model, written, activations=True, automatic=not manual,
                                           optimizer=optimizer if given else None) as monitor:
        oracle = Applied(model)
        windows = train(forward, optimizer, monitor, oracle, data=data, scaler=amp, set_to_none=set_to_none,
                        micro=micro, sync=sync if micro > 1 else None, overflow=overflow, second=second,
                        manual=monitor if manual else None, clip=clipper, before=before)
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
    return result(windows, oracle, caught, verdict=verdict, reference=reference, **extra, scalars=written.scalars,
                  texts=written.texts, before=before,
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


class Vocab(nn.Module):
    """A token embedding (vocab rows sharded by RowwiseParallel), a BatchNorm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.bn(self.embed((x.abs() * 5).long() % 12).mean(1)))


def tp_embedding() -> dict:
    """Tensor parallel embedding (RowwiseParallel: Shard(0) vocab rows, a Partial output made whole)
    and a Colwise head gathered back, both ranks on the whole batch; the BatchNorm plain."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = Vocab()
    parallelize_module(model, mesh, {"embed": RowwiseParallel(input_layouts=Replicate()),
                                     "head": ColwiseParallel(output_layouts=Replicate())})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with said() as caught, GradientMonitor(model, None, activations=False) as monitor:
        oracle = Applied(model)
        windows = train(model, optimizer, monitor, oracle, data=batch)
    return result(windows, oracle, caught, kinds={n: str(getattr(p, "placements", "plain"))
                                                  for n, p in model.named_parameters()})


def ddp_fp16_hook() -> dict:
    """DDP all-reducing in float16 (fp16_compress_hook): the gradient the step applies is the
    decompressed float32 one."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch.manual_seed(0)
    inner = Vocab()
    model = nn.parallel.DistributedDataParallel(inner)
    model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with said() as caught, GradientMonitor(model, None, activations=False) as monitor:
        oracle = Applied(inner)
        windows = train(model, optimizer, monitor, oracle)
    return result(windows, oracle, caught)


def tp_nonfinite(nan_at: int | None = 2) -> dict:
    """Tensor parallel with the first-non-finite part: a SequenceParallel LayerNorm whose outputs
    are DTensors (Shard(1)), Colwise up, Rowwise down; a NaN in rank 1's part of the sequence at
    step ``nan_at`` (None: clean)."""
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
    rank = dist.get_rank()

    def data(step):
        x, y = batch(step, (2, 8, 8))
        x, y = x[:, rank * 4:(rank + 1) * 4].clone(), y[:, rank * 4:(rank + 1) * 4]
        if step == nan_at and rank == 1:
            x[0, 0, 0] = float("nan")
        return x, y

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with said() as caught, GradientMonitor(model, None, nonfinite=True) as monitor:
        for step in range(4):
            x, y = data(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        monitor.log(3)
    source = monitor.history[-1].first_nonfinite
    return {"source": None if source is None else [source.module, source.phase, source.step],
            "warnings": [str(w.message)[:300] for w in caught]}


class Outer(nn.Module):
    """A Block body and an extra head of its own FSDP2 unit: the body's parameters belong to the
    root's unit, and the body holds no FSDP2 module."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Block()
        self.extra = nn.Linear(3, 3)

    def forward(self, x):
        return self.extra(self.body(x))


def fsdp_submodule(evaluate: bool) -> dict:
    """The monitor on ``outer.body``, a submodule of the root's FSDP2 unit; ``evaluate``: a no_grad
    forward after each step, before log() (the root's parameters stay unsharded, plain, until the
    next backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    outer = Outer()
    fully_shard(outer.extra, mesh=mesh)
    fully_shard(outer, mesh=mesh)
    optimizer = torch.optim.AdamW(outer.parameters(), lr=0.01)

    def forward(x):
        return outer(x)

    def evaluate_after(opt, args, kwargs):         # right after the step, before log()
        with torch.no_grad():
            outer(local(0)[0])

    if evaluate:
        optimizer.register_step_post_hook(evaluate_after)
    forward.__self__ = outer.body
    with said() as caught, GradientMonitor(outer.body, None) as monitor:
        oracle = Applied(outer.body)
        windows = train(forward, optimizer, monitor, oracle)
    return result(windows, oracle, caught)


def fsdp_two_submodules() -> dict:
    """Two monitors on two submodules of one FSDP2 model: ``outer.body`` (in the root's unit) and
    ``outer.extra`` (a unit of its own), both logged at each window, a no_grad forward after each step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    outer = Outer()
    fully_shard(outer.extra, mesh=mesh)
    fully_shard(outer, mesh=mesh)
    optimizer = torch.optim.AdamW(outer.parameters(), lr=0.01)
    optimizer.register_step_post_hook(lambda *args: outer(local(0)[0]).detach())
    oracles = {"body": Applied(outer.body), "extra": Applied(outer.extra)}
    handles = [optimizer.register_step_pre_hook(o) for o in oracles.values()]
    out = {"body": [], "extra": []}
    with said() as caught, GradientMonitor(outer.body, None) as body, GradientMonitor(outer.extra, None) as extra:
        monitors = {"body": body, "extra": extra}
        for step in range(STEPS):
            x, y = local(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(outer(x), y).backward()
            optimizer.step()
            if (step + 1) % WINDOW == 0:
                for name, monitor in monitors.items():
                    returned = monitor.log(step)
                    last = monitor.history[-1]
                    out[name].append({"rows": last.gradients, "overall": last.overall, "weights": last.weights,
                                      "returned": returned})
                    oracles[name].close()
    for handle in handles:
        handle.remove()
    return {name: {"windows": out[name], "oracle": oracles[name].windows,
                   "warnings": [str(w.message)[:300] for w in caught]} for name in out}


def fsdp_attach_after_evaluate() -> dict:
    """A no_grad forward (a sanity-check validation) before the monitor attaches: the root unit's
    parameters are FSDP2's unsharded plain stand-ins at attach, DTensors again after the first backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = Block()
    for module in (model.up, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with torch.no_grad():
        model(local(0)[0])
    kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
    with said() as caught, GradientMonitor(model, None) as monitor:
        oracle = Applied(model)
        windows = train(model, optimizer, monitor, oracle)
    return result(windows, oracle, caught, kinds=kinds)


def fsdp_submodule_attach_after_evaluate() -> dict:
    """The monitor on ``outer.body`` (in the root's FSDP2 unit), attached after a no_grad forward:
    it holds FSDP2's unsharded stand-ins and cannot reach the unit to reshard it; log() says what to do."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradflow.monitor import MonitorError

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    outer = Outer()
    fully_shard(outer.extra, mesh=mesh)
    fully_shard(outer, mesh=mesh)
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.01)
    with torch.no_grad():
        outer(local(0)[0])
    error = None
    with said() as caught, GradientMonitor(outer.body, None, activations=False) as monitor:
        x, y = local(1)
        optimizer.zero_grad()
        nn.functional.mse_loss(outer(x), y).backward()
        optimizer.step()
        try:
            monitor.log(0)
        except MonitorError as e:
            error = str(e)
    return {"error": error, "warnings": [str(w.message)[:300] for w in caught]}


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
    "fsdp-titan-clip": lambda: fsdp(clip="whole"),
    "fsdp-titan-clip-dtensor": lambda: fsdp(clip="dtensor"),
    "fsdp-submodule": lambda: fsdp_submodule(False),
    "fsdp-submodule-evaluate": lambda: fsdp_submodule(True),
    "fsdp-two-submodules": fsdp_two_submodules,
    "fsdp-attach-after-evaluate": fsdp_attach_after_evaluate,
    "fsdp-submodule-attach-after-evaluate": fsdp_submodule_attach_after_evaluate,
    "tp-embedding": tp_embedding,
    "tp-nonfinite": tp_nonfinite,
    "tp-nonfinite-clean": lambda: tp_nonfinite(None),
    "ddp-fp16-hook": ddp_fp16_hook,
    "fsdp-batchnorm": lambda: fsdp(Vocab, units=("embed",)),
    "fsdp-bf16-reduce": lambda: fsdp(mp=(torch.bfloat16, torch.bfloat16)),
    "hsdp-accumulate": lambda: fsdp(replicas=2, micro=2),
    "fsdp-manual": lambda: fsdp(manual=True),
    "fsdp-given": lambda: fsdp(given=True, micro=2),
}


def main() -> None:
    run_cases(CASES, tail=3000)


if __name__ == "__main__":
    main()
