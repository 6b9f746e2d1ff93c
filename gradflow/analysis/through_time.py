"""Vanishing or exploding gradients through time, from the windows' ``Window.time`` profiles
(gradflow.monitor.through_time: entry t of a layer's profile is ||dL/dh_t||_2).

A recurrent net is as deep as its sequence is long: the gradient the loss sends back to h_t is
multiplied by one recurrent Jacobian per step, and shrinks or grows geometrically with the
distance (Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013). A per-parameter
gradient cannot show it, because it sums the contributions of every time step. So this module
reads the profile over t of every recurrent layer and direction:

- reach: ||dL/dh|| at the step the layer processes first (t = 0 forward, T - 1 reverse) over its
  largest over t (``gradflow.monitor.through_time.reach``);
- horizon: the steps where ||dL/dh_t|| is at least HORIZON_FRACTION = 1e-3 of the largest
  (``...through_time.horizon``, a relative form of Pascanu et al.'s "steps in the past");
- growth: the first-processed step's ||dL/dh|| over the last-processed step's.

Each is the median over the late windows (the last LATE_FRACTION of the windows with a profile,
at least one): what the net ends with, not its start. An LSTM at PyTorch's init forgets half its
state per step, so early on its gradient reaching step 0 of a 100-step sequence is ~1e-20 of the
last step's whether it goes on to learn or not; one that learns ends with a usable reach.

Rules (``check_through_time``; thresholds measured on the sweep in docs/through_time.md):
- vanishing: some layer's late reach < VANISHING_REACH = 1e-4 (the far end of the sequence gets
  less than 1/10,000 of the gradient of the near end) AND the loss did not learn: its tail
  (``measures.measure_loss``) is above LEARNED_SHARE = 1/2 of the first epoch's, or no loss is
  known. A net that learned to latch what it needs keeps it in saturated units, which pass no
  gradient (Bengio, Simard & Frasconi 1994: robust latching implies vanishing gradients): a
  tanh RNN that learned first_token at T=50 ends with a reach of 0, its loss down 100%. That
  case is a note, not a verdict. Measured on the sweep (first_token, 12 epochs, 3 seeds,
  docs/through_time.md): every run that did not learn ends with a reach of 0 - 6e-6 (tanh RNN
  at T=50 and 100, LSTM at PyTorch's init at T=20 - 100); every run that learned ends at 8e-6 -
  1 (the tanh RNN at T=10, seed 2: 8e-6) or at 0 with its loss down 100% (tanh RNN, T=50): the
  reach alone does not separate them, the loss gate does. 1e-4 sits above every failed run
  (16x margin) and below all but one of the learned runs.
- exploding: a non-finite ||dL/dh_t|| in any window, or a layer whose gradient grows back
  through time by more than EXPLODING_GROWTH = 1000x (first-processed over last-processed
  step), median over the late windows (Pascanu et al. 2013: exploding gradients grow
  geometrically with the distance). One window's spike is a note, not a verdict: a GRU that
  learned first_token at T=100 (seed 0, loss 0.004) had one window at 2000x, its late median
  2.3x; its loss wobbled (0.004 -> 0.017) and its accuracy stayed 1.0. Also exploding: a window
  whose largest ||dL/dh_t|| is SPIKE = 100x the median of the earlier windows' largest, in a run
  whose loss did not end learned (as for vanishing): the LSTM (chrono 5) at T=100, seed 2,
  learned (loss 0.01), then one window's gradient jumped 720x and the loss ended at 1.35, above
  chance; the GRU above jumped 330x and kept its loss at 0.017 (a note).

The check returns the verdict name, a sentence of evidence and an advice key; ``diagnose``
folds it into its checks (``fold_into_checks``) and advice (``time_recommendation``).

Example:
    >>> import numpy as np
    >>> from gradflow.monitor import Window
    >>> w = [Window(i, 10, time={"rnn_1.l0": np.logspace(-12, 0, 100)}, time_cells={"rnn_1.l0": "RNN_TANH"})
    ...      for i in range(8)]
    >>> check = check_through_time(w)
    >>> check["verdict"], check["advice"]
    ('vanishing', 'vanishing/rnn')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradflow.monitor.through_time import (
    HORIZON_FRACTION,
    far_end,
    growth,
    horizon,
    reach,
)

VANISHING_REACH = 1e-4      # late ||dL/dh|| at the far end over the largest: under this, vanishing
EXPLODING_GROWTH = 1e3      # ||dL/dh|| growing back through time by more than this: exploding
SPIKE = 100.0               # a window's largest ||dL/dh_t|| this many times the earlier windows' median
LATE_FRACTION = 0.25        # the late windows: the last quarter of those with a profile
LEARNED_SHARE = 0.5         # a loss ending under this share of its first epoch's learned something

CELL_FAMILY = {"RNN_TANH": "rnn", "RNN_RELU": "rnn", "LSTM": "lstm", "GRU": "gru"}

# Advice for recurrent nets whose gradient vanishes or explodes through time, per cell family.
# Sources: LSTM, Hochreiter & Schmidhuber 1997; GRU, Cho et al. 2014; forget-gate bias 1,
# Gers et al. 2000 and Jozefowicz et al. 2015; chrono initialisation, Tallec & Ollivier 2018;
# clipping the gradient norm, Pascanu et al. 2013; truncated backpropagation through time,
# Williams & Peng 1990. No optimizer advice: the windows do not say which optimizer ran.
TIME_ADVICE = {
    "vanishing/rnn": "The gradient vanishes through time: a plain RNN's reaches only the last few steps of the "
                     "sequence, so it cannot learn what lies further back. Use an LSTM or a GRU (nn.LSTM, nn.GRU) "
                     "with a forget-gate (update-gate) bias of 1 or more, or chrono initialisation for dependencies "
                     "of T steps (forget bias log(U(1, T - 1)), input bias its negative; {chrono}); "
                     "or shorten the distance the gradient must travel: truncated backpropagation through time over "
                     "fewer steps, a loss at every step, shorter sequences.",
    "vanishing/lstm": "The gradient vanishes through time inside the LSTM: its forget gate, at about 0.5 with "
                      "PyTorch's zero bias, halves the state at every step. Initialise the forget-gate bias to 1 "
                      "(Jozefowicz et al. 2015; Keras' unit_forget_bias) or, for dependencies of T steps, use chrono "
                      "initialisation (forget bias log(U(1, T - 1)), input bias its negative; {chrono}); "
                      "use fewer stacked layers, or truncated backpropagation through time over "
                      "fewer steps.",
    "vanishing/gru": "The gradient vanishes through time inside the GRU: its update gate, at about 0.5 with "
                     "PyTorch's zero bias, replaces half the state at every step. Give the update gate a positive "
                     "bias (chrono initialisation: log(U(1, T - 1)) for dependencies of T steps; {chrono}), "
                     "use fewer stacked layers, or truncated backpropagation through time over fewer "
                     "steps.",
    "exploding/rnn": "The gradient explodes through time: clip its norm (torch.nn.utils.clip_grad_norm_, max_norm "
                     "1-5, Pascanu et al. 2013) and lower the learning rate; a ReLU RNN needs a recurrent matrix "
                     "of spectral radius at most 1 (or tanh, or an LSTM/GRU); truncated backpropagation through "
                     "time over fewer steps bounds the growth.",
    "exploding/lstm": "The gradient explodes through time: clip its norm (torch.nn.utils.clip_grad_norm_, max_norm "
                      "1-5, Pascanu et al. 2013) and lower the learning rate; truncated backpropagation through "
                      "time over fewer steps bounds the growth.",
}
TIME_ADVICE["exploding/gru"] = TIME_ADVICE["exploding/lstm"]


def _late(windows: Sequence[Any]) -> list[Any]:
    timed = [w for w in windows if getattr(w, "time", None)]
    return timed[-max(1, math.ceil(len(timed) * LATE_FRACTION)):] if timed else []


def measure_time(windows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per recurrent layer key: ``cell``, ``steps`` (T), ``reach_early`` (first window),
    ``reach`` / ``horizon`` / ``growth`` (medians over the late windows), ``growth_max`` (over
    every window), ``nonfinite`` (windows with a non-finite entry), ``late_windows``."""
    timed = [w for w in windows if getattr(w, "time", None)]
    late = _late(windows)
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(k for w in timed for k in w.time):
        profiles = [np.asarray(w.time[key], dtype=np.float64) for w in timed if key in w.time]
        late_profiles = [np.asarray(w.time[key], dtype=np.float64) for w in late if key in w.time] or profiles[-1:]
        cell = next((w.time_cells.get(key) for w in timed if getattr(w, "time_cells", {}).get(key)), "")
        growths = [growth(p, key) for p in profiles]
        out[key] = {
            "cell": cell, "steps": len(profiles[-1]),
            "reach_early": reach(profiles[0], key),
            "reach": _median([reach(p, key) for p in late_profiles]),
            "horizon": int(np.median([horizon(p) for p in late_profiles])),
            "growth": _median([growth(p, key) for p in late_profiles]),
            "growth_max": max((g for g in growths if math.isfinite(g)), default=math.nan),
            "nonfinite": sum(not np.isfinite(p).all() for p in profiles),
            **_spike([w for w in timed if key in w.time], profiles),
            "late_windows": len(late_profiles), "profiled": len(profiles),
            "first_step": next(w.step for w in timed if key in w.time),
        }
    return out


