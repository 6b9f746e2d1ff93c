"""Print each module of gradflow/ with its size in lines, largest first (docs/architecture.md
lists the modules; their sizes are printed here instead of kept by hand). The second column
counts lines of code: not blank, not only a comment, not part of a docstring.

    python scripts/module_sizes.py
    python scripts/module_sizes.py monitor/monitor.py      # some modules only
"""

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gradflow"
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENCODING, tokenize.ENDMARKER}


def code_lines(text: str) -> int:
    """Lines holding code: a token that is not a comment, outside every module, class and
    function docstring."""
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def sizes(only: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(module path under gradflow/, lines, lines of code) of every module (or of ``only``),
    largest first."""
    found = []
    for p in ROOT.rglob("*.py"):
        name = str(p.relative_to(ROOT))
        if only and name not in only:
            continue
        text = p.read_text(encoding="utf-8")
        found.append((name, len(text.splitlines()), code_lines(text)))
    return sorted(found, key=lambda item: (-item[1], item[0]))


if __name__ == "__main__":
    rows = sizes(sys.argv[1:])
    print(" lines   code  module")
    for name, lines, code in rows:
        print(f"{lines:6d} {code:6d}  {name}")
    print(f"{sum(r[1] for r in rows):6d} {sum(r[2] for r in rows):6d}  in {len(rows)} modules")
