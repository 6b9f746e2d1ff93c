"""pytest runs the docstring examples in gradflow/ (``--doctest-modules``, pyproject.toml). Each
runs in a fresh temporary directory that sees the checkout's ``configs/`` (the examples name
``configs/deep_relu.yaml`` as a user in the checkout would), so an example that writes
``runs/demo`` leaves nothing in the checkout."""

import importlib.util
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

ROOT = Path(__file__).resolve().parent

# An integration without its framework raises on import (a one-line MonitorError naming the extra,
# tests/integrations/test_integration_extras.py): its examples are not collected then.
_NEEDS = {"gradflow/integrations/lightning.py": ("lightning", "pytorch_lightning"),
          "gradflow/integrations/transformers.py": ("transformers",)}
collect_ignore = [path for path, modules in _NEEDS.items()
                  if not any(importlib.util.find_spec(m) for m in modules)]
if importlib.util.find_spec("accelerate") is None:
    collect_ignore.append("gradflow/integrations/transformers.py")


@pytest.fixture(autouse=True)
def _doctest_in_a_temporary_directory(request, monkeypatch):
    if isinstance(request.node, DoctestItem):
        tmp_path = request.getfixturevalue("tmp_path")
        (tmp_path / "configs").symlink_to(ROOT / "configs")
        monkeypatch.chdir(tmp_path)
