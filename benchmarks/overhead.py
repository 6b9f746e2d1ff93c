"""What gradient instrumentation costs per training step, measured side by side in one process.

For each model, a plain training loop is timed with no instrumentation, with gradflow's
GradientMonitor (every step recorded, one TensorBoard write per epoch, histograms on), with a
per-step ``SummaryWriter.add_histogram`` of every gradient (what people write by hand), and with
``wandb.watch(model, log="gradients", log_freq=1)`` offline when wandb is installed. Variants
are interleaved over several rounds and each ratio is the median of per-round ratios, so a
noisy neighbour slows both sides of a ratio alike.

    python benchmarks/overhead.py                 # every model, 5 rounds, one thread
    python benchmarks/overhead.py --quick         # 3 rounds, no peers on the real models: a few minutes
    python benchmarks/overhead.py --models tutorial resnet_cnn --rounds 3
    python benchmarks/overhead.py --models wide --variants gradflow --rounds 9   # bare is always timed
    python benchmarks/overhead.py --clock cpu     # CPU time: steadier on a machine shared with other jobs
    python benchmarks/overhead.py --device cuda   # on a GPU (wall clock; each round synchronised)
    python benchmarks/overhead.py --clock cpu --malloc fixed   # glibc's heap thresholds fixed for every variant
    python benchmarks/overhead.py --models tutorial --clock cpu --processes 7   # the median of 7 fresh processes

``--processes N`` runs the whole benchmark in N fresh processes, one after the other, and prints
each ratio's median over them with its range. Each process lays out its heap, its hash seeds and
its code anew, and on this project's 2-core machine that alone moved the tutorial's ratio by up to
2% between processes (1.28x-1.32x for one commit, docs/benchmarks.md), more than a change worth
measuring; the interleaved rounds inside one process cannot average it out.

``--malloc fixed`` re-runs the benchmark with glibc's trim and mmap thresholds fixed
(``FIXED_MALLOC``), for the bare loop and every variant alike. With glibc's defaults a large
gradient freed by ``zero_grad(set_to_none=True)`` at the top of the heap is returned to the OS
and faulted back in by the next backward, in one variant and not another, by the luck of where
the heap's blocks fell: on the wide MLP that moved a ratio by up to 6% from run to run
(docs/benchmarks.md, "Large-tensor path"). Each variant's minor page faults per step are printed
beside its time, so a ratio that paid for them shows it.

The real-model shapes (issue 15, ``benchmarks/shapes.py``: the zoo's models) step on one fixed batch and close a
monitor window every 10 steps. ``gradflow/no-activations`` is the monitor without activation
taps; ``gradflow`` is the default monitor (gradients every step, activations every 10th step)
and ``gradflow/activations-every-step`` taps activations at every step too (``activations_every=1``);
``gradflow/no-through-time`` leaves out the recurrent layers' gradient-through-time profile
(``through_time=False``), so gradflow / gradflow/no-through-time is that profile's cost.
``first-nonfinite`` is the first-non-finite part alone (``gradflow/monitor/nonfinite.py``):
``--variants first-nonfinite`` gives its cost on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gradflow import GradientMonitor  # noqa: E402
from gradflow.monitor.nonfinite import FirstNonFinite  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import shapes  # noqa: E402
from shapes import SHAPES  # noqa: E402


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    batch: int
    epochs: int            # per timed round; one monitor write per epoch
    loss: Callable = nn.functional.binary_cross_entropy_with_logits
    repeat: int = 0        # > 0: ``inputs`` is one batch, stepped on ``repeat`` times an epoch


def tutorial_mlp() -> Workload:
    """The tutorial's deep MLP: five Dense(5, relu) layers and a sigmoid output, batch 32."""
    layers, size = OrderedDict(), 2
    for i in range(1, 6):
        layers[f"dense_{i}"], layers[f"relu_{i}"], size = nn.Linear(size, 5), nn.ReLU(), 5
    layers["dense_6"] = nn.Linear(size, 1)
    x = torch.rand(500, 2) * 2 - 1
    return Workload("tutorial deep MLP (5 x 5, batch 32)", nn.Sequential(layers), x,
                    (x.norm(dim=1, keepdim=True) > 0.7).float(), 32, 20)


