"""Oracles for the integration tests: gradient statistics straight from ``p.grad`` in the
framework's own hook, grouped into the callback's windows, and TensorBoard event files read back."""

from __future__ import annotations

import glob
import math

import torch


def grad_row(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per parameter with a gradient: mean |g|, L2 norm, max |g|; and the total L2 norm as
    ``clip_grad_norm_`` computes it under ``""``."""
    rows, squares = {}, 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().double()
        rows[name] = {"mean_abs": g.abs().mean().item(), "norm": g.norm().item(), "max_abs": g.abs().max().item()}
        squares += g.pow(2).sum().item()
    rows[""] = {"total_norm": math.sqrt(squares)}
    return rows


def windows(records: list[dict], labels: list[int]) -> dict[int, dict[str, dict[str, float]]]:
    """Mean of each statistic over the steps of each window; window ``label`` holds steps
    (previous label, label], counting steps from 1. A record of None (a skipped step) counts as
    a step but not in the means."""
    out, start = {}, 0
    for label in labels:
        chunk = [r for r in records[start:label] if r is not None]
        assert chunk, f"no oracle records for the window ending at step {label}"
        out[label] = {name: {key: sum(r[name][key] for r in chunk) / len(chunk) for key in chunk[0][name]}
                      for name in chunk[0]}
        start = label
    return out


def tensorboard(logdir: str):
    """An EventAccumulator over every event file under ``logdir`` (all values kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True)
    assert files, f"no TensorBoard event files under {logdir}"
    accumulators = []
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def scalar_series(accumulators, tag: str) -> dict[int, float]:
    """step -> value of ``tag`` across the event files."""
    out = {}
    for acc in accumulators:
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def has_tag(accumulators, kind: str, tag: str) -> bool:
    return any(tag in acc.Tags()[kind] for acc in accumulators)


def compare(oracle: dict[int, dict[str, dict[str, float]]], accumulators, keys=("mean_abs", "norm", "max_abs"),
            prefix: str = "") -> float:
    """Largest relative error between the oracle and the values in TensorBoard; every oracle
    value must be there."""
    worst = 0.0
    for step, rows in oracle.items():
        for name, row in rows.items():
            if name == "":
                continue
            for key in keys:
                tag = f"grad/{prefix}{name.replace('.', '/')}/{key}"
                written = scalar_series(accumulators, tag)
                assert step in written, f"{tag} not written at step {step} (steps: {sorted(written)})"
                worst = max(worst, abs(written[step] - row[key]) / max(abs(row[key]), 1e-30))
    return worst
