"""Two versions of gradflow on one of ``overhead.py``'s models, interleaved in one process: an
A/B that holds on a shared machine.

Run one after the other, two versions of ``overhead.py`` differ by as much as the load moves
between the runs (1.31x and 1.33x for the same commit, minutes apart, at load 2.5). Here each
version is copied out of git as a package of its own (``gradflow`` renamed in its imports), both
monitor a copy of the same model beside a bare one, and the three loops take turns round by
round, by process CPU time: the load slows all three alike.

    python benchmarks/ab_commits.py 07806f4              # that commit against the working tree
    python benchmarks/ab_commits.py 07806f4 HEAD --rounds 31
    python benchmarks/ab_commits.py 07806f4 --model nanogpt --rounds 9     # a model of shapes.py

Each package registers its own process-wide optimizer hooks, which see every optimizer's step:
the bare loop and each monitored loop also pay the other version's check that an optimizer is
not its own (a few microseconds a step), so the ratios read a little lower than
``overhead.py``'s. The quotient of the two versions is what this measures.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402
from tutorial_parts import epochs  # noqa: E402


def export(rev: str | None, name: str, into: Path) -> str:
    """Copy gradflow at ``rev`` (None: the working tree) to ``into/name`` with its imports renamed."""
    target = into / name
    if rev is None:
        source = ROOT / "gradflow"
        files = [p.relative_to(source) for p in source.rglob("*.py")]
        texts = {f: (source / f).read_text() for f in files}
    else:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "gradflow"],
                                 check=True, capture_output=True, text=True).stdout.split()
        texts = {Path(f).relative_to("gradflow"): subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{f}"], check=True, capture_output=True, text=True).stdout
            for f in listing if f.endswith(".py")}
    for relative, text in texts.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(re.sub(r"\bgradflow\b", name, text))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a git revision")
    parser.add_argument("new", nargs="?", default=None, help="a git revision (default: the working tree)")
    parser.add_argument("--model", default="tutorial", choices=["tutorial", *overhead.SHAPES])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--epochs", type=int, default=None,
                        help="windows per loop and round (default: 20 epochs of the tutorial, one window of another model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        packages = Path(tmp) / "packages"
        sys.path.insert(0, str(packages))
        names = [export(args.base, "gradflow_a", packages), export(args.new, "gradflow_b", packages)]
        work = overhead.tutorial_mlp() if args.model == "tutorial" else overhead.real_model(args.model)
        batches = list(overhead._batches(work)) if work.repeat else [
            (work.inputs[b:b + work.batch], work.targets[b:b + work.batch]) for b in range(0, len(work.inputs), work.batch)]
        count = args.epochs or (20 if args.model == "tutorial" else 1)
        runs = {}
        for variant in ("bare", *names):
            model = copy.deepcopy(work.model)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            monitor = None if variant == "bare" else importlib.import_module(variant).GradientMonitor(
                model, SummaryWriter(os.path.join(tmp, variant)))
            runs[variant] = (model, optimizer, monitor)
        for run in runs.values():
            epochs(run, batches, 3 if args.model == "tutorial" else 1, work.loss)     # warm-up
        times: dict[str, list[float]] = {variant: [] for variant in runs}
        for i in range(args.rounds):
            for variant in (list(runs) if i % 2 == 0 else list(reversed(runs))):
                times[variant].append(epochs(runs[variant], batches, count, work.loss))
        for _, _, monitor in runs.values():
            if monitor is not None:
                monitor.remove()
    labels = {"bare": "bare", names[0]: args.base, names[1]: args.new or "working tree"}
    print(f"{work.name}, {args.rounds} rounds of {count} windows of {len(batches)} steps (process CPU time), "
          f"load average {os.getloadavg()[0]:.1f}")
    for variant in runs:
        ratio = statistics.median(t / b for t, b in zip(times[variant], times["bare"]))
        print(f"  {labels[variant]:14s} {statistics.median(times[variant]) * 1e6:7.1f} us/step   {ratio:.3f}x")
    quotient = statistics.median(b / a for a, b in zip(times[names[0]], times[names[1]]))
    print(f"  {labels[names[1]]} / {labels[names[0]]}: {quotient:.3f}")


if __name__ == "__main__":
    main()
