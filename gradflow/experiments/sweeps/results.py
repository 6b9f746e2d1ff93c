"""A sweep's results: ``results.csv`` (one row per finished run, the record that resume reads),
the statistics over seeds per grid point, ``summary.md`` and ``sweep.png``.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradflow.errors import ConfigError
from gradflow.experiments.sweeps.grid import Sweep, cell, expand, seed_text

RESULT_FIELDS = ("seed", "train_accuracy", "test_accuracy", "verdict", "seconds", "epochs", "stopped_early", "run_dir")
RESULTS_FILE, SUMMARY_FILE, PLOT_FILE = "results.csv", "summary.md", "sweep.png"
LEARNED = 0.75  # test accuracy that counts as "learned the circles" (chance is 0.5; the tutorial's good runs: ~0.82-0.84)


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


def result_row(cells: dict[str, str], seed: int, run_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(cells)
    verdict = summary.get("verdict") or ""
    row.update(seed=seed, train_accuracy=f"{summary['train_accuracy']:.4f}",
               test_accuracy=f"{summary['test_accuracy']:.4f}", verdict=verdict if isinstance(verdict, str) else ", ".join(verdict),
               seconds=summary["seconds"], epochs=summary["epochs"], stopped_early=summary["stopped_early"],
               run_dir=run_dir)
    return row


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


def write_sweep_outputs(sweep: Sweep, out: Path, rows: list[dict[str, str]]) -> str:
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
    ax.set_title(f"{sweep.name}: test accuracy over seeds {seed_text(sweep.seeds)}")
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
