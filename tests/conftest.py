"""Tests mirror the package (tests/monitor, tests/analysis, tests/experiments; CLI-level tests
here). Put this folder on sys.path so that helpers such as ``recorded_runs`` import from any
of them (pytest's default import mode adds only each test file's own folder)."""

import os
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


@pytest.fixture(autouse=True, scope="session")
def data_cache(tmp_path_factory):
    """Datasets are cached (gradflow.experiments.data.cache_dir): keep the tests' cache, which
    their subprocesses share, out of the user's ~/.cache."""
    before = os.environ.get("GRADFLOW_CACHE_DIR")
    os.environ["GRADFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["GRADFLOW_CACHE_DIR"])
    if before is None:
        del os.environ["GRADFLOW_CACHE_DIR"]
    else:
        os.environ["GRADFLOW_CACHE_DIR"] = before
