"""Where a run's first non-finite value came from, as evidence for the verdict and words for a
stop message. Pure logic over recorded windows (``Window.first_nonfinite``, from the monitor's
first-non-finite part, ``gradflow/monitor/nonfinite.py``).

Example:
    >>> first_source(monitor.history)                     # doctest: +SKIP
    {'module': 'dense_3', 'phase': 'forward', 'step': 12, 'window': 1, 'where': 'dense_3 (forward)', 'compiled': []}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradflow.analysis.rules import EXPLODING_UPDATE, layer_name

# A window's weight updates per step at or below this are small: a tenth of EXPLODING_UPDATE,
# 50x the healthy 1e-3 (rules.HEALTHY_UPDATE).
SMALL_UPDATE = EXPLODING_UPDATE / 10


def first_source(windows: Sequence[Any], field: str = "first_nonfinite") -> dict[str, Any] | None:
    """The earliest window's ``field`` (``first_nonfinite`` or ``first_overflow``) as a dict
    (module, phase, step, window index, ``where`` in words), or None when no window has one
    (a clean run, windows read from a run directory's tables, or a monitor without the part)."""
    for index, window in enumerate(windows):
        source = getattr(window, field, None)
        if source is not None:
            return {"module": source.module, "phase": source.phase, "step": source.step, "window": index,
                    "where": source.where(), "compiled": list(getattr(source, "compiled", ()))}
    return None


def sentence(found: dict[str, Any], epoch: int | None = None, step: int | None = None) -> str:
    """``the first non-finite value came from dense_3 (forward) at step 12`` (``epoch`` and a
    global ``step`` when the caller knows them: ``at epoch 0, step 12``)."""
    step = found["step"] if step is None else step
    when = f"at epoch {epoch}, step {step}" if epoch is not None else f"at step {step}"
    return f"the first non-finite value came from {_where(found)} {when}"


def _where(found: dict[str, Any]) -> str:
    """A source's place in a sentence: nn.Sequential's ``2 (forward)`` as ``layer '2' (forward)``."""
    where, module = found["where"], found["module"]
    if module[:1].isdigit() and where.startswith(module + " "):
        return layer_name(module) + where[len(module):]
    return where


def with_source(check: dict[str, Any], windows: Sequence[Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``exploding`` check with the first non-finite source put first in its ``why`` (when
    it fired), and notes: where the first GradScaler-skipped overflow came from (an overflow,
    not a NaN source). ``check`` is returned unchanged where there is nothing to add.

    A skipped step's value made in a forward pass is the source when the check fired and no
    applied step had one: the scale multiplies only the backward, so a forward NaN/inf is no
    calibration overflow (a weight gone NaN makes every later step skipped: nothing else names
    it)."""
    found, overflow = first_source(windows), first_source(windows, "first_overflow")
    if found is None and overflow is not None and overflow["phase"] == "forward" and check.get("fired"):
        found, overflow = {**overflow, "skipped": True}, None
    notes = [(f"the first overflow that a GradScaler skipped came from {_where(overflow)} at step "
              f"{overflow['step']} (an AMP overflow, not a NaN source)")] if overflow else []
    if found is None or not check.get("fired"):
        return check, notes
    skipped = " (a step the GradScaler skipped)" if found.get("skipped") else ""
    return {**check, "why": f"{sentence(found)}{skipped}; {check['why']}", "source": found}, notes


def domain_hint(windows: Sequence[Any], found: dict[str, Any] | None) -> str:
    """Advice beside ``exploding`` when the first non-finite value (``found``, ``first_source``)
    was made in a module's forward pass after one or more windows whose weight updates were all
    small (at most SMALL_UPDATE of the weights per step, ``weight_update_ratio`` / steps): a NaN
    made at a healthy step size usually comes from that module's own arithmetic (the log of a
    negative number), which a lower learning rate does not fix. '' otherwise, also for the input,
    the loss and compiled modules (no module of the user's code to point at)."""
    from gradflow.monitor.nonfinite import INPUT, LOSS

    if found is None or found["phase"] != "forward" or found["module"] in (INPUT, LOSS) or found["compiled"]:
        return ""
    before = windows[:found["window"]]
    ratios = [row["weight_update_ratio"] / max(w.steps, 1) for w in before for row in w.gradients.values()
              if isinstance(row.get("weight_update_ratio"), (int, float))
              and row["weight_update_ratio"] == row["weight_update_ratio"]]       # NaN: a weight that started at 0
    if not ratios or not max(ratios) <= SMALL_UPDATE:
        return ""
    return (f"The first non-finite value was made in the forward pass of {layer_name(found['module'])} after "
            f"{len(before)} window(s) of small updates (at most {max(ratios):.2g} of the weights per step): if that "
            "module takes a log, sqrt, power or division, or an exp that can overflow, check its input's range there "
            "(clamp it, add an epsilon) before changing the learning rate.")


def restore_source(windows: Sequence[Any], run_dir: str | Path) -> None:
    """Put the source that a run's ``summary.json`` keeps (``first_nonfinite``: written at the end
    of training) back on the window it came from, so that ``diagnose_run`` tells the story that
    ``gradflow train`` printed (the tables carry no source). Nothing when there is none."""
    from gradflow.monitor.nonfinite import Source

    path = Path(run_dir) / "summary.json"
    try:
        found = json.loads(path.read_text()).get("first_nonfinite") if path.exists() else None
    except (OSError, ValueError):
        return
    if isinstance(found, dict) and isinstance(found.get("window"), int) and 0 <= found["window"] < len(windows):
        compiled = found.get("compiled") if isinstance(found.get("compiled"), list) else []
        windows[found["window"]].first_nonfinite = Source(found["module"], found["phase"], int(found["step"]),
                                                          tuple(str(name) for name in compiled))
