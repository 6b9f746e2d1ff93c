"""``python -m gradflow COMMAND ...``: the ``gradflow`` command (train, sweep, diagnose, compare)
from a source checkout without installing it, run from the repository root.

Example:
    python -m gradflow diagnose runs/deep_relu-20250101-120000-seed0
"""

import sys

from gradflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
