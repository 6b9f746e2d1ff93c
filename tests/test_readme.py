"""Every ```python block of the README (and of the docs pages a user copies from) runs, as written,
on the kind of model its text promises; every shell line is checked: the set-up commands run (the
test command is .ci/run's, word for word), install lines name extras that pyproject.toml has, and
every ``gradflow`` line parses. The README stays a user's page (at most 250 lines, set-up in the
first 40), and the docs' lists of modules and config keys are checked against the code.

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
DOCS_WITH_CODE = [ROOT / "docs" / "tensorboard.md", ROOT / "docs" / "monitor.md"]

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
DOC_BLOCKS = [(f"{path.name}:{line}", code) for path in [README, *DOCS_WITH_CODE]
              for line, code in python_blocks(path.read_text(encoding="utf-8"))]


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("line, code", DOC_BLOCKS, ids=[where for where, _ in DOC_BLOCKS])
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
    exec(compile(code, line, "exec"), namespace)
    capsys.readouterr()  # what the example prints is for the reader; an exception is the failure


def test_the_monitor_example_prints_a_key_of_the_model_it_shows():
    """The monitor example's ``stats[...]`` key is one that a plain nn.Sequential has."""
    (code,) = [c for _, c in BLOCKS if "GradientMonitor(model" in c]
    keys = re.findall(r'stats\["([^"]+)"\]', code)
    namespace: dict = {}
    exec(PREAMBLE, namespace)
    assert keys and set(keys) <= {name for name, _ in namespace["model"].named_parameters()}



# -- shell lines -------------------------------------------------------------------------------

TEXT = README.read_text(encoding="utf-8")
LINES = TEXT.splitlines()


def set_up_commands() -> list[str]:
    """The indented commands of the README's "Set up" section, in order."""
    section = TEXT.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_the_readme_is_a_users_page():
    assert len(LINES) <= 250
    head = "\n".join(LINES[:40])
    train, tests = set_up_commands()[:2]
    assert train in head and tests in head


def test_ci_runs_the_readmes_test_command_word_for_word():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    test_command = set_up_commands()[1]
    assert test_command.endswith("python -m pytest -q")
    assert test_command in [line.strip() for line in ci if not line.lstrip().startswith("#")]


def shell_lines() -> list[tuple[str, str]]:
    """(where, line) of every command a reader may paste: indented lines and lines of plain
    ``` blocks, in the README and every docs page, plus `inline` commands that start with pip."""
    found = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        fenced = None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                fenced = None if fenced is not None else stripped[3:]
                continue
            command = stripped.split("  #")[0].strip()
            if (fenced == "" or (fenced is None and line.startswith("    "))) and command.split(" ")[0] in (
                    "pip", "python", "gradflow", "tensorboard"):
                found.append((f"{path.name}:{number}", command))
            found += [(f"{path.name}:{number}", inline) for inline in re.findall(r"`(pip install [^`]+)`", line)]
    return found


SHELL = shell_lines()


def pyproject_section(name: str) -> str:
    """The text of ``[name]`` in pyproject.toml (tomllib is Python 3.11+; gradflow supports 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return text.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]


def test_every_install_line_names_what_pyproject_has():
    import shlex

    extras = set(re.findall(r"^([a-z_-]+) = \[", pyproject_section("project.optional-dependencies"), re.M))
    assert {"test", "lightning", "transformers"} <= extras
    installs = [(where, part) for where, line in SHELL for part in line.split("&&") if "pip install" in part]
    assert len(installs) >= 4
    for where, part in installs:
        words = shlex.split(part)                       # quoting as a shell reads it
        for word in words[words.index("install") + 1:]:
            if word.startswith("torch=="):
                assert word == "torch==2.13.0", where
            else:
                target = re.fullmatch(r"\.(?:\[([a-z,]+)\])?", word)
                assert word == "-e" or target, f"{where}: {word!r} is not the checkout (.) or its extras"
                assert word == "-e" or set(filter(None, (target.group(1) or "").split(","))) <= extras, where


def test_every_shell_line_parses():
    """bash -n on each line, and each ``gradflow`` line through the real parser (nothing runs)."""
    import shlex
    import subprocess

    from gradflow.cli import build_parser

    for where, line in SHELL:
        assert subprocess.run(["bash", "-n", "-c", line], capture_output=True).returncode == 0, where
        for part in line.split("&&"):
            words = shlex.split(part)
            synopsis = any(w.startswith("[") or w == "..." for w in words)       # a usage line, not a command
            if words and words[0] == "gradflow" and not synopsis:
                args, extra = build_parser().parse_known_args(words[1:])
                assert all("=" in e and not e.startswith("-") for e in extra), (where, extra)


def test_the_fast_subset_is_a_registered_marker():
    assert 'python -m pytest -q -m "not slow"' in TEXT
    assert re.search(r"""markers = \[[^]]*["']slow:""", pyproject_section("tool.pytest.ini_options"))


def test_the_readmes_train_command_runs(tmp_path):
    """The set-up's training command, after its installs, as written plus a short run."""
    import subprocess
    import sys

    command = set_up_commands()[0].split("&&")[-1].split()
    assert command[:2] == ["python", "scripts/train.py"]
    proc = subprocess.run([sys.executable, *command[1:], "train.epochs=2", "--logdir", str(tmp_path), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.splitlines()
    sample = TEXT.split("## The tutorial's story", 1)[1].split("```\n", 2)[1].splitlines()
    assert [line.split(":")[0] for line in printed] == [line.split(":")[0] for line in sample]   # same three lines


# -- lists in the docs that the code keeps -----------------------------------------------------

def test_architecture_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(str(p.relative_to(ROOT / "gradflow")) for p in (ROOT / "gradflow").rglob("*.py")
                     if p.name != "__init__.py" or p.parent == ROOT / "gradflow")
    named = set(re.findall(r"`(?:gradflow/)?([a-z_/]+\.py)`", text))
    missing = [m for m in modules if not {m, m.split("/", 1)[-1], m.rpartition("/")[2]} & named]
    assert not missing, f"docs/architecture.md does not list {missing}"
    assert not re.search(r"`[a-z_/]+\.py` \(\d+", text), "module sizes go stale: print them with scripts/module_sizes.py"


def test_run_directory_page_lists_every_config_key():
    from gradflow.experiments.config import config_keys

    text = (ROOT / "docs" / "run-directory.md").read_text(encoding="utf-8")
    sections = text.split("## Config and overrides", 1)[1].split("\n## ", 1)[0]
    missing = [key for key in config_keys() if not re.search(rf"\b{re.escape(key.rpartition('.')[2])}\b", sections)]
    assert not missing, f"docs/run-directory.md's config section does not name {missing}"


def test_every_relative_link_in_the_readme_and_docs_opens_a_file():
    """A link inside docs/ is relative to docs/: docs/monitor.md linked docs/docs/architecture.md."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages
              for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", page.read_text(encoding="utf-8"))
              if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists()]
    assert not broken, broken


def test_the_readmes_trainer_line_that_promises_tensorboard_says_how(tmp_path):
    """The installed transformers' TrainingArguments report to no TensorBoard by default
    (5.x: report_to=[]), so a README line promising TensorBoard from the HF callback must name
    report_to="tensorboard" or log_dir=."""
    transformers = pytest.importorskip("transformers")
    default = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True).report_to
    lines = [line for line in README.read_text().splitlines()
             if "GradflowTrainerCallback(" in line and "TensorBoard" in line]
    assert lines
    if "tensorboard" not in (default or []):
        assert all('report_to="tensorboard"' in line or "log_dir=" in line for line in lines), lines
