"""Sweeps: many seeds per point over a grid of config overrides, as one table and one picture.

Commands (from the repository root):

    gradflow train configs/deep_relu.yaml --seeds 0-9          # 10 seeds, one batched run
    gradflow train configs/deep_tanh.yaml --seeds 1,4,7 train.epochs=100
    gradflow sweep configs/sweeps/relu_depth.yaml --workers 2  # resumes where it stopped
    gradflow sweep configs/sweeps/tanh_depth.yaml --backend ray --address auto

A sweep file names a base config, fixed overrides, a grid and seeds:

    name: relu_depth                 # optional; default: the file's stem
    base: ../deep_relu.yaml          # a config file (relative to the sweep file) or a mapping
    overrides: {train.epochs: 500}   # optional, applied to every run
    grid:                            # dotted config keys -> lists of values (file order)
      model.depth: [1, 5, 10, 15, 20, 25]
      model.activation: [tanh, relu]
    seeds: 0-9                       # "0-9", "1,4,7" or a list of ints

Runs whose configs differ only in the seed train as one batched model (gradflow.batched);
different shapes run in parallel processes (``--workers``) or on Ray. The sweep directory
holds ``results.csv`` (one row per finished run; the record that resume reads),
``summary.md`` (median and spread per grid point), ``sweep.png`` and ``runs/`` (one run
directory per run).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import yaml

from gradflow.errors import ConfigError
from gradflow.rundir import create_unique_dir

SWEEP_KEYS = ("name", "base", "overrides", "grid", "seeds")
RESULT_FIELDS = ("seed", "train_accuracy", "test_accuracy", "verdict", "seconds", "epochs", "stopped_early", "run_dir")
RESULTS_FILE, SUMMARY_FILE, PLOT_FILE, BASE_FILE = "results.csv", "summary.md", "sweep.png", "base.yaml"
LEARNED = 0.75  # test accuracy that counts as "learned the circles" (chance is 0.5; the tutorial's good runs: ~0.82-0.84)
MAX_SEEDS = 10_000


# --- seeds -----------------------------------------------------------------------------------

def parse_seeds(text: Any, where: str = "--seeds") -> list[int]:
    """``"0-9"``, ``"1,4,7"``, ``"0-4,8"`` or a list of ints -> sorted unique seeds.

    Example:
        >>> parse_seeds("0-3,7")
        [0, 1, 2, 3, 7]
        >>> parse_seeds([4, 1])
        [1, 4]
    """
    if isinstance(text, list):
        if not text or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in text):
            raise ConfigError(f"{where}: expected a non-empty list of non-negative ints, got {text!r}")
        seeds = list(text)
    elif isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        seeds = [text]
    elif isinstance(text, str):
        seeds = [s for part in text.split(",") for s in _seed_range(part.strip(), text, where)]
    else:
        raise ConfigError(f"{where}: expected seeds like 0-9 or 1,4,7, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seed listed twice in {text!r}; list each seed once")
    if len(seeds) > MAX_SEEDS or max(seeds) >= 2**63:
        raise ConfigError(f"{where}: at most {MAX_SEEDS} seeds, each below 2**63, got {text!r}")
    return sorted(seeds)


def _seed_range(part: str, text: str, where: str) -> list[int]:
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
    if not match:
        raise ConfigError(f"{where}: cannot read {part!r} in {text!r}; use ranges and lists of non-negative ints like 0-9 or 1,4,7")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
        raise ConfigError(f"{where}: range {part!r} runs backwards; write {high}-{low}")
    if high - low >= MAX_SEEDS:
        raise ConfigError(f"{where}: range {part!r} has more than {MAX_SEEDS} seeds")
    return list(range(low, high + 1))


# --- the sweep file --------------------------------------------------------------------------

@dataclass
class Sweep:
    """A validated sweep: every grid point's config has been built and checked."""

    name: str
    base: dict[str, Any]  # the base config as read (raw), fixed overrides applied
    axes: dict[str, list[Any]]  # dotted key (or variant axis name) -> values, in file order
    seeds: list[int]
    source: str = ""  # where it came from, for messages
    variants: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # axis -> name -> overrides

    def overrides(self, values: Sequence[Any]) -> dict[str, Any]:
        """The dotted-key overrides of one grid point (a variant axis contributes its mapping)."""
        out: dict[str, Any] = {}
        for axis, value in zip(self.axes, values):
            for key, v in (self.variants[axis][value] if axis in self.variants else {axis: value}).items():
                if key in out:
                    raise ConfigError(f"{self.source}: {key}: set by two grid axes ({axis} and another); set it in one")
                out[key] = v
        return out


