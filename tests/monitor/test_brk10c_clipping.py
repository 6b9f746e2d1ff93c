"""Clipping calls the earlier tests do not make (break test brk10c, torch 2.13).

The oracle: the L2 norm, in float64 straight from ``p.grad`` just before the step's clipping
call, of the monitored parameters' gradients (unscaled under a GradScaler), and whether the call
changed a gradient. Each case is a kind: how the parameters are handed over (a generator read
once, one tensor, some gradients None), a norm that ``clip_grads_with_norm_`` is given that is
not the L2 one of its ``get_total_norm``, a call over more parameters than the monitor watches
(also split in calls sharing one total), a clip made before ``scaler.unscale_``, a clip the
monitor cannot see, a new micro-batch made by calling the model's layers, and a clip inside a
compiled function.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor

U = torch.nn.utils


def l2(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


def run(clip, steps: int = 4, other: nn.Module | None = None, scaler: torch.amp.GradScaler | None = None,
        fused: bool = False):
    """A small MLP (and ``other``, a second model the monitor does not watch), SGD over both;
    ``clip(params, others, step)`` clips and returns (oracle norm before clipping, clipped).
    Odd steps' limits are far below the norm, even steps' far above it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    params, others = list(model.parameters()), list(other.parameters()) if other is not None else []
    optimizer = (torch.optim.Adam(params + others, lr=1e-3, fused=True) if fused
                 else torch.optim.SGD(params + others, lr=0.05))
    clip.optimizer = optimizer
    norms, clipped = [], 0
    with GradientMonitor(model, None, activations=False) as monitor:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            x = torch.randn(8, 4) * (1 + 3 * (step % 2))
            loss = model(x).square().mean() + (other(x).square().mean() if other is not None else 0)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            norm, did = clip(params, others, step)
            norms.append(norm)
            clipped += did
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        monitor.log(0)
    return monitor.history[-1].overall, norms, clipped


def check(overall, norms, clipped, rel=1e-6) -> None:
    assert overall["clip_calls"] == len(norms) and overall["clipped_steps"] == clipped
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / len(norms), rel=rel)


def limit(norm: float, step: int) -> float:
    return norm * (0.5 if step % 2 else 2.0)


# -- how the parameters are handed over: cases that hold, kept as kinds ----------------------

def generator_norm_half(params, others, step):      # a generator is read once: the wrapper lists it
    before = l2(params)
    p = float(torch.cat([q.grad.double().flatten() for q in params]).abs().pow(0.5).sum() ** 2)
    U.clip_grad_norm_((q for q in params), limit(p, step), norm_type=0.5, foreach=False)
    return before, step % 2 == 1


def one_tensor(params, others, step):                # a single tensor, not a list
    before = l2(params[:1])
    U.clip_grad_norm_(params[0], limit(before, step))
    return before, step % 2 == 1


def some_grads_none(params, others, step):           # a bias with no gradient this step
    params[1].grad = None
    before = l2(params)
    U.clip_grad_norm_(params, limit(before, step), error_if_nonfinite=True)
    return before, step % 2 == 1


def total_of_a_generator(params, others, step):      # get_total_norm over a generator, clipped in groups
    before = l2(params)
    total = U.get_total_norm(q.grad for q in params)
    U.clip_grads_with_norm_((q for q in params[:2]), limit(before, step), total, foreach=False)
    U.clip_grads_with_norm_(params[2:], limit(before, step), total)
    return before, step % 2 == 1


def value_of_a_generator(params, others, step):
    before, largest = l2(params), max(float(q.grad.abs().max()) for q in params)
    U.clip_grad_value_((q for q in params), largest * (0.5 if step % 2 else 2.0), foreach=False)
    return before, step % 2 == 1


HANDED = [generator_norm_half, one_tensor, some_grads_none, total_of_a_generator, value_of_a_generator]


@pytest.mark.parametrize("clip", HANDED, ids=[c.__name__ for c in HANDED])
def test_parameters_handed_over_in_any_form_give_the_oracle_norm(clip):
    check(*run(clip))


# -- clip_grads_with_norm_ given a norm that is not its get_total_norm's L2 one ----------------

def a_norm_by_hand(params, others, step):            # accelerate's clip_grad_norm_(norm_type=0) does this
    before = l2(params)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.grad, 1.0) for q in params]), 1.0)
    U.clip_grads_with_norm_(params, limit(float(total), step), total)
    return before, step % 2 == 1


def l1_then_an_l2_of_the_weights(params, others, step):   # an L2 get_total_norm for a log in between
    before = l2(params)
    total = U.get_total_norm([q.grad for q in params], norm_type=1.0)
    U.get_total_norm([q.detach() for q in params])
    U.clip_grads_with_norm_(params, limit(float(total), step), total)
    return before, step % 2 == 1


@pytest.mark.parametrize("clip", [a_norm_by_hand, l1_then_an_l2_of_the_weights],
                         ids=["total_norm by hand (L1)", "get_total_norm(1), a logged L2 one, clip"])
