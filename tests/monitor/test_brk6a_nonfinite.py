"""Break test of the first-non-finite part (nonfinite.py): NaN/inf made by code *between*
modules (a container's or the model's own forward code before a child, the input batch, an
in-place change of a child's output). Oracle: the plant itself (which code made the value)."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.nonfinite import INPUT, Source


def first_source(model, x, steps=3, plant=None):
    """``steps`` SGD steps under GradientMonitor(nonfinite=True); ``plant(step)`` before each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # NaN training warns elsewhere; not the point here
        with GradientMonitor(model, histograms=False, activations=False, nonfinite=True) as monitor:
            for step in range(steps):
                if plant is not None:
                    plant(step)
                optimizer.zero_grad()
                model(x).float().pow(2).mean().backward()
                optimizer.step()
            monitor.log(0)
    return monitor.history[-1].first_nonfinite


class Attention(nn.Module):
    """nanoGPT's attention, with the first query row fully masked at the planted step."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj, self.attn_dropout = nn.Linear(4, 12), nn.Linear(4, 4), nn.Dropout(0.1)
        self.mask_all = False

    def forward(self, x):
        q, k, v = self.c_attn(x).split(4, dim=-1)
        att = q @ k.transpose(-2, -1)
        if self.mask_all:
            att = att.masked_fill(torch.arange(att.shape[-1]) >= 0, float("-inf"))   # softmax of all -inf: NaN
        return self.c_proj(self.attn_dropout(att.softmax(-1)) @ v)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(4, 4), Attention(), nn.Linear(4, 1)
        self.log_at_root = False

    def forward(self, x):
        h = self.attn(torch.relu(self.inp(x)))
        return self.head(torch.log(h - 100) if self.log_at_root else h)


def test_attention_whose_masked_row_makes_nan_is_named_not_its_output_projection():
    """Was ``attn.c_proj (forward)``: the first module to *finish* with a NaN output, though its
    input was already NaN (softmax of a fully masked row, in attn's own forward)."""
    torch.manual_seed(0)
    model = Net()

    def plant(step):
        model.attn.mask_all = step == 1
    assert first_source(model, torch.randn(2, 5, 4), plant=plant) == Source("attn", "forward", 1)


def test_the_models_own_code_between_two_children_is_named_the_root():
    """Was ``head (forward)``: log(h - 100) in the model's forward before its head."""
    torch.manual_seed(0)
    model = Net()

    def plant(step):
        model.log_at_root = step == 2
    assert first_source(model, torch.randn(2, 5, 4), plant=plant) == Source("", "forward", 2)


def test_a_nan_in_the_input_batch_is_named_the_input():
    """Was the first layer (``0 (forward)``), which only passed the batch's NaN on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(8, 4)

    def plant(step):
        x[3, 1] = float("nan") if step == 1 else 0.0
    found = first_source(model, x, plant=plant)
    assert found == Source(INPUT, "forward", 1)
    assert "input" in found.where()


class InPlace(nn.Module):
    """A container that changes its child's output in place (same tensor, new version)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.on = False

    def forward(self, x):
        h = self.lin(x)
        if self.on:
            h.div_(0.0)
        return h


@pytest.mark.parametrize("inplace_relu", [False, True], ids=["relu", "relu_inplace"])
def test_a_childs_output_changed_in_place_is_the_containers(inplace_relu):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), act=nn.ReLU(inplace=inplace_relu), block=InPlace(),
                                      head=nn.Linear(4, 1)))

    def plant(step):
        model.block.on = step == 1
    assert first_source(model, torch.randn(8, 4), plant=plant) == Source("block", "forward", 1)


