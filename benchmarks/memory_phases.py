"""Where the monitor's peak memory is: the live bytes of each phase of benchmarks/memory.py's
protocol, exactly, and the Python line at each phase's peak.

Peak RSS (``benchmarks/memory.py``) moves in 128 KB steps and follows where glibc places blocks,
so it says how much, not where. This runs the same child protocol (the warm-up, 3 plain steps,
then a monitor attached and 2 windows of 3 steps) with ``live_bytes.c`` preloaded: every
malloc-family block and private anonymous mapping is counted as it is made and freed, and the
peak is reset at each phase. A phase's ``peak`` is its highest live bytes over the plain steps'
peak (A, as in memory.py): the largest of them is the monitor's overhead in live bytes; ``at``
is where the peak was reached (``sys.setprofile``: the first Python event after it; with
``--stack``, the frames under it).

    python benchmarks/memory_phases.py                           # the rank-16 LoRA, glibc's defaults
    python benchmarks/memory_phases.py --model lora16 --allocator fine --stack
    python benchmarks/memory_phases.py --model lora16 --ideal    # one copy, no monitor
    python benchmarks/memory_phases.py --tensorboard             # the monitor writes to a SummaryWriter

Needs gcc (the interposer is built once into the temp directory) and glibc. Numpy and torch
tensors are counted to the byte; Python objects only when they need a new arena of CPython's
(1 MiB, mapped whole, touched page by page), so peak RSS can read more than these counts where
many Python objects are made (TensorBoard's histograms at log()).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "live_bytes.c")
MODELS = ("big", "lora", "lora16", "bf16", "tiny")     # memory.py's


def library() -> str:
    """The interposer, built from ``live_bytes.c`` into the temp directory unless already there."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"gradflow-live-bytes-{digest}.so")
    if not os.path.exists(path):
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", path + ".tmp", SOURCE, "-ldl"], check=True)
        os.replace(path + ".tmp", path)
    return path


def run(model_name: str, ideal: bool, stack: bool, tensorboard: bool) -> None:
    """The child: each phase's live-byte peak over A, and where it was reached."""
    sys.path.insert(0, HERE)
    import shutil

    import memory as M
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from gradflow.monitor import GradientMonitor

    live = ctypes.CDLL(os.environ["LD_PRELOAD"])
    live.gf_live.restype = live.gf_peak.restype = ctypes.c_long
    torch.set_num_threads(1)
    logdir = tempfile.mkdtemp(prefix="gradflow-memory-")
    writer = SummaryWriter(logdir) if tensorboard else None
    M.warm_up(writer)
    model, x = M.build(model_name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    peaks: dict[str, int] = {}

    def phase(label: str, fn) -> None:
        live.gf_reset_peak()
        best, where = [0], [""]

        def tracer(frame, event, arg):
            value = live.gf_peak()
            if value > best[0]:
                best[0] = value
                frames, f = [], frame
                while f is not None and len(frames) < (8 if stack else 1):
                    frames.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}")
                    f = f.f_back
                called = getattr(arg, "__qualname__", "") if event.startswith("c_") else ""
                where[0] = f"{event} {called} " + " <- ".join(frames)
        sys.setprofile(tracer)
        try:
            fn()
        finally:
            sys.setprofile(None)
        peaks[label] = live.gf_peak()
        base = peaks.get("A", peaks[label])
        print(f"  {label:14s} peak - A {(peaks[label] - base) / 1024:9.1f} KB  ({(peaks[label] - base) / trainable:5.3f}x)"
              f"   at {where[0]}", flush=True)

    phase("A", lambda: M.train(model, x, optimizer, 3))
    if ideal:
        kept = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        for window in range(2):
            for step in range(3):
                phase(f"w{window} step {step}", lambda: M.train(model, x, optimizer, 1))
        del kept
    else:
        made = {}
        phase("attach", lambda: made.setdefault("monitor", GradientMonitor(model, writer)))
        for window in range(2):
            for step in range(3):
                phase(f"w{window} step {step}", lambda: M.train(model, x, optimizer, 1))
            phase(f"w{window} log", lambda w=window: made["monitor"].log(w))
        made["monitor"].remove()
    if writer is not None:
        writer.close()
    shutil.rmtree(logdir, ignore_errors=True)
    worst = max(value for label, value in peaks.items() if label != "A") - peaks["A"]
    print(f"  overhead in live bytes: {worst / 2**20:.3f} MB = {worst / trainable:.3f}x the trainable {trainable / 2**20:.3f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="lora16")
    parser.add_argument("--allocator", choices=("default", "fine"), default="default",
                        help="glibc malloc settings (benchmarks/memory.py ALLOCATORS)")
    parser.add_argument("--ideal", action="store_true", help="no monitor: one copy of the trainable weights kept")
    parser.add_argument("--stack", action="store_true", help="the Python frames at each phase's peak")
    parser.add_argument("--tensorboard", action="store_true", help="the monitor writes to a SummaryWriter")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.model, args.ideal, args.stack, args.tensorboard)
        return
    sys.path.insert(0, HERE)
    from memory import child_env

    env = child_env(args.allocator)
    env["LD_PRELOAD"] = library()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")]))
    print(f"{args.model}, allocator {args.allocator}, {'one copy (no monitor)' if args.ideal else 'monitor'}: "
          "live bytes (malloc blocks + anonymous mappings), each phase's peak over A (the plain steps' peak)")
    subprocess.run([sys.executable, __file__, "--child", "--model", args.model] + ["--ideal"] * args.ideal
                   + ["--stack"] * args.stack + ["--tensorboard"] * args.tensorboard, env=env, check=True)


if __name__ == "__main__":
    main()