@dataclass
class Point:
    """One grid point: its values (one per axis) and its resolved config (seed not yet set)."""

    values: tuple[Any, ...]
    config: Any  # gradflow.config.Config

    def cells(self) -> tuple[str, ...]:
        return tuple(cell(v) for v in self.values)


def cell(value: Any) -> str:
    """How a grid value is written in results.csv (and compared on resume).

    Example:
        >>> cell(3), cell("tanh"), cell({"name": "random_uniform", "minval": 0.0})
        ('3', 'tanh', '{"minval": 0.0, "name": "random_uniform"}')
    """
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; any problem is a one-line ``ConfigError``.

    Example:
        >>> sweep = load_sweep("configs/sweeps/tanh_depth.yaml")
        >>> list(sweep.axes), sweep.seeds[:3]
        (['model.depth'], [0, 1, 2])
    """
    from gradflow.config import read_yaml

    path = Path(path)
    raw = read_yaml(path)
    return sweep_from_dict(raw, base_dir=path.parent, default_name=path.stem, source=str(path))


def sweep_from_dict(raw: dict[str, Any], base_dir: str | Path = ".", default_name: str = "sweep", source: str = "sweep") -> Sweep:
    """Validate a sweep given as a dict (what a sweep file holds).

    Example:
        >>> s = sweep_from_dict({"base": {"train": {"epochs": 2}}, "grid": {"model.depth": [1, 2]}, "seeds": "0-1"})
        >>> s.axes, s.seeds
        ({'model.depth': [1, 2]}, [0, 1])
    """
    from gradflow.config import read_yaml

    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown sweep key; accepted: {', '.join(SWEEP_KEYS)}")
    for key in ("base", "grid", "seeds"):
        if key not in raw:
            raise ConfigError(f"{source}: {key}: missing; a sweep needs base (a config), grid (key: [values]) and seeds (e.g. 0-9)")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{source}: name: expected letters, digits, '.', '_' or '-', got {name!r}")
    base_spec = raw["base"]
    if isinstance(base_spec, str):
        base_path = Path(base_dir) / base_spec
        base = read_yaml(base_path)
        base.setdefault("name", base_path.stem)
    elif isinstance(base_spec, dict):
        base = copy.deepcopy(base_spec)
        base.setdefault("name", name)
    else:
        raise ConfigError(f"{source}: base: expected a config file path or a config mapping, got {base_spec!r}")
    fixed = _mapping(raw.get("overrides", {}), "overrides", source)
    axes, variants = _axes(raw["grid"], source)
    grid_keys = set(axes).union(*(o for vs in variants.values() for o in vs.values()))
    for key in fixed:
        if key in grid_keys:
            raise ConfigError(f"{source}: {key}: is both in overrides and in grid; keep it in one")
    base = _apply(base, fixed, f"{source}: overrides")
    seeds = parse_seeds(raw["seeds"], f"{source}: seeds")
    sweep = Sweep(name, base, axes, seeds, source, variants)
    expand(sweep)  # builds and validates every point's config now, before anything is written
    return sweep


def _mapping(value: Any, key: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{source}: {key}: expected a mapping of dotted config keys to values, e.g. train.epochs: 100")
    return value


def _axes(grid: Any, source: str) -> tuple[dict[str, list[Any]], dict[str, dict[str, dict[str, Any]]]]:
    """Axes (key -> values) and variant axes (name -> {variant: overrides}) of a grid.

    A list is an axis over one config key (``model.depth: [1, 2]``); a mapping of named
    override sets is a variant axis that changes several keys together
    (``variant: {xavier: {model.initializer: glorot_uniform, ...}, adam: {...}}``).
    """
    axes: dict[str, list[Any]] = {}
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for key, values in _mapping(grid, "grid", source).items():
        if key in ("train.seed", "seed"):
            raise ConfigError(f"{source}: grid.{key}: seeds go in the sweep's seeds: key (e.g. seeds: 0-9), not in the grid")
        if isinstance(values, dict) and values:
            if "." in key:
                raise ConfigError(f"{source}: grid.{key}: a mapping of variants needs a plain axis name such as variant, not a config key")
            variants[key] = {str(name): _mapping(o, f"grid.{key}.{name}", source) for name, o in values.items()}
            values = list(variants[key])
        elif not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid.{key}: expected a non-empty list of values (or a mapping of named variants), got {values!r}")
        if len({cell(v) for v in values}) != len(values):
            raise ConfigError(f"{source}: grid.{key}: a value is listed twice in {values!r}")
        axes[key] = values
    return axes, variants


def _apply(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of the raw config with dotted-key overrides applied (keys checked)."""
    from gradflow.config import apply_override

    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        try:
            apply_override(raw, key.split("."), copy.deepcopy(value))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return raw


