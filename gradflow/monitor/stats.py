"""Small statistic functions the monitor runs on the device, and their host-side readers.

Histograms use fixed bins read straight from a float32's bits: the sign and the 8-bit
exponent give 512 bins, one per octave of |g| and sign (negative values first). One integer pass and
one ``bincount`` cover any tensor, so a step's histogram counts every value (no sampling) and the
histograms of a window's steps add up (which steps a gradient's holds: ``histogram_every``,
``gradients.py``), and two bins come for free: exponent 0 holds the exact zeros (+0 and -0) and
exponent 255 Inf and NaN, which are counted and never plotted. A subnormal (0 < |g| < 2^-126,
1.2e-38: exponent 0 in its bits) is not a zero: it is counted with exponent 1, the lowest
non-zero bin of its sign, as are float64 values below float32's range (a vanishing gradient is
not a dead one).

Example:
    >>> g = torch.tensor([0.0, 1.0, -3.0, float("nan")])
    >>> counts = sign_exponent_counts(g)
    >>> zero_count(counts), nonfinite_count(counts)
    (1, 1)
    >>> value_histograms(counts)[0].num        # finite values only
    3.0
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradflow.monitor.columns import EXPONENTS, SIGN_EXPONENT_BINS  # the histogram's layout

ZERO_EXPONENT = 0                # exact zeros (+0 and -0) alone: subnormals are counted at exponent 1
NONFINITE_EXPONENT = 255         # Inf and NaN
LOG10_2 = math.log10(2.0)
FLOAT32_MAX = torch.finfo(torch.float32).max


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype sums are kept in: float64 wherever the device has it (MPS has not). Sums of
    squares of finite float32 gradients reach 1e77, far past float32's 3.4e38."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(slots=True)
class Histogram:
    """A bucketed histogram: right edges of the buckets and their counts; ``sparse``: already
    without runs of empty buckets (``sparse_buckets``), as the monitor's own are, so a sink need
    not filter it again. Not frozen: a frozen dataclass costs four times as long to make (0.9
    against 0.22 us), and a window of the tutorial's MLP makes forty."""

    limits: list[float]
    counts: list[float]
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    sparse: bool = field(default=False, repr=False, compare=False)


