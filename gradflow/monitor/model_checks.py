"""What the monitor checks about the user's model: which parameters it watches, that they are
materialised, and whether they were replaced, converted or moved after it attached.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> names, params = zip(*monitored_parameters(model))   # MonitorError for meta or lazy parameters
    >>> names
    ('weight', 'bias')
    >>> replaced_parameters(model, list(names), list(params), torch.device("cpu")) is None   # unchanged
    True
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from gradflow.monitor.kinds import PARAMETRIZED, parameter_kinds, parametrized_owner
from gradflow.monitor.sharding import check_collective_safe, is_dtensor, reshard_stand_ins
from gradflow.monitor.tensors import MonitorError


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel, DataParallel or torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (itself, or inside DDP/DataParallel)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module)


def user_name(name: str) -> str:
    """The name a user knows a parameter by: a parametrized weight (``weight_norm``,
    ``spectral_norm``, ``orthogonal`` through ``torch.nn.utils.parametrize``) is listed by
    ``named_parameters()`` as ``fc.parametrizations.weight.original`` (``original0``,
    ``original1`` where the parametrization has several); it is ``fc.weight`` (``fc.weight.original0``).
    The model's own parametrized weight (``parametrizations.weight.original``) is ``weight``."""
    owner = parametrized_owner(name)
    if owner is None:
        return name
    tensor, _, original = name.rpartition(PARAMETRIZED[1:])[2].partition(".")
    base = f"{owner}.{tensor}" if owner else tensor
    return base if original == "original" else f"{base}.{original}"


def _named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(user_name(name), p) for name, p in model.named_parameters() if p.is_floating_point()]


_DTYPE, _DEVICE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("is_cpu")
_CPU = torch.device("cpu")