def expand(sweep: Sweep) -> list[Point]:
    """Every grid point (the product of the axes, first axis slowest) with its validated config.

    Example:
        >>> s = sweep_from_dict({"base": {}, "grid": {"model.depth": [1, 2], "model.width": [5, 9]}, "seeds": "0"})
        >>> [p.values for p in expand(s)]
        [(1, 5), (1, 9), (2, 5), (2, 9)]
    """
    from gradflow.config import Config, build, validate

    points = []
    for values in itertools.product(*sweep.axes.values()):
        label = ", ".join(f"{k}={cell(v)}" for k, v in zip(sweep.axes, values))
        raw = _apply(sweep.base, sweep.overrides(values), f"{sweep.source}: grid point {label}")
        try:
            cfg = validate(build(Config, raw))
        except ConfigError as exc:
            where = f"grid point {label}" if sweep.axes else "base"
            raise ConfigError(f"{sweep.source}: {where}: {exc}") from None
        points.append(Point(values, cfg))
    return points


# --- planning: which runs share a batched model ----------------------------------------------

@dataclass
class Run:
    """One (grid point, seed) pair and the run directory it writes."""

    point: Point
    seed: int
    run_dir: str = ""  # relative to the sweep directory, set when the directory is created

    def key(self) -> tuple[str, ...]:
        return (*self.point.cells(), str(self.seed))


@dataclass
class Task:
    """Runs of one config shape (all but the seed agree): one batched model, one process."""

    config: dict[str, Any]  # to_dict of the shared config (its train.seed is unused)
    runs: list[Run] = field(default_factory=list)

    def cost(self) -> float:
        """Rough relative cost, to start the longest tasks first."""
        cfg = self.config
        return cfg["train"]["epochs"] * (cfg["model"]["depth"] + 2) * (1 + 0.05 * len(self.runs))


def _shape_key(cfg: Any) -> str:
    from gradflow.config import to_dict

    data = to_dict(cfg)
    data["train"].pop("seed")
    data.pop("name")
    return json.dumps(data, sort_keys=True)


