"""GradientMonitor against oracles computed straight from p.grad, and its hook life cycle."""

from __future__ import annotations

import gc
import math
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle, sign_exponent_bin
from small_models import BatchedLinear
from torch import nn

from gradflow import GradientMonitor, MonitorError
from gradflow.monitor import stats as S
from gradflow.monitor.tensors import PENDING_ELEMENTS


def mlp(depth: int = 3, width: int = 5, activation=nn.ReLU, inputs: int = 2) -> nn.Sequential:
    layers, size = OrderedDict(), inputs
    for i in range(1, depth + 1):
        layers[f"dense_{i}"] = nn.Linear(size, width)
        layers[f"act_{i}"] = activation()
        size = width
    layers[f"dense_{depth + 1}"] = nn.Linear(size, 1)
    return nn.Sequential(layers)



def train_steps(model, monitor_or_none, steps, oracle=None, batch=32, inputs=2, lr=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(batch, inputs, generator=generator)
        y = (x.norm(dim=1, keepdim=True) > 1).float()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        if oracle is not None:
            oracle.capture()
        optimizer.step()
    return optimizer


class Wide(nn.Module):
    """Small and large parameters, so both reduction paths are exercised."""

    def __init__(self):
        super().__init__()
        self.dense_1 = nn.Linear(300, 300)        # 90,000 weights: reduced on its own
        self.act = nn.Tanh()
        self.dense_2 = nn.Linear(300, 1)

    def forward(self, x):
        return self.dense_2(self.act(self.dense_1(x)))


@pytest.mark.parametrize("make, inputs", [(lambda: mlp(), 2), (Wide, 300)], ids=["small-mlp", "large-params"])
def test_gradient_statistics_match_oracle_over_two_windows(make, inputs, reduction_path):
    torch.manual_seed(0)
    model = make()
    oracle = GradientOracle(model.named_parameters())
    with GradientMonitor(model) as monitor:
        train_steps(model, monitor, 7, oracle, inputs=inputs)
        assert_matches_oracle(monitor.log(0), oracle)
        oracle.reset()
        train_steps(model, monitor, 5, oracle, inputs=inputs, seed=1)
        assert_matches_oracle(monitor.log(1), oracle)
    assert [w.steps for w in monitor.history] == [7, 5]


def test_histogram_counts_match_oracle_bins(reduction_path):
    """23 steps: the histograms hold the window's steps 0, 10 and 20 (HISTOGRAM_EVERY), bin by
    bin, on the small and the large parameters' paths; zero_fraction and nonfinite every step."""
    torch.manual_seed(1)
    model = Wide()
    oracle = GradientOracle(model.named_parameters())
    with GradientMonitor(model) as monitor:
        train_steps(model, monitor, 23, oracle, inputs=300)
        monitor.parts["gradients"].reduce()
        counts = monitor.parts["gradients"].counts.view(len(monitor.names), 512).numpy()
        for i, name in enumerate(monitor.names):
            np.testing.assert_array_equal(counts[i], oracle.bins[name], err_msg=name)
            assert counts[i].sum() == 3 * dict(model.named_parameters())[name].numel()
        assert_matches_oracle(monitor.log(0), oracle)


def test_sign_exponent_bins_cover_special_values():
    values = [0.0, -0.0, 1e-40, 1.0, -1.0, 1.5, 3.0, 1e30, -1e-30, float("inf"), float("-inf"), float("nan")]
    got = S.sign_exponent_bins(torch.tensor(values)).tolist()
    assert got == [sign_exponent_bin(v) for v in values]
    counts = S.sign_exponent_counts(torch.tensor(values))
    assert S.zero_count(counts) == 2 and S.nonfinite_count(counts) == 3          # 1e-40 is no zero
    histogram = S.value_histograms(counts)[0]
    assert sum(histogram.counts) == histogram.num == len(values) - 3      # finite values only
    assert histogram.limits == sorted(histogram.limits)
    # 1e30 lies in [2**99, 2**100); everything below 2**(99 - 24) joins the zero bucket.
    assert histogram.max == 2.0 ** 100 and histogram.min == -(2.0 ** 75)
    small = S.value_histograms(S.sign_exponent_counts(torch.tensor([-3.0, 0.0, 0.3])))[0]
    assert (small.min, small.max, small.num) == (-4.0, 0.5, 3.0)
    assert S.value_histograms(S.sign_exponent_counts(torch.tensor([float("nan")])))[0] is None


def test_weight_statistics_and_update_ratio_match_oracle(reduction_path):
    torch.manual_seed(2)
    model = mlp()
    with GradientMonitor(model) as monitor:
        train_steps(model, monitor, 3)
        monitor.log(0)
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        train_steps(model, monitor, 4, seed=3)
        logged = monitor.log(1)
    for name, p in model.named_parameters():
        w = p.detach().double()
        assert logged[name]["weight_l1"] == pytest.approx(w.abs().sum().item(), rel=1e-5)
        assert logged[name]["weight_norm"] == pytest.approx(w.norm().item(), rel=1e-5)
        ratio = (w - start[name].double()).norm() / start[name].double().norm()
        assert logged[name]["weight_update_ratio"] == pytest.approx(ratio.item(), rel=1e-4)


def test_activation_statistics_match_oracle(reduction_path):
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(2, 8), tanh_1=nn.Tanh(), dense_2=nn.Linear(8, 8),
                                      relu_2=nn.ReLU(), dense_3=nn.Linear(8, 1)))
    with torch.no_grad():
        model.dense_1.weight.mul_(4)                     # push some tanh units into saturation
        model.dense_2.bias.fill_(-1.0)                   # and some ReLU units towards death
    outputs = {"tanh_1": [], "relu_2": []}
    for name in outputs:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach()))
    with GradientMonitor(model, activations_every=1) as monitor:
        train_steps(model, monitor, 6)
        with torch.no_grad():                            # evaluation passes are not recorded
            model(torch.randn(100, 2))
        monitor.log(0)
    tanh = torch.cat([o.reshape(-1) for o in outputs["tanh_1"][:6]]).double()
    relu = torch.stack(outputs["relu_2"][:6]).double()   # steps x batch x units
    got = monitor.history[0].activations
    assert got["tanh_1"]["mean"] == pytest.approx(tanh.mean().item(), abs=1e-6)
    assert got["tanh_1"]["std"] == pytest.approx(tanh.std(unbiased=False).item(), rel=1e-4)
    assert got["tanh_1"]["saturated_fraction"] == pytest.approx((tanh.abs() > 0.97).double().mean().item())
    dead = (relu.amax(dim=(0, 1)) <= 0).double().mean().item()
    assert got["relu_2"]["dead_fraction"] == pytest.approx(dead)
    assert "saturated_fraction" not in got["relu_2"] and "dead_fraction" not in got["tanh_1"]


