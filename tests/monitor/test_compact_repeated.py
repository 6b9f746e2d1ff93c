"""compact_rows over tables of a shape seen before (``Layouts.seen``): the same RowTable, or the
same rows given back, as a full check of every value would give.

Oracle: ``_previous_compact_rows``, compact.py's ``compact_rows`` as it was before it remembered
the types of the last table of each shape (commit 07806f4), run on the same tables with a
``Layouts`` of its own. Each fallback is tested right after a table of the same shape that
compacted, so that the remembered types are there and differ.
"""

from __future__ import annotations

import itertools
import math
import random
from array import array

import numpy as np
import pytest
import torch

from gradflow.monitor.compact import Layouts, RowTable, _Layout, compact_rows

_EXACT = 2 ** 53
COLUMNS = ("mean", "norm", "max_abs", "nonfinite", "steps", "skipped_steps", "weight_norm")
INTS = {"nonfinite", "steps", "skipped_steps"}


def _previous_compact_rows(rows, shared):
    """compact.compact_rows at 07806f4 (with its _uniform and _layout), for the oracle."""
    if not rows or type(rows) is not dict or not all(map(dict.__instancecheck__, rows.values())):
        return rows
    columns = tuple(next(iter(rows.values())))
    if columns and all(map(columns.__eq__, map(tuple, rows.values()))):
        width = len(columns)
        numbers = [v for row in rows.values() for v in row.values()]
        integer = []
        for j in range(width):
            kinds = set(map(type, numbers[j::width]))
            if kinds == {int}:
                if max(map(abs, numbers[j::width])) > _EXACT:
                    return rows
                integer.append(True)
            elif kinds == {float}:
                integer.append(False)
            elif kinds == {int, float}:
                break
            else:
                return rows
        else:
            layout = shared.layout(columns, tuple(integer))
            return RowTable(shared.index(tuple(rows)), array("d", numbers),
                            array("I", range(0, len(numbers), width)), layout)
    values = [list(row.values()) for row in rows.values()]
    layouts = []
    for row, v in zip(rows.values(), values):
        kinds = tuple(map(type, v))
        layouts.append(shared.layout(tuple(row), tuple(kind is int for kind in kinds))
                       if all(kind is float or kind is int for kind in kinds) else None)
    numbers = [v for row in values for v in row]
    if None in layouts or not all(-_EXACT <= v <= _EXACT for v in numbers if type(v) is int):
        return rows
    offsets = array("I", itertools.accumulate(map(len, values), initial=0))
    return RowTable(shared.index(tuple(rows)), array("d", numbers), offsets, tuple(layouts))


def _described(table, rows):
    """What a result holds: ``rows`` itself, or each row's name, columns, which are ints, and
    values (type and bits: NaN, -0.0 and ints told apart), and whether the table has one layout."""
    if table is rows:
        return "rows as they were"
    assert isinstance(table, RowTable)
    described = []
    for name in table:
        row = table[name]
        integer = row._layout.integer
        described.append((name, tuple(row), integer,
                          tuple((type(v), repr(v)) for v in (row[c] for c in row)),
                          tuple((type(v), repr(v)) for v in (row.get(c) for c in row))))
    return isinstance(table._layouts, _Layout), described


def _value(rng: random.Random, column: str, odd: float):
    """A column's value: its int or float mostly, and with chance ``odd`` something else."""
    if rng.random() < odd:
        return rng.choice([True, False, "x", np.float64(0.5), np.int64(3), torch.tensor(1.0), None,
                           _EXACT, -_EXACT, _EXACT + 1, -_EXACT - 1, 2 ** 70, 7, 0.25, float("nan"),
                           float("inf"), -0.0, 1e308])
    if column in INTS:
        return rng.randrange(0, 100)
    return rng.choice([rng.random(), -rng.random(), float("nan"), 0.0, -0.0, float("inf")])


def _table(rng: random.Random, names: tuple[str, ...], columns: tuple[str, ...], odd: float) -> dict:
    rows = {name: {c: _value(rng, c, odd) for c in columns} for name in names}
    if rng.random() < odd:                       # a row with other columns, or in another order
        name = rng.choice(names)
        rows[name] = dict(reversed(list(rows[name].items()))) if rng.random() < 0.5 else \
            {c: _value(rng, c, 0.0) for c in columns[:-1]}
    return rows


def test_tables_of_repeated_shapes_compact_as_the_full_check_does():
    """3,000 tables of a few shapes (as a model's windows repeat them), mostly plain, some with
    one value of another kind or one row of other columns: each compacts (or stays) as the
    oracle has it, with the same layouts shared across tables."""
    rng = random.Random(20)
    shapes = [(tuple(f"p{i}" for i in range(n)), columns) for n in (1, 2, 12)
              for columns in (COLUMNS, COLUMNS[:3], ("steps",), ("mean",))]
    ours, theirs = Layouts(), Layouts()
    outcomes = set()
    for _ in range(3000):
        names, columns = rng.choice(shapes)
        rows = _table(rng, names, columns, rng.choice([0.0, 0.0, 0.02, 0.2]))
        expected = _described(_previous_compact_rows(rows, theirs), rows)
        assert _described(compact_rows(rows, ours), rows) == expected, rows
        outcomes.add(expected if isinstance(expected, str) else expected[0])
    assert outcomes == {"rows as they were", True, False}      # kept, one layout, a layout a row: all seen
    assert set(ours.layouts) == set(theirs.layouts) and set(ours.indexes) == set(theirs.indexes)