def _when(row: Mapping[str, Any], early: str = "") -> str:
    """When a layer's profile was read, in words: the late median, or the only profiled window
    (a loop shorter than ``through_time_every`` steps is profiled at its first step alone).
    ``early``: the first window's value, said beside the late median."""
    if row["profiled"] == 1:
        return (f"in the only window profiled through time (logged at {row['first_step']}; the monitor profiles "
                "every through_time_every-th optimizer step)")
    return f"late in the run (median of the last {row['late_windows']} window(s){early})"


def _spike(timed: list[Any], profiles: list[np.ndarray]) -> dict[str, Any]:
    """The largest jump of a window's largest ||dL/dh_t|| over the median of the windows before
    it (``spike``, NaN with fewer than 3 windows before) and that window's step."""
    tops = [float(np.nanmax(p)) if p.size and np.isfinite(p).any() else math.nan for p in profiles]
    best, step = math.nan, None
    for i in range(3, len(tops)):
        before = _median(tops[:i])
        if math.isfinite(tops[i]) and before > 0 and not tops[i] / before <= best:
            best, step = tops[i] / before, timed[i].step
    return {"spike": best, "spike_step": step}


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def check_through_time(windows: Sequence[Any], loss: dict[str, float] | None = None) -> dict[str, Any]:
    """The through-time check: ``{"fired", "verdict" ("vanishing", "exploding" or None), "why",
    "value", "threshold", "advice" (a TIME_ADVICE key or None), "layers" (measure_time)}``.

    Exploding is judged first (a non-finite or 1000x-growing gradient), then vanishing on the
    layer with the smallest late reach, unless ``loss`` (``measures.measure_loss``) says the run
    learned (see LEARNED_SHARE).
    """
    layers = measure_time(windows)
    if not layers:
        return _result(None, "no recurrent layer profiled through time", None, None, None, layers)
    bad = [k for k, row in layers.items() if row["nonfinite"]]
    if bad:
        return _result("exploding", f"through time: non-finite ||dL/dh_t|| in {layers[bad[0]]['nonfinite']} "
                       f"window(s) of {bad[0]}", math.inf, EXPLODING_GROWTH, _advice("exploding", layers[bad[0]]), layers)
    growing = max(layers, key=lambda k: _sortable(layers[k]["growth"], -math.inf))
    if layers[growing]["growth"] > EXPLODING_GROWTH:
        row = layers[growing]
        return _result("exploding", f"through time: in {growing} the gradient reaching {_far(growing, row)} is "
                       f"{row['growth']:.2g}x that of {_near(growing, row)} {_when(row)}: it grows on its way back",
                       row["growth"], EXPLODING_GROWTH, _advice("exploding", row), layers)
    jumps = {k: row["spike"] for k, row in layers.items() if math.isfinite(row["spike"])}
    jump = max(jumps, key=jumps.get) if jumps else None
    if jump is not None and jumps[jump] > SPIKE and not _learned(loss):
        row = layers[jump]
        return _result("exploding", f"through time: in {jump} one window's largest ||dL/dh_t|| was {jumps[jump]:,.0f}x "
                       f"the earlier windows' median (at epoch {row['spike_step']}), and the loss did not end learned",
                       jumps[jump], SPIKE, _advice("exploding", row), layers)
    spike = max(layers, key=lambda k: _sortable(layers[k]["growth_max"], -math.inf))
    weakest = min(layers, key=lambda k: _sortable(layers[k]["reach"], math.inf))
    row = layers[weakest]
    early = f"; {_ratio(row['reach_early'])} in the first"
    why = (f"through time: the gradient reaching {_far(weakest, row)} of {weakest} is {_ratio(row['reach'])} of its "
           f"largest, {_when(row, early)}; it stays within {HORIZON_FRACTION:g} of it for "
           f"{row['horizon']} of {row['steps']} steps")
    if layers[spike]["growth_max"] > EXPLODING_GROWTH:
        why += (f"; one window's gradient in {spike} grew {layers[spike]['growth_max']:.2g}x on its way back to "
                f"{_far(spike, layers[spike])} (a spike, not the late median)")
    fired = math.isfinite(row["reach"]) and row["reach"] < VANISHING_REACH
    if fired and _learned(loss):
        fired = False
        why += (f"; but the loss fell from {loss['first']:.3g} to {loss['tail']:.3g}: the net learned and holds "
                "what it needs in saturated units, which pass no gradient back (Bengio et al. 1994)")
    return _result("vanishing" if fired else None, why, row["reach"], VANISHING_REACH,
                   _advice("vanishing", row) if fired else None, layers)


