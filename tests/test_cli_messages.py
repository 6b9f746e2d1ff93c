"""What the CLI says to a newcomer's near misses, through real subprocesses (``python -m
gradflow.cli`` from the repository root): each is one line on stderr, exit status 2, and says
what to type instead."""

import subprocess
import sys
from pathlib import Path

import pytest

from gradflow.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[1]
DEEP_RELU = str(ROOT / "configs" / "deep_relu.yaml")


def gradflow(*args: str, cwd: Path = ROOT) -> str:
    """Run ``python -m gradflow.cli ARGS`` (this checkout first on the path: cwd is the root);
    check it refused with one line; return that line."""
    proc = subprocess.run([sys.executable, "-m", "gradflow.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gradflow: error: "), proc.stderr
    return proc.stderr.strip()


@pytest.mark.parametrize("n, advice", [
    ("0", "--seeds 0: 0 seeds is nothing to run; for seed 0 alone write --seed 0"),
    ("1", "--seeds 1: a single number is ambiguous; for 1 seed (seed 0) write --seeds 0-0, for seed 1 alone --seed 1"),
])
def test_a_single_number_for_seeds_gets_advice_that_is_true(tmp_path, n, advice):
    assert gradflow("train", DEEP_RELU, "--seeds", n, "--logdir", str(tmp_path)).endswith(advice)
    assert list(tmp_path.iterdir()) == []


def test_many_seeds_from_a_single_number_count_from_zero(capsys, tmp_path):
    assert main(["train", DEEP_RELU, "--seeds", "3", "--logdir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().endswith(
        "--seeds 3: a single number is ambiguous; for 3 seeds write --seeds 0-2, for seed 3 alone --seed 3")


def test_a_sweep_files_bare_int_is_that_one_seed():
    """docs/sweeps.md: in a sweep file ``seeds: 3`` is seed 3 alone (a YAML int, read as ``[3]``)."""
    from gradflow.experiments.sweeps.grid import parse_seeds

    assert parse_seeds(3, "seeds") == parse_seeds([3], "seeds") == [3]
    assert parse_seeds(0, "seeds") == [0]


def test_a_sweep_override_on_the_command_line_is_shown_in_the_files_form():
    line = gradflow("sweep", str(ROOT / "configs" / "sweeps" / "relu_depth.yaml"), "train.epochs=20")
    assert line.endswith("unrecognized arguments: train.epochs=20; put overrides in the sweep file's "
                         "overrides:, e.g. overrides: {train.epochs: 20}")


def test_diagnose_of_a_folder_another_framework_wrote_says_where_its_verdict_is(tmp_path):
    """A Lightning/HF log folder (TensorBoard events, no gradients.csv) is no gradflow run directory."""
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "lightning_logs" / "version_0"
    with SummaryWriter(str(folder)) as writer:
        writer.add_scalar("grad/total_norm", 1.0, 1)
    line = gradflow("diagnose", str(folder))
    assert "not a gradflow run directory (no gradients.csv" in line and "TensorBoard event files" in line
    assert "gradflow diagnose reads the run directories gradflow train writes" in line
    assert "diagnosis/text_summary" in line and "callback.diagnosis" in line
    assert "train with the gradient monitor enabled" not in line


@pytest.mark.parametrize("args, stream, expected", [
    ((), "stdout", "{train,sweep,diagnose,compare}"),
    (("diagnose", "no_such_run"), "stderr", "gradflow: error: no_such_run: no such run directory"),
], ids=["bare-prints-the-commands", "diagnose-refuses-in-one-line"])
def test_python_dash_m_gradflow_is_the_command_without_installing(args, stream, expected):
    """README: ``python -m gradflow ...`` runs any subcommand from a checkout (it was 'No module
    named gradflow.__main__'), with the console script's output and exit status."""
    proc = subprocess.run([sys.executable, "-m", "gradflow", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (EXIT_BAD_INPUT if args else 0), proc.stderr
    assert expected in getattr(proc, stream)
