"""Compare runs side by side and draw the gradient-flow bar chart, for the ``diagnose`` and
``compare`` commands (gradflow.cli).

Examples (from the repository root):

    gradflow diagnose runs/deep_tanh-20250101-120000-seed0
    gradflow diagnose runs/deep_tanh-20250101-120000-seed0 --json
    gradflow diagnose runs/deep_tanh-20250101-120000-seed0 --flow flow.png
    gradflow compare runs/deep_tanh-* runs/deep_relu-* --out tanh_vs_relu.png

matplotlib (Agg canvas, no pyplot state) is imported inside the plotting functions, so
importing this module, or ``gradflow``, stays light.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradflow.analysis.diagnose import Diagnosis, diagnose_run, run_windows
from gradflow.analysis.history import read_history
from gradflow.analysis.measures import EARLY_FRACTION, MEASURE_LABEL, layer_series
from gradflow.analysis.windows import GRADIENTS_FILE, pick_windows


@dataclass
class Run:
    """What a run directory holds for comparison: windows, history rows, summary, diagnosis."""

    path: Path
    windows: list
    history: list[dict[str, float]]
    summary: dict[str, Any]
    diagnosis: Diagnosis

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; FileNotFoundError when it or its gradients.csv is missing.

    Example:
        >>> load_run("runs/deep_relu-20250101-120000-seed0").diagnosis.verdicts    # doctest: +SKIP
        ['healthy']
    """
    path = Path(run_dir)
    windows = run_windows(path)
    history = read_history(path) or []
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return Run(path, windows, history, summary, diagnose_run(path, windows))


