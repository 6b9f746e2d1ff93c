"""TensorBoard histograms in the event file: pooled over N windows (``histograms=N``) and, for
bounded activations, equal bins over the range. Oracles: numpy.histogram of the very gradients
and activation outputs, counts summed by hand over the windows a histogram covers."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch
from small_models import BatchedLinear
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from gradflow import GradientMonitor, MonitorError
from gradflow.monitor.gradients import HISTOGRAM_EVERY
from gradflow.monitor.histograms import LINEAR_BINS, linear_scale


def tanh_net(width: int = 6, inputs: int = 2) -> nn.Sequential:
    return nn.Sequential(OrderedDict(dense_1=nn.Linear(inputs, width), tanh_1=nn.Tanh(),
                                     dense_2=nn.Linear(width, width), sigmoid_2=nn.Sigmoid(),
                                     dense_3=nn.Linear(width, width), relu_3=nn.ReLU(), dense_4=nn.Linear(width, 1)))


class Recorder:
    """Every gradient (at the optimizer step) and every activation output of each window."""

    def __init__(self, model: nn.Module, taps=("tanh_1", "sigmoid_2", "relu_3")) -> None:
        self.params = dict(model.named_parameters())
        self.grads: list[dict[str, list[np.ndarray]]] = []
        self.outputs: list[dict[str, list[np.ndarray]]] = []
        for name in taps:
            getattr(model, name).register_forward_hook(self._hook(name))
        self.taps = taps
        self.new_window()

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            if torch.is_grad_enabled():                   # training passes, as the monitor taps
                self.outputs[-1][name].append(output.detach().double().reshape(-1).numpy().copy())
        return hook

    def new_window(self) -> None:
        self.grads.append({name: [] for name in self.params})
        self.outputs.append({name: [] for name in self.taps})

    def capture(self) -> None:
        for name, p in self.params.items():
            self.grads[-1][name].append(p.grad.detach().double().reshape(-1).numpy().copy())

    def grad_values(self, name: str, windows) -> np.ndarray:
        """The gradient values the windows' histograms hold: of their steps 0, HISTOGRAM_EVERY, ...
        (every parameter has a gradient at every step here: one pattern)."""
        return np.concatenate([g for w in windows for g in self.grads[w][name][::HISTOGRAM_EVERY]])

    def output_values(self, name: str, windows) -> np.ndarray:
        return np.concatenate([o for w in windows for o in self.outputs[w][name]])


def train_windows(model, monitor, recorder, steps_per_window, inputs=2, batch=16, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for window, steps in enumerate(steps_per_window):
        for _ in range(steps):
            x = torch.randn(batch, inputs, generator=generator) * scale
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            recorder.capture()
            optimizer.step()
        monitor.log(window)
        if window < len(steps_per_window) - 1:
            recorder.new_window()
    return optimizer


def histograms(logdir, tag) -> list:
    return EventAccumulator(str(logdir), size_guidance={"histograms": 0}).Reload().Histograms(tag)


def bucket_counts(h) -> tuple[np.ndarray, np.ndarray]:
    """A TensorBoard histogram's edges (min, then each bucket's right limit) and counts."""
    return np.array([h.min, *h.bucket_limit]), np.array(h.bucket)


def assert_linear_bins(h, values: np.ndarray, bounds: tuple[float, float]) -> None:
    """``h`` holds numpy.histogram's counts of ``values`` over LINEAR_BINS equal bins of
    ``bounds``: its edges lie on that grid, and each kept bucket (an empty one may stand for a
    gap of empty bins) has the count numpy gives it."""
    edges, counts = bucket_counts(h)
    grid = (edges - bounds[0]) / (bounds[1] - bounds[0]) * LINEAR_BINS
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)
    full, _ = np.histogram(values, LINEAR_BINS, range=bounds)
    index = np.round(grid).astype(int)
    expected = [full[a:b].sum() for a, b in itertools.pairwise(index)]
    np.testing.assert_array_equal(counts, expected)
    assert h.num == len(values) == full.sum()


def test_a_histogram_sums_the_histogrammed_steps_of_its_windows(tmp_path, reduction_path):
    """histograms=3 over 7 windows: histograms at the 3rd, 6th and (flushed on leaving ``with``)
    7th window, each holding every gradient value of the steps 0, 10, 20, ... of each of its
    windows (HISTOGRAM_EVERY), bucket by bucket."""
    torch.manual_seed(0)
    model = tanh_net()
    recorder = Recorder(model)
    steps = [4, 13, 5, 2, 21, 1, 3]
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer, histograms=3, activations_every=1) as monitor:
        train_windows(model, monitor, recorder, steps)
    assert [w.steps for w in monitor.history] == steps                        # scalars stay per window
    pools = {2: [0, 1, 2], 5: [3, 4, 5], 6: [6]}
    for name, p in model.named_parameters():
        tag = name.replace(".", "/")
        points = histograms(tmp_path, f"grad/{tag}")
        assert [point.step for point in points] == list(pools)
        for point in points:
            values = recorder.grad_values(name, pools[point.step])
            edges, counts = bucket_counts(point.histogram_value)
            histogrammed = sum(-(-steps[w] // HISTOGRAM_EVERY) for w in pools[point.step])     # ceil
            assert point.histogram_value.num == len(values) == histogrammed * p.numel()
            expected, _ = np.histogram(values, edges)
            np.testing.assert_array_equal(counts, expected, err_msg=f"{tag} at {point.step}")
        logs = histograms(tmp_path, f"1_grad_log10/{tag}")
        assert [point.step for point in logs] == list(pools)
        for point in logs:
            values = recorder.grad_values(name, pools[point.step])
            edges, counts = bucket_counts(point.histogram_value)
            expected, _ = np.histogram(np.log10(np.abs(values[values != 0])), edges)
            np.testing.assert_array_equal(counts, expected, err_msg=f"log10 {tag} at {point.step}")
    # Weights are a state: each histogram is the weights at its step, not a sum of windows.
    weight = histograms(tmp_path, "weight/dense_1/weight")
    assert [point.step for point in weight] == list(pools)
    final = model.dense_1.weight.detach().double().reshape(-1).numpy()
    edges, counts = bucket_counts(weight[-1].histogram_value)
    np.testing.assert_array_equal(counts, np.histogram(final, edges)[0])


@pytest.mark.parametrize("every", [True, 1], ids=["true", "one"])
def test_every_window_by_default_and_with_one(tmp_path, every):
    torch.manual_seed(1)
    model = tanh_net()
    recorder = Recorder(model)
    kwargs = {} if every is True else {"histograms": every}
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer, **kwargs) as monitor:
        train_windows(model, monitor, recorder, [2, 13, 1])
    points = histograms(tmp_path, "grad/dense_2/weight")
    assert [(point.step, point.histogram_value.num) for point in points] == [(0, 36), (1, 2 * 36), (2, 36)]


def test_partial_pools_are_written_by_remove_flush_and_late_logs(tmp_path):
    torch.manual_seed(2)
    model = tanh_net()
    recorder = Recorder(model)
    writer = SummaryWriter(tmp_path)
    monitor = GradientMonitor(model, writer, histograms=4)
    optimizer = train_windows(model, monitor, recorder, [1, 1, 1, 1, 1, 1])   # windows 0-3 pooled, 4-5 pending
    monitor.flush()                                                           # as before a checkpoint
    monitor.flush()                                                           # nothing left: nothing written
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    monitor.log(6)
    monitor.remove()                                                          # window 6 is written now
    monitor.remove()
    model(torch.randn(4, 2)).sum().backward()
    monitor.record()
    monitor.log(7)                                                            # detached: written at once
    writer.close()
    points = histograms(tmp_path, "grad/dense_1/weight")
    assert [(point.step, point.histogram_value.num) for point in points] == [(3, 48), (5, 24), (6, 12), (7, 12)]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None, [2]], ids=["zero", "negative", "float", "str", "none", "list"])
def test_bad_histograms_values_are_one_line_errors(bad):
    with pytest.raises(MonitorError, match=r"^histograms must be True \(every window\), False \(none\) or an int "
                                           r"N >= 1 .*got ") as error:
        GradientMonitor(tanh_net(), histograms=bad)
    assert "\n" not in str(error.value)


def test_bounded_activations_get_equal_bins_over_their_range(tmp_path, reduction_path):
    """tanh over [-1, 1] and sigmoid over [0, 1]: LINEAR_BINS equal bins, numpy.histogram's counts
    of the tapped outputs of the windows pooled; ReLU keeps the octave bins."""
    torch.manual_seed(3)
    model = tanh_net(width=8)
    with torch.no_grad():
        model.dense_1.weight.mul_(3)                      # saturate some tanh units
    recorder = Recorder(model)
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer, histograms=2, activations_every=1) as monitor:
        train_windows(model, monitor, recorder, [3, 2, 4], scale=2.0)
    pools = {1: [0, 1], 2: [2]}
    for name, bounds in (("tanh_1", (-1.0, 1.0)), ("sigmoid_2", (0.0, 1.0))):
        points = histograms(tmp_path, f"activation/{name}")
        assert [point.step for point in points] == list(pools)
        for point in points:
            assert_linear_bins(point.histogram_value, recorder.output_values(name, pools[point.step]), bounds)
    saturated = recorder.output_values("tanh_1", [0, 1])
    top = histograms(tmp_path, "activation/tanh_1")[0].histogram_value
    assert top.bucket_limit[-1] == 1.0 and top.bucket[-1] == np.sum(saturated >= 1 - 2 / LINEAR_BINS)
    relu = histograms(tmp_path, "activation/relu_3")[0].histogram_value
    assert relu.num == len(recorder.output_values("relu_3", [0, 1]))
    assert all(np.log2(limit).is_integer() for limit in relu.bucket_limit if limit > 0)     # octaves


def test_large_bounded_outputs_and_nan_outputs(tmp_path, reduction_path):
    """Outputs of 65,536 elements and more take the large path; NaN outputs are left out of the
    histogram (they are counted as non-finite in the sign/exponent counts)."""
    torch.manual_seed(4)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(4, 2048), tanh_1=nn.Tanh(), dense_2=nn.Linear(2048, 1)))
    outputs = []
    model.tanh_1.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().reshape(-1).numpy().copy())
                                       and None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer, histograms=2, activations_every=1) as monitor:
        for window in range(2):
            x = torch.randn(64, 4) * 3
            if window == 1:
                x[0, 0] = float("nan")                   # one row of NaN outputs
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
            monitor.log(window)
    values = np.concatenate(outputs)
    finite = values[np.isfinite(values)]
    assert len(finite) == len(values) - 2048
    (point,) = histograms(tmp_path, "activation/tanh_1")
    assert_linear_bins(point.histogram_value, finite, (-1.0, 1.0))



def test_members_pool_their_own_counts(tmp_path, reduction_path):
    """members=3, one writer each, histograms=2 over 3 windows: each member's event file holds
    its own gradients (of each window's steps 0, 10, ...) and tanh outputs, pooled, and the last
    window flushed on remove()."""
    torch.manual_seed(5)
    members = 3
    model = nn.Sequential(OrderedDict(dense_1=BatchedLinear(members, 2, 4), tanh_1=nn.Tanh(),
                                      dense_2=BatchedLinear(members, 4, 1)))
    grads = [[] for _ in range(members)]
    outputs = [[] for _ in range(members)]

    def keep(module, inputs, output) -> None:
        for k in range(members):
            outputs[k].append(output[k].detach().double().reshape(-1).numpy().copy())

    model.tanh_1.register_forward_hook(keep)
    writers = [SummaryWriter(tmp_path / f"member_{k}") for k in range(members)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, writers, members=members, histograms=2, activations_every=1)
    histogrammed = []                       # the steps (counted over the run) each window's histograms hold
    for window, steps in enumerate([2, 12, 1]):
        histogrammed.append(list(range(len(grads[0]), len(grads[0]) + steps, HISTOGRAM_EVERY)))
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(members, 8, 2)).pow(2).mean(dim=(1, 2)).sum().backward()
            for k in range(members):
                grads[k].append(model.dense_1.weight.grad[k].detach().double().reshape(-1).numpy().copy())
            optimizer.step()
        monitor.log(window)
    monitor.remove()
    for w in writers:
        w.close()
    for k in range(members):
        points = histograms(tmp_path / f"member_{k}", "grad/dense_1/weight")
        assert [point.step for point in points] == [1, 2]
        for point, windows in zip(points, [(0, 1), (2,)]):
            values = np.concatenate([grads[k][step] for w in windows for step in histogrammed[w]])
            edges, counts = bucket_counts(point.histogram_value)
            np.testing.assert_array_equal(counts, np.histogram(values, edges)[0], err_msg=f"member {k}")
        (first, last) = histograms(tmp_path / f"member_{k}", "activation/tanh_1")
        assert_linear_bins(first.histogram_value, np.concatenate(outputs[k][:14]), (-1.0, 1.0))
        assert_linear_bins(last.histogram_value, np.concatenate(outputs[k][14:]), (-1.0, 1.0))


def test_linear_scale_is_exact_where_the_bin_width_is_a_power_of_two():
    """tanh's, sigmoid's and hardtanh's default ranges bin by a power-of-two scale: float32 values
    right at, and one ulp either side of, every edge land in numpy.histogram's bin."""
    from gradflow.monitor.histograms import count_linear

    for bounds in ((-1.0, 1.0), (0.0, 1.0), (-2.0, 2.0)):
        shift, scale, offset = linear_scale(bounds)
        assert shift == 0.0
        edges = np.linspace(*bounds, LINEAR_BINS + 1).astype(np.float32)
        values = np.concatenate([edges, np.nextafter(edges, np.float32(-np.inf)),
                                 np.nextafter(edges, np.float32(np.inf))])
        values = values[(values >= bounds[0]) & (values <= bounds[1])]
        counts = torch.zeros(LINEAR_BINS + 1, dtype=torch.int64)
        count_linear(counts, torch.from_numpy(values), None, scale, offset, 0, LINEAR_BINS - 1, LINEAR_BINS)
        expected, _ = np.histogram(values.astype(np.float64), LINEAR_BINS, range=bounds)
        np.testing.assert_array_equal(counts[:LINEAR_BINS].numpy(), expected, err_msg=str(bounds))


def test_histograms_built_a_few_rows_at_a_time_equal_those_built_at_once(monkeypatch):
    """HistogramRequests.build takes BUILD_ROWS rows at a time (a bounded buffer at log()), read
    where they lie in their tables: every form, with more rows than that, asked in shuffled order
    from two tables of int64 counts as the read-back hands them, gives the same histograms, tag for
    tag, as one build of each row copied out alone as float64."""
    from gradflow.monitor import histograms as H

    rng = np.random.default_rng(3)
    rows = 2 * H.BUILD_ROWS + 3
    counts = rng.integers(0, 50, size=(2, rows, 512)) * (rng.random((2, rows, 512)) < 0.1)
    linear = rng.integers(0, 9, size=(rows, LINEAR_BINS))
    order = rng.permutation(rows)

    def requests(alone: bool):
        wanted = H.HistogramRequests()
        for i in order:
            for t, table in enumerate(counts):
                row = (table[i][None].astype(np.float64), 0) if alone else (table, i)
                wanted.value(i % 2, f"v{t}.{i}", *row)
                wanted.log10(i % 2, f"l{t}.{i}", *row)
            wanted.linear(i % 2, f"b{i}", *((linear[i][None].astype(np.float64), 0) if alone else (linear, i)),
                          (-1.0, 1.0))
        return wanted

    chunked = requests(alone=False).build(members=2)
    monkeypatch.setattr(H, "BUILD_ROWS", 10 * rows)
    alone = requests(alone=True).build(members=2)
    assert chunked == alone and sum(map(len, alone)) > 4 * rows


def test_one_members_histograms_come_as_the_kernel_left_them_and_read_as_the_dicts_did():
    """``build(members=1)`` hands the value and log10 rows as ``BuiltHistograms``: a mapping that
    reads (tag for tag, in order, rows with no value left out, the linear ones last) as the
    dict made from ``stats.mixed_histograms``, counts its histograms without making one; and
    where two requests share a tag, or for several members, the dicts as before."""
    from gradflow.monitor import histograms as H
    from gradflow.monitor import stats as S

    rng = np.random.default_rng(11)
    counts = rng.integers(0, 9, size=(6, 512)) * (rng.random((6, 512)) < 0.2)
    counts[2] = 0                                                 # no value: no histogram
    linear = rng.integers(0, 9, size=(1, LINEAR_BINS))

    def requests(tags):
        wanted = H.HistogramRequests()
        for i, tag in enumerate(tags):
            (wanted.log10 if i % 2 else wanted.value)(0, tag, counts, i)
        wanted.linear(0, "b", linear, 0, (-1.0, 1.0))
        return wanted

    tags = [f"t{i}" for i in range(6)]
    (built,) = requests(tags).build(members=1)
    assert isinstance(built, H.BuiltHistograms)
    assert len(built) == 6 and built._dict is None              # five rows with a value, the linear one
    made = S.mixed_histograms([(counts, i, i % 2 == 1) for i in range(6)], H.BUILD_BUCKETS)
    expected = {tag: h for tag, h in zip(tags, made) if h is not None}
    expected["b"] = H.linear_histograms(linear, [(-1.0, 1.0)])[0]
    assert list(built.items()) == list(expected.items()) and built == expected and H.as_dict(built) == expected
    (shared,) = requests(["t0", "t1", "t0", "t3", "t4", "t5"]).build(members=1)
    assert type(shared) is dict and "t0" in shared
    assert all(type(h) is dict for h in requests(tags).build(members=2))


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("every", [1, 2])
def test_rows_asked_at_once_are_the_histograms_asked_one_by_one(members, every):
    """``HistogramRequests.rows`` asks what ``value`` (and ``log10``) called row by row ask: the
    same histograms, tag for tag and in the same order, built for one member (the kernel's
    ``BuiltHistograms``) or several, and pooled over ``every`` windows (a ``state`` row keeps
    the last window's); a row per tag as ``zip`` pairs them; nothing asked for no row."""
    from gradflow.monitor import histograms as H

    rng = np.random.default_rng(5)
    windows = [(rng.integers(0, 9, size=(8, 512)) * (rng.random((8, 512)) < 0.2),
                rng.integers(0, 9, size=(4, 512)) * (rng.random((4, 512)) < 0.2)) for _ in range(every)]

    def ask(at_once: bool, grads, weights):
        wanted = H.HistogramRequests()
        for k in range(members):
            slots = list(range(k, 8, members))
            value_tags, log10_tags = [f"g{s}" for s in slots], [f"l{s}" for s in slots]
            weight_slots, weight_tags = list(range(k, 4, members)), [f"w{s}" for s in range(k, 4, members)]
            if at_once:
                wanted.rows(k, grads, iter(slots), value_tags + ["one tag too many"], log10_tags)
                wanted.rows(k, weights, range(k, 4, members), weight_tags, state=True)
                wanted.rows(k, weights, [], [])
                wanted.rows(k, weights, [], ["a tag with no row"], ["another"])
            else:
                for slot, value_tag, log10_tag in zip(slots, value_tags, log10_tags):
                    wanted.value(k, value_tag, grads, slot)
                    wanted.log10(k, log10_tag, grads, slot)
                for slot, tag in zip(weight_slots, weight_tags):
                    wanted.value(k, tag, weights, slot, state=True)
        return wanted

    def built(at_once: bool):
        pool = H.HistogramPool(every)
        for step, (grads, weights) in enumerate(windows):
            pool.add(ask(at_once, grads, weights), step)
        step, histograms = pool.take(members)
        return step, [list(H.as_dict(h).items()) for h in histograms]

    at_once, one_by_one = built(True), built(False)
    assert at_once == one_by_one and len(at_once[1][0]) == 20 // members    # 8 gradient rows twice, 4 weights
    assert len(ask(True, *windows[0]).requests) == len(ask(False, *windows[0]).requests) == 20