def test_nonfinite_gradients_are_counted_and_left_out_of_histograms(tmp_path, reduction_path):
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(4)
    model = mlp()
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer) as monitor:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model(torch.randn(4, 2)).sum().backward()
        model.dense_1.weight.grad[0, 0] = float("nan")
        model.dense_1.weight.grad[1, 1] = float("inf")
        model.dense_2.weight.grad.fill_(float("nan"))      # a layer with no finite value at all
        optimizer.step()
        logged = monitor.log(0)
        assert logged["dense_1.weight"]["nonfinite"] == 2
        assert logged["dense_2.weight"]["nonfinite"] == model.dense_2.weight.numel()
        assert logged["dense_3.weight"]["nonfinite"] == 0
        assert math.isnan(logged["dense_1.weight"]["norm"])   # the truth, not a crash
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()["histograms"]
    assert "grad/dense_1/weight" in tags and "grad/dense_2/weight" not in tags
    histogram = events.Histograms("grad/dense_1/weight")[0].histogram_value
    assert histogram.num == model.dense_1.weight.numel() - 2


class WithExtra(nn.Module):
    """An MLP beside a layer that forward uses only when asked."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.extra = nn.Linear(1, 1)
        self.use_extra = False

    def forward(self, x):
        out = self.body(x)
        return self.extra(out) if self.use_extra else out


def test_frozen_and_unused_parameters_are_skipped():
    torch.manual_seed(5)
    model = WithExtra()                                   # extra: registered, never used
    model.body.dense_1.requires_grad_(False)
    oracle = GradientOracle(model.named_parameters())
    with GradientMonitor(model) as monitor:
        train_steps(model, monitor, 3, oracle)
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)
    assert not any(name.startswith(("body.dense_1.", "extra.")) for name in logged)
    assert "body.dense_2.weight" in logged


def test_parameters_that_miss_some_steps_average_over_their_own_steps():
    torch.manual_seed(6)
    model = WithExtra()
    oracle = GradientOracle(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model) as monitor:
        for step in range(6):
            optimizer.zero_grad(set_to_none=True)
            model.use_extra = bool(step % 2)              # extra has a gradient in odd steps only
            model(torch.randn(8, 2)).sum().backward()
            oracle.capture()
            optimizer.step()
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)
    assert logged["extra.weight"]["steps"] == 3 and logged["body.dense_1.weight"]["steps"] == 6


def test_gradient_accumulation_records_the_accumulated_gradient():
    torch.manual_seed(7)
    model = mlp()
    oracle = GradientOracle(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with GradientMonitor(model) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            for _ in range(4):                            # four micro-batches per step
                x = torch.randn(8, 2)
                (model(x).pow(2).mean() / 4).backward()
            oracle.capture()
            optimizer.step()
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)
    assert logged["dense_1.weight"]["steps"] == 3


def test_grad_scaler_gradients_are_recorded_unscaled():
    torch.manual_seed(8)
    model = mlp()
    oracle = GradientOracle(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled_norms = []
    with GradientMonitor(model) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(16, 2)).float().pow(2).mean()
            scaler.scale(loss).backward()
            scaled_norms.append(model.dense_1.weight.grad.norm().item())
            scaler.unscale_(optimizer)                    # what the optimizer will apply
            oracle.capture()
            scaler.step(optimizer)
            scaler.update()
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)
    assert logged["dense_1.weight"]["norm"] < np.mean(scaled_norms) / 1000


def test_explicit_optimizer_and_manual_record():
    torch.manual_seed(9)
    model = mlp()
    oracle = GradientOracle(model.named_parameters())
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        for _ in range(3):                                # a loop with no torch.optim optimizer
            model.zero_grad()
            model(torch.randn(8, 2)).sum().backward()
            oracle.capture()
            monitor.record()
            other.step()                                  # someone else's optimizer: ignored
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
        assert_matches_oracle(monitor.log(0), oracle)


# -- life cycle -------------------------------------------------------------------------------

def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_remove_takes_every_hook_away_and_is_safe_twice():
    model = mlp()
    attributes = {m: set(vars(m)) for m in model.modules()}
    monitor = GradientMonitor(model)
    assert hook_counts(model) > 0
    train_steps(model, monitor, 2)
    monitor.remove()
    monitor.remove()
    assert hook_counts(model) == 0
    assert {m: set(vars(m)) for m in model.modules()} == attributes   # nothing added to the model
    train_steps(model, monitor, 3)                         # no longer recording
    assert monitor.log(0)["dense_1.weight"]["steps"] == 2  # what it saw while attached
    assert monitor.history[0].activations["act_1"]["mean"] > 0


def test_leaving_with_on_an_exception_removes_every_hook():
    model = mlp()
    with pytest.raises(RuntimeError, match="boom"), GradientMonitor(model) as monitor:
        train_steps(model, monitor, 1)
        raise RuntimeError("boom")
    assert hook_counts(model) == 0
    assert not monitor.attached
    train_steps(model, None, 1)
    with GradientMonitor(model) as again:                  # re-attaching works
        train_steps(model, again, 2)
        assert again.log(0)["dense_1.weight"]["steps"] == 2


def test_a_second_live_monitor_is_refused_with_directions():
    model = mlp()
    first = GradientMonitor(model)
    with pytest.raises(MonitorError, match=r"\.remove\(\)"):
        GradientMonitor(model)
    assert GradientMonitor.detach(model) is True
    assert not first.attached
    second = GradientMonitor(model)
    second.remove()
    assert GradientMonitor.detach(model) is False


def test_the_monitor_does_not_keep_the_model_alive():
    model = mlp()
    monitor = GradientMonitor(model)
    train_steps(model, monitor, 1)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    monitor.remove()


def test_memory_stays_flat_over_ten_thousand_steps():
    torch.manual_seed(10)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 2)
    y = (x.norm(dim=1, keepdim=True) > 1).float()

    def resident_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    with GradientMonitor(model) as monitor:
        for step in range(10_000):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            optimizer.step()
            if step % 100 == 99:
                monitor.log(step)
            if step == 999:
                gc.collect()
                baseline = resident_bytes()
        gc.collect()
        grown = resident_bytes() - baseline
        assert len(monitor.history) == 100
        assert len(monitor.parts["gradients"].pending) == 0 and len(monitor.parts["activations"].pending) == 0
        assert len(monitor.parts["gradients"]._batches) <= monitor.parts["gradients"]._batches.LIMIT
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 9,000 steps"


def test_pending_work_is_bounded_without_a_log_call():
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model) as monitor:
        for _ in range(40):                                # 40 x 256 x 512 activations > the budget
            optimizer.zero_grad()
            model(torch.randn(256, 64)).sum().backward()
            optimizer.step()
            assert monitor.parts["activations"].pending_elements < PENDING_ELEMENTS
            assert monitor.parts["gradients"].pending_elements < PENDING_ELEMENTS
        assert monitor.log(0)["0.weight"]["steps"] == 40


def test_bad_arguments_are_refused_at_attach_time():
    with pytest.raises(TypeError, match="nn.Module"):
        GradientMonitor("not a model")
    with pytest.raises(MonitorError, match="no floating-point parameters"):
        GradientMonitor(nn.ReLU())



def test_members_of_a_batched_model_get_their_own_statistics(reduction_path):
    torch.manual_seed(11)
    members = 3
    model = nn.Sequential(OrderedDict(dense_1=BatchedLinear(members, 2, 4), tanh_1=nn.Tanh(),
                                      dense_2=BatchedLinear(members, 4, 4), relu_2=nn.ReLU(),
                                      dense_3=BatchedLinear(members, 4, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    captured = [[] for _ in range(members)]
    with GradientMonitor(model, members=members) as monitor:
        for _ in range(4):
            optimizer.zero_grad()
            x = torch.randn(members, 8, 2)
            model(x).pow(2).mean(dim=(1, 2)).sum().backward()
            for k in range(members):
                captured[k].append({name: p.grad[k].clone() for name, p in model.named_parameters()})
            optimizer.step()
        logged = monitor.log(0)
    assert isinstance(logged, list) and len(logged) == members
    for k in range(members):
        for name in dict(model.named_parameters()):
            grads = [step[name].double() for step in captured[k]]
            assert logged[k][name]["norm"] == pytest.approx(np.mean([g.norm().item() for g in grads]), rel=1e-5)
            assert logged[k][name]["mean_abs"] == pytest.approx(np.mean([g.abs().mean().item() for g in grads]), rel=1e-5)
            assert logged[k][name]["max_abs"] == pytest.approx(np.mean([g.abs().max().item() for g in grads]), rel=1e-5)
        assert monitor.member_history(k)[0].activations.keys() == {"tanh_1", "relu_2"}
    assert logged[0]["dense_1.weight"]["norm"] != logged[1]["dense_1.weight"]["norm"]


@pytest.mark.parametrize("members", [1, 3])
def test_large_gradients_of_members_fold_each_member_apart(reduction_path, members):
    """Gradients of 65,536 values or more are folded at each step, each member's segment on its
    own (oracle: the norms, means and zeros of each member's slice of .grad, per step); also a
    gradient that is not contiguous (a transposed one a user assigned) and one that requires grad."""
    torch.manual_seed(12)
    model = nn.Sequential(OrderedDict(dense_1=BatchedLinear(members, 256, 384), relu_1=nn.ReLU(),
                                      dense_2=BatchedLinear(members, 384, 1)))
    assert model.dense_1.weight.numel() >= 65536 * members
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    captured, totals = [[] for _ in range(members)], [[] for _ in range(members)]
    with GradientMonitor(model, members=members) as monitor:
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(members, 4, 256)).pow(2).sum().backward()
            weight = model.dense_1.weight
            if step == 1:        # the same values, laid out transposed
                weight.grad = weight.grad.transpose(1, 2).contiguous().transpose(1, 2)
                assert not weight.grad.is_contiguous()
            if step == 2:
                weight.grad = weight.grad.clone().requires_grad_()
            for k in range(members):
                captured[k].append(weight.grad[k].detach().double().clone())
                totals[k].append(sum(float(p.grad[k].detach().double().square().sum()) for p in model.parameters()) ** 0.5)
            optimizer.step()
        logged = monitor.log(0)
    rows = logged if members > 1 else [logged]
    for k in range(members):
        grads = captured[k]
        row = rows[k]["dense_1.weight"]
        assert row["steps"] == 3
        assert row["norm"] == pytest.approx(np.mean([g.norm().item() for g in grads]), rel=1e-9)
        assert row["mean"] == pytest.approx(np.mean([g.mean().item() for g in grads]), rel=1e-9, abs=1e-15)
        assert row["max_abs"] == pytest.approx(np.mean([g.abs().max().item() for g in grads]), rel=1e-7)
        assert row["zero_fraction"] == pytest.approx(np.mean([(g == 0).double().mean().item() for g in grads]), abs=1e-12)
        overall = monitor.member_history(k)[-1].overall
        assert overall["total_norm"] == pytest.approx(np.mean(totals[k]), rel=1e-9)
        assert overall["total_norm_max"] == pytest.approx(max(totals[k]), rel=1e-9)


@pytest.mark.parametrize("layout", ["every_other", "expanded"])
def test_large_one_dimensional_gradient_that_is_a_strided_view_is_folded(layout):
    """A 1-D gradient of 65,536 values or more that is a view with a stride other than one (every
    other value of a bigger buffer, or one value expanded) is folded as its values (oracle: float64
    torch on p.grad); reshape(-1) keeps such a view as it is, and the fold read it as contiguous."""
    torch.manual_seed(3)
    model = nn.Linear(100_000, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, histograms=False, weights=False, activations=False) as monitor:
        buffer = torch.randn(200_000)
        grad = buffer[::2] if layout == "every_other" else torch.full((1,), -0.5).expand(100_000)
        model.weight.grad = grad.view(1, -1)
        optimizer.step()
        row = monitor.log(0)["weight"]
    wide = grad.double()
    assert row["norm"] == pytest.approx(wide.norm().item(), rel=1e-12)
    assert row["mean"] == pytest.approx(wide.mean().item(), rel=1e-12, abs=1e-15)
    assert row["max_abs"] == wide.abs().max().item()


@pytest.mark.parametrize("model", ["one_small_beside_a_large", "one_small_alone"])
def test_a_lone_small_gradient_reused_in_place_is_each_steps_own(model):
    """The small gradients of a step wait for the window's reduction as one flat copy; where a step
    has one small gradient (a Linear(300, 300)'s bias beside its large weight, or a model of one
    small parameter) that copy was the gradient itself (_flatten_dense_tensors returns a view of a
    lone tensor), and zero_grad(set_to_none=False) or accumulating into .grad rewrote it: every
    step then read as the last one. Oracle: each step's .grad, read as the step applies it."""
    torch.manual_seed(4)
    net = nn.Linear(300, 300) if model == "one_small_beside_a_large" else nn.Linear(30, 1, bias=False)
    small = net.bias if model == "one_small_beside_a_large" else net.weight
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    norms = []
    with GradientMonitor(net, histograms=False, weights=False, activations=False) as monitor:
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)           # the same .grad tensors, zeroed in place
            net(torch.randn(4, net.in_features)).pow(2).sum().backward()
            norms.append(small.grad.double().norm().item())
            optimizer.step()
        row = monitor.log(0)["bias" if model == "one_small_beside_a_large" else "weight"]
    assert row["norm"] == pytest.approx(np.mean(norms), rel=1e-6)


