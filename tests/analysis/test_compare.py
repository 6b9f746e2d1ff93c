"""compare: table, side-by-side figure, gradient-flow bar chart, and the diagnose / compare
commands (exit statuses, JSON), on short real runs and synthetic windows."""

import argparse
import json
import math
import subprocess
import sys

import pytest
from recorded_runs import record_run

from gradflow.analysis.compare import (
    compare_table,
    layer_sizes,
    load_run,
    pick_windows,
    plot_compare,
    plot_gradient_flow,
)
from gradflow.cli import EXIT_BAD_INPUT, EXIT_OK, add_analysis_parsers
from gradflow.monitor import Window

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tanh = record_run(root / "deep_tanh", "configs/deep_tanh.yaml", ["train.epochs=8"])
    relu = record_run(root / "deep_relu", "configs/deep_relu.yaml", ["train.epochs=8"])
    return tanh, relu


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="gradflow")
    add_analysis_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_table_has_a_row_per_run(runs):
    table = compare_table([load_run(path) for path in runs])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["run", "verdict", "train", "test"]
    assert lines[2].startswith("deep_tanh") and lines[3].startswith("deep_relu")
    assert "vanishing" in lines[2] and "->" in lines[2]


def test_layer_sizes_input_first(runs):
    steps, sizes = layer_sizes(load_run(runs[0]).windows)
    assert steps == list(range(8))
    assert list(sizes) == [f"dense_{i}" for i in range(1, 7)]


def test_compare_figure(runs, tmp_path):
    out = plot_compare([load_run(path) for path in runs], tmp_path / "compare.png")
    assert out.read_bytes()[:4] == PNG


def flow_windows():
    """A parameter with no gradient in one window, one with zero gradient, one non-finite."""
    rows = {"dense_1.weight": {"mean_abs": 0.01, "max_abs": 0.05}, "dense_1.bias": {"mean_abs": 0.02, "max_abs": 0.02},
            "frozen.weight": {"mean_abs": 0.0, "max_abs": 0.0}, "dense_2.weight": {"mean_abs": 0.3, "max_abs": 0.9}}
    first = Window(0, 4, gradients={k: dict(v) for k, v in rows.items() if k != "dense_1.bias"})
    middle = Window(1, 4, gradients={k: dict(v) for k, v in rows.items()})
    last = Window(2, 4, gradients={**{k: dict(v) for k, v in rows.items()},
                                   "dense_2.weight": {"mean_abs": math.nan, "max_abs": math.inf}})
    return [first, middle, last]


@pytest.mark.parametrize("steps", [None, [0, 2]], ids=["default-epochs", "chosen-epochs"])
def test_gradient_flow_survives_missing_zero_and_nonfinite(tmp_path, steps):
    out = plot_gradient_flow(flow_windows(), tmp_path / "flow.png", steps, title="t")
    assert out.read_bytes()[:4] == PNG


def test_gradient_flow_of_a_real_run(runs, tmp_path):
    windows = load_run(runs[1]).windows
    assert plot_gradient_flow(windows, tmp_path / "flow.png").read_bytes()[:4] == PNG


@pytest.mark.parametrize("count, steps, expected", [
    (10, None, [0, 5, 9]), (1, None, [0]), (2, None, [0, 1]), (10, [3, 7], [3, 7]),
], ids=["first-middle-last", "one-window", "two-windows", "chosen"])
def test_pick_windows(count, steps, expected):
    assert pick_windows([Window(s, 1) for s in range(count)], steps) == expected


def test_pick_windows_names_what_was_recorded():
    with pytest.raises(ValueError, match=r"epoch\(s\) \[12\]; recorded: 0..9"):
        pick_windows([Window(s, 1) for s in range(10)], [12])


# -- commands ------------------------------------------------------------------------------


