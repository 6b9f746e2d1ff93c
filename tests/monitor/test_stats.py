"""The monitor's statistic kernels against oracles computed directly from the values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradflow.monitor import stats as S


def random_values(rng: np.random.Generator, n: int, span: float, zeros: int, specials: bool) -> torch.Tensor:
    """Values over ``span`` decades with both signs, some exact zeros and, if asked, NaN, Inf
    and subnormals."""
    values = rng.standard_normal(n) * 10.0 ** rng.uniform(-span, 0, n)
    values[:zeros] = 0.0
    tensor = torch.from_numpy(values.astype(np.float32))
    if specials:
        tensor = torch.cat([tensor, torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -3e-42])])
    return tensor


def assert_is_histogram_of(histogram: S.Histogram, values: np.ndarray) -> None:
    """Every finite value lies in the bucket the histogram counts it in.

    Buckets are right-closed for negative values and left-closed for positive ones (a float's
    exponent bin), and the bucket around zero holds the exact zeros and, when the values span
    many octaves, the smallest magnitudes of both signs; subnormals lie in exponent 1's buckets,
    whose edges reach down to 2^-149.
    """
    finite = values[np.isfinite(values)].astype(np.float64)
    limits = np.asarray(histogram.limits)
    assert np.all(np.diff(limits) > 0)
    index = np.where(finite < 0, np.searchsorted(limits, finite, "left"), np.searchsorted(limits, finite, "right"))
    np.testing.assert_array_equal(np.bincount(index, minlength=len(limits)), histogram.counts)
    assert histogram.num == len(finite) == sum(histogram.counts)
    assert histogram.min <= finite.min() and histogram.max >= finite.max()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), span=st.floats(0.0, 40.0),
       octaves=st.sampled_from([3, 24, 300]), specials=st.booleans())
def test_value_histograms_count_every_finite_value_in_its_bucket(seed, rows, span, octaves, specials):
    rng = np.random.default_rng(seed)
    tensors = [random_values(rng, int(rng.integers(1, 400)), span, int(rng.integers(0, 5)), specials)
               for _ in range(rows)]
    counts = np.stack([S.sign_exponent_counts(t).numpy() for t in tensors])
    for tensor, histogram in zip(tensors, S.value_histograms(counts, octaves)):
        assert_is_histogram_of(histogram, tensor.numpy())


def test_value_histograms_merge_octaves_far_below_the_largest_into_the_zero_bucket():
    values = torch.tensor([1.0, -1.0, 2.0 ** -30, -(2.0 ** -40), 0.0])
    (histogram,) = S.value_histograms(S.sign_exponent_counts(values).numpy()[None], octaves=24)
    assert_is_histogram_of(histogram, values.numpy())
    zero_bucket = int(np.searchsorted(histogram.limits, 0.0, "right"))
    assert histogram.counts[zero_bucket] == 3                  # 0, 2^-30 and -2^-40 together
    # 24 octaves below the largest magnitude (in [1, 2)): the zero bucket is (-2^-24, 2^-24).
    assert histogram.limits[zero_bucket] == 2.0 ** -24 and histogram.limits[zero_bucket - 1] == -(2.0 ** -24)


def test_log10_histograms_count_each_nonzero_finite_value_in_its_octave():
    """Subnormals (1e-40 and -3e-42 among the specials) too: in the lowest bucket, whose left
    edge, the histogram's min, is log10(2^-149)."""
    rng = np.random.default_rng(3)
    values = random_values(rng, 500, 30.0, 7, True)
    (histogram,) = S.log10_abs_histograms(S.sign_exponent_counts(values).numpy()[None])
    finite = values.numpy()[np.isfinite(values.numpy())]
    nonzero = np.log10(np.abs(finite[finite != 0]).astype(np.float64))
    index = np.searchsorted(histogram.limits, nonzero, "right")
    np.testing.assert_array_equal(np.bincount(index, minlength=len(histogram.limits)), histogram.counts)
    assert histogram.min <= nonzero.min() and histogram.max >= nonzero.max()
    assert histogram.min == pytest.approx(-149 * math.log10(2.0))           # the subnormals set it


def test_rows_with_no_finite_value_have_no_histogram():
    counts = np.stack([S.sign_exponent_counts(torch.tensor([float("nan"), float("inf")])).numpy(),
                       np.zeros(S.SIGN_EXPONENT_BINS)])
    assert S.value_histograms(counts) == [None, None]
    assert S.log10_abs_histograms(counts) == [None, None]