def test_a_total_norm_not_from_an_l2_get_total_norm_gives_the_l2_norm(clip):
    """The wrapper took the norm_type of the last get_total_norm call (2.0 when there was none
    since) and reported the given L1 norm as the L2 one: a mean of 5.59 where the gradients' L2
    norm was 0.735 (main at ec2ca68)."""
    check(*run(clip))


# -- one call over the monitored parameters and another model's --------------------------------

def both_by_norm_l1(params, others, step):
    before, everything = l2(params), params + others
    p = float(torch.cat([q.grad.double().flatten() for q in everything]).abs().sum())
    U.clip_grad_norm_(everything, limit(p, step), norm_type=1.0)
    return before, step % 2 == 1


def both_by_value(params, others, step):
    before, everything = l2(params), params + others
    largest = max(float(q.grad.abs().max()) for q in everything)
    U.clip_grad_value_(everything, largest * (0.5 if step % 2 else 2.0))
    return before, step % 2 == 1


def both_by_total_in_groups(params, others, step):   # accelerate and the Trainer: one total, a call per mesh
    before, everything = l2(params), params + others
    total = U.get_total_norm([q.grad for q in everything])
    U.clip_grads_with_norm_(params[:2] + others[:1], limit(float(total), step), total)
    U.clip_grads_with_norm_(params[2:] + others[1:], limit(float(total), step), total)
    return before, step % 2 == 1


def both_norm_first(params, others, step):
    before, everything = l2(params), params + others
    U.clip_grad_norm_(everything, limit(l2(everything), step))
    return before, step % 2 == 1


BOTH = [both_norm_first, both_by_norm_l1, both_by_value, both_by_total_in_groups]


@pytest.mark.parametrize("clip", BOTH, ids=[c.__name__ for c in BOTH])
def test_a_call_over_another_models_parameters_too_gives_the_monitored_norm(clip):
    """The monitor watches one model; the call also clips a second one. total_norm_before_clip
    is the monitored parameters' norm before clipping, as the norm after it that the verdict
    divides it by is (main at ec2ca68 gave the whole call's: 4.64 where the monitored model's
    was 0.735: the norm before clipping exceeded the norm after on steps that did not clip)."""
    check(*run(clip, other=nn.Linear(4, 3)))


# -- clipping under a GradScaler -----------------------------------------------------------------

def unscaled_first(scale: float):
    def clip(params, others, step):
        # torch's AMP recipe: scaler.unscale_(optimizer) first; here the gradients are divided the same way
        before = l2(params) / scale
        U.clip_grad_norm_(params, limit(before, step) * scale)
        return before, step % 2 == 1
    return clip


def unscaled_first_then_a_log(scale: float):
    def clip(params, others, step):
        before = l2(params) / scale
        U.clip_grad_norm_(params, limit(before, step) * scale)
        assert sum(q.norm() for q in params).requires_grad     # a logged weight norm: autograd nodes
        return before, step % 2 == 1
    return clip


def unscaled_after(scale: float):
    def clip(params, others, step):
        optimizer = clip.optimizer
        before = l2(params) / scale
        U.clip_grad_norm_(params, limit(before, step) * scale)
        clip.scaler.unscale_(optimizer)               # unscale_ after the clip: scaler.step does not again
        return before, step % 2 == 1
    return clip


@pytest.mark.parametrize("unscale", ["in scaler.step", "by hand after the clip", "inside a fused step",
                                     "in scaler.step after a logged weight norm"])
def test_a_clip_before_unscale_is_reported_unscaled_and_said(unscale):
    """Clipping the still-scaled gradients (no scaler.unscale_ before it): the norm the call saw
    is scale x the gradient's. main at ec2ca68 reported it as it was, silently: 752.7 where the
    unscaled norm (the unit of every other column) was 0.735."""
    scale = 1024.0
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    clip = {"by hand after the clip": unscaled_after, "in scaler.step after a logged weight norm":
            unscaled_first_then_a_log}.get(unscale, unscaled_first)(scale)
    clip.scaler = scaler
    with pytest.warns(UserWarning, match="unscale_"):     # a fused Adam unscales in its own step, no unscale_
        check(*run(clip, scaler=scaler, fused=unscale == "inside a fused step"), rel=1e-5)


# -- a clip the monitor cannot see ----------------------------------------------------------------

def test_a_hand_written_clip_leaves_the_clipping_columns_out_not_zero():
    """``p.grad.mul_(scale)`` by hand: no clipping call is seen, so the window has no
    total_norm_before_clip, clipped_steps or clip_calls at all (never clipped_steps 0, which
    would claim that nothing was clipped); total_norm is the norm after the hand clip."""
    def by_hand(params, others, step):
        before = l2(params)
        with torch.no_grad():
            for q in params:
                q.grad.mul_(min(1.0, limit(before, step) / before))
        return l2(params), 0

    overall, applied, _ = run(by_hand)
    assert not {"total_norm_before_clip", "clipped_steps", "clip_calls"} & set(overall)
    assert overall["total_norm"] == pytest.approx(sum(applied) / len(applied), rel=1e-6)


