"""TensorBoard histograms: what a window asks for, pooled over N windows, and linear bins.

A window asks for its histograms as raw counts (``HistogramRequests``): the 512 sign/exponent
counts (``stats.py``) of a gradient, a weight or an activation, or the ``LINEAR_BINS`` equal-width
counts of a bounded activation's outputs (tanh, sigmoid: octave bins would put tanh's whole
0.5-1 range, where saturation shows, in one bin). Counts are additive, so ``HistogramPool``
sums each tag's counts over ``every`` windows and builds one TensorBoard histogram per tag
from them: every value of the windows' histogrammed steps is in it (each parameter's every
``histogram_every``-th step with a gradient: ``gradients.py``), while the scalars stay per
window. Weight histograms describe the weights at a window's end, a state and not a count
of the window's steps: a pool keeps the last window's.

Example:
    >>> pool = HistogramPool(every=2)
    >>> for step in range(3):
    ...     requests = HistogramRequests()
    ...     requests.linear(0, "activation/tanh_1", np.r_[np.zeros(LINEAR_BINS - 1), 4.0][None], 0, (-1.0, 1.0))
    ...     pool.add(requests, step)
    ...     if pool.full:
    ...         print(pool.take(members=1))          # doctest: +ELLIPSIS
    (1, [{'activation/tanh_1': Histogram(limits=[1.0], counts=[8.0], min=0.96875, max=1.0, num=8.0, ...)}])
    >>> pool.take(members=1)[0]                    # the partial pool, as on remove()
    2
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from gradflow.monitor import stats as S
from gradflow.monitor.stats import Histogram

# Equal-width bins over a bounded activation's range: over tanh's [-1, 1] each is 1/32 wide, and
# the last, [0.96875, 1], is about the band read as saturated (|a| > 0.97).
LINEAR_BINS = 64
# Histograms are built this many rows at a time: the kernels' per-row buffers (two of 509 float64
# buckets a row; the rows themselves are read where they lie) stay about 130 KB, where a window's
# 40 rows at once took 490 KB of log()'s peak on a rank-16 LoRA (benchmarks/memory_phases.py --tensorboard).
BUILD_ROWS = 16
# Buckets the value and log10 kernels' two output buffers hold (``stats.mixed_histograms``, which
# resumes in fresh ones when a row might not fit): 16 KB each, four rows' worst case; a window of the
# tutorial's MLP fills about 500.
BUILD_BUCKETS = 4 * 509


@dataclass(slots=True)
class _Request:
    form: str                           # "value" (sign/exponent), "log10" (of |x|) or "linear"
    member: int
    tag: str
    table: np.ndarray                   # the counts: row ``row`` of this 2-D table (a part's read-back)
    row: int
    bounds: tuple[float, float] | None = None   # "linear": the range the bins cover
    state: bool = False                 # a state (weights at the window's end), not per-step counts

    @property
    def counts(self) -> np.ndarray:
        return self.table[self.row]


@dataclass(slots=True)
class _Rows:
    """Value histograms of rows ``rows`` of ``table``, each followed by its log10 one where
    ``log10_tags`` is given, asked in one call (``HistogramRequests.rows``)."""

    member: int
    table: np.ndarray
    rows: list[int]
    value_tags: list[str]
    log10_tags: list[str] | None
    state: bool

    def requests(self) -> list[_Request]:
        out = []
        for i, row in enumerate(self.rows):
            out.append(_Request("value", self.member, self.value_tags[i], self.table, row, state=self.state))
            if self.log10_tags is not None:
                out.append(_Request("log10", self.member, self.log10_tags[i], self.table, row))
        return out


class HistogramRequests:
    """Histograms a window asks for, as raw counts, built together: one numpy pass over all
    the rows of a form instead of a few per family (on a small model the window's fixed costs
    are what the monitor costs)."""

    def __init__(self, requests: list[_Request] | None = None) -> None:
        self._asked: list[_Request | _Rows] = list(requests or [])

    @property
    def requests(self) -> list[_Request]:
        """Every histogram asked for, one request each, in the order asked."""
        out: list[_Request] = []
        for asked in self._asked:
            if isinstance(asked, _Rows):
                out += asked.requests()
            else:
                out.append(asked)
        return out

    def value(self, member: int, tag: str, table: np.ndarray, row: int, *, state: bool = False) -> None:
        """A histogram of the values behind the 512 sign/exponent counts of row ``row`` of
        ``table`` (R, 512); ``state``: they describe the window's end (weights), so a pool keeps
        the latest instead of summing. ``table`` is read when the window's histograms are built."""
        self._asked.append(_Request("value", member, tag, table, row, state=state))

    def log10(self, member: int, tag: str, table: np.ndarray, row: int) -> None:
        """A histogram of log10 |x| behind the 512 sign/exponent counts of ``table[row]``."""
        self._asked.append(_Request("log10", member, tag, table, row))

    def linear(self, member: int, tag: str, table: np.ndarray, row: int, bounds: tuple[float, float]) -> None:
        """A histogram of the ``LINEAR_BINS`` equal-bin counts ``table[row]`` over ``bounds`` (see
        ``linear_histograms``)."""
        self._asked.append(_Request("linear", member, tag, table, row, bounds))

    def rows(self, member: int, table: np.ndarray, rows, value_tags, log10_tags=None, *,
             state: bool = False) -> None:
        """``value`` of each of ``rows`` (ints) of ``table`` in turn, tagged by ``value_tags``, each
        followed by its ``log10`` (tagged by ``log10_tags``) where those are given: what those calls
        ask one by one (a row per tag, as ``zip`` pairs them), in one call and one object. The
        parts ask a window's rows this way: a request object and a call per histogram were a
        fifth of the tutorial's gradient read."""
        paired = list(zip(rows, value_tags) if log10_tags is None else zip(rows, value_tags, log10_tags))
        if paired:
            rows, value_tags, *log10 = map(list, zip(*paired))
            self._asked.append(_Rows(member, table, rows, value_tags, log10[0] if log10 else None, state))

    def build(self, members: int) -> list[dict[str, Histogram] | BuiltHistograms]:
        """Per member, tag -> histogram; a row with no finite value gets none (TensorBoard
        cannot draw an empty histogram). With numba, the value and log10 rows of all tables are
        built in one call that reads them where they lie (``stats.mixed_histograms``), through
        buffers of ``BUILD_BUCKETS``; the linear rows of a table together, ``BUILD_ROWS`` at a time.
        One member whose rows took one call gets them as the kernel left them (``BuiltHistograms``)."""
        if members == 1:
            built = self._built()
            if built is not None:
                return [built]
        requests = self.requests
        out: list[dict[str, Histogram]] = [{} for _ in range(members)]
        counted = [r for r in requests if r.form != "linear"]
        built = S.mixed_histograms([(r.table, r.row, r.form == "log10") for r in counted],
                                   BUILD_BUCKETS) if counted else []
        if built is None:                              # no numba: per form and table
            self._build_grouped(counted, out)
        else:
            for request, histogram in zip(counted, built):
                if histogram is not None:
                    out[request.member][request.tag] = histogram
        self._build_grouped([r for r in requests if r.form == "linear"], out)
        return out

    def _built(self) -> BuiltHistograms | None:
        """One member's histograms as ``BuiltHistograms``, where its value and log10 rows take one
        kernel call and every tag is its own (else None: ``build`` makes the dicts). The kernel's
        inputs are gathered from the asked rows as they came, no request object made for a row."""
        tags: list[str] = []
        which: list[int] = []                  # each row's table, by its place in ``tables``
        index: list[int] = []
        log10: list[bool] = []
        tables: dict[int, tuple[int, np.ndarray]] = {}
        linear: list[_Request] = []
        for asked in self._asked:
            if isinstance(asked, _Rows):
                slot = tables.setdefault(id(asked.table), (len(tables), asked.table))[0]
                n = len(asked.rows)
                if asked.log10_tags is None:
                    tags += asked.value_tags
                    index += asked.rows
                    log10 += [False] * n
                else:                           # each row's value histogram, then its log10 one
                    tags += itertools.chain.from_iterable(zip(asked.value_tags, asked.log10_tags))
                    index += itertools.chain.from_iterable(zip(asked.rows, asked.rows))
                    log10 += [False, True] * n
                    n *= 2
                which += [slot] * n
            elif asked.form == "linear":
                linear.append(asked)
            else:
                which.append(tables.setdefault(id(asked.table), (len(tables), asked.table))[0])
                tags.append(asked.tag)
                index.append(asked.row)
                log10.append(asked.form == "log10")
        if not tags or len(set(tags).union(r.tag for r in linear)) != len(tags) + len(linear):
            return None
        rows = S.built_rows([table for _, table in tables.values()], which, index, log10, BUILD_BUCKETS)
        if rows is None:
            return None
        extra: dict[str, Histogram] = {}
        self._build_grouped(linear, [extra])
        return BuiltHistograms(tags, rows, extra)

    @staticmethod
    def _build_grouped(requests: list[_Request], out: list[dict[str, Histogram]]) -> None:
        """The rows of one form and table in one call, ``BUILD_ROWS`` at a time, into ``out``."""
        groups: dict[tuple[str, int], list[_Request]] = {}      # (form, table): its requests, in order
        for r in requests:
            group = groups.get((r.form, id(r.table)))
            if group is None:
                groups[r.form, id(r.table)] = [r]
            else:
                group.append(r)
        for (form, _), everything in groups.items():
            for start in range(0, len(everything), BUILD_ROWS):
                chosen = everything[start:start + BUILD_ROWS]
                for request, histogram in zip(chosen, _build(form, chosen)):
                    if histogram is not None:
                        out[request.member][request.tag] = histogram


