"""The monitor's parts, in the order the coordinator calls them: the one list of part classes.

A new statistic is one new file with a ``Part`` subclass (``part.py``) and one line here.
Order matters where a part reads what an earlier one wrote: ``Conversions`` first (its forward
pre-hook and step check follow a model moved to another device or dtype before any other part
sees a tensor there), ``Gradients`` first among the parts that record statistics (its ``record``
returning False ends a step with no gradient), ``Weights`` after it (it joins ``weight_*`` columns
to the gradient rows), ``ForwardOrder`` before it (its hooks go at the first step, whatever it
recorded), ``FirstNonFinite`` after it (its step count is the steps ``Gradients`` recorded:
ZeroRedundancyOptimizer's or Lookahead's step and their inner optimizer's are one).
"""

from __future__ import annotations

from gradflow.monitor.activations import Activations
from gradflow.monitor.clipping import Clipping
from gradflow.monitor.conversions import Conversions
from gradflow.monitor.gates import Gates
from gradflow.monitor.gradients import Gradients
from gradflow.monitor.nonfinite import FirstNonFinite
from gradflow.monitor.order import ForwardOrder
from gradflow.monitor.part import Part
from gradflow.monitor.through_time import ThroughTimePart
from gradflow.monitor.unrecorded import Unrecorded
from gradflow.monitor.weights import Weights

PARTS: list[type[Part]] = [
    Conversions,             # first: every part follows a model moved or converted before it records
    ForwardOrder,
    Gradients,
    FirstNonFinite,          # after Gradients: a wrapper's step and its inner optimizer's count once
    Clipping,
    Weights,
    Gates,
    Activations,
    Unrecorded,
    ThroughTimePart,
]


def create_parts(model, setup) -> dict[str, Part]:
    """One part of each class in ``PARTS`` that wants to be there (``Part.create``), by name."""
    parts = {}
    for cls in PARTS:
        part = cls.create(model, setup)
        if part is not None:
            parts[cls.name] = part
    return parts


def recorders(parts: dict[str, Part]) -> list[Part]:
    """The parts that record something at each step (the hot path calls only these), in order."""
    return [p for p in parts.values() if type(p).record is not Part.record]
