"""Which parameters an optimizer step applies a gradient to, and when that gradient is final.

The monitor records once per optimizer step, the gradient that step applies:

- ``optimizer.step()``: the step pre-hook runs after backward, accumulation, the DDP
  all-reduce and ``GradScaler.unscale_``: ``.grad`` is final there.
- ``optimizer.step(closure)`` (Lightning's default, LBFGS): the pre-hook runs *before* the
  closure's forward and backward, so ``.grad`` still holds the previous step's gradient. The
  pre-hook hands the optimizer a wrapped closure that records right after the closure's first
  call in the step (LBFGS calls it again for its line search; the first call's gradient is the
  one its step starts from). A step that never calls its closure records as it ends (the
  gradient the loop's own backward left, which it applied).
- Only the parameters in the stepping optimizer's ``param_groups`` are recorded (a GAN's two
  optimizers each record their own network), re-read whenever the groups change
  (``add_param_group`` after the first step).
- A wrapper's step and the inner steps it makes are one training step. Where the wrapper holds
  an inner optimizer over the same parameters as an attribute (Lookahead, SAM, one rank's
  ZeroRedundancyOptimizer), the inner step records, after the inner optimizer's own pre-hooks
  (a hook there that rescales ``.grad`` runs after the wrapper's hooks); otherwise the
  wrapper's step records and the inner steps over unchanged gradients are not counted again.

Example:
    >>> import torch
    >>> body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    >>> index = {id(p): i for i, p in enumerate([*body.parameters(), *head.parameters()])}
    >>> masks = OptimizerMasks(len(index), lambda: index, lambda optimizer: False)   # id(param) -> monitor's index
    >>> masks.mask(torch.optim.SGD(head.parameters(), lr=0.1))   # a tuple of bools, ALL, or None
    (False, False, True, True)
    >>> masks.mask(torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1))
    'all'
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.amp.grad_scaler import OptState
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

ALL = "all"      # OptimizerMasks.mask: the optimizer steps every monitored parameter


class OptimizerMasks:
    """Per optimizer: which of the monitor's parameters its ``param_groups`` hold, cached until
    the groups change (a group added, a list replaced, resized or edited in place). On a miss that finds none of
    them, or a floating-point tensor besides them that the monitor does not know (a parameter
    replaced by a new one of the same shape: ``model[0].weight = nn.Parameter(...)``, then a new
    optimizer or a group added), ``refresh(optimizer)`` may rebind the monitor to replaced
    parameters (True if it did), or say that the optimizer holds tensors the model replaced:
    checked once per change of the groups, not at every step."""

    def __init__(self, count: int, index_of: Callable[[], dict[int, int]], refresh: Callable[[Any], bool]) -> None:
        self._count = count
        self._index_of = index_of            # called afresh: the monitor may rebind parameters
        self._refresh = refresh
        # id(optimizer) -> (weak reference to it, groups key, mask, the groups' parameters then
        # (_held: the optimizer holds them too)): a plain dict read at every step (a
        # WeakKeyDictionary makes a weak reference per lookup); the reference tells a reused id
        # and drops the entry when the optimizer dies (entry_ref).
        self._cache: dict[int, tuple] = {}

    def mask(self, optimizer: torch.optim.Optimizer) -> tuple[bool, ...] | str | None:
        """The optimizer's parameters as a mask over the monitor's; ``ALL`` if it holds every one
        (the common case, which records without a mask), None if it holds none."""
        return self.keyed(optimizer)[1]

    def keyed(self, optimizer: torch.optim.Optimizer) -> tuple[tuple, tuple[bool, ...] | str | None]:
        """(the groups' key it was found for, ``mask(optimizer)``): the key tells a later reader
        whether the groups changed since (a pre-hook of the user's may add a group)."""
        key = _groups_key(optimizer)
        cached = self._cache.get(id(optimizer))
        if cached is not None and cached[1] == key and cached[0]() is optimizer and _same_params(optimizer, cached[3]):
            return key, cached[2]
        mask, foreign = self._compute(optimizer)
        if (mask is None or foreign) and self._refresh(optimizer):   # a tensor it holds may have replaced a
            mask = self.compute(optimizer)                   # monitored one (model[0].weight = Parameter(...))
        self._cache[id(optimizer)] = (entry_ref(self._cache, id(optimizer), optimizer), key, mask, _held(optimizer))
        return key, mask

    def compute(self, optimizer: torch.optim.Optimizer) -> tuple[bool, ...] | str | None:
        return self._compute(optimizer)[0]

    def _compute(self, optimizer: torch.optim.Optimizer) -> tuple[tuple[bool, ...] | str | None, bool]:
        """(the mask, whether the optimizer holds a floating-point tensor that is not monitored:
        one that may have replaced a monitored parameter, or another model's)."""
        index_of = self._index_of()
        flags = [False] * self._count
        foreign = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                index = index_of.get(id(p))
                if index is not None:
                    flags[index] = True
                elif not foreign and isinstance(p, torch.Tensor) and p.is_floating_point():
                    foreign = True
        if all(flags):
            return ALL, foreign
        return (tuple(flags) if any(flags) else None), foreign

    def forget(self) -> None:
        self._cache.clear()


def entry_ref(cache: dict, key: int, obj: Any) -> weakref.ref:
    """A weak reference to ``obj``, the first item of ``cache[key]``, that removes that entry
    when ``obj`` dies (Python runs the callback before its memory, and so its id, can be reused).
    No sweep over the cache for dead entries: every monitor's cache sees every optimizer's step,
    and a sweep iterating it while a step in another thread added an entry raised "dictionary
    changed size during iteration" in that thread's ``optimizer.step()``."""
    def drop(ref: weakref.ref) -> None:
        if cache.get(key, (None,))[0] is ref:     # else a newer entry's (the groups changed)
            cache.pop(key, None)

    return weakref.ref(obj, drop)


def _groups_key(optimizer: torch.optim.Optimizer) -> tuple:
    # The groups' count and each group's list identity and length: cheap, and any change to
    # which parameters an optimizer holds changes one of them (add_param_group, a new list).
    groups = optimizer.param_groups
    if len(groups) == 1:                     # the common case, read at every step: no list to build
        params = groups[0]["params"]
        return id(params), len(params)
    return tuple([(id(g["params"]), len(g["params"])) for g in groups])


def _held(optimizer: torch.optim.Optimizer) -> tuple:
    """Each group's parameters as they are now (the tensors themselves, compared by identity)."""
    return tuple([tuple(group["params"]) for group in optimizer.param_groups])


def _same_params(optimizer: torch.optim.Optimizer, held: tuple) -> bool:
    """Whether each group holds the tensors ``held`` (``_held``) found, one by one, where the groups'
    key (their lists and lengths) is unchanged. A list edited in place with its length kept
    (``group["params"][0] = new_weight``, ``[:] = ...``) changes no key: the monitor recorded the
    tensors it held before, a replaced weight's stale gradient included. One identity pass at C
    speed per step (about 0.25 us for 8 parameters, 1.4 us for 62, 4.5 us for 200 on this machine)."""
    groups = optimizer.param_groups
    if len(groups) == 1:
        return all(map(operator.is_, groups[0]["params"], held[0]))
    return all(all(map(operator.is_, group["params"], was)) for group, was in zip(groups, held))


_PARENT_STEPS: dict[type, tuple] = {}     # optimizer class -> (its step then, _parent_steps' classes)


def _reenters(cls: type) -> bool:
    """Whether an optimizer of class ``cls`` runs its step pre-hooks again inside its step: its
    class's ``step`` overrides a parent class's that torch hooked too (torch hooks a class's step
    when an instance of that class is first made: any plain ``Adam`` anywhere in the process
    hooks ``Adam.step``), so a subclass's ``super().step()`` is a step inside the step, the one
    that applies the gradient after the subclass's own changes (gradient centralization). The
    outer step then defers its record to that inner call (``_nested_step``), as a wrapper's to
    its inner optimizer. Per class, the parents are found once; whether torch hooked them is
    read at each step (an instance made later hooks one)."""
    return _hooked(_parent_steps(cls))


def _hooked(parents: tuple[type, ...]) -> bool:
    """Whether torch hooked the step of any of ``parents`` (``_parent_steps``)."""
    return bool(parents) and any(getattr(c.__dict__["step"], "hooked", False) for c in parents)


def _parent_steps(cls: type) -> tuple[type, ...]:
    """The parent classes of ``cls`` whose ``step`` its own step overrides (Optimizer's aside);
    found again when ``cls.step`` is another function (a class patched, then put back)."""
    cached = _PARENT_STEPS.get(cls)
    step = cls.step
    if cached is None or cached[0] is not step:
        # torch's hook wraps the step a class inherits into that class's own dict (AdamW, made,
        # holds a wrapped Adam.step): only a parent whose function differs is overridden.
        own = inspect.unwrap(step)
        owners = [c for c in cls.__mro__ if "step" in c.__dict__ and issubclass(c, torch.optim.Optimizer)
                  and c is not torch.optim.Optimizer and inspect.unwrap(c.__dict__["step"]) is not own]
        cached = _PARENT_STEPS[cls] = (step, tuple(owners))
    return cached[1]


def _grad_marks(optimizer: torch.optim.Optimizer) -> tuple:
    """Each gradient of the optimizer's parameters as (id, version): another one after a change."""
    return tuple([(id(g), g._version) for group in optimizer.param_groups for p in group["params"]
                  if (g := p.grad) is not None])


def steps_for(chosen: torch.optim.Optimizer | None, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step is a step of ``chosen`` (the monitor's ``optimizer=``): it is
    ``chosen``, or one that ``chosen`` wraps: it shares a param group with it, or ``chosen`` holds
    it as an attribute (an inner optimizer made over the parameters, with groups of its own: its
    step, inside the wrapper's, applies the gradient). A wrapper that never runs
    ``Optimizer.__init__`` (accelerate's ``AcceleratedOptimizer``, timm's ``Lookahead``) is never
    hooked by torch: only its inner optimizer's step is seen."""
    if optimizer is chosen:
        return True
    if chosen is None:
        return False
    groups = {id(group) for group in chosen.param_groups}
    if any(id(group) in groups for group in optimizer.param_groups):
        return True
    return any(value is optimizer for value in getattr(chosen, "__dict__", {}).values())


def inner_optimizer(optimizer: torch.optim.Optimizer, mask, mask_of: Callable) -> torch.optim.Optimizer | None:
    """The optimizer that ``optimizer`` holds as an attribute over the same monitored parameters
    (``mask_of(inner) == mask``): the one a wrapper steps to apply the gradient (a Lookahead's
    inner optimizer, SAM's base optimizer, ZeroRedundancyOptimizer's ``optim`` on one rank).
    None if there is none (an inner optimizer over part of them: ZeroRedundancyOptimizer's shard
    on several ranks)."""
    for value in getattr(optimizer, "__dict__", {}).values():
        if isinstance(value, torch.optim.Optimizer) and value is not optimizer and mask_of(value) == mask:
            return value
    return None


def closure_of(args: tuple, kwargs: dict) -> tuple[Callable | None, bool]:
    """The closure passed to ``optimizer.step`` (positional or keyword) and whether by keyword.
    A step pre-hook's ``args`` start with the optimizer itself (torch/optim/optimizer.py)."""
    if kwargs and kwargs.get("closure") is not None:
        return kwargs["closure"], True
    if len(args) > 1 and callable(args[1]):
        return args[1], False
    return None, False


def recording_closure(closure: Callable, record: Callable[[], Any]) -> Callable:
    """The closure that records after its first call (one record per step)."""
    called = False

    @functools.wraps(closure)
    def wrapped(*a, **k):
        nonlocal called
        result = closure(*a, **k)
        if not called:
            called = True
            record()
        return result

    return wrapped


def replace_closure(args: tuple, kwargs: dict, closure: Callable, by_keyword: bool) -> tuple[tuple, dict]:
    if by_keyword:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs


# -- which monitors see which optimizer's steps, and in what order ------------------------------
#
# One global optimizer step pre-hook for the whole process, ``_dispatch``, installed on the
# first attach and never removed: torch iterates its dict of global hooks during every step of
# every optimizer in every thread, so adding and removing a hook per monitor raised
# "OrderedDict mutated during iteration" in another thread's optimizer.step(). The dispatcher
# reads a tuple of monitors that attach and remove replace whole (copy on write, under a lock),
# so a step never sees it change halfway.
#
# The dispatcher records nothing. Global pre-hooks run before the optimizer's own pre-hooks
# (torch/optim/optimizer.py, ``profile_hook_step``), so it hands each monitor the optimizer and
# the monitor makes sure its own *instance* pre-hook on that optimizer is the last one
# (registering it on first sight, moving it to the end when the user registered another since):
# the monitor records after every pre-hook of the optimizer, the gradient the step applies.
#
# Removing a monitor's hooks from an optimizer whose step is iterating them (in another thread,
# or from a step hook of the user's in this one) raised "OrderedDict mutated during iteration"
# out of that step: torch iterates the optimizer's hook dicts as they are. A step is marked from
# ``_dispatch`` (a global pre-hook: before the optimizer's own hooks) to ``_finished`` (a global
# post-hook, which torch calls after them), per thread, in ``_STEPPING``. ``StepWatch.stop``
# removes an optimizer's hooks at once only where no thread is inside its step (``in_step``),
# deciding under ``_LOCK`` with ``_STOPPING`` set: a step that marks itself and then finds
# ``_STOPPING`` set waits for the lock, one that found it unset was marked before ``stop`` looked.
# Else the hooks wait in ``_DEFERRED`` for the end of that step, or the start of the
# optimizer's next one where that step raised.

_LOCK = threading.Lock()
_MONITORS: tuple = ()                 # weak references to the attached monitors
_INSTALLED: list = []                 # the dispatcher's and _finished's handles, once installed
# id(optimizer) -> (weak reference to it, the hook handles to remove when its running step ends)
_DEFERRED: dict[int, tuple[weakref.ref, list]] = {}
_STOPPING = 0                         # a StepWatch.stop() is deciding which hooks it can remove now
# id(optimizer) -> (weak reference to it, the idents of the threads inside its step now)
_STEPPING: dict[int, tuple[weakref.ref, set[int]]] = {}


def watch_steps(monitor: Any) -> None:
    """Tell ``monitor`` (``_on_step_seen(optimizer)``, a ``StepWatch``) of every optimizer step in the process."""
    global _MONITORS
    with _LOCK:
        _MONITORS = (*_MONITORS, weakref.ref(monitor))
        if not _INSTALLED:
            _INSTALLED.append(register_optimizer_step_pre_hook(_dispatch))
            _INSTALLED.append(register_optimizer_step_post_hook(_finished))


def unwatch_steps(monitor: Any) -> None:
    global _MONITORS
    with _LOCK:
        _MONITORS = tuple(ref for ref in _MONITORS if ref() is not None and ref() is not monitor)


def outside_compile(fn: Callable) -> Callable:
    """``fn`` as a hook that torch.compile never traces: where dynamo traces the code that calls
    it (``torch.compile(optimizer.step)``), a graph break that runs ``fn`` eagerly, as
    ``torch._dynamo.disable`` does; in eager code, ``fn`` itself. The disable wrapper costs an
    eager call about 0.9 us (it swaps the frame evaluation callback in and out), and step
    hooks run at every step; ``torch.compiler.is_compiling()`` is True only while dynamo
    traces. The hook takes positional arguments only, as torch calls step hooks
    (``hook(optimizer, args, kwargs)``): no keyword dict built per call (0.05 us a hook). This
    module's own four step hooks make the same check inline, without this frame (``_dispatch``)."""
    disabled = torch._dynamo.disable(fn)

    @functools.wraps(fn)
    def hook(*args):             # torch calls step hooks positionally: no keyword dict to build per call
        if _is_compiling():
            return disabled(*args)
        return fn(*args)

    return hook


_is_compiling = torch.compiler.is_compiling     # read at every hook call: one global, not two attributes
_get_ident = threading.get_ident


# The four hooks of every step check ``_is_compiling()`` themselves, as ``outside_compile``'s
# wrapper does, and run their ``torch._dynamo.disable``d copy (``*_eagerly``) where dynamo traces
# them: the wrapper's frame cost each call about 0.2 us (tutorial MLP, the four hooks called in a
# loop: 2.53 us wrapped, 1.85 us bare, 2.20 us with the check inline).

def _dispatch(optimizer, args, kwargs):
    if _is_compiling():                  # dynamo traces the step (torch.compile(optimizer.step)): a graph break
        return _dispatch_eagerly(optimizer, args, kwargs)
    if not _MONITORS and not _STOPPING and not _DEFERRED:
        return None              # no monitor watches steps: none has a hook on this optimizer to remove
    entry = _STEPPING.get(id(optimizer))
    if entry is None or entry[0]() is not optimizer:
        entry = _STEPPING[id(optimizer)] = (entry_ref(_STEPPING, id(optimizer), optimizer), set())
    entry[1].add(_get_ident())                 # inside its step, until _finished
    if _STOPPING or _DEFERRED:       # a stop() deciding whether this step is running ends first
        with _LOCK:
            if _DEFERRED:
                _remove_deferred(optimizer)
    for ref in _MONITORS:
        monitor = ref()
        if monitor is not None:
            monitor._on_step_seen(optimizer)
    return None


def _finished(optimizer, args, kwargs):
    """The end of every optimizer step (a global post-hook): the optimizer's own hook dicts are
    no longer iterated, so the hooks a ``stop()`` during that step left are removed now."""
    if _is_compiling():
        return _finished_eagerly(optimizer, args, kwargs)
    entry = _STEPPING.get(id(optimizer))
    if entry is not None and entry[1]:
        entry[1].discard(_get_ident())
    if _DEFERRED:
        with _LOCK:
            if entry is None or not entry[1]:        # no other thread inside a step of it
                _remove_deferred(optimizer)


_dispatch_eagerly = torch._dynamo.disable(_dispatch)
_finished_eagerly = torch._dynamo.disable(_finished)


def _remove_deferred(optimizer) -> None:
    entry = _DEFERRED.pop(id(optimizer), None)
    if entry is not None and entry[0]() is optimizer:
        for handle in entry[1]:
            handle.remove()


_STEP_CODE = torch.optim.Optimizer.profile_hook_step(lambda self: None).__code__   # torch's step wrapper


def in_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether some thread (this one included) is inside ``optimizer.step()``, past torch's
    global pre-hooks: marked in ``_STEPPING``. A step that raised leaves its mark: this thread's
    is checked on its own stack (a frame of torch's step wrapper, ``Optimizer.profile_hook_step``,
    for ``optimizer``), a dead thread's is dropped, and a living thread's counts (another thread's
    frames cannot be read safely while it runs: walking them gave a code object for a frame
    under a switch interval of 1 us)."""
    entry = _STEPPING.get(id(optimizer))
    if entry is None or entry[0]() is not optimizer or not entry[1]:
        return False
    threads = entry[1]
    me = threading.get_ident()
    if me in threads and not _in_own_step(optimizer):
        threads.discard(me)
    threads.intersection_update({thread.ident for thread in threading.enumerate()})
    return bool(threads)


def _in_own_step(optimizer: torch.optim.Optimizer) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_CODE:
            args = frame.f_locals.get("args")
            if args and args[0] is optimizer:
                return True
        frame = frame.f_back
    return False


def _nested_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this thread is inside two of ``optimizer``'s hooked steps, one within the other
    (``_reenters``), not in a step that raised earlier and left its mark: two frames of torch's
    step wrapper for it on this thread's stack. Walked only where a step of the same optimizer
    deferred its record, never at a plain step."""
    frame, count = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is _STEP_CODE:
            args = frame.f_locals.get("args")
            if args and args[0] is optimizer:
                count += 1
        frame = frame.f_back
    return count >= 2


def last_pre_hook(optimizer: torch.optim.Optimizer, hook: Callable, handle=None):
    """Make ``hook`` the last step pre-hook of ``optimizer`` (register it, or move its
    ``handle`` to the end); return its handle. Call only from a global pre-hook, before torch
    iterates the optimizer's own hooks."""
    hooks = optimizer._optimizer_step_pre_hooks
    if handle is None or handle.id not in hooks:
        return optimizer.register_step_pre_hook(hook)
    if next(reversed(hooks)) != handle.id:
        hooks.move_to_end(handle.id)
    return handle


def amp_scale(optimizer: torch.optim.Optimizer, kwargs: dict | None) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """(grad_scale, found_inf) when a ``GradScaler`` steps an optimizer that unscales inside its
    own step (``_step_supports_amp_scaling``: fused Adam/AdamW/SGD/Adagrad): the gradients are
    still scaled by ``grad_scale`` (None: ``scaler.unscale_(optimizer)`` ran before the step, as
    torch's AMP recipe does to clip), and ``found_inf`` > 0 means the step will not apply them.
    None otherwise. GradScaler sets both as attributes of the optimizer for the step
    (torch/amp/grad_scaler.py), or passes itself as ``grad_scaler`` (the older contract, where
    the optimizer checks for inf/NaN itself: the monitor runs GradScaler's check first, one more
    pass over the gradients on this path only).
    Where none of the optimizer's parameters has a gradient, GradScaler's ``found_inf`` is the
    sum of an empty list, the int 0: returned as a tensor like the others. A ``grad_scale`` the
    user set with no GradScaler (a mean over micro-batches taken by the fused step) divides the
    gradients too: returned with a zero ``found_inf``."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scale, found = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    if found is not None:
        return scale, torch.as_tensor(found)
    scaler = (kwargs or {}).get("grad_scaler")
    if scaler is not None and scaler.is_enabled():
        # The older contract: the optimizer checks and unscales itself, so before it no inf check
        # ran unless the user called unscale_ (then the gradients are unscaled already)
        state = scaler._per_optimizer_states[id(optimizer)]
        unscaled = state["stage"] is OptState.UNSCALED
        per_device = state["found_inf_per_device"] if unscaled else scaler._check_inf_per_device(optimizer)
        found = sum(v.to(scaler._scale.device) for v in per_device.values())
        return None if unscaled else scaler._scale, torch.as_tensor(found, device=scaler._scale.device)
    if scale is not None:        # the user's own, no GradScaler: the fused step divides by it all the same
        return scale, _NONE_FOUND
    return None


_NONE_FOUND = torch.zeros(())    # amp_scale's found_inf where nothing checks for inf (read on the host)


class StepWatch:
    """One monitor's watch of optimizer steps: its pre-hook, kept last on every optimizer that
    holds its parameters (``only``: that optimizer alone), calling ``record(mask, unscale, inner)``
    where the step's gradient is final (after a closure's backward; ``unscale``: 1 / the
    GradScaler's scale for a fused optimizer's still-scaled gradients, else None; ``inner``:
    the step is an inner step of a running wrapper's step), or ``skip(mask)`` where a fused
    optimizer's ``found_inf`` says its step applies nothing (set by GradScaler or by hand)."""

    def __init__(self, masks: OptimizerMasks, only: torch.optim.Optimizer | None,
                 record: Callable[[Any, torch.Tensor | None, bool], None],
                 after: Callable[[], None] = lambda: None,
                 warn: Callable[[str, str], None] = lambda key, message: None,
                 skip: Callable[[Any], None] = lambda mask: None) -> None:
        self.masks, self.skip = masks, skip
        self.only = weakref.ref(only) if only is not None else None
        self.only_name = type(only).__name__
        self.warn = warn                     # (key, message): said once per monitor
        self.record = record
        self.after = after                   # called when the outermost watched step is done
        self.on = False
        self._outer = None                   # weak reference to the watched optimizer whose step is running
        self._mask = None                    # (id(optimizer), groups key, mask) from _on_step_seen, for the step's pre-hook
        self._deferred = None                # the running wrapper's mask while its inner step is awaited (_defers)
        self._marks = None                   # (optimizer, _grad_marks) where its class's step overrides an unhooked one
        self._closure = None                 # (optimizer, mask, inner, [called]) while a step's wrapped closure is awaited
        # id(optimizer) -> (weak reference to it, its pre-hook's handle, its post-hook's handle,
        # (groups key, weak reference to its inner optimizer or None) once _defers looked)
        self._hooks: dict[int, tuple] = {}

    def start(self) -> None:
        watch_steps(self)
        self.on = True

    def stop(self) -> None:
        """Stop recording and remove the hooks: at once, or at the end of a step that is running
        now (in another thread, or the step whose hook called this), whose iteration over the
        optimizer's hooks a removal would break."""
        unwatch_steps(self)
        self.on = False
        hooks, self._hooks = self._hooks, {}
        global _STOPPING
        with _LOCK:
            _STOPPING += 1
            try:
                self._remove(hooks)
            finally:
                _STOPPING -= 1

    @staticmethod
    def _remove(hooks: dict[int, tuple]) -> None:
        for ref, pre, post, *_ in hooks.values():
            optimizer = ref()
            if optimizer is not None and in_step(optimizer):
                entry = _DEFERRED.get(id(optimizer))
                if entry is None or entry[0]() is not optimizer:
                    entry = _DEFERRED[id(optimizer)] = (entry_ref(_DEFERRED, id(optimizer), optimizer), [])
                entry[1].extend((pre, post))
            else:
                pre.remove()
                post.remove()

    def _on_step_seen(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer is about to step (``_dispatch``, before its own pre-hooks)."""
        self._mask = None
        if not self.on:
            return               # stopped in another thread since _dispatch read the monitors
        if self.only is not None and not steps_for(self.only(), optimizer):
            if self.only() is None:
                self._said_gone(optimizer)
            return
        key, mask = self.masks.keyed(optimizer)
        if mask is None:
            return
        held = self._hooks.get(id(optimizer))
        if held is not None and held[0]() is optimizer:
            hooks, handle = optimizer._optimizer_step_pre_hooks, held[1]
            if handle.id in hooks:                   # last_pre_hook, inline: the common case at every step
                if len(hooks) > 1 and next(reversed(hooks)) != handle.id:
                    hooks.move_to_end(handle.id)     # a hook of the user's came since: this one last again
            else:                                    # the hooks were cleared: registered anew
                self._hooks[id(optimizer)] = held = (held[0], last_pre_hook(optimizer, self._on_step), *held[2:])
        else:
            self._hooks[id(optimizer)] = held = (entry_ref(self._hooks, id(optimizer), optimizer),
                                                 last_pre_hook(optimizer, self._on_step),
                                                 optimizer.register_step_post_hook(self._on_step_done), None)
        self._mask = (id(optimizer), key, mask, held)      # for its pre-hook, which torch calls next
        if not self.on:          # stop() ran meanwhile in another thread, perhaps before these were kept
            held[1].remove()
            held[2].remove()

    def _said_gone(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer the monitor was given (``optimizer=``) was deleted and ``optimizer``
        steps monitored parameters: its steps are not recorded, said once."""
        if self.masks.mask(optimizer) is not None:
            self.warn("chosen-gone", f"GradientMonitor(optimizer={self.only_name}): that optimizer no longer exists, "
                      f"and the steps of {type(optimizer).__name__} over the monitored parameters are not recorded. "
                      "Remove this monitor and attach a new one with optimizer=<the new optimizer>, or without "
                      "optimizer= to record every optimizer's steps")

    def _defers(self, optimizer: torch.optim.Optimizer, mask, key: tuple, held: tuple | None = None) -> bool:
        """Whether ``optimizer`` wraps an inner optimizer (an attribute of it, ``inner_optimizer``)
        whose step this monitor watches: that step records instead, after the inner optimizer's
        own pre-hooks, which run after the wrapper's (a hook there that rescales ``.grad`` changes
        what is applied). Looked up once per change of the wrapper's groups. Not under a
        GradScaler that hands the wrapper itself the scale (``amp_scale``). ``key``: the
        optimizer's ``_groups_key`` now; ``held``: the entry ``_on_step_seen`` handed over this
        step, whose answer for the same key is read as it is. Otherwise the entry is looked up
        afresh (a ``stop()`` since may have emptied ``_hooks``) and its answer kept there."""
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return False
        looked = held[3] if held is not None else None
        if looked is not None and looked[0] == key:
            return looked[1] is not None and looked[1]() is not None
        held = self._hooks.get(id(optimizer))
        if held is None:
            return False
        if held[3] is None or held[3][0] != key:
            inner = inner_optimizer(optimizer, mask, self.masks.mask)
            if inner is not None and self.only is not None and not steps_for(self.only(), inner):
                inner = None                         # not watched (optimizer=): the wrapper's step records
            held = self._hooks[id(optimizer)] = (*held[:3], (key, None if inner is None else weakref.ref(inner)))
        return held[3][1] is not None and held[3][1]() is not None

    def _said_subclass(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn (once) if the step of an optimizer whose class overrides a parent's step that torch
        did not hook changed ``.grad``: the monitor recorded them as that step began."""
        ref, marks = self._marks
        self._marks = None
        if ref() is optimizer and _grad_marks(optimizer) != marks:
            cls = type(optimizer)
            parent = _parent_steps(cls)[0].__name__
            self.warn("subclass-step", f"{cls.__name__}.step changed the gradients during the step: the monitor "
                      f"records them as {cls.__name__}.step begins, after its step pre-hooks, so a change made "
                      f"there before {parent}.step applies them is not in the figures. Make that change in a step "
                      f"pre-hook (optimizer.register_step_pre_hook) to have it recorded")

    def _on_step_done(self, optimizer, args=(), kwargs=None) -> None:
        """The optimizer's step post-hook: once the outermost watched step is over (a wrapper's
        inner steps end inside it: ``after`` must wait for the wrapper's)."""
        if _is_compiling():
            return _on_step_done_eagerly(self, optimizer, args, kwargs)
        if self._closure is not None and self._closure[0]() is optimizer:
            self._uncalled_closure()
        outer = self._outer() if self._outer is not None else None
        if outer is None or outer is optimizer:
            self._outer = None
            if self._marks is not None:
                self._said_subclass(optimizer)
            deferred, self._deferred = self._deferred, None
            if deferred is not None and self.on:     # the wrapper never stepped its inner optimizer: its own step,
                amp = amp_scale(optimizer, kwargs) if getattr(optimizer, "_step_supports_amp_scaling", False) else None
                if amp is None or not amp[1].item():  # read after it (a fused step unscaled .grad in place)
                    self.record(deferred, None, False)
                else:                                 # found_inf: the step applied nothing
                    self.skip(deferred)
            self.after()

    def _on_step(self, optimizer, args=(), kwargs=None):
        """The optimizer's last step pre-hook: record the gradient its step applies."""
        if _is_compiling():
            return _on_step_eagerly(self, optimizer, args, kwargs)
        if self._closure is not None and self._closure[0]() is optimizer:
            self._closure = None                     # left by a step of it that raised: not this step's
        seen, self._mask = self._mask, None          # the mask _on_step_seen found for this step,
        key = _groups_key(optimizer)
        if seen is not None and seen[0] == id(optimizer) and seen[1] == key:
            mask, held = seen[2], seen[3]            # unless a pre-hook of the user's changed the groups
        else:
            mask, held = self.masks.mask(optimizer), None
        if mask is None or not self.on:
            return None
        outer = self._outer() if self._outer is not None else None
        inner = outer is not None and outer is not optimizer     # an inner step of the running one (a step
        if outer is optimizer and self._deferred is not None:    # that raised leaves it set until that
            inner = _nested_step(optimizer)          # optimizer steps again); the parent class's step (_reenters)
        if not inner:
            self._deferred = None
            # the held entry's weak reference where _on_step_seen handed one over (it checked it)
            self._outer = weakref.ref(optimizer) if held is None else held[0]
            parents = _parent_steps(type(optimizer))     # none for a torch optimizer (one call a step)
            if self._defers(optimizer, mask, key, held) or (parents and _hooked(parents)):
                self._deferred = mask                # an inner step records, after its pre-hooks (and the
                return None                          # subclass's own changes to .grad)
            if parents:                              # a subclass's step over one torch did not hook: a change
                self._marks = (weakref.ref(optimizer), _grad_marks(optimizer))   # to .grad before super().step()
        elif _reenters(type(optimizer)) and not _nested_step(optimizer):
            self._deferred = mask                    # a wrapper's inner optimizer of such a class: its parent's
            return None                              # step records (or the wrapper's post-hook, if none runs)
        else:
            self._deferred = None
        return self._record_step(optimizer, mask, inner, args, kwargs)

    def _record_step(self, optimizer, mask, inner: bool, args: tuple, kwargs: dict | None):
        """Record ``optimizer``'s step now (``_on_step``), or after the closure in ``args`` or
        ``kwargs`` runs its backward (the step pre-hook's return value: the new arguments)."""
        scaling = getattr(optimizer, "_step_supports_amp_scaling", False)
        amp = amp_scale(optimizer, kwargs) if scaling else None
        if amp is not None:                          # a fused optimizer under GradScaler: still scaled
            scale, found_inf = amp
            if not found_inf.item():                 # one sync, AMP only
                self.record(mask, None if scale is None else scale.double().reciprocal().float(), inner)
            else:      # the fused step applies nothing: counted here, GradScaler's or the user's found_inf alike
                self.skip(mask)
            return None
        if len(args) < 2 and not kwargs:             # step() with no argument: no closure (the common case)
            self.record(mask, None, inner)
            return None
        closure, by_keyword = closure_of(args, kwargs or {})
        if closure is None:
            self.record(mask, None, inner)
            return None
        # The closure runs forward and backward inside step(): record after it, not before.
        called = []
        self._closure = (weakref.ref(optimizer), mask, inner, called)
        wrapped = recording_closure(closure, lambda: called.append(self.record(mask, None, inner)))
        return replace_closure(args, kwargs or {}, wrapped, by_keyword)

    def _uncalled_closure(self) -> None:
        """At the end of a step given a closure: where the step never called it (a custom
        optimizer that takes one for the loss now and then, or ignores it after the loop's own
        backward), it applied the gradient that was there: record that, as the step ends."""
        _, mask, inner, called = self._closure
        self._closure = None
        if not called and self.on:
            self.record(mask, None, inner)


_on_step_eagerly = torch._dynamo.disable(StepWatch._on_step)
_on_step_done_eagerly = torch._dynamo.disable(StepWatch._on_step_done)