# -- a new micro-batch seen without the model's own forward --------------------------------------

def test_clipping_each_micro_batch_of_a_model_whose_parts_are_called_gives_the_last_calls_norm():
    """A LightningModule's ``training_step`` calls its layers, never the module itself, so the
    monitor's forward pre-hook on the model saw no pass: a clip at each of 3 micro-batches kept
    the first call's norm (of one micro-batch's gradient) for the step, and its clipped flag."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    norms, clipped = [], 0
    with GradientMonitor(model, None, activations=False) as monitor:
        for _ in range(4):
            optimizer.zero_grad()
            for micro in range(3):
                x = torch.randn(8, 4)
                model[2](model[1](model[0](x))).square().mean().backward()     # the layers, not model(x)
                before = l2(params)
                # the first micro-batch clips (a limit just below its norm), the last does not
                U.clip_grad_norm_(params, before * (0.9 if micro == 0 else 10.0))
            norms.append(before)
            optimizer.step()
        monitor.log(0)
    check(monitor.history[-1].overall, norms, clipped)


def test_gradscaler_is_torch_s_own_again_after_the_last_monitor_leaves():
    before = dict(torch.amp.GradScaler.__dict__)
    with GradientMonitor(nn.Linear(2, 1), None):
        assert torch.amp.GradScaler.unscale_ is not before["unscale_"]    # watched: a clip before it was scaled
    assert {k: torch.amp.GradScaler.__dict__[k] for k in ("step", "unscale_")} == \
        {k: before[k] for k in ("step", "unscale_")}


def test_grad_mode_work_between_a_bodys_and_a_heads_clip_keeps_them_one_step():
    """A weight norm logged in grad mode between the two calls makes autograd nodes, as a
    forward pass does; the calls are over other parameters, so it is the same step: the norm is
    sqrt(body^2 + head^2)."""
    def body_log_head(params, others, step):
        before = l2(params)
        U.clip_grad_norm_(params[:2], limit(l2(params[:2]), step))
        logged = sum(q.norm() for q in params)            # grad mode: autograd nodes, no new gradient
        assert logged.requires_grad
        U.clip_grad_norm_(params[2:], l2(params[2:]) * 2.0)
        return before, step % 2 == 1

    check(*run(body_log_head))


def mine_then_others(params, others, step):     # one call per device mesh: the monitored model's, the other's
    before, everything = l2(params), params + others
    total = U.get_total_norm([q.grad for q in everything])
    U.clip_grads_with_norm_(params, limit(float(total), step), total)
    U.clip_grads_with_norm_(others, limit(float(total), step), total)
    return before, step % 2 == 1


def mixed_then_mine(params, others, step):
    before, everything = l2(params), params + others
    total = U.get_total_norm([q.grad for q in everything])
    U.clip_grads_with_norm_(params[:2] + others, limit(float(total), step), total)
    U.clip_grads_with_norm_(params[2:], limit(float(total), step), total)
    return before, step % 2 == 1


@pytest.mark.parametrize("clip", [mine_then_others, mixed_then_mine], ids=["mine, then others", "mixed, then mine"])
def test_one_total_norm_over_calls_of_which_one_holds_only_the_monitored_gradients_is_said(clip):
    """The first call alone cannot tell whether the total it is given holds other gradients (a
    later call of the same clip may bring them): where the calls differ so, a warning says that
    the step's norm is not the monitored gradients' alone; the counts stay right."""
    with pytest.warns(UserWarning, match="sharing one total_norm"):
        overall, norms, clipped = run(clip, other=nn.Linear(4, 3))
    assert overall["clip_calls"] == len(norms) and overall["clipped_steps"] == clipped


# -- a clipping call inside a compiled function -------------------------------------------------------

@pytest.mark.parametrize("path", ["clip_grad_norm_", "clip_grad_value_", "get_total_norm+clip_grads_with_norm_"])
def test_a_clipping_call_that_torch_compile_traces_is_counted_and_training_goes_on(path):
    """``torch.compile`` over a function that clips: dynamo traced the monitor's bookkeeping in
    the wrapper and raised InternalTorchDynamoError out of the user's call (main at ec2ca68, with
    any monitor attached). Now the call runs eagerly there (a graph break) and is counted."""
    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def compiled(params, limit_):
        if path == "clip_grad_norm_":
            return U.clip_grad_norm_(params, limit_)
        if path == "clip_grad_value_":
            return U.clip_grad_value_(params, limit_)
        return U.clip_grads_with_norm_(params, limit_, U.get_total_norm([q.grad for q in params]))

    def clip(params, others, step):
        before, largest = l2(params), max(float(q.grad.abs().max()) for q in params)
        compiled(params, (largest if path == "clip_grad_value_" else before) * (0.5 if step % 2 else 2.0))
        return before, step % 2 == 1

    check(*run(clip))