def test_member_history_of_a_single_member_monitor_is_its_whole_history():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        for step in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 2)).sum().backward()
            optimizer.step()
            monitor.log(step)
        assert monitor.member_history(0) == monitor.history and len(monitor.history) == 2
        for bad in (1, -1, "0", True):
            with pytest.raises(MonitorError, match="member must be an int from 0 to 0"):
                monitor.member_history(bad)


def test_members_must_match_every_parameter():
    with pytest.raises(MonitorError, match="leading dimension of 3"):
        GradientMonitor(mlp(), members=3)


def test_large_activation_outputs_match_oracle(reduction_path):
    """Outputs of 64 x 2048 = 131,072 elements take the dense path, not the segment sums."""
    torch.manual_seed(12)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(16, 2048), tanh_1=nn.Tanh(),
                                      dense_2=nn.Linear(2048, 2048), relu_2=nn.ReLU(), dense_3=nn.Linear(2048, 1)))
    with torch.no_grad():
        model.dense_1.weight.mul_(8)
        model.dense_2.bias[:512].fill_(-100.0)            # a quarter of the ReLU units dead
    outputs = {"tanh_1": [], "relu_2": []}
    for name in outputs:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach()))
    with GradientMonitor(model, activations_every=1) as monitor:
        train_steps(model, monitor, 3, inputs=16, batch=64)
        monitor.log(0)
    tanh = torch.cat([o.reshape(-1) for o in outputs["tanh_1"]]).double()
    relu = torch.stack(outputs["relu_2"]).double()
    got = monitor.history[0].activations
    assert got["tanh_1"]["mean"] == pytest.approx(tanh.mean().item(), abs=1e-6)
    assert got["tanh_1"]["std"] == pytest.approx(tanh.std(unbiased=False).item(), rel=1e-4)
    assert got["tanh_1"]["saturated_fraction"] == pytest.approx((tanh.abs() > 0.97).double().mean().item())
    assert got["relu_2"]["mean"] == pytest.approx(relu.mean().item(), rel=1e-5)
    assert got["relu_2"]["dead_fraction"] == pytest.approx((relu.amax(dim=(0, 1)) <= 0).double().mean().item())
    assert 0 < got["relu_2"]["dead_fraction"] < 1


