"""Gradient through time: ||dL/dh_t||_2 of every layer and direction of ``nn.RNN``, ``nn.LSTM``
and ``nn.GRU``, at every time step t.

Why a recomputation: the fused kernels (cuDNN, ATen's ``lstm``/``gru``/``rnn_tanh``) run the whole
recurrence inside one autograd node. A hook on the module's output sees only the *direct* term
of dL/dh_t (from output t); the *total* derivative, through h_{t+1}, h_{t+2}, ..., never exists
as a tensor. So on a profiled forward pass a forward hook recomputes the output by unrolling the
same weights cell by cell, by the formulas of PyTorch's nn.RNN/LSTM/GRU docs (the input term
W_ih x_t + b_ih of every step in one product, as the fused kernels do; ``proj_size`` included),
and returns that output instead of the fused one. Each h_t is then a tensor of the
graph, used by the output and by step t+1, and a tensor hook on it receives the total gradient.
The fused output's graph is dropped: the parameters' gradients come from the unrolled graph,
equal to the fused path's up to float rounding (tests/monitor/test_through_time.py). The hooks
only keep the gradients; ``record()`` (at the optimizer step) takes all their norms in one
``torch._foreach_norm`` and adds them to per-layer sums on the device: no host sync per step.

Contract (``read()``, and ``Window.time`` in the GradientMonitor): a dict keyed
``"<module name>.l<k>"`` for layer k and ``"<module name>.l<k>_reverse"`` for its reverse
direction; each value a 1-D float64 array of length T whose entry t is the mean, over the
window's profiled passes, of ||dL/dh_t||_2 taken over batch and hidden units (for an LSTM h_t is
the hidden state, after the projection when ``proj_size`` > 0, never the cell). t = 0 is the
first time step of the sequence, also for the reverse direction (which processes it last).

What is profiled: training forward passes (grad mode on, outside backward and torch.compile
tracing) while ``active`` is True; the monitor turns it on for every N-th optimizer step. A
profiled pass counts when its backward reached at least one h_t. With gradient accumulation
every micro-batch of a profiled step is one pass.

Not covered, said out loud (one warning each): ``PackedSequence`` input (varying lengths: the
pass runs fused and unprofiled); a pass whose length T differs from the window's first
profiled pass (unprofiled); Python-looped cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``),
whose h_t a user's own loop owns: the monitor cannot tell which call is which time step.

Cost: a profiled pass runs the fused forward (discarded), then the unrolled forward and backward
(T x layers x directions cell calls). benchmarks/overhead.py measures it on the LSTM LM.

Example:
    >>> lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    >>> recorder = ThroughTime(lstm)
    >>> out, _ = lstm(torch.randn(5, 7, 3)); out[:, -1].sum().backward(); recorder.record()
    >>> sorted(recorder.read()), recorder.read()["l0"].shape
    (['l0', 'l1'], (7,))
    >>> recorder.remove()
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gradflow.monitor.part import Part, Reduced, Setup, moved, watch_forward_starts
from gradflow.monitor.spent import LeavesCopiesAlone

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")     # nn.RNNBase.mode of the modules profiled
CELL_MODULES = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)   # Python-looped cells: not covered


def recurrent_modules(model: nn.Module) -> list[tuple[str, nn.RNNBase]]:
    """(name, module) of every ``nn.RNN``/``nn.LSTM``/``nn.GRU`` in ``model`` (subclasses too,
    unless they override ``forward``: their output is not the stock one the hook replaces)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase) and module.mode in MODES and \
                type(module).forward in (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward):
            out.append((name, module))
    return out


def layer_keys(name: str, module: nn.RNNBase) -> list[str]:
    """The ``Window.time`` keys of one module, in slot order (layer k, then its reverse)."""
    prefix = f"{name}." if name else ""
    return [f"{prefix}l{k}{'_reverse' if d else ''}"
            for k in range(module.num_layers) for d in range(2 if module.bidirectional else 1)]


