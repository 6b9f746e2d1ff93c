"""Watches the torch calls that decide what a step applies but offer no hook of their own.

- ``GradScaler.step`` skips ``optimizer.step()`` when a gradient overflowed (so no optimizer
  hook runs on exactly the step an AMP user needs to see); ``GradScaler.unscale_`` (by hand, or
  inside ``step``; a fused optimizer's step, which unscales inside itself, at ``step``) tells
  that a clipping call before it saw the gradients scaled;
- gradient clipping changes the gradient before the optimizer applies it, so the norm before
  clipping is seen only here. All three of torch's clipping paths are watched:

  ================================================  =========================================
  call                                              norm before clipping; clipped when
  ================================================  =========================================
  ``torch.nn.utils.clip_grad_norm_``                the norm it returns; ``total + 1e-6 >
                                                    max_norm`` (torch scales by
                                                    ``min(max_norm / (total + 1e-6), 1)``)
  ``torch.nn.utils.clip_grads_with_norm_`` (after   the ``total_norm`` it is given; as above.
  ``get_total_norm``: accelerate >= 1.10 and the    Several calls with the same ``total_norm``
  Hugging Face Trainer clip this way)               tensor (one per device mesh) count once
  ``torch.nn.utils.clip_grad_value_``               the L2 norm of the gradients it clips,
                                                    taken before it clamps; any ``|g|`` above
                                                    ``clip_value``
  ================================================  =========================================

  The norm told is always the L2 norm (the monitor's ``total_norm`` is one, and the verdict
  divides one by the other): clipping by another norm (``norm_type=1``, ``inf``) has the L2
  norm of the gradients it clips taken before it, one more pass over them; the clip decision is
  the call's own norm's. ``clip_grads_with_norm_``'s ``total_norm`` counts as an L2 norm only
  where every ``get_total_norm`` call (in this thread) since the last new ``total_norm`` was an
  L2 one; else (a norm made by hand, as accelerate's ``clip_grad_norm_(norm_type=0)`` does, or
  one by another norm) the L2 norm is taken as above. A ``total_norm`` made by hand after an
  L2 ``get_total_norm`` whose result was only logged is still taken as the L2 norm.

  A call over more gradients than a monitor watches (another model's too) tells that monitor
  the L2 norm of its own ones, taken before the call (``Clipping.scope``): the window divides
  it by the norm of those same gradients after the step. ``clip_grads_with_norm_`` calls that
  share one ``total_norm`` (one per device mesh), where one holds the monitor's gradients alone
  and another holds others' too, cannot be told apart at the first call: a warning says so.

  A clip before ``scaler.unscale_`` (by hand after the clip, the one inside ``GradScaler.step``,
  or a fused optimizer's own) saw the gradients multiplied by the scale: the step's norm is
  divided by it, and a warning says so. A clipping call inside a ``torch.compile``d function
  runs eagerly (``_eager_under_compile``). Each watching monitor gathers one step's calls into
  one (``clipping.py``).

  ``get_total_norm`` alone (a norm that is only logged) is not clipping and is not counted.

While at least one monitor is attached, these are wrapped: the wrapper calls torch's own
function unchanged and then tells each attached monitor what happened. The last monitor to
detach restores torch's functions. Nothing is added to the user's model, optimizer or scaler.
Threads: attaching and detaching take a lock (a monitor attaching while the last one leaves in
another thread finds the wrappers installed), the wrappers read a tuple of monitors replaced
whole, and torch's functions, once taken, are kept: a call already inside a wrapper when the
last monitor leaves still runs torch's own function.

Code that imported a clipping function by name before a monitor attached (``from
torch.nn.utils import clip_grad_norm_`` at import time) keeps torch's original and is not
seen; Lightning, accelerate and the Hugging Face Trainer look them up at call time.

Example:
    >>> import torch
    >>> from gradflow import GradientMonitor
    >>> model = torch.nn.Linear(3, 1)
    >>> with GradientMonitor(model, None) as monitor:     # watch(monitor) on attach
    ...     model(torch.ones(2, 3)).sum().backward()      # every gradient 2.0: norm sqrt(4 * 4) = 4
    ...     norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    ...     torch.optim.SGD(model.parameters(), lr=0.1).step()
    ...     _ = monitor.log(0)
    >>> overall = monitor.history[-1].overall
    >>> overall["clipped_steps"], round(overall["total_norm_before_clip"], 6)
    (1, 4.0)
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad
from torch.amp.grad_scaler import GradScaler, OptState

from gradflow.monitor.stats import wide_dtype

_LOCK = threading.Lock()                # attach and detach: install and uninstall as one step
_WATCHERS: weakref.WeakSet[Any] = weakref.WeakSet()
_TOLD: tuple = ()                       # weak references to _WATCHERS, replaced whole: what the wrappers read
_ORIGINAL: dict[str, Any] = {}          # torch's functions, kept once taken (see the module docstring)
_INSTALLED: list[bool] = [False]
# The total_norm tensor of the last clip_grads_with_norm_ call and the monitors that counted it:
# a caller that clips each device mesh's parameters in turn passes the same tensor each time.
# Its norm_type: 2.0, or None where the total_norm is not known to be an L2 norm (_given_norm_type).
# The monitors told it (counted) or told their own gradients' norm instead (owned: _own_before).
_LAST_TOTAL: dict[str, Any] = {"total": None, "counted": weakref.WeakSet(), "owned": weakref.WeakSet(),
                               "norm_type": 2.0}
_NORM_TYPES = threading.local()         # .seen: the norm_types of get_total_norm calls since the last clip

# (name in torch.nn.utils, also in torch.nn.utils.clip_grad) for each wrapped function: the three
# clipping paths, and get_total_norm for the norm_type that clip_grads_with_norm_ is given.
_CLIPPERS = {"clip_grad_norm_": True, "clip_grad_value_": True, "clip_grads_with_norm_": False,
             "get_total_norm": False}


def watch(monitor: Any) -> None:
    """Start telling ``monitor`` about clipping (``Intercepted.clip``) and skipped steps (``Intercepted.skipped``)."""
    global _TOLD
    with _LOCK:
        _WATCHERS.add(monitor)
        _TOLD = tuple(weakref.ref(m) for m in _WATCHERS)
        if not _INSTALLED[0]:
            _install()


def unwatch(monitor: Any) -> None:
    """Stop telling ``monitor``; restore torch's functions when no monitor is left."""
    global _TOLD
    with _LOCK:
        _WATCHERS.discard(monitor)
        _TOLD = tuple(weakref.ref(m) for m in _WATCHERS)
        if not _WATCHERS and _INSTALLED[0]:
            _uninstall()


