"""The package's rooms and their one-way doors (docs/architecture.md): cli -> experiments ->
analysis -> monitor, every import pointing down, and no cycles. Imports inside functions and
under ``if TYPE_CHECKING:`` count too: a reader follows them all the same."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradflow"

# room -> the rooms it may import (besides itself); errors.py is the floor everyone may stand on.
ALLOWED = {
    "monitor": set(),
    "analysis": {"monitor", "errors"},
    "experiments": {"analysis", "monitor", "errors"},
    "integrations": {"analysis", "monitor"},   # beside the monitor; the verdict comes from the analysis
    "cli": {"experiments", "analysis", "monitor", "errors", "startup"},
    "errors": set(),
    "startup": set(),                          # the garbage collector at start and exit, for cli
    "__init__": {"monitor"},
    "__main__": {"cli"},                       # python -m gradflow: the command line, nothing else
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradflow"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # from gradflow.x import module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gradflow"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    # A module's own ancestor packages are not edges: importing gradflow.monitor.stats runs
    # gradflow.monitor's __init__ first whichever way round, so that is no cycle.
    return {name: {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def test_imports_point_down_only():
    wrong = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets
             if _room(b) != _room(a) and _room(b) not in ALLOWED[_room(a)]]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_command_line_imports_no_heavy_package():
    """``gradflow --help`` must be instant: torch, numpy, matplotlib, tensorboard, sklearn and
    numba load only in the commands that use them."""
    import subprocess
    import sys

    code = ("import sys, gradflow.cli; gradflow.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'tensorboard', 'sklearn', 'numba', 'yaml') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"


def test_a_run_with_cached_data_imports_no_sklearn_and_no_matplotlib_before_its_first_epoch(tmp_path):
    """What the first epoch waits for (benchmarks/startup.py times it): not sklearn when the
    cache holds the data, not matplotlib (plots are drawn at the end)."""
    import subprocess
    import sys

    from gradflow.experiments.config import DataConfig
    from gradflow.experiments.data import load_dataset

    load_dataset(DataConfig())           # into the conftest's cache (GRADFLOW_CACHE_DIR), which the run reads
    code = f"""
import sys
import gradflow.experiments.solo as solo
from gradflow.cli import main

HEAVY = ("sklearn", "matplotlib")
seen = []
fit = solo.fit

class Spy:
    def epoch_end(self, epoch, metrics):
        if not seen:
            seen.append(sorted(m for m in HEAVY if m in sys.modules))

def spy(*args, callbacks=(), **kwargs):
    return fit(*args, callbacks=[*callbacks, Spy()], **kwargs)

solo.fit = spy
assert main(["train", "configs/deep_relu.yaml", "train.epochs=1", "--logdir", {str(tmp_path)!r}, "--quiet"]) == 0
print(seen[0], "matplotlib" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True).stdout
    assert out.splitlines()[-1] == "[] True"   # matplotlib only after training, for the plots


def test_no_script_beside_the_package_shadows_an_installed_module():
    """Tests and scripts put benchmarks/ and scripts/ on sys.path; a file there named like an
    installed top-level module (benchmarks/kernels.py once hid Hugging Face's ``kernels``, which
    transformers imports) breaks whatever imports that module later in the process."""
    import importlib.util
    import sys

    root = PACKAGE.parent
    folders = [root / "benchmarks", root / "scripts"]
    path = [p for p in sys.path if Path(p or ".").resolve() not in {f.resolve() for f in folders}]
    clashes = []
    for folder in folders:
        for script in folder.glob("*.py"):
            spec = importlib.machinery.PathFinder.find_spec(script.stem, path)
            if spec is not None or script.stem in sys.builtin_module_names:
                clashes.append(f"{folder.name}/{script.name} ({spec.origin if spec else 'built in'})")
    assert not clashes, f"rename these: {clashes}"