class BuiltHistograms(Mapping):
    """A window's histograms for one member, read-only, tag -> ``Histogram``: those of its value
    and log10 rows as the kernel left them (``stats.BuiltRows``, ``tags`` one per row in order),
    then ``extra`` (the linear ones). The ``Histogram`` objects are made on first read
    (``as_dict``). ``TensorBoardSink`` (``Sink.built_histograms``) encodes the rows straight from
    the kernel's arrays (``event_encoding.HistogramEncoder``) and never makes them: on the
    tutorial's MLP the forty objects and their lists of Python floats, and packing them again,
    cost a window more than the kernel did. Every other sink is handed ``as_dict()``."""

    __slots__ = ("tags", "rows", "extra", "_dict")

    def __init__(self, tags: list[str], rows: S.BuiltRows, extra: dict[str, Histogram]) -> None:
        self.tags, self.rows, self.extra = tags, rows, extra
        self._dict: dict[str, Histogram] | None = None

    def as_dict(self) -> dict[str, Histogram]:
        """The histograms as a dict (made once): the rows' in order, those with no finite value
        left out, then ``extra``."""
        if self._dict is None:
            made = {tag: h for tag, h in zip(self.tags, self.rows.histograms()) if h is not None}
            made.update(self.extra)
            self._dict = made
        return self._dict

    def __getitem__(self, tag: str) -> Histogram:
        return self.as_dict()[tag]

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self) -> int:                   # the tags are distinct (HistogramRequests._built): no objects made
        return int(np.count_nonzero(self.rows.valid)) + len(self.extra)

    def __repr__(self) -> str:
        return repr(self.as_dict())


