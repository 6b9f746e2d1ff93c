"""Weight norms, their histograms and how far the weights moved over a window.

Memory: one copy of each trainable parameter, in its own dtype (the window's start, for the
update ratio), updated in place at each window's end; none of a frozen one (``requires_grad``
False): whether a frozen weight moved is told by its version counter, which every in-place
change bumps, so its update ratio is 0 while untouched and NaN (unknown) once something wrote
to it. One unfrozen later gets its copy at the end of the window it was unfrozen in. No
per-element index tensors: each parameter is reduced on its own, its members (a
batched model) as consecutive segments, in chunks (``stats.CHUNK``) on the torch path.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from gradflow.monitor import columns as C
from gradflow.monitor import stats as S
from gradflow.monitor.part import Part, Reduced, Setup
from gradflow.monitor.sharding import is_dtensor, local
from gradflow.monitor.tensors import MonitorError, _flat_copy
from gradflow.monitor.window import tag_path

# Parameters up to this many values are folded together, a group at a time: below it the kernel
# call's fixed cost (~20 us) is most of the work. A group's values add up to at most TINY_GROUP,
# so the copy it takes each window stays small (64 KB).
# bfloat16 and float16 weights on the CPU are converted to float32 this many values at a time
# (two 64 KB buffers, the weights' piece and the start's, made for the fold and freed after it)
# and folded by the fused kernel: exact, as every half-precision value is a float32 one. The
# torch ops' float64 chunks held about 0.5 MB at log() and made a 4 MB bfloat16 MLP's peak 1.24x
# its bytes (benchmarks/memory.py).
CONVERTED_PIECE = 1 << 14
_HALF = (torch.bfloat16, torch.float16)
TINY = 4096
TINY_GROUP = 16384
_IN_GRADIENT_ROWS = tuple(f"weight_{key}" for key in C.WEIGHT)   # the weight row's columns in the gradient row


class Weights(Part):
    """L1 and L2 norm of each parameter and how far it moved over the window."""

    name = "weights"

    @classmethod
    def create(cls, model, setup: Setup) -> Weights | None:
        return cls(model, setup) if setup.options.get("weights", True) else None

    def __init__(self, model, setup: Setup) -> None:
        super().__init__(model, setup)
        self.members = setup.members
        # The weights' counts feed their histograms alone: where none is written (no writer, or
        # histograms=False) they are not kept, 4 KB per parameter less at each log(). Sharded, every
        # rank keeps them: the ranks' read-backs are reduced together (often rank 0 alone writes).
        self.counted = setup.options.get("drawn", True) or setup.sharding is not None
        self._slot_tags: list | None = None
        self.bind(setup.params)

    def bind(self, params: list[torch.Tensor]) -> None:
        """Follow these tensors (a first binding, or replacements): the window restarts from
        their values."""
        self.params = params
        self.slots = len(params) * self.members
        old = getattr(self, "start", None)
        # a conversion (.double(), .to(device)) keeps the window's start, converted; a DTensor: its own shard
        sources = [None if not p.requires_grad else
                   old[i] if old is not None and old[i] is not None and old[i].shape == local(p).shape
                   else local(p.detach()) for i, p in enumerate(params)]
        start, places = _packed(sources, params)
        self.versions = [p._version for p in params]
        self._scratch = S.Scratch()         # its buffers: the parameters' device
        self.tiny = [tuple(group) for group in _tiny_groups(params, start)]
        self.grouped = {i for group in self.tiny for i in group}
        k = self.members
        # Per group: its flat start (a run of the packed buffer: the members are consecutive
        # float32 CPU parameters with a start, so their copies lie end to end), the members'
        # lengths, their slots.
        self._flat_starts: dict[tuple[int, ...], tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
        for group in self.tiny:
            buffer, offset = places[group[0]]
            flat = buffer[offset:offset + sum(start[i].numel() for i in group)]
            self._flat_starts[group] = (flat, np.repeat([params[i].numel() // k for i in group], k),
                                        np.array([i * k + m for i in group for m in range(k)]))
        self.start = start
        self._whole = len(self.tiny) == 1 and self.tiny[0] == tuple(range(len(params)))

    @torch.no_grad()
    def summary(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slots, 4) rows of L1 norm, L2 norm, distance moved and L2 norm at the start (moved:
        NaN for a frozen parameter written to since the window began); and (slots, 512) int64
        histogram counts, None unless ``counted``. The current weights become the next window's start."""
        k = self.members
        if self._whole:                     # one tiny group holds every parameter in order: its rows are the window's
            rows, counts = self._fold_group(self.tiny[0])
            np.sqrt(rows[:, 1:], out=rows[:, 1:])     # numpy's: a torch op on a 12-row table cost as much again
            return torch.from_numpy(rows), None if counts is None else torch.from_numpy(counts)
        device = local(self.params[0]).device
        rows = torch.empty(self.slots, 4, dtype=S.wide_dtype(device), device=device)
        counts = torch.empty(self.slots, S.SIGN_EXPONENT_BINS, device=device, dtype=torch.int64) if self.counted \
            else None
        ranged = {}                         # float64 parameters' norms over float64's range, by index
        for group in self.tiny:             # a few thousand values: one call for the group, not one each
            self._fold_tiny(group, rows.numpy(), None if counts is None else counts.numpy())
        for i, p in enumerate(self.params):
            if i in self.grouped:
                continue
            now = local(p.detach()).reshape(-1)
            start = self.start[i]
            before = now if start is None else start.reshape(-1)
            rows[i * k:(i + 1) * k], folded, renewed = self._fold(
                now, before, now.numel() // k, renew=start is not None and start.is_contiguous())
            # before the start is renewed: its norms too; only where the plain sums left their range
            if now.dtype == torch.float64 and now.numel() and S.beyond_squares(rows[i * k:(i + 1) * k, 1:]):
                ranged[i] = _scaled_norms(now, before, k)
            if counts is not None:
                counts[i * k:(i + 1) * k] = folded
            if start is None:               # frozen at attach: moved only if something wrote to it
                if p._version != self.versions[i]:
                    rows[i * k:(i + 1) * k, 2] = float("nan")
                if p.requires_grad:         # unfrozen since attach: followed from the next window on
                    self.start[i] = local(p.detach()).clone()
            elif not renewed:               # the fused kernel wrote the next start as it read (renew)
                start.copy_(local(p.detach()))
            self.versions[i] = p._version
        rows[:, 1:].sqrt_()
        for i, norms in ranged.items():     # a float64 weight's squares overflow past 1e154 (vanish below 1e-162)
            row = rows[i * k:(i + 1) * k, 1:]
            row.copy_(torch.where(row.isnan(), row, norms.to(rows.dtype)))    # NaN: a frozen weight written to
        return rows, counts

    def _fold_tiny(self, group: tuple[int, ...], rows: np.ndarray, counts: np.ndarray | None) -> None:
        """Fold a group of tiny float32 CPU parameters in one kernel call (``_tiny_groups``) into
        their slots of ``rows`` and ``counts`` (None: not kept)."""
        slots = self._flat_starts[group][2]
        rows[slots], folded = self._fold_group(group)
        if counts is not None:
            counts[slots] = folded

    def _fold_group(self, group: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """A tiny group's rows (sums, not yet square-rooted) and counts (None where not
        ``counted``), one per member of each of its parameters in order; its start renewed."""
        start, lengths, _ = self._flat_starts[group]
        now = _flat_copy([self.params[i] for i in group])      # under no_grad (summary): no detach() each
        if now.numel() != start.numel():       # cannot happen unless a parameter was resized in place
            raise MonitorError("a monitored parameter changed size; create a new GradientMonitor after resizing parameters")
        # renew: the kernel writes the current weights into the (flat, contiguous) start as it reads them
        folded = S.fused_kernels(now.device).fold_weights(now.numpy(), start.numpy(), lengths, renew=True,
                                                          count=self.counted)
        for i in group:
            self.versions[i] = self.params[i]._version
        return folded

    def _fold(self, now: torch.Tensor, start: torch.Tensor, length: int,
              renew: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Rows [sum |w|, sum w², sum (w - start)², sum start²] and counts of each member (None
        where not ``counted``, on the fused path), and whether ``start`` (contiguous, when
        ``renew`` asks it) now holds ``now``: the fused kernel writes it in the same pass, which
        saves the window a second pass over both."""
        if length == 0:       # an empty shard (a DTensor's, on some ranks): nothing to add, one row per member
            members = self.members
            return (torch.zeros(members, 4, dtype=S.wide_dtype(now.device), device=now.device),
                    torch.zeros(members, S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=now.device), False)
        kernels = S.fused_kernels(now.device)
        if kernels is not None and now.dtype == torch.float32 and start.dtype == torch.float32:
            lengths = np.full(now.numel() // length, length, dtype=np.int64)
            rows, counts = kernels.fold_weights(now.contiguous().numpy(), start.contiguous().numpy(), lengths,
                                                renew=renew, count=self.counted)
            return torch.from_numpy(rows), None if counts is None else torch.from_numpy(counts), renew
        if kernels is not None and now.dtype in _HALF and start.dtype == now.dtype:
            return (*self._fold_converted(kernels, now, start, length), False)
        wide = S.wide_dtype(now.device)
        chunk = S.CPU_WIDE_CHUNK if now.device.type == "cpu" else S.CHUNK     # float64 temporaries of a chunk each
        out_rows, out_counts = [], []
        for member in range(now.numel() // length):
            w, s = now[member * length:(member + 1) * length], start[member * length:(member + 1) * length]
            sums = torch.zeros(4, dtype=wide, device=now.device)
            counts = torch.zeros(S.SIGN_EXPONENT_BINS, dtype=torch.int64, device=now.device)
            for a, b in zip(w.split(chunk), s.split(chunk)):
                a64, b64 = a.to(wide), b.to(wide)
                sums += torch.stack([a64.abs().sum(), a64.square().sum(), (a64 - b64).square().sum(), b64.square().sum()])
                if self.counted:            # the histograms' counts alone (the fused kernel counts as it sums)
                    self._scratch.count_exponents(counts, a)
            out_rows.append(sums)
            out_counts.append(counts)
        return torch.stack(out_rows), torch.stack(out_counts), False

    def _fold_converted(self, kernels, now: torch.Tensor, start: torch.Tensor,
                        length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_fold``'s rows and counts of a bfloat16 or float16 CPU parameter (1-D ``now`` and
        ``start``, members of ``length`` values each), converted ``CONVERTED_PIECE`` values at a
        time into two reused float32 buffers and folded by the fused kernel; the sums of a
        member's pieces add up to its row (the kernel's rows are sums, not yet square-rooted)."""
        members = now.numel() // length
        rows = np.zeros((members, 4))
        counts = np.zeros((members, S.SIGN_EXPONENT_BINS), np.int64) if self.counted else None
        converted = torch.empty(2, min(CONVERTED_PIECE, length), dtype=torch.float32)   # whatever the default dtype
        for member in range(members):
            segment = slice(member * length, (member + 1) * length)
            for values, first in S.float32_pieces([now[segment], start[segment]], CONVERTED_PIECE, converted):
                piece, folded = kernels.fold_weights(values, first, np.array([values.size]), count=self.counted)
                rows[member] += piece[0]
                if counts is not None:
                    counts[member] += folded[0]
        return torch.from_numpy(rows), None if counts is None else torch.from_numpy(counts)

    def device_tensors(self) -> dict[str, Reduced]:
        rows, counts = self.summary()                  # made anew each window
        return {"rows": Reduced(rows)} if counts is None else {"rows": Reduced(rows), "counts": Reduced(counts)}

    def read(self, values: dict[str, np.ndarray], reader) -> None:
        """Rows ``columns.WEIGHT``, also joined to the gradient rows as ``weight_<column>``. Built
        from one ``tolist`` with C-level zips and maps where every parameter has a gradient row
        (the common case); a zero start (a fresh bias) has no relative update: NaN says so."""
        rows = [[l1, l2, moved / start if start > 0 else math.nan]
                for l1, l2, moved, start in values["rows"].tolist()]          # Python floats, one call
        weight_tags, relative_tags, histogram_tags = self._tags()
        names, k_members = self.setup.names, self.members
        for k in range(k_members):
            member_rows = rows if k_members == 1 else rows[k::k_members]
            window, scalars = reader.windows[k], reader.scalars[k]
            made = list(map(dict, map(zip, itertools.repeat(C.WEIGHT), member_rows)))
            window.weights.update(zip(names, made))
            gradients = list(map(window.gradients.get, names))
            if None in gradients:
                self._join_each(made, gradients, scalars, k)
            else:
                list(map(dict.update, gradients, map(zip, itertools.repeat(_IN_GRADIENT_ROWS), member_rows)))
                # ||g|| / ||w||: the size the diagnosis judges, so TensorBoard can chart the same measure
                scalars.update(zip(itertools.chain.from_iterable(self._joined_tags), itertools.chain.from_iterable(
                    [[gradient["norm"] / row[1] if row[1] > 0 else math.nan, *row]
                     for gradient, row in zip(gradients, member_rows)])))
            if self.counted:
                reader.wanted.rows(k, values["counts"], range(k, len(rows), k_members), histogram_tags, state=True)

    def _join_each(self, made: list[dict], gradients: list[dict | None], scalars: dict, k: int) -> None:
        """``read``'s join and scalars a parameter at a time, where some have no gradient row."""
        weight_tags, relative_tags, _ = self._tags()
        for row, gradient, tags, relative in zip(made, gradients, weight_tags, relative_tags):
            if gradient is not None:
                gradient.update(zip(_IN_GRADIENT_ROWS, row.values()))
                scalars[relative] = gradient["norm"] / row["norm"] if row["norm"] > 0 else math.nan
            scalars.update(zip(tags, row.values()))

    def _tags(self) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
        """Each parameter's TensorBoard tags, made once (see ``Gradients._tags``): its weight
        scalars', its ||g|| / ||w|| scalar's, its histogram's."""
        if self._slot_tags is None:
            paths = [tag_path(name) for name in self.setup.names]
            self._slot_tags = ([tuple(f"weight/{path}/{key}" for key in C.WEIGHT) for path in paths],
                               [f"grad/{path}/relative" for path in paths], [f"weight/{path}" for path in paths])
            self._joined_tags = [(relative, *tags) for tags, relative in zip(*self._slot_tags[:2])]
        return self._slot_tags


def _scaled_norms(now: torch.Tensor, start: torch.Tensor, members: int) -> torch.Tensor:
    """(members, 3) L2 norms of each member's weights, distance moved and start, scaled by the
    largest |x| (``stats.scaled_norm``): float64's whole range, where ``Weights._fold``'s sums of
    squares overflow or vanish."""
    chunk = S.CPU_WIDE_CHUNK if now.device.type == "cpu" else S.CHUNK     # float64 temporaries of a chunk each
    now, start = now.view(members, -1), start.reshape(members, -1)
    rows = []
    for w, b in zip(now, start):
        moved = functools.partial(map, torch.sub, w.split(chunk), b.split(chunk))     # w - start, a chunk at a time
        rows.append(torch.stack([S.scaled_norm(w, chunk), S.scaled_norm_of(moved), S.scaled_norm(b, chunk)]))
    return torch.stack(rows)


@torch.no_grad()
def _packed(sources: list[torch.Tensor | None], params: list[torch.Tensor],
            ) -> tuple[list[torch.Tensor | None], list[tuple[torch.Tensor, int] | None]]:
    """A copy of each of ``sources`` (None stays None) in its parameter's device and dtype, all of
    one device and dtype laid out in one flat buffer in order, each copy a contiguous view of it;
    and where each lies: (its buffer, its offset in elements).

    One allocation for the window's start instead of one per parameter: under glibc each block
    of 128 KB or more (16 KB with the benchmark's fine setting) is a mapping of its own, rounded
    up to a page past its header, 48 KB of peak RSS on a rank-16 LoRA's 12 adapters
    (benchmarks/memory.py); on a device, one block of the caching allocator."""
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for source, p in zip(sources, params):
        if source is not None:
            key = (local(p).device, p.dtype)
            sizes[key] = sizes.get(key, 0) + source.numel()
    buffers = {key: torch.empty(n, device=key[0], dtype=key[1]) for key, n in sizes.items()}
    used = dict.fromkeys(buffers, 0)
    out: list[torch.Tensor | None] = []
    places: list[tuple[torch.Tensor, int] | None] = []
    for source, p in zip(sources, params):
        if source is None:
            out.append(None)
            places.append(None)
            continue
        key = (local(p).device, p.dtype)
        copy = buffers[key][used[key]:used[key] + source.numel()].view(source.shape)
        copy.copy_(source)
        out.append(copy)
        places.append((buffers[key], used[key]))
        used[key] += source.numel()
    return out, places


def _tiny_groups(params: list[torch.Tensor], start: list) -> list[list[int]]:
    """Runs of tiny trainable float32 CPU parameters (numba's fused path), at most TINY_GROUP
    values each; one-parameter runs are left to the per-parameter path."""
    if S.fused_kernels(torch.device("cpu")) is None or any(local(p).device.type != "cpu" for p in params):
        return []                    # the window's rows live on the first parameter's device
    groups, current, size = [], [], 0
    for i, p in enumerate(params):
        tiny = (start[i] is not None and p.dtype == torch.float32 and not is_dtensor(p)
                and 0 < p.numel() <= TINY and p.layout == torch.strided)
        if not tiny or size + p.numel() > TINY_GROUP:
            if len(current) > 1:
                groups.append(current)
            current, size = [], 0
        if tiny:
            current.append(i)
            size += p.numel()
    if len(current) > 1:
        groups.append(current)
    return groups
