"""Print each module of gradflow/ with its size in lines, largest first (docs/architecture.md
lists the modules; their sizes are printed here instead of kept by hand).

    python scripts/module_sizes.py
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gradflow"


def sizes() -> list[tuple[str, int]]:
    """(module path under gradflow/, lines) of every module, largest first."""
    found = [(str(p.relative_to(ROOT)), len(p.read_text(encoding="utf-8").splitlines())) for p in ROOT.rglob("*.py")]
    return sorted(found, key=lambda item: (-item[1], item[0]))


if __name__ == "__main__":
    rows = sizes()
    for name, lines in rows:
        print(f"{lines:6d}  {name}")
    print(f"{sum(lines for _, lines in rows):6d}  in {len(rows)} modules")