def _watchers() -> list[Any]:
    """The attached monitors, as of the last attach or detach (a wrapper's view)."""
    return [m for m in (ref() for ref in _TOLD) if m is not None]


def found_inf(scaler: GradScaler | None, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler`` found an inf/NaN in ``optimizer``'s gradients this iteration (so it
    will skip, or skipped, the step). False without a scaler, a disabled one, or before
    ``unscale_``. Reads one flag per device back to the host (``GradScaler.step`` does too)."""
    if scaler is None or not scaler.is_enabled():
        return False
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    return bool(sum(v.item() for v in state.get("found_inf_per_device", {}).values()))


class ClipTally:
    """A window's clipping calls, each step's gathered into one by ``clipping.Clipping``: how many,
    and on the device the sum of the norms before clipping and how many of them clipped (see the
    module docstring for each path); both again over those whose norm was finite, and how many
    were not (``FIELDS``): a call made for a step that a GradScaler then skipped found an inf/NaN
    norm."""

    FIELDS = ("norm_sum", "clipped", "finite_norm_sum", "finite_clipped", "nonfinite_calls")

    def __init__(self) -> None:
        self.calls = 0
        self.sums: torch.Tensor | None = None      # FIELDS, on the gradients' device

    def add(self, total: torch.Tensor, clipped: torch.Tensor) -> None:
        """Count one call: ``total`` the norm before clipping, ``clipped`` whether it changed a
        gradient (0-d tensors on the gradients' device; nothing is read back to the host)."""
        total = total.detach()
        if hasattr(clipped, "full_tensor"):       # a DTensor norm's comparison (sharded models): read whole
            clipped = clipped.full_tensor()
        if hasattr(total, "full_tensor"):          # a DTensor norm of sharded gradients: its full value,
            total = total.full_tensor()            # one collective, inside a clip call every rank makes
        if self.sums is None:
            self.sums = torch.zeros(len(self.FIELDS), device=total.device, dtype=wide_dtype(total.device))
        elif self.sums.device != total.device:     # the model moved (model.to): the window's sums go with it
            self.move(total.device)
        pair = torch.stack([total.to(self.sums.dtype), clipped.to(self.sums)])
        finite = total.isfinite()
        self.sums.add_(torch.cat([pair, torch.where(finite, pair, 0.0), (~finite).to(self.sums).view(1)]))
        self.calls += 1

    def move(self, device: torch.device) -> None:
        """Carry the sums to ``device`` (a new tensor there)."""
        if self.sums is not None:
            self.sums = self.sums.to(device=device, dtype=wide_dtype(device), copy=True)


def _install() -> None:
    for name, in_module in _CLIPPERS.items():
        if hasattr(torch.nn.utils, name):            # clip_grads_with_norm_: torch >= 2.6
            if getattr(torch.nn.utils, name) is not _WRAPPERS[name]:     # still ours if someone wrapped us
                _ORIGINAL[name] = getattr(torch.nn.utils, name)
            setattr(torch.nn.utils, name, _WRAPPERS[name])
            if in_module:
                setattr(torch.nn.utils.clip_grad, name, _WRAPPERS[name])
    for name, wrapper in _SCALER_METHODS.items():
        if GradScaler.__dict__[name] is not wrapper:
            _ORIGINAL[name] = GradScaler.__dict__[name]
        setattr(GradScaler, name, wrapper)
    _INSTALLED[0] = True


def _uninstall() -> None:
    # Only put back what is still ours: someone else may have wrapped it after us.
    for name, in_module in _CLIPPERS.items():
        for namespace in (torch.nn.utils, torch.nn.utils.clip_grad) if in_module else (torch.nn.utils,):
            if name in _ORIGINAL and getattr(namespace, name, None) is _WRAPPERS[name]:
                setattr(namespace, name, _ORIGINAL[name])
    for name, wrapper in _SCALER_METHODS.items():
        if GradScaler.__dict__.get(name) is wrapper:
            setattr(GradScaler, name, _ORIGINAL[name])
    _INSTALLED[0] = False                            # _ORIGINAL is kept: a call may be inside a wrapper
    _LAST_TOTAL["total"] = None


def _as_list(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _own_before(params: list[torch.Tensor]) -> tuple[dict[Any, tuple[list[torch.Tensor], Any]], set[int]]:
    """Before a clipping call over ``params``: for each watching monitor whose parameters are only
    part of the gradients the call clips (another model's are in it too), its own parameters there
    and the L2 norm of their gradients, taken before the call changes them; for one that watches
    none of them while the call clips gradients, ([], None). Empty in the common case (the call
    clips the monitor's gradients only: ``clip_scope`` is None). Also the ids of ``params``, made
    once for every monitor's look."""
    if not _TOLD:
        return {}, set()
    ids = {id(p) for p in params}
    own = {}
    for monitor in _watchers():
        scope = monitor.clip_scope(params, ids)
        if scope:
            with torch.no_grad():
                own[monitor] = (scope, _total_norm([p.grad for p in scope], 2.0))
        elif scope is not None:
            own[monitor] = ([], None)
    return own, ids


def _tell(params: list[torch.Tensor], total: torch.Tensor, clipped: torch.Tensor, skip=(), own=None,
          ids: set[int] | None = None) -> list[Any]:
    """Tell each watching monitor (but those in ``skip``); return those that counted the call.
    A monitor in ``own`` (``_own_before``) is told its own parameters and their norm instead.
    Inference mode off: a monitor's sums made during a call under it must stay writable."""
    own = own or {}
    told = []
    with torch.inference_mode(False):
        for monitor in _watchers():
            if monitor in skip:
                continue
            its_params, its_total = own.get(monitor, (params, total))
            if its_params and monitor.clip(its_params, its_total, clipped,      # [] : none of its own
                                               ids if its_params is params else None):
                told.append(monitor)
    return told


def _clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                     *args, **kwargs):
    params = _as_list(parameters)
    own, ids = _own_before(params)
    l2 = _l2_before(params, norm_type)
    total = _ORIGINAL["clip_grad_norm_"](params, max_norm, norm_type, *args, **kwargs)
    _tell(params, total if l2 is None else l2, total.detach() + 1e-6 > float(max_norm), own=own, ids=ids)
    return total


def _get_total_norm(tensors, norm_type: float = 2.0, *args, **kwargs):
    # The norms that the next clip_grads_with_norm_ may be given (its total_norm is often made from
    # them: accelerate and the Trainer stack one per device mesh): their norm_types since the last.
    _NORM_TYPES.seen = getattr(_NORM_TYPES, "seen", frozenset()) | {float(norm_type)}
    return _ORIGINAL["get_total_norm"](tensors, norm_type, *args, **kwargs)


def _l2_before(params: list[torch.Tensor], norm_type: float | None) -> torch.Tensor | None:
    """The L2 norm of ``params``' gradients where clipping goes by another norm, or by a norm not
    known to be L2 (None), and a monitor watches (taken before the call clips them); None where the
    call's own norm is the L2 one."""
    if (norm_type is not None and float(norm_type) == 2.0) or not _TOLD:
        return None
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    with torch.no_grad():
        return _total_norm(grads, 2.0)


def _given_norm_type(total_norm: Any) -> float | None:
    """The norm_type of the ``total_norm`` a clip_grads_with_norm_ call is given: 2.0 where every
    get_total_norm call since the last new ``total_norm`` was an L2 one (the same tensor again,
    the next device mesh of one clip, keeps its answer); else None: not known to be the L2 norm
    (made by hand, as accelerate's ``norm_type=0``, or after a get_total_norm by another norm)."""
    last = _LAST_TOTAL["total"]
    if last is not None and last() is total_norm:
        return _LAST_TOTAL["norm_type"]
    seen, _NORM_TYPES.seen = getattr(_NORM_TYPES, "seen", frozenset()), frozenset()
    return 2.0 if seen == {2.0} else None


def _clip_grads_with_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                           total_norm: torch.Tensor, *args, **kwargs):
    params = _as_list(parameters)
    norm_type = _given_norm_type(total_norm)
    own, ids = _own_before(params)
    l2 = _l2_before(params, norm_type)
    result = _ORIGINAL["clip_grads_with_norm_"](params, max_norm, total_norm, *args, **kwargs)
    total = torch.as_tensor(total_norm).detach()
    clipped = total + 1e-6 > float(max_norm)
    last = _LAST_TOTAL["total"]
    if last is None or last() is not total_norm:      # a new clip, not the next mesh of the same one
        _LAST_TOTAL.update(total=weakref.ref(total_norm) if isinstance(total_norm, torch.Tensor) else None,
                           counted=weakref.WeakSet(), owned=weakref.WeakSet(), norm_type=norm_type)
    if l2 is not None:      # not the L2 norm: each call's own L2 norm, the step adds its groups (clipping.py)
        _tell(params, l2, clipped, own=own, ids=ids)
        return result
    counted, owned = _LAST_TOTAL["counted"], _LAST_TOTAL["owned"]
    for monitor in own:     # the total holds others' gradients: a monitor that was told it earlier was misled
        if monitor in counted:
            monitor.mixed_meshes()
    # A monitor told its own parameters' norm: at each call, added up the same way (clipping.py).
    owned.update(_tell(params, total, clipped, skip=set(_watchers()) - set(own) | set(counted), own=own))
    for monitor in _tell(params, total, clipped, skip=set(counted) | set(own) | set(owned), ids=ids):
        counted.add(monitor)
    for monitor in owned:   # told its own norm earlier, now a call over its gradients alone: not added
        if monitor not in own and any(p.grad is not None for p in params):
            monitor.mixed_meshes()
    return result