def _learned(loss: dict[str, float] | None) -> bool:
    if not loss:
        return False
    first, tail = loss.get("first", math.nan), loss.get("tail", math.nan)
    return math.isfinite(first) and math.isfinite(tail) and first > 0 and tail < LEARNED_SHARE * first


def _result(verdict, why, value, threshold, advice, layers) -> dict[str, Any]:
    return {"fired": verdict is not None, "verdict": verdict, "why": why, "value": value, "threshold": threshold,
            "advice": advice, "layers": layers}


def _advice(verdict: str, row: dict[str, Any]) -> str:
    return f"{verdict}/{CELL_FAMILY.get(row['cell'], 'lstm')}"


def _far(key: str, row: dict[str, Any]) -> str:
    return f"time step {0 if far_end(key) == 0 else row['steps'] - 1}"


def _near(key: str, row: dict[str, Any]) -> str:
    return f"step {row['steps'] - 1 if far_end(key) == 0 else 0}"


def _ratio(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return "0" if value == 0 else f"{value:.1g}" if value < 0.01 else f"{value:.2f}"


def _sortable(value: float, missing: float) -> float:
    return value if math.isfinite(value) else missing


# -- the hook into diagnose (small on purpose: the rules table may absorb it) --------------


def fold_into_checks(checks: dict[str, dict[str, Any]], time: dict[str, Any], notes: list[str]) -> None:
    """Put the through-time check into ``diagnose``'s checks: when it fired, it becomes the check of
    its verdict (the layer-wise reason, if that fired too, kept after it); else its evidence is a
    note."""
    verdict = time["verdict"]
    if verdict is None:
        if time["layers"]:
            notes.append(time["why"])
        return
    before = checks.get(verdict, {})
    why = time["why"] + (f"; also {before['why']}" if before.get("fired") else "")
    checks[verdict] = {"fired": True, "why": why, "value": time["value"], "threshold": time["threshold"]}


def time_advice(key: str, context: str = "loop") -> str:
    """``TIME_ADVICE[key]`` with its pointers filled in for ``context`` (``advice.POINTERS``:
    chrono initialisation by hand in a user's loop, ``model.chrono`` in a gradflow run)."""
    from gradflow.analysis.advice import POINTERS

    return TIME_ADVICE[key].format(**POINTERS[context])


def time_recommendation(time: dict[str, Any], verdicts: Sequence[str], rest: str, context: str = "loop") -> str:
    """The advice: the through-time advice first when its check fired, then ``rest`` (the
    advice for the other verdicts, from ``advice.recommend``)."""
    if time["advice"] is None:
        return rest
    return " ".join(filter(None, [time_advice(time["advice"], context), rest]))
