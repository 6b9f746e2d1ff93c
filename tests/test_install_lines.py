"""Every install line that gradflow shows (docs/*.md and the error messages in gradflow/) works
from a source checkout: ``pip install -e '.[EXTRA]'`` with an extra that pyproject.toml defines,
or a plain package that one of the extras names. ``gradflow-torch`` is not on PyPI yet, so no
line tells a user to ``pip install`` it by name (and ``pip install gradflow`` would fetch an
unrelated project). README.md has its own test (tests/test_readme.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:      # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# What one pip install names: an optional -e and one target, quoted or bare (write one target per line).
INSTALL = re.compile(r"pip install ((?:-e |--editable )?(?:'[^']*'|\"[^\"]*\"|[^\s'\"`),;]+))")


def shown_lines() -> list[tuple[str, str]]:
    """(where, text) of each pip install in the docs and in the package's source."""
    files = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "gradflow").rglob("*.py"))
    return [(f"{path.relative_to(ROOT)}:{n}", match.group(1))
            for path in files for n, line in enumerate(path.read_text().splitlines(), 1)
            for match in INSTALL.finditer(line)]


def package_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


EXTRA_PACKAGES = {package_name(r) for requirements in EXTRAS.values() for r in requirements}


def check(words: str) -> None:
    """One install line's arguments work from a checkout; AssertionError naming what does not."""
    # {extra} in an f-string message stands for the extra its caller names (test_integration_extras.py)
    args = [a.strip("'\"").replace("{extra}", "lightning") for a in re.findall(r"'[^']*'|\"[^\"]*\"|\S+", words)]
    if args[0] in ("-e", "--editable"):
        target = args[1]
        assert re.fullmatch(r"\.(\[[a-z0-9_,-]+\])?", target), f"{words}: install the checkout as -e '.[EXTRA]'"
        extras = target[2:-1].split(",") if "[" in target else []
        unknown = [e for e in extras if e not in EXTRAS]
        assert not unknown, f"{words}: no extra {unknown} in pyproject.toml (extras: {', '.join(EXTRAS)})"
        return
    for arg in args:
        name = package_name(arg)
        assert name not in ("gradflow", "gradflow-torch"), \
            f"{words}: gradflow-torch is not on PyPI yet; install from a checkout with pip install -e '.[EXTRA]'"
        assert name in EXTRA_PACKAGES, f"{words}: {name} is not a package of any extra in pyproject.toml"


def test_install_lines_are_found():
    lines = shown_lines()
    assert any("executors.py" in where for where, _ in lines) and any("_common.py" in where for where, _ in lines)


@pytest.mark.parametrize("where, words", shown_lines(), ids=lambda value: value if ":" in value else None)
def test_install_line_works_from_a_checkout(where, words):
    check(words)


def test_the_checker_refuses_what_does_not_work():
    for bad in ("'gradflow-torch[lightning]'", "gradflow", "-e '.[lightnin]'", "-e git+x", "torchvision"):
        with pytest.raises(AssertionError):
            check(bad)
    check("-e '.[lightning]'")
    check("-e '.[test,lightning,transformers]'")
    check("'ray>=2.9'")