def plan(runs: Sequence[Run], workers: int = 1) -> list[Task]:
    """Group runs whose configs agree except for the seed; split groups when there are fewer
    than ``workers``, so every worker has something to do. Costliest tasks first.

    Example:
        >>> s = sweep_from_dict({"base": {}, "grid": {"model.depth": [1, 2]}, "seeds": "0-3"})
        >>> runs = [Run(p, seed) for p in expand(s) for seed in s.seeds]
        >>> [len(t.runs) for t in plan(runs)], [len(t.runs) for t in plan(runs, workers=4)]
        ([4, 4], [2, 2, 2, 2])
    """
    from gradflow.config import to_dict

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_shape_key(run.point.config), []).append(run)
    split = max(1, math.ceil(workers / max(len(groups), 1)))
    tasks = []
    for members in groups.values():
        size = max(1, math.ceil(len(members) / split))
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            tasks.append(Task(to_dict(chunk[0].point.config), chunk))
    return sorted(tasks, key=lambda t: -t.cost())


# --- running a task (in a worker process, a Ray worker, or in-process) -----------------------

def run_task(config: dict[str, Any], seeds: list[int], run_dirs: list[str], device: str = "cpu",
             threads: int = 1) -> list[dict[str, Any]]:
    """Train one task's seeds as one batched model into ``run_dirs``; returns their summaries.

    A plain function of plain data, so that a process pool or Ray can ship it anywhere that
    can import gradflow and see the run directories.
    """
    import torch

    from gradflow.batched import train_members
    from gradflow.config import Config, build, validate

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
    import gradflow.batched  # noqa: F401 - imported once here rather than in every worker
    import gradflow.plots  # noqa: F401
    import torch._dynamo  # noqa: F401 - a torch optimizer's first construction imports it (seconds)
    import torch.utils.tensorboard  # noqa: F401

    return multiprocessing.get_context("fork")


class _Local:
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


class _Ray:
    """Hands tasks to Ray: a local instance by default, or the cluster at ``address``."""

    def __init__(self, workers: int, address: Optional[str]) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray: Ray is not installed; pip install 'gradflow-torch[ray]' (or pip install ray)") from None
        self.ray = ray
        self.workers = workers
        self.address = address

    def map(self, jobs: list[tuple], on_done: Callable[[int, list[dict]], None]) -> None:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            root = str(Path(__file__).resolve().parents[1])
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


# --- results.csv: the record, appended once per finished run ---------------------------------

def result_fields(axes: Iterable[str]) -> list[str]:
    return [*axes, *RESULT_FIELDS]