def as_dict(histograms: Mapping[str, Histogram]) -> dict[str, Histogram]:
    """``histograms`` as a dict: itself, or a ``BuiltHistograms``' ``as_dict()``."""
    return histograms.as_dict() if isinstance(histograms, BuiltHistograms) else histograms


def _build(form: str, requests: list[_Request]) -> list[Histogram | None]:
    """The histograms of requests of one form over one table."""
    table, rows = requests[0].table, [r.row for r in requests]
    if form == "value":
        return S.value_histograms(table, rows=rows)
    if form == "log10":
        return S.log10_abs_histograms(table, rows=rows)
    return linear_histograms(table[rows], [r.bounds for r in requests])


class HistogramPool:
    """Sums each tag's histogram counts over ``every`` windows (``every`` >= 1).

    ``add`` each window's requests with its step; once ``full``, ``take`` builds the histograms
    and empties the pool. ``take`` on a partial pool (the last windows of a run) builds what it
    holds: nothing added is dropped. A histogram's step is its last window's.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.windows = 0
        self.step: int | None = None
        self._pooled: dict[tuple[str, int, str], _Request] = {}
        self._direct: HistogramRequests | None = None     # every == 1: the window's own requests, uncopied

    def add(self, requests: HistogramRequests, step: int) -> None:
        if self.every == 1 and not self.windows:
            self._direct = requests
        else:
            self._fold(self._direct.requests if self._direct is not None else [])
            self._direct = None
            self._fold(requests.requests)
        self.windows += 1
        self.step = step

    def _fold(self, requests: list[_Request]) -> None:
        for r in requests:
            key = (r.form, r.member, r.tag)
            held = self._pooled.get(key)
            if held is None or r.state:      # a pooled request: its own float64 table of one row
                self._pooled[key] = _Request(r.form, r.member, r.tag, np.array(r.counts[None], dtype=np.float64),
                                             0, r.bounds, r.state)
            else:
                held.table[0] += r.counts

    @property
    def full(self) -> bool:
        return self.windows >= self.every

    def take(self, members: int) -> tuple[int, list[dict[str, Histogram]]] | None:
        """(step of the last window pooled, per member tag -> histogram), and an empty pool;
        None if no window was added since the last take."""
        if not self.windows:
            return None
        requests = self._direct or _one_table(list(self._pooled.values()))
        step = self.step
        self._pooled, self._direct, self.windows, self.step = {}, None, 0, None
        return step, requests.build(members)


def _one_table(pooled: list[_Request]) -> HistogramRequests:
    """The pooled requests, each form's rows in one table, so that each form is built in one call."""
    requests: list[_Request] = []
    for form in ("value", "log10", "linear"):
        mine = [r for r in pooled if r.form == form]
        if mine:
            table = np.concatenate([r.table for r in mine])
            requests += [_Request(form, r.member, r.tag, table, row, r.bounds, r.state) for row, r in enumerate(mine)]
    return HistogramRequests(requests)


