"""Tests mirror the package (tests/monitor, tests/analysis, tests/experiments; CLI-level tests
here). Put this folder on sys.path so that helpers such as ``recorded_runs`` import from any
of them (pytest's default import mode adds only each test file's own folder)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from more threads, and they contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