def read_results(path: Path, axes: Sequence[str]) -> list[dict[str, str]]:
    """The rows of results.csv; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # keep only whole rows
        path.write_text(text, encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is not None and list(reader.fieldnames) != result_fields(axes):
        raise ConfigError(f"{path}: holds columns {', '.join(reader.fieldnames)}, but this sweep writes "
                          f"{', '.join(result_fields(axes))}; use another --out directory")
    return list(reader)


def append_rows(path: Path, axes: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Append rows with one write and an fsync: a row is either all there or not at all."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=result_fields(axes), lineterminator="\n")
    new = not path.exists() or path.stat().st_size == 0
    if new:
        writer.writeheader()
    writer.writerows(rows)
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _row(cells: dict[str, str], seed: int, run_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(cells)
    verdict = summary.get("verdict") or ""
    row.update(seed=seed, train_accuracy=f"{summary['train_accuracy']:.4f}",
               test_accuracy=f"{summary['test_accuracy']:.4f}", verdict=verdict if isinstance(verdict, str) else ", ".join(verdict),
               seconds=summary["seconds"], epochs=summary["epochs"], stopped_early=summary["stopped_early"],
               run_dir=run_dir)
    return row


# --- the sweep directory ---------------------------------------------------------------------

def _label(axes: Sequence[str], point: Point) -> str:
    """``depth=3-activation=tanh``: short keys unless two axes end alike."""
    shorts = [key.rsplit(".", 1)[-1] for key in axes]
    names = shorts if len(set(shorts)) == len(shorts) else list(axes)
    text = "-".join(f"{n}={c}" for n, c in zip(names, point.cells()))
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:120]


def _make_run_dir(root: Path, label: str, seed: int) -> str:
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
    from gradflow.rundir import check_logdir

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
    address: Optional[str] = None,
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
    executor = _Ray(workers, address) if backend == "ray" else _Local(workers)
    rows = _prepare_dir(sweep, out)
    removed = _remove_unrecorded(out, rows)
    if removed:
        log(f"removed {len(removed)} unfinished run directories of an interrupted attempt")
    done = {(*(row[a] for a in axes), row["seed"]) for row in rows}
    points = expand(sweep)
    todo = [run for run in (Run(p, s) for p in points for s in sweep.seeds) if run.key() not in done]
    skipped = len(points) * len(sweep.seeds) - len(todo)
    if skipped:
        log(f"resuming: {skipped} runs already in {RESULTS_FILE}, {len(todo)} to go")
    tasks = plan(todo, workers)
    jobs = []
    for task in tasks:
        for run in task.runs:
            run.run_dir = "runs/" + _make_run_dir(out / "runs", _label(axes, run.point), run.seed)
        jobs.append((task.config, [r.seed for r in task.runs], [str(out / r.run_dir) for r in task.runs], device))
    t0 = time.perf_counter()
    finished = [0]

    def on_done(index: int, summaries: list[dict[str, Any]]) -> None:
        task = tasks[index]
        new = [_row(dict(zip(axes, run.point.cells())), run.seed, run.run_dir, summary)
               for run, summary in zip(task.runs, summaries)]
        append_rows(out / RESULTS_FILE, axes, new)
        rows.extend({k: str(v) for k, v in row.items()} for row in new)
        finished[0] += 1
        label = _label(axes, task.runs[0].point) or sweep.name
        tests = ", ".join(f"{float(r['test_accuracy']):.3f}" for r in new)
        log(f"[{finished[0]}/{len(tasks)}] {label}: {len(new)} seeds, test {tests} ({time.perf_counter() - t0:.1f} s)")

    if jobs:
        executor.map(jobs, on_done)
    write_outputs(sweep, out, rows)
    return SweepOutcome(out, len(todo), skipped, rows)


# --- the table and the picture ---------------------------------------------------------------

@dataclass
class PointStats:
    """Statistics over the seeds of one grid point."""

    cells: tuple[str, ...]
    n: int
    train: list[float]
    test: list[float]
    verdicts: list[str]

    def row(self) -> dict[str, Any]:
        import numpy as np

        test, train = np.array(self.test), np.array(self.train)
        learned = int((test >= LEARNED).sum())
        counts: dict[str, int] = {}
        for v in self.verdicts:  # "vanishing, saturated" -> "vanishing+saturated": one verdict set
            key = "+".join(part.strip() for part in v.split(",")) if v else "-"
            counts[key] = counts.get(key, 0) + 1
        return {
            "n": self.n,
            "train median": f"{np.median(train):.3f}",
            "test median": f"{np.median(test):.3f}",
            "test IQR": f"{np.percentile(test, 25):.3f}-{np.percentile(test, 75):.3f}",
            "test mean ± std": f"{test.mean():.3f} ± {test.std(ddof=1) if len(test) > 1 else 0.0:.3f}",
            "test min-max": f"{test.min():.3f}-{test.max():.3f}",
            f"learned (test ≥ {LEARNED})": f"{learned}/{self.n}",
            "verdicts": "; ".join(f"{v} ×{c}" for v, c in sorted(counts.items(), key=lambda kv: -kv[1])),
        }


def point_stats(sweep: Sweep, rows: list[dict[str, str]]) -> list[PointStats]:
    """Per grid point (in grid order), the statistics of the recorded seeds of this sweep."""
    axes = list(sweep.axes)
    wanted = {str(s) for s in sweep.seeds}
    stats = []
    for point in expand(sweep):
        mine = [r for r in rows if tuple(r[a] for a in axes) == point.cells() and r["seed"] in wanted]
        if mine:
            stats.append(PointStats(point.cells(), len(mine), [float(r["train_accuracy"]) for r in mine],
                                    [float(r["test_accuracy"]) for r in mine], [r["verdict"] for r in mine]))
    return stats


def summary_table(sweep: Sweep, rows: list[dict[str, str]]) -> str:
    """A Markdown table, one line per grid point: median and spread of accuracy over seeds.

    Example:
        >>> print(summary_table(sweep, rows))  # doctest: +SKIP
        | depth | n | train median | test median | test IQR | ...
    """
    stats = point_stats(sweep, rows)
    if not stats:
        return "(no finished runs)"
    shorts = [a.rsplit(".", 1)[-1] for a in sweep.axes]
    body = [(*s.cells, *s.row().values()) for s in stats]
    header = [*shorts, *stats[0].row().keys()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in line) + " |" for line in body]
    return "\n".join(lines)


def write_outputs(sweep: Sweep, out: Path, rows: list[dict[str, str]]) -> str:
    """Write summary.md and sweep.png (when there is an axis) and return the table."""
    table = summary_table(sweep, rows)
    (out / SUMMARY_FILE).write_text(f"# {sweep.name}\n\n{table}\n", encoding="utf-8")
    if sweep.axes and point_stats(sweep, rows):
        plot_sweep(sweep, rows, out / PLOT_FILE)
    return table


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(sweep: Sweep, rows: list[dict[str, str]], path: str | Path) -> Path:
    """Test accuracy against the first axis, a line per value of the other axes, with the
    median and the seeds' interquartile band; a heatmap of the median for two numeric axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = {s.cells: s for s in point_stats(sweep, rows)}
    axes = list(sweep.axes)
    values = list(sweep.axes.values())
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.add_subplot()
    if len(axes) == 2 and _numeric(values[0]) and _numeric(values[1]):
        _heatmap(fig, ax, sweep, stats)
    else:
        _lines(ax, sweep, stats)
    ax.set_title(f"{sweep.name}: test accuracy over seeds {_seed_text(sweep.seeds)}")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def _lines(ax, sweep: Sweep, stats: dict[tuple[str, ...], PointStats]) -> None:
    import numpy as np

    axes, values = list(sweep.axes), list(sweep.axes.values())
    first = values[0]
    numeric = _numeric(first)
    xs = first if numeric else list(range(len(first)))
    for rest in itertools.product(*values[1:]):
        med, low, high, xk, seeds_x, seeds_y = [], [], [], [], [], []
        for x, v in zip(xs, first):
            s = stats.get((cell(v), *(cell(r) for r in rest)))
            if s is None:
                continue
            test = np.array(s.test)
            xk.append(x)
            med.append(np.median(test))
            low.append(np.percentile(test, 25))
            high.append(np.percentile(test, 75))
            seeds_x += [x] * len(test)
            seeds_y += list(test)
        if not xk:
            continue
        label = ", ".join(f"{a.rsplit('.', 1)[-1]}={cell(r)}" for a, r in zip(axes[1:], rest)) or "median"
        line, = ax.plot(xk, med, marker="o", label=label)
        ax.fill_between(xk, low, high, color=line.get_color(), alpha=0.2)
        ax.scatter(seeds_x, seeds_y, color=line.get_color(), s=8, alpha=0.4)
    if not numeric:
        ax.set_xticks(xs, [cell(v) for v in first])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(axes[0])
    ax.set_ylabel("test accuracy (median, IQR band, seeds)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize="small")


def _heatmap(fig, ax, sweep: Sweep, stats: dict[tuple[str, ...], PointStats]) -> None:
    import numpy as np

    (ka, va), (kb, vb) = sweep.axes.items()
    grid = np.full((len(vb), len(va)), np.nan)
    for i, b in enumerate(vb):
        for j, a in enumerate(va):
            s = stats.get((cell(a), cell(b)))
            if s is not None:
                grid[i, j] = np.median(s.test)
    image = ax.imshow(grid, origin="lower", aspect="auto", vmin=0.4, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(va)), [cell(v) for v in va])
    ax.set_yticks(range(len(vb)), [cell(v) for v in vb])
    for i in range(len(vb)):
        for j in range(len(va)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.7 else "black")
    ax.set_xlabel(ka)
    ax.set_ylabel(kb)
    fig.colorbar(image, ax=ax, label="median test accuracy")


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