def wide_mlp() -> Workload:
    """``shapes.wide_mlp``: six hidden layers of 1024 ReLU units at batch 256, an epoch of 32 batches."""
    model, x, y, loss = shapes.wide_mlp(256 * 32)
    return Workload("wide MLP (6 x 1024, batch 256)", model, x, y, 256, 1, loss)


WINDOW = 10  # steps per monitor window on the real-model shapes (issue 15 logs every 10 steps)

DESCRIPTIONS = {
    "resnet_cnn": "ResNet-style CNN (BatchNorm, 4 blocks, 64-128 ch, 32 x 16x16)",
    "transformer_lm": "transformer LM (TransformerEncoder 4 x 256, 8 x 64 tokens)",
    "lstm_lm": "LSTM LM (2 x 256, 16 x 64 tokens)",
    "resnet18": "resnet18 (11.2 M, 16 x 64x64 images)",
    "nanogpt": "nanoGPT (4 x 128, 8 x 64 characters)",
}


def real_model(name: str, windows: int = 1) -> Workload:
    """A shape of ``benchmarks/shapes.py``: one batch, ``windows`` windows of WINDOW steps a round."""
    model, inputs, targets, loss = SHAPES[name]()
    return Workload(DESCRIPTIONS[name], model, inputs, targets, len(inputs), windows, loss, WINDOW)


def _batches(work: Workload):
    if work.repeat:
        for _ in range(work.repeat):
            yield work.inputs, work.targets
        return
    order = torch.randperm(len(work.inputs))
    for first in range(0, len(work.inputs), work.batch):
        index = order[first:first + work.batch]
        yield work.inputs[index], work.targets[index]


CLOCK = time.perf_counter   # --clock cpu: time.process_time
# --malloc fixed: no trimming of the heap's top, and blocks up to 32 MB from the heap (glibc tunables)
FIXED_MALLOC = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=33554432"