def scaled_norm(flat: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """L2 norm of a float64 tensor over its whole range: ``vector_norm`` squares without
    scaling, so values past 1e154 would give inf. Scaled by the largest |x|, as LAPACK's dnrm2.
    ``chunk``: the scaled copies made ``chunk`` values at a time (a 1M-value weight's at log():
    no 8 MB temporary)."""
    return scaled_norm_of(flat.split(chunk) if chunk is not None and flat.numel() > chunk else (flat,))


def scaled_norm_of(pieces) -> torch.Tensor:
    """``scaled_norm`` of the values of ``pieces`` (a sequence of tensors, or a callable giving
    them afresh: two passes, the largest |x| first)."""
    make = pieces if callable(pieces) else lambda: pieces
    largest = torch.stack([torch.linalg.vector_norm(piece, float("inf")) for piece in make()]).max()
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    return torch.stack([torch.linalg.vector_norm(piece / scale) for piece in make()]).norm() * scale


# A sum of float64 squares keeps float64's range at neither end: past |x| ~ 1.3e154 it overflows,
# below ~1.5e-162 it vanishes. Where float64 values are summed, their squares are also kept scaled
# down and up by a fixed power of two, plain SUMs like the others (across steps, processes):
# ``wide_squares`` adds them, ``wide_root`` and ``wide_spread`` read the one that holds the range.
WIDE_SHIFT = 2.0 ** 600
_TINY_SQUARES = 2.0 ** -900      # below this a plain sum holds float64 values alone (float32's squares reach 2e-90)


def wide_squares(norms: torch.Tensor) -> torch.Tensor:
    """(2, *norms.shape): the squares of float64 ``norms`` (scaled norms, ``scaled_norm``) divided
    and multiplied by ``WIDE_SHIFT`` squared, summed apart from the plain squares."""
    return torch.stack([(norms / WIDE_SHIFT).square(), (norms * WIDE_SHIFT).square()])


def beyond_squares(sums: torch.Tensor) -> bool:
    """Whether any of these float64 sums of squares left the range where the plain sum holds its
    values: inf (values past 1.3e154), or below float32's squares (values below 1.5e-162 vanish
    in it; an exact zero too, rare and read again at no loss). Where none did, the plain sums are
    the norms' squares, and no scaled pass (``scaled_norm``) is needed."""
    return bool(((sums == math.inf) | (sums < _TINY_SQUARES)).any())


def wide_root(plain: np.ndarray, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """sqrt of sums of squares (float64 arrays of one shape) kept three ways (``wide_squares``):
    the plain sum, or where it overflowed (inf, while the scaled-down sum is finite and not 0:
    float64 values past 1.3e154 made it, not an inf value, whose scaled square is inf too) or lies
    below float32's squares (only float64 values reach it), the scaled sum that holds the range.
    A value of another dtype is in the plain sum alone: its inf leaves ``high`` as it was, so the
    caller zeroes ``high`` where such a value was non-finite (``Gradients._overall``)."""
    out = np.sqrt(plain)
    over = np.isinf(plain) & np.isfinite(high) & (high > 0)
    out[over] = np.sqrt(high[over]) * WIDE_SHIFT
    under = (plain < _TINY_SQUARES) & (low > 0)
    out[under] = np.sqrt(low[under]) / WIDE_SHIFT
    return out


def wide_spread(n: int, total: float, squares: float, high: float, low: float) -> float:
    """The standard deviation of ``n`` values from their sum and sums of squares kept three ways
    (``wide_squares``), the mean's square scaled as the squares are; 0.0 where rounding makes the
    variance negative, NaN for non-finite values."""
    mean, shift = total / n, 1.0
    if math.isinf(squares) and math.isfinite(high) and high > 0:     # 0: no float64 output, an inf one
        squares, shift = high, WIDE_SHIFT
    elif squares < _TINY_SQUARES and low > 0:
        squares, shift = low, 1.0 / WIDE_SHIFT
    variance = squares / n - (mean / shift) * (mean / shift)
    return math.sqrt(variance) * shift if variance > 0 else 0.0 if variance <= 0 else math.nan


def sign_exponent_bins(flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bin index in [0, 512) of each element (int32): biased exponent, plus 256 when the sign
    bit is clear; a subnormal (biased exponent 0, mantissa not 0) gets exponent 1, so that bin 0
    and bin 256 hold the exact zeros alone. ``out``: an int32 tensor of ``flat``'s size to write into.

    An arithmetic shift of the float32's bits by 23 leaves the signed exponent: one
    contiguous integer pass (a strided read of the high 16 bits alone is four times slower).
    """
    if flat.dtype == torch.float64:                # keep float64's range within float32's bins:
        # beyond float32's range is the top finite bin, not Inf; below it (a float64 gradient of
        # 1e-51) the lowest non-zero bin, not zero: only exact zeros count as zeros.
        tiny = torch.finfo(torch.float32).tiny
        flat = torch.where(flat.isfinite(), flat.clamp(-FLOAT32_MAX, FLOAT32_MAX), flat)
        flat = torch.where((flat != 0) & (flat.abs() < tiny), torch.copysign(torch.full_like(flat, tiny), flat), flat)
    if flat.dtype != torch.float32:
        flat = flat.float()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    bits = flat.view(torch.int32)
    bins = torch.bitwise_right_shift(bits, 23, out=out).add_(EXPONENTS)
    # A subnormal (0 < magnitude bits < 2^23: exponent 0, not a zero) goes to exponent 1, as the
    # kernels do: magnitude - 1 < 2^23 - 1 for it alone, once a zero's -1 is masked to 2^31 - 1.
    # Four more passes: 0.38 -> 1.32 ns a value on one CPU thread (the kernels' way needs numba).
    magnitude = torch.bitwise_and(bits, 0x7FFFFFFF)
    return bins.add_(magnitude.sub_(1).bitwise_and_(0x7FFFFFFF).lt_(0x7FFFFF))


def float32_pieces(tensors: list[torch.Tensor], piece: int, buffer: torch.Tensor):
    """Matching pieces of ``piece`` values of equally long 1-D CPU ``tensors`` (bfloat16 or
    float16), each converted into its row of ``buffer`` (float32, ``(len(tensors), >= piece)``),
    yielded as a list of numpy views of those rows, valid until the next piece: exact, as every
    half-precision value is a float32 one, with no float32 copy of a whole tensor."""
    for pieces in zip(*(t.split(piece) for t in tensors)):
        converted = []
        for row, part in zip(buffer, pieces):
            view = row[:part.numel()]
            view.copy_(part)
            converted.append(view.numpy())
        yield converted


CHUNK = 1 << 20
# Values widened to float64 at a time by the torch-ops folds on the CPU (weights of a dtype the
# fused kernel does not take: bfloat16, float16, float64): 128 KB per temporary, in cache. A
# million at a time made six 8 MB temporaries at log() (36 MB over a 4 MB bfloat16 MLP's peak)
# and ran 4x slower (2M bfloat16 values: 28 ms a fold, 7 ms at this size; brk6b, 2026-12-06).
CPU_WIDE_CHUNK = 1 << 14


class Scratch:
    """Reduces large tensors: moments, extremes and the sign/exponent histogram of each.

    On the CPU, with numba installed, one fused pass does it all (``gradflow.monitor.kernels``).
    Elsewhere (CUDA, or no numba) torch ops do it a million values
    at a time through reused buffers: on the CPU a fresh multi-megabyte tensor per call costs
    page faults that take longer than the arithmetic (binning: 0.5 ms against 0.15 ms per
    million values; |g|: 0.43 against 0.08), and chunks keep the buffers at 4 MB each at most
    (as long as the largest tensor seen, up to a chunk).
    """

    def __init__(self) -> None:
        self._bins: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def fold(self, jobs: list[tuple[torch.Tensor, torch.Tensor | None, tuple[float, float] | None]],
             tallies: torch.Tensor | None = None) -> torch.Tensor:
        """For each job (flat, counts, band): add the sign/exponent histogram of the 1-D float32
        (or float64) ``flat`` into ``counts`` (None: no histogram), and return a float64 row
        [sum x, sum |x|, sum x², max |x|, count of |x - centre| > threshold] (0 without ``band`` =
        (centre, threshold)). ``tallies``: an int64 (jobs, 2) tensor on the jobs' device that each
        job's exact zeros (+0.0 and -0.0) and non-finite values are added to. The sums do not
        overflow for finite values. No host sync on a device."""
        kernels = fused_kernels(jobs[0][0].device)
        if kernels is not None and all(flat.dtype == torch.float32 for flat, _, _ in jobs):
            arrays = [(flat.detach().contiguous().numpy(), None if counts is None else counts.numpy(),
                       *(band or (0.0, math.inf))) for flat, counts, band in jobs]
            return torch.from_numpy(kernels.fold_all(arrays, None if tallies is None else tallies.numpy()))
        rows = torch.stack([self._fold_one(*job) for job in jobs])
        if tallies is not None:
            tallies.add_(torch.stack([tally(flat) for flat, _, _ in jobs]))
        return rows

    def _fold_one(self, flat: torch.Tensor, counts: torch.Tensor | None, band: tuple[float, float] | None) -> torch.Tensor:
        if counts is not None:
            self.count_exponents(counts, flat)
        wide = wide_dtype(flat.device)
        low, high = torch.aminmax(flat)               # one pass, where abs().max() takes two
        beyond = (flat - band[0]).abs_().gt_(band[1]).sum() if band else flat.new_zeros((), dtype=torch.long)
        largest = torch.maximum(-low, high).to(wide)
        squares = torch.linalg.vector_norm(flat, dtype=wide).square()   # float64: 1e20² is finite
        return torch.stack([flat.sum(dtype=wide), self.abs_sum(flat).to(wide), squares, largest, beyond.to(wide)])

    def count_exponents(self, counts: torch.Tensor, flat: torch.Tensor) -> None:
        """Add the sign/exponent histogram of the float32 (or float64) ``flat`` into ``counts``."""
        self._bins = _buffer(self._bins, flat, torch.int32)
        for part in flat.split(CHUNK):
            count_into(counts, sign_exponent_bins(part, out=self._bins[:part.numel()]))

    def abs_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum of |x| over ``flat``, in float64 (a 0-dim tensor; no host sync)."""
        if flat.dtype != torch.float32:
            return flat.abs().sum(dtype=torch.float64)
        self._values = _buffer(self._values, flat, torch.float32)
        wide = wide_dtype(flat.device)
        parts = [torch.abs(part, out=self._values[:part.numel()]).sum(dtype=wide) for part in flat.split(CHUNK)]
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum()

    def count_positive(self, values: torch.Tensor, dim: int, positives: torch.Tensor) -> None:
        """Add to ``positives[u]`` how many of ``values`` are > 0 at index u along ``dim``."""
        kernels = fused_kernels(values.device)
        if kernels is None or positives.dtype != torch.float32 or values.dtype == torch.float64:   # 1e-50 > 0
            others = tuple(d for d in range(values.dim()) if d != dim)
            positives.add_(((values > 0).sum(dim=others) if others else (values > 0)).to(positives.dtype))
            return
        shape = values.shape
        blocks = values.detach().float().contiguous().reshape(math.prod(shape[:dim]), shape[dim], -1)
        kernels.count_positive(blocks.numpy(), positives.numpy())


def tally(flat: torch.Tensor) -> torch.Tensor:
    """[exact zeros (+0.0 and -0.0), non-finite values] of ``flat`` (int64, (2,), on its device;
    no host sync). A float64 value below float32's range is not a zero."""
    return torch.stack([(flat == 0).sum(), (~torch.isfinite(flat)).sum()])


def _buffer(held: torch.Tensor | None, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer for chunks of ``flat``: ``held`` where it is on ``flat``'s device and
    long enough, else one of min(CHUNK, flat's size) elements, so that a monitor of small
    tensors does not hold 4 MB buffers (the held one is replaced, never added to)."""
    size = min(CHUNK, flat.numel())
    if held is None or held.device != flat.device or held.numel() < size:
        held = torch.empty(size, dtype=dtype, device=flat.device)
    return held


_KERNELS: object = None           # gradflow.monitor.kernels once imported; False where numba is missing


def fused_kernels(device: torch.device | None = None):
    """gradflow.monitor.kernels, imported on first use (numba takes a few hundred ms to import); None
    where numba is missing or for tensors on ``device`` when that is not the CPU."""
    global _KERNELS
    if device is not None and device.type != "cpu":
        return None
    if _KERNELS is None:
        try:
            from gradflow.monitor import kernels
        except ImportError:
            kernels = False
        _KERNELS = kernels
    return _KERNELS or None


def count_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """Add one to ``counts[i]`` for every i in ``index``, without a host sync.

    ``bincount`` is fastest on the CPU, but on CUDA it reads the index's maximum back to the
    host; ``index_add_`` has a fixed output size and never syncs.
    """
    if counts.device.type == "cpu":
        counts.add_(torch.bincount(index, minlength=counts.numel()))
    else:
        scattered_count_into(counts, index)


def scattered_count_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """count_into by scattering ones (the accelerator path)."""
    index = index.long()
    counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))


def segment_sums(values: list[torch.Tensor], lengths: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """(len(values), segments) sums over the contiguous segments of equally long 1-D tensors.

    ``lengths`` gives each segment's length and ``segment`` each element's segment (the same
    layout, two forms). On the CPU ``segment_reduce`` is 3-4x faster than ``index_add_``; on
    CUDA ``index_add_`` is the one known never to sync with the host.
    """
    if values[0].device.type == "cpu":
        return torch.stack([torch.segment_reduce(v, "sum", lengths=lengths, unsafe=True) for v in values])
    return scattered_segment_sums(values, lengths.numel(), segment)


def segment_max(values: torch.Tensor, lengths: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Per-segment maximum of non-negative ``values`` (0 for an empty segment); see segment_sums."""
    if values.device.type == "cpu":
        return torch.segment_reduce(values, "max", lengths=lengths, unsafe=True, initial=0.0)
    return scattered_segment_max(values, lengths.numel(), segment)


def scattered_segment_sums(values: list[torch.Tensor], segments: int, segment: torch.Tensor) -> torch.Tensor:
    """segment_sums by scattering each element into its segment (the accelerator path)."""
    out = torch.zeros(len(values), segments, dtype=values[0].dtype, device=values[0].device)
    return out.index_add_(1, segment, torch.stack(values))


def scattered_segment_max(values: torch.Tensor, segments: int, segment: torch.Tensor) -> torch.Tensor:
    """segment_max by scattering each element into its segment (the accelerator path)."""
    out = torch.zeros(segments, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, segment, values, "amax", include_self=True)


def sign_exponent_counts(tensor: torch.Tensor) -> torch.Tensor:
    """The 512-bin sign/exponent histogram of one tensor (int64 counts)."""
    counts = torch.zeros(SIGN_EXPONENT_BINS, dtype=torch.int64, device=tensor.device)
    count_into(counts, sign_exponent_bins(tensor.detach().reshape(-1)))
    return counts


def _by_sign(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) halves of sign/exponent counts."""
    return counts[..., EXPONENTS:], counts[..., :EXPONENTS]


def zero_count(counts) -> int:
    positive, negative = _by_sign(np.asarray(counts))
    return int(positive[..., ZERO_EXPONENT].sum() + negative[..., ZERO_EXPONENT].sum())


def nonfinite_count(counts) -> int:
    positive, negative = _by_sign(np.asarray(counts))
    return int(positive[..., NONFINITE_EXPONENT].sum() + negative[..., NONFINITE_EXPONENT].sum())


SMALLEST_EXPONENT = -149         # float32's smallest subnormal is 2^-149 (1.4e-45)


def _octave_edge(exponent: int) -> float:
    """Upper edge of the octave of a biased exponent: |x| < 2 ** (exponent - 126)."""
    return math.ldexp(1.0, int(exponent) - 126)


def _lower_edge(exponent: int) -> float:
    """Lower edge of a biased exponent's bucket: 2 ** (exponent - 127), and float32's smallest
    subnormal for exponent 1, which holds the subnormals too (``sign_exponent_bins``)."""
    return math.ldexp(1.0, SMALLEST_EXPONENT if exponent == 1 else int(exponent) - 127)


_FINITE = np.arange(ZERO_EXPONENT + 1, NONFINITE_EXPONENT)                # exponents 1..254
# Value buckets run from the most negative octave through zero to the most positive one. The
# bucket of zero spans (-2^-149, 2^-149): exact zeros alone, the subnormals lie in exponent 1's
# buckets, [2^-149, 2^-125) and its mirror (unless they join the bucket around zero: see
# value_histograms). float64 values below 2^-149 are counted there too and drawn at its edge,
# as those above float32's range are in the top bucket.
VALUE_LIMITS = np.array([-_lower_edge(e) for e in _FINITE[::-1]] + [_lower_edge(1)]
                        + [_octave_edge(e) for e in _FINITE])
LOG10_LIMITS = (_FINITE - 126) * LOG10_2
# log10 |x| buckets' left edges: one octave below each limit, but exponent 1's reaches down to
# log10(2^-149) = -44.9, where float32's subnormals end.
_LOG10_LEFTS = np.log10([_lower_edge(e) for e in _FINITE])


MIDDLE = len(_FINITE)                                   # index of the bucket around zero
_DISTANCE = np.abs(np.arange(2 * len(_FINITE) + 1) - MIDDLE)
# Centres of the value buckets; the bucket around zero is symmetric, so its centre is 0.
_VALUE_LEFTS = np.concatenate([[2 * VALUE_LIMITS[0]], VALUE_LIMITS[:-1]])
_VALUE_CENTRES = (_VALUE_LEFTS + VALUE_LIMITS) / 2
_VALUE_CENTRES[MIDDLE] = 0.0
_VALUE_LIMITS_LIST = VALUE_LIMITS.tolist()
_POSITIVE_CENTRES = _VALUE_CENTRES[MIDDLE + 1:]           # by exponent 1..254; negatives mirror them
_LOG10_CENTRES = (_LOG10_LEFTS + LOG10_LIMITS) / 2
_LOG10_LEFTS_LIST = _LOG10_LEFTS.tolist()
_LOG10_LIMITS_LIST = LOG10_LIMITS.tolist()


def value_histograms(counts, octaves: int = 24, rows=None) -> list[Histogram | None]:
    """TensorBoard histograms of the finite values of each row of (R, 512) counts (``rows``: of
    those rows only, an int array, in its order; the rows are read where they lie).

    Buckets run from the most negative octave through zero to the most positive one, trimmed
    to the nonempty range, without runs of empty buckets (``sparse_buckets``). Values more than
    ``octaves`` octaves below a row's largest magnitude join the bucket around zero (invisible
    on a linear axis anyway), so a window that holds exact zeros does not spend 250 buckets on
    empty octaves. A row with no finite value gives None: TensorBoard cannot draw an empty
    histogram. The moments are taken at bucket centres (see ``_extent``).

    With numba, one compiled pass over the rows (``histogram_kernels.value_rows``); without it,
    numpy over all rows at once and a short loop per row (``_value_histograms``), with the same
    result.
    """
    counts, rows, kernels = _rows_of(counts, rows)
    if kernels is None:
        return [h and _sparse(h) for h in _value_histograms(counts, octaves)]
    return _from_rows(len(rows), lambda *out: kernels.value_rows(
        counts, rows, octaves, VALUE_LIMITS, _VALUE_LEFTS, _VALUE_CENTRES, *out), 2 * len(_FINITE) + 1)


def log10_abs_histograms(counts, rows=None) -> list[Histogram | None]:
    """Histograms of log10 |x| over the finite non-zero values of each row of (R, 512) counts
    (``rows``: of those rows only), without runs of empty buckets (``sparse_buckets``); numba's
    pass where it is installed."""
    counts, rows, kernels = _rows_of(counts, rows)
    if kernels is None:
        return [h and _sparse(h) for h in _log10_abs_histograms(counts)]
    return _from_rows(len(rows), lambda *out: kernels.log10_rows(
        counts, rows, LOG10_LIMITS, _LOG10_CENTRES, _LOG10_LEFTS, *out), len(_FINITE))


# Tables a fused build passes to ``histogram_kernels.mixed_rows`` at once (its t0..t3).
MIXED_TABLES = 4


def mixed_histograms(requests, capacity: int) -> list[Histogram | None] | None:
    """The value and log10 histograms (``value_histograms``, ``log10_abs_histograms``) of
    ``requests``, (table, row, log10) each: row ``row`` of a (N, 512) counts ``table``, its log10
    |x| histogram where ``log10``, in one compiled call per four tables of one dtype (a window of
    the tutorial's MLP: one call for its 36 rows from three tables, where one per form and table
    took four, each with its own output buffers). ``capacity``: buckets the output buffers hold
    (at least 509, one row's most); a call that fills them resumes in fresh ones. None without numba.
    """
    kernels = histogram_kernels()
    if kernels is None:
        return None
    ids = [id(table) for table, _, _ in requests]
    distinct = {key: table for key, (table, _, _) in zip(ids, requests)}
    slots = {key: slot for slot, key in enumerate(distinct)}
    built = built_rows(list(distinct.values()), [slots[key] for key in ids], [row for _, row, _ in requests],
                       [log10 for _, _, log10 in requests], capacity)
    if built is not None:                                  # a window's: one call
        return built.histograms()
    groups: list[tuple[list[np.ndarray], list[int], list[int]]] = []    # (tables, request numbers, their slots)
    open_groups: dict[str, tuple] = {}                                     # by dtype: the group taking tables
    placed: dict[int, tuple] = {}                                          # id(table): (group, slot)
    for number, (table, _, _) in enumerate(requests):
        place = placed.get(id(table))
        if place is None:
            table = np.asarray(table)
            if table.dtype not in (np.int64, np.float64) or not table.flags.c_contiguous:
                table = np.ascontiguousarray(table, dtype=np.float64)
            table = table.reshape(-1, SIGN_EXPONENT_BINS)
            group = open_groups.get(table.dtype.char)
            if group is None or len(group[0]) == MIXED_TABLES:
                group = open_groups[table.dtype.char] = ([], [], [])
                groups.append(group)
            place = placed[id(requests[number][0])] = (group, len(group[0]))
            group[0].append(table)
        group, slot = place
        group[1].append(number)
        group[2].append(slot)
    out: list[Histogram | None] = [None] * len(requests)
    for tables, numbers, slots in groups:
        index = np.array([requests[n][1] for n in numbers], dtype=np.int64)
        log10 = np.array([requests[n][2] for n in numbers], dtype=np.bool_)
        built = _mixed(kernels, tables, np.array(slots, dtype=np.int64), index, log10, capacity)
        for number, histogram in zip(numbers, built.histograms()):
            out[number] = histogram
    return out


def built_rows(tables: list[np.ndarray], which, index, log10, capacity: int) -> BuiltRows | None:
    """``mixed_histograms`` as the kernel leaves them (``BuiltRows``), of rows given by column:
    row r is row ``index[r]`` of ``tables[which[r]]``, its log10 histogram where ``log10[r]``
    (sequences of ints, ints and bools), in one compiled call; None where the tables are more
    than four or not all int64 or all float64 (a window's are), or without numba."""
    kernels = histogram_kernels()
    if kernels is None or len(tables) > MIXED_TABLES or not _same_fused_dtype(tables):
        return None
    return _mixed(kernels, [table.reshape(-1, SIGN_EXPONENT_BINS) for table in tables],
                  np.array(which, dtype=np.int64), np.array(index, dtype=np.int64), np.array(log10, dtype=np.bool_),
                  capacity)


def _same_fused_dtype(tables) -> bool:
    """Whether ``tables`` are numpy arrays of one dtype the kernels take (int64 or float64), C-contiguous."""
    dtypes = {table.dtype if isinstance(table, np.ndarray) and table.flags.c_contiguous else None for table in tables}
    return len(dtypes) == 1 and next(iter(dtypes)) in (np.int64, np.float64)


class BuiltRows:
    """Sparse histograms as ``histogram_kernels.mixed_rows`` leaves them, for R rows: ``moments``
    (R, 5) = min, max, num, sum, sum of squares; ``valid`` (R,): False where a row has no finite
    value (no histogram); and one chunk per kernel call, (first row, last row + 1, the rows'
    offsets into the chunk's buckets (one more than its rows), its flat float64 bucket ``limits``
    and ``counts``). ``histograms()`` makes the ``Histogram`` objects; ``TensorBoardSink``
    encodes the arrays as they are (``event_encoding``)."""

    __slots__ = ("moments", "valid", "chunks")

    def __init__(self, moments: np.ndarray, valid: np.ndarray,
                 chunks: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        self.moments, self.valid, self.chunks = moments, valid, chunks

    def histograms(self) -> list[Histogram | None]:
        """Row by row, its ``Histogram`` (sparse), or None where it is not ``valid``."""
        out: list[Histogram | None] = []
        for start, stop, ends, limits, counts in self.chunks:
            ends = ends.tolist()
            limits_list, counts_list = limits[:ends[-1]].tolist(), counts[:ends[-1]].tolist()
            lows, highs, nums, sums, squares = self.moments[start:stop].T.tolist()
            out += [Histogram(limits_list[a:b], counts_list[a:b], low, high, num, total, square, True) if ok else None
                    for a, b, low, high, num, total, square, ok      # the kernels' are sparse
                    in zip(ends, ends[1:], lows, highs, nums, sums, squares, self.valid[start:stop].tolist())]
        return out


def _mixed(kernels, tables: list[np.ndarray], which, index, log10, capacity: int) -> BuiltRows:
    """``histogram_kernels.mixed_rows`` over all rows, in as many calls as the buffers need."""
    rows = len(index)
    padded = tables + [tables[0][:0]] * (MIXED_TABLES - len(tables))
    offsets, moments, valid = np.empty(rows + 1, np.int64), np.empty((rows, 5)), np.empty(rows, np.bool_)
    capacity = max(capacity, 2 * len(_FINITE) + 1)
    chunks = []
    start = 0
    while start < rows:
        limits, counts = np.empty(capacity), np.empty(capacity)
        stop = kernels.mixed_rows(*padded, which, index, log10, start, 24, VALUE_LIMITS, _VALUE_LEFTS, _VALUE_CENTRES,
                                  LOG10_LIMITS, _LOG10_CENTRES, _LOG10_LEFTS, limits, counts, offsets, moments, valid)
        # offsets restart at 0 with each call: the next overwrites this one's end
        chunks.append((start, stop, offsets[start:stop + 1].copy(), limits, counts))
        start = stop
    return BuiltRows(moments, valid, chunks)


def _rows_of(counts, rows) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """(counts, rows, histogram kernels) for the histogram builders. The kernels read the chosen
    rows where they lie, int64 or float64: a window's rows were stacked into a float64 copy, 4 KB
    a row, the largest allocation of a small model's log() (``histograms.HistogramRequests``).
    Without numba, the chosen rows as float64 and rows None."""
    kernels = histogram_kernels()
    counts = np.asarray(counts)
    if kernels is None or counts.dtype not in (np.int64, np.float64) or not counts.flags.c_contiguous:
        counts = np.asarray(counts, dtype=np.float64).reshape(-1, SIGN_EXPONENT_BINS)
        if rows is not None:
            counts = counts[np.asarray(rows, dtype=np.int64)]
        return counts, np.arange(len(counts), dtype=np.int64), kernels
    counts = counts.reshape(-1, SIGN_EXPONENT_BINS)
    return counts, np.arange(len(counts), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64), kernels


def _from_rows(rows: int, kernel, width: int) -> list[Histogram | None]:
    """Histograms from a histogram kernel's flat output (``histogram_kernels``)."""
    limits, counts = np.empty(rows * width), np.empty(rows * width)
    offsets, moments, valid = np.empty(rows + 1, np.int64), np.empty((rows, 5)), np.empty(rows, np.bool_)
    kernel(limits, counts, offsets, moments, valid)
    end = int(offsets[-1])
    limits_list, counts_list, offsets_list = limits[:end].tolist(), counts[:end].tolist(), offsets.tolist()
    return [Histogram(limits_list[a:b], counts_list[a:b], *row, True) if ok else None      # the kernels' are sparse
            for a, b, row, ok in zip(offsets_list, offsets_list[1:], moments.tolist(), valid.tolist())]


def _sparse(histogram: Histogram) -> Histogram:
    limits, counts = sparse_buckets(histogram.limits, histogram.counts)
    return dataclasses.replace(histogram, limits=limits, counts=counts, sparse=True)


def sparse_buckets(limits: list[float], counts: list[float]) -> tuple[list[float], list[float]]:
    """The buckets TensorBoard needs to draw the same histogram: every nonempty bucket and the
    empty bucket on each side of it; a longer run of empty buckets is dropped.

    TensorBoard reads a bucket as spanning from the previous bucket's limit (the histogram's
    ``min`` for the first) to its own, so the empty bucket kept before a nonempty one spans the
    whole gap with a count of 0, and every count keeps its own edges. Counts are unchanged.

    Example:
        >>> sparse_buckets([1, 2, 3, 4, 5, 6, 7], [5, 0, 0, 0, 0, 2, 0])
        ([1, 2, 5, 6, 7], [5, 0, 0, 2, 0])
    """
    n = len(counts)
    keep = [i for i in range(n) if counts[i] or (i and counts[i - 1]) or (i + 1 < n and counts[i + 1])]
    if len(keep) == n:
        return limits, counts
    return [limits[i] for i in keep], [counts[i] for i in keep]


def drawn_buckets(h: Histogram) -> tuple[list[float], list[float]]:
    """The buckets TensorBoard is given for ``h``: its own where it is ``sparse`` already (the
    monitor's are), else ``sparse_buckets`` of them."""
    return (h.limits, h.counts) if h.sparse else sparse_buckets(h.limits, h.counts)


_HISTOGRAM_KERNELS: object = None     # gradflow.monitor.histogram_kernels once imported; False without numba


def histogram_kernels():
    """gradflow.monitor.histogram_kernels, imported on first use; None where numba is missing."""
    global _HISTOGRAM_KERNELS
    if _HISTOGRAM_KERNELS is None:
        try:
            from gradflow.monitor import histogram_kernels as kernels
        except ImportError:
            kernels = False
        _HISTOGRAM_KERNELS = kernels
    return _HISTOGRAM_KERNELS or None


def _value_histograms(counts: np.ndarray, octaves: int) -> list[Histogram | None]:
    """value_histograms in numpy, dense (the definition the kernel follows): everything but
    the final slicing for all rows at once."""
    positive, negative = _finite_by_sign(counts)          # column j: exponent j + 1
    magnitudes = positive + negative
    zeros = counts[:, ZERO_EXPONENT] + counts[:, EXPONENTS + ZERO_EXPONENT]
    ordered = np.concatenate([negative[:, ::-1], zeros[:, None], positive], axis=1)
    largest = len(_FINITE) - 1 - np.argmax(magnitudes[:, ::-1] > 0, axis=1)
    floor = np.where(magnitudes.any(axis=1), np.maximum(1, _FINITE[largest] - octaves), 1)
    band_count, band_sum, band_squares = _band(positive, negative, floor)
    middle = zeros + band_count
    middle_right = VALUE_LIMITS[MIDDLE + floor - 1]
    first, last, totals = _extent(ordered)
    first = np.where(_DISTANCE[first] < floor, MIDDLE, first)
    last = np.where(_DISTANCE[last] < floor, MIDDLE, last)
    lefts = np.where(first == MIDDLE, -middle_right, _VALUE_LEFTS[first])
    rights = np.where(last == MIDDLE, middle_right, VALUE_LIMITS[last])
    sums = ordered @ _VALUE_CENTRES - band_sum
    squares = ordered @ (_VALUE_CENTRES * _VALUE_CENTRES) - band_squares
    histograms: list[Histogram | None] = []
    # Python numbers up front: one tolist per array is cheaper than a numpy scalar per row.
    rows = zip(ordered, first.tolist(), last.tolist(), floor.tolist(), middle_right.tolist(), middle.tolist(),
               lefts.tolist(), rights.tolist(), totals.tolist(), sums.tolist(), squares.tolist())
    for values, a, b, f, right_of_zero, zero_count, left, right, total, total_sum, total_squares in rows:
        if total == 0:
            histograms.append(None)
            continue
        negative_end, positive_start = min(b, MIDDLE - f) + 1, max(a, MIDDLE + f)
        spans_zero = a <= MIDDLE <= b
        limits = (_VALUE_LIMITS_LIST[a:negative_end] + ([right_of_zero] if spans_zero else [])
                  + _VALUE_LIMITS_LIST[positive_start:b + 1])
        bucket = (values[a:negative_end].tolist() + ([zero_count] if spans_zero else [])
                  + values[positive_start:b + 1].tolist())
        histograms.append(Histogram(limits, bucket, left, right, total, total_sum, total_squares))
    return histograms


def _log10_abs_histograms(counts: np.ndarray) -> list[Histogram | None]:
    """log10_abs_histograms in numpy, dense (the definition the kernel follows)."""
    positive, negative = _finite_by_sign(counts)
    magnitudes = positive + negative
    first, last, totals = _extent(magnitudes)
    sums, squares = magnitudes @ _LOG10_CENTRES, magnitudes @ (_LOG10_CENTRES * _LOG10_CENTRES)
    histograms: list[Histogram | None] = []
    rows = zip(magnitudes, first.tolist(), last.tolist(), totals.tolist(), sums.tolist(), squares.tolist())
    for values, a, last_bucket, total, total_sum, total_squares in rows:
        if total == 0:
            histograms.append(None)
            continue
        b = last_bucket + 1
        histograms.append(Histogram(_LOG10_LIMITS_LIST[a:b], values[a:b].tolist(), _LOG10_LEFTS_LIST[a],
                                    _LOG10_LIMITS_LIST[b - 1], total, total_sum, total_squares))
    return histograms


def _finite_by_sign(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) counts of the finite non-zero exponents 1..254: slices, not copies."""
    finite = slice(ZERO_EXPONENT + 1, NONFINITE_EXPONENT)
    return counts[:, EXPONENTS:][:, finite], counts[:, :EXPONENTS][:, finite]


def _band(positive: np.ndarray, negative: np.ndarray, floor: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: count, sum and sum of squares (at bucket centres) of the values of both signs
    with an exponent below ``floor``, which join the bucket around zero. Only rows whose
    values span more than ``octaves`` octaves have any, so only those are computed."""
    count, total, squares = np.zeros(len(floor)), np.zeros(len(floor)), np.zeros(len(floor))
    wide = np.flatnonzero(floor > 1)
    if len(wide):
        inside = _FINITE[None, :] < floor[wide, None]
        positive, negative = positive[wide] * inside, negative[wide] * inside
        count[wide] = (positive + negative).sum(axis=1)
        total[wide] = (positive - negative) @ _POSITIVE_CENTRES
        squares[wide] = (positive + negative) @ (_POSITIVE_CENTRES * _POSITIVE_CENTRES)
    return count, total, squares


def _extent(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the first and last nonempty bucket, and the total count.

    The moments TensorBoard records are taken at bucket centres: the exact ones of a window
    that held a NaN would be NaN.
    """
    nonempty = counts > 0
    first = np.argmax(nonempty, axis=1)
    last = counts.shape[1] - 1 - np.argmax(nonempty[:, ::-1], axis=1)
    return first, last, counts.sum(axis=1)