def _clip_grad_value_(parameters: torch.Tensor | Iterable[torch.Tensor], clip_value: float, *args, **kwargs):
    params = _as_list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    told = bool(grads and _TOLD)                # the same answer before and after torch's call
    if told:
        own, ids = _own_before(params)
        with torch.no_grad():       # before clamping: the L2 norm and the largest |g|
            total = _total_norm(grads, 2.0)
            clipped = _largest(grads) > float(clip_value)
    result = _ORIGINAL["clip_grad_value_"](params, clip_value, *args, **kwargs)
    if told:
        _tell(params, total, clipped, own=own, ids=ids)
    return result


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type`` norm of all ``grads`` as one vector, on the first one's device."""
    if hasattr(torch.nn.utils.clip_grad, "_get_total_norm"):     # torch >= 2.6, foreach per device
        return torch.nn.utils.clip_grad._get_total_norm(grads, norm_type)
    first = grads[0].device
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type).to(first) for g in grads]),
                                    norm_type)


def _largest(grads: list[torch.Tensor]) -> torch.Tensor:
    """The largest |g| over ``grads`` (0-d, on the first one's device; 0 where every one is empty).
    Each tensor's local values, empty ones left out (torch's infinity norm raises on an empty
    tensor, and an uneven FSDP2 shard is one: ``clip_grad_value_`` clamps it fine), then for
    sharded gradients one MAX over each device mesh (a ``Partial("max")`` DTensor read whole), so
    every rank runs the same collectives whatever its shard. Replicated dims hold copies: a MAX
    over them is the same value."""
    meshes: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        mesh = getattr(g, "device_mesh", None) if hasattr(g, "to_local") else None
        local = g.to_local() if mesh is not None else g
        meshes.setdefault(mesh, [])
        if local.numel():
            meshes[mesh].append(local)
    first = grads[0].device
    largest = []
    for mesh, locals_ in meshes.items():
        value = (_total_norm(locals_, math.inf).to(first) if locals_
                 else torch.zeros((), device=first, dtype=grads[0].dtype))
        if mesh is not None:
            from torch.distributed.tensor import DTensor, Partial

            value = DTensor.from_local(value.to(locals_[0].device if locals_ else first), mesh,
                                       [Partial("max")] * mesh.ndim).full_tensor().to(first)
        largest.append(value)
    return torch.stack(largest).max()