def cells_message(model: nn.Module) -> str | None:
    """The warning that names the model's Python-looped cells (``CELL_MODULES``), whose gradient
    through time is not profiled; None when it has none."""
    cells = [name for name, m in model.named_modules() if isinstance(m, CELL_MODULES)]
    if not cells:
        return None
    return (f"through time: {', '.join(cells[:3])} {'are' if len(cells) > 1 else 'is a'} Python-looped cell "
            "module(s) (nn.RNNCell/LSTMCell/GRUCell); their gradient through time is not profiled (only nn.RNN, "
            "nn.LSTM and nn.GRU are)")


# -- the recomputation ---------------------------------------------------------------------


def _weights(module: nn.RNNBase, suffix: str):
    w_ih, w_hh = getattr(module, f"weight_ih{suffix}"), getattr(module, f"weight_hh{suffix}")
    b_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
    b_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
    w_hr = getattr(module, f"weight_hr{suffix}") if getattr(module, "proj_size", 0) else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _step(mode: str, xw: torch.Tensor, h, c, w_hh, b_hh, w_hr):
    """(h_t, c_t) of one cell step (c is None except for an LSTM), from ``xw`` = W_ih x_t + b_ih
    (computed for every t at once) and the previous state, by the formulas of PyTorch's
    nn.RNN / nn.LSTM / nn.GRU docs (gate order i|f|g|o, r|z|n; an LSTM's projection
    h_t = W_hr (o_t * tanh(c_t)))."""
    hw = F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (xw + hw).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (F.linear(h, w_hr) if w_hr is not None else h), c
    if mode == "GRU":
        x_r, x_z, x_n = xw.chunk(3, dim=1)
        h_r, h_z, h_n = hw.chunk(3, dim=1)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + torch.sigmoid(x_r + h_r) * h_n)
        return n + z * (h - n), None                  # (1 - z) n + z h
    return (torch.tanh(xw + hw) if mode == "RNN_TANH" else torch.relu(xw + hw)), None


