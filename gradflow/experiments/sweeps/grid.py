"""Sweep files, their grid and the plan: which (grid point, seed) runs share one batched model.

A sweep file names a base config, fixed overrides, a grid and seeds:

    name: relu_depth                 # optional; default: the file's stem
    base: ../deep_relu.yaml          # a config file (relative to the sweep file) or a mapping
    overrides: {train.epochs: 500}   # optional, applied to every run
    grid:                            # dotted config keys -> lists of values (file order)
      model.depth: [1, 5, 10, 15, 20, 25]
      model.activation: [tanh, relu]
    seeds: 0-9                       # "0-9", "1,4,7" or a list of ints

Runs whose configs differ only in the seed train as one batched model
(gradflow.experiments.batched); ``plan`` groups them into tasks.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradflow.errors import ConfigError
from gradflow.experiments.config import Config, apply_override, build, read_yaml, to_dict, validate

SWEEP_KEYS = ("name", "base", "overrides", "grid", "seeds")
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
    config: Any  # gradflow.experiments.config.Config

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
    points = []
    for values in itertools.product(*sweep.axes.values()):
        label = ", ".join(f"{k}={cell(v)}" for k, v in zip(sweep.axes, values))
        raw = _apply(sweep.base, sweep.overrides(values), f"{sweep.source}: grid point {label}")
        try:
            cfg = validate(build(Config, raw))
            if cfg.model.type != "mlp":   # the runner batches seeds: MLPs only
                raise ConfigError(f"model.type={cfg.model.type}: sweeps train seeds as one batched MLP; for "
                                  "recurrent models use scripts/through_time_sweep.py")
        except ConfigError as exc:
            where = f"grid point {label}" if sweep.axes else "base"
            raise ConfigError(f"{sweep.source}: {where}: {exc}") from None
        points.append(Point(values, cfg))
    return points


# --- planning: which runs share a batched model ----------------------------------------------

@dataclass
class PlannedRun:
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
    runs: list[PlannedRun] = field(default_factory=list)

    def cost(self) -> float:
        """Rough relative cost, to start the longest tasks first."""
        cfg = self.config
        return cfg["train"]["epochs"] * (cfg["model"]["depth"] + 2) * (1 + 0.05 * len(self.runs))


def _shape_key(cfg: Any) -> str:
    data = to_dict(cfg)
    data["train"].pop("seed")
    data.pop("name")
    return json.dumps(data, sort_keys=True)


def plan(runs: Sequence[PlannedRun], workers: int = 1) -> list[Task]:
    """Group runs whose configs agree except for the seed; split groups when there are fewer
    than ``workers``, so every worker has something to do. Costliest tasks first.

    Example:
        >>> s = sweep_from_dict({"base": {}, "grid": {"model.depth": [1, 2]}, "seeds": "0-3"})
        >>> runs = [PlannedRun(p, seed) for p in expand(s) for seed in s.seeds]
        >>> [len(t.runs) for t in plan(runs)], [len(t.runs) for t in plan(runs, workers=4)]
        ([4, 4], [2, 2, 2, 2])
    """
    groups: dict[str, list[PlannedRun]] = {}
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


def seed_text(seeds: list[int]) -> str:
    """Seeds as a sweep file or ``--seeds`` writes them: ``seed_text([0, 1, 2]) == "0-2"``."""
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))