def _eager_under_compile(fn: Any, like: Any = None) -> Any:
    """``fn`` (named and documented as ``like``) run eagerly where torch.compile traces its caller:
    a graph break, as ``torch._dynamo.disable`` makes, since the monitors' bookkeeping is plain
    Python that dynamo cannot trace (it raised out of a compiled function that clips). In eager
    code, ``fn`` itself, behind one check."""
    disabled = torch._dynamo.disable(fn)

    def wrapper(*args, **kwargs):
        if _is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return functools.wraps(like if like is not None else fn)(wrapper)


_is_compiling = torch.compiler.is_compiling
_WRAPPERS = {
    "clip_grad_norm_": _eager_under_compile(_clip_grad_norm_, torch.nn.utils.clip_grad.clip_grad_norm_),
    "clip_grad_value_": _eager_under_compile(_clip_grad_value_, torch.nn.utils.clip_grad.clip_grad_value_),
    "clip_grads_with_norm_": _eager_under_compile(_clip_grads_with_norm_,
                                                  getattr(torch.nn.utils, "clip_grads_with_norm_", None)),
    "get_total_norm": _eager_under_compile(_get_total_norm, getattr(torch.nn.utils, "get_total_norm", None)),
}


def _scaler_unscale(self: GradScaler, optimizer: torch.optim.Optimizer):
    # By hand or inside GradScaler.step (where no unscale_ came first).
    _tell_scaled(self, optimizer)
    return _ORIGINAL["unscale_"](self, optimizer)