# --- command line ----------------------------------------------------------------------------

def add_sweep_parser(sub: Any, parser_class: type) -> None:
    """The ``gradflow sweep`` subcommand (called by cli.build_parser)."""
    sweep = sub.add_parser(
        "sweep",
        help="train a grid of configs over many seeds",
        usage="gradflow sweep SWEEP.yaml [--workers N] [--backend {local,ray}] [--address ADDR] [--out DIR] [--logdir DIR] [--device {auto,cpu,cuda}]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("sweep", help="sweep file, e.g. configs/sweeps/relu_depth.yaml")
    sweep.add_argument("--workers", type=int, default=None, help="parallel processes (default: the CPU count)")
    sweep.add_argument("--backend", default="local", choices=["local", "ray"], help="local processes (default) or Ray")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    sweep.add_argument("--logdir", default="runs", help="the sweep directory is LOGDIR/sweeps/NAME (default: runs)")
    sweep.add_argument("--out", default=None, help="the sweep directory (overrides --logdir); rerun to resume")
    sweep.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default: cpu")
    sweep.set_defaults(func=cmd_sweep)


def _check_workers(workers: Optional[int]) -> int:
    if workers is None:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    return workers


def cmd_sweep(args: argparse.Namespace) -> int:
    """``gradflow sweep``: validate the file and options, then train what is not yet recorded."""
    if getattr(args, "overrides", None):
        raise ConfigError(f"unrecognized arguments: {' '.join(args.overrides)}; put overrides in the sweep file's overrides:")
    sweep = load_sweep(args.sweep)
    workers = _check_workers(args.workers)
    if args.address is not None and args.backend != "ray":
        raise ConfigError("--address: only with --backend ray")
    device = _device(args.device)
    out = Path(args.out) if args.out else Path(args.logdir) / "sweeps" / sweep.name
    try:
        outcome = run_sweep(sweep, out, workers=workers, backend=args.backend, address=args.address, device=device)
    except KeyboardInterrupt:
        print(f"gradflow: sweep interrupted; finished runs are in {out / RESULTS_FILE}; rerun to resume", file=sys.stderr)
        return 130
    print(summary_table(sweep, outcome.rows))
    print(f"Sweep directory: {out}")
    return 0


def _device(device: str) -> str:
    from gradflow.cli import check_device

    return str(check_device(device))


def cmd_train_seeds(args: argparse.Namespace) -> int:
    """``gradflow train CONFIG --seeds 0-9``: the seeds as one batched run, one run directory
    per seed under a new parent directory, then the statistics over seeds."""
    import torch

    from gradflow.batched import train_members
    from gradflow.config import load_config
    from gradflow.rundir import check_logdir

    seeds = parse_seeds(args.seeds)
    if args.seed is not None:
        raise ConfigError("--seed and --seeds: pass one of them (--seeds 0-9 runs seeds 0 to 9)")
    if getattr(args, "resume", None) is not None:
        raise ConfigError("--resume and --seeds: --resume goes on with one run; rerun --seeds, or use gradflow sweep (which resumes)")
    if args.config is None:
        raise ConfigError("the following arguments are required: config (gradflow train CONFIG --seeds 0-9)")
    cfg = load_config(args.config, list(args.overrides))  # validates everything before any write
    device = _device(args.device)
    threads = getattr(args, "threads", 1)
    if threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {threads}")
    check_logdir(args.logdir)
    requested = getattr(args, "workers", None)
    # One GPU trains every seed in one batched model; on the CPU each process gets a core.
    workers = min(len(seeds), _check_workers(requested) if requested is not None or device == "cpu" else 1)
    parent = create_unique_dir(Path(args.logdir), f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-seeds{_seed_text(seeds)}")
    run_dirs = [parent / _make_run_dir(parent, cfg.name, seed) for seed in seeds]
    if workers == 1:
        torch.set_num_threads(threads)  # tiny models: more threads only cost
        summaries = train_members(cfg, seeds, run_dirs, device=device, progress=False if args.quiet else None)
    else:
        if not args.quiet:
            print(f"training {len(seeds)} seeds in {workers} processes ...", file=sys.stderr, flush=True)
        summaries = _train_seeds_in_workers(cfg, seeds, run_dirs, device, workers, threads)
    rows = [_row({}, seed, str(d.relative_to(parent)), s) for seed, d, s in zip(seeds, run_dirs, summaries)]
    append_rows(parent / RESULTS_FILE, [], rows)
    print(seeds_report([{k: str(v) for k, v in row.items()} for row in rows]))
    print(f"Run directory: {parent}")
    if any(s["stopped_early"] for s in summaries):
        print("gradflow: training stopped on a non-finite loss in some seeds (set train.on_nonfinite=continue to go on)",
              file=sys.stderr)
        return 3
    return 0




def _train_seeds_in_workers(cfg, seeds: list[int], run_dirs: list[Path], device: str, workers: int,
                            threads: int) -> list[dict[str, Any]]:
    """The seeds split into ``workers`` contiguous shares, each trained as one batched model in
    its own process: the training batches within a process, and each process's per-window
    recording (histograms, TensorBoard events, tables) runs on its own core."""
    from gradflow.config import to_dict

    size = math.ceil(len(seeds) / workers)
    shares = [range(start, min(start + size, len(seeds))) for start in range(0, len(seeds), size)]
    jobs = [(to_dict(cfg), [seeds[i] for i in share], [str(run_dirs[i]) for i in share], device, threads)
            for share in shares]
    done: dict[int, list[dict[str, Any]]] = {}
    _Local(len(jobs)).map(jobs, done.__setitem__)
    return [summary for i in range(len(jobs)) for summary in done[i]]


def seeds_report(rows: list[dict[str, str]]) -> str:
    """Per-seed lines and mean, standard deviation and median over seeds.

    Example:
        >>> print(seeds_report([{"seed": "0", "train_accuracy": "0.8", "test_accuracy": "0.7", "verdict": "", "run_dir": "r0"},
        ...                     {"seed": "1", "train_accuracy": "0.6", "test_accuracy": "0.5", "verdict": "", "run_dir": "r1"}]))
        seed 0: Train: 0.800, Test: 0.700
        seed 1: Train: 0.600, Test: 0.500
        Train: mean 0.700, std 0.141, median 0.700 over 2 seeds
        Test: mean 0.600, std 0.141, median 0.600 over 2 seeds
    """
    import numpy as np

    lines = []
    for row in rows:
        verdict = f"  [{row['verdict']}]" if row.get("verdict") else ""
        lines.append(f"seed {row['seed']}: Train: {float(row['train_accuracy']):.3f}, Test: {float(row['test_accuracy']):.3f}{verdict}")
    for key, title in (("train_accuracy", "Train"), ("test_accuracy", "Test")):
        values = np.array([float(r[key]) for r in rows])
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        lines.append(f"{title}: mean {values.mean():.3f}, std {std:.3f}, median {np.median(values):.3f} over {len(values)} seeds")
    return "\n".join(lines)
