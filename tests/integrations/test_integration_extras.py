"""Without a framework installed, importing its integration says in one line which extra to install;
the package itself imports no framework."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import sys
for name in ("lightning", "pytorch_lightning", "transformers"):
    sys.modules[name] = None          # as if not installed
import gradflow.integrations
assert not any(m in sys.modules and sys.modules[m] is not None for m in ("lightning", "transformers", "accelerate"))
for module in ("gradflow.integrations.lightning", "gradflow.integrations.transformers"):
    try:
        __import__(module)
    except Exception as e:
        print(type(e).__name__, e)
"""


def test_missing_extras_are_named():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert len(lines) == 2
    assert lines[0].startswith("MonitorError") and "pip install -e '.[lightning]'" in lines[0]
    assert lines[1].startswith("MonitorError") and "pip install -e '.[transformers]'" in lines[1]
    assert all("not on PyPI yet" in line for line in lines)
