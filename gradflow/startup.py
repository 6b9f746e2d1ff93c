"""What a gradflow process does to start and end fast; the garbage collector is most of it.

Importing torch, torch._dynamo (with sympy), TensorBoard and numba makes about half a million
Python objects, and Python's cyclic garbage collector walks them again and again while they
are made and once more when the interpreter exits. Measured here (``benchmarks/startup.py``
prints the figures): the collections took about 0.7 s of the 4 s of CPU before a run's first
epoch, and the exit 0.8 s more after its last line was printed.

Example (what ``gradflow train`` does):

    collector = StartupCollector()             # before the heavy imports
    try:
        fit(..., callbacks=[..., collector])   # collecting resumes after the first epoch
    finally:
        collector.close()
    prepare_exit()                             # only where the process ends next
"""

from __future__ import annotations

import gc


class StartupCollector:
    """Trainer callback: the cyclic garbage collector off from now until the first epoch ends.

    At the end of the first epoch ``gc.freeze()`` moves every object made so far (those modules,
    mostly) to the permanent generation, which no collection scans, and collecting resumes.
    ``close`` (after the run, also when it failed) unfreezes them and restores the collector's
    state, so a caller that goes on after the run (a test, a notebook) loses nothing.
    """

    def __init__(self) -> None:
        self._was_enabled = gc.isenabled()
        self._frozen = False
        gc.disable()

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self._frozen:
            self._frozen = True
            gc.freeze()
            if self._was_enabled:
                gc.enable()

    def close(self) -> None:
        if self._frozen:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()


def prepare_exit() -> None:
    """For a process that ends next: let the interpreter exit without collecting garbage.

    ``gc.freeze()`` moves every object to the permanent generation, which the collections at exit
    skip; exit handlers still run, and every file a command wrote is closed by then. Objects
    frozen are never collected, so call it only at the very end (the console script does through
    ``gradflow.cli.main()``, and ``scripts/train.py`` calls it).
    """
    gc.freeze()
