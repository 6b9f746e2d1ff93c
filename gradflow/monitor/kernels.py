"""Fused CPU kernels (numba) for the statistics of large tensors: one pass where torch needs six.

The monitor reduces every element of every step (the histogram every ``histogram_every``-th
step: below). For a large tensor on the CPU, torch takes
one pass per statistic (sum, sum of |x|, sum of squares, max |x|, the exponent bins) and a
single-threaded ``bincount`` that alone costs about a nanosecond a value. These kernels compute
them all in one pass over each 16 KB block while it sits in L1: the sums in float64 and max |x|
in explicit 512-bit vectors (``_wide_loop``), then the 512-bin sign/exponent histogram into
eight interleaved sub-histograms, so that runs of equal bins do not wait on one another, while
the next block is prefetched into L1.

Measured on an AVX-512 Xeon (Emerald Rapids, about 3 GHz; ``benchmarks/kernel_speed.py``, ns per
float32 value, before -> after these choices, one run): a 1M-value gradient not in the cache (the
backward pass wrote it a while ago) 1.03 -> 0.64, the same in the cache 0.67 -> 0.64 (0.21 the
sums and max |x| of a block in L1, 0.33 its histogram), all zeros 1.18 -> 0.63; inside the wide
MLP's training steps (``benchmarks/profile_monitor.py``) ``fold_all`` 1.05 -> 0.61-0.70.
- The next block is prefetched while this one is counted: the counting loop is bound by its
  stores, the memory bus was idle meanwhile, and the sums then waited on each line.
- Eight sub-histograms rather than four: a block of equal values (all zeros: a dead ReLU
  layer's gradient) counted at 0.65, as fast as any other now (0.35). Their rows are padded so
  that no two lie a multiple of 4 KB apart: there the store buffer takes them for one address
  and eight count as slowly as four.
- max |x| and the band's count kept in int32 (numba types int32 & int32 and int32 + int32 as
  int64): in int64 every value was first widened, one more instruction per four (the block's
  sums 0.28 -> 0.23 without a band; with one, 0.72 -> 0.68 for the whole fold).
- ``fold_weights(renew=True)`` writes each weight into the window's start as it reads it: the
  fold and the next start in one pass, where a ``copy_`` after it read both again (a 1M-value
  weight 1.34 -> 1.00 ns/value; resnet18's weight summary 20.5 -> 13.4-14.4 ms, 2026-12-05).
- Subnormals (exponent 0, mantissa not 0) are not zeros, but the counting loop's key, the top
  nine bits, puts them in the zero bins. A block that added to those is checked afterwards
  (``_count_block``: an unsigned minimum over the block, then a count only where one is there),
  and its subnormals move to exponent 1. A block without zeros pays nothing, nor does one of
  zeros alone (its largest |x| is 0); half zeros (a ReLU layer's output) pay the check.
  ``kernel_speed.py --before main``, four runs on a shared 2-core VM of the same CPU
  (2026-12-06), after / before: the 1M gradient in cache 1.01-1.03x, all zeros 0.99-1.04x, the
  histogram alone 0.97-1.02x, ``fold_weights`` 1.01x (41 rounds), 1M half zeros 1.06-1.14x
  (0.59-0.65 -> 0.63-0.74 ns), rows of 500 half zeros 1.05-1.09x. Tried: a key that tells them
  apart in the loop (+ 1 where (bits & 0x7FFFFFFF) - 1 < 0x7FFFFF, unsigned): 1.5x on every
  fold, the histogram alone 0.36 -> 0.71; a minimum or a count of them in ``_block_moments``:
  its vectorized loop 0.12-0.15 -> 0.21-0.37 on every block.
- Tried and dropped: one loop for the sums and the histogram (LLVM vectorizes no loop that
  scatters; four scalar lanes of the three sums cost 0.76 against 0.57 for the two loops); keys in a
  vectorized uint16 pass, then scattered (0.39 against 0.35); two keys per 64-bit load (no
  change: the stores bound the loop); blocks of 2048 or 8192 values (slower, out of the cache).
- The sums and max |x| in explicit vectors of eight float64 and sixteen int32 (``_wide_loop``, an
  intrinsic that emits the loop's LLVM IR), 2026-12-06: LLVM vectorizes numba's loops at 256 bits
  on this CPU (its tuning prefers them; numba has no per-function switch), four float64 a vector,
  and each float32 -> float64 conversion, two micro-ops on the two vector ports, held the sums
  there; max |x| rode along at the sums' width, four int32 lanes. A block in L1: 0.159 -> 0.124
  (max |x| in a loop of its own at eight lanes first: 0.158 -> 0.148); ``_block_weights`` 0.183
  -> 0.173, renewing 0.200 -> 0.174. Inside the wide MLP's steps ``fold_all`` 0.53-0.57 -> 0.48-0.54
  (five runs each; docs/benchmarks.md). The band's count is a loop of its own (eight float32
  lanes): a fold with a band 0.57 -> 0.49. The kernels that call the intrinsics are compiled
  without fast-math: numba puts its flags on every float instruction of the function, the
  intrinsic's too, and LLVM then reassociated the renewing and the plain weight loop
  differently (their rows differed in the last bit).
- A block of zeros alone (largest |x| 0) is counted by its sign bits (``_count_zeros``): the
  counting loop stored one increment a value into one bin. Fold of 1M zeros 0.47 -> 0.27.
- Tried and dropped, 2026-12-06 (ns per value, a block in L1, one run each): the sums in float32
  lanes, flushed into float64 every 64 values: 0.126 against 0.157 (then), but 1.7e-10 and
  3.2e-10 relative error in sum |x| and sum x² over 1M Gaussian values, where the oracle tests
  allow 1e-12 and the 6e4 test below none (a float32 x² alone rounds at 2⁻²⁴); max |x| from the
  float64 |x| (a compare and select: LLVM vectorizes no such reduction without ``nnan``): 1.0;
  the histogram by pairs of values (a 6-bit code each: sign, zero, 30 exponents below the block's
  largest; one increment of a 4096-bin uint32 table per pair): the codes in explicit vectors
  0.105 and the increments 0.118, 0.223 against 0.254-0.259, before the handling of values
  outside the window, the table's flushes and subnormals, and a block of equal values would
  chain on one bin (no room in L1 for sub-tables of 16 KB); with uint16 bins 0.383; the
  sub-histograms bin-major (a bin's eight side by side, so that stores share a cache line):
  0.246-0.273 against 0.253-0.258.

- A step that is not histogrammed (``gradients.HISTOGRAM_EVERY``: nine steps in ten by default)
  is folded without the counting loop (``_tally_piece``): the sums and max |x|, then a count of
  the exact zeros (eight lanes a vector) and, only in a block whose largest |x| is Inf or NaN, of
  the non-finite values, so that zero_fraction and nonfinite still count every value.
  ``kernel_speed.py --before 13ae3db`` (2026-12-06): 0.442 -> 0.284 ns a value in cache, 0.445 ->
  0.293 out of it; of the 0.28, the zeros' count is about 0.10 (four ways of writing it, all
  0.10-0.13). The tallies of a histogrammed step are read off its zero and non-finite bins.

The sums are float64 from the first value: a float32 x² is exact in float64 (24 + 24 bits < 53),
so the sum of squares errs only by float64 rounding, and no float32 value can overflow it. Summing
a 4096-value block in float32 (as the kernels once did) errs by up to about n·2⁻²⁴ per lane: for
4096 copies of float16's 6e4 the norm came out 1.07e-6 too high.

The kernels run on the calling thread. Sharing the work out was measured and dropped: numba's
parallel layer starts a second OpenMP runtime beside torch's, and numba ends a forked child
that uses it (the sweeps fork their workers); plain helper threads halve a kernel's time on its
own but gained nothing inside a training step, where torch's OpenMP workers still spin on the
other cores after the backward pass.

NaN and Inf propagate as in torch (the sums are plain IEEE adds, in an order fixed by the
IR); max |x| is taken on the bits with the sign cleared, which order like |x|
and put NaN above Inf.

The prefetch is LLVM's ``llvm.prefetch`` through a numba intrinsic: a plain load of the next
block's lines instead held the loop up on each miss (1.6 against 0.8 ns per value, out of the cache,
in one run).

numba is imported only when this module is, on the first CPU tensor that needs it; where
numba is missing the monitor uses torch ops (``gradflow.monitor.stats.Scratch``), with the same results.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from gradflow.monitor.columns import SIGN_EXPONENT_BINS  # one definition, shared with stats.py

BLOCK = 4096                     # values per block: 16 KB of float32, in L1
SHORT_ROW = 1024                 # shorter rows count straight into their histogram (no sub-histograms to add):
                                 # at 2048, a row of 1500 zeros took 2.1 ns a value, 0.7 now; 1024 Gaussian 0.7 -> 0.9
PIECE_MAX = 1 << 30              # a piece's uint32 sub-histograms must not overflow
_MAGNITUDE_BITS = np.int32(0x7FFFFFFF)
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_SHIFT = np.uint32(23)
_ONE = np.uint32(1)
_SUBNORMAL_TOP = np.uint32(0x7FFFFF)   # subnormal: 0 < bits & 0x7FFFFFFF <= this (exponent 0)
_INF_BITS = np.int32(0x7F800000)     # |x|'s bits at or above this: Inf or NaN
_SIGN_BIN = 256
LINE = 16                        # float32 values per 64-byte cache line: one prefetch each
TINY_ROW = 64                    # shorter rows take one scalar pass (_fold_tiny_row)
SUBS = 8                         # sub-histograms of a long row or piece
_SUB_STRIDE = SIGN_EXPONENT_BINS + 16   # 2112 bytes between sub-histograms: not 4 KB-aliased


@intrinsic
def _prefetch(typingctx, array, index):
    """Start loading the cache line of ``array[index]`` into L1 (``llvm.prefetch``: a read, kept
    in every level). A hint: it never faults and returns nothing."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]],
                                           wraparound=False, boundscheck=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 0),
                                ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


