"""Break tests (brk8) of the cheaper recording core (07806f4..79ae3bd): the root pre-hook on only
while a pass must be seen (autograd read otherwise), the hand-encoded TensorBoard event, the
per-shape compaction cache and the flatten below autograd. Every case here held; each is a loop
or an input the authors' tests did not cover, checked against an oracle: the documented
profiling rule run over the loop's own events, ``p.grad`` at the step, upb's
``SerializeToString``, TensorBoard's own ``add_scalar``/``add_histogram_raw`` read back by its
``EventAccumulator``, a fresh ``Layouts``, ``torch.cat``."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from monitor_oracle import step_statistics
from test_profiled_passes import assert_profiled_by_the_rule
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from gradflow import GradientMonitor
from gradflow.monitor.compact import Layouts, compact_rows
from gradflow.monitor.event_encoding import SummaryEncoder
from gradflow.monitor.sinks import Sink, TeeSink
from gradflow.monitor.stats import Histogram, sparse_buckets
from gradflow.monitor.tensors import _flat_copy


class _Net(nn.Module):
    """Linear, Tanh (under a non-reentrant checkpoint where asked), Linear."""

    def __init__(self, inputs: int = 3, outputs: int = 1, checkpointed: bool = False) -> None:
        super().__init__()
        self.a, self.t, self.b = nn.Linear(inputs, 6), nn.Tanh(), nn.Linear(6, outputs)
        self.checkpointed = checkpointed

    def forward(self, x):
        h = self.a(x)
        h = checkpoint(self.t, h, use_reentrant=False) if self.checkpointed else self.t(h)
        return self.b(h)


class _Passes:
    """The loop's events for ``_profiled_by_the_rule``: each training pass's Tanh output (captured
    by the test's own hook, grad mode only), each step, each log()."""

    def __init__(self, model: _Net) -> None:
        self.events: list = []
        model.t.register_forward_hook(self._seen)

    def _seen(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            self.events.append(("pass", output.detach().clone()))

    def note(self, kind: str) -> None:
        self.events.append((kind, None))


def _assert_rule(passes: _Passes, history, every: int) -> None:
    assert_profiled_by_the_rule(passes.events, history, every, "t")


LOOPS = ["zero_grad, accumulate 4, clip, step", "a clip after each micro-batch", "inference_mode eval pass",
         "non-reentrant checkpoint", "grad-mode loss terms outside the model"]


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("loop", LOOPS)
def test_the_profiled_passes_follow_the_rule_in_more_loops(loop, every):
    """Loops where the unprofiled passes run with the hook off and autograd decides whether a
    pass came: the profiled passes are still the rule's (their Tanh outputs' mean and std)."""
    torch.manual_seed(1)
    model = _Net(checkpointed=loop == "non-reentrant checkpoint")
    passes = _Passes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss():
        out = model(torch.randn(8, 3)).square().mean()
        if loop == "grad-mode loss terms outside the model":
            out = out + 1e-3 * sum(p.square().sum() for p in model.parameters())
        return out

    with GradientMonitor(model, activations_every=every) as monitor:
        for i in range(9):
            if loop == "zero_grad, accumulate 4, clip, step":
                model.zero_grad()
                for _ in range(4):
                    (loss() / 4).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            elif loop == "a clip after each micro-batch":
                optimizer.zero_grad()
                for _ in range(3):
                    loss().backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                optimizer.zero_grad()
                loss().backward()
            optimizer.step()
            passes.note("step")
            if loop == "inference_mode eval pass":
                with torch.inference_mode():
                    model(torch.randn(8, 3))
            if i % 4 == 3:
                monitor.log(i)
                passes.note("log")
        monitor.log(9)
    _assert_rule(passes, monitor.history, every)


def test_two_monitors_on_a_gan_s_two_models_each_follow_the_rule():
    """A GAN: the discriminator sees three passes an iteration (real, detached fake, fake for the
    generator's loss) and steps once; the generator one pass, one step. Each monitor profiles its
    own model's passes by the rule."""
    torch.manual_seed(0)
    generator, discriminator = _Net(2, 3), _Net(3, 1)
    seen_g, seen_d = _Passes(generator), _Passes(discriminator)
    opt_g = torch.optim.Adam(generator.parameters(), 1e-3)
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-3)
    with GradientMonitor(generator, activations_every=3) as mon_g, \
            GradientMonitor(discriminator, activations_every=3) as mon_d:
        for i in range(10):
            fake = generator(torch.randn(8, 2))
            opt_d.zero_grad()
            (discriminator(torch.randn(8, 3)).mean() - discriminator(fake.detach()).mean()).backward()
            opt_d.step()
            seen_d.note("step")
            opt_g.zero_grad()
            (-discriminator(fake).mean()).backward()
            opt_g.step()
            seen_g.note("step")
            if i % 4 == 3:
                for monitor, seen in ((mon_g, seen_g), (mon_d, seen_d)):
                    monitor.log(i)
                    seen.note("log")
        mon_g.log(10)
        mon_d.log(10)
    _assert_rule(seen_g, mon_g.history, 3)
    _assert_rule(seen_d, mon_d.history, 3)


@pytest.mark.parametrize("between", ["deepcopy", "state_dict round trip", "user hooks added"])
def test_copies_state_dicts_and_user_hooks_between_steps_leave_the_rule(between):
    """deepcopy of the model (the monitor's root hook on or off at that moment), a state_dict
    round trip, and the user's own root hooks (prepend, with_kwargs, always_call) added mid-run:
    the profiled passes are still the rule's."""
    torch.manual_seed(0)
    model = _Net()
    passes = _Passes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    copies = []
    with GradientMonitor(model, activations_every=3) as monitor:
        for i in range(10):
            optimizer.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            optimizer.step()
            passes.note("step")
            if between == "deepcopy":
                copies.append(copy.deepcopy(model))
                copies[-1](torch.randn(2, 3)).sum().backward()        # the copy trains, unmonitored
            elif between == "state_dict round trip":
                model.load_state_dict(copy.deepcopy(model.state_dict()))
            elif i == 2:
                model.register_forward_pre_hook(lambda module, args: None, prepend=True)
                model.register_forward_pre_hook(lambda module, args, kwargs: None, with_kwargs=True)
                model.register_forward_hook(lambda module, args, out: None, always_call=True)
            if i % 4 == 3:
                monitor.log(i)
                passes.note("log")
        monitor.log(10)
    _assert_rule(passes, monitor.history, 3)


@pytest.mark.parametrize("act", ["clip", "step"])
def test_a_model_converted_to_bfloat16_between_unprofiled_passes_is_followed(act):
    """model.to(bfloat16) in place (the same Parameters) after an unprofiled step: no hook of the
    monitor sees the next pass, and the clipping call or the step follows it. Oracle: each
    step's gradient norm from p.grad (float64), averaged over the window."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norms: dict[str, list[float]] = {}
    with GradientMonitor(model, activations_every=10) as monitor:
        dtype = torch.float32
        for i in range(6):
            if i == 3:
                model.to(torch.bfloat16)
                dtype = torch.bfloat16
            optimizer.zero_grad()
            model(torch.randn(8, 3, dtype=dtype)).float().square().mean().backward()
            if act == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            for name, p in model.named_parameters():
                norms.setdefault(name, []).append(step_statistics(p.grad)["norm"])
            optimizer.step()
        monitor.log(0)
    rows = monitor.history[-1].gradients
    for name, values in norms.items():
        assert rows[name]["steps"] == 6
        assert rows[name]["norm"] == pytest.approx(sum(values) / len(values), rel=1e-5)


# -- the hand-encoded event ---------------------------------------------------------------------

def _upb(scalars: dict, histograms: dict) -> bytes:
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary()
    for tag, number in scalars.items():
        value = summary.value.add()
        value.tag, value.simple_value = tag, number
    for tag, h in histograms.items():
        limits, counts = (h.limits, h.counts) if h.sparse else sparse_buckets(h.limits, h.counts)
        value = summary.value.add()
        value.tag = tag
        histo = value.histo
        histo.min, histo.max, histo.num, histo.sum, histo.sum_squares = h.min, h.max, h.num, h.sum, h.sum_squares
        histo.bucket_limit.extend(limits)
        histo.bucket.extend(counts)
    return summary.SerializeToString()


def _histogram(**changes) -> Histogram:
    fields = dict(limits=[1.0, 2.0], counts=[3.0, 4.0], min=0.5, max=2.0, num=7, sum=9.0, sum_squares=13.0)
    return Histogram(**{**fields, **changes})


SCALARS = {"empty tag": {"": 1.0}, "NUL in tag": {"a\x00b": 1.0}, "20,000-byte tag": {"x" * 20000: 2.0},
           "non-ASCII tag": {"λ/é/😀": 2.0}, "numpy float64": {"a": np.float64(1.5)},
           "numpy float32": {"a": np.float32(1.5)}, "numpy int64": {"a": np.int64(3)}, "int": {"a": 3},
           "bool": {"a": True}, "int past float32": {"a": 10 ** 40}, "torch 0-d": {"a": torch.tensor(1.5)},
           "torch float64 0-d": {"a": torch.tensor(1.5, dtype=torch.float64)}, "-0.0": {"a": -0.0}}
HISTOGRAMS = {"numpy buckets": _histogram(limits=np.array([1.0, 2.0]), counts=np.array([3, 4])),
              "numpy int counts": _histogram(counts=[np.int64(3), np.int64(4)]),
              "torch counts": _histogram(counts=torch.tensor([3.0, 4.0])),
              "torch numbers": _histogram(min=torch.tensor(0.5), num=torch.tensor(7)),
              "int limits": _histogram(limits=[1, 2]), "NaN min": _histogram(min=float("nan")),
              "-0.0 min": _histogram(min=-0.0), "all counts 0": _histogram(counts=[0.0, 0.0]),
              "100 sparse buckets": _histogram(limits=list(range(1, 101)), counts=[1.0] * 100, sparse=True)}


@pytest.mark.parametrize("case", list(SCALARS) + list(HISTOGRAMS))
def test_odd_tags_and_numbers_encode_as_upb_does(case):
    """What a user's own sink or a framework may hand the TensorBoard sink: the bytes are upb's."""
    scalars, histograms = (SCALARS[case], {}) if case in SCALARS else ({}, {"h/" + case: HISTOGRAMS[case]})
    assert SummaryEncoder().encode(scalars, histograms) == _upb(scalars, histograms)


def test_a_surrogate_tag_raises_as_upb_does_and_the_next_window_is_written():
    encoder = SummaryEncoder()
    with pytest.raises(UnicodeEncodeError):
        encoder.encode({"a\ud800": 1.0}, {})
    with pytest.raises(UnicodeEncodeError):
        encoder.encode({}, {"\udcff": _histogram()})
    assert encoder.encode({"a": 1.0}, {"h": _histogram()}) == _upb({"a": 1.0}, {"h": _histogram()})


class _Recorder(Sink):
    def __init__(self) -> None:
        self.windows: list = []

    def log(self, scalars, histograms, step) -> None:
        self.windows.append((dict(scalars), copy.deepcopy(histograms), step))


def _read(directory) -> tuple[dict, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return ({t: [(e.step, e.value) for e in accumulator.Scalars(t)] for t in tags["scalars"]},
            {t: [(e.step, e.histogram_value) for e in accumulator.Histograms(t)] for t in tags["histograms"]})


@pytest.mark.parametrize("variant", ["filename_suffix", "purge_step", "closed and reused"])
def test_a_tee_of_a_user_sink_and_a_writer_reads_back_as_tensorboard_s_own_calls(tmp_path, variant):
    """A TeeSink of the user's own Sink and a SummaryWriter (a filename suffix, a purge step, or
    closed after the first window and used again: a second event file): TensorBoard's reader
    gets the same scalars and histograms from the monitor's file as from a writer given the
    user sink's windows through add_scalar and add_histogram_raw."""
    from torch.utils.tensorboard import SummaryWriter

    options = {"filename_suffix": dict(filename_suffix=".mine"), "purge_step": dict(purge_step=2)}.get(variant, {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer, recorder = SummaryWriter(str(tmp_path / "monitor"), **options), _Recorder()
    with GradientMonitor(model, TeeSink(recorder, writer), activations_every=2, histograms=True) as monitor:
        for i in range(8):
            optimizer.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            optimizer.step()
            if i % 4 == 3:
                monitor.log(i)
                if variant == "closed and reused" and i == 3:
                    writer.close()
    writer.close()
    reference = SummaryWriter(str(tmp_path / "reference"), **options)
    for scalars, histograms, step in recorder.windows:
        for tag, number in scalars.items():
            reference.add_scalar(tag, number, step)
        for tag, h in histograms.items():
            limits, counts = (h.limits, h.counts) if h.sparse else sparse_buckets(h.limits, h.counts)
            reference.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, limits, counts, step)
    reference.close()
    scalars, histograms = _read(tmp_path / "monitor")
    assert len(recorder.windows) == 2 and scalars and histograms
    assert (scalars, histograms) == _read(tmp_path / "reference")


# -- compaction, the flatten ----------------------------------------------------------------------

def test_compacted_tables_of_changing_shapes_read_back_as_their_rows():
    """2,000 tables through one Layouts: columns that change between tables, values that turn
    from float to int (a NaN, then a count), bools, numpy scalars, ints past 2**53, -0.0: each
    table reads back value for value, type for type."""
    rng = random.Random(0)
    pool = ["norm", "steps", "mean", "nonfinite", "weight_norm"]
    makers = [rng.random, rng.random, lambda: rng.randint(0, 9), lambda: float("nan"), lambda: 2 ** 60,
              lambda: True, lambda: np.float64(1.0), lambda: -0.0, lambda: float("inf")]

    def same(a, b) -> bool:
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
        return a == b

    shared = Layouts()
    for _ in range(2000):
        columns = tuple(rng.sample(pool, rng.randint(1, 3)))
        rows = {}
        for r in range(rng.randint(1, 4)):
            mine = columns if rng.random() < 0.8 else tuple(rng.sample(pool, rng.randint(0, 3)))
            rows[f"p{r}"] = {c: rng.choice(makers)() for c in mine}
        table = compact_rows(rows, shared)
        for name, row in rows.items():
            assert list(table[name]) == list(row)
            assert all(same(row[k], table[name][k]) for k in row), (rows, name)


class _Wrapped(torch.Tensor):
    """A minimal __torch_dispatch__ wrapper subclass."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device,
                                                   strides=elem.stride(), storage_offset=elem.storage_offset())

    def __init__(self, elem) -> None:
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.elem if isinstance(x, _Wrapped) else x
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda x: _Wrapped(x) if type(x) is torch.Tensor else x, out)


FLATS = {"requires grad": lambda: [torch.randn(3, 4, requires_grad=True) * 2, torch.randn(5, requires_grad=True) * 1],
         "half and float": lambda: [torch.randn(3, 4).half(), torch.randn(5)],
         "bfloat16": lambda: [torch.randn(3, 4).bfloat16(), torch.randn(5).bfloat16()],
         "non-contiguous": lambda: [torch.randn(4, 3).t(), torch.randn(10)[::2]],
         "one transposed": lambda: [torch.randn(4, 3).t()],
         "one expanded": lambda: [torch.randn(1, 3).expand(4, 3)],
         "uncoalesced sparse": lambda: [torch.sparse_coo_tensor([[0, 2, 0]], torch.ones(3, 3), (4, 3),
                                                                check_invariants=True), torch.randn(5)],
         "an empty one": lambda: [torch.randn(0), torch.randn(3)]}


@pytest.mark.parametrize("case", FLATS)
def test_the_flat_copy_below_autograd_is_torch_cat_s(case):
    tensors = FLATS[case]()
    flat = _flat_copy(tensors)
    expected = torch.cat([t.detach().to_dense().reshape(-1).float() for t in tensors])
    assert flat.dtype == torch.float32 and not flat.requires_grad and torch.equal(flat, expected)
    assert all(flat.data_ptr() != t.data_ptr() for t in tensors if t.layout == torch.strided and t.numel())


def test_the_flat_copy_of_a_wrapper_subclass_holds_its_values():
    tensors = [_Wrapped(torch.randn(3, 4)), _Wrapped(torch.randn(5))]
    flat = _flat_copy(tensors)
    assert torch.equal(flat.elem, torch.cat([t.elem.reshape(-1) for t in tensors]))


def test_an_uncoalesced_sparse_embedding_gradient_is_recorded_as_its_dense_sum():
    """nn.Embedding(sparse=True) looked up with repeated indices (an uncoalesced gradient). Oracle:
    p.grad.to_dense() at the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    index = torch.tensor([[1, 1], [1, 2], [2, 2]])
    norms: dict[str, list[float]] = {}
    with GradientMonitor(model, activations_every=3) as monitor:
        for _ in range(4):
            optimizer.zero_grad()
            model(index).square().mean().backward()
            for name, p in model.named_parameters():
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                norms.setdefault(name, []).append(step_statistics(grad)["norm"])
            optimizer.step()
        monitor.log(0)
    rows = monitor.history[-1].gradients
    for name, values in norms.items():
        assert rows[name]["norm"] == pytest.approx(sum(values) / len(values), rel=1e-5)


# -- defects found --------------------------------------------------------------------------------

def _monitor_entries(hooks: dict) -> int:
    from gradflow.monitor.part import ForwardStarts

    return sum(isinstance(hook, ForwardStarts) for hook in hooks.values())


@pytest.mark.parametrize("at", [0, 1, 3])
def test_a_root_pre_hook_dict_replaced_by_a_copy_keeps_one_monitor_hook(at):
    """The model's ``_forward_pre_hooks`` replaced by a copy of itself (``OrderedDict(...)``, a
    library reordering or filtering hooks) while the monitor's root hook is in it: the copy holds
    the hook under the old handle's id. The hook was put back by registering afresh (the dict is
    not the handle's), so it sat in the dict twice: every pass counted twice, the profiled passes
    off the rule, and one left on the model after remove(). Oracle: the rule over the loop's
    events; the model's own hook dict."""
    from collections import OrderedDict

    torch.manual_seed(1)
    model = _Net()
    passes = _Passes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    counts = []
    model.register_forward_hook(lambda module, args, out: counts.append(_monitor_entries(model._forward_pre_hooks)))
    with GradientMonitor(model, activations_every=3) as monitor:
        for i in range(10):
            if i == at:
                model._forward_pre_hooks = OrderedDict(model._forward_pre_hooks)
            optimizer.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            optimizer.step()
            passes.note("step")
            if i % 4 == 3:
                monitor.log(i)
                passes.note("log")
        monitor.log(10)
    assert max(counts) == 1 and _monitor_entries(model._forward_pre_hooks) == 0
    _assert_rule(passes, monitor.history, 3)


def test_a_tap_s_hook_dict_replaced_by_a_copy_keeps_one_tap():
    """A module's _forward_hooks replaced by a copy while its tap is on (07806f4 too): the copy
    held the tap under the old id; remove() popped it from the old dict only and add()
    registered afresh, so the tap ran at unprofiled passes, twice at profiled ones, and stayed
    after remove(). Now _Hook drops its entries from a dict that is not the handle's."""
    from collections import OrderedDict

    torch.manual_seed(1)
    model = _Net()
    passes = _Passes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    own = len(model.t._forward_hooks)
    with GradientMonitor(model, activations_every=3) as monitor:
        for i in range(10):
            if i == 0:                                  # the first pass is profiled: its tap is on
                model.t._forward_hooks = OrderedDict(model.t._forward_hooks)
            optimizer.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            optimizer.step()
            passes.note("step")
        monitor.log(10)
    assert len(model.t._forward_hooks) == own
    _assert_rule(passes, monitor.history, 3)


@pytest.mark.parametrize("how", ["clear", "new dict"])
def test_the_user_clearing_the_root_s_pre_hooks_leaves_the_rule(how):
    """The user's model._forward_pre_hooks.clear(), or an empty OrderedDict put in its place (as
    Lightning's DeepSpeed strategy does), while the root hook is on (07806f4 too): the schedule
    believed it on, no pass was counted again, every later step read as the same iteration and
    no later pass was profiled, with no word. Now a step that reads as no pass checks the hook
    is still there, reads autograd instead where it is not, and puts it back."""
    from collections import OrderedDict

    torch.manual_seed(1)
    model = _Net()
    passes = _Passes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, activations_every=2) as monitor:
        for i in range(8):
            if i == 2:                                  # profiled: the root hook is on
                if how == "clear":
                    model._forward_pre_hooks.clear()
                else:
                    model._forward_pre_hooks = OrderedDict()
            optimizer.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            optimizer.step()
            passes.note("step")
            if i == 3:
                monitor.log(i)
                passes.note("log")
        monitor.log(8)
    _assert_rule(passes, monitor.history, 2)
