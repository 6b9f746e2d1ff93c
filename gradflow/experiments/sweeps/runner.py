"""Running a sweep: the sweep directory (``base.yaml``, ``results.csv``, ``summary.md``,
``sweep.png``, ``runs/``), what is already recorded, and the tasks still to train.

Commands (from the repository root):

    gradflow sweep configs/sweeps/relu_depth.yaml --workers 2  # resumes where it stopped
    gradflow sweep configs/sweeps/tanh_depth.yaml --backend ray --address auto
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradflow.errors import ConfigError
from gradflow.experiments.rundir import check_logdir, create_unique_dir
from gradflow.experiments.sweeps.executors import LocalExecutor, RayExecutor
from gradflow.experiments.sweeps.grid import PlannedRun, Point, Sweep, expand, plan
from gradflow.experiments.sweeps.results import RESULTS_FILE, append_rows, read_results, result_row, write_sweep_outputs

BASE_FILE = "base.yaml"


def _run_name(axes: Sequence[str], point: Point) -> str:
    """``depth=3-activation=tanh``: short keys unless two axes end alike."""
    shorts = [key.rsplit(".", 1)[-1] for key in axes]
    names = shorts if len(set(shorts)) == len(shorts) else list(axes)
    text = "-".join(f"{n}={c}" for n, c in zip(names, point.cells()))
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:120]


def make_run_dir(root: Path, label: str, seed: int) -> str:
    """Create ``root/<label>-seed<N>`` (``-2``... on collision); returns it relative to ``root``."""
    return create_unique_dir(root, f"{label}-seed{seed}" if label else f"seed{seed}").name


def _remove_unrecorded(sweep_dir: Path, rows: list[dict[str, str]]) -> list[str]:
    """Run directories with no row in results.csv are from an interrupted attempt: remove them."""
    runs = sweep_dir / "runs"
    if not runs.is_dir():
        return []
    recorded = {row["run_dir"] for row in rows}
    removed = []
    for path in sorted(runs.iterdir()):
        rel = path.relative_to(sweep_dir).as_posix()
        if path.is_dir() and rel not in recorded:
            shutil.rmtree(path)
            removed.append(rel)
    return removed


def _prepare_dir(sweep: Sweep, out: Path) -> list[dict[str, str]]:
    """Create or reopen the sweep directory; returns the rows already recorded."""
    check_logdir(out)
    base_file = out / BASE_FILE
    base_text = yaml.safe_dump({"base": sweep.base, "variants": sweep.variants}, sort_keys=True)
    if base_file.exists() and base_file.read_text(encoding="utf-8") != base_text:
        raise ConfigError(f"{out}: holds a sweep with a different base config, overrides or variants ({base_file}); "
                          "use another --out directory or remove that one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: cannot create {out} ({exc.strerror}); pass a writable directory") from None
    rows = read_results(out / RESULTS_FILE, list(sweep.axes))
    if not base_file.exists():
        base_file.write_text(base_text, encoding="utf-8")
    return rows


@dataclass
class SweepOutcome:
    """What ``run_sweep`` did: the sweep directory, the runs trained now and those skipped."""

    directory: Path
    trained: int
    skipped: int
    rows: list[dict[str, str]]


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    workers: int = 1,
    backend: str = "local",
    address: str | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Train every (grid point, seed) of ``sweep`` not yet in ``out/results.csv``; write the
    summary table and the picture. Interrupted, it loses nothing: rerun it to go on.

    Example:
        >>> outcome = run_sweep(load_sweep("configs/sweeps/tanh_depth.yaml"), "runs/sweeps/tanh_depth", workers=2)  # doctest: +SKIP
        >>> outcome.trained, outcome.skipped  # doctest: +SKIP
        (100, 0)
    """
    out = Path(out)
    axes = list(sweep.axes)
    executor = RayExecutor(workers, address) if backend == "ray" else LocalExecutor(workers)
    rows = _prepare_dir(sweep, out)
    removed = _remove_unrecorded(out, rows)
    if removed:
        log(f"removed {len(removed)} unfinished run directories of an interrupted attempt")
    done = {(*(row[a] for a in axes), row["seed"]) for row in rows}
    points = expand(sweep)
    todo = [run for run in (PlannedRun(p, s) for p in points for s in sweep.seeds) if run.key() not in done]
    skipped = len(points) * len(sweep.seeds) - len(todo)
    if skipped:
        log(f"resuming: {skipped} runs already in {RESULTS_FILE}, {len(todo)} to go")
    tasks = plan(todo, workers)
    jobs = []
    for task in tasks:
        for run in task.runs:
            run.run_dir = "runs/" + make_run_dir(out / "runs", _run_name(axes, run.point), run.seed)
        jobs.append((task.config, [r.seed for r in task.runs], [str(out / r.run_dir) for r in task.runs], device))
    t0 = time.perf_counter()
    finished = [0]

    def on_done(index: int, summaries: list[dict[str, Any]]) -> None:
        task = tasks[index]
        new = [result_row(dict(zip(axes, run.point.cells())), run.seed, run.run_dir, summary)
               for run, summary in zip(task.runs, summaries)]
        append_rows(out / RESULTS_FILE, axes, new)
        rows.extend({k: str(v) for k, v in row.items()} for row in new)
        finished[0] += 1
        label = _run_name(axes, task.runs[0].point) or sweep.name
        tests = ", ".join(f"{float(r['test_accuracy']):.3f}" for r in new)
        log(f"[{finished[0]}/{len(tasks)}] {label}: {len(new)} seeds, test {tests} ({time.perf_counter() - t0:.1f} s)")

    if jobs:
        executor.map(jobs, on_done)
    write_sweep_outputs(sweep, out, rows)
    return SweepOutcome(out, len(todo), skipped, rows)