@njit(cache=True)
def _probe_prefetch(values):
    _prefetch(values, 0)
    return values[0]


try:         # checked on numba 0.68 / LLVM 22; another LLVM may name the intrinsic otherwise
    _probe_prefetch(np.zeros(1, np.float32))
except Exception:   # a hint only: without it the kernels are slower on cold memory, not wrong
    @njit(inline="always")
    def _prefetch(array, index):
        return None


_WIDE = 8                        # float64 lanes of one 512-bit register
_WIDE_ACCUMULATORS = 4           # per sum: an add's latency (4 cycles) over its throughput (one a cycle)
WIDE_STEP = _WIDE * _WIDE_ACCUMULATORS   # values per turn of an explicit-vector loop


def _vector_math(builder, vector, name, arity):
    """The LLVM intrinsic ``llvm.NAME.v8f64`` taking ``arity`` vectors."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * arity),
                                          f"llvm.{name}.v{_WIDE}f64")


def _wide_loop(context, builder, arrays, stop, sums, body, top=False, copy_to=None):
    """Emit ``for k in range(stop // WIDE_STEP)`` over ``arrays`` ((type, value) pairs of 1-D C
    float32 arrays): ``body(builder, xs, accumulators)`` once for each of its _WIDE_ACCUMULATORS
    slices of eight, ``xs`` each array's eight values widened to float64 and ``accumulators`` that
    slice's ``sums`` float64 vectors, which body returns updated. Returns each sum reduced to a
    float64; with ``top``, then the largest bits of the first array with the sign cleared (an
    int32); with ``copy_to`` (type, value), the first array's values are stored there as read."""
    f64, i32 = ir.DoubleType(), ir.IntType(32)
    vector = ir.VectorType(f64, _WIDE)
    bits_vector = ir.VectorType(i32, 2 * _WIDE)
    sixteen_floats = ir.VectorType(ir.FloatType(), 2 * _WIDE)

    def base(array_type, array):
        data = context.make_array(array_type)(context, builder, array).data
        return builder.bitcast(data, sixteen_floats.as_pointer())
    bases = [base(*array) for array in arrays]
    target = base(*copy_to) if copy_to is not None else None
    zero = ir.Constant(vector, [0.0] * _WIDE)
    slots = [[cgutils.alloca_once_value(builder, zero) for _ in range(_WIDE_ACCUMULATORS)] for _ in range(sums)]
    tops = [cgutils.alloca_once_value(builder, ir.Constant(bits_vector, [0] * 2 * _WIDE)) for _ in range(2)]
    magnitude = ir.Constant(bits_vector, [0x7FFFFFFF] * 2 * _WIDE)
    smax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bits_vector, [bits_vector] * 2),
                                          f"llvm.smax.v{2 * _WIDE}i32")
    halves = [ir.Constant(ir.VectorType(i32, _WIDE), list(range(h * _WIDE, (h + 1) * _WIDE))) for h in range(2)]
    turns = builder.udiv(stop, ir.Constant(stop.type, WIDE_STEP))
    with cgutils.for_range(builder, turns) as loop:
        first = builder.mul(loop.index, ir.Constant(loop.index.type, _WIDE_ACCUMULATORS // 2))
        for pair in range(_WIDE_ACCUMULATORS // 2):     # sixteen values a load, as two vectors of eight
            at = builder.add(first, ir.Constant(first.type, pair))
            loaded = [builder.load(builder.gep(b, [at]), align=4) for b in bases]
            if target is not None:
                builder.store(loaded[0], builder.gep(target, [at]), align=4)
            for h in range(2):
                a = 2 * pair + h
                xs = [builder.fpext(builder.shuffle_vector(v, v, halves[h]), vector) for v in loaded]
                values = body(builder, xs, [builder.load(slots[k][a]) for k in range(sums)])
                for k in range(sums):
                    builder.store(values[k], slots[k][a])
            if top:
                bits = builder.and_(builder.bitcast(loaded[0], bits_vector), magnitude)
                builder.store(builder.call(smax, [builder.load(tops[pair]), bits]), tops[pair])
    totals = []
    for k in range(sums):
        v = builder.load(slots[k][0])
        for a in range(1, _WIDE_ACCUMULATORS):
            v = builder.fadd(v, builder.load(slots[k][a]))
        total = builder.extract_element(v, ir.Constant(i32, 0))
        for lane in range(1, _WIDE):
            total = builder.fadd(total, builder.extract_element(v, ir.Constant(i32, lane)))
        totals.append(total)
    if top:
        v = builder.call(smax, [builder.load(tops[0]), builder.load(tops[1])])
        largest = builder.extract_element(v, ir.Constant(i32, 0))
        for lane in range(1, 2 * _WIDE):
            element = builder.extract_element(v, ir.Constant(i32, lane))
            largest = builder.select(builder.icmp_signed(">", element, largest), element, largest)
        totals.append(largest)
    return totals


def _is_float32_vector(array) -> bool:
    return isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C" and array.dtype == types.float32


@intrinsic
def _wide_moments(typingctx, values, stop):
    """(sum x, sum |x|, sum x², the largest |x|'s bits) over ``values[:stop]`` (1-D C float32; stop
    a multiple of WIDE_STEP), the sums in float64, in explicit vectors of eight float64: LLVM
    vectorizes numba's loops at 256 bits on this CPU (its tuning prefers them), four float64 a
    vector, and the float32 -> float64 conversion, two micro-ops each, held the sums there."""
    if not _is_float32_vector(values):
        return None
    result = types.Tuple((types.float64, types.float64, types.float64, types.int32))

    def codegen(context, builder, signature, args):
        vector = ir.VectorType(ir.DoubleType(), _WIDE)
        fabs, fma = _vector_math(builder, vector, "fabs", 1), _vector_math(builder, vector, "fma", 3)

        def body(builder, xs, sums):
            x, = xs
            total, absolute, squares = sums
            return (builder.fadd(total, x), builder.fadd(absolute, builder.call(fabs, [x])),
                    builder.call(fma, [x, x, squares]))
        totals = _wide_loop(context, builder, [(signature.args[0], args[0])], args[1], 3, body, top=True)
        return context.make_tuple(builder, result, totals)
    return result(values, stop), codegen


def _wide_weights_of(renew: bool):
    """The intrinsic ``(values, start, stop) -> (sum |w|, sum w², sum (w - s)², sum s²)`` over the
    first ``stop`` values (a multiple of WIDE_STEP) of the 1-D C float32 ``values`` (w) and
    ``start`` (s), in float64, as _wide_moments; with ``renew``, each start value becomes its
    weight as read (``_block_weights``)."""
    @intrinsic
    def wide_weights(typingctx, values, start, stop):
        if not (_is_float32_vector(values) and _is_float32_vector(start)):
            return None
        result = types.UniTuple(types.float64, 4)

        def codegen(context, builder, signature, args):
            vector = ir.VectorType(ir.DoubleType(), _WIDE)
            fabs, fma = _vector_math(builder, vector, "fabs", 1), _vector_math(builder, vector, "fma", 3)

            def body(builder, xs, sums):
                w, s = xs
                absolute, squares, moved, before = sums
                change = builder.fsub(w, s)
                return (builder.fadd(absolute, builder.call(fabs, [w])), builder.call(fma, [w, w, squares]),
                        builder.call(fma, [change, change, moved]), builder.call(fma, [s, s, before]))
            arrays = [(signature.args[0], args[0]), (signature.args[1], args[1])]
            totals = _wide_loop(context, builder, arrays, args[2], 4, body, copy_to=arrays[1] if renew else None)
            return context.make_tuple(builder, result, totals)
        return result(values, start, stop), codegen
    return wide_weights


_wide_weights = _wide_weights_of(False)
_wide_weights_renewing = _wide_weights_of(True)


@njit(cache=True)
def _probe_wide(values, start):
    return _wide_moments(values, values.size), _wide_weights_renewing(values, start, values.size)


def _wide_loops_work() -> bool:
    """Whether the explicit-vector loops compile here and give exact sums of small integers."""
    values = np.arange(WIDE_STEP, dtype=np.float32) - 5
    start = np.zeros(WIDE_STEP, np.float32)
    try:
        moments, weights = _probe_wide(values, start)
    except Exception:       # checked on numba 0.68 / LLVM 22; another LLVM may reject the IR
        return False
    w = values.astype(np.float64)
    return (moments == (w.sum(), np.abs(w).sum(), (w * w).sum(), np.int32(np.abs(values).max().view(np.int32)))
            and weights == (np.abs(w).sum(), (w * w).sum(), (w * w).sum(), 0.0) and np.array_equal(start, values))


@njit(nogil=True, boundscheck=False, cache=True)
def _plain_moments(values, stop):
    """_wide_moments in numba's own loop: where the explicit vectors do not compile (slower, not wrong)."""
    total = absolute = squares = 0.0
    top = np.int32(0)
    bits = values.view(np.int32)
    for i in range(stop):
        x = np.float64(values[i])
        total += x
        absolute += abs(x)
        squares += x * x
        top = max(top, np.int32(bits[i] & _MAGNITUDE_BITS))
    return total, absolute, squares, top


@njit(nogil=True, boundscheck=False, cache=True)
def _plain_weights(values, start, stop, renew):
    """_wide_weights (``renew`` False) or _wide_weights_renewing in numba's own loop."""
    return _weights_from(values, start, 0, stop, renew, 0.0, 0.0, 0.0, 0.0)


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _weights_from(values, start, first, stop, renew, absolute, squares, moved, before):
    """The sums of |w|, w², (w - start)² and start² over values[first:stop] added to those given,
    one value at a time (numba's loop; the vector loops' tail)."""
    for i in range(first, stop):
        w = np.float64(values[i])
        s = np.float64(start[i])
        if renew:
            start[i] = values[i]
        absolute += abs(w)
        squares += w * w
        moved += (w - s) * (w - s)
        before += s * s
    return absolute, squares, moved, before


if not _wide_loops_work():
    _wide_moments = _plain_moments                                  # noqa: F811

    @njit(nogil=True, boundscheck=False, cache=True)
    def _wide_weights(values, start, stop):                         # noqa: F811
        return _plain_weights(values, start, stop, False)

    @njit(nogil=True, boundscheck=False, cache=True)
    def _wide_weights_renewing(values, start, stop):                # noqa: F811
        return _plain_weights(values, start, stop, True)


@njit(nogil=True, boundscheck=False, cache=True)
def _block_moments(values, bits, centre, threshold):
    """Sums of x, |x| and x² (in float64), the count of |x - centre| > threshold, and the largest
    |x|'s bits."""
    wide = values.size - values.size % WIDE_STEP
    total, absolute, squares, top = _wide_moments(values, wide)
    for i in range(wide, values.size):
        x = np.float64(values[i])
        total += x
        absolute += abs(x)
        squares += x * x
        top = max(top, np.int32(bits[i] & _MAGNITUDE_BITS))
    beyond = np.int32(0)               # int32: numba widens int32 sums to int64 (see the module's docstring)
    if threshold != np.inf:            # a band: a loop of its own, eight float32 lanes
        for i in range(values.size):
            beyond = np.int32(beyond + (abs(values[i] - centre) > threshold))
    return total, absolute, squares, beyond, top


@njit(nogil=True, boundscheck=False, cache=True)
def _subnormals(bits):
    """(positive, negative) counts of the float32 subnormals in ``bits`` (the int32 or uint32
    bits of float32 values, a block at most: int32 counts): exponent 0, mantissa not 0."""
    subnormals = np.int32(0)
    negative = np.int32(0)
    for i in range(bits.size):
        u = np.uint32(bits[i])
        subnormal = np.int32(np.uint32((u & _MAGNITUDE) - _ONE) < _SUBNORMAL_TOP)
        subnormals = np.int32(subnormals + subnormal)
        negative = np.int32(negative + (subnormal & np.int32(u >> np.uint32(31))))
    return np.int64(subnormals - negative), np.int64(negative)


@njit(nogil=True, boundscheck=False, cache=True)
def _any_subnormal(bits):
    """Whether ``bits`` (as for ``_subnormals``) hold a subnormal: one unsigned minimum a value,
    cheaper than counting them (0.06 against 0.09 ns a value, a block in L1)."""
    low = np.uint32(0xFFFFFFFF)
    for i in range(bits.size):
        low = min(low, np.uint32((np.uint32(bits[i]) & _MAGNITUDE) - _ONE))
    return low < _SUBNORMAL_TOP


@njit(nogil=True, boundscheck=False, cache=True)
def _move_subnormals(bits, histogram):
    """Move the subnormals of ``bits``, just counted into the int64 ``histogram`` (stats.py's
    layout, negatives first) with the zeros of their sign, to the lowest non-zero bin of that sign."""
    if _any_subnormal(bits):
        positive, negative = _subnormals(bits)
        histogram[_SIGN_BIN] -= positive
        histogram[_SIGN_BIN + 1] += positive
        histogram[0] -= negative
        histogram[1] += negative


@njit(nogil=True, boundscheck=False, cache=True)
def _move_subnormals_in_subs(bits, sub):
    """_move_subnormals for the eight sub-histograms (unsigned bins, positives first), where
    one sub-histogram's zero bin may hold fewer of them than there are; together they hold all."""
    if not _any_subnormal(bits):
        return
    positive, negative = _subnormals(bits)
    for zero_bin, count in ((0, positive), (_SIGN_BIN, negative)):
        for k in range(SUBS):
            at = k * _SUB_STRIDE + zero_bin
            take = min(np.int64(sub[at]), count)
            sub[at] = np.uint32(np.int64(sub[at]) - take)
            sub[at + 1] = np.uint32(np.int64(sub[at + 1]) + take)
            count -= take


@njit(nogil=True, boundscheck=False, cache=True)
def _block_counts(unsigned, sub, ahead, also, ahead_start, ahead_stop):
    """Count each value's top nine bits (sign, exponent) into ``sub``'s eight uint32 histograms
    (unsigned bins, positives first; ``_add_counts`` puts negatives first) in turn, and prefetch
    ``ahead[ahead_start:ahead_stop]`` (and ``also``'s, unless None): the next block, a line per
    16 values counted."""
    c0 = sub[0 * _SUB_STRIDE:0 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c1 = sub[1 * _SUB_STRIDE:1 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c2 = sub[2 * _SUB_STRIDE:2 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c3 = sub[3 * _SUB_STRIDE:3 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c4 = sub[4 * _SUB_STRIDE:4 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c5 = sub[5 * _SUB_STRIDE:5 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c6 = sub[6 * _SUB_STRIDE:6 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    c7 = sub[7 * _SUB_STRIDE:7 * _SUB_STRIDE + SIGN_EXPONENT_BINS]
    lines = unsigned.size // LINE
    for j in range(lines):
        line = ahead_start + LINE * j
        if line < ahead_stop:
            _prefetch(ahead, line)
            if also is not None:
                _prefetch(also, line)
        for i in range(LINE * j, LINE * j + LINE, SUBS):
            c0[unsigned[i] >> _SHIFT] += _ONE
            c1[unsigned[i + 1] >> _SHIFT] += _ONE
            c2[unsigned[i + 2] >> _SHIFT] += _ONE
            c3[unsigned[i + 3] >> _SHIFT] += _ONE
            c4[unsigned[i + 4] >> _SHIFT] += _ONE
            c5[unsigned[i + 5] >> _SHIFT] += _ONE
            c6[unsigned[i + 6] >> _SHIFT] += _ONE
            c7[unsigned[i + 7] >> _SHIFT] += _ONE
    for i in range(LINE * lines, unsigned.size):
        c0[unsigned[i] >> _SHIFT] += _ONE


@njit(nogil=True, boundscheck=False, cache=True)
def _new_sub():
    """Eight zeroed sub-histograms for ``_block_counts``, _SUB_STRIDE apart."""
    return np.zeros(SUBS * _SUB_STRIDE, np.uint32)


@njit(nogil=True, boundscheck=False, cache=True)
def _sub_for(lengths):
    """``_new_sub()`` where a row of ``lengths`` is long (SHORT_ROW values or more), else an
    empty array: 16.5 KB zeroed at each call was most of what a window of short rows (the
    tutorial's MLP) wrote, for nothing."""
    for r in range(lengths.size):
        if lengths[r] >= SHORT_ROW:
            return _new_sub()
    return np.zeros(0, np.uint32)


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _bin_total(sub, j):
    """Bin j's count over the eight sub-histograms (at most PIECE_MAX: no overflow)."""
    s = _SUB_STRIDE
    return (sub[j] + sub[s + j] + sub[2 * s + j] + sub[3 * s + j]
            + sub[4 * s + j] + sub[5 * s + j] + sub[6 * s + j] + sub[7 * s + j])


@njit(nogil=True, boundscheck=False, cache=True)
def _add_counts(sub, counts):
    """Add the sub-histograms (unsigned bins) to int64 counts in the ``gradflow.monitor.stats``
    layout (negatives first: bin = exponent, + 256 when the sign bit is clear), which flips bit
    8, and zero them. Half by half, each bin's eight at once: 0.42 us where bin by bin through
    ``j ^ 256`` took 0.75, a fixed cost of every long row."""
    for j in range(_SIGN_BIN):
        counts[_SIGN_BIN + j] += _bin_total(sub, j)
        counts[j] += _bin_total(sub, _SIGN_BIN + j)
    sub[:] = 0


@njit(nogil=True, boundscheck=False, cache=True)
def _count_zeros(unsigned, histogram, ahead, also, ahead_start, ahead_stop):
    """Count a block of zeros (+0.0 and -0.0 alone: its largest |x| is 0) into the int64
    ``histogram``'s two zero bins by its sign bits, eight lanes a vector, and prefetch the next
    block as ``_block_counts`` does: the counting loop's stores, one a value, all to one bin."""
    negative = np.int32(0)
    for i in range(unsigned.size):
        negative = np.int32(negative + np.int32(unsigned[i] >> np.uint32(31)))
    histogram[0] += negative
    histogram[_SIGN_BIN] += unsigned.size - negative
    for line in range(ahead_start, ahead_stop, LINE):
        _prefetch(ahead, line)
        if also is not None:
            _prefetch(also, line)


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _count_block(unsigned, long_row, nonzero, sub, histogram, ahead, also, ahead_start, ahead_stop):
    """Count a block of a row: into the sub-histograms for a long row (added to the row's
    histogram once at its end; the next block prefetched as in ``_block_counts``), straight into
    the row's int64 histogram for a short one. Inlined: a call costs a row of 100 values 10%.

    The top nine bits put a subnormal with the zeros of its sign (exponent 0). A block that
    added to the zero bins is scanned for subnormals, which move to exponent 1; one with no
    value in them, or whose largest |x| is 0 (``nonzero`` False), is not (see the module's
    docstring for why the scan, and what it costs). A block of zeros alone (``nonzero`` False)
    is counted by its sign bits (``_count_zeros``)."""
    if not nonzero:
        _count_zeros(unsigned, histogram, ahead, also, ahead_start, ahead_stop)
    elif long_row:
        zeros = _bin_total(sub, 0) + _bin_total(sub, _SIGN_BIN)
        _block_counts(unsigned, sub, ahead, also, ahead_start, ahead_stop)
        if nonzero and _bin_total(sub, 0) + _bin_total(sub, _SIGN_BIN) != zeros:
            _move_subnormals_in_subs(unsigned, sub)
    else:
        zeros = histogram[0] + histogram[_SIGN_BIN]
        for j in range(unsigned.size):
            histogram[(unsigned[j] >> _SHIFT) ^ _SIGN_BIN] += 1
        if histogram[0] + histogram[_SIGN_BIN] != zeros:
            _move_subnormals(unsigned, histogram)


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _add_block_moments(values, bits, centre, threshold, result):
    """Add a block's ``_block_moments`` to ``result`` ([sum x, sum |x|, sum x², -, count beyond]);
    return its largest |x|'s bits."""
    t, a, s, b, m = _block_moments(values, bits, centre, threshold)
    result[0] += t
    result[1] += a
    result[2] += s
    result[4] += b
    return m


@njit(nogil=True, boundscheck=False, cache=True)
def _fold_piece(values, centre, threshold, counts, result, tally):
    """Add one piece's histogram to ``counts``, its statistics to ``result``: [sum x, sum |x|,
    sum x², bits of the largest |x| (as a float), count beyond], and its exact zeros and
    non-finite values to ``tally`` (read off the histogram's bins)."""
    zeros, nonfinite = _zero_bins(counts), _nonfinite_bins(counts)
    bits = values.view(np.int32)
    unsigned = values.view(np.uint32)
    sub = _new_sub()
    top = np.int32(result[3])
    for start in range(0, values.size, BLOCK):
        stop = min(values.size, start + BLOCK)
        m = _add_block_moments(values[start:stop], bits[start:stop], centre, threshold, result)
        top = max(top, m)
        _count_block(unsigned[start:stop], True, m != 0, sub, counts, unsigned, None, stop, min(values.size, stop + BLOCK))
    result[3] = top
    _add_counts(sub, counts)
    tally[0] += _zero_bins(counts) - zeros
    tally[1] += _nonfinite_bins(counts) - nonfinite


@njit(nogil=True, boundscheck=False, cache=True)
def _tally_piece(values, centre, threshold, result, tally):
    """``_fold_piece`` without the histogram: the statistics, and the exact zeros and non-finite
    values counted apart (``_tally_block``), each block's next one prefetched as the counting
    loop would."""
    bits = values.view(np.int32)
    top = np.int32(result[3])
    for start in range(0, values.size, BLOCK):
        stop = min(values.size, start + BLOCK)
        m = _add_block_moments(values[start:stop], bits[start:stop], centre, threshold, result)
        top = max(top, m)
        z, n = _tally_block(bits[start:stop], m)
        tally[0] += z
        tally[1] += n
        for line in range(stop, min(values.size, stop + BLOCK), LINE):
            _prefetch(values, line)
    result[3] = top


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _tally_block(bits, top):
    """Exact zeros (+0.0 and -0.0) and non-finite values of a block whose largest |x|'s bits are
    ``top``: a vectorized count of the zeros (all of them where ``top`` is 0), and one of the
    non-finite values only where ``top`` says there is one (Inf's bits or above: rare)."""
    if top == 0:
        return np.int64(bits.size), np.int64(0)
    zeros = np.int32(0)                # int32: numba widens int32 sums to int64 (see the module's docstring)
    for i in range(bits.size):
        zeros = np.int32(zeros + np.int32((bits[i] & _MAGNITUDE_BITS) == 0))
    nonfinite = np.int32(0)
    if top >= _INF_BITS:
        for i in range(bits.size):
            nonfinite = np.int32(nonfinite + np.int32((bits[i] & _MAGNITUDE_BITS) >= _INF_BITS))
    return np.int64(zeros), np.int64(nonfinite)


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _zero_bins(histogram):
    return histogram[0] + histogram[_SIGN_BIN]


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _nonfinite_bins(histogram):
    return histogram[_SIGN_BIN - 1] + histogram[SIGN_EXPONENT_BINS - 1]


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _fold_tiny_row(values, bits, start, stop, centre, threshold, histogram, counted, out, tally):
    """A row of fewer than TINY_ROW values in one scalar pass: the block kernels' set-up costs
    such a row about 150 ns, more than its values (a step of the tutorial's MLP is twelve rows
    of 1 to 25 values; fold_rows on 16 steps of them: 52 -> 11 us). Its histogram only where
    ``counted``; its exact zeros and non-finite values go to ``tally`` either way."""
    total = 0.0
    absolute = 0.0
    squares = 0.0
    beyond = 0
    top = np.int32(0)
    zeros = 0
    nonfinite = 0
    in_zero_bins = _zero_bins(histogram)
    for i in range(start, stop):
        x = np.float64(values[i])
        total += x
        absolute += abs(x)
        squares += x * x
        beyond += abs(values[i] - centre) > threshold
        magnitude = bits[i] & _MAGNITUDE_BITS
        top = max(top, magnitude)
        zeros += magnitude == 0
        nonfinite += magnitude >= _INF_BITS
        if counted:
            histogram[(np.uint32(bits[i]) >> _SHIFT) ^ _SIGN_BIN] += 1
    if counted and _zero_bins(histogram) - in_zero_bins != zeros:     # subnormals out of the zero bins
        _move_subnormals(bits[start:stop], histogram)
    out[0] += total
    out[1] += absolute
    out[2] += squares
    out[4] += beyond
    tally[0] += zeros
    tally[1] += nonfinite
    return top


@njit(nogil=True, boundscheck=False, cache=True)
def _fold_rows(values, lengths, row_slot, row_centre, row_threshold, counts, out, row_counted, tally):
    """Rows are consecutive runs of ``values``: out[r] = [sum x, sum |x|, sum x², bits of the
    largest |x|, count beyond row r's band], tally[r] = [exact zeros, non-finite values], and
    counts[row_slot[r]] gets row r's histogram where ``row_counted[r]``. A row of SHORT_ROW
    values or more counts into sub-histograms (see ``_block_counts``)."""
    bits = values.view(np.int32)
    unsigned = values.view(np.uint32)
    sub = _sub_for(lengths)
    start = 0
    for r in range(lengths.size):
        stop = start + lengths[r]
        histogram = counts[row_slot[r]]
        counted = row_counted[r]
        if lengths[r] < TINY_ROW:
            out[r, 3] = _fold_tiny_row(values, bits, start, stop, row_centre[r], row_threshold[r], histogram,
                                       counted, out[r], tally[r])
            start = stop
            continue
        zeros, nonfinite = _zero_bins(histogram), _nonfinite_bins(histogram)
        top = np.int32(0)
        long_row = lengths[r] >= SHORT_ROW
        for lo in range(start, stop, BLOCK):
            hi = min(stop, lo + BLOCK)
            # out[r, k] directly: a view of the row (out[r]) per block cost rows of 100 values 7%
            t, a, s, b, m = _block_moments(values[lo:hi], bits[lo:hi], row_centre[r], row_threshold[r])
            out[r, 0] += t
            out[r, 1] += a
            out[r, 2] += s
            out[r, 4] += b
            top = max(top, m)
            if counted:
                _count_block(unsigned[lo:hi], long_row, m != 0, sub, histogram, unsigned, None, hi,
                             min(values.size, hi + BLOCK))
            else:
                z, n = _tally_block(bits[lo:hi], m)
                tally[r, 0] += z
                tally[r, 1] += n
        if counted:
            if long_row:
                _add_counts(sub, histogram)
            tally[r, 0] += _zero_bins(histogram) - zeros
            tally[r, 1] += _nonfinite_bins(histogram) - nonfinite
        out[r, 3] = top
        start = stop


@njit(nogil=True, boundscheck=False, cache=True)
def _fold_rows_into(values, lengths, row_slot, row_step, row_counted, steps, members, counts, totals, tallies,
                    step_squares):
    """``_fold_rows`` (no band) with each row added where the monitor keeps it, in the same
    call: totals[slot] += [sum x, sum |x|, sqrt(sum x²), max |x|], tallies[slot] += [zeros,
    non-finite], step_squares[steps[row_step // members], row_step % members] += sum x²."""
    rows = lengths.size
    out = np.zeros((rows, 5))
    tally = np.zeros((rows, 2), np.int64)
    _fold_rows(values, lengths, row_slot, np.zeros(rows, np.float32), np.full(rows, np.inf, np.float32), counts, out,
               row_counted, tally)
    tops = np.empty(rows, np.int32)
    for r in range(rows):
        tops[r] = np.int32(out[r, 3])
    largest = tops.view(np.float32)                # the largest |x|'s bits, as the float they are
    for r in range(rows):
        slot = row_slot[r]
        totals[slot, 0] += out[r, 0]
        totals[slot, 1] += out[r, 1]
        totals[slot, 2] += np.sqrt(out[r, 2])
        totals[slot, 3] += np.float64(largest[r])
        tallies[slot, 0] += tally[r, 0]
        tallies[slot, 1] += tally[r, 1]
        step_squares[steps[row_step[r] // members], row_step[r] % members] += out[r, 2]


@njit(nogil=True, boundscheck=False, cache=True)
def _fold_activation_rows(values, lengths, row_slot, row_centre, row_threshold, row_units, counts, moments, elements,
                          positives):
    """``_fold_rows`` (every row counted) with each row added where the activations part keeps
    it: moments[slot] += [sum x, sum x², count beyond the band], elements[slot] += the row's
    length, and, where row_units[r] = [first, units, inner] has first > 0, positives[first + u]
    += the row's values > 0 of unit u, the row being (outer, units, inner) in C order."""
    rows = lengths.size
    out = np.zeros((rows, 5))
    tally = np.zeros((rows, 2), np.int64)
    _fold_rows(values, lengths, row_slot, row_centre, row_threshold, counts, out, np.ones(rows, np.bool_), tally)
    start = 0
    for r in range(rows):
        slot = row_slot[r]
        moments[slot, 0] += out[r, 0]
        moments[slot, 1] += out[r, 2]
        moments[slot, 2] += out[r, 4]
        elements[slot] += lengths[r]
        if row_units[r, 0] > 0:
            _count_row_units(values[start:start + lengths[r]], row_units[r, 0], row_units[r, 1], row_units[r, 2],
                             positives)
        start += lengths[r]


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _count_row_units(row, first, units, inner, positives):
    """positives[first + u] += the values > 0 of unit u of ``row``, laid out (outer, units,
    inner). Counted in int64 and added once per unit: a float32 add per value (or per inner run
    of one value, the (batch, units) case) cost 2.4 ns a value."""
    counted = np.zeros(units, np.int64)
    i = 0
    if inner == 1:
        for _ in range(row.size // units):
            for unit in range(units):
                counted[unit] += row[i + unit] > 0
            i += units
    else:
        for _ in range(row.size // (units * inner)):
            for unit in range(units):
                count = np.int32(0)
                for j in range(i, i + inner):
                    count = np.int32(count + np.int32(row[j] > 0))
                counted[unit] += count
                i += inner
    for unit in range(units):
        positives[first + unit] += counted[unit]


@njit(nogil=True, boundscheck=False, cache=True)
def _block_weights(values, start, renew):
    """Sums of |w|, w², (w - start)² and start² over a block, in float64; with ``renew``, each
    start[i] becomes values[i] once read (the next window's start, in the same pass)."""
    wide = values.size - values.size % WIDE_STEP
    if renew:
        absolute, squares, moved, before = _wide_weights_renewing(values, start, wide)
    else:
        absolute, squares, moved, before = _wide_weights(values, start, wide)
    return _weights_from(values, start, wide, values.size, renew, absolute, squares, moved, before)


@njit(nogil=True, boundscheck=False, cache=True)
def _fold_weight_segments(values, start, lengths, rows, counts, renew, count):
    unsigned = values.view(np.uint32)
    sub = _sub_for(lengths)
    offset = 0
    for segment in range(lengths.size):
        stop = offset + lengths[segment]
        histogram = counts[segment if count else 0]
        if lengths[segment] < TINY_ROW:        # one scalar pass, as _fold_tiny_row
            zeros = histogram[0] + histogram[_SIGN_BIN]
            for i in range(offset, stop):
                w = np.float64(values[i])
                s = np.float64(start[i])
                rows[segment, 0] += abs(w)
                rows[segment, 1] += w * w
                rows[segment, 2] += (w - s) * (w - s)
                rows[segment, 3] += s * s
                if renew:
                    start[i] = values[i]
                if count:
                    histogram[(unsigned[i] >> _SHIFT) ^ _SIGN_BIN] += 1
            if count and histogram[0] + histogram[_SIGN_BIN] != zeros:
                _move_subnormals(unsigned[offset:stop], histogram)
            offset = stop
            continue
        long_row = lengths[segment] >= SHORT_ROW
        for lo in range(offset, stop, BLOCK):
            hi = min(stop, lo + BLOCK)
            a, s, m, b = _block_weights(values[lo:hi], start[lo:hi], renew)
            rows[segment, 0] += a
            rows[segment, 1] += s
            rows[segment, 2] += m
            rows[segment, 3] += b
            if count:
                _count_block(unsigned[lo:hi], long_row, True, sub, histogram, values, start, hi,
                             min(values.size, hi + BLOCK))
            else:                              # the counting loop's prefetch of the next block, alone
                for line in range(hi, min(values.size, hi + BLOCK), LINE):
                    _prefetch(values, line)
                    _prefetch(start, line)
        if long_row and count:
            _add_counts(sub, histogram)
        offset = stop


@njit(nogil=True, boundscheck=False, cache=True)
def _count_positive_rows(values, positives):
    for row in range(values.shape[0]):
        for unit in range(values.shape[1]):
            positives[unit] += values[row, unit] > 0


@njit(nogil=True, boundscheck=False, cache=True)
def _count_positive_blocks(values, positives):
    inner = values.shape[2]
    for outer in range(values.shape[0]):
        for unit in range(values.shape[1]):
            row = values[outer, unit]
            count = np.int32(0)
            for i in range(inner):
                count += np.int32(row[i] > 0)
            positives[unit] += count


def fold_all(jobs: list[tuple[np.ndarray, np.ndarray | None, float, float]],
             tallies: np.ndarray | None = None) -> np.ndarray:
    """For each job (values, counts, centre, threshold): add the sign/exponent histogram of the
    1-D float32 ``values`` to the int64 ``counts`` (512 bins; None: no histogram, about half the
    pass), and return a float64 row [sum x, sum |x|, sum x², max |x|, count of |x - centre| >
    threshold]. ``tallies``: an int64 (jobs, 2) array that each job's exact zeros and non-finite
    values are added to, histogram or not (ValueError for another shape)."""
    rows = np.zeros((len(jobs), 5))
    if tallies is None:
        tallies = np.zeros((len(jobs), 2), np.int64)
    _check_shape("fold_all", "tallies", tallies, (len(jobs), 2), "jobs")    # zip() would drop the jobs past it
    for row, tally, (values, counts, centre, threshold) in zip(rows, tallies, jobs):
        for lo in range(0, values.size, PIECE_MAX):
            if counts is None:
                _tally_piece(values[lo:lo + PIECE_MAX], np.float32(centre), np.float32(threshold), row, tally)
            else:
                _fold_piece(values[lo:lo + PIECE_MAX], np.float32(centre), np.float32(threshold), counts, row, tally)
    rows[:, 3] = rows[:, 3].astype(np.int32).view(np.float32)         # the largest |x|'s bits
    return rows


def fold_rows(values: np.ndarray, lengths: np.ndarray, row_slot: np.ndarray, counts: np.ndarray,
              bands: tuple[np.ndarray, np.ndarray] | None = None, counted: np.ndarray | None = None,
              tallies: np.ndarray | None = None) -> np.ndarray:
    """fold_all for many short rows at once: rows are consecutive runs of the 1-D float32
    ``values`` (``lengths`` long), row r's histogram goes to ``counts[row_slot[r]]`` (int64,
    (slots, 512)) where ``counted[r]`` (bool; None: every row's), ``bands`` gives each row's
    centre and threshold (float32), and row r's exact zeros and non-finite values are added to
    ``tallies[r]`` (int64, (rows, 2)) where it is given (ValueError where either has another shape)."""
    if bands is None:
        bands = np.zeros(lengths.size, np.float32), np.full(lengths.size, np.inf, np.float32)
    if counted is None:
        counted = np.ones(lengths.size, np.bool_)
    if tallies is None:
        tallies = np.zeros((lengths.size, 2), np.int64)
    _check_shape("fold_rows", "counted", counted, (lengths.size,), "rows")   # the kernel indexes both by row,
    _check_shape("fold_rows", "tallies", tallies, (lengths.size, 2), "rows")  # unchecked
    out = np.zeros((lengths.size, 5))
    _fold_rows(values, lengths, row_slot, bands[0], bands[1], counts, out, counted, tallies)
    out[:, 3] = out[:, 3].astype(np.int32).view(np.float32)
    return out


def fold_rows_into(values: np.ndarray, lengths: np.ndarray, row_slot: np.ndarray, row_step: np.ndarray,
                   counted: np.ndarray, steps: np.ndarray, members: int, counts: np.ndarray, totals: np.ndarray,
                   tallies: np.ndarray, step_squares: np.ndarray) -> None:
    """fold_rows (no band) for a run of steps' small gradients, added in the same compiled call
    to the sums the monitor keeps (one call where a dozen numpy and torch calls cost the tutorial's
    window more than its values): ``totals`` (slots, 4) float64 += [sum x, sum |x|, the row's L2
    norm, max |x|]; ``tallies`` (slots, 2) int64 += [exact zeros, non-finite values];
    ``step_squares`` (steps, members) float64 += each row's sum x² at row ``r``'s step
    ``steps[row_step[r] // members]`` and member ``row_step[r] % members``; ``counts[row_slot[r]]``
    += the histogram of each ``counted`` row. The rows' order is the order of the adds."""
    _fold_rows_into(values, lengths, row_slot, row_step, counted, steps, members, counts, totals, tallies, step_squares)


def _check_shape(function: str, name: str, array: np.ndarray, shape: tuple[int, ...], per: str) -> None:
    """ValueError unless ``array`` has ``shape`` (one row per job or row, ``per``)."""
    if np.shape(array) != shape:
        raise ValueError(f"{function}: {name} has shape {np.shape(array)} for {shape[0]} {per}; it must be {shape}")


def fold_activation_rows(values: np.ndarray, lengths: np.ndarray, row_slot: np.ndarray,
                         bands: tuple[np.ndarray, np.ndarray], row_units: np.ndarray, counts: np.ndarray,
                         moments: np.ndarray, elements: np.ndarray, positives: np.ndarray) -> None:
    """fold_rows for a run of small activation outputs, added in the same compiled call to the
    sums the activations part keeps (one call where a dozen numpy and torch calls cost the
    tutorial's window more than its values): ``moments`` (slots, 3) float64 += [sum x, sum x²,
    count of |x - centre| > threshold] of each row at ``row_slot[r]``, ``elements`` (slots,)
    int64 += its length, ``counts[row_slot[r]]`` (int64, (slots, 512)) += its histogram, and
    where ``row_units[r]`` (int64, (rows, 3)) is [first, units, inner] with first > 0, the row
    is (outer, units, inner) in C order and ``positives[first + u]`` (float32) += its values > 0
    of unit u (first 0: a row with no units to count). ``bands``: each row's centre and
    threshold (float32). The rows' order is the order of the adds."""
    _fold_activation_rows(values, lengths, row_slot, bands[0], bands[1], row_units, counts, moments, elements,
                          positives)


def fold(values: np.ndarray, counts: np.ndarray, *, centre: float = 0.0, threshold: float = np.inf) -> np.ndarray:
    """fold_all for one array."""
    return fold_all([(values, counts, centre, threshold)])[0]


def count_positive(values: np.ndarray, positives: np.ndarray) -> None:
    """Add to ``positives[u]`` how many of unit u's values are > 0; ``values`` is a C-contiguous
    (outer, units, inner) float32 array and ``positives`` float32."""
    if values.shape[2] == 1:
        _count_positive_rows(values[:, :, 0], positives)
    else:
        _count_positive_blocks(values, positives)


def fold_weights(values: np.ndarray, start: np.ndarray, lengths: np.ndarray,
                 renew: bool = False, count: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Per consecutive segment of the 1-D float32 ``values`` (``lengths`` long): float64 rows
    [sum |w|, sum w², sum (w - start)², sum start²] and int64 sign/exponent counts (512 bins;
    None with ``count`` False: where no histogram is drawn, the counting loop, about half the
    pass, is skipped). With ``renew``, ``start`` (1-D float32, as long as ``values``, not
    overlapping it) is overwritten with ``values`` in the same pass: the next window's start,
    without a second pass over both (``weights.Weights.summary``)."""
    if start.shape != values.shape:     # the kernel indexes both by the same i, unchecked
        raise ValueError(f"fold_weights: start has {start.size} values and values {values.size}; they must match")
    if renew and np.may_share_memory(values, start):
        raise ValueError("fold_weights(renew=True): start must not overlap values (it is overwritten as they are read)")
    rows = np.zeros((lengths.size, 4))
    counts = np.zeros((lengths.size if count else 1, SIGN_EXPONENT_BINS), np.int64)
    _fold_weight_segments(values, start, lengths, rows, counts, renew, count)
    return rows, counts if count else None
