"""The history's older windows in compact form (compact.py): the same rows, an eighth of the memory.

Oracles: each window's rows copied as dicts right after its ``log()`` (what the window held
before it was compacted), the verdict over a history of plain dicts, and the bytes the same
rows take as dicts (tracemalloc).
"""

from __future__ import annotations

import copy
import gc
import math
import pickle
import tracemalloc
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradflow.analysis.diagnose import diagnose
from gradflow.monitor import GradientMonitor
from gradflow.monitor.compact import RECENT, Layouts, Row, RowTable, compact_rows

TABLES = ("gradients", "weights", "activations")


def _model() -> nn.Module:
    """Tanh and ReLU taps (their rows have different columns), a bias that starts at zero
    (its update ratio is NaN), every parameter trained."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(3, 8), tanh_1=nn.Tanh(), dense_2=nn.Linear(8, 8),
                                      relu_2=nn.ReLU(), dense_3=nn.Linear(8, 1)))
    nn.init.zeros_(model.dense_2.bias)
    return model


def _same(a, b) -> bool:
    """Equal numbers, NaN equal to NaN, and the same type (ints stay ints)."""
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def _train(windows: int, **kwargs) -> tuple[GradientMonitor, list[dict]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    made = []
    monitor = GradientMonitor(model, activations_every=1, **kwargs)
    for window in range(windows):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 3)).pow(2).mean().backward()
            optimizer.step()
        monitor.log(window)
        made.append({table: copy.deepcopy(getattr(monitor.history[-1], table)) for table in TABLES})
    monitor.remove()
    return monitor, made


def test_old_windows_read_exactly_as_log_made_them():
    monitor, made = _train(6)
    history = monitor.history
    assert all(isinstance(getattr(w, t), RowTable) for w in history[:-RECENT] for t in TABLES)
    assert all(type(getattr(w, t)) is dict for w in history[-RECENT:] for t in TABLES)
    for window, rows in zip(history, made):
        for table in TABLES:
            kept = getattr(window, table)
            assert list(kept) == list(rows[table])                       # the same names, in order
            for name, row in rows[table].items():
                assert list(kept[name]) == list(row)                     # the same columns, in order
                assert all(_same(kept[name][c], v) and _same(kept[name].get(c), v) for c, v in row.items()), name
                assert (kept[name] == row and row == kept[name] and dict(kept[name]) == row) or \
                    any(v != v for v in row.values())                 # NaN equals nothing, as in a dict
                assert "no such column" not in kept[name] and kept[name].get("no such column", 7) == 7
    assert math.isnan(made[0]["gradients"]["dense_2.bias"]["weight_update_ratio"])         # a NaN kept as NaN
    assert set(made[0]["activations"]["tanh_1"]) != set(made[0]["activations"]["relu_2"])   # two layouts


def test_old_windows_are_read_only():
    monitor, _ = _train(RECENT + 2)
    old = monitor.history[0]
    with pytest.raises(TypeError):
        old.gradients["dense_1.weight"] = {}
    with pytest.raises(TypeError):
        old.gradients["dense_1.weight"]["norm"] = 1.0


def test_the_verdict_over_a_compact_history_is_the_verdict_over_dicts():
    monitor, made = _train(8)
    plain = [copy.copy(w) for w in monitor.history]
    for window, rows in zip(plain, made):
        for table in TABLES:
            setattr(window, table, rows[table])
    compact, dicts = diagnose(monitor.history), diagnose(plain)
    assert compact.to_dict() == dicts.to_dict()


def test_a_compact_window_takes_an_eighth_of_the_memory():
    """Rows of 48 parameters with the monitor's columns: the compact table's bytes (tracemalloc)
    against the same rows as dicts of Python floats."""
    torch.manual_seed(1)
    columns = ("mean", "mean_abs", "norm", "max_abs", "zero_fraction", "nonfinite", "steps", "skipped_steps",
               "weight_l1", "weight_norm", "weight_update_ratio")
    shared = Layouts()
    compact_rows({f"p{i}": dict.fromkeys(columns, 0.5) for i in range(48)}, shared)    # the shared index and layouts

    def made():
        values = torch.rand(48, len(columns), dtype=torch.float64).tolist()
        return {f"p{i}": {c: (int(v * 100) if c in ("nonfinite", "steps", "skipped_steps") else v)
                          for c, v in zip(columns, row)} for i, row in enumerate(values)}

    gc.collect()
    tracemalloc.start()
    as_dicts = [made() for _ in range(20)]
    dict_bytes = tracemalloc.get_traced_memory()[0]
    tables = [compact_rows(rows, shared) for rows in as_dicts]
    del as_dicts
    gc.collect()
    compact_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert all(isinstance(t, RowTable) for t in tables)
    assert compact_bytes * 6 < dict_bytes, (compact_bytes, dict_bytes)


def test_rows_that_are_not_plain_numbers_stay_dicts():
    shared = Layouts()
    for rows in ({"a": {"norm": 1.0, "flag": True}}, {"a": {"norm": 1.0, "name": "x"}},
                 {"a": {"norm": 2 ** 60}}, {"a": {"norm": torch.tensor(1.0)}}, {"a": [1.0]}, {}):
        assert compact_rows(rows, shared) is rows


def test_compact_tables_copy_and_pickle_as_the_rows_they_hold():
    monitor, made = _train(RECENT + 1)
    table = monitor.history[0].gradients
    def same_rows(a, b):
        return list(a) == list(b) and all(list(a[n]) == list(b[n]) and all(_same(a[n][c], b[n][c]) for c in b[n])
                                          for n in b)

    for copied in (pickle.loads(pickle.dumps(table)), copy.deepcopy(table)):
        assert isinstance(copied, RowTable) and same_rows(copied, made[0]["gradients"])
    row = table["dense_1.weight"]
    assert isinstance(row, Row) and pickle.loads(pickle.dumps(row)) == made[0]["gradients"]["dense_1.weight"]


def test_a_history_without_a_bound_is_compact_too_and_a_short_one_keeps_its_length():
    monitor, made = _train(RECENT + 3, history_length=None)
    assert isinstance(monitor.history[0].gradients, RowTable)
    monitor, made = _train(5, history_length=1)
    assert len(monitor.history) == 1 and type(monitor.history[0].gradients) is dict


def test_rows_of_different_columns_or_types_keep_each_their_own():
    """Rows with other columns (a tanh's and a ReLU's), a column of ints in one row and floats in
    another, and a NaN and infinities: each row reads back as it was, in its own order."""
    rows = {"tanh": {"mean": 0.1, "std": 0.5, "saturated": 0.25},
            "relu": {"mean": 0.2, "std": float("nan"), "dead_fraction": 0.5},
            "odd": {"std": float("inf"), "mean": -float("inf")},
            "count": {"mean": 3, "std": 0.0},
            "big": {"mean": 2 ** 53, "std": -0.0}}
    table = compact_rows(rows, Layouts())
    assert isinstance(table, RowTable) and list(table) == list(rows)
    for name, row in rows.items():
        assert list(table[name]) == list(row)
        assert all(_same(table[name][c], v) for c, v in row.items()), name
    assert math.copysign(1.0, table["big"]["std"]) == -1.0
    mixed = {"a": {"steps": 3, "norm": 1.0}, "b": {"steps": 4.5, "norm": 2.0}}
    table = compact_rows(mixed, Layouts())
    assert isinstance(table, RowTable) and table["a"]["steps"] == 3 and type(table["a"]["steps"]) is int
    assert type(table["b"]["steps"]) is float


def test_a_compact_table_with_nan_equals_itself_and_the_rows_it_was():
    """A window's tables compare equal to themselves, their copies and the dicts they were, NaN
    included (dense_2.bias starts at zero: its update ratio is NaN), as the dicts did: a dict
    compares its one NaN object to itself, where a Row makes a new float at each read."""
    monitor, made = _train(RECENT + 1)
    window = monitor.history[0]
    assert isinstance(window.weights, RowTable)
    assert math.isnan(window.weights["dense_2.bias"]["update_ratio"])
    assert made[0]["weights"] == made[0]["weights"]                          # the oracle: what log() made
    for table in TABLES:
        compact = getattr(window, table)
        assert compact == compact and compact == made[0][table] and made[0][table] == compact, table
        assert compact == copy.deepcopy(compact) and compact == pickle.loads(pickle.dumps(compact)), table
    assert window.weights != monitor.history[1].weights
    assert window.weights["dense_2.bias"] != {**made[0]["weights"]["dense_2.bias"], "update_ratio": 0.0}


def test_rows_without_columns_are_kept_and_the_window_still_logs():
    """Rows that all have no columns (a user emptied a recent window's rows) compact to empty rows,
    where they made the log() that aged the window raise (range() arg 3 must not be zero)."""
    for rows in ({"a": {}}, {"a": {}, "b": {}}):
        table = compact_rows(rows, Layouts())
        assert dict(table) == rows and all(len(table[name]) == 0 for name in rows)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, activations_every=1) as monitor:
        for window in range(RECENT + 2):
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
            monitor.log(window)
            if window == 0:
                for name in monitor.history[-1].activations:
                    monitor.history[-1].activations[name] = {}
    assert all(len(row) == 0 for row in monitor.history[0].activations.values())