def unroll(module: nn.RNNBase, x: torch.Tensor, hx, watch=None):
    """The module's forward, cell by cell: (output (T, N, D*H_out), h_n, c_n or None).

    ``x``: (T, N, input_size), time first; ``hx``: None, h_0, or (h_0, c_0) for an LSTM, each
    (layers * D, N, H). ``watch(slot, t, h_t)`` is called on every hidden state (slot = layer *
    D + direction). Inter-layer dropout is applied as ``nn.RNNBase`` applies it (training only).
    """
    steps, batch = x.shape[0], x.shape[1]
    directions = 2 if module.bidirectional else 1
    out_size = getattr(module, "proj_size", 0) or module.hidden_size
    lstm = module.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, batch, out_size)
        c0 = x.new_zeros(module.num_layers * directions, batch, module.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
    layer_in, last_h, last_c = x, [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            slot = layer * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = _weights(module, f"_l{layer}{'_reverse' if direction else ''}")
            # Every step's input term in one product; unbind, not xw[t]: the backward of T selects
            # would build T full-size zero tensors, one unbind builds one.
            xw = F.linear(layer_in, w_ih, b_ih).unbind(0)
            h, c = h0[slot], c0[slot] if lstm else None
            sequence = [None] * steps
            for t in (range(steps - 1, -1, -1) if direction else range(steps)):
                h, c = _step(module.mode, xw[t], h, c, w_hh, b_hh, w_hr)
                if watch is not None:
                    watch(slot, t, h)
                sequence[t] = h
            outputs.append(torch.stack(sequence))
            last_h.append(h)
            last_c.append(c)
        layer_in = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_in = F.dropout(layer_in, module.dropout, training=True)
    return layer_in, torch.stack(last_h), torch.stack(last_c) if lstm else None


# -- the recorder --------------------------------------------------------------------------


@dataclass
class _Module:
    """One profiled module: its keys, its sums (slots, T) on the device, its passes."""

    name: str
    mode: str
    keys: list[str]
    sums: torch.Tensor | None = None        # (slots, T), allocated at the window's first pass
    steps: int = 0                          # T of this window's passes
    passes: int = 0                         # profiled passes whose backward reached an h_t
    pending: list = field(default_factory=list)   # per pass: {slot * T + t: grad}


class _Hook(LeavesCopiesAlone):
    """The forward hook on one recurrent module, registered ``with_kwargs`` (``rnn(x, hx=h0)``
    and ``rnn(input=x)`` are stock calls: the keyword state must be the one unrolled); a
    callable object that in a copy of the model becomes a spent hook that removes itself
    (``spent.py``)."""

    __slots__ = ("__weakref__", "index", "recorder")
    KIND = "forward_kwargs"

    def __init__(self, recorder: ThroughTime, index: int) -> None:
        self.recorder = recorder
        self.index = index

    def __call__(self, module, args, kwargs, output):
        recorder = self.recorder
        # eval mode with grad on: a validation pass, not a training one (it would fix the window's length)
        if not recorder.active or torch.compiler.is_compiling() or not module.training \
                or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None
        # nn.RNN/LSTM/GRU.forward(input, hx=None), either by position or by keyword
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        return None if x is None else recorder.profile(self.index, module, (x, hx), output)


class ThroughTime:
    """Profiles ||dL/dh_t|| on the forward passes it is ``active`` for; see the module docstring.

    Args:
        model: any nn.Module; its ``nn.RNN``/``nn.LSTM``/``nn.GRU`` modules are hooked.
        attach: hook them now (default); False: the caller hooks them with ``attach(model, keep)``
            (the monitor's part keeps the handles).

    ``active`` (default True) profiles the coming forward passes; the GradientMonitor sets it at
    each optimizer step. ``record()`` folds the passes since the last call into the window;
    ``read()`` gives the window's means; ``reset()`` starts the next window; ``remove()`` takes
    the hooks off (safe twice).

    Raises:
        nothing at attach; a model without recurrent modules gives an empty ``read()``.
    """

    def __init__(self, model: nn.Module, attach: bool = True, warn=None) -> None:
        found = recurrent_modules(model)
        self.modules = [_Module(name, module.mode, layer_keys(name, module)) for name, module in found]
        self.active = True
        self._warned: set[str] = set()
        self._warn_to = warn
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._handles: list = []
        # callables (module, fused output, unrolled output), told of each replaced output: a part
        # that watched the fused tensors watches the unrolled ones (the first non-finite source)
        self.replaced: list = []
        if attach:
            self.attach(model, self._handles.append)
        message = cells_message(model)
        if message:
            self._warn("cells", message)

    def attach(self, model: nn.Module, keep) -> None:
        """Hook the model's recurrent modules, handing each handle to ``keep``."""
        for i, (_, module) in enumerate(recurrent_modules(model)):
            keep(module.register_forward_hook(_Hook(self, i), with_kwargs=True))

    @property
    def cells(self) -> dict[str, str]:
        """Key -> the module's mode (``RNN_TANH``, ``RNN_RELU``, ``LSTM``, ``GRU``)."""
        return {key: m.mode for m in self.modules for key in m.keys}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _warn(self, key: str, message: str) -> None:
        if self._warn_to is not None:
            self._warn_to(key, message)
            return
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    # -- forward: replace the fused output -----------------------------------------------

    def profile(self, index: int, module: nn.RNNBase, inputs: tuple, fused=None):
        """The unrolled output of a profiled pass (the hook's return value), or None to keep
        the fused one (a case said in a warning). ``fused``: the module's own output, whose
        dtypes the unrolled one takes (under autocast an LSTM's is bfloat16/float16, while
        the unrolled cell state promotes to float32)."""
        entry = self.modules[index]
        x, hx = inputs[0], inputs[1] if len(inputs) > 1 else None
        if isinstance(x, PackedSequence):
            self._warn(f"packed:{entry.name}", f"through time: {entry.name or 'the model'} got a PackedSequence "
                       "(varying lengths): its gradient through time is not profiled (pad the batch to one length "
                       "to profile it)")
            return None
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        elif module.batch_first:
            x = x.transpose(0, 1)
        steps = x.shape[0]
        if _in_checkpoint():                        # before the window's sums and length are fixed by it
            self._warn(f"checkpoint:{entry.name}", f"through time: {entry.name or 'the model'} ran inside "
                       "torch.utils.checkpoint (use_reentrant=False): its gradient through time is not profiled "
                       "there (the recompute must save the same tensors as the forward, so the fused pass is kept)")
            return None
        if entry.steps and steps != entry.steps:
            self._warn(f"length:{entry.name}", f"through time: {entry.name or 'the model'} saw sequences of "
                       f"{steps} steps after {entry.steps} in one window; passes of another length than the "
                       "window's first are not profiled")
            return None
        if entry.sums is None:
            entry.steps = steps
            entry.sums = torch.zeros(len(entry.keys), steps, device=x.device, dtype=_wide(x.device))
        grads: dict[int, torch.Tensor] = {}        # slot * T + t -> dL/dh_t, summed over backward calls
        entry.pending.append(grads)

        def keep(g: torch.Tensor, at: int) -> None:
            # a second backward through the same pass (retain_graph=True, two losses) adds to dL/dh_t,
            # as it adds to p.grad: the norm is taken of the sum, never summed over calls
            grads[at] = g if at not in grads else grads[at] + g

        def watch(slot: int, t: int, h: torch.Tensor) -> None:
            if h.requires_grad:
                h.register_hook(lambda g, at=slot * steps + t: keep(g, at))

        output, h_n, c_n = unroll(module, x, hx, watch)
        if unbatched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif module.batch_first:
            output = output.transpose(0, 1)
        if fused is not None:
            state = fused[1] if module.mode == "LSTM" else (fused[1], None)
            output, h_n = output.to(fused[0].dtype), h_n.to(state[0].dtype)
            c_n = None if c_n is None else c_n.to(state[1].dtype)
        result = output, ((h_n, c_n) if module.mode == "LSTM" else h_n)
        for tell in self.replaced:
            tell(module, fused, result)
        return result

    # -- the optimizer step: fold into the window ----------------------------------------

    @torch.no_grad()
    def record(self) -> None:
        """Fold the profiled passes since the last call into the window's sums (no host sync)."""
        for entry in self.modules:
            pending, entry.pending = entry.pending, []
            for grads in pending:
                if not grads:                      # no backward reached this pass
                    continue
                where = tuple(grads)
                norms = torch._foreach_norm(list(grads.values()))
                index = self._index_cache.get(where)
                if index is None:
                    if len(self._index_cache) > 64:
                        self._index_cache.clear()
                    index = self._index_cache[where] = torch.tensor(where, device=entry.sums.device)
                # .to(sums): the same tensor unless the model moved to another device since this pass
                entry.sums.view(-1).index_add_(0, index, torch.stack(norms).to(entry.sums))
                entry.passes += 1

    def read(self) -> dict[str, np.ndarray]:
        """The window's profile: key -> (T,) float64 mean over profiled passes of ||dL/dh_t||_2.
        Modules with no profiled pass in the window are left out. One host copy per module."""
        out: dict[str, np.ndarray] = {}
        for entry in self.modules:
            if entry.passes == 0 or entry.sums is None:
                continue
            means = entry.sums.double().cpu().numpy() / entry.passes
            out.update({key: means[slot].copy() for slot, key in enumerate(entry.keys)})
        return out

    def passes(self) -> dict[str, int]:
        """Key -> profiled passes in the window."""
        return {key: entry.passes for entry in self.modules for key in entry.keys if entry.passes}

    def move(self, device: torch.device) -> None:
        """Fold the pending passes, then carry the window's sums to ``device``."""
        self.record()
        for entry in self.modules:
            if entry.sums is not None:
                entry.sums = moved(entry.sums, device, wide=True)
        self._index_cache = {}

    def reset(self) -> None:
        """Start the next window (a new length T may come with it)."""
        for entry in self.modules:
            entry.sums, entry.steps, entry.passes, entry.pending = None, 0, 0, []


def _in_checkpoint() -> bool:
    """True inside the forward of a non-reentrant activation checkpoint (``torch.utils.checkpoint``
    with ``use_reentrant=False``): its saved-tensor hooks are on top. Its recompute in backward
    runs the fused module, which saves other tensors than the unrolled forward, and
    torch raises CheckpointError, so such a pass is left fused."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# -- the horizon ---------------------------------------------------------------------------

HORIZON_FRACTION = 1e-3   # a step counts while ||dL/dh_t|| >= this share of the profile's largest


def far_end(key: str) -> int:
    """Index of the time step a layer processes first, where its gradient through time arrives
    last: 0 for a forward direction, -1 (T - 1) for ``_reverse``."""
    return -1 if key.endswith("_reverse") else 0


def horizon(profile: np.ndarray, fraction: float = HORIZON_FRACTION) -> int:
    """How many of the T time steps the gradient reaches at no less than ``fraction`` of its
    largest ||dL/dh_t|| (the step nearest the loss, for a loss on the last output).

    Definition: #{t : ||dL/dh_t|| >= fraction * max_s ||dL/dh_s||}. It is the batch-level
    form of Pascanu, Mikolov & Bengio 2013's "steps in the past" (their code, ``RNN.py`` in
    pascanur/trainingRNNs: the share of (time step, example) pairs whose ||dC/dh_t||^2 is at
    least 1e-20), made relative so that it does not depend on the loss's scale: with a loss on
    the last step only, a horizon of k means the last k steps get a usable gradient. 0 when the
    profile is all zero.

    Example:
        >>> horizon(np.array([1e-9, 1e-4, 1e-2, 1.0]))
        2
    """
    profile = np.asarray(profile, dtype=np.float64)
    top = np.nanmax(profile) if profile.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return 0
    return int(np.count_nonzero(profile >= fraction * top))


def reach(profile: np.ndarray, key: str = "") -> float:
    """||dL/dh||, at the step the layer processes first (t = 0 forward, T - 1 reverse), over its
    largest: how much of the gradient gets all the way back. NaN for an all-zero profile.

    Example:
        >>> reach(np.array([1e-9, 1e-4, 1.0]))
        1e-09
    """
    profile = np.asarray(profile, dtype=np.float64)
    top = np.nanmax(profile) if profile.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return float("nan")
    return float(profile[far_end(key)] / top)


def growth(profile: np.ndarray, key: str = "") -> float:
    """||dL/dh||, at the step the layer processes first, over that at the step it processes
    last: > 1 when the gradient grows on its way back through time (exploding). NaN when the
    last step's is zero."""
    profile = np.asarray(profile, dtype=np.float64)
    near = profile[-1 - far_end(key)] if profile.size else 0.0
    if not np.isfinite(near) or near <= 0:
        return float("nan")
    return float(profile[far_end(key)] / near)


def time_scalars(time: dict[str, np.ndarray]) -> dict[str, float]:
    """TensorBoard scalars of a window's profile: ``time/<key path>/horizon`` (steps),
    ``.../reach`` (first-processed step over the largest) and ``.../grad_last`` (||dL/dh|| at
    the step processed last)."""
    out = {}
    for key, profile in time.items():
        path = key.replace(".", "/")
        out[f"time/{path}/horizon"] = float(horizon(profile))
        out[f"time/{path}/reach"] = reach(profile, key)
        out[f"time/{path}/grad_last"] = float(profile[-1 - far_end(key)]) if len(profile) else float("nan")
    return out


# -- the monitor's part ----------------------------------------------------------------------


class ThroughTimePart(Part):
    """The GradientMonitor's part (``parts.PARTS``): a ``ThroughTime`` recorder whose hooks the
    part keeps, profiling the forward pass after every ``through_time_every``-th recorded step
    (and the first one), folding at each step, filling ``Window.time``, ``Window.time_cells``
    and the ``time/<key>/horizon|reach|grad_last`` scalars. Absent with ``through_time=False``,
    with ``members`` > 1 (a stock recurrent module has no member dimension) or when the model
    has no ``nn.RNN``/``nn.LSTM``/``nn.GRU``.
    """

    name = "time"

    @classmethod
    def create(cls, model: nn.Module, setup: Setup) -> ThroughTimePart | None:
        if not setup.options.get("through_time", True):
            return None
        if not recurrent_modules(model):
            message = cells_message(model)        # a model of cells only: said, as the docs promise
            if message:
                setup.warn("cells", message)
            return None
        if setup.members != 1 or getattr(setup, "sharding", None) is not None:
            # A stacked (members > 1) or sharded (DTensor) recurrent layer cannot be unrolled cell by
            # cell with its own weights: said, and left out; every other part still records.
            why = f"members={setup.members}" if setup.members != 1 else "DTensor (sharded) parameters"
            setup.warn("time-unsupported", f"gradient through time is not recorded with {why}: the recurrence "
                       "cannot be recomputed cell by cell there (Window.time stays empty)")
            return None
        return cls(model, setup)

    def __init__(self, model: nn.Module, setup: Setup) -> None:
        super().__init__(model, setup)
        self.every = setup.options.get("through_time_every", 50)
        self.seen = 0
        self.missed = 0           # profiled steps of this window in which no recurrent layer's forward was profiled
        self.recorder = ThroughTime(model, attach=False, warn=setup.warn)
        self.recorder.replaced = setup.output_replaced
        self._model = weakref.ref(model)

    def hook(self, model: nn.Module) -> None:
        # Its hooks take tensors at every training pass: the conversions check sees each start first
        watch_forward_starts(self, model, call=False, always=True)
        self.recorder.attach(model, self.keep)

    def record(self, mask) -> None:
        if self.recorder.active and not any(entry.pending for entry in self.recorder.modules):
            self.missed += 1
        self.recorder.record()
        self.seen += 1
        self.recorder.active = self.seen % self.every == 0

    def skip(self, mask) -> None:
        """A step a GradScaler skipped (an overflow): its profiled passes' gradients are still
        scaled and may be inf; they are dropped, not averaged in."""
        for entry in self.recorder.modules:
            entry.pending = []

    def fold(self) -> None:
        self.recorder.record()

    def move(self, device: torch.device) -> None:
        self.recorder.move(device)

    def device_tensors(self) -> dict[str, Reduced]:
        return {str(i): Reduced(entry.sums) for i, entry in enumerate(self.recorder.modules)
                if entry.sums is not None and entry.passes}

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        time: dict[str, np.ndarray] = {}
        for i, entry in enumerate(self.recorder.modules):
            if str(i) in values:
                means = np.asarray(values[str(i)], dtype=np.float64).reshape(len(entry.keys), -1) / entry.passes
                time.update({key: means[slot].copy() for slot, key in enumerate(entry.keys)})
        if not time and self.missed:
            self._say_unprofiled()
        window = reader.windows[0]
        window.time, window.time_cells = time, {k: c for k, c in self.recorder.cells.items() if k in time}
        reader.scalars[0].update(time_scalars(time))

    def _say_unprofiled(self) -> None:
        """A window whose profiled steps saw no forward pass of a recurrent layer: said, with
        torch.compile named first where the model or a block around a layer is compiled (the
        hook does nothing inside a compiled graph)."""
        model = self._model()
        compiled = self.setup.options.get("compiled") or (model is not None and any(
            getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()))
        why = ("the model runs compiled (torch.compile): the recomputation cannot run inside a compiled graph, so "
               "compiled recurrent layers are not profiled" if compiled else
               "they ran only under no_grad, in eval mode (model.eval()) or inside backward, or not at all, or with "
               "PackedSequence input or another length than the window's first (said above), or under torch.compile "
               "(compiled layers are not profiled)")
        names = ", ".join(entry.name or "the model" for entry in self.recorder.modules[:3])
        self.setup.warn("time-unprofiled", f"through time: {self.missed} step(s) were to be profiled, but no forward "
                        f"pass of {names} was profiled: {why}; Window.time stays empty")

    def reset(self) -> None:
        self.missed = 0
        self.recorder.reset()
