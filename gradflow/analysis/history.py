"""The format of history.csv, a run's per-epoch loss and accuracy: writer and reader side by side.

The experiments write it (``write_history``, after training); the analysis reads it back
(``read_history``: the loss for the verdict, every column for ``compare``). Columns:
``HISTORY_FIELDS``, one row per epoch, as Keras' CSVLogger writes them.

Example:
    >>> import tempfile
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> _ = write_history(run_dir, [{"epoch": 0, "loss": 0.7, "accuracy": 0.5, "val_loss": 0.7, "val_accuracy": 0.5}])
    >>> read_history(run_dir)
    [{'epoch': 0.0, 'loss': 0.7, 'accuracy': 0.5, 'val_loss': 0.7, 'val_accuracy': 0.5}]
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

HISTORY_FILE = "history.csv"
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def write_history(run_dir: Path, history: Iterable[Mapping[str, float]]) -> Path:
    """Write ``history.csv``: epoch (from 0, as Keras' CSVLogger), loss, accuracy, val_loss, val_accuracy.

    Example:
        >>> import tempfile
        >>> p = write_history(Path(tempfile.mkdtemp()), [{"epoch": 0, "loss": 0.7, "accuracy": 0.5, "val_loss": 0.7, "val_accuracy": 0.5}])
        >>> p.read_text().splitlines()[0]
        'epoch,loss,accuracy,val_loss,val_accuracy'
    """
    path = run_dir / HISTORY_FILE
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    return path


def read_history(run_dir: str | Path) -> list[dict[str, float]] | None:
    """The rows of ``run_dir``'s history.csv, one dict per epoch with every non-empty cell as a
    float; None when the run has no history.csv."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]