def check_every(histograms, error: type[Exception] | None = None) -> int:
    """Windows per histogram from the monitor's ``histograms`` argument: True -> 1, False -> 0,
    an int N >= 1 -> N; anything else is ``error`` (a ``MonitorError`` by default; the framework
    callbacks pass ValueError, as for their other arguments)."""
    from gradflow.monitor.tensors import MonitorError

    if isinstance(histograms, bool):
        return int(histograms)
    if isinstance(histograms, (int, np.integer)) and histograms >= 1:
        return int(histograms)
    raise (error or MonitorError)(f"histograms must be True (every window), False (none) or an int N >= 1 (each histogram "
                       f"sums N windows' counts), got {histograms!r}")


# -- linear bins ------------------------------------------------------------------------------

def linear_scale(bounds: tuple[float, float]) -> tuple[float, float, float]:
    """(shift, scale, offset) with bin = floor((x - shift) * scale) + offset for ``LINEAR_BINS``
    equal bins over ``bounds`` = (low, high), as ``numpy.histogram(x, LINEAR_BINS, range=bounds)``
    bins them.

    Where the bin width is a power of two and ``low`` a whole number of widths (tanh, softsign
    and hardtanh over [-1, 1]; sigmoid, hardsigmoid over [0, 1]) the shift is 0: ``x * scale`` and
    its floor are exact in float32, so every value lands in numpy's bin. Over other ranges
    (ReLU6's [0, 6]) a value within float32 rounding of an edge may land in the bin beside it.

    Example:
        >>> linear_scale((-1.0, 1.0)), linear_scale((0.0, 6.0))
        ((0.0, 32.0, 32.0), (0.0, 10.666666666666666, 0.0))
    """
    low, high = bounds
    scale = LINEAR_BINS / (high - low)
    exact = math.frexp(scale)[0] == 0.5 and float(low * scale).is_integer()
    return (0.0, scale, -low * scale) if exact else (low, scale, 0.0)


def count_linear(counts: torch.Tensor, flat: torch.Tensor, shift, scale, offset, first, last, nan_bin: int) -> None:
    """Add the linear bins of 1-D ``flat`` into ``counts``: bin floor((x - shift) * scale) + offset
    (see ``linear_scale``), kept in [first, last] (values beyond the range and +-Inf go to the end
    bins), NaN into ``nan_bin``. ``shift`` (None: 0), ``scale``, ``offset``, ``first``, ``last``:
    numbers, or tensors of one per element. No host sync.
    """
    values = flat.float()
    if shift is not None:
        values = values - shift
    bins = (values * scale).floor_().add_(offset)
    bins = torch.clamp(bins, first, last) if isinstance(first, torch.Tensor) else bins.clamp_(first, last)
    S.count_into(counts, bins.nan_to_num_(nan=nan_bin).long())


def linear_histograms(counts, bounds: list[tuple[float, float]]) -> list[Histogram | None]:
    """TensorBoard histograms of rows of (R, ``LINEAR_BINS``) counts, equal bins over each row's
    ``bounds``, trimmed to the nonempty bins. The moments are taken at bin centres, as for the
    other histograms. A row with no value gives None.

    Example:
        >>> h = linear_histograms(np.r_[3.0, np.zeros(LINEAR_BINS - 2), 5.0][None], [(-1.0, 1.0)])[0]
        >>> h.min, h.limits[0], h.limits[-1], h.counts[0], h.counts[-1], h.num
        (-1.0, -0.96875, 1.0, 3.0, 5.0, 8.0)
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, LINEAR_BINS)
    out: list[Histogram | None] = []
    steps = np.arange(LINEAR_BINS + 1) / LINEAR_BINS
    for row, (low, high) in zip(counts, bounds):
        nonempty = np.flatnonzero(row)
        if not len(nonempty):
            out.append(None)
            continue
        a, b = int(nonempty[0]), int(nonempty[-1]) + 1
        edges = low + (high - low) * steps
        centres = (edges[:-1] + edges[1:]) / 2
        out.append(Histogram(edges[a + 1:b + 1].tolist(), row[a:b].tolist(), float(edges[a]), float(edges[b]),
                             float(row.sum()), float(row @ centres), float(row @ (centres * centres))))
    return out