@pytest.mark.parametrize("lengths", [[5], [3, 0, 7, 1], [1000, 1, 2, 65535]])
def test_segment_sums_and_max_equal_per_segment_reductions(lengths):
    rng = np.random.default_rng(len(lengths))
    values = torch.from_numpy(rng.standard_normal(sum(lengths)).astype(np.float32))
    lengths_t = torch.tensor(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
    kernels = {  # the CPU kernels, and the scatters used on accelerators, run here on the CPU
        "segment_reduce": (S.segment_sums([values, values * values], lengths_t, segment),
                           S.segment_max(values.abs(), lengths_t, segment)),
        "scatter": (S.scattered_segment_sums([values, values * values], len(lengths), segment),
                    S.scattered_segment_max(values.abs(), len(lengths), segment)),
    }
    for sums, largest in kernels.values():
        for i, part in enumerate(values.split(lengths)):
            part = part.double()
            assert sums[0, i].item() == pytest.approx(part.sum().item(), rel=1e-5, abs=1e-5)
            assert sums[1, i].item() == pytest.approx((part * part).sum().item(), rel=1e-5)
            assert largest[i].item() == (part.abs().max().item() if len(part) else 0.0)


def test_sign_exponent_bins_read_sign_and_exponent():
    """Subnormals (1e-45, the largest one 2^-126 - 2^-149, -1e-40) get exponent 1, as 2^-126
    does: only +0 and -0 are in the zero bins."""
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, 2.0 ** -126, 1e-45, float("inf"), -float("nan"),
                           2.0 ** -126 - 2.0 ** -149, -1e-40, 2.0 ** -125])
    expected = [256, 0, 256 + 127, 127, 256 + 128, 256 + 1, 256 + 1, 256 + 255, 255, 256 + 1, 1, 256 + 2]
    assert S.sign_exponent_bins(values).tolist() == expected