def _tell_scaled(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler`` is about to unscale ``optimizer``'s gradients: where they are still scaled, tell
    each watching monitor (a clipping call of this step before now saw them scaled)."""
    watchers = _watchers()
    if watchers and scaler.is_enabled() and scaler._scale is not None and _still_scaled(scaler, optimizer):
        with torch.inference_mode(False):
            for monitor in watchers:
                monitor.scaled_step(optimizer, scaler._scale)


def _scaler_step(self: GradScaler, optimizer: torch.optim.Optimizer, *args, **kwargs):
    fused = getattr(optimizer, "_step_supports_amp_scaling", False)
    if fused:                                # unscales in its step, no unscale_
        _tell_scaled(self, optimizer)
    result = _ORIGINAL["step"](self, optimizer, *args, **kwargs)
    watchers = _watchers()
    # a fused optimizer's step ran all the same: its pre-hook read found_inf and counted the skip (steps.StepWatch)
    if not fused and self.is_enabled() and watchers and found_inf(self, optimizer):
        with torch.inference_mode(False):
            for monitor in watchers:
                monitor.skipped(optimizer)
    return result


def _still_scaled(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s gradients are still multiplied by the scale (no ``unscale_`` since
    its last step). The stage is read, not made (``.get``)."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is None or state["stage"] is OptState.READY


_SCALER_METHODS = {"step": _eager_under_compile(_scaler_step, GradScaler.step),
                   "unscale_": _eager_under_compile(_scaler_unscale, GradScaler.unscale_)}