def _all_on(params: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every one of ``params`` is on ``device``; on the CPU read from ``is_cpu``, a bool,
    where ``.device`` makes a new ``torch.device`` to compare for each (12 parameters: 1.6 -> 0.9 us)."""
    if device == _CPU:
        return all(map(_IS_CPU, params))
    return all(map(device.__eq__, map(_DEVICE, params)))


def _floating_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of ``_named(model)``, in the same order, without their names: ``log()`` checks
    at every window whether they are still the monitored ones, and ``named_parameters()``
    builds a name and hashes a tensor per parameter (35 of the tutorial's 1,000 us window).
    The walk is ``named_parameters``' own: modules in pre-order, each once, each tensor once; a
    module's empty ``_parameters`` or ``_modules`` (a ReLU's, a leaf's) is not iterated.

    Tried for the tutorial's 12 modules (perf/logsplit.py, in place, process CPU time): a
    walk kept from the last window and checked in C (the ids and lengths of every module's
    ``_parameters`` and ``_modules``, the modules held weakly) cost 21.8 us in ``_follow``
    against 18.8-19.2 for this walk; a loop over a stack in place of a call per module, 15.6
    against 13.5 for the walk alone (6.7 -> 5.4 us isolated)."""
    out: list[torch.Tensor] = []
    seen_modules: set[int] = set()
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        seen_modules.add(id(module))
        parameters, children = module._parameters, module._modules
        if parameters:
            for p in parameters.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    if p.is_floating_point():
                        out.append(p)
        if children:
            for child in children.values():
                if child is not None and id(child) not in seen_modules:
                    visit(child)

    visit(model)
    return out


def monitored_parameters(model: nn.Module, stacklevel: int = 3) -> list[tuple[str, torch.Tensor]]:
    """(user's name, tensor) of every floating-point parameter; complex ones are named in a
    warning (not recorded; ``stacklevel`` points it at the user's call). MonitorError where there
    is none, or one is not materialised."""
    named = _named(model)
    complex_ = [name for name, p in model.named_parameters() if p.is_complex()]
    if complex_:
        warnings.warn(f"GradientMonitor: complex parameters are not recorded: {', '.join(complex_[:5])}"
                      f"{' ...' if len(complex_) > 5 else ''} (statistics are of real gradients); record "
                      "torch.view_as_real(p.grad) yourself if you need them", stacklevel=stacklevel)
    if not named:
        raise MonitorError(f"{type(model).__name__} has no floating-point parameters to monitor; attach to the "
                           "model that owns the trainable weights (layers kept in a plain list or dict are not "
                           "registered: use nn.ModuleList / nn.ModuleDict)")
    for name, p in named:
        _check_materialised(name, p)
    return named


def _check_materialised(name: str, p: torch.Tensor) -> None:
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise MonitorError(f"{name} is not initialised yet (a lazy module); run one forward pass before attaching")
    if p.is_meta:
        raise MonitorError(f"{name} is on the meta device; attach after model.to_empty(device=...) and "
                           "initialisation (or load_state_dict(..., assign=True))")


def _one_device(current: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
    """MonitorError if the parameters now lie on several devices (a part of the model moved)."""
    _check_materialised(*current[0])
    moved = next(((name, p.device) for name, p in current if p.device != current[0][1].device), None)
    if moved is not None:
        first, there = current[0]
        raise MonitorError(f"{moved[0]} is on {moved[1]} but {first} on {there.device} (the monitor attached on "
                           f"{device}); the monitor follows a model moved whole to one device: move every parameter")


def replaced_parameters(model: nn.Module, names: list[str], params: list[torch.Tensor],
                        device: torch.device, dtypes: list[torch.dtype] | None = None) -> list[torch.Tensor] | None:
    """The model's parameters if they replaced ``params`` (``load_state_dict(..., assign=True)``,
    ``to_empty()``, ``.double()`` or ``.to(device)`` under ``set_overwrite_module_params_on_conversion(True)``)
    with tensors of the same names and shapes, or if ``params`` changed dtype (from ``dtypes``)
    or device (from ``device``) in place (``.double()``, ``.to("cuda")``); None if nothing changed.
    MonitorError if they changed in a way a window's sums cannot follow: another shape, or parts
    of the model on different devices."""
    tensors = _floating_parameters(model)
    if len(tensors) == len(params) and all(map(operator.is_, tensors, params)):
        if (dtypes is None or all(map(operator.eq, map(_DTYPE, params), dtypes))) and _all_on(params, device):
            return None
        current = _named(model)
        _one_device(current, device)
        return [p for _, p in current]
    current = _named(model)
    if [name for name, _ in current] != names:
        current = _in_order(current, names) or current
    if [name for name, _ in current] != names:
        complex_ = [(user_name(name), p.dtype) for name, p in model.named_parameters()
                    if p.is_complex() and user_name(name) in names]
        if complex_:
            raise MonitorError(f"{', '.join(name for name, _ in complex_[:5])}{' ...' if len(complex_) > 5 else ''} "
                               f"became {complex_[0][1]} after the monitor attached: complex parameters are not "
                               "recorded (statistics are of real gradients); remove() this monitor, and record "
                               "torch.view_as_real(p.grad) yourself if you need them")
        raise LayersChanged(current, names, len(params))
    current = _sharded_again(model, current, params)
    for (name, p), q in zip(current, params):
        _check_materialised(name, p)
        if p.shape != q.shape:
            raise MonitorError(f"{name} was replaced by a tensor of another shape "
                               f"({tuple(q.shape)} {q.dtype} -> {tuple(p.shape)} {p.dtype}); "
                               "remove() this monitor and attach a new one after replacing parameters")
        _check_same_sharding(name, q, p)
    _one_device(current, device)
    new = [p for _, p in current]
    if all(map(operator.is_, new, params)) and (dtypes is None or all(map(operator.eq, map(_DTYPE, new), dtypes))) \
            and _all_on(new, device):
        return None              # the same tensors, listed in another order (a parametrization registered since)
    return new


class LayersChanged(MonitorError):
    """Parameters were added to the model or removed from it after the monitor attached (a layer
    appended or deleted, a head replaced by one of another name): ``current``, the model's
    parameters now (``_named``), ``added`` and ``gone`` their names. Followed by ``following.Follower``
    (the window goes on with those that stayed; the monitor takes the new set at the next window);
    raised as the MonitorError it is where it cannot be (no parameter left, sharded parameters)."""

    def __init__(self, current: list[tuple[str, torch.Tensor]], names: list[str], were: int) -> None:
        now = [name for name, _ in current]
        self.current = current
        had, has = set(names), set(now)
        self.added, self.gone = [n for n in now if n not in had], [n for n in names if n not in has]
        super().__init__(f"the model's parameters changed after the monitor attached (now {len(current)}, were {were}; "
                         f"{self.changes()})")

    def changes(self) -> str:
        """``new: a, b; gone: c`` (at most three names each)."""
        added, gone = self.added, self.gone
        return (f"new: {', '.join(added[:3]) or 'none'}{' ...' if len(added) > 3 else ''}; "
                f"gone: {', '.join(gone[:3]) or 'none'}{' ...' if len(gone) > 3 else ''}")


def _sharded_again(model: nn.Module, current: list[tuple[str, torch.Tensor]],
                   params: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``current`` with FSDP2's unsharded parameters put back to the monitored DTensors they stand for.

    Between a forward pass and its backward, FSDP2 registers each module's unsharded parameter (a
    plain tensor of the full shape) in place of the sharded DTensor, which it keeps and steps; a
    forward with no backward through that module (a GAN's discriminator step running the generator
    under ``detach()``, or the root module, which FSDP2 does not reshard after forward) leaves it so
    until the next backward. That is not a replacement to follow: the gradient the optimizer
    applies is still the DTensor's. Told by the tensors alone, not by an FSDP2 module in ``model``:
    a monitored submodule of an FSDP2 unit (``GradientMonitor(model.body)`` with ``fully_shard(model)``)
    holds none, its unit is an ancestor the monitor does not see (nothing else swaps a DTensor
    parameter for a plain one of its full shape)."""
    if not any(is_dtensor(q) for q in params):
        return current
    return [(name, q if p is not q and is_dtensor(q) and not is_dtensor(p) and p.shape == q.shape else p)
            for (name, p), q in zip(current, params)]


def _layout(t: torch.Tensor) -> tuple | None:
    """A DTensor's (mesh, placements); None for a plain tensor."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


def _check_same_sharding(name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """MonitorError where ``new`` replaced ``old`` with another sharding: the monitor's collectives
    (sharding.ShardLayout) are planned when it attaches, so a model sharded after attaching
    (``fully_shard`` or ``parallelize_module`` after ``GradientMonitor(model)``) would otherwise be
    read as this rank's local shards, or fail inside the optimizer's step."""
    before, after = _layout(old), _layout(new)
    if before == after:
        return
    say = {None: "a plain tensor"}
    # A monitored submodule of an FSDP2 unit attached after a forward with no backward held the unit's
    # unsharded stand-ins, which reshard_stand_ins cannot put back (the unit is an ancestor it does not see)
    stand_in = (" (or, attaching to a submodule of an FSDP2 module after a forward with no backward, it held FSDP2's "
                "unsharded stand-ins: call reshard() on that FSDP2 module before attaching)"
                if before is None and old.shape == new.shape else "")
    raise MonitorError(f"{name} was {say.get(before) or f'sharded as {before[1]}'} when the monitor attached and is now "
                       f"{say.get(after) or f'a DTensor sharded as {after[1]}'}: attach the monitor after sharding "
                       f"(fully_shard, parallelize_module), on every rank{stand_in}; remove() this monitor and attach "
                       "a new one")


def _in_order(current: list[tuple[str, torch.Tensor]], names: list[str]) -> list[tuple[str, torch.Tensor]] | None:
    """``current`` in the order of ``names`` where it holds the same names in another order:
    ``register_parametrization`` after attaching moves ``fc.weight`` (the same tensor, then
    ``fc.parametrizations.weight.original``) after ``fc.bias`` in ``named_parameters()``; None otherwise."""
    by_name = dict(current)
    if len(by_name) != len(current) or by_name.keys() != set(names):
        return None
    return [(name, by_name[name]) for name in names]


def attached_elsewhere(model: nn.Module, attached: Mapping[nn.Module, Any], monitor: Any = None) -> bool:
    """Whether a monitor other than ``monitor`` is attached to ``model``, or attaching now."""
    previous = attached.get(model)
    return previous is not None and previous is not monitor and (previous.attached or previous.attaching)


def already_attached(model: nn.Module) -> MonitorError:
    return MonitorError(f"this {type(model).__name__} already has a GradientMonitor attached; call .remove() on "
                        "that monitor (or GradientMonitor.detach(model)) before attaching another")


def check_attach(model, attached: Mapping[nn.Module, Any], *, members: int, activations_every: int,
                 through_time_every: int, history_length: int | None, histogram_every: int,
                 optimizer: Any = None, switches: Mapping[str, Any] | None = None,
                 ) -> tuple[nn.Module, list[tuple[str, torch.Tensor]]]:
    """The user's module inside ``model`` (``unwrap``) and its monitored parameters, once
    GradientMonitor's arguments are checked; ``attached``: the monitor already on each module,
    if any; ``switches``: the bool arguments by name. Warns if ``optimizer`` holds none of them
    (``say_foreign_optimizer``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        MonitorError: a TorchScript module (``check_not_scripted``), a monitor still attached to
            it, a wrapper whose gradients are not full ones (``sharding.check_collective_safe``), no
            parameter or one not materialised, bad ``members``, ``activations_every``,
            ``through_time_every``, ``history_length`` or ``histogram_every``, an ``optimizer`` that
            is not one, a switch that is not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"GradientMonitor needs an nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    check_not_scripted(inner)
    if attached_elsewhere(inner, attached):
        raise already_attached(inner)
    check_collective_safe(model)
    reshard_stand_ins(inner)          # FSDP2's unsharded stand-ins after an evaluation pass: its DTensors back
    named = monitored_parameters(inner, stacklevel=4)
    check_members(named, members)
    check_positive("activations_every", activations_every, "1: every step")
    check_positive("through_time_every", through_time_every, "1: every step")
    check_positive("histogram_every", histogram_every, "1: every step")
    check_positive("history_length", history_length, "None: keep every window", none=True)
    check_optimizer(optimizer, "GradientMonitor(optimizer=)")
    say_foreign_optimizer(optimizer, inner, named, stacklevel=4)
    for name, switch in (switches or {}).items():
        check_switch(name, switch)
    return inner, named


def check_not_scripted(model: nn.Module) -> None:
    """MonitorError where ``model``, or a module in it that holds parameters, is a TorchScript
    module (``torch.jit.trace`` or ``torch.jit.script``): it takes no hooks, and its forward runs as
    a graph. A parameter-free one (a scripted activation) is left alone: nothing hooks it."""
    name = next((name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)
                 and (not name or next(m.parameters(), None) is not None)), None)
    if name is not None:
        what = f"module {name}" if name else f"the model ({type(model).__name__})"
        raise MonitorError(f"{what} is a TorchScript module (torch.jit.trace or torch.jit.script): it takes no hooks "
                           "and its forward runs as a graph the monitor cannot see into; attach to the eager model "
                           "before scripting it (torch.compile is followed)")


def monitored_kinds(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Each monitored parameter's kind of module (``kinds.parameter_kinds``) under the user's name
    for it; ``other`` where none is known."""
    kinds = {user_name(name): kind for name, kind in parameter_kinds(model).items()}
    return {name: kinds.get(name, "other") for name in names}


def check_members(named: list[tuple[str, torch.Tensor]], members: int) -> None:
    check_positive("members", members)
    if members == 1:
        return
    for name, p in named:
        if p.dim() == 0 or p.shape[0] != members:
            raise MonitorError(f"members={members} needs every parameter stacked on a leading dimension of "
                               f"{members}; {name} has shape {tuple(p.shape)}")


def say_foreign_optimizer(optimizer: Any, model: nn.Module, named: list[tuple[str, torch.Tensor]],
                          stacklevel: int = 3) -> None:
    """Warn when GradientMonitor's ``optimizer=`` (checked: ``check_optimizer``) holds none of
    ``named``: nothing is recorded until it does, and ``log()`` would blame a hand-written update."""
    if optimizer is None:
        return
    ours = {id(p) for _, p in named}
    if not any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
        warnings.warn(f"GradientMonitor: optimizer={type(optimizer).__name__} holds none of this "
                      f"{type(model).__name__}'s parameters: nothing is recorded until it does (pass the optimizer "
                      "that steps this model, or leave optimizer out to watch every one)", stacklevel=stacklevel)


def check_optimizer(optimizer: Any, where: str) -> None:
    """MonitorError unless ``optimizer`` is None or an optimizer: a ``torch.optim.Optimizer``, or a
    wrapper with ``param_groups`` as torch's (Lightning's ``LightningOptimizer``). ``where``
    names the argument in the one-line message."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return
    groups = getattr(optimizer, "param_groups", None) if not isinstance(optimizer, nn.Module) else None
    if not (isinstance(groups, list) and all(isinstance(group, dict) and "params" in group for group in groups)):
        raise MonitorError(f"{where} must be a torch.optim.Optimizer (or a wrapper of one with its param_groups) "
                           f"or None, got {type(optimizer).__name__} {_short(optimizer)}")


def check_record(optimizer: Any, skipped: Any) -> None:
    """``GradientMonitor.record``'s arguments: MonitorError unless ``optimizer`` is None or an
    optimizer (``check_optimizer``) and ``skipped`` a bool (``check_switch``)."""
    check_optimizer(optimizer, "record(optimizer)")
    check_switch("record(skipped=)", skipped)


def check_switch(name: str, value: Any) -> None:
    """MonitorError unless ``value`` is a bool (numpy's too): a string such as ``"no"`` would
    read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise MonitorError(f"{name} must be True or False, got {_short(value)}")


def check_entered(attached: bool) -> None:
    """MonitorError at ``with monitor:`` on a monitor that no longer records: leaving a ``with``,
    ``remove()`` and ``GradientMonitor.detach(model)`` took its hooks off for good, and its body
    would train unrecorded (``log()`` only warns then, once the training is spent)."""
    if not attached:
        raise MonitorError("with monitor: this GradientMonitor was removed (remove(), an earlier with block, or "
                           "GradientMonitor.detach) and records nothing; attach a new one: "
                           "with GradientMonitor(model) as monitor:")


def check_step(step: Any) -> int:
    """``step`` as a Python int, or a MonitorError unless it is an int >= 0 that fits an int64
    (numpy and 0-d torch integers too; not bool): ``log(step)``'s x-axis position, an epoch or
    a global step."""
    if not isinstance(step, bool):
        try:
            value = operator.index(step)
        except TypeError:
            value = -1
        if 0 <= value < 2 ** 63:                 # TensorBoard's step is an int64
            return value
    raise MonitorError(f"log(step): step must be an int >= 0 (an epoch or a global step, TensorBoard's x axis), "
                       f"got {_short(step)}")


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def check_positive(name: str, value, meaning: str = "", none: bool = False,
                   error: type[Exception] = MonitorError) -> int | None:
    """``value`` as a Python int (None where ``none`` and it is None), or ``error`` (MonitorError
    by default) unless it is a positive integer: an int or a numpy integer (a count read from an
    array or a config), never a bool or a float. The one-line message names ``name``, what is
    accepted and ``meaning``. gradflow's one positive-int check: the callbacks pass
    ``error=ValueError``, the CLI ``ConfigError``."""
    if none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        accepted = "a positive int" + (" or None" if none else "") + (f" ({meaning})" if meaning else "")
        raise error(f"{name} must be {accepted}, got {value!r}")
    return int(value)