def test_scratch_reduces_large_tensors_chunk_by_chunk():
    values = torch.randn(2 * S.CHUNK + 12345) * 10.0 ** torch.empty(2 * S.CHUNK + 12345).uniform_(-20, 5)
    values[::1000] = 0.0
    values[7] = float("nan")
    counts = torch.zeros(S.SIGN_EXPONENT_BINS, dtype=torch.int64)
    scratch = S.Scratch()
    scratch.count_exponents(counts, values)
    scratch.count_exponents(counts, values[:100])          # the buffer is reused for a smaller tensor
    expected = np.bincount(S.sign_exponent_bins(values).numpy(), minlength=S.SIGN_EXPONENT_BINS) \
        + np.bincount(S.sign_exponent_bins(values[:100]).numpy(), minlength=S.SIGN_EXPONENT_BINS)
    np.testing.assert_array_equal(counts.numpy(), expected)
    assert counts.sum().item() == values.numel() + 100
    finite = values[1:7].clone()
    big = torch.cat([finite.repeat(S.CHUNK // 3), values[8:9]])
    assert scratch.abs_sum(big).item() == pytest.approx(big.double().abs().sum().item(), rel=1e-5)
    assert scratch.abs_sum(values[:5]).item() == pytest.approx(values[:5].double().abs().sum().item(), rel=1e-6)
    assert math.isnan(scratch.abs_sum(values).item())


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_counting_by_bincount_and_by_scatter_agree(dtype):
    index = torch.randint(0, 700, (5000,), dtype=torch.int32)
    by_bincount, by_scatter = torch.zeros(1024, dtype=dtype), torch.zeros(1024, dtype=dtype)
    S.count_into(by_bincount, index)
    S.scattered_count_into(by_scatter, index)
    assert torch.equal(by_bincount, by_scatter)
    assert torch.equal(by_bincount, torch.bincount(index.long(), minlength=1024).to(dtype))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 8), span=st.floats(0.0, 60.0),
       octaves=st.sampled_from([1, 3, 24, 300]), specials=st.booleans(), scale=st.sampled_from([1.0, 16.0, 0.5]))
def test_histogram_kernels_equal_the_numpy_definition_made_sparse(seed, rows, span, octaves, specials, scale):
    """The compiled histograms (histogram_kernels) against the numpy ones they replace, with
    sparse_buckets applied: the same buckets, edges and extremes, the moments to rounding."""
    rng = np.random.default_rng(seed)
    tensors = [random_values(rng, int(rng.integers(0, 400)), span, int(rng.integers(0, 5)), specials)
               for _ in range(rows)]
    counts = np.stack([S.sign_exponent_counts(t).numpy() for t in tensors]) * scale     # pooled windows: floats
    for fused, dense in [(S.value_histograms(counts, octaves), S._value_histograms(counts, octaves)),
                         (S.log10_abs_histograms(counts), S._log10_abs_histograms(counts))]:
        assert len(fused) == len(dense)
        for got, want in zip(fused, dense):
            if want is None:
                assert got is None
                continue
            assert (got.limits, got.counts) == S.sparse_buckets(want.limits, want.counts)
            # marked sparse, so the sink writes them unfiltered: filtering again changes nothing
            assert got.sparse and S.sparse_buckets(got.limits, got.counts) == (got.limits, got.counts)
            assert (got.min, got.max, got.num) == (want.min, want.max, want.num)
            # sum: cancellation leaves rounding of the size of the terms, sqrt(num * sum of squares) at most
            assert got.sum == pytest.approx(want.sum, rel=1e-12, abs=1e-12 * math.sqrt(want.num * want.sum_squares))
            assert got.sum_squares == pytest.approx(want.sum_squares, rel=1e-12)


def test_histograms_without_numba_are_sparse_and_marked_so(monkeypatch):
    """The numpy path (no numba) gives the same sparse buckets as the kernels, marked ``sparse``."""
    rng = np.random.default_rng(5)
    counts = np.stack([S.sign_exponent_counts(random_values(rng, 300, 40.0, 3, True)).numpy() for _ in range(4)])
    fused = S.value_histograms(counts), S.log10_abs_histograms(counts)
    monkeypatch.setattr(S, "_HISTOGRAM_KERNELS", False)
    for got, want in zip((S.value_histograms(counts), S.log10_abs_histograms(counts)), fused):
        for g, w in zip(got, want):
            assert g.sparse and (g.limits, g.counts) == (w.limits, w.counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scratch_fold_adds_each_jobs_tallies_on_every_path(dtype, reduction_path):
    """Scratch.fold's tallies are added to, as kernels.fold_all's are: the torch ops (on an
    accelerator, without numba, or for float64 with numba) overwrote what the tallies held."""
    values = random_values(np.random.default_rng(3), 5000, 30, 40, True).to(dtype)
    counts = torch.zeros(S.SIGN_EXPONENT_BINS, dtype=torch.int64)
    tallies = torch.tensor([[3, 1], [2, 0]])                     # held from before
    S.Scratch().fold([(values, counts, None), (values[:100], None, None)], tallies)
    expected = [[int((v == 0).sum()), int((~torch.isfinite(v)).sum())] for v in (values, values[:100])]
    assert tallies.tolist() == (torch.tensor(expected) + torch.tensor([[3, 1], [2, 0]])).tolist()


def test_mixed_histograms_equal_each_row_built_alone():
    """stats.mixed_histograms (one compiled call per four tables of a dtype, resuming when its
    buffers fill) gives, request for request, the histogram value_histograms or
    log10_abs_histograms gives of that row alone: six tables of int64 and float64 counts (two
    groups of one dtype; then two int64 tables, a window's one call), rows asked in shuffled order, buffers of two rows' buckets."""
    if S.histogram_kernels() is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(5)
    tables = [rng.integers(0, 40, size=(7, 512)) * (rng.random((7, 512)) < density)
              for density in (0.02, 0.1, 0.5, 0.02, 0.1, 0.5)]
    tables = [t.astype(np.float64) if k % 3 == 1 else t for k, t in enumerate(tables)]
    tables[0][0] = 0
    tables[0][1] = 0
    tables[0][1, 256] = 3                                   # zeros alone
    requests = [(t, int(r), bool(rng.random() < 0.5)) for t in tables for r in rng.permutation(7)]
    order = rng.permutation(len(requests))
    requests = [requests[i] for i in order]
    built = S.mixed_histograms(requests, capacity=2 * 509)
    alone = [(S.log10_abs_histograms if log10 else S.value_histograms)(t[row][None].astype(np.float64))[0]
             for t, row, log10 in requests]
    assert built == alone and built[[i for i, (t, r, _) in enumerate(requests) if t is tables[0] and r == 0][0]] is None
    few = [i for i, (t, _, _) in enumerate(requests) if t is tables[0] or t is tables[2]]      # one int64 call
    assert S.mixed_histograms([requests[i] for i in few], capacity=509) == [alone[i] for i in few]
