"""Long-range sequence tasks made in-process, for recurrent nets (issue 22).

``first_token``: "remember the first token" (the latching problem of Bengio, Simard & Frasconi
1994). Every sequence is T steps of one feature: step 0 is +1 or -1 at random, every later step
Gaussian noise of std ``noise`` (``data.noise``); the label is 1 when step 0 is +1. A model must
carry one bit over T - 1 steps of noise; chance is 0.5. With a loss on the last step only, the
gradient that teaches it to keep the bit has to travel back all T steps: a tanh RNN's vanishes
as T grows (Bengio et al. 1994; Pascanu et al. 2013), an LSTM's or GRU's need not.

Arrays come from numpy's ``default_rng(random_state)``: the data are fixed by
``data.random_state``, apart from ``train.seed``.

Example:
    >>> x, y = first_token(4, 6, 0)
    >>> x.shape, y.shape, bool(((x[:, 0, 0] > 0) == (y == 1)).all()), bool(abs(x[:, 1:]).max() < 1)
    ((4, 6, 1), (4,), True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def first_token(n_samples: int, length: int, random_state: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, length, 1) float32, y (n,) 0/1): x[:, 0] is +-1, later steps N(0, noise^2); y says
    whether x[:, 0] is +1."""
    rng = np.random.default_rng(random_state)
    bits = rng.integers(0, 2, size=n_samples)
    x = rng.normal(0.0, noise, size=(n_samples, length, 1)) if noise > 0 else np.zeros((n_samples, length, 1))
    x[:, 0, 0] = bits * 2 - 1
    return x.astype(np.float32), bits.astype(np.float32)


# name -> builder(n_samples, length, random_state, noise) -> (x (n, T, features), y (n,)).
SEQUENCE_TASKS: dict[str, Callable[[int, int, int, float], tuple[np.ndarray, np.ndarray]]] = {
    "first_token": first_token,
}


def sequence_arrays(cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, T, 1), y (n,)) of the sequence task a ``DataConfig`` names (``name``, ``n_samples``,
    ``sequence_length``, ``random_state``, ``noise``); ``data.load_dataset`` splits them at
    ``n_train``, with no scaling.

    Example:
        >>> from gradflow.experiments.config import DataConfig
        >>> x, y = sequence_arrays(DataConfig(name="first_token", sequence_length=20))
        >>> x.shape, y.shape
        ((1000, 20, 1), (1000,))
    """
    return SEQUENCE_TASKS[cfg.name](cfg.n_samples, cfg.sequence_length, cfg.random_state, cfg.noise)
