"""The history's older windows in compact form: a table of rows as one array of doubles.

A window's rows are dicts of Python floats: about 0.9 KB per parameter and window (a gradient row
of eleven numbers, its weight row), 135 KB a window for GPT-2's 148 parameters, 1.3 GB for the
10,000 windows ``history`` keeps by default. Once a window is ``RECENT`` windows old (``keep``,
window.py), each of its tables of rows (``gradients``, ``weights``, ``activations``) becomes a
``RowTable``: the row names and the column layouts shared with the windows before it, the numbers
one ``array("d")``, 8 bytes each: 17 KB a window for GPT-2, an eighth.

A ``RowTable`` reads as the dict it replaces, read-only: ``table[name]`` is a ``Row``, a mapping
of column -> number (``row["norm"]``, ``row.get("weight_norm")``, ``"norm" in row``, ``dict(row)``,
``row == {...}``), ints given back as ints (``steps``, ``nonfinite``), NaN and infinities as they
were. Writing to it raises ``TypeError``: an old window is a record, not a scratch pad. It is a
``Mapping``, not a ``dict``: ``json.dumps`` takes ``{name: dict(row) for name, row in table.items()}``.

Example:
    >>> shared = Layouts()
    >>> table = compact_rows({"fc.weight": {"norm": 0.5, "steps": 3}, "fc.bias": {"norm": 0.25, "steps": 3}}, shared)
    >>> table["fc.weight"]["norm"], table["fc.bias"].get("steps"), dict(table["fc.bias"])
    (0.5, 3, {'norm': 0.25, 'steps': 3})
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Iterator, Mapping
from typing import Any

RECENT = 2       # windows per member kept as dicts: history[-1] and the one before it, as log() made them
_EXACT = 2 ** 53  # ints up to this size are exact in a double


class Layouts:
    """What the compact tables of one history share: each distinct tuple of row names as its
    index (name -> row), each distinct row layout (the columns of a row, in order, and which
    hold ints) as one object (a model's windows repeat a handful of them); and, per tuple of
    columns, the value types of the last table whose rows all had those columns (``_Seen``):
    the next window's table of that shape is then checked by one comparison of its types."""

    __slots__ = ("indexes", "layouts", "seen")

    def __init__(self) -> None:
        self.indexes: dict[tuple[str, ...], dict[str, int]] = {}
        self.layouts: dict[tuple[tuple[str, ...], tuple[bool, ...]], _Layout] = {}
        self.seen: dict[tuple[str, ...], _Seen] = {}

    def index(self, names: tuple[str, ...]) -> dict[str, int]:
        found = self.indexes.get(names)
        if found is None:
            found = self.indexes[names] = {name: i for i, name in enumerate(names)}
        return found

    def layout(self, columns: tuple[str, ...], integer: tuple[bool, ...]) -> _Layout:
        key = (columns, integer)
        found = self.layouts.get(key)
        if found is None:
            found = self.layouts[key] = _Layout(columns, integer)
        return found


class _Seen:
    """A table whose rows all have the same columns, as ``_uniform`` last checked it: its column
    names row after row, the type of each value, the layout they give, a getter of its ints
    (only they need the size check; None where there is none) and its rows' offsets, shared by
    every table of that shape (read only)."""

    __slots__ = ("ints", "keys", "kinds", "layout", "offsets")

    def __init__(self, columns: tuple[str, ...], kinds: tuple[type, ...], layout: _Layout) -> None:
        self.keys = list(columns) * (len(kinds) // len(columns))
        self.kinds = kinds
        self.layout = layout
        ints = [i for i, kind in enumerate(kinds) if kind is int]
        self.ints = operator.itemgetter(*ints, *ints[:1]) if ints else None    # a tuple, even of one int
        self.offsets = array("I", range(0, len(kinds), len(columns)))


class _Layout:
    """A row's columns in order, where each lies in the row's numbers, and which are ints."""

    __slots__ = ("columns", "integer", "position")

    def __init__(self, columns: tuple[str, ...], integer: tuple[bool, ...]) -> None:
        self.columns = columns
        self.integer = integer
        self.position = {column: j for j, column in enumerate(columns)}


def compact_rows(rows: Mapping[str, Mapping[str, Any]], shared: Layouts) -> Mapping[str, Mapping[str, Any]]:
    """``rows`` (name -> column -> number) as a ``RowTable``; ``rows`` itself where it is empty,
    compact already, or holds a value that is not an int or a float, or an int a double would
    round (kept as it was, never rounded or dropped)."""
    if not rows or type(rows) is not dict or not all(map(dict.__instancecheck__, rows.values())):
        return rows
    columns = tuple(next(iter(rows.values())))
    if columns and _same_columns(rows, columns, shared.seen.get(columns)):   # rows of no column: a layout each
        table = _uniform(rows, columns, shared)         # every row has the same columns: one layout
        if table is not None:
            return table
    values = [list(row.values()) for row in rows.values()]
    layouts = tuple(_layout(tuple(row), tuple(map(type, v)), shared) for row, v in zip(rows.values(), values))
    numbers = [v for row in values for v in row]
    if None in layouts or not all(-_EXACT <= v <= _EXACT for v in numbers if type(v) is int):
        return rows                           # a bool, a string, a numpy scalar: not a plain number
    offsets = array("I", itertools.accumulate(map(len, values), initial=0))
    return RowTable(shared.index(tuple(rows)), array("d", numbers), offsets, layouts)


def _same_columns(rows: dict, columns: tuple[str, ...], seen: _Seen | None) -> bool:
    """Whether every row has ``columns``, in order: where a table of as many such rows was seen,
    its column names one after another (``_Seen.keys``) against these rows' in one comparison
    (rows of no repeated column that add up to it are each ``columns``)."""
    if seen is not None and len(seen.keys) == len(rows) * len(columns):
        return seen.keys == list(itertools.chain.from_iterable(rows.values()))
    return all(map(columns.__eq__, map(tuple, rows.values())))


def _uniform(rows: dict, columns: tuple[str, ...], shared: Layouts) -> Mapping | None:
    """``compact_rows`` where every row has ``columns``: the values' types checked a column at a
    time (``_column_kinds``), or, where they are those of the last table of these columns
    (``Layouts.seen``: a model's windows repeat them), by one comparison of the types in C; then
    the ints' size. None where a column mixes ints and floats (the rows then get a layout each)."""
    numbers = [v for row in rows.values() for v in row.values()]
    kinds = tuple(map(type, numbers))
    seen = shared.seen.get(columns)
    if seen is None or seen.kinds != kinds:
        integer = _column_kinds(kinds, len(columns))
        if integer == _MIXED:
            return None
        if integer == _OTHER:
            return rows                       # a bool, a string, a numpy scalar: not a plain number
        seen = shared.seen[columns] = _Seen(columns, kinds, shared.layout(columns, integer))
    if seen.ints is not None and max(map(abs, seen.ints(numbers))) > _EXACT:
        return rows                           # an int a double would round: kept as it was
    return RowTable(shared.index(tuple(rows)), array("d", numbers), seen.offsets, seen.layout)


def _column_kinds(kinds: tuple[type, ...], width: int) -> tuple[bool, ...] | str:
    """Which of ``width`` columns hold ints, from the types of a table's values (row after row),
    each column checked whole in C; ``_MIXED`` where one mixes ints and floats, ``_OTHER`` where
    one holds anything else (a bool, a string, a numpy scalar)."""
    integer = []
    for j in range(width):
        column = set(kinds[j::width])
        if column == _INTS:
            integer.append(True)
        elif column == _FLOATS:
            integer.append(False)
        else:
            return _MIXED if column == _BOTH else _OTHER
    return tuple(integer)


_INTS, _FLOATS, _BOTH = {int}, {float}, {int, float}
_MIXED, _OTHER = "a column of ints and floats", "a value that is not an int or a float"


def _layout(columns: tuple[str, ...], kinds: tuple[type, ...], shared: Layouts) -> _Layout | None:
    """The shared layout of a row with these columns and types of value; None unless each is an
    int or a float."""
    if not all(kind is float or kind is int for kind in kinds):
        return None
    return shared.layout(columns, tuple([kind is int for kind in kinds]))


class RowTable(Mapping):
    """A read-only table of rows, name -> ``Row``, in the order the window had them."""

    __slots__ = ("_index", "_layouts", "_numbers", "_offsets")

    def __init__(self, index: dict[str, int], numbers: array, offsets: array, layouts: _Layout | tuple[_Layout, ...]):
        self._index = index
        self._numbers = numbers
        self._offsets = offsets
        self._layouts = layouts               # one layout for every row (the common case), or one per row

    def __getitem__(self, name: str) -> Row:
        i = self._index[name]
        layout = self._layouts if isinstance(self._layouts, _Layout) else self._layouts[i]
        return Row(self._numbers, self._offsets[i], layout)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"RowTable({dict((name, dict(row)) for name, row in self.items())!r})"

    def __reduce__(self):
        return _table_from_dict, ({name: dict(row) for name, row in self.items()},)


def _table_from_dict(rows: dict) -> Mapping:
    return compact_rows(rows, Layouts())


class Row(Mapping):
    """One row of a ``RowTable``: column -> number, read-only."""

    __slots__ = ("_layout", "_numbers", "_start")

    def __init__(self, numbers: array, start: int, layout: _Layout) -> None:
        self._numbers = numbers
        self._start = start
        self._layout = layout

    def __getitem__(self, column: str) -> float | int:
        j = self._layout.position[column]
        value = self._numbers[self._start + j]
        return int(value) if self._layout.integer[j] else value

    def get(self, column: str, default: Any = None) -> Any:
        j = self._layout.position.get(column)
        if j is None:
            return default
        value = self._numbers[self._start + j]
        return int(value) if self._layout.integer[j] else value

    def __contains__(self, column: object) -> bool:
        return column in self._layout.position

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout.columns)

    def __len__(self) -> int:
        return len(self._layout.columns)

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __eq__(self, other: object) -> bool:
        """A dict's ``==``, with a NaN equal to a NaN in the same column: a dict compared its one
        NaN object to itself (identity first), where a Row makes a new float at each read, so a
        row with a NaN would not equal itself."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and all(
            column in other and (value == other[column] or (value != value and other[column] != other[column]))
            for column, value in self.items())

    __hash__ = None

    def __reduce__(self):
        return dict, (list(self.items()),)
