"""Every ```python block of the README runs, as written, on the kind of model its text promises.

What a block leaves to the reader is defined in PREAMBLE, the same for every block: a plain
``nn.Sequential`` (the "any nn.Module" of the monitor example, so its keys are ``0.weight``, ...,
not gradflow's ``dense_1.weight``), a loader of three batches, an optimizer, a loss and two
epochs. A block defines its own names over these. Sizes are cut down with SMALL (regex ->
replacement on the block's text, e.g. ``train.epochs=50`` -> ``train.epochs=3``); anything
else runs unchanged, in a temporary directory where ``configs/`` is the repository's.

A block that imports a package that is not installed (a Lightning or Hugging Face example
needs its extra) is skipped, with the package named in the reason. New blocks are picked up
without touching this file.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PREAMBLE = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
loader = [(torch.randn(32, 2), torch.randint(0, 2, (32, 1)).float()) for _ in range(3)]
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = nn.BCEWithLogitsLoss()
epochs = 2
"""

SMALL = {r"train\.epochs=\d+": "train.epochs=3"}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block."""
    blocks, lines, start = [], text.splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start, body = number, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body)))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


def missing_packages(code: str) -> list[str]:
    """Top-level packages the block imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_example_runs(line, code, tmp_path, monkeypatch, capsys):
    missing = missing_packages(code)
    if missing:
        pytest.skip(f"README.md:{line} needs {', '.join(missing)} (not installed; an optional extra)")
    for pattern, replacement in SMALL.items():
        code = re.sub(pattern, replacement, code)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_{line}"}
    exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    capsys.readouterr()  # what the example prints is for the reader; an exception is the failure


def test_the_monitor_example_prints_a_key_of_the_model_it_shows():
    """The monitor example's ``stats[...]`` key is one that a plain nn.Sequential has."""
    (code,) = [c for _, c in BLOCKS if "GradientMonitor(model" in c]
    keys = re.findall(r'stats\["([^"]+)"\]', code)
    namespace: dict = {}
    exec(PREAMBLE, namespace)
    assert keys and set(keys) <= {name for name, _ in namespace["model"].named_parameters()}