def test_diagnose_command_prints_the_report(runs, capsys):
    assert run_cli(["diagnose", str(runs[0])]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("Verdict: vanishing") and "Recommendation:" in out


def test_diagnose_command_json(runs, capsys):
    assert run_cli(["diagnose", str(runs[1]), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["run_dir"] == str(runs[1])
    assert data["verdicts"] and data["line"].startswith("Verdict: ")
    assert list(data["evidence"]["layers"])[0] == "dense_1"


def test_diagnose_command_flow_chart(runs, tmp_path, capsys):
    out = tmp_path / "flow.png"
    assert run_cli(["diagnose", str(runs[0]), "--flow", str(out), "--epochs", "0", "7"]) == EXIT_OK
    assert out.read_bytes()[:4] == PNG


@pytest.mark.parametrize("argv, message", [
    (["diagnose", "{tmp}/missing"], "no such run directory"),
    (["diagnose", "{tmp}"], "no gradients.csv"),
    (["compare", "{run}", "{tmp}/missing"], "no such run directory"),
    (["diagnose", "{run}", "--flow", "{tmp}/f.png", "--epochs", "99"], "no window at epoch"),
], ids=["missing-dir", "no-gradients", "compare-missing", "bad-epoch"])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=runs[0]) for a in argv]
    assert run_cli(argv) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("gradflow: error: ")


def test_compare_command(runs, tmp_path, capsys):
    out = tmp_path / "tanh_vs_relu.png"
    assert run_cli(["compare", *map(str, runs), "--out", str(out), "--flow"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "deep_tanh" in printed and "deep_relu" in printed and f"Figure: {out}" in printed
    assert out.read_bytes()[:4] == PNG
    for run in runs:
        assert (tmp_path / f"tanh_vs_relu-flow-{run.name}.png").exists()


def test_registered_on_the_gradflow_command(runs, tmp_path, capsys):
    from gradflow.cli import main

    assert main(["diagnose", str(runs[1]), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["verdicts"]
    assert main(["diagnose", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert main(["diagnose"]) == EXIT_BAD_INPUT                    # argparse error: one line too
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "RUN_DIR" in err


def test_importing_stays_light():
    code = ("import sys, gradflow, gradflow.analysis.diagnose, gradflow.analysis.compare; "
            "print('matplotlib' in sys.modules, 'tensorboard' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.fixture
def seeds_parent(runs, tmp_path):
    """A --seeds parent directory: no gradients.csv of its own, members below it."""
    import shutil

    parent = tmp_path / "deep-seeds0-1"
    parent.mkdir()
    for index, run in enumerate(runs):
        shutil.copytree(run, parent / f"member-seed{index}")
    return parent


def test_diagnose_a_seeds_parent_summarises_its_members(seeds_parent, capsys):
    assert run_cli(["diagnose", str(seeds_parent)]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("member-seed0") and lines[1].startswith("member-seed1")
    assert "Verdict: " in lines[0] and lines[-1].startswith("Verdicts over 2 runs: ")
    assert "vanishing 1" in lines[-1]
    assert run_cli(["diagnose", str(seeds_parent), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert [r["run_dir"] for r in data["runs"]] == [str(seeds_parent / "member-seed0"), str(seeds_parent / "member-seed1")]


def test_diagnose_a_seeds_parent_of_one_member_still_summarises(runs, tmp_path, capsys):
    import shutil

    parent = tmp_path / "deep-seeds3"
    parent.mkdir()
    shutil.copytree(runs[0], parent / "member-seed3")
    assert run_cli(["diagnose", str(parent)]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("member-seed3") and lines[-1].startswith("Verdicts over 1 run: ")
    assert run_cli(["diagnose", str(parent / "member-seed3")]) == EXIT_OK    # a run itself: the full report
    assert "Recommendation:" in capsys.readouterr().out


def test_compare_a_seeds_parent_compares_its_members(seeds_parent, tmp_path, capsys):
    out = tmp_path / "seeds.png"
    assert run_cli(["compare", str(seeds_parent), "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "member-seed0" in printed and "member-seed1" in printed and out.read_bytes()[:4] == PNG


def test_compare_shows_the_smallest_middle_layer(runs):
    loaded = [load_run(path) for path in runs]
    header, _, tanh_row = compare_table(loaded).splitlines()[:3]
    assert "weakest/head" in header and "||g|| / ||w||" in header      # the measure is named
    smallest = tanh_row.rsplit("  ", 1)[1]
    assert smallest.split(":")[0] in {"dense_2", "dense_3", "dense_4", "dense_5"}, tanh_row


def test_compare_and_diagnose_name_one_measure_and_agree(runs):
    """One measure, one name (issue 23): compare's sizes are diagnose's ||g||/||w||, its weakest
    layer is diagnose's weakest hidden layer, and its first/head ratio is diagnose's."""
    import pytest as _pytest

    from gradflow.analysis.compare import layer_sizes, size_label

    for run in (load_run(path) for path in runs):
        layers = run.diagnosis.evidence["layers"]
        assert size_label(run.windows) == "||g|| / ||w||" and next(iter(layers.values()))["measure"] == "relative"
        _, sizes = layer_sizes(run.windows)
        hidden = [layer for layer, row in layers.items() if row["role"] == "hidden"]
        head = next(layer for layer, row in layers.items() if row["role"] == "head")
        # the first window's ratio, from compare's series, is diagnose's at that window (early = first 10%)
        first_ratio = sizes[hidden[0]][0] / sizes[head][0]
        early = max(1, len(run.windows) // 10)
        if early == 1:
            assert first_ratio == _pytest.approx(layers[hidden[0]]["ratio_early"], rel=1e-6)
        weakest = min(hidden, key=lambda layer: layers[layer]["ratio_early"])
        row = compare_table([run, run]).splitlines()[2]
        assert row.rsplit("  ", 1)[1].startswith(weakest + ":"), (row, weakest)


def test_compare_one_run_is_an_error_not_a_file_in_the_cwd(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["compare", str(runs[0])]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two or more runs" in err
    assert not (tmp_path / "compare.png").exists()


def test_a_closed_pipe_ends_quietly(runs):
    """``gradflow diagnose RUN --json | head``: the reader went away; no traceback."""
    reader = subprocess.Popen([sys.executable, "-m", "gradflow.cli", "diagnose", str(runs[0]), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # like `| true`: nobody reads
    err = reader.stderr.read().decode()
    assert reader.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_ten_seeds_get_ten_colours_and_a_panel_per_layer(runs, tmp_path):
    """A 10-seed parent: every member its own colour (not 6 colour families repeating), and the
    every-layer plot split into one panel per layer (60 lines in one panel were unreadable)."""
    import dataclasses

    from matplotlib.colors import to_hex

    from gradflow.analysis.compare import _CMAPS, _run_colours

    for count in (2, 10, 20):
        assert len({to_hex(c) for c in _run_colours(count)}) == count
    run = load_run(runs[0])
    members = [dataclasses.replace(run, path=run.path.with_name(f"deep_tanh-seed{k}")) for k in range(len(_CMAPS) + 1)]
    out = plot_compare(members, tmp_path / "seeds.png")
    assert out.read_bytes()[:4] == PNG


def test_compare_says_which_windows_each_column_reads(runs):
    """compare's first/head reads the first window, diagnose's early figure the median of the
    first tenth: the same run gave 0.0573 and 0.0378 side by side (friction13); the table says so."""
    last = compare_table([load_run(path) for path in runs]).splitlines()[-1]
    assert "first window -> the last" in last and "median over the first 10% of the windows" in last, last
