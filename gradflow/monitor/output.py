"""Where a monitor's windows go: one sink per member (or one for all, with ``member_<k>/``
tags), and the pool that sums histograms over ``histograms=N`` windows before writing them.

Example (the monitor's own; ``GradientMonitor.log`` and ``flush`` drive it)::

    output = Output(writer, members=1, every=1)
    output.write(reader.scalars, reader.wanted, step, final=False, texts=reader.texts)   # at each log()
    output.flush()                                                     # at remove()
"""

from __future__ import annotations

import warnings

from gradflow.monitor.histograms import HistogramPool, HistogramRequests, as_dict
from gradflow.monitor.tensors import MonitorError


class Output:
    """The sinks of one monitor and its histogram pool (``every``: windows per histogram; 0: none)."""

    def __init__(self, writer, members: int, every: int) -> None:
        self.members = members
        self.sinks = _sinks(writer, members)
        self.pool = HistogramPool(every) if every else None

    @property
    def draws(self) -> bool:
        """Whether any histogram is written: a sink that takes them (``Sink.draws``), and
        ``histograms`` not False."""
        return self.pool is not None and any(sink.draws for _, sink, _ in self.sinks)

    def write(self, scalars: list[dict[str, float]], wanted: HistogramRequests, step: int, final: bool,
              texts: list[dict[str, str]] | None = None) -> None:
        """Write a window's scalars and texts (tag -> Markdown; few windows have any) at ``step``,
        and its histograms once the pool holds ``every`` windows (at once when ``final``: no
        flush() will follow)."""
        histograms = self._histograms(wanted, step, final)
        failed = []
        for k, sink, prefix in self.sinks:
            error = None        # the other sinks still get the window; a sink whose log() raised, its texts
            try:                # (a TeeSink's log() raises after its other sinks got the scalars)
                sink.log(_prefixed(prefix, scalars[k]), _given(sink, prefix, histograms[k] if histograms else {}), step)
            except Exception as raised:
                error = raised
            if texts and texts[k]:
                try:
                    sink.text(_prefixed(prefix, texts[k]), step)
                except Exception as raised:
                    error = error or raised
            if error is not None:
                failed.append((sink, error))
        if failed:
            raise_failed(failed, f"log({step})")

    def _histograms(self, wanted: HistogramRequests, step: int, final: bool) -> list[dict] | None:
        if not self.draws:
            return None
        self.pool.add(wanted, step)
        if not self.pool.full and not final:
            return None
        return self.pool.take(self.members)[1]

    def flush(self) -> None:
        """Write the histograms of windows still pooling, at the step of the last of them."""
        taken = self.pool.take(self.members) if self.pool is not None else None
        if taken is None:
            return
        step, histograms = taken
        failed = []
        for k, sink, prefix in self.sinks:
            if histograms[k]:
                try:
                    sink.log({}, _given(sink, prefix, histograms[k]), step)
                except Exception as error:
                    failed.append((sink, error))
        raise_failed(failed, "flush()")

    def release(self) -> None:
        """Each sink lets go of what it holds open between windows (``Sink.release``): at remove().
        Never raises: a user's sink whose ``release`` raises (a logger's run already closed) is a
        warning, and every other sink is still released (``remove()`` never raises)."""
        from gradflow.monitor.sinks import describe, first_line

        for sink in {id(sink): sink for _, sink, _ in self.sinks}.values():
            try:
                sink.release()
            except Exception as error:
                warnings.warn(f"GradientMonitor.remove(): the hooks are removed, but {describe(sink)}.release() raised "
                              f"{type(error).__name__}: {first_line(error)}", stacklevel=3)


def raise_failed(failed: list[tuple[object, Exception]], call: str) -> None:
    """One MonitorError for the sinks that raised while a window was written (each sink was
    still given the window), chained to the first error; nothing where none did."""
    if not failed:
        return
    from gradflow.monitor.sinks import describe, first_line

    sink, error = failed[0]
    more = f" (and {len(failed) - 1} more sink(s))" if len(failed) > 1 else ""
    raise MonitorError(f"{call}: writing the window to {describe(sink)} failed{more}: {type(error).__name__}: "
                       f"{first_line(error)}; the window is closed and kept in monitor.history, and the "
                       f"next one starts empty") from error


def _given(sink, prefix: str, histograms) -> dict:
    """A member's histograms as ``sink`` is handed them: a dict (``histograms.as_dict``), or the
    kernel's ``BuiltHistograms`` as they are where the sink takes them (``Sink.built_histograms``)."""
    if prefix or not getattr(sink, "built_histograms", False):
        histograms = as_dict(histograms)
    return _prefixed(prefix, histograms)


def _prefixed(prefix: str, by_tag: dict) -> dict:
    """``by_tag`` with ``prefix`` before each tag; itself, uncopied, where there is none (one member)."""
    return {prefix + tag: v for tag, v in by_tag.items()} if prefix else by_tag


def _sinks(writer, members: int) -> list[tuple[int, object, str]]:
    """(member, sink, tag prefix) for each member: one writer per member, or one for all with
    ``member_<k>/`` tags."""
    if writer is None:
        return []
    from gradflow.monitor.sinks import (
        as_sink,  # imports TensorBoard's protos only when writing
    )

    if isinstance(writer, (list, tuple)):
        if len(writer) != members:
            raise MonitorError(f"got {len(writer)} writers for members={members}; pass one writer per member or one in all")
        return [(k, as_sink(w), "") for k, w in enumerate(writer)]
    sink = as_sink(writer)
    return [(k, sink, f"member_{k}/" if members > 1 else "") for k in range(members)]