def _plain(n: int = 3) -> dict:
    return {f"p{i}": {"mean": 0.5 * i, "steps": i, "norm": 1.0} for i in range(n)}


def _with(rows: dict, name: str, column: str, value) -> dict:
    changed = {key: dict(row) for key, row in rows.items()}
    changed[name][column] = value
    return changed


@pytest.mark.parametrize("value, kept", [
    (True, True), ("x", True), (np.float64(0.5), True), (np.int64(2), True), (torch.tensor(1.0), True),
    (None, True), (_EXACT + 1, True), (-_EXACT - 1, True), (2 ** 70, True),
    (_EXACT, False), (-_EXACT, False), (2.0, False)],
    ids=["bool", "str", "numpy-float", "numpy-int", "torch-scalar", "none", "2**53+1", "-2**53-1", "2**70",
         "2**53", "-2**53", "float-in-int-column"])
def test_each_fallback_after_a_table_of_the_same_shape(value, kept):
    """A table that compacted, then the same shape with one value changed in the int column
    ``steps``: a bool, a string, a numpy or torch scalar, None, an int a double would round stay
    as they were; 2**53 and -2**53 are exact (compacted, ints); a float there mixes the column
    (each row its own layout)."""
    shared = Layouts()
    assert isinstance(compact_rows(_plain(), shared), RowTable)
    changed = _with(_plain(), "p2", "steps", value)
    table = compact_rows(changed, shared)
    assert _described(table, changed) == _described(_previous_compact_rows(changed, Layouts()), changed)
    assert (table is changed) == kept
    if not kept:
        assert table["p2"]["steps"] == value and type(table["p2"]["steps"]) is type(value)
        assert isinstance(table._layouts, _Layout) == (type(value) is int)
    again = compact_rows(_plain(), shared)                       # and the plain shape compacts after it
    assert isinstance(again, RowTable) and type(again["p1"]["steps"]) is int


def test_a_float_column_that_gets_an_int_and_rows_of_other_columns_after_a_seen_shape():
    shared = Layouts()
    compact_rows(_plain(), shared)
    mixed = _with(_plain(), "p0", "mean", 3)
    table = compact_rows(mixed, shared)
    assert type(table["p0"]["mean"]) is int and type(table["p1"]["mean"]) is float
    assert not isinstance(table._layouts, _Layout)
    other = _plain()
    other["p1"] = {"steps": 1, "mean": 0.5, "norm": 1.0}          # the same columns in another order
    table = compact_rows(other, shared)
    assert list(table["p1"]) == ["steps", "mean", "norm"] and list(table["p0"]) == ["mean", "steps", "norm"]
    fewer = _plain()
    fewer["p2"] = {"mean": 0.5, "steps": 1}
    table = compact_rows(fewer, shared)
    assert list(table["p2"]) == ["mean", "steps"] and dict(table["p2"]) == {"mean": 0.5, "steps": 1}
    more = _plain()                                              # as many column names in all as the seen table
    more["p1"]["extra"] = 1.0
    more["p2"] = {"mean": 0.5, "steps": 1}
    assert _described(compact_rows(more, shared), more) == _described(_previous_compact_rows(more, Layouts()), more)
    assert list(compact_rows(more, shared)["p1"]) == ["mean", "steps", "norm", "extra"]


def test_empty_tables_and_rows_of_no_column_after_a_seen_shape():
    shared = Layouts()
    compact_rows(_plain(), shared)
    for rows in ({}, {"a": {}}, {"a": {}, "b": {}}):
        assert _described(compact_rows(rows, shared), rows) == \
            _described(_previous_compact_rows(rows, Layouts()), rows)
    assert isinstance(compact_rows(_plain(), shared), RowTable)


def test_nan_infinities_and_signed_zeros_read_back_after_the_remembered_check():
    shared = Layouts()
    compact_rows(_plain(), shared)
    rows = {"a": {"mean": float("nan"), "steps": 0, "norm": -0.0}, "b": {"mean": -float("inf"), "steps": 1, "norm": 1e-320},
            "c": {"mean": float("inf"), "steps": _EXACT, "norm": 5e-324}}
    table = compact_rows(rows, shared)
    assert isinstance(table, RowTable) and shared.seen[("mean", "steps", "norm")].kinds == tuple(map(type, (
        v for row in rows.values() for v in row.values())))
    assert math.isnan(table["a"]["mean"]) and math.copysign(1.0, table["a"]["norm"]) == -1.0
    assert table["b"]["norm"] == 1e-320 and table["c"]["norm"] == 5e-324 and table["c"]["steps"] == _EXACT