@pytest.mark.parametrize("inplace_relu", [False, True], ids=["relu", "relu_inplace"])
def test_a_layer_behind_pass_through_modules_is_still_named(inplace_relu):
    """A ReLU and a Dropout between two layers are not watched: the NaN of the first layer
    is still its own, and the clean ones add no false source."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), act=nn.ReLU(inplace=inplace_relu), drop=nn.Dropout(0.1),
                                      b=nn.Linear(4, 4), c=nn.Linear(4, 1)))

    def plant(step):
        if step == 2:
            with torch.no_grad():
                model.b.bias[0] = float("inf")
    assert first_source(model, torch.randn(8, 4), steps=2) is None
    assert first_source(model, torch.randn(8, 4), steps=3, plant=plant) == Source("b", "forward", 2)


def test_a_nan_whose_step_the_loop_skips_is_still_in_the_window():
    """``if not torch.isfinite(loss): continue`` (no backward, no step) for the rest of the
    window: the NaN forward's sums waited for a step that never came, and every window said
    None. It is reported at the step in progress (2 steps were applied before it)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), act=nn.Tanh(), b=nn.Linear(4, 4), c=nn.Linear(4, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientMonitor(model, histograms=False, activations=False, nonfinite=True) as monitor:
            for step in range(4):
                if step == 2:
                    with torch.no_grad():
                        model.b.bias[0] = float("nan")       # from here on every loss is NaN
                optimizer.zero_grad()
                loss = model(torch.randn(8, 4)).pow(2).mean()
                if not torch.isfinite(loss):
                    continue
                loss.backward()
                optimizer.step()
            assert monitor.parts["nonfinite"].read_now()[0] == Source("b", "forward", 2)   # a stop message's read
            monitor.log(0)
    assert monitor.history[0].first_nonfinite == Source("b", "forward", 2)


def _compiled_run(how):
    """A NaN planted in ``b`` at step 1 of a model run compiled in one of three ways."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), act=nn.Tanh(), b=nn.Linear(4, 4), c=nn.Linear(4, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    run = model
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with GradientMonitor(model, histograms=False, activations=False, nonfinite=True) as monitor:
            if how == "torch.compile(model)":
                run = torch.compile(model, backend="eager")
            else:
                (model if how == "model.compile()" else model.b).compile(backend="eager")
            for step in range(3):
                if step == 1:
                    with torch.no_grad():
                        model.b.bias[0] = float("nan")
                optimizer.zero_grad()
                run(torch.randn(8, 4)).sum().backward()
                optimizer.step()
            monitor.log(0)
    return monitor.history[-1].first_nonfinite, [str(w.message) for w in said]


def test_a_compiled_model_is_said_compiled_not_its_own_forward_code():
    """Was "the model's own forward code (outside its submodules)": the NaN was b's."""
    found, _ = _compiled_run("torch.compile(model)")
    assert found == Source("", "forward", 1)
    assert found.where().startswith("the compiled model (forward; under torch.compile")


def test_a_compiled_block_is_named_as_a_place_the_value_may_come_from():
    """b.compile(): b's hooks run inside its graph; the NaN reaches c's input: the model's own
    code was named, now with the compiled block it may have come from."""
    found, _ = _compiled_run("block.compile()")
    assert found == Source("", "forward", 1)
    assert "compiled module inside it (b)" in found.where()


def test_a_model_compiled_in_place_is_said_not_watched():
    """model.compile(): no hook of the monitor runs outside the graph; every window said None
    with no word."""
    found, said = _compiled_run("model.compile()")
    assert found is None
    assert any("compiled in place (Module.compile())" in message for message in said)


def test_leaving_the_monitor_removes_its_global_pre_hook_too():
    from torch.nn.modules import module as torch_module

    before = dict(torch_module._global_forward_pre_hooks)
    with GradientMonitor(nn.Linear(2, 1), histograms=False, nonfinite=True):
        assert len(torch_module._global_forward_pre_hooks) == len(before) + 1
    assert dict(torch_module._global_forward_pre_hooks) == before


def test_a_block_run_under_inference_mode_inside_a_training_forward():
    """A frozen block whose forward runs under torch.inference_mode(): its output (an inference
    tensor, with no version counter) is summed, and a NaN it makes is still its own."""
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            with torch.inference_mode():
                return self.lin(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen, self.head = Frozen(), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.frozen(x).clone())

    torch.manual_seed(0)
    model = Model()
    model.frozen.requires_grad_(False)

    def plant(step):
        if step == 1:
            with torch.no_grad():
                model.frozen.lin.bias[0] = float("nan")
    assert first_source(model, torch.randn(8, 4), plant=plant) == Source("frozen.lin", "forward", 1)


def test_a_submodule_held_as_a_torch_compile_wrapper_is_said_compiled():
    """Lightning-style: ``self.body = torch.compile(body)`` inside the monitored model; the
    wrapper's output is checked as a whole and said to be a compiled module's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), b=nn.Linear(4, 4)))
    model = nn.Sequential(OrderedDict(body=torch.compile(body, backend="eager"), head=nn.Linear(4, 1)))

    def plant(step):
        if step == 1:
            with torch.no_grad():
                body.b.bias[0] = float("nan")
    found = first_source(model, torch.randn(8, 4), plant=plant)
    assert found == Source("body", "forward", 1)
    assert found.where().startswith("the compiled module body (forward; under torch.compile")


def test_a_compiled_source_keeps_its_words_through_summary_json(tmp_path):
    """diagnose_run rebuilds the source from summary.json: the compiled modules go with it, so
    the verdict read from a run directory says what gradflow train printed."""
    import json

    from gradflow.analysis.nonfinite import first_source as source_of
    from gradflow.analysis.nonfinite import restore_source
    from gradflow.monitor.window import Window

    window = Window(0, 3)
    window.first_nonfinite = Source("", "forward", 1, ("",))
    found = source_of([window])
    (tmp_path / "summary.json").write_text(json.dumps({"first_nonfinite": found}))
    again = Window(0, 3)
    restore_source([again], tmp_path)
    assert again.first_nonfinite.where() == window.first_nonfinite.where() == found["where"]
