"""Says so when training ran but the monitor recorded nothing: a window with no recorded step,
no gradient on any parameter at ``log()``, and yet the weights changed or forward passes ran.

The monitor records at a ``torch.optim`` optimizer's step (or ``record()``); training that
never steps one is invisible to it, and ``log()`` would return ``{}`` with no word:

- a hand-written update (``p -= lr * p.grad``, then ``p.grad = None``), an optimizer that is
  not a ``torch.optim.Optimizer``, one whose ``step`` was replaced after it was made (torch hooks
  the step it had then), or one that steps copies of the parameters (fp32 master
  weights of a half-precision model, copied back after the step): the parameters' version
  counters moved (every in-place write bumps them) with no step recorded;
- ``torch.func`` training (``functional_call`` + ``grad``): gradients are returned, never
  stored in ``.grad``; training forward passes ran (grad mode on) with no step recorded;
- an update through ``.data`` (``p.data -= lr * p.grad``, then ``p.grad = None``): torch does
  not count a write through ``.data`` as a change (no version bump), so it is told from the
  weights part's distance moved over the window (``Window.weights``' ``update_ratio`` > 0);
  without the weights part (``weights=False``) the warning names both causes;
- a model whose parameters are all frozen (``requires_grad`` False): passes ran, and nothing
  can have a gradient (a frozen backbone monitored while only a head outside it trains).

One warning per monitor, naming the likely cause and ``record()``. Windows that recorded a
step, or whose parameters still hold gradients (the gradients part warns about those), are
not this part's business.
"""

from __future__ import annotations

from gradflow.monitor.part import Part, watch_forward_starts

HAND_WRITTEN = ("log(): the parameters changed in place but no optimizer step was recorded in this window: a "
                "hand-written update (p -= lr * p.grad), an optimizer that is not a torch.optim.Optimizer, a "
                "torch.optim.Optimizer whose step was replaced after it was made (on its class or the instance: "
                "torch's step hooks do not run), or one that steps copies of the parameters (fp32 master weights "
                "copied back into the model) is not seen. "
                "Call monitor.record() where the gradient is final, before the update")
THROUGH_DATA = ("log(): the weights moved but no optimizer step was recorded in this window, and torch saw no "
                "in-place change: a hand-written update through .data (p.data -= lr * p.grad) is not seen. Call "
                "monitor.record() where the gradient is final, before the update")
FUNCTIONAL = ("log(): {n} training forward passes ran but no gradient reached the parameters' .grad and no "
              "optimizer step was recorded in this window: torch.func training (functional_call + grad) "
              "returns gradients without storing them. Set p.grad from them and call monitor.record()")
FROZEN = ("log(): {n} training forward passes ran but every monitored parameter is frozen (requires_grad False), "
          "so none can have a gradient to record. Attach the monitor to the model that trains, or unfreeze "
          "its parameters (p.requires_grad_(True))")


class Unrecorded(Part):
    """Training the monitor could not see: warned at ``log()`` (module docstring)."""

    name = "unrecorded"

    def __init__(self, model, setup) -> None:
        super().__init__(model, setup)
        self.passes_before = 0                   # the schedule's count of training passes at the window's start
        self.versions: list[int] = []

    def hook(self, model) -> None:
        watch_forward_starts(self, model, call=False)      # training passes counted: Schedule.passes

    def reset(self) -> None:
        self.passes_before = self.setup.schedule.passes
        self.setup.schedule.watch_until_step()     # every training pass counted until the window's first step
        self.versions = [p._version for p in self.setup.params]

    def bind(self, params) -> None:
        self.versions = [p._version for p in params]

    def read(self, values, reader) -> None:
        if any(window.steps or window.overall.get("skipped_steps") for window in reader.windows):
            return
        params = self.setup.params
        if any(p.grad is not None for p in params):
            return                                   # the gradients part says "no step was recorded"
        if any(p._version != v for p, v in zip(params, self.versions)):
            self.setup.warn("unrecorded", HAND_WRITTEN)
        elif moved := _moved(reader.windows):
            self.setup.warn("unrecorded", THROUGH_DATA)
        elif forwards := self.setup.schedule.passes - self.passes_before:
            frozen = not any(p.requires_grad for p in params)
            said = (FROZEN if frozen else FUNCTIONAL).format(n=forwards)
            if moved is None and not frozen:         # no weight rows: an update through .data cannot be told apart
                said += (" (or a hand-written update through .data, p.data -= lr * p.grad, which torch does not count "
                         "as a change: call monitor.record() before it)")
            self.setup.warn("unrecorded", said)


def _moved(windows) -> bool | None:
    """Whether any weight moved over the window (a row's ``update_ratio`` > 0); None where the
    windows have no weight rows (``weights=False``)."""
    rows = [row for window in windows for row in window.weights.values()]
    if not rows:
        return None
    return any(row.get("update_ratio", 0.0) > 0 for row in rows)     # NaN (a zero start) is not > 0

