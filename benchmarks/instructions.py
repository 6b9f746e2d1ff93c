"""The monitor's cost on the tutorial's MLP in instructions, counted by valgrind: a figure that
load on a shared machine cannot move, beside the CPU-time ratios of ``overhead.py``.

Each variant runs ``overhead.py``'s tutorial loop (the deep ReLU MLP, batch 32, 16 steps an
epoch) in a child process under ``valgrind --tool=cachegrind --cache-sim=no``, once for
``--short`` and once for ``--long`` epochs; the difference over the extra steps is the
instructions per step, start-up (imports, numba's kernels) cancelled out. Valgrind counts every
thread's user-space instructions (the TensorBoard writer's included), not the kernel's. A first
run of each variant compiles numba's kernels for the CPU valgrind emulates (it hides AVX-512) into
numba's cache, so that both counted runs load them: a kernel compiled inside one of them adds
billions of instructions (numba recompiles whenever ``kernels.py`` changes).

    python benchmarks/instructions.py                 # bare, hooks only, the default monitor: about 15 minutes
    python benchmarks/instructions.py --variants bare monitor --short 2 --long 7

Variants: ``bare`` (no monitor), ``hooks`` (a monitor that records every step and never logs:
the step and forward hooks alone), ``monitor`` (the default monitor with a TensorBoard window per
epoch, as ``overhead.py`` times it), ``monitor/no-writer`` (the same, writer=None).

Measured 2026-12-05 at c2b6d8b (valgrind 3.19, torch 2.13.0 CPU): bare 2.360 M instructions a
step, hooks 2.765 M (1.17x), monitor 2.880 M (1.22x), monitor/no-writer 2.852 M (1.21x).
``overhead.py --clock cpu`` gives 1.41-1.48x for the same loop on this machine: the monitor's
instructions run at about half the bare loop's instructions per cycle (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

VARIANTS = ("bare", "hooks", "monitor", "monitor/no-writer")
STEPS_PER_EPOCH = 16                      # 500 samples, batch 32


def child(variant: str, epochs: int) -> None:
    """The tutorial loop of ``overhead.py`` for ``epochs`` epochs under ``variant`` (run under valgrind)."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, os.path.dirname(__file__))
    import overhead

    from gradflow import GradientMonitor
    torch.set_num_threads(1)
    work = overhead.tutorial_mlp()
    work.epochs = epochs
    optimizer = torch.optim.SGD(work.model.parameters(), lr=1e-3, momentum=0.9)
    if variant == "bare":
        overhead.train(work, work.model, optimizer)
        return
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir) if variant == "monitor" else None
        with GradientMonitor(work.model, writer) as monitor:
            overhead.train(work, work.model, optimizer, None, None if variant == "hooks" else monitor.log)
        if writer is not None:
            writer.close()


def instructions(variant: str, epochs: int) -> int:
    """User-space instructions of a whole child process (valgrind's ``I refs``)."""
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               sys.executable, os.path.abspath(__file__), "--child", variant, "--epochs", str(epochs)]
    out = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run of {variant} ({epochs} epochs) failed:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["bare", "hooks", "monitor"])
    parser.add_argument("--short", type=int, default=2, help="epochs of the shorter run (default 2)")
    parser.add_argument("--long", type=int, default=12, help="epochs of the longer run (default 12)")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at once (default 2)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.epochs)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("benchmarks/instructions.py needs valgrind (apt-get install valgrind)")
    if not 0 < args.short < args.long:
        raise SystemExit(f"--short must be at least 1 and below --long; got {args.short} and {args.long}")
    runs = [(v, e) for v in args.variants for e in (args.short, args.long)]
    with ThreadPoolExecutor(args.jobs) as pool:
        # numba's kernels compiled for valgrind's CPU and cached, each variant's own, before counting
        list(pool.map(lambda variant: instructions(variant, 1), [v for v in args.variants if v != "bare"]))
        counted = dict(zip(runs, pool.map(lambda run: instructions(*run), runs)))
    steps = (args.long - args.short) * STEPS_PER_EPOCH
    per_step = {v: (counted[v, args.long] - counted[v, args.short]) / steps for v in args.variants}
    for variant, count in per_step.items():
        if count <= 0:
            raise SystemExit(f"{variant}: the {args.long}-epoch run counted fewer instructions than the "
                             f"{args.short}-epoch one: something was compiled in the shorter run; run again")
    print(f"tutorial deep MLP (5 x 5, batch 32): instructions per step, valgrind, {steps} steps "
          f"({args.long} - {args.short} epochs)")
    for variant, count in per_step.items():
        ratio = f"{count / per_step['bare']:7.3f}x" if "bare" in per_step else ""
        print(f"  {variant:20s} {count / 1e6:8.3f} M  {ratio}")


if __name__ == "__main__":
    main()
