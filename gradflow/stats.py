"""Small statistic functions the monitor runs on the device, and their host-side readers.

Histograms use fixed bins read straight from a float32's bits: the sign and the 8-bit
exponent give 512 bins, one per octave of |g| and sign (negative values first). One integer pass and
one ``bincount`` cover any tensor, so histograms of every step can be summed over a window
without sampling, and two bins come for free: exponent 0 holds exact zeros (and subnormals,
|g| < 1.2e-38) and exponent 255 holds Inf and NaN, which are counted and never plotted.

Example:
    >>> g = torch.tensor([0.0, 1.0, -3.0, float("nan")])
    >>> counts = sign_exponent_counts(g)
    >>> zero_count(counts), nonfinite_count(counts)
    (1, 1)
    >>> value_histograms(counts)[0].num        # finite values only
    3.0
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

EXPONENTS = 256                  # values of a float32's biased exponent field
SIGN_EXPONENT_BINS = 2 * EXPONENTS
ZERO_EXPONENT = 0                # exact zeros and subnormals
NONFINITE_EXPONENT = 255         # Inf and NaN
LOG10_2 = math.log10(2.0)
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class Histogram:
    """A bucketed histogram: right edges of the buckets and their counts."""

    limits: list[float]
    counts: list[float]
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


def sign_exponent_bins(flat: torch.Tensor) -> torch.Tensor:
    """Bin index in [0, 512) of each element: biased exponent, plus 256 when the sign bit is clear.

    Reads only the high 16 bits of each float32 (sign, exponent, 7 mantissa bits): an
    arithmetic shift by 7 leaves the signed exponent, one pass over half the bytes.
    """
    if flat.dtype != torch.float32:
        flat = flat.float()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if _LITTLE_ENDIAN:
        return (flat.view(torch.int16)[1::2] >> 7) + EXPONENTS
    return (flat.view(torch.int32) >> 23) + EXPONENTS


def count_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """Add one to ``counts[i]`` for every i in ``index``, without a host sync.

    ``bincount`` is fastest on the CPU, but on CUDA it reads the index's maximum back to the
    host; ``index_add_`` has a fixed output size and never syncs.
    """
    if counts.device.type == "cpu":
        counts.add_(torch.bincount(index, minlength=counts.numel()))
    else:
        index = index.long()
        counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))


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


def _octave_edge(exponent: int) -> float:
    """Upper edge of the octave of a biased exponent: |x| < 2 ** (exponent - 126)."""
    return math.ldexp(1.0, int(exponent) - 126)


_FINITE = np.arange(ZERO_EXPONENT + 1, NONFINITE_EXPONENT)                # exponents 1..254
# Value buckets run from the most negative octave through zero to the most positive one.
VALUE_LIMITS = np.array([-_octave_edge(e - 1) for e in _FINITE[::-1]] + [_octave_edge(ZERO_EXPONENT)]
                        + [_octave_edge(e) for e in _FINITE])
LOG10_LIMITS = (_FINITE - 126) * LOG10_2


MIDDLE = len(_FINITE)                                   # index of the bucket around zero
_POSITION = np.arange(2 * len(_FINITE) + 1)
_DISTANCE = np.abs(_POSITION - MIDDLE)


def value_histograms(counts, octaves: int = 24) -> list[Histogram | None]:
    """TensorBoard histograms of the finite values of each row of (R, 512) counts.

    Buckets run from the most negative octave through zero to the most positive one, trimmed
    to the nonempty range. Values more than ``octaves`` octaves below a row's largest
    magnitude join the bucket around zero (invisible on a linear axis anyway), so a window
    that holds exact zeros does not spend 250 buckets on empty octaves. A row with no finite
    value gives None: TensorBoard cannot draw an empty histogram.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, SIGN_EXPONENT_BINS)
    positive, negative = _by_sign(counts)
    magnitudes = positive[:, _FINITE] + negative[:, _FINITE]
    zeros = positive[:, ZERO_EXPONENT] + negative[:, ZERO_EXPONENT]
    ordered = np.concatenate([negative[:, _FINITE[::-1]], zeros[:, None], positive[:, _FINITE]], axis=1)
    largest = len(_FINITE) - 1 - np.argmax(magnitudes[:, ::-1] > 0, axis=1)
    floor = np.where(magnitudes.any(axis=1), np.maximum(1, _FINITE[largest] - octaves), 1)
    band = _DISTANCE[None, :] < floor[:, None]           # the octaves merged into the zero bucket
    merged = np.where(band, 0.0, ordered)
    merged[:, MIDDLE] = (ordered * band).sum(axis=1)
    keep = ~band
    keep[:, MIDDLE] = True
    rights = np.repeat(VALUE_LIMITS[None, :], len(counts), axis=0)
    rights[:, MIDDLE] = VALUE_LIMITS[MIDDLE + floor - 1]
    lefts = np.concatenate([[2 * VALUE_LIMITS[:1]], VALUE_LIMITS[None, :-1]], axis=1).repeat(len(counts), axis=0)
    lefts[:, MIDDLE] = -rights[:, MIDDLE]
    return _pack(rights, lefts, merged, keep)


def log10_abs_histograms(counts) -> list[Histogram | None]:
    """Histograms of log10 |x| over the finite non-zero values of each row of (R, 512) counts."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, SIGN_EXPONENT_BINS)
    positive, negative = _by_sign(counts)
    rights = np.repeat(LOG10_LIMITS[None, :], len(counts), axis=0)
    return _pack(rights, rights - LOG10_2, positive[:, _FINITE] + negative[:, _FINITE], None)


def _pack(rights, lefts, counts, keep) -> list[Histogram | None]:
    """Trim each row to its nonempty buckets and attach the moments TensorBoard records.

    The moments are taken at bucket centres: the exact ones of a window that held a NaN would
    be NaN.
    """
    centres = (lefts + rights) / 2
    totals = counts.sum(axis=1)
    sums = (counts * centres).sum(axis=1)
    squares = (counts * centres * centres).sum(axis=1)
    nonempty = counts > 0
    first = np.argmax(nonempty, axis=1)
    last = counts.shape[1] - 1 - np.argmax(nonempty[:, ::-1], axis=1)
    histograms: list[Histogram | None] = []
    for row in range(len(counts)):
        if totals[row] == 0:
            histograms.append(None)
            continue
        window = slice(first[row], last[row] + 1)
        mask = keep[row, window] if keep is not None else slice(None)
        histograms.append(Histogram(
            limits=rights[row, window][mask].tolist(), counts=counts[row, window][mask].tolist(),
            min=float(lefts[row, first[row]]), max=float(rights[row, last[row]]), num=float(totals[row]),
            sum=float(sums[row]), sum_squares=float(squares[row])))
    return histograms
