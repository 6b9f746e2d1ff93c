"""``gradflow train CONFIG --seeds 0-9``: one config over many seeds, as one batched run (or a few,
one per process), one run directory per seed under a new parent directory, and a results table.

Example:
    >>> cfg = load_config("configs/deep_relu.yaml", ["train.epochs=2"])        # doctest: +SKIP
    >>> outcome = train_seeds(cfg, [0, 1, 2], "runs")                           # doctest: +SKIP
    >>> print(seeds_report(outcome.rows))                                       # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradflow.experiments.batched import train_members
from gradflow.experiments.config import Config, to_dict
from gradflow.experiments.rundir import create_unique_dir
from gradflow.experiments.sweeps.executors import LocalExecutor, check_workers
from gradflow.experiments.sweeps.grid import seed_text
from gradflow.experiments.sweeps.results import RESULTS_FILE, append_rows, result_row
from gradflow.experiments.sweeps.runner import make_run_dir


@dataclass
class SeedsOutcome:
    """What ``train_seeds`` wrote: the parent directory, one results row and one summary per seed."""

    directory: Path
    rows: list[dict[str, str]]
    summaries: list[dict[str, Any]]


def train_seeds(cfg: Config, seeds: list[int], logdir: str | Path, *, device: str = "cpu",
                workers: int | None = None, threads: int = 1, progress: bool | None = None) -> SeedsOutcome:
    """Train ``seeds`` of ``cfg`` into ``logdir/<name>-<time>-seeds<seeds>/<name>-seed<N>``.

    One GPU trains every seed in one batched model; on the CPU the seeds are split over
    ``workers`` processes (default: the CPU count), each training its share as one batched model.
    """
    workers = min(len(seeds), check_workers(workers) if workers is not None or device == "cpu" else 1)
    parent = create_unique_dir(Path(logdir), f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-seeds{seed_text(seeds)}")
    run_dirs = [parent / make_run_dir(parent, cfg.name, seed) for seed in seeds]
    if workers == 1:
        torch.set_num_threads(threads)  # tiny models: more threads only cost
        summaries = train_members(cfg, seeds, run_dirs, device=device, progress=progress)
    else:
        if progress is not False:
            print(f"training {len(seeds)} seeds in {workers} processes ...", file=sys.stderr, flush=True)
        summaries = train_seeds_in_workers(cfg, seeds, run_dirs, device, workers, threads)
    rows = [result_row({}, seed, str(d.relative_to(parent)), s) for seed, d, s in zip(seeds, run_dirs, summaries)]
    append_rows(parent / RESULTS_FILE, [], rows)
    return SeedsOutcome(parent, [{k: str(v) for k, v in row.items()} for row in rows], summaries)


def train_seeds_in_workers(cfg: Config, seeds: list[int], run_dirs: list[Path], device: str, workers: int,
                           threads: int) -> list[dict[str, Any]]:
    """The seeds split into ``workers`` contiguous shares, each trained as one batched model in
    its own process: the training batches within a process, and each process's per-window
    recording (histograms, TensorBoard events, tables) runs on its own core."""
    size = math.ceil(len(seeds) / workers)
    shares = [range(start, min(start + size, len(seeds))) for start in range(0, len(seeds), size)]
    jobs = [(to_dict(cfg), [seeds[i] for i in share], [str(run_dirs[i]) for i in share], device, threads)
            for share in shares]
    done: dict[int, list[dict[str, Any]]] = {}
    LocalExecutor(len(jobs)).map(jobs, done.__setitem__)
    return [summary for i in range(len(jobs)) for summary in done[i]]
