"""Tests mirror the package (tests/monitor, tests/analysis, tests/experiments; CLI-level tests
here). Put this folder on sys.path so that helpers such as ``recorded_runs`` import from any
of them (pytest's default import mode adds only each test file's own folder)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
