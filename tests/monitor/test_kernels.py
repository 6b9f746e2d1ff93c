"""The fused CPU kernels (numba) against oracles computed from the values with torch in float64."""

from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradflow.monitor import stats as S

K = pytest.importorskip("gradflow.monitor.kernels", reason="numba is not installed")
njit = pytest.importorskip("numba").njit


def random_values(rng: np.random.Generator, n: int, specials: bool) -> np.ndarray:
    """float32 values over 30 decades with both signs, some exact zeros (and -0.0) and, if
    asked, NaN, Inf and subnormals scattered among them."""
    values = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 2, n)).astype(np.float32)
    values[rng.integers(0, n, n // 10 + 1) if n else []] = 0.0
    if specials and n:
        where = rng.integers(0, n, 5)
        values[where] = np.array([np.nan, np.inf, -np.inf, 1e-40, -0.0], dtype=np.float32)
    return values


def oracle(values: np.ndarray, centre: float = 0.0, threshold: float = np.inf) -> tuple[list[float], np.ndarray]:
    """[sum x, sum |x|, sum x², max |x|, count beyond] in float64, and the 512-bin histogram."""
    t = torch.from_numpy(values)
    d = t.double()
    largest = d.abs().max().item() if len(values) else 0.0
    beyond = ((t - centre).abs() > threshold).sum().item()
    row = [d.sum().item(), d.abs().sum().item(), (d * d).sum().item(), largest, beyond]
    return row, np.bincount(S.sign_exponent_bins(t).numpy(), minlength=S.SIGN_EXPONENT_BINS)


def assert_row(row: np.ndarray, expected: list[float]) -> None:
    # float64 sums of float32 values (x² exact): only float64 rounding, reassociated; the signed
    # sum's error scales with sum |x| (cancellation), not with the sum
    np.testing.assert_allclose(row[0], expected[0], rtol=0, atol=1e-12 * abs(expected[1]) + 1e-300)
    np.testing.assert_allclose(row[1:3], expected[1:3], rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(row[3:], expected[3:])      # max |x| and the count are exact


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([0, 1, 3, 4, 4095, 4096, 4097, 70_001]),
       specials=st.booleans(), band=st.sampled_from([None, (0.0, 0.97), (0.5, 0.485)]))
def test_fold_matches_the_oracle(seed, n, specials, band):
    values = random_values(np.random.default_rng(seed), n, specials)
    counts = np.zeros(S.SIGN_EXPONENT_BINS, np.int64)
    centre, threshold = band or (0.0, np.inf)
    row = K.fold(values, counts, centre=centre, threshold=threshold)
    expected, bins = oracle(values, centre, threshold)
    assert_row(row, expected)
    np.testing.assert_array_equal(counts, bins)


@pytest.mark.parametrize("n", [4096, 1 << 17], ids=["one-block", "32-blocks"])
def test_sums_of_equal_values_are_exact(n):
    """n copies of float16's 6e4 (60000 = 1875 * 32): every partial sum of x and x² is an integer
    below 2**53, so float64 sums are exact. float32 block sums erred here by 2.1e-6 in the squares
    (the norm by 1.07e-6): sixteen lanes each adding 256 copies, rounding on every add."""
    value = np.float32(np.float16(6e4))
    row = K.fold(np.full(n, value, np.float32), np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    assert row[0] == row[1] == n * 60000.0
    assert row[2] == n * 60000.0 ** 2
    rows, _ = K.fold_weights(np.full(n, value, np.float32), np.zeros(n, np.float32), np.array([n]))
    assert rows[0, 1] == rows[0, 2] == n * 60000.0 ** 2


def test_fold_adds_to_the_counts_and_keeps_jobs_apart():
    rng = np.random.default_rng(0)
    first, second = random_values(rng, 10_000, True), random_values(rng, 333, False)
    counts = np.zeros((2, S.SIGN_EXPONENT_BINS), np.int64)
    counts[1, 7] = 5                                           # what an earlier step counted
    rows = K.fold_all([(first, counts[0], 0.0, np.inf), (second, counts[1], 0.0, 0.5)])
    for row, values, band in zip(rows, (first, second), ((0.0, np.inf), (0.0, 0.5))):
        assert_row(row, oracle(values, *band)[0])
    np.testing.assert_array_equal(counts[0], oracle(first)[1])
    expected = oracle(second)[1]
    expected[7] += 5
    np.testing.assert_array_equal(counts[1], expected)


def test_fold_propagates_nan_like_torch():
    values = np.array([1.0, np.nan, -np.inf, 2.0], np.float32)
    row = K.fold(values, np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    assert np.isnan(row[:4]).all()
    row = K.fold(values[2:], np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    assert row[0] == -np.inf and row[3] == np.inf


@pytest.mark.parametrize("n", [15, 16, 17, 2 * 4096 - 1, 3 * 4096 + 8 + 7],
                         ids=["under-a-line", "a-line", "over-a-line", "a-value-short", "blocks-and-odd-tail"])
def test_fold_counts_every_value_of_odd_lengths_with_specials_in_each_sub_histogram(n):
    """The counting loop takes 16 values (a cache line) at a time, eight sub-histograms in turn,
    and the rest one by one: NaN, Inf, -0.0 and subnormals at every position modulo 16."""
    values = random_values(np.random.default_rng(n), n, False)
    specials = np.array([np.nan, np.inf, -np.inf, 1e-40, -1e-40, -0.0, 0.0], np.float32)
    values[:16] = np.resize(specials, min(n, 16))
    values[-9:] = np.resize(specials, 9)
    counts = np.zeros(S.SIGN_EXPONENT_BINS, np.int64)
    row = K.fold(values, counts)
    expected, bins = oracle(values)
    assert np.isnan(row[:4]).all() and row[4] == expected[4] == 0
    np.testing.assert_array_equal(counts, bins)


@pytest.mark.parametrize("value, bin_", [(0.0, 256), (-0.0, 0), (1e-40, 257), (-1e-40, 1), (np.inf, 511)],
                         ids=["zeros", "negative-zeros", "subnormals", "negative-subnormals", "infinities"])
def test_fold_counts_a_long_run_of_one_bin_exactly(value, bin_):
    """Every value in one bin (a dead layer's zero gradient) is the sub-histograms' worst case;
    subnormals, counted with the zeros and moved to exponent 1 afterwards, spread over all eight."""
    n = 70_001
    counts = np.zeros(S.SIGN_EXPONENT_BINS, np.int64)
    row = K.fold(np.full(n, value, np.float32), counts)
    assert counts[bin_] == n and counts.sum() == n
    assert row[3] == abs(np.float32(value)) and row[1] == n * abs(float(np.float32(value)))


def test_fold_puts_nan_above_inf_in_any_block():
    values = np.ones(70_001, np.float32)
    values[5] = -np.inf
    row = K.fold(values, np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    assert row[3] == np.inf and row[0] == -np.inf and row[1] == np.inf
    values[3 * 4096 + 9] = np.nan                              # a later block than the Inf
    row = K.fold(values, np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    assert np.isnan(row[:4]).all()


def test_fold_rows_keeps_long_and_short_rows_apart_in_shared_slots():
    """Long rows (SHORT_ROW values or more) count into sub-histograms that must be emptied into
    their own slot at the row's end, before the next row, short or long, counts."""
    rng = np.random.default_rng(7)
    lengths = np.array([5000, K.SHORT_ROW, K.SHORT_ROW - 1, 0, 100, 9000, 17, K.SHORT_ROW + 1])
    row_slot = np.array([0, 1, 0, 2, 1, 1, 2, 0])
    values = random_values(rng, int(lengths.sum()), True)
    counts = np.zeros((3, S.SIGN_EXPONENT_BINS), np.int64)
    rows = K.fold_rows(values, lengths, row_slot, counts)
    expected_counts, start = np.zeros_like(counts), 0
    for r, length in enumerate(lengths):
        expected, bins = oracle(values[start:start + length])
        if np.isnan(expected[0]):                              # NaN propagates: compare where it fell
            assert np.isnan(rows[r, 0])
        else:
            assert_row(rows[r], expected)
        expected_counts[row_slot[r]] += bins
        start += length
    np.testing.assert_array_equal(counts, expected_counts)
    assert K.fold_rows(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), counts).shape == (0, 5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), specials=st.booleans())
def test_fold_rows_matches_the_oracle_row_by_row(seed, specials):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 2 * K.TINY_ROW, int(rng.integers(1, 12)))   # both sides of the scalar path
    lengths[0] = 9000 if rng.random() < 0.5 else lengths[0]   # sometimes a row of several blocks
    values = random_values(rng, int(lengths.sum()), specials)
    row_slot = rng.integers(0, 4, lengths.size)
    centres = rng.uniform(-1, 1, lengths.size).astype(np.float32)
    thresholds = rng.uniform(0, 1, lengths.size).astype(np.float32)
    counts = np.zeros((4, S.SIGN_EXPONENT_BINS), np.int64)
    rows = K.fold_rows(values, lengths, row_slot, counts, (centres, thresholds))
    expected_counts, start = np.zeros_like(counts), 0
    for r, length in enumerate(lengths):
        expected, bins = oracle(values[start:start + length], float(centres[r]), float(thresholds[r]))
        assert_row(rows[r], expected)
        expected_counts[row_slot[r]] += bins
        start += length
    np.testing.assert_array_equal(counts, expected_counts)


def test_fold_weights_matches_the_oracle_per_segment():
    rng = np.random.default_rng(3)
    lengths = np.array([0, 5, 3 * K.BLOCK + 17, 1, 3000, K.SHORT_ROW - 1, K.SHORT_ROW, 4096,
                        K.TINY_ROW - 1, K.TINY_ROW])  # empty, tiny, several blocks, both sides of the scalar path
    values = random_values(rng, int(lengths.sum()), False)
    start = values + rng.standard_normal(values.size).astype(np.float32) * 1e-3
    rows, counts = K.fold_weights(values, start, lengths)
    offset = 0
    for i, length in enumerate(lengths):
        w = torch.from_numpy(values[offset:offset + length]).double()
        s = torch.from_numpy(start[offset:offset + length]).double()
        expected = [w.abs().sum(), (w * w).sum(), ((w - s) ** 2).sum(), (s * s).sum()]
        np.testing.assert_allclose(rows[i], [e.item() for e in expected], rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(counts[i], oracle(values[offset:offset + length])[1])
        offset += length


def test_fold_weights_renewing_the_start_gives_the_same_rows_and_leaves_the_weights_as_start():
    """renew=True writes each weight into the start as it is read (the next window's start):
    rows and counts bit for bit as without it, and the start afterwards equal to the weights,
    in every path (scalar tiny segments, short rows, several blocks)."""
    rng = np.random.default_rng(4)
    lengths = np.array([0, 5, 3 * K.BLOCK + 17, 1, 3000, K.SHORT_ROW - 1, K.SHORT_ROW, K.TINY_ROW - 1, K.TINY_ROW])
    values = random_values(rng, int(lengths.sum()), True)
    start = values + rng.standard_normal(values.size).astype(np.float32) * 1e-3
    expected_rows, expected_counts = K.fold_weights(values, start.copy(), lengths)
    kept = values.copy()
    rows, counts = K.fold_weights(values, start, lengths, renew=True)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(start.view(np.uint32), kept.view(np.uint32))     # NaN and -0.0 too
    np.testing.assert_array_equal(values.view(np.uint32), kept.view(np.uint32))
    with pytest.raises(ValueError, match="must not overlap"):
        K.fold_weights(values, values, lengths, renew=True)
    with pytest.raises(ValueError, match="must match"):        # unchecked indexing would write past start's end
        K.fold_weights(values, start[:-1], lengths, renew=True)


@pytest.mark.parametrize("renew", [False, True])
def test_fold_weights_without_counts_gives_the_same_rows_and_start(renew):
    """count=False (no histogram drawn): no counts, and the rows and the renewed start bit for
    bit as with them, in every path (scalar tiny segments, short rows, several blocks)."""
    rng = np.random.default_rng(5)
    lengths = np.array([0, 5, 3 * K.BLOCK + 17, 1, 3000, K.SHORT_ROW - 1, K.SHORT_ROW, K.TINY_ROW - 1, K.TINY_ROW])
    values = random_values(rng, int(lengths.sum()), True)
    start = values + rng.standard_normal(values.size).astype(np.float32) * 1e-3
    counted_start = start.copy()
    expected_rows, _ = K.fold_weights(values, counted_start, lengths, renew=renew)
    rows, counts = K.fold_weights(values, start, lengths, renew=renew, count=False)
    assert counts is None
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(start.view(np.uint32), counted_start.view(np.uint32))


@pytest.mark.parametrize("shape, dim", [((64, 40), 1), ((8, 6, 5, 7), 1), ((3, 9, 12), 2), ((11,), 0)])
def test_positive_counts_per_unit_match_torch(shape, dim):
    values = torch.randn(shape)
    positives = torch.zeros(shape[dim])
    S.Scratch().count_positive(values, dim, positives)
    others = tuple(d for d in range(values.dim()) if d != dim)
    expected = (values > 0).sum(dim=others) if others else (values > 0).float()
    torch.testing.assert_close(positives, expected.float())


@pytest.mark.parametrize("n", [100, 200_000])
def test_scratch_gives_the_same_rows_fused_and_with_torch_ops(n, monkeypatch):
    values = torch.from_numpy(random_values(np.random.default_rng(n), n, False))
    rows, counts = [], []
    for kernels in (None, False):                  # numba's kernels (imported on demand), then torch ops
        monkeypatch.setattr(S, "_KERNELS", kernels)
        counts.append(torch.zeros(S.SIGN_EXPONENT_BINS, dtype=torch.int64))
        rows.append(S.Scratch().fold([(values, counts[-1], (0.0, 0.5))]).double())
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(counts[0], counts[1], rtol=0, atol=0)


def _fold_in_child(queue) -> None:
    values = np.arange(100_000, dtype=np.float32)
    queue.put(float(K.fold(values, np.zeros(S.SIGN_EXPONENT_BINS, np.int64))[0]))


def test_a_forked_child_can_use_the_kernels_after_its_parent():
    """The sweeps fork workers after the parent has monitored: no thread pool may be left
    behind that a child would wait on."""
    K.fold(np.ones(100_000, np.float32), np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_fold_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == float(np.arange(100_000, dtype=np.float64).sum())


@njit
def _both_moment_loops(values):
    return K._wide_moments(values, values.size), K._plain_moments(values, values.size)


@njit
def _both_weight_loops(values, start, renewed):
    return K._wide_weights(values, start, values.size), K._wide_weights_renewing(values, renewed, values.size)


def test_the_explicit_vector_loops_compile_here():
    """Where they do not, the kernels fall back on numba's loops (slower): this says so here."""
    assert K._wide_loops_work()


@pytest.mark.parametrize("n", [K.WIDE_STEP, 4 * K.WIDE_STEP])
def test_the_vector_loops_take_the_largest_and_non_finite_values_at_every_lane(n):
    """The explicit-vector loop keeps 4 x 8 float64 sums and 2 x 16 int32 maxima, one per position
    modulo WIDE_STEP: 1e20 and 3e38 (whose float32 squares would overflow), NaN, Inf and -0.0
    put at each position in turn, against float64 torch and numba's plain loop."""
    rng = np.random.default_rng(n)
    for position in range(K.WIDE_STEP):
        for special in (1e20, -3e38, np.inf, np.nan, -0.0, 1e-40):
            values = (rng.standard_normal(n) * 1e-3).astype(np.float32)
            values[position + (n - K.WIDE_STEP if position % 2 else 0)] = special
            wide, plain = _both_moment_loops(values)
            expected, _ = oracle(values)
            row = np.array([*wide[:3], np.int32(wide[3]).view(np.float32), 0.0])
            if np.isnan(special):
                assert np.isnan(row[:4]).all() and np.isnan(plain[:3]).all() and wide[3] == plain[3]
                continue
            assert_row(row, expected)
            assert wide[3] == plain[3]
            np.testing.assert_allclose(wide[:3], plain[:3], rtol=1e-12, atol=1e-300)


def test_the_vector_weight_loops_match_the_oracle_and_renew_the_start():
    rng = np.random.default_rng(9)
    values = random_values(rng, 3 * K.WIDE_STEP, False)
    values[[0, 17, 40, 95]] = [1e20, -3e38, 1e30, -0.0]
    start = values + (rng.standard_normal(values.size) * 1e-3).astype(np.float32)
    renewed, kept = start.copy(), start.copy()
    plain, renewing = _both_weight_loops(values, start, renewed)
    np.testing.assert_array_equal(start.view(np.uint32), kept.view(np.uint32))   # the plain loop writes nothing
    w, s = torch.from_numpy(values).double(), torch.from_numpy(start).double()
    expected = [w.abs().sum().item(), (w * w).sum().item(), ((w - s) ** 2).sum().item(), (s * s).sum().item()]
    np.testing.assert_allclose(plain, expected, rtol=1e-12, atol=1e-300)
    assert plain == renewing
    np.testing.assert_array_equal(renewed.view(np.uint32), values.view(np.uint32))


def test_a_million_sums_stay_within_float64_rounding():
    """1M Gaussian values of one scale: sum |x| and sum x² within 1e-13 of torch's float64 sums
    (float32 lanes flushed into float64 every 64 values erred by 1.7e-10 and 3.2e-10 here)."""
    values = (np.random.default_rng(11).standard_normal(1 << 20) * 1e-3).astype(np.float32)
    row = K.fold(values, np.zeros(S.SIGN_EXPONENT_BINS, np.int64))
    expected, _ = oracle(values)
    np.testing.assert_allclose(row[1:3], expected[1:3], rtol=1e-13, atol=0)
    np.testing.assert_allclose(row[0], expected[0], rtol=0, atol=1e-13 * expected[1])


@pytest.mark.parametrize("layout", ["fold", "long-rows", "short-rows"])
def test_blocks_of_zeros_alone_count_both_signs(layout):
    """A block whose largest |x| is 0 is counted by its sign bits: +0.0 and -0.0 mixed, then a
    block with subnormals and zeros after it, which must still move its subnormals."""
    rng = np.random.default_rng(5)
    values = np.where(rng.random(3 * K.BLOCK) < 0.3, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    values[2 * K.BLOCK + 7] = 1e-40
    values[2 * K.BLOCK + 9] = -3e-41
    values[2 * K.BLOCK + 11] = 2.5
    counts = np.zeros((1, S.SIGN_EXPONENT_BINS), np.int64)
    if layout == "fold":
        rows = K.fold(values, counts[0])[None]
        lengths = np.array([values.size])
    else:
        size = K.BLOCK if layout == "long-rows" else K.SHORT_ROW - 1
        lengths = np.full(values.size // size, size)
        lengths[-1] += values.size - lengths.sum()
        rows = K.fold_rows(values, lengths, np.zeros(lengths.size, np.int64), counts)
    start = 0
    for r, length in enumerate(lengths):
        assert_row(rows[r], oracle(values[start:start + length])[0])
        start += length
    np.testing.assert_array_equal(counts[0], oracle(values)[1])
    assert counts[0, 0] == np.signbit(values).sum() - 1 and counts[0, 1] == 1


def tally_oracle(values: np.ndarray) -> list[int]:
    """[exact zeros (+0.0 and -0.0), non-finite values]: a subnormal is no zero."""
    t = torch.from_numpy(values)
    return [int((t == 0).sum()), int((~torch.isfinite(t)).sum())]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([0, 1, 15, 4095, 4096, 4097, 70_001]),
       specials=st.booleans(), band=st.sampled_from([None, (0.0, 0.97)]), counted=st.booleans())
def test_fold_all_tallies_zeros_and_nonfinite_with_and_without_the_histogram(seed, n, specials, band, counted):
    """counts None (a step that is not histogrammed) leaves the histogram out of the pass and
    gives the same row; the tallies are the oracle's either way, added to what they held."""
    values = random_values(np.random.default_rng(seed), n, specials)
    centre, threshold = band or (0.0, np.inf)
    counts = np.zeros(S.SIGN_EXPONENT_BINS, np.int64)
    tallies = np.array([[3, 1]], np.int64)                    # an earlier step's
    rows = K.fold_all([(values, counts if counted else None, centre, threshold)], tallies)
    expected, bins = oracle(values, centre, threshold)
    assert_row(rows[0], expected)
    np.testing.assert_array_equal(tallies[0], np.add(tally_oracle(values), [3, 1]))
    np.testing.assert_array_equal(counts, bins if counted else 0)


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-40, np.nan, -np.inf, 1.5], ids=["zeros", "negative-zeros",
                         "subnormals", "nan", "inf", "ones"])
def test_tallies_of_a_long_run_of_one_value_without_the_histogram(value):
    n = 3 * 4096 + 5
    values = np.full(n, value, np.float32)
    tallies = np.zeros((1, 2), np.int64)
    K.fold_all([(values, None, 0.0, np.inf)], tallies)
    assert tallies[0].tolist() == tally_oracle(values)


def test_fold_rows_histograms_the_counted_rows_alone_and_tallies_every_row():
    """Rows of every length class (tiny, short, long) in shared slots, half of them counted:
    the counts are the counted rows' bins alone, each row's tallies its own."""
    rng = np.random.default_rng(11)
    lengths = np.array([5000, K.SHORT_ROW, 40, 0, 100, 9000, 17, K.TINY_ROW, 3])
    row_slot = np.array([0, 1, 0, 2, 1, 1, 2, 0, 2])
    counted = np.array([True, False, False, True, True, False, True, False, True])
    values = random_values(rng, int(lengths.sum()), True)
    values[5000 + K.SHORT_ROW:5000 + K.SHORT_ROW + 40] = 0.0  # a tiny row of zeros, not counted
    counts = np.zeros((3, S.SIGN_EXPONENT_BINS), np.int64)
    tallies = np.zeros((len(lengths), 2), np.int64)
    rows = K.fold_rows(values, lengths, row_slot, counts, counted=counted, tallies=tallies)
    expected_counts = np.zeros_like(counts)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for r, (a, b) in enumerate(zip(starts, starts[1:])):
        row, bins = oracle(values[a:b])
        if b > a:
            assert_row(rows[r], row)
        assert tallies[r].tolist() == tally_oracle(values[a:b]), r
        if counted[r]:
            expected_counts[row_slot[r]] += bins
    np.testing.assert_array_equal(counts, expected_counts)


def test_fold_rows_into_adds_each_row_where_the_monitor_keeps_it():
    """Two members, three steps of three parameters (rows of every length class, shared slots):
    totals, tallies, step squares and counts equal fold_rows' rows added by hand."""
    rng = np.random.default_rng(12)
    members, steps = 2, np.array([4, 5, 9])
    per_step = [(0, 40), (1, 3), (0, 40), (1, 3), (2, K.SHORT_ROW + 5), (2, K.SHORT_ROW + 5)]   # (param, length) x member
    row_slot = np.array([p * members + m for _ in steps for (p, _), m in zip(per_step, [0, 1] * 3)])
    lengths = np.array([n for _ in steps for _, n in per_step])
    row_step = np.array([s * members + m for s in range(len(steps)) for m in [0, 1] * 3])
    counted = np.array([s != 1 for s in range(len(steps)) for _ in per_step])
    values = random_values(rng, int(lengths.sum()), True)
    counts = np.zeros((6, S.SIGN_EXPONENT_BINS), np.int64)
    totals, tallies, squares = np.ones((6, 4)), np.zeros((6, 2), np.int64), np.zeros((10, members))
    K.fold_rows_into(values, lengths, row_slot, row_step, counted, steps, members, counts, totals, tallies, squares)
    expected_counts, expected_tallies = np.zeros_like(counts), np.zeros((len(lengths), 2), np.int64)
    rows = K.fold_rows(values, lengths, row_slot, expected_counts, counted=counted, tallies=expected_tallies)
    expected_totals, expected_squares = np.ones((6, 4)), np.zeros((10, members))
    np.add.at(expected_totals, row_slot, np.stack([rows[:, 0], rows[:, 1], np.sqrt(rows[:, 2]), rows[:, 3]], axis=1))
    np.add.at(expected_squares, (steps[row_step // members], row_step % members), rows[:, 2])
    summed_tallies = np.zeros((6, 2), np.int64)
    np.add.at(summed_tallies, row_slot, expected_tallies)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(tallies, summed_tallies)
    np.testing.assert_allclose(totals, expected_totals, rtol=1e-15, equal_nan=True)
    np.testing.assert_allclose(squares, expected_squares, rtol=1e-15, equal_nan=True)


@pytest.mark.parametrize("shape", [(1, 2), (3, 2), (2,), (2, 1)])
def test_fold_all_refuses_tallies_that_do_not_match_the_jobs(shape):
    """fold_all zips the jobs with the tallies' rows: a tallies array with one row for two jobs
    left the second job unfolded (its row all zeros, nothing counted) without a word."""
    values = np.ones(100, np.float32)
    with pytest.raises(ValueError, match=r"^fold_all: tallies has shape .* for 2 jobs; it must be \(2, 2\)$"):
        K.fold_all([(values, None, 0.0, np.inf), (values, np.zeros(S.SIGN_EXPONENT_BINS, np.int64), 0.0, np.inf)],
                   np.zeros(shape, np.int64))


@pytest.mark.parametrize("argument, shape", [("counted", (1,)), ("counted", (3,)), ("tallies", (1, 2)),
                                             ("tallies", (2,))])
def test_fold_rows_refuses_counted_or_tallies_that_do_not_match_the_rows(argument, shape):
    """The kernel reads counted[r] and adds to tallies[r] unchecked (bounds checks are off): one
    shorter than the rows was read or written past its end (a (1, 2) tallies for two rows: the
    second row's counts went to the memory after it)."""
    lengths = np.array([100, 3000])
    given = {"counted": np.ones(shape, np.bool_)} if argument == "counted" else {"tallies": np.zeros(shape, np.int64)}
    with pytest.raises(ValueError, match=rf"^fold_rows: {argument} has shape .* for 2 rows; it must be "):
        K.fold_rows(np.ones(3100, np.float32), lengths, np.array([0, 1]),
                    np.zeros((2, S.SIGN_EXPONENT_BINS), np.int64), **given)


def test_fold_activation_rows_adds_each_row_and_its_units_where_the_part_keeps_them():
    """Rows of every length class in shared slots, some with units laid out (outer, units,
    inner) and some without: moments, elements and counts equal fold_rows' rows added by hand,
    and each unit's count of values > 0 equals torch's count over that unit's values."""
    rng = np.random.default_rng(21)
    # (slot, shape as (outer, units, inner), first unit slot or 0 for none)
    layout = [(0, (32, 5, 1), 1), (1, (4, 3, 7), 6), (0, (32, 5, 1), 1), (2, (2, 4, 600), 0), (1, (1, 3, 1), 6),
              (2, (0, 4, 1), 0), (3, (5, 2, 900), 9)]
    lengths = np.array([math.prod(shape) for _, shape, _ in layout])
    row_slot = np.array([slot for slot, _, _ in layout])
    row_units = np.array([[first, shape[1], shape[2]] if first else [0, 0, 0] for _, shape, first in layout])
    centres = np.array([0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0], np.float32)
    thresholds = np.array([np.inf, 0.485, np.inf, 0.9, 0.485, np.inf, 0.97], np.float32)
    values = random_values(rng, int(lengths.sum()), True)
    counts = np.zeros((4, S.SIGN_EXPONENT_BINS), np.int64)
    moments, elements, positives = np.ones((4, 3)), np.full(4, 7, np.int64), np.full(11, 2, np.float32)
    K.fold_activation_rows(values, lengths, row_slot, (centres, thresholds), row_units, counts, moments, elements,
                           positives)
    expected_counts = np.zeros_like(counts)
    rows = K.fold_rows(values, lengths, row_slot, expected_counts, (centres, thresholds))
    expected_moments, expected_elements = np.ones((4, 3)), np.full(4, 7, np.int64)
    np.add.at(expected_moments, row_slot, rows[:, [0, 2, 4]])
    np.add.at(expected_elements, row_slot, lengths)
    expected_positives = torch.full((11,), 2.0)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for (_, shape, first), a, b in zip(layout, starts, starts[1:]):
        if first:
            row = torch.from_numpy(values[a:b]).reshape(shape)
            expected_positives[first:first + shape[1]] += (row > 0).sum(dim=(0, 2)).float()
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(moments, expected_moments, rtol=1e-15, equal_nan=True)
    np.testing.assert_array_equal(elements, expected_elements)
    np.testing.assert_array_equal(positives, expected_positives.numpy())