def test_fused_kernels_and_torch_ops_write_the_same_window(monkeypatch):
    """The same training, reduced by numba's kernels and by torch ops: every statistic and
    every histogram count agree, NaN and Inf included."""
    if S.fused_kernels() is None:
        pytest.skip("numba is not installed")

    def window(fused: bool):
        monkeypatch.setattr(S, "_KERNELS", None if fused else False)
        torch.manual_seed(13)
        model = nn.Sequential(OrderedDict(dense_1=nn.Linear(300, 300), tanh_1=nn.Tanh(), dense_2=nn.Linear(300, 8),
                                          relu_2=nn.ReLU(), dense_3=nn.Linear(8, 1)))
        with GradientMonitor(model) as monitor:
            optimizer = train_steps(model, monitor, 3, inputs=300, batch=256)
            model(torch.randn(4, 300)).sum().backward()
            model.dense_1.weight.grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
            model.dense_2.weight.grad[0, 0] = float("nan")
            optimizer.step()
            monitor.parts["gradients"].reduce()
            monitor.parts["activations"].reduce()
            # the raw sums and counts, before any reading: copied, as the read-back's views are zeroed by log()
            parts = {key: value.copy() for key, value in monitor._read_back().items()}
            monitor.log(0)
        return monitor.history[0], parts

    (fused, fused_parts), (plain, plain_parts) = window(True), window(False)
    for key in fused_parts:
        np.testing.assert_allclose(fused_parts[key], plain_parts[key], rtol=1e-5, atol=1e-6, equal_nan=True,
                                   err_msg=key)
    for family in ("gradients", "weights", "activations"):
        got, expected = getattr(fused, family), getattr(plain, family)
        assert got.keys() == expected.keys()
        for name in got:
            for key, value in got[name].items():
                assert value == pytest.approx(expected[name][key], rel=1e-5, abs=1e-7, nan_ok=True), (family, name, key)


