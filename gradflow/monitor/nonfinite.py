"""Where the first non-finite value came from: the module, the pass (forward or backward) and the step.

``torch.autograd.detect_anomaly`` answers "which op made the NaN" at 2.5-3x the cost of a step;
this part answers "which module" at every step. Measured on its own (benchmarks/overhead.py
--variants first-nonfinite --clock cpu, 11 interleaved rounds, a 2-core machine shared with other
jobs: a few percent of noise; earlier runs gave nanoGPT 1.06-1.12x): 1.08x nanoGPT, 1.07x
resnet18, 1.03x ResNet-style CNN, 1.02x LSTM LM, 1.01x transformer LM. The cost is one more read
of every watched output and input gradient (nanoGPT: about 60 sums a step, forward and
backward), memory-bound on the CPU; above the 1.02x target on the small models,
so ``GradientMonitor(nonfinite=...)`` is off by default (``gradflow train`` turns it on). How:

- Forward: one global module forward hook (``register_module_forward_hook``), filtered by an
  id table of the model's modules, adds up each floating-point output of each call: one
  reduction op, whose result is NaN or inf exactly when an element is (float16 and bfloat16
  outputs are summed in float32). The sums stay on the device in a list; nothing is read.
- Between modules: a global forward pre-hook keeps the stack of running modules; a module's
  first input that no sum covers (not a watched output, nor a pass-through module's output of a
  covered one, unchanged since: same object and ``_version``) is summed under the code of the
  module that called it, whose functional code made it (nanoGPT's attention: a fully masked
  row's softmax is ``attn``'s, not ``attn.c_proj``'s), or of ``INPUT`` for the model's input.
  The model's input is every floating tensor it is called with, positional (the global pre-hook)
  or keyword (a pre-hook ``with_kwargs`` on the model itself): a NaN in any of them is ``INPUT``'s.
- Backward: in the same hook, a tensor hook on the module's first input (when it requires
  grad) sums the gradient with respect to that input when backward computes it; on the model's
  output it sums dL/d(output), whose non-finite values come from the loss (``LOSS``). A child's
  output that no module takes as its first input is watched too, under the code that received
  it (its caller): a NaN made in the backward of functional code between two children is the
  caller's, not the earlier child's. One hook per tensor (``_watch_grad``).
- Each call gets a code, ``call * M + module`` with the call counted per step and pass, and
  backward codes above forward ones (``PHASE``). At each optimizer step the step's sums are
  stacked and the smallest code whose sum is non-finite is kept, as one key
  ``step_in_window * STEP + code``, by ``torch.minimum`` on a device tensor: the first forward
  call in execution order whose output is non-finite, else (the forward was clean) the first
  module in backward order whose input gradient is. After a forward NaN nearly every module is
  flagged in backward, which says nothing, so forward codes win within a step. No host sync
  and no recompile: the codes of a call sequence are made once and cached.
- A step that a GradScaler skips (an AMP overflow) keeps its key apart: ``first_overflow``, not
  a NaN source.
- The keys are read once per window (``read``); with a process group initialised, the
  coordinator combines them across ranks (the key is stored negated under MAX, so that the
  largest negated key is the earliest occurrence on any rank).

What it does not see: a value written by a user's forward hook (it runs after the monitor's)
is put on the module's caller; a gradient that goes non-finite only in a parameter's gradient,
never in an input gradient, is not attributed (the gradient rows count it); an output whose
finite values add up beyond float32's range (|sum| > 3.4e38) reads as non-finite. Under
``torch.compile`` the hooks stay out of the compiled region (a hook that touched Python state
there would recompile every step): the compiled model is seen as a whole, its output (module
``""``) and dL/d(output) (``LOSS``), not per layer.

Example (the part is the monitor's, on with ``GradientMonitor(model, nonfinite=True)``):
    >>> import torch
    >>> from torch import nn
    >>> from gradflow import GradientMonitor
    >>> class Log(nn.Module):                       # log of a negative input: NaN
    ...     def forward(self, x):
    ...         return torch.log(x)
    >>> model = nn.Sequential(nn.Linear(2, 2), Log(), nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(-1.0)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with GradientMonitor(model, None, nonfinite=True) as monitor:
    ...     model(torch.ones(4, 2)).sum().backward()
    ...     optimizer.step()
    ...     _ = monitor.log(0)
    >>> source = monitor.history[-1].first_nonfinite
    >>> source.module, source.phase, source.step
    ('1', 'forward', 0)
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from gradflow.monitor.part import MAX, Part, Reduced, Setup, moved, watch_forward_starts
from gradflow.monitor.spent import LeavesCopiesAlone
from gradflow.monitor.tensors import MonitorError

LOSS = "(loss)"            # the module name of a non-finite dL/d(model output): the loss made it
INPUT = "(input)"          # the module name of a non-finite value in the model's input: no module made it
FORWARD, BACKWARD = "forward", "backward"
PHASE = 2 ** 31            # backward codes start here: a forward code always sorts first
STEP = 2 ** 32             # key = step_in_window * STEP + code
MAX_WINDOW_STEPS = 2 ** 20 - 1   # keys stay below 2 ** 52: exact as float64 (the read-back's type)
NONE = 2 ** 53             # no non-finite value (exact in float64 too)
PENDING = 4096             # sums kept before an early fold (a loop that never steps)
_HALF = (torch.float16, torch.bfloat16)
# Parameter-free modules whose output, and whose input gradient, is finite whenever their input,
# and their output gradient, is (bounded or piecewise-linear elementwise maps, dropout's 1/(1-p)
# scaling, pooling by max, reshapes): a non-finite value never starts in them, so they are not
# watched. Their input is the previous module's output, which is.
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid,
                nn.Hardswish, nn.Softsign, nn.GELU, nn.SiLU, nn.Mish, nn.Flatten, nn.Unflatten,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                nn.AdaptiveMaxPool3d)
# torch warns at every call of a compiled model while any global module hook exists that the
# hook fires once more for the OptimizedModule: this part relies on that call (it is how a
# compiled model is seen at all), so that warning is silenced while the part is attached.
_COMPILE_WARNING = ("ignore", r"Using `torch.compile\(module\)` when there are global hooks", UserWarning)


@dataclass(frozen=True)
class Source:
    """Where the first non-finite value of a window came from.

    ``module``: the ``named_modules()`` name (``""``: the model's own forward code, or the
    whole compiled model; ``INPUT``: the model's input batch; ``LOSS``: dL/d(output) was
    non-finite while every module's output was finite); ``phase``: ``"forward"`` (the module's output) or ``"backward"`` (the gradient
    with respect to its input); ``step``: the 0-based count of optimizer steps the monitor had
    seen since attach (applied or skipped) when it happened.
    """

    module: str
    phase: str
    step: int
    # the torch.compile'd modules inside ``module`` ("" for the model): their insides are seen as a
    # whole, so the value may have come from any module in them
    compiled: tuple[str, ...] = field(default=(), compare=False)

    def where(self) -> str:
        """``dense_3 (forward)``; the loss, the input, the root and compiled modules said in words."""
        if self.module == LOSS:
            return "the loss (its gradient; every module's output was finite)"
        if self.module == INPUT:
            return "the model's input (it held a NaN/inf before any module ran)"
        if self.compiled:
            inside = "the compiled model" if "" in self.compiled else f"the compiled module {self.module}" \
                if self.module in self.compiled else \
                f"{self.module or 'the model'} or a compiled module inside it ({', '.join(self.compiled[:3])})"
            return f"{inside} ({self.phase}; under torch.compile its modules are not seen one by one)"
        name = self.module or "the model's own forward code (outside its submodules)"
        return f"{name} ({self.phase})"

    def describe(self) -> str:
        """``dense_3 (forward) at step 12``."""
        return f"{self.where()} at step {self.step}"


class FirstNonFinite(Part):
    """Per step, on the device: the first module whose output (forward) or, with a clean
    forward, whose input gradient (backward) held a NaN or inf.

    Args:
        model: the user's module (unwrapped); its ``named_modules()`` names are reported.
        setup: the monitor's ``Setup`` (a part of ``GradientMonitor(nonfinite=True)``), or on
            its own a device where the keys live (the parameters' device).

    The part keeps no reference to ``model``; its two global hooks and the one pre-hook on the
    model (for keyword inputs; a spent hook in a copy of the model) are removed by ``remove()``.
    Each window fills ``Window.first_nonfinite`` and ``Window.first_overflow`` (a ``Source`` or None).
    """

    name = "nonfinite"

    @classmethod
    def create(cls, model: nn.Module, setup: Setup) -> FirstNonFinite | None:
        if not setup.options.get("nonfinite"):
            return None
        if setup.members != 1:      # the stacked members share each module's output: no member's own source
            raise MonitorError(f"nonfinite=True is not supported with members={setup.members} (K models stacked "
                               "in one): a module's output holds every member, so a source could not be told "
                               "apart by member; monitor one model, or leave nonfinite off")
        return cls(model, setup)

    def __init__(self, model: nn.Module, setup: Setup | torch.device | str) -> None:
        super().__init__(model, setup if isinstance(setup, Setup) else None)
        device = setup.device if isinstance(setup, Setup) else setup
        named = list(model.named_modules(remove_duplicate=True))
        self.names = [name for name, _ in named] + [INPUT, LOSS]
        # Modules that cannot turn finite values into non-finite ones, forward or backward, are
        # not watched: the first non-finite value never starts in them (a third of nanoGPT's).
        self._index = {id(module): i for i, (_, module) in enumerate(named)
                       if i == 0 or not isinstance(module, PASS_THROUGH)}
        self._passing = {id(module) for i, (_, module) in enumerate(named) if i and isinstance(module, PASS_THROUGH)}
        self._root = id(model)
        self._model = weakref.ref(model)
        self._wrapped = False                    # a torch.compile wrapper of the model was seen
        self._root_forwards = 0                  # the model's training forward passes seen this window
        self._count = len(self.names)
        self._input, self._loss = self._count - 2, self._count - 1
        # The modules running now, innermost last: (index or -1 for a pass-through, whether its
        # first input was known finite-or-summed when it started); and the tensors whose
        # finiteness a sum of this pass already covers: id -> (weak reference, _version).
        self._stack: list[tuple[int, bool]] = []
        self._seen: dict[int, tuple[weakref.ref, int]] = {}
        self.device = torch.device(device)
        # (sum, code) of each output or gradient taken since the last fold: one list of pairs, so
        # that a fold in another thread (remove() during a pass) never sees a sum without its code
        self._pending: list[tuple[torch.Tensor, int]] = []
        self._calls = [0, 0]                     # forward, backward calls this step
        self._step_min = torch.full((), NONE, dtype=torch.int64, device=self.device)
        self._keys = torch.full((2,), NONE, dtype=torch.int64, device=self.device)  # first, overflow
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        if isinstance(setup, Setup):             # the through-time part replaces recurrent outputs
            setup.output_replaced.append(self._on_replaced)
        self.steps = 0                           # optimizer steps seen since attach (applied or skipped)
        self._window_start = 0
        self._handle = self._pre_handle = self._root_handle = None
        self._filter = None
        self._removed = False                    # remove() was called (hook() checks it once done)

    # -- hooks ------------------------------------------------------------------------------

    def hook(self, model: nn.Module | None = None) -> None:
        """Add the global forward pre-hook and forward hook; in a monitor, have the model's pass
        starts watched at every pass (``watch_forward_starts(always=True)``: these hooks take
        tensors at every pass, and the conversions check must see each start first)."""
        if self.setup is not None and model is not None:
            watch_forward_starts(self, model, call=False, always=True)
        if self._handle is None:
            self._removed = False
            pre = register_module_forward_pre_hook(self._on_start)
            root = None if model is None else model.register_forward_pre_hook(_RootStart(self), with_kwargs=True)
            self._pre_handle, self._root_handle = pre, root
            self._handle = register_module_forward_hook(self._on_forward)     # last: remove() reads it first
            action, message, category = _COMPILE_WARNING
            warnings.filterwarnings(action, message=message, category=category)
            self._filter = warnings.filters[0]
            if self._removed:      # remove() ran in another thread meanwhile (detach): nothing stays on
                self.remove()

    def remove(self) -> None:
        """Remove the hook; drop pending sums. Safe to call twice; never raises."""
        self._removed = True
        if self._handle is not None:
            self._pre_handle.remove()
            self._handle.remove()
            if self._root_handle is not None:
                self._root_handle.remove()
            self._handle = self._pre_handle = self._root_handle = None
            if self._filter in warnings.filters:
                warnings.filters.remove(self._filter)
                getattr(warnings, "_filters_mutated", lambda: None)()   # the warnings cache (CPython)
        self._pending = []
        self._stack, self._seen = [], {}

    def _which(self, module) -> int | None:
        """The module's index, -1 for a pass-through module of the model, None for others."""
        index = self._index.get(id(module))
        if index is None:
            index = -1 if id(module) in self._passing else self._learn(module)
        return index

    def _on_start(self, module, args):
        """A module starts: its first input, when no sum of this pass covers it (functional code
        of the module that called it made it, or it is the model's input), is summed under the
        caller's code, so that a NaN made between modules is named where it was made."""
        if torch.compiler.is_compiling():
            return
        index = self._which(module)
        if index is None or torch._C._current_graph_task_id() != -1 or \
                not (torch.is_grad_enabled() or module.training):
            return
        if index == 0:                               # the model's forward starts
            self._stack.clear()
            self._seen.clear()
            self._take_inputs(args[1:])              # the batch's other tensors (args[0]: below)
        x = args[0] if args and type(args[0]) is torch.Tensor else None
        known = x is None or not x.is_floating_point() or self._known(x)
        if not known and index != -1:
            caller = next((i for i, _ in reversed(self._stack) if i >= 0), self._input)
            code = self._calls[0] * self._count + caller
            if code < PHASE:
                self._calls[0] += 1
                self._take(x, code)
                self._mark(x)
                known = True
        self._stack.append((index, known))

    def _on_root_start(self, module, args, kwargs) -> None:
        """The model's own pre-hook (``with_kwargs``; after the global one): the batch's tensors
        given by keyword (``model(x=batch)``, ``model(**batch)``) are the input too."""
        if kwargs and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() == -1 and \
                (torch.is_grad_enabled() or module.training):
            self._take_inputs(kwargs.values())

    def _take_inputs(self, values) -> None:
        """Sum each floating tensor in ``values`` (the model's inputs besides the first) that no
        sum covers yet under ``(input)``: a NaN in any part of the batch is the input's, not the
        code of the first module that used it."""
        for x in values:
            if type(x) is torch.Tensor and x.is_floating_point() and not self._known(x):
                code = self._calls[0] * self._count + self._input
                if code >= PHASE:
                    return
                self._calls[0] += 1
                self._take(x, code)
                self._mark(x)

    def _ended(self, index: int) -> bool:
        """Pop ``index``'s entry (and any above it: a child that raised); whether its input was known.
        On the list as it is now: ``remove()`` in another thread replaces it by an empty one."""
        stack = self._stack
        for at in range(len(stack) - 1, -1, -1):
            if stack[at][0] == index:
                known = stack[at][1]
                del stack[at:]
                return known
        return False

    def _known(self, tensor: torch.Tensor) -> bool:
        seen = self._seen.get(id(tensor))
        return seen is not None and seen[0]() is tensor and seen[1] == tensor._version

    def _mark(self, tensor: torch.Tensor) -> None:
        if tensor.is_inference():                    # no version counter: never counted as covered
            return
        if len(self._seen) >= PENDING:
            self._seen.clear()
        self._seen[id(tensor)] = (weakref.ref(tensor), tensor._version)

    def _on_forward(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        index = self._which(module)
        if index is None or torch._C._current_graph_task_id() != -1 or \
                not (torch.is_grad_enabled() or module.training):
            return                          # a checkpoint's recompute in backward; evaluation
        known_input = self._ended(index)
        if index == -1:                     # a pass-through: its output is finite exactly when its input is
            if known_input and type(output) is torch.Tensor:
                self._mark(output)
            return
        self._root_forwards += index == 0
        code = self._calls[0] * self._count + index
        if code >= PHASE:
            return
        self._calls[0] += 1
        for tensor in [output] if type(output) is torch.Tensor else _tensors(output):
            if not self._known(tensor):              # a container's output is often its last child's: summed once
                self._take(tensor, code)
                self._mark(tensor)
        if not torch.is_grad_enabled():
            return
        # dL/d(output): the model's is the loss's; a child's, until a module takes it as its first
        # input, is its caller's (the caller's functional code computes it in backward)
        owner = self._loss if index == 0 else next((i for i, _ in reversed(self._stack) if i >= 0), None)
        if owner is not None:
            for tensor in [output] if type(output) is torch.Tensor else _tensors(output):
                if tensor.requires_grad:
                    _watch_grad(self, tensor, owner, of_input=False)
        if args and type(args[0]) is torch.Tensor and args[0].requires_grad:
            _watch_grad(self, args[0], index, of_input=True)
        return

    def _on_replaced(self, module, old, new) -> None:
        """A later forward hook of the monitor (through time's) replaced ``module``'s output ``old``
        by ``new``, equal up to rounding; ``old``, which ``_on_forward`` watched, is discarded. The
        new tensors are covered as the old were, and their gradient is watched under the same
        owner: else a NaN made in backward by the code that received the output (or the loss)
        would first show in the module's input gradient and be put on the module."""
        if self._handle is None or torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1:
            return                                   # removed, compiling, or a recompute in backward
        index = self._which(module)
        if index is None or index < 0 or not (torch.is_grad_enabled() or module.training):
            return
        pairs = list(zip([old] if type(old) is torch.Tensor else _tensors(old),
                         [new] if type(new) is torch.Tensor else _tensors(new)))
        for before, after in pairs:
            if self._known(before):
                self._mark(after)
        owner = self._loss if index == 0 else next((i for i, _ in reversed(self._stack) if i >= 0), None)
        if owner is not None and torch.is_grad_enabled():
            for _, after in pairs:
                if after.requires_grad:
                    _watch_grad(self, after, owner, of_input=False)

    def _learn(self, module) -> int | None:
        """A torch.compile wrapper of the model (``OptimizedModule``) stands for the root."""
        inner = module._modules.get("_orig_mod")
        if inner is not None and id(inner) == self._root:
            self._index[id(module)] = 0
            self._wrapped = True
            return 0
        return None

    def _take(self, tensor: torch.Tensor, code: int) -> None:
        if not tensor.is_floating_point():
            return
        tensor = tensor.detach()
        self._pending.append((tensor.sum(dtype=torch.float32) if tensor.dtype in _HALF else tensor.sum(), code))
        if len(self._pending) >= PENDING:
            self.fold()

    def _take_grad(self, grad: torch.Tensor, index: int) -> None:
        code = PHASE + self._calls[1] * self._count + index
        if code >= STEP:
            return
        self._calls[1] += 1
        self._take(grad, code)

    # -- steps ------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(self) -> None:
        """The smallest code of a pending non-finite sum into this step's minimum. No sync."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        sums, key = zip(*pending)
        table = self._cache.get(key)
        if table is None:                        # made once per call sequence: a fresh tensor per step would copy
            if len(self._cache) >= 64:
                self._cache.clear()
            table = self._cache[key] = torch.tensor(key, dtype=torch.int64, device=self.device)
        values = _stack(list(sums), self.device)
        first = torch.where(torch.isfinite(values), NONE, table).amin()
        torch.minimum(self._step_min, first, out=self._step_min)

    def move(self, device: torch.device) -> None:
        """Fold the pending sums (on any device), then carry this step's and the window's keys to ``device``."""
        self.fold()
        self.device = torch.device(device)
        self._step_min, self._keys = moved(self._step_min, self.device), moved(self._keys, self.device)
        self._cache = {}

    def record(self, mask=None) -> None:
        """An applied optimizer step ends: its first non-finite code joins the window's."""
        self._end_step(0)

    def skip(self, mask=None) -> None:
        """A step a GradScaler skipped: its first non-finite code is an overflow, kept apart."""
        self._end_step(1)

    @torch.no_grad()
    def _end_step(self, slot: int) -> None:
        self.fold()
        within = min(self.steps - self._window_start, MAX_WINDOW_STEPS)
        key = torch.where(self._step_min < NONE, self._step_min + within * STEP, NONE)
        torch.minimum(self._keys[slot], key, out=self._keys[slot])
        self._step_min.fill_(NONE)
        self._calls = [0, 0]
        self._seen.clear()
        self.steps += 1

    # -- reading ----------------------------------------------------------------------------

    def device_tensors(self) -> dict[str, Reduced]:
        """The window's two keys negated, under MAX: across processes the largest negated key
        is the earliest occurrence on any rank (keys < 2 ** 53: exact in the float64 read-back)."""
        return {"keys": Reduced(self._window_keys().neg(), MAX)}

    @torch.no_grad()
    def _window_keys(self) -> torch.Tensor:
        """The window's (first, overflow) keys, the step in progress included in the first: a
        loop that skips the optimizer step on a NaN loss (``if not loss.isfinite(): continue``)
        never ends that step, and its NaN must still be the window's (at the step in progress)."""
        within = min(self.steps - self._window_start, MAX_WINDOW_STEPS)
        pending = torch.where(self._step_min < NONE, self._step_min + within * STEP, NONE)
        return torch.stack([torch.minimum(self._keys[0], pending), self._keys[1]])

    def read(self, values, reader) -> None:
        """``Window.first_nonfinite`` and ``first_overflow`` of every member's window (a batched
        model's members share one model: the source is the model's, not a member's)."""
        first, overflow = self.decode(values["keys"])
        if first is None and self.steps > self._window_start and not self._root_forwards:
            self._say_unseen()
        for window in reader.windows:
            window.first_nonfinite, window.first_overflow = first, overflow

    def _say_unseen(self) -> None:
        """Steps ran but no forward pass of the model reached the hooks: said when it is the
        model compiled in place (``Module.compile()``: its hooks run inside the compiled graph,
        where they do nothing), never a silent None."""
        model = self._model()
        if model is None or getattr(model, "_compiled_call_impl", None) is None:
            return
        message = ("nonfinite: the model is compiled in place (Module.compile()), so its forward runs inside the "
                   "compiled graph, where the monitor's hooks do nothing: the first non-finite value is not looked "
                   "for (use torch.compile(model), whose output the monitor checks as a whole)")
        if self.setup is not None:
            self.setup.warn("nonfinite-compiled", message)
        else:
            warnings.warn(message, stacklevel=3)

    def _compiled_inside(self, name: str) -> tuple[str, ...]:
        """The compiled modules at or inside ``name`` ("" for the model under a torch.compile wrapper)."""
        model = self._model()
        found = [""] if self._wrapped and name == "" else []
        if model is not None:
            found += [n for n, m in model.named_modules() if (n == name or not name or n.startswith(name + "."))
                      and (getattr(m, "_compiled_call_impl", None) is not None     # Module.compile()
                           or isinstance(getattr(m, "_orig_mod", None), nn.Module))]   # a torch.compile wrapper
        return tuple(found)

    def decode(self, negated) -> tuple[Source | None, Source | None]:
        """(first non-finite, first overflow) from the read-back of ``device_tensors``."""
        return tuple(self._source(int(-value)) for value in negated)

    def _source(self, key: int) -> Source | None:
        if key >= NONE:
            return None
        within, code = divmod(key, STEP)
        phase = BACKWARD if code >= PHASE else FORWARD
        name = self.names[code % PHASE % self._count]
        compiled = self._compiled_inside(name) if name not in (INPUT, LOSS) else ()
        return Source(name, phase, self._window_start + within, compiled)

    def read_now(self, combine=None) -> tuple[Source | None, Source | None]:
        """Fold, read the keys back (one host sync) and decode them, without closing the window;
        ``combine(tensor)`` may reduce the negated keys across processes (MAX) first."""
        self.fold()
        negated = self._window_keys().neg()
        if combine is not None:
            negated = combine(negated)
        return self.decode(negated.tolist())

    def reset(self) -> None:
        """Start the next window. The step in progress's first code went into the window just
        read (``_window_keys``): it is dropped, not reported again."""
        self._keys.fill_(NONE)
        self._step_min.fill_(NONE)
        self._window_start = self.steps
        self._root_forwards = 0


class _RootStart(LeavesCopiesAlone):
    """The pre-hook on the model that sees its keyword inputs; a spent hook in a copy of the model."""

    __slots__ = ("__weakref__", "part")
    KIND = "pre_kwargs"

    def __init__(self, part: FirstNonFinite) -> None:
        self.part = part

    def __call__(self, module, args, kwargs=None):
        # kwargs None: remove() in another thread took the handle's with_kwargs mark while torch
        # was calling its snapshot of the hooks; nothing to do then
        if kwargs:
            self.part._on_root_start(module, args, kwargs)


class _GradSum:
    """Tensor hook: the sum of the gradient with respect to one module's input (or output), put
    on ``index``. ``of_input``: the tensor is a module's first input (its gradient is that
    module's backward); otherwise a module's output, whose gradient the caller's code makes."""

    __slots__ = ("index", "of_input", "part")

    def __init__(self, part: FirstNonFinite, index: int, of_input: bool) -> None:
        self.part = part
        self.index = index
        self.of_input = of_input

    def __call__(self, grad):
        if grad is not None:                # an output of a multi-output node that the loss never used
            self.part._take_grad(grad, self.index)


def _watch_grad(part: FirstNonFinite, tensor: torch.Tensor, index: int, of_input: bool) -> None:
    """One ``_GradSum`` per tensor, put on the code that computes its gradient in backward: the
    first module that took it as its first input (an inner module before the container that
    shares its input); else the code that received it as an output, the outermost module's
    caller (a container returns its last child's output; the model's is the loss's)."""
    hooks = tensor._backward_hooks
    found = next((h for h in hooks.values() if type(h) is _GradSum), None) if hooks else None
    if found is None:
        tensor.register_hook(_GradSum(part, index, of_input))
    elif not found.of_input:
        found.index, found.of_input = index, of_input


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a tuple, list or mapping output, one level deep and one more for tuples
    (an LSTM's ``(output, (h, c))``)."""
    if isinstance(output, dict):
        output = list(output.values())
    elif not isinstance(output, (tuple, list)):
        return []
    found = []
    for item in output:
        if type(item) is torch.Tensor:
            found.append(item)
        elif isinstance(item, (tuple, list)):
            found.extend(t for t in item if type(t) is torch.Tensor)
    return found


def _stack(sums: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    try:
        return torch.stack(sums).to(device)
    except RuntimeError:                          # several devices (model parallel)
        return torch.stack([s.to(device) for s in sums])


def all_ranks_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise MAX of ``tensor`` over every process of the default group (one
    all-reduce; on the CPU for gloo), or ``tensor`` itself without an initialised group. Every
    rank must call it at the same point, as any collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = tensor.device if dist.get_backend() != "gloo" else torch.device("cpu")
    reduced = tensor.to(device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(tensor.device)
