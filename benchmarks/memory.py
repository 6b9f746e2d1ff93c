"""What the monitor adds to a training process's peak memory, as a multiple of the trainable
parameters' bytes (issue 20's target: at most 1.1x: one copy of the trainable weights for the
update ratios, nothing per frozen weight).

Each figure comes from fresh child processes (the median of ``--repeats``): the monitor's code
paths are warmed on a small model first (imports, numba's kernels, each reduction path once:
one-time costs any process pays once), then the model trains a few plain steps (peak RSS A),
then a few monitored steps with two windows logged (peak RSS B). The overhead is B - A: what
the monitor's buffers and temporaries added to the peak, with the interpreter, torch, the
model, its gradients and the optimizer already counted in A. Beside it:

- ``one copy``: the same protocol with no monitor, a copy of the trainable weights kept through
  the steps instead: the one copy issue 20 allows, placed by the same allocator.
- ``held``: what the monitor holds, exactly: every tensor and numpy array reachable from it,
  the model's own parameters and gradients left out (``gradflow/monitor/footprint.py``), the
  most after any step or log of a second, unmeasured run; and the Python bytes (tracemalloc)
  one more window adds to ``history`` once it is compact (``compact.RECENT`` windows old, averaged
  over ``HISTORY_WINDOWS``), which keeps up to ``history_length`` of them.
- ``tiny``: an 8-8-1 MLP (388 trainable bytes): what is left is the fixed part (the monitor's
  objects, a window of history), no ratio.

Each model is measured under each of ``ALLOCATORS``, set alike in both children of a row:
glibc's defaults, where peak RSS moves in heap steps of 128 KB and up (the dynamic mmap
threshold, the 128 KB top pad: a block placed between the training loop's own blocks makes the
heap grow by theirs), and ``fine`` (a fixed 16 KB mmap threshold, no top pad), where it follows
the live blocks. Neither removes the kernel's own step: Linux counts RSS in per-CPU batches (32
pages on machines of up to 16 CPUs), so ``ru_maxrss`` moves 128 KB at a time (measured on 2 CPUs,
docs/memory.md): each figure is good to about 0.125 MB.

Hence a third kind of row, ``live`` (glibc's defaults, with ``live_bytes.c`` preloaded; needs gcc):
the same protocol with peak *live bytes* in place of peak RSS, every malloc block and anonymous
mapping counted as it is made and freed (``PYTHONMALLOC=malloc``: Python's objects included, one
by one), so A and B are exact to the byte. Its ``net`` column is the overhead less the tiny MLP's (measured in the same run): the
monitor's fixed cost (its Python objects, a window of history, a few KB of counts) taken out,
what is left per trainable byte.

    python benchmarks/memory.py                        # every model, both allocators, 3 processes per figure
    python benchmarks/memory.py --models lora lora16 --repeats 5 --allocators fine
    python benchmarks/memory.py --tensorboard          # the monitor writes to a SummaryWriter
    python benchmarks/memory.py --allocators live --repeats 1   # exact live bytes only (deterministic)

Models: ``big``, an MLP whose middle Linear has a 10000 x 5000 weight (50M elements, 200 MB);
``lora``, a frozen 4096 x 4096 Linear base (64 MB, requires_grad False) with a rank-8 LoRA
adapter (65,536 trainable elements, 256 KB): the frozen base must cost nothing; ``lora16``, six
such bases with rank-16 adapters and GELUs between them (3 MB trainable, 384 MB frozen): a LoRA
whose trainable bytes are many ruler steps; ``bf16``, an MLP of two 1024 x 1024 bfloat16 weights
(4 MB): its gradients are converted to float32 a piece at a time, not whole; ``tiny``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gradflow.monitor import GradientMonitor  # noqa: E402 - after the path
from gradflow.monitor.compact import RECENT  # noqa: E402

MODELS = ("big", "lora", "lora16", "bf16", "tiny")
LORA16_LAYERS = 6
HISTORY_LENGTH = inspect.signature(GradientMonitor).parameters["history_length"].default
HISTORY_WINDOWS = 8      # windows whose growth of history is averaged
# glibc malloc settings each child starts with (both children of a row alike; any MALLOC_* or
# GLIBC_TUNABLES of the calling shell is dropped). "fine": a fixed mmap threshold of 16 KiB (no
# dynamic threshold: every block of 16 KiB or more has its own mapping, given back when freed)
# and no top pad (the heap grows by what is asked, not 128 KiB more), so that peak RSS follows
# the live blocks to the page instead of moving in 128 KiB heap steps.
# "live": glibc's defaults, peak live bytes read from the preloaded live_bytes.c instead of peak RSS.
# PYTHONMALLOC=malloc: Python's objects are malloc blocks too, counted one by one (pymalloc maps
# 1 MiB arenas, which the interposer would count whole, when one is first needed).
ALLOCATORS = {"default": {}, "fine": {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TOP_PAD_": "0"},
              "live": {"PYTHONMALLOC": "malloc"}}


class LoRALinear(nn.Module):
    """y = base(x) + x A^T B^T, the base frozen (Hu et al. 2021, rank ``rank``)."""

    def __init__(self, features: int, rank: int = 8) -> None:
        super().__init__()
        self.base = nn.Linear(features, features, bias=False)
        self.base.weight.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, features) * 0.01)
        self.b = nn.Parameter(torch.zeros(features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "big":
        return nn.Sequential(nn.Linear(64, 5000), nn.ReLU(), nn.Linear(5000, 10000), nn.ReLU(),
                             nn.Linear(10000, 1)), torch.randn(8, 64)
    if name == "tiny":
        return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 1)), torch.randn(8, 8)
    if name == "bf16":
        return (nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1))
                .to(torch.bfloat16), torch.randn(8, 1024, dtype=torch.bfloat16))
    if name == "lora16":
        layers = [module for _ in range(LORA16_LAYERS) for module in (LoRALinear(4096, rank=16), nn.GELU())]
        return nn.Sequential(*layers, nn.Linear(4096, 1)), torch.randn(8, 4096)
    return nn.Sequential(LoRALinear(4096), nn.GELU(), nn.Linear(4096, 1)), torch.randn(8, 4096)


def _live_bytes():
    """The preloaded ``live_bytes.c`` (``--allocators live``), or None: peak RSS is read."""
    import ctypes
    path = os.environ.get("LD_PRELOAD", "")
    if "gradflow-live-bytes" not in path:
        return None
    live = ctypes.CDLL(path)
    live.gf_live.restype = live.gf_peak.restype = ctypes.c_long
    return live


LIVE = _live_bytes() if "--child" in sys.argv else None


def peak_mib() -> float:
    """The peak since ``reset_peak``, in MiB: live bytes where preloaded, else peak RSS."""
    if LIVE is not None:
        return LIVE.gf_peak() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def train(model: nn.Module, x: torch.Tensor, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def warm_up(writer) -> None:
    """Runs each reduction path once (imports, numba's kernels, the code pages of numpy and torch
    they touch: one-time costs any process pays once): large gradients (70,000 x 2), small ones
    (copied and batched), a small bounded output (tanh), an output reduced at the forward's end
    (8,192 ReLU values), a frozen weight (the update ratios' path for parameters that never move:
    without it, the LoRA rows counted 128 KB of numpy's code, first run in their window), and the
    same large gradient in bfloat16 (converted a piece at a time: 0.5 MB of code pages in the
    bfloat16 row without it)."""
    warm = nn.Sequential(nn.Linear(70_000, 2), nn.Tanh(), nn.Linear(2, 4096), nn.ReLU(), nn.Linear(4096, 1),
                         nn.Linear(1, 1))
    warm[-1].weight.requires_grad_(False)
    half = nn.Sequential(nn.Linear(70_000, 2), nn.ReLU(), nn.Linear(2, 1)).to(torch.bfloat16)
    for model, x in ((warm, torch.randn(2, 70_000)), (half, torch.randn(2, 70_000, dtype=torch.bfloat16))):
        with GradientMonitor(model, writer, activations_every=1) as monitor:
            train(model, x, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01), 2)
            monitor.log(0)


def reset_peak() -> None:
    """Start the peak RSS afresh from the current RSS (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM, which ``ru_maxrss`` reads, checked on this machine's kernel 6.18): the warm-up's
    own peak must not hide part of the monitored one where the model is small (A would be the
    warm-up's peak, not the model's). Where it cannot be written, A may include the warm-up.
    With live bytes preloaded, their peak is reset instead."""
    if LIVE is not None:
        LIVE.gf_reset_peak()
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def file_backed_kib() -> int:
    """This process's resident pages mapped from files (code and data of its libraries), in KiB
    (Linux /proc/self/status RssFile): shared with every process that runs the same code, paid
    once, and counted in peak RSS all the same."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return 0


def child(name: str, ideal: bool, tensorboard: bool) -> dict:
    """Peak RSS before (A) and after (B) two monitored windows of ``name``; with ``ideal``, no
    monitor: one copy of the trainable weights is kept instead (what issue 20 allows). With
    ``tensorboard`` the monitor writes to a SummaryWriter (histograms built at each log)."""
    import gc
    import tempfile
    import tracemalloc

    from torch.utils.tensorboard import SummaryWriter

    from gradflow.monitor.footprint import held_bytes
    torch.set_num_threads(1)
    logdir = tempfile.mkdtemp(prefix="gradflow-memory-")
    writer = SummaryWriter(logdir) if tensorboard else None
    warm_up(writer)
    gc.collect()
    reset_peak()
    model, x = build(name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, x, optimizer, 3)
    bare, bare_files = peak_mib(), file_backed_kib()
    held = 0
    if ideal:
        kept = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        for _ in range(2):
            train(model, x, optimizer, 3)
        del kept
    else:
        with GradientMonitor(model, writer) as monitor:
            for window in range(2):
                train(model, x, optimizer, 3)
                monitor.log(window)
    monitored, code = peak_mib(), (file_backed_kib() - bare_files) / 1024
    history = 0
    if not ideal:                                 # what a monitor holds after each step and each log, exactly
        # A window's Python objects once history holds them in compact form (compact.RECENT windows
        # old): the growth over HISTORY_WINDOWS windows past the first RECENT + 1, all traced.
        marks: list[int] = []
        tracemalloc.start()
        with GradientMonitor(model) as monitor:
            for window in range(RECENT + 1 + HISTORY_WINDOWS):
                for _ in range(3):
                    train(model, x, optimizer, 1)
                    if window < 3:
                        held = max(held, held_bytes(monitor, model)[0])
                monitor.log(window)
                if window < 3:
                    held = max(held, held_bytes(monitor, model)[0])
                if window in (RECENT, RECENT + HISTORY_WINDOWS):
                    gc.collect()
                    marks.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        history = (marks[1] - marks[0]) / HISTORY_WINDOWS
    if writer is not None:
        writer.close()
    shutil.rmtree(logdir, ignore_errors=True)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"model": name, "bare_mib": bare, "monitored_mib": monitored, "trainable_mib": trainable / 2**20,
            "frozen_mib": frozen / 2**20, "held_mib": held / 2**20, "history_kib": history / 1024,
            "code_mib": code}


def child_env(allocator: str) -> dict[str, str]:
    """The environment of a child: this one's, its glibc malloc settings replaced by ``allocator``'s
    (``live``: the live-bytes interposer preloaded, built by ``memory_phases.library``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(ALLOCATORS[allocator])
    if allocator == "live":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from memory_phases import library
        env["LD_PRELOAD"] = library()
    return env


def measure(name: str, repeats: int, allocator: str = "default", tensorboard: bool = False) -> tuple[dict, dict]:
    """The monitored row and the one-copy row of ``name``, each overhead (MB) the median of
    ``repeats`` processes; the two kinds of process alternate, under the same ``allocator``."""
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(repeats):
        for ideal in (False, True):
            command = [sys.executable, __file__, "--child", name] + (["--ideal"] if ideal else []) + \
                (["--tensorboard"] if tensorboard else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=child_env(allocator))
            rows[ideal].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = []
    for ideal in (False, True):
        row = dict(rows[ideal][0])
        row["overhead"] = statistics.median(r["monitored_mib"] - r["bare_mib"] for r in rows[ideal])
        row["runs"] = [round(r["monitored_mib"] - r["bare_mib"], 3) for r in rows[ideal]]
        row["code"] = max(r["code_mib"] for r in rows[ideal])    # in the overhead, not the monitor's memory
        result.append(row)
    return result[0], result[1]


LABELS = {"big": "MLP with a 50M-element weight", "lora": "LoRA rank 8 on a frozen 4096x4096 base",
          "lora16": f"LoRA rank 16 on {LORA16_LAYERS} frozen 4096x4096 layers",
          "bf16": "bfloat16 MLP, two 1024x1024 weights", "tiny": "tiny 8-8-1 MLP (fixed costs)"}


def _ratio(mib: float, trainable: float) -> str:
    """mib / trainable; none for the tiny model (388 bytes): its figures are fixed costs."""
    return f"{mib / trainable:7.2f}x" if trainable >= 0.01 else f"{'-':>8s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="child processes per figure (median)")
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--ideal", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS),
                        default=[a for a in ALLOCATORS if a != "live" or shutil.which("gcc")],
                        help="glibc malloc settings of the children, a row each (default: all three, live where gcc "
                             "can build its interposer; see ALLOCATORS)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="the monitor writes to a SummaryWriter (warm-up included): histograms built at each log")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ideal, args.tensorboard)))
        return
    print(f"torch {torch.__version__}; peak RSS overhead (B - A) in MB (live rows: peak live bytes), each figure "
          f"the median of {args.repeats} fresh processes")
    print("  monitor: the default GradientMonitor; one copy: no monitor, a copy of the trainable weights kept instead")
    print("  (the one copy issue 20 allows, in the same allocator); held: the monitor's tensors and arrays, exactly,")
    print("  the most after any step or log (gradflow/monitor/footprint.py)")
    for allocator in args.allocators:
        print(f"  allocator {allocator}: {' '.join(f'{k}={v}' for k, v in ALLOCATORS[allocator].items()) or 'glibc defaults'}")
    print(f"  {'model':42s} {'malloc':>7s} {'trainable':>9s} {'frozen':>7s} {'monitor':>8s} {'x train':>8s} {'one copy':>9s} "
          f"{'x train':>8s} {'held':>7s} {'x train':>8s}")
    fixed = None                                  # the tiny MLP's live-bytes overhead: the fixed cost
    if "live" in args.allocators:
        fixed = measure("tiny", args.repeats, "live", args.tensorboard)[0]["overhead"]
        print(f"  fixed cost (live bytes, the tiny MLP's overhead): {fixed * 1024:.1f} KB; "
              "net: (monitor - fixed cost) / trainable", flush=True)
    for name in args.models:
        for allocator in args.allocators:
            row, ideal = measure(name, args.repeats, allocator, args.tensorboard)
            t = row["trainable_mib"]
            net = f"; net {(row['overhead'] - fixed) / t:.3f}x" if allocator == "live" and t >= 0.01 else ""
            print(f"  {LABELS[name]:42s} {allocator:>7s} {t:9.3f} {row['frozen_mib']:7.1f} "
                  f"{row['overhead']:8.3f} {_ratio(row['overhead'], t)} "
                  f"{ideal['overhead']:9.3f} {_ratio(ideal['overhead'], t)} {row['held_mib']:7.3f} {_ratio(row['held_mib'], t)}"
                  f"   runs: monitor {row['runs']}, one copy {ideal['runs']}{net}"
                  + (f"; code pages first run after A: up to {row['code']:.3f} MB" if row["code"] > 0 else ""),
                  flush=True)
        # Not in the peak above (two windows): each window history keeps, up to history_length of them.
        print(f"  {'':42s} history: {row['history_kib']:.1f} KB a window; at the default history_length "
              f"({HISTORY_LENGTH:,}) up to {row['history_kib'] * HISTORY_LENGTH / 1024:.0f} MB "
              f"({row['history_kib'] * HISTORY_LENGTH / 1024 / t:.1f}x train)" if t >= 0.01 else
              f"  {'':42s} history: {row['history_kib']:.1f} KB a window", flush=True)


if __name__ == "__main__":
    main()