def test_weight_rows_of_tiny_parameters_folded_together_match_oracle(reduction_path):
    """Tiny parameters are folded a group at a time (weights.py); a frozen one between them,
    members of a batched model and a large parameter must each keep their own rows and counts."""
    torch.manual_seed(5)
    members = 2
    model = nn.Sequential(OrderedDict(dense_1=BatchedLinear(members, 2, 4), tanh_1=nn.Tanh(),
                                      dense_2=BatchedLinear(members, 4, 300), relu_2=nn.ReLU(),
                                      dense_3=BatchedLinear(members, 300, 1)))
    model.dense_1.bias.requires_grad_(False)              # frozen, between trainable tiny parameters
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    with GradientMonitor(model, members=members) as monitor:
        for window in range(2):
            start = {name: p.detach().clone() for name, p in model.named_parameters()}
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(members, 8, 2)).pow(2).mean(dim=(1, 2)).sum().backward()
                optimizer.step()
            monitor.log(window)
            for k in range(members):
                weights = monitor.member_history(k)[-1].weights
                for name, p in model.named_parameters():
                    w, w0 = p.detach()[k].double(), start[name][k].double()
                    assert weights[name]["l1"] == pytest.approx(w.abs().sum().item(), rel=1e-6), name
                    assert weights[name]["norm"] == pytest.approx(w.norm().item(), rel=1e-6), name
                    ratio = ((w - w0).norm() / w0.norm()).item()
                    assert weights[name]["update_ratio"] == pytest.approx(ratio, rel=1e-5, abs=1e-12), name
    assert monitor.history[-1].weights["dense_1.bias"]["update_ratio"] == 0.0


def test_huge_activations_have_a_finite_std(reduction_path):
    """Outputs of |a| ~ 1e25 (a diverging net): their squares, 1e50, are beyond float32 but the
    window's std is finite, small outputs (added up pending) and large ones (on their own)."""
    torch.manual_seed(14)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(4, 8), relu_1=nn.ReLU(), dense_2=nn.Linear(8, 128),
                                      relu_2=nn.ReLU(), dense_3=nn.Linear(128, 1)))
    outputs = {"relu_1": [], "relu_2": []}
    for name in outputs:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations_every=1) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(64, 4) * 1e25).sum().backward()     # relu_1: 512 values, relu_2: 8,192
            optimizer.step()
        monitor.log(0)
    got = monitor.history[0].activations
    for name, taken in outputs.items():
        a = torch.cat([o.reshape(-1) for o in taken]).double()
        assert got[name]["mean"] == pytest.approx(a.mean().item(), rel=1e-5), name
        assert got[name]["std"] == pytest.approx(a.std(unbiased=False).item(), rel=1e-4), name
