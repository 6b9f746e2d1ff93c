"""log()'s check of the model's parameters (model_checks.replaced_parameters and its walk) over
many random edits of random models: the same tensors found, the same decision taken.

Oracle: ``_previous_walk`` and ``_previous_replaced``, model_checks' ``_floating_parameters``
(every module's dicts iterated, empty or not) and ``replaced_parameters`` (devices compared as
``torch.device`` objects) as they were at commit 07806f4, run on the same model right before the
new ones.
"""

from __future__ import annotations

import operator
import random

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from gradflow.monitor import model_checks
from gradflow.monitor.model_checks import _floating_parameters, replaced_parameters
from gradflow.monitor.tensors import MonitorError


def _previous_walk(model: nn.Module) -> list[torch.Tensor]:
    out, seen_modules, seen = [], set(), set()

    def visit(module):
        seen_modules.add(id(module))
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if p.is_floating_point():
                    out.append(p)
        for child in module._modules.values():
            if child is not None and id(child) not in seen_modules:
                visit(child)

    visit(model)
    return out


def _previous_replaced(model, names, params, device, dtypes):
    tensors = _previous_walk(model)
    if len(tensors) == len(params) and all(map(operator.is_, tensors, params)):
        if all(map(operator.eq, map(operator.attrgetter("dtype"), params), dtypes)) \
                and all(map(device.__eq__, map(operator.attrgetter("device"), params))):
            return None
        current = model_checks._named(model)
        model_checks._one_device(current, device)
        return [p for _, p in current]
    current = model_checks._named(model)
    by_name = dict(current)
    if [name for name, _ in current] != names and len(by_name) == len(current) and by_name.keys() == set(names):
        current = [(name, by_name[name]) for name in names]      # the same names in another order: followed
    if [name for name, _ in current] != names:
        raise MonitorError(f"the model's parameters changed after the monitor attached (now {len(current)}, "
                           f"were {len(params)}")                 # the message's start (it goes on to name them)
    for (name, p), q in zip(current, params):
        model_checks._check_materialised(name, p)
        if p.shape != q.shape:
            raise MonitorError(f"{name} was replaced by a tensor of another shape "
                               f"({tuple(q.shape)} {q.dtype} -> {tuple(p.shape)} {p.dtype}); "
                               "remove() this monitor and attach a new one after replacing parameters")
    model_checks._one_device(current, device)
    new = [p for _, p in current]
    if all(map(operator.is_, new, params)) and all(map(operator.eq, map(operator.attrgetter("dtype"), new), dtypes)) \
            and all(map(device.__eq__, map(operator.attrgetter("device"), new))):
        return None
    return new


def _outcome(check, *args):
    """None, the tensors (by identity), or the error's type and message."""
    try:
        found = check(*args)
    except (MonitorError, RuntimeError, AttributeError) as error:
        message = str(error)
        if message.startswith("the model's parameters changed"):
            message = message.split(";")[0]       # "... (now N, were M": the names that follow are not compared
        # LayersChanged (parameters added or removed) is the MonitorError the oracle raises, followed by the Follower
        return "MonitorError" if isinstance(error, MonitorError) else type(error).__name__, message
    return None if found is None else ("tensors", tuple(map(id, found)))


