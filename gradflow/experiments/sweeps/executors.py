"""Where a sweep's tasks run: in this process, a pool of processes, or Ray.

A task is a plain function of plain data (``run_task``), so any executor can ship it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from gradflow.errors import ConfigError
from gradflow.monitor.model_checks import check_positive


def check_workers(workers: int | None) -> int:
    """``--workers``: None means the CPUs this process may use; else a positive int, or a ``ConfigError``."""
    if workers is None:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return check_positive("--workers", workers, "processes", error=ConfigError)



def run_task(config: dict[str, Any], seeds: list[int], run_dirs: list[str], device: str = "cpu",
             threads: int = 1) -> list[dict[str, Any]]:
    """Train one task's seeds as one batched model into ``run_dirs``; returns their summaries.

    A plain function of plain data, so that a process pool or Ray can ship it anywhere that
    can import gradflow and see the run directories.
    """
    import torch

    from gradflow.experiments.batched import train_members
    from gradflow.experiments.config import Config, build, validate

    torch.set_num_threads(threads)  # tiny models: one thread per process beats sharing cores
    cfg = validate(build(Config, config))
    return train_members(cfg, seeds, run_dirs, device=device)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _context():
    """fork where there is fork: the workers inherit the imported modules (torch, TensorBoard,
    matplotlib: seconds per process on a busy machine); PyTorch's DataLoader forks the same way."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    import torch._dynamo  # noqa: F401 - a torch optimizer's first construction imports it (seconds)
    import torch.utils.tensorboard  # noqa: F401

    import gradflow.analysis.plots  # noqa: F401
    import gradflow.experiments.batched  # noqa: F401 - imported once here rather than in every worker

    return multiprocessing.get_context("fork")


class LocalExecutor:
    """Runs tasks in-process (workers == 1) or in a pool of processes."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def map(self, jobs: list[tuple], on_done: Callable[[int, list[dict]], None]) -> None:
        if self.workers == 1:
            for i, job in enumerate(jobs):
                on_done(i, run_task(*job))
            return
        with ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_worker_init) as pool:
            pending = {pool.submit(run_task, *job): i for i, job in enumerate(jobs)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_done(pending.pop(future), future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


class RayExecutor:
    """Hands tasks to Ray: a local instance by default, or the cluster at ``address``."""

    def __init__(self, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray: Ray is not installed; install it from your gradflow checkout with "
                              "pip install -e '.[ray]' (or pip install 'ray>=2.9')") from None
        self.ray = ray
        self.workers = workers
        self.address = address

    def map(self, jobs: list[tuple], on_done: Callable[[int, list[dict]], None]) -> None:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            root = str(Path(__file__).resolve().parents[3])  # the directory holding gradflow/
            kwargs: dict[str, Any] = {"address": self.address, "log_to_driver": False, "configure_logging": False}
            if self.address is None:  # a local Ray: its workers must import this gradflow, installed or not
                kwargs.update(num_cpus=self.workers, include_dashboard=False,
                              runtime_env={"env_vars": {"PYTHONPATH": _pythonpath(root)}})
            ray.init(**kwargs)
        try:
            remote = ray.remote(num_cpus=1)(run_task)
            pending = {remote.remote(*job): i for i, job in enumerate(jobs)}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    on_done(pending.pop(ref), ray.get(ref))
        finally:
            if started:
                ray.shutdown()


def _pythonpath(root: str) -> str:
    current = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + current if current else "")