def _faults() -> int:
    """This process's minor page faults so far (a block glibc gave back and the next step took again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a CUDA step's time is when its work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(work: Workload, device: str) -> Workload:
    """``work`` with its model and batches on ``device`` (``--device``)."""
    return dataclasses.replace(work, model=work.model.to(device), inputs=work.inputs.to(device),
                               targets=work.targets.to(device))


def train(work: Workload, model: nn.Module, optimizer, on_step=None, on_epoch=None) -> float:
    """Seconds for ``work.epochs`` epochs of a plain loop (on CLOCK; a CUDA device is synchronised
    before and after, so the time covers the work, not its queueing)."""
    device = work.inputs.device
    _synchronize(device)
    start = CLOCK()
    for epoch in range(work.epochs):
        for inputs, targets in _batches(work):
            optimizer.zero_grad(set_to_none=True)
            loss = work.loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
        if on_epoch is not None:
            on_epoch(epoch)
    _synchronize(device)
    return CLOCK() - start


def variants(logdir: str):
    """name -> a context manager that instruments a model and yields (on_step, on_epoch)."""

    @contextlib.contextmanager
    def bare(model):
        yield None, None

    @contextlib.contextmanager
    def gradflow(model):
        with SummaryWriter(os.path.join(logdir, "gradflow")) as writer, GradientMonitor(model, writer) as monitor:
            yield None, monitor.log

    @contextlib.contextmanager
    def gradflow_no_activations(model):
        with (SummaryWriter(os.path.join(logdir, "gradflow-no-activations")) as writer,
              GradientMonitor(model, writer, activations=False) as monitor):
            yield None, monitor.log

    @contextlib.contextmanager
    def gradflow_no_through_time(model):
        """The default monitor without the gradient-through-time profile of recurrent layers."""
        with (SummaryWriter(os.path.join(logdir, "gradflow-no-through-time")) as writer,
              GradientMonitor(model, writer, through_time=False) as monitor):
            yield None, monitor.log

    @contextlib.contextmanager
    def gradflow_activations_every_step(model):
        """The default monitor with activations tapped at every step (``activations_every=1``)."""
        with (SummaryWriter(os.path.join(logdir, "gradflow-activations-every-step")) as writer,
              GradientMonitor(model, writer, activations_every=1) as monitor):
            yield None, monitor.log

    @contextlib.contextmanager
    def first_nonfinite(model):
        """The first-non-finite part on its own (issue 24): its forward and tensor hooks, one fold
        per step (the optimizer step pre-hook), one read per window."""
        part = FirstNonFinite(model, next(model.parameters()).device)
        part.hook(model)
        handle = register_optimizer_step_pre_hook(lambda *a: part.record())

        def close(epoch):
            part.read_now()
            part.reset()
        try:
            yield None, close
        finally:
            handle.remove()
            part.remove()

    @contextlib.contextmanager
    def add_histogram_per_step(model):
        with SummaryWriter(os.path.join(logdir, "by-hand")) as writer:
            step = [0]

            def on_step():
                for name, p in model.named_parameters():
                    writer.add_histogram(f"grad/{name}", p.grad, step[0])
                step[0] += 1
            yield on_step, None

    found = {"bare": bare, "gradflow": gradflow, "gradflow/no-activations": gradflow_no_activations,
             "gradflow/activations-every-step": gradflow_activations_every_step,
             "first-nonfinite": first_nonfinite, "gradflow/no-through-time": gradflow_no_through_time,
             "add_histogram/step": add_histogram_per_step}
    try:
        import wandb
    except ImportError:
        return found

    @contextlib.contextmanager
    def wandb_watch(model):
        run = wandb.init(mode="offline", dir=logdir, project="gradflow-overhead", reinit=True)
        wandb.watch(model, log="gradients", log_freq=1)
        try:
            yield (lambda: wandb.log({})), None
        finally:
            wandb.unwatch(model)
            run.finish()

    os.environ.setdefault("WANDB_SILENT", "true")
    found["wandb.watch"] = wandb_watch
    return found


def measure(work: Workload, rounds: int, wanted: list[str] | None = None) -> dict[str, float]:
    """Median over rounds of (variant time / bare time) measured in the same round.

    Each variant trains its own copy of the model, instrumented once for the whole
    measurement (as in a real run), so set-up costs are not timed; the rounds interleave the
    variants so that a noisy neighbour slows both sides of a ratio alike.
    """
    ratios: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as logdir, contextlib.ExitStack() as stack:
        runs = {}
        for name, make in variants(logdir).items():
            if wanted and name != "bare" and name not in wanted:
                continue
            model = copy.deepcopy(work.model)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            runs[name] = (model, optimizer, *stack.enter_context(make(model)))
        if "wandb.watch" in runs:                        # wandb keeps one run at a time: time it last
            runs["wandb.watch"] = runs.pop("wandb.watch")
        faults: dict[str, list[int]] = {}
        for round_ in range(rounds + 1):                 # the first round warms up and is dropped
            times = {}
            for name, run in runs.items():
                before = _faults()
                times[name] = train(work, *run)
                faults.setdefault(name, []).append(_faults() - before)
            if round_ == 0:
                # What set-up and the first calls left (imports, compiled kernels) is collected
                # now, not by a full collection that some variant's allocations would trigger.
                gc.collect()
            for name, value in times.items():
                ratios.setdefault(name, []).append(value / times["bare"])
                seconds.setdefault(name, []).append(value)
    steps = work.epochs * (work.repeat or -(-len(work.inputs) // work.batch))
    print(f"\n{work.name}: {steps} steps per round, {rounds} rounds")
    print(f"  {'variant':24s} {'ms/step':>9s} {'ratio to bare':>14s} {'page faults/step':>17s}")
    for name in runs:
        ms = statistics.median(seconds[name][1:]) / steps * 1e3
        print(f"  {name:24s} {ms:9.3f} {statistics.median(ratios[name][1:]):13.2f}x "
              f"{statistics.median(faults[name][1:]) / steps:17.1f}")
    return {name: statistics.median(r[1:]) for name, r in ratios.items()}


MODELS = ["tutorial", "wide", *SHAPES]
PEERS = ("add_histogram/step", "wandb.watch")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS, metavar="MODEL",
                        help=f"which models (default all: {' '.join(MODELS)})")
    parser.add_argument("--quick", action="store_true", help="3 rounds (the real-model shapes time peers only when --variants names them)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time, every thread (TensorBoard's "
                             "writer too), which time-sharing with other jobs does not inflate")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="time only these besides bare "
                        "(gradflow, gradflow/no-activations, add_histogram/step, wandb.watch)")
    parser.add_argument("--windows", type=int, default=1, help="monitor windows of 10 steps per round on the "
                        "real-model shapes (default 1); the through-time profile runs every 50th step, so time it "
                        "with --windows 5 (or a multiple): each round then holds one profiled step")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models train "
                        "(benchmarks/gpu.sh times them on a GPU)")
    parser.add_argument("--malloc", choices=["default", "fixed"], default="default",
                        help="fixed: glibc's trim and mmap thresholds fixed for every variant (FIXED_MALLOC), "
                             "so that no variant pays for a heap top given back and taken again")
    parser.add_argument("--processes", type=int, default=1, help="run the benchmark in N fresh processes, one "
                        "after the other, and print each ratio's median over them and its range (default 1)")
    parser.add_argument("--table-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be an int >= 1, got {args.processes}")
    if args.processes > 1:
        across_processes(args.processes, list(sys.argv[1:] if argv is None else argv))
        return
    if args.malloc == "fixed" and os.environ.get("GLIBC_TUNABLES") != FIXED_MALLOC:
        # glibc reads its tunables at start-up: run again with them set
        again = [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, again, {**os.environ, "GLIBC_TUNABLES": FIXED_MALLOC})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__})")
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    rounds = 3 if args.quick and args.rounds == 5 else args.rounds
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, device {where}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"malloc {args.malloc}, load average {os.getloadavg()[0]:.1f}")
    table = {}
    for name in args.models:
        work = tutorial_mlp() if name == "tutorial" else wide_mlp() if name == "wide" else real_model(name, args.windows)
        wanted = args.variants
        if wanted is None and name in SHAPES:      # a peer on resnet18 takes seconds a step: ask by name
            wanted = [v for v in variants("") if v not in PEERS]
        table[work.name] = measure(on_device(work, args.device), rounds, wanted)
    names = sorted({v for ratios in table.values() for v in ratios if v != "bare"},
                   key=lambda v: (v in PEERS, v))
    print(f"\nmonitored / bare, medians of {rounds} interleaved rounds ({args.clock} clock), "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(names, {model: [f"{ratios[v]:.2f}x" if v in ratios else "-" for v in names]
                        for model, ratios in table.items()})
    if args.table_json:
        print(TABLE_LINE + json.dumps(table))


TABLE_LINE = "table as JSON: "


def across_processes(count: int, given: list[str]) -> None:
    """The benchmark run with ``given`` (less ``--processes``) in ``count`` fresh processes in
    turn; each ratio's median over them, with its range."""
    args, skip = [], False
    for arg in given:
        if skip or arg == "--processes" or arg.startswith("--processes="):
            skip = arg == "--processes"
            continue
        args.append(arg)
    tables = []
    for k in range(count):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--table-json"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"process {k + 1} of {count} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        line = next(line for line in done.stdout.splitlines() if line.startswith(TABLE_LINE))
        tables.append(json.loads(line[len(TABLE_LINE):]))
        print(f"process {k + 1} of {count}: " + "; ".join(
            f"{model.split(' (')[0]} " + ", ".join(f"{v} {r:.3f}x" for v, r in ratios.items() if v != "bare")
            for model, ratios in tables[-1].items()), flush=True)
    names = sorted({v for table in tables for ratios in table.values() for v in ratios if v != "bare"},
                   key=lambda v: (v in PEERS, v))
    print(f"\nmonitored / bare, median over {count} processes (each the median of its interleaved rounds) "
          f"and the range, load average {os.getloadavg()[0]:.1f}")
    rows = {}
    for model in tables[0]:
        rows[model] = []
        for v in names:
            values = [table[model][v] for table in tables if v in table.get(model, {})]
            rows[model].append(f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"
                               if values else "-")
    print_table(names, rows)


def print_table(names: list[str], rows: dict[str, list[str]]) -> None:
    """A header of variant ``names``, then each model's row of cells, one per name."""
    print(f"  {'model':58s} " + " ".join(f"{v:>22s}" for v in names))
    for model, cells in rows.items():
        print(f"  {model:58s} " + " ".join(f"{cell:>22s}" for cell in cells))


if __name__ == "__main__":
    main()