class _Holder(nn.Module):
    """A module with parameters of its own beside its children (as a root model often has)."""

    def __init__(self, rng: random.Random, depth: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        for i in range(rng.randrange(1, 4)):
            self.add_module(f"c{i}", _random_module(rng, depth + 1))


def _random_module(rng: random.Random, depth: int = 0) -> nn.Module:
    kind = rng.choice(["linear", "relu", "holder", "sequential"] if depth < 3 else ["linear", "relu"])
    if kind == "linear":
        return nn.Linear(2, 2, bias=rng.random() < 0.7)
    if kind == "relu":
        return nn.ReLU()
    if kind == "holder":
        return _Holder(rng, depth)
    return nn.Sequential(*[_random_module(rng, depth + 1) for _ in range(rng.randrange(1, 4))])


def _modules(model: nn.Module) -> list[nn.Module]:
    return list(model.modules())


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def _edit(model: nn.Module, rng: random.Random, kept: list) -> str:
    """One random change of ``model`` (or none); ``kept`` holds what a user would still hold."""
    modules, linears = _modules(model), _linears(model)
    kind = rng.choice(["none", "none", "replace", "reshape", "to_none", "add", "add_int", "delete",
                       "submodule", "drop_submodule", "inplace_dtype", "int_to_float", "double", "float",
                       "tie", "share", "move", "weight_norm", "unparametrize", "meta", "new_dict", "reorder",
                       "assign", "overwrite_double", "swap_double"])
    owner = rng.choice(modules)
    if kind == "replace" and linears:
        m = rng.choice(linears)
        m.weight = nn.Parameter(m.weight.detach().clone())
    elif kind == "reshape" and linears:
        m = rng.choice(linears)
        m.weight = nn.Parameter(torch.zeros(3, 2))
    elif kind == "to_none" and linears:
        rng.choice(linears).bias = None
    elif kind == "add":
        owner.register_parameter(f"extra{rng.randrange(99)}", nn.Parameter(torch.zeros(2)))
    elif kind == "add_int":
        owner.register_parameter(f"count{rng.randrange(99)}", nn.Parameter(torch.zeros(2, dtype=torch.long),
                                                                         requires_grad=False))
    elif kind == "delete" and owner._parameters:
        del owner._parameters[rng.choice(list(owner._parameters))]
    elif kind == "submodule" and owner._modules:
        owner._modules[rng.choice(list(owner._modules))] = nn.Linear(2, 2)
    elif kind == "drop_submodule" and owner._modules:
        kept.append(owner._modules.pop(rng.choice(list(owner._modules))) if rng.random() < 0.5 else None)
        owner.add_module(f"new{rng.randrange(99)}", nn.Linear(2, 2))    # often where the dropped one lay
    elif kind == "inplace_dtype" and linears:
        rng.choice(linears).weight.data = torch.zeros(2, 2, dtype=torch.float64)
    elif kind == "int_to_float":
        ints = [p for p in model.parameters() if not p.is_floating_point()]
        if ints:
            rng.choice(ints).data = torch.zeros(2)
    elif kind == "double":
        model.double()
    elif kind == "float":
        model.float()
    elif kind == "tie" and len(linears) > 1:
        a, b = rng.sample(linears, 2)
        if a.weight.shape == b.weight.shape and not parametrize.is_parametrized(a) \
                and not parametrize.is_parametrized(b):
            a.weight = b.weight
    elif kind in ("share", "move") and len(modules) > 2:
        child = rng.choice(modules[1:])
        below = set(map(id, child.modules()))
        target = rng.choice([m for m in modules if id(m) not in below])   # no cycle: torch's own walks recurse
        if kind == "move":
            for module in modules:
                for key, value in list(module._modules.items()):
                    if value is child:
                        del module._modules[key]
        target.add_module(f"{kind}{rng.randrange(99)}", child)
    elif kind == "weight_norm" and linears:
        m = rng.choice(linears)
        if not parametrize.is_parametrized(m) and m.weight.dtype == torch.float32:
            parametrizations.weight_norm(m)
    elif kind == "unparametrize":
        done = [m for m in modules if parametrize.is_parametrized(m, "weight")]
        if done:
            parametrize.remove_parametrizations(rng.choice(done), "weight")
    elif kind == "meta" and linears:
        rng.choice(linears).to("meta")
    elif kind == "new_dict":
        owner._parameters = dict(owner._parameters)
        owner._modules = dict(owner._modules)
    elif kind == "reorder" and len(owner._parameters) > 1:
        key = next(iter(owner._parameters))
        owner._parameters[key] = owner._parameters.pop(key)
    elif kind == "assign":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif kind in ("overwrite_double", "swap_double"):
        flag = (torch.__future__.set_overwrite_module_params_on_conversion if kind == "overwrite_double"
                else torch.__future__.set_swap_module_params_on_conversion)
        flag(True)
        try:
            model.to(rng.choice([torch.float64, torch.float32]))
        except RuntimeError:
            pass                                   # swap refused (a tensor with weak references): nothing changed
        finally:
            flag(False)
    else:
        return "none"
    return kind


def _attached(rng: random.Random):
    model = nn.Sequential(_random_module(rng), nn.Linear(2, 2)) if rng.random() < 0.3 else _Holder(rng, 0)
    named = model_checks._named(model)
    params = [p for _, p in named]
    return model, [n for n, _ in named], params, params[0].device, [p.dtype for p in params]


@pytest.mark.parametrize("seed", range(4), ids=lambda seed: f"seed{seed}")
def test_random_edits_are_followed_as_before(seed):
    """Random models (parameters of their own, nested Sequentials, shared modules, tied weights,
    parametrized weights) under 300 random edits: after each, the walk finds the same tensors in
    the same order as the recursive one, and the check returns the same (None, the same tensors,
    or the same error). A followed result is bound as the monitor would (its dtypes and device);
    after an error a new model is made, as a user would attach anew."""
    rng = random.Random(seed)
    kinds, outcomes = set(), set()
    model, names, params, device, dtypes = _attached(rng)
    kept: list = []
    for _ in range(300):
        kinds.add(_edit(model, rng, kept))
        assert list(map(id, _floating_parameters(model))) == list(map(id, _previous_walk(model)))
        expected = _outcome(_previous_replaced, model, names, params, device, dtypes)
        assert _outcome(replaced_parameters, model, names, params, device, dtypes) == expected
        outcomes.add(expected if expected is None else expected[0])
        if expected is not None and expected[0] == "tensors":
            params = replaced_parameters(model, names, params, device, dtypes)
            dtypes, device = [p.dtype for p in params], params[0].device
        elif expected is not None:
            model, names, params, device, dtypes = _attached(rng)
    assert len(kinds) > 20 and {None, "tensors", "MonitorError"} <= outcomes, (kinds, outcomes)


def test_a_module_met_again_deeper_is_where_the_recursive_walk_put_it():
    """A module that is the root's second child and also inside its first child's subtree is
    found at the deeper place (met first, depth first), once; a cycle back to the root ends."""
    shared = nn.Linear(2, 2)
    first = nn.Sequential(nn.Linear(2, 2), nn.Sequential(shared))
    model = nn.Sequential(first, shared, nn.Linear(2, 2))
    model.add_module("again", model)                           # a cycle: the root met again
    walked = _floating_parameters(model)
    assert list(map(id, walked)) == list(map(id, _previous_walk(model)))
    assert list(map(id, walked)) == [id(p) for _, p in model.named_parameters() if p.is_floating_point()]
    assert list(map(id, walked)).index(id(shared.weight)) == 2


def test_cpu_parameters_checked_by_is_cpu_as_by_their_device():
    params = [torch.zeros(2), torch.zeros(2)]
    cpu = torch.device("cpu")
    assert model_checks._all_on(params, cpu)
    assert not model_checks._all_on([params[0], torch.zeros(2, device="meta")], cpu)
    assert model_checks._all_on([torch.zeros(2, device="meta")], torch.device("meta"))
    assert not model_checks._all_on(params, torch.device("meta"))
