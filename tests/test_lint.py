"""ruff, configured in pyproject.toml ([tool.ruff]), is clean over the package, tests, benchmarks
and scripts, so the README's test command also lints. ``ruff check --fix .`` repairs most
findings (import order, pyupgrade)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is in the test extra: pip install -e '.[test]'")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "gradflow", "tests", "benchmarks",
                           "scripts", "examples"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