def run_directories(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories that ``paths`` name: a run directory stands for itself, the parent
    directory of a ``--seeds`` run (no gradients.csv of its own, members below it that have
    one) for its members in name order. Anything else is passed through for ``load_run`` to
    explain.

    Example:
        >>> run_directories(["runs/deep_tanh-20250101-120000-seeds0-2"])         # doctest: +SKIP
        [PosixPath('runs/deep_tanh-.../deep_tanh-seed0'), ...]
    """
    found: list[Path] = []
    for path in map(Path, paths):
        members = sorted(d for d in path.iterdir() if (d / GRADIENTS_FILE).is_file()) \
            if path.is_dir() and not (path / GRADIENTS_FILE).exists() else []
        found.extend(members or [path])
    return found


def seeds_summary(runs: Sequence[Run]) -> str:
    """One verdict line per run, then how many runs got each verdict (for a ``--seeds`` parent).

    Example:
        >>> print(seeds_summary([load_run(d) for d in run_directories([parent])]))  # doctest: +SKIP
    """
    width = max(len(run.name) for run in runs)
    lines = [f"{run.name.ljust(width)}  train {_fmt(_accuracy(run, 'accuracy'), '.3f')}  "
             f"test {_fmt(_accuracy(run, 'val_accuracy'), '.3f')}  {run.diagnosis.line()}" for run in runs]
    counts: dict[str, int] = {}
    for run in runs:
        for verdict in run.diagnosis.verdicts:
            counts[verdict] = counts.get(verdict, 0) + 1
    lines.append(f"Verdicts over {len(runs)} run{'' if len(runs) == 1 else 's'}: " + ", ".join(f"{v} {n}" for v, n in counts.items()))
    return "\n".join(lines)


def layer_sizes(windows: Sequence[Any]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, layer -> size per window), input layer first; NaN where a window has none. The
    size is the one the diagnosis judges (``measures.layer_series``: ||g|| / ||w||, or mean |g|
    for old tables; ``size_label`` names it).

    Example:
        >>> from gradflow.monitor import Window
        >>> layer_sizes([Window(0, 1, gradients={"dense_1.weight": {"mean_abs": 0.5}})])
        ([0], {'dense_1': [0.5]})
    """
    _, sizes = layer_series(windows)
    return [w.step for w in windows], {layer: [float(v) for v in values] for layer, values in sizes.items()}


def size_label(windows: Sequence[Any]) -> str:
    """The name of the size ``layer_sizes`` gives: ``||g|| / ||w||`` or ``mean |g|``."""
    return MEASURE_LABEL[layer_series(windows)[0]]


def _accuracy(run: Run, key: str) -> float:
    summary_key = {"accuracy": "train_accuracy", "val_accuracy": "test_accuracy"}[key]
    value = run.summary.get(summary_key)
    if isinstance(value, (int, float)):
        return float(value)
    return run.history[-1].get(key, math.nan) if run.history else math.nan


def compare_table(runs: Sequence[Run]) -> str:
    """A plain-text table: verdict, accuracies, the first hidden layer's and the head's size
    (first window -> last window), their ratio, and the weakest hidden layer against the head
    (diagnose's early figure -> last), one row per run, and a last line saying which windows
    each column reads. Sizes, layers and roles are the diagnosis's own (``||g|| / ||w||``, the
    head from the graph), so the table and ``diagnose`` name the same weakest layer and agree
    in direction; the header names the measure.

    Example:
        >>> print(compare_table([load_run(a), load_run(b)]))                 # doctest: +SKIP
    """
    label = size_label(runs[0].windows) if runs else MEASURE_LABEL["relative"]
    header = ("run", "verdict", "train", "test", f"first hidden {label}", f"head {label}", "first/head",
              "weakest/head (early -> last)")
    rows = [header]
    for run in runs:
        _, sizes = layer_sizes(run.windows)
        layers = run.diagnosis.evidence.get("layers", {})
        hidden = [layer for layer, row in layers.items() if row.get("role") == "hidden" and layer in sizes]
        head = next((layer for layer, row in layers.items() if row.get("role") == "head"), None) or list(sizes)[-1]
        first = sizes[hidden[0]] if hidden else [math.nan] * len(sizes[head])
        output = sizes[head]
        ratio = [_ratio(a, b) for a, b in zip(first, output)]
        rows.append((run.name, ", ".join(run.diagnosis.verdicts), _fmt(_accuracy(run, "accuracy"), ".3f"),
                     _fmt(_accuracy(run, "val_accuracy"), ".3f"), f"{_fmt(first[0])} -> {_fmt(first[-1])}",
                     f"{_fmt(output[0])} -> {_fmt(output[-1])}", f"{_fmt(ratio[0])} -> {_fmt(ratio[-1])}",
                     _weakest(layers, hidden)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    # The two kinds of column read different windows: said, so a figure that differs from diagnose's is not a puzzle.
    lines.append(f"(first hidden, head, first/head: the first window -> the last; weakest/head: diagnose's figures, the "
                 f"median over the first {EARLY_FRACTION:.0%} of the windows -> the last)")
    return "\n".join(lines)


def _weakest(layers: dict[str, dict[str, Any]], hidden: list[str]) -> str:
    """The hidden layer the diagnosis finds weakest against the head early, early -> last."""
    early = {layer: layers[layer]["ratio_early"] for layer in hidden if math.isfinite(layers[layer]["ratio_early"])}
    if not early:
        return "n/a"
    layer = min(early, key=early.get)
    return f"{layer}: {_fmt(early[layer])} -> {_fmt(layers[layer]['ratio_last'])}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) else math.nan


def _fmt(value: float, spec: str = ".3g") -> str:
    return format(value, spec) if math.isfinite(value) else "n/a"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _positive(values: Sequence[float]) -> list[float]:
    # A log axis cannot show 0 or NaN: leave a gap there instead of a warning or a crash.
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def plot_compare(runs: Sequence[Run], path: str | Path) -> Path:
    """Runs side by side on shared axes. Top row: the gradient-flow picture of each run (every
    layer's ||g|| / ||w||, the size diagnose judges, against depth, input to output, at a few
    epochs; one y range for all, so a vanishing middle layer shows as a dip). Bottom: every
    layer's ||g|| / ||w|| per epoch and
    train / test accuracy on a fixed 0-1 axis. Up to ``len(_CMAPS)`` runs share one panel of
    layers (one colour family per run, darker = nearer the input); more runs (the members of a
    ``--seeds`` parent) get one colour each from ``tab10``/``tab20`` and one small panel per
    layer, so every seed is told apart. Legends sit outside the axes. Returns ``path``.

    Example:
        >>> plot_compare([load_run(a), load_run(b)], "tanh_vs_relu.png")     # doctest: +SKIP
    """
    from gradflow.analysis.plots import draw_flow

    columns = min(len(runs), 4)
    rows = math.ceil(len(runs) / columns)
    many = len(runs) > len(_CMAPS)
    fig = _figure(max(10.0, 3.6 * columns + 2), 3.6 * rows + (6.4 if many else 4.2))
    grid = fig.add_gridspec(rows + 1, columns, height_ratios=[3.6] * rows + [6.4 if many else 4.2], hspace=0.6)
    flows = [fig.add_subplot(grid[i // columns, i % columns]) for i in range(len(runs))]
    for ax in flows[1:]:
        ax.sharey(flows[0])
    for ax, run in zip(flows, runs):
        draw_flow(ax, run.windows, "relative")
        ax.set_title(f"{run.name}\n{', '.join(run.diagnosis.verdicts)}", fontsize="small")
    label = size_label(runs[0].windows)
    flows[0].set_ylabel(f"{label} (what diagnose judges)")
    flows[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    bottom = grid[rows, :].subgridspec(1, 2, wspace=0.6 if not many else 0.25,
                                       width_ratios=[1, 1] if not many else [2.2, 1])
    colours = _run_colours(len(runs))
    if many:
        _draw_layer_panels(fig, bottom[0], runs, colours, label)
    else:
        _draw_layers_one_panel(fig.add_subplot(bottom[0]), runs, label)
    accuracy = fig.add_subplot(bottom[1])
    for run, colour in zip(runs, colours):
        epochs = [row.get("epoch", i) for i, row in enumerate(run.history)]
        if run.history:
            accuracy.plot(epochs, [row.get("accuracy", math.nan) for row in run.history], color=colour,
                          label=f"{run.name}: train")
            accuracy.plot(epochs, [row.get("val_accuracy", math.nan) for row in run.history], color=colour,
                          linestyle=":", label=f"{run.name}: test")
    accuracy.set_ylim(0, 1)
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("accuracy")
    accuracy.set_title("accuracy", fontsize="medium")
    accuracy.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def _run_colours(count: int) -> list:
    """One colour per run: the middle of its colour family for a few runs, else tab10/tab20
    (more than 20 runs repeat colours)."""
    from matplotlib import colormaps

    if count <= len(_CMAPS):
        return [colormaps[_CMAPS[i]](0.7) for i in range(count)]
    table = colormaps["tab10" if count <= 10 else "tab20"]
    return [table(i % table.N) for i in range(count)]


def _draw_layers_one_panel(grads, runs: Sequence[Run], label: str) -> None:
    """Every layer of every run in one log panel: a colour family per run, darker = nearer the input."""
    from matplotlib import colormaps

    for index, run in enumerate(runs):
        steps, sizes = layer_sizes(run.windows)
        shades = colormaps[_CMAPS[index]]([0.95 - 0.55 * i / max(len(sizes) - 1, 1) for i in range(len(sizes))])
        for shade, values in zip(shades, sizes.values()):
            grads.plot(steps, _positive(values), color=shade, linewidth=1.2)
    grads.set_yscale("log")
    grads.set_xlabel("epoch")
    grads.set_ylabel(f"{label} of each layer's weight")
    grads.set_title("every layer per epoch (colours as in accuracy;\ndarker = nearer the input)", fontsize="medium")


def _draw_layer_panels(fig, spec, runs: Sequence[Run], colours: Sequence, label: str) -> None:
    """One small log panel per layer (input first), one line per run in its colour, shared axes."""
    per_run = [layer_sizes(run.windows) for run in runs]
    layers = list(dict.fromkeys(layer for _, sizes in per_run for layer in sizes))
    columns = min(len(layers), 3)
    cells = spec.subgridspec(math.ceil(len(layers) / columns), columns, hspace=0.55, wspace=0.3)
    first = None
    for index, layer in enumerate(layers):
        ax = fig.add_subplot(cells[index // columns, index % columns], sharex=first, sharey=first)
        first = first or ax
        for (steps, sizes), colour in zip(per_run, colours):
            if layer in sizes:
                ax.plot(steps, _positive(sizes[layer]), color=colour, linewidth=1.0)
        ax.set_yscale("log")
        ax.set_title(f"{layer} (layer {index + 1} of {len(layers)})", fontsize="small")
        ax.tick_params(labelsize="x-small")
    first.set_ylabel(f"{label} per epoch", fontsize="small")


_CMAPS = ["Blues", "Oranges", "Greens", "Reds", "Purples", "Greys"]


def plot_gradient_flow(windows: Sequence[Any], path: str | Path, steps: Sequence[int] | None = None,
                       title: str = "") -> Path:
    """The "plot_grad_flow" bar chart, done right: mean and max |g| of every parameter, biases
    included, input layer first, log scale, one panel per chosen epoch. A parameter without a
    gradient in a window is marked "no grad" instead of breaking the plot.

    Example:
        >>> plot_gradient_flow(load_windows(run_dir), "flow.png", steps=[0, 499])   # doctest: +SKIP
    """
    chosen = pick_windows(windows, steps)
    # Recording order (input layer first): start from the fullest window, add any stragglers.
    names = list(max(windows, key=lambda w: len(w.gradients)).gradients)
    for window in windows:
        names += [name for name in window.gradients if name not in names]
    fig = _figure(max(6.0, 0.45 * len(names) + 2), 2.8 * len(chosen))
    axes = fig.subplots(len(chosen), 1, squeeze=False)[:, 0]
    x = list(range(len(names)))
    for ax, index in zip(axes, chosen):
        rows = windows[index].gradients
        peak = _positive([float(rows.get(n, {}).get("max_abs", math.nan)) for n in names])
        mean = _positive([float(rows.get(n, {}).get("mean_abs", math.nan)) for n in names])
        ax.bar(x, peak, color="c", alpha=0.4, label="max |g|")
        ax.bar(x, mean, color="b", alpha=0.8, label="mean |g|")
        shown = [v for v in peak + mean if math.isfinite(v)]
        ax.set_yscale("log")
        if shown:
            ax.set_ylim(min(shown) / 3, max(shown) * 3)
        for i, name in enumerate(names):
            if name not in rows or not math.isfinite(mean[i]):
                label = "no grad" if name not in rows else "zero" if rows[name].get("mean_abs") == 0 else "nan/inf"
                ax.annotate(label, (i, 0.02), xycoords=("data", "axes fraction"), ha="center", rotation=90,
                            fontsize="x-small", color="red")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize="small")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel("|gradient|")
        ax.set_title(f"{title + ': ' if title else ''}epoch {windows[index].step}", fontsize="medium")
        ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)
