"""A custom accelerate loop: record when ``accelerator.sync_gradients`` is true.

Under ``accelerator.accumulate(model)`` every micro-batch runs backward, but only the last of each
accumulation cycle synchronises gradients (DDP all-reduce) and lets ``optimizer.step()`` through;
that is the step whose gradient is final. Attach the monitor with ``automatic=False`` (accelerate
wraps the optimizer and skips the torch step on the other micro-batches) and call
``record_if_synced`` between backward (and any ``accelerator.clip_grad_norm_``) and
``optimizer.step()`` (not run as a doctest: it needs an ``Accelerator`` and a loader;
``tests/integrations/test_accelerate_recipe.py`` runs it):

    >>> from gradflow import GradientMonitor
    >>> from gradflow.integrations.accelerate import record_if_synced
    >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)          # doctest: +SKIP
    >>> writer = SummaryWriter("runs/mine") if accelerator.is_main_process else None      # doctest: +SKIP
    >>> monitor = GradientMonitor(accelerator.unwrap_model(model), writer, automatic=False)  # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                                           # doctest: +SKIP
    ...     with accelerator.accumulate(model):
    ...         accelerator.backward(loss_fn(model(x), y))
    ...         if accelerator.sync_gradients:
    ...             accelerator.clip_grad_norm_(model.parameters(), 1.0)   # seen: norm before clipping
    ...         record_if_synced(monitor, accelerator, optimizer)
    ...         optimizer.step(); optimizer.zero_grad()
    ...     if (step + 1) % 100 == 0:
    ...         monitor.log(step)
    >>> monitor.remove()                                                                 # doctest: +SKIP

On several processes, attach the monitor and call ``record_if_synced`` and ``log`` on every process
(only the main process needs a writer): a sharded (FSDP2) model's windows close with collectives that
every rank joins (docs/sharding.md). accelerate 1.x selects its FSDP path for accelerator devices only;
on CPU it runs DDP (``MULTI_CPU``), so its FSDP2 path is not tested here. DeepSpeed is refused at attach.

Recording after ``clip_grad_norm_`` gives what the optimizer applies; ``grad/total_norm_before_clip``
then carries the norm before clipping. Unscaled under fp16: ``accelerator.clip_grad_norm_`` unscales
first; without clipping, the gradient is still scaled at this point (call
``accelerator.unscale_gradients()`` first if you record fp16 runs without clipping).
"""

from __future__ import annotations

from typing import Any


def record_if_synced(monitor: Any, accelerator: Any, optimizer: Any = None) -> bool:
    """``monitor.record(optimizer)`` if this micro-batch ends an accumulation cycle; True if it did.

    ``optimizer`` may be accelerate's wrapped optimizer (its torch optimizer is used), or None
    to record every monitored parameter.

    Raises:
        TypeError: ``monitor`` is not a GradientMonitor (no ``record``; the model passed first, say)
            or ``accelerator`` is not an ``accelerate.Accelerator`` (no ``sync_gradients``).

    Example:
        >>> record_if_synced(monitor, accelerator, optimizer)          # doctest: +SKIP
        True
    """
    if not callable(getattr(monitor, "record", None)):
        raise TypeError(f"record_if_synced(monitor, accelerator, optimizer): monitor must be a GradientMonitor "
                        f"(attached with automatic=False), got {type(monitor).__name__}")
    if not hasattr(accelerator, "sync_gradients"):
        raise TypeError(f"record_if_synced(monitor, accelerator, optimizer): accelerator must be an "
                        f"accelerate.Accelerator (it reads accelerator.sync_gradients), got {type(accelerator).__name__}")
    if not accelerator.sync_gradients:
        return False
    monitor.record(optimizer=getattr(optimizer, "optimizer", optimizer))
    return True
