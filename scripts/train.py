"""Train from a YAML config; the same as ``gradflow train``.

Examples (from the repository root):

    python scripts/train.py configs/deep_relu.yaml
    python scripts/train.py configs/deep_relu.yaml model.depth=20 train.epochs=50 --seed 1
    python scripts/train.py configs/deep_tanh.yaml --logdir /tmp/runs --device cpu --quiet
"""

import sys
from pathlib import Path

# Works from a fresh clone without installing: put the repository root first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradflow.cli import main  # noqa: E402
from gradflow.startup import prepare_exit  # noqa: E402

if __name__ == "__main__":
    status = main(["train", *sys.argv[1:]])
    prepare_exit()
    sys.exit(status)
