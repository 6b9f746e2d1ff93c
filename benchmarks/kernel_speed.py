"""The fused CPU kernels (``gradflow/monitor/kernels.py``) in ns per float32 value, before and after.

Loads the kernels of an earlier commit (``--before``, by default 5508c68: the last one before
issue 20's faster kernels) from git beside this checkout's, and times both in the same rounds,
interleaved; each figure is the fastest of ``--rounds`` runs (the least disturbed by other jobs
on a shared machine), and the last column is after / before.

    python benchmarks/kernel_speed.py                  # every case, 7 rounds
    python benchmarks/kernel_speed.py --rounds 15 --before main

The cases: ``fold`` of a 1M-value Gaussian gradient held in the cache, of six 1M-value ones
that are not (a 256 MB buffer is written between rounds, as a backward pass would push a
gradient out), of an all-zero one (a dead ReLU layer: every value in one bin), of one with half
its values zero (a ReLU layer's output: zeros in every block), and with a band;
``_block_moments`` and the histogram alone on one 4096-value block in L1, called 2000 times from
compiled code (a call from Python costs about as much as the block); ``fold_rows`` over rows of
100 and of 5000 values, of 1500 zeros, and of 500 values half zeros; ``fold_weights`` of a 1M-value weight against its start, and
with the weight then made the next window's start (a copy after the fold, or in its pass: ``renew``).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from numba import njit

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from gradflow.monitor import kernels as after  # noqa: E402

BLOCK_REPEATS = 2000


def load_before(ref: str, directory: str):
    """The kernels module as committed at ``ref``, imported from a copy in ``directory``."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:gradflow/monitor/kernels.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(directory, "kernels_before.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("kernels_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@njit(nogil=True, boundscheck=False)
def _repeat_moments(moments, block, repeats):
    bits = block.view(np.int32)
    total = 0.0
    for _ in range(repeats):
        t, a, s, b, m = moments(block, bits, np.float32(0.0), np.float32(np.inf))
        total += t + a + s + b + m
    return total


@njit(nogil=True, boundscheck=False)
def _repeat_counts_four(counts, block, sub, repeats):
    """The kernels before: four separate uint32 histograms."""
    unsigned = block.view(np.uint32)
    for _ in range(repeats):
        counts(unsigned, sub[0], sub[1], sub[2], sub[3])


@njit(nogil=True, boundscheck=False)
def _repeat_counts(counts, block, sub, repeats):
    """The kernels after: one padded buffer of sub-histograms (nothing after the block to prefetch)."""
    unsigned = block.view(np.uint32)
    for _ in range(repeats):
        counts(unsigned, sub, unsigned, None, 0, 0)


def block_kernels(kernels, block: np.ndarray) -> tuple[Callable[[], object], Callable[[], object]]:
    """Run _block_moments, and the block histogram, BLOCK_REPEATS times on ``block``."""
    moments = lambda: _repeat_moments(kernels._block_moments, block, BLOCK_REPEATS)  # noqa: E731
    if hasattr(kernels, "_new_sub"):
        sub = kernels._new_sub()
        return moments, lambda: _repeat_counts(kernels._block_counts, block, sub, BLOCK_REPEATS)
    sub = np.zeros((4, 512), np.uint32)
    return moments, lambda: _repeat_counts_four(kernels._block_counts, block, sub, BLOCK_REPEATS)


def cases(kernels, data: dict) -> dict[str, tuple[Callable[[], object], int, Callable[[], None] | None]]:
    """name -> (run, values per run, what to do before each run)."""
    counts = np.zeros((64, 512), np.int64)
    block = data["hot"][:4096].copy()
    cold = data["cold"]
    rows_short = np.full(data["hot"].size // 100, 100)
    rows_long = np.full(data["hot"].size // 5000, 5000)
    rows_middle = np.full(data["hot"].size // 1500, 1500)
    rows_half = np.full(data["hot"].size // 500, 500)
    slots = np.zeros(rows_short.size, np.int64)

    def scrub() -> None:
        data["scrub"][::16] += 1.0

    hot, zeros = data["hot"], data["zeros"]
    moments, histogram = block_kernels(kernels, block)
    unhistogrammed = {}
    if "tallies" in inspect.signature(kernels.fold_all).parameters:   # a tree with steps folded without the histogram
        # (where --before has none, its side runs the full fold of the same values: BASELINE)
        unhistogrammed = {
            "fold without histogram, 1M in cache": (lambda: kernels.fold_all([(hot, None, 0.0, np.inf)]), hot.size, None),
            "fold without histogram, 6 x 1M not in cache": (
                lambda: kernels.fold_all([(g, None, 0.0, np.inf) for g in cold]), 6 * hot.size, scrub),
        }
    return {
        "fold, 1M in cache": (lambda: kernels.fold(hot, counts[0]), hot.size, None),
        "fold, 6 x 1M not in cache": (lambda: [kernels.fold(g, counts[0]) for g in cold], 6 * hot.size, scrub),
        **unhistogrammed,
        "fold, 1M zeros": (lambda: kernels.fold(zeros, counts[0]), zeros.size, None),
        "fold, 1M half zeros": (lambda: kernels.fold(data["half"], counts[0]), zeros.size, None),
        "fold, 1M with a band": (lambda: kernels.fold(hot, counts[0], centre=0.0, threshold=1e-3), hot.size, None),
        "_block_moments, 4096 in L1": (moments, BLOCK_REPEATS * block.size, None),
        "histogram, 4096 in L1": (histogram, BLOCK_REPEATS * block.size, None),
        "fold_rows, rows of 100": (lambda: kernels.fold_rows(hot[:rows_short.sum()], rows_short, slots[:rows_short.size],
                                                             counts), rows_short.sum(), None),
        "fold_rows, rows of 5000": (lambda: kernels.fold_rows(hot[:rows_long.sum()], rows_long, slots[:rows_long.size],
                                                              counts), rows_long.sum(), None),
        "fold_rows, rows of 1500 zeros": (lambda: kernels.fold_rows(zeros[:rows_middle.sum()], rows_middle,
                                                                    slots[:rows_middle.size], counts),
                                          rows_middle.sum(), None),
        "fold_rows, rows of 500 half zeros": (lambda: kernels.fold_rows(data["half"][:rows_half.sum()], rows_half,
                                                                        slots[:rows_half.size], counts),
                                              rows_half.sum(), None),
        "fold_weights, 1M": (lambda: kernels.fold_weights(hot, data["start"], np.array([hot.size])), hot.size, None),
        "weights + next start, 1M": (lambda: next_start(kernels, hot, data["next"]), hot.size, None),
    }


def next_start(kernels, values: np.ndarray, start: np.ndarray) -> None:
    """What a window's weight summary does per parameter: fold against the start, then make the
    weights the next window's start (in the fold's own pass where the kernels can: ``renew``)."""
    if "renew" in inspect.signature(kernels.fold_weights).parameters:
        kernels.fold_weights(values, start, np.array([values.size]), renew=True)
    else:
        kernels.fold_weights(values, start, np.array([values.size]))
        np.copyto(start, values)


def time_once(run: Callable[[], object], prepare: Callable[[], None] | None) -> float:
    if prepare is not None:
        prepare()
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


# A case that --before's kernels may lack, and the case its side runs instead.
BASELINE = {"fold without histogram, 1M in cache": "fold, 1M in cache",
            "fold without histogram, 6 x 1M not in cache": "fold, 6 x 1M not in cache"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="5508c68", help="git ref of the kernels to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = 1 << 20
    data = {"hot": (rng.standard_normal(n) * 1e-3).astype(np.float32),
            "cold": [(rng.standard_normal(n) * 1e-3).astype(np.float32) for _ in range(6)],
            "zeros": np.zeros(n, np.float32), "scrub": np.zeros(64 << 20, np.float32)}
    data["half"] = np.where(rng.random(n) < 0.5, data["hot"], np.float32(0.0))   # a ReLU layer's gradient
    data["start"] = data["hot"] + (rng.standard_normal(n) * 1e-5).astype(np.float32)
    data["next"] = data["start"].copy()
    with tempfile.TemporaryDirectory() as directory:
        before = load_before(args.before, directory)
        sides = {"before": cases(before, data), "after": cases(after, data)}
        for side in sides.values():                 # compile, and fill the caches
            for run, _, _ in side.values():
                run()
        best = {(side, name): float("inf") for side in sides for name in sides["after"]}
        for round_ in range(args.rounds):
            for name in sides["after"]:
                for side in sorted(sides, reverse=round_ % 2 == 1):      # each side first in turn
                    run, values, prepare = sides[side].get(name) or sides[side][BASELINE[name]]
                    best[side, name] = min(best[side, name], time_once(run, prepare) / values * 1e9)
    print(f"ns per float32 value, fastest of {args.rounds} interleaved rounds; before = {args.before}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  {'case':32s} {'before':>8s} {'after':>8s}  after/before")
    for name in sides["after"]:
        b, a = best["before", name], best["after", name]
        print(f"  {name:32s} {b:8.3f} {a:8.3f}  {a / b:11.2f}x")


if __name__ == "__main__":
    main()
