"""Statistics of sharded parameters (FSDP2, HSDP, tensor parallel): full-gradient values from local shards.

A DTensor parameter holds one shard of the full tensor on each rank. Its local statistics are
not the full ones, and reading a reduction of a DTensor as a number reads this rank's part only
(``vector_norm(dtensor).item()`` gave 0.738 against a true 1.288 here). This module keeps every
statistic on the local shard, on the device, and turns the window's sums into full-tensor values
with batched collectives at the window's close:

- parameters are grouped by (mesh, the mesh dims their placements shard); one SUM and one MAX
  all-reduce per group per window, over the sharded dims only: a ``Replicate`` dim (HSDP's
  replicate dim, a tensor-parallel norm's weight) holds the same values on each of its ranks and
  is not reduced, so nothing is counted twice;
- SUM for sums, sums of squares, counts and the fixed-edge histogram bins; MAX for the largest |g|;
- a statistic that is not a sum (the norm of a step, its largest |g|) is kept per step, as the
  local squared norm and largest |g| of each step and parameter, a (steps, parameters) tensor on
  the device reduced once at the close, so that the mean over steps of each step's norm is what it
  is in one process;
- a gradient whose placements are ``Partial`` (tensor parallel's sequence-parallel LayerNorm) is
  a sum of per-rank parts: it is redistributed to its parameter's placements at the step, by
  DTensor, before any statistic is taken. A partial value is never read as a full one;
- an empty shard (``Linear(10, 3)`` on 4 ranks leaves ranks with (0, 10) shards) is a zero-size
  tensor: it adds nothing to the sums, and a sentinel zero stands in for its largest |g|, so every
  rank runs the same ops and the same collectives in the same order.

The collectives run on process groups of the monitor's own, made when it attaches (every rank
must attach: that is checked through the store, with a timeout, before any group is made), with a
timeout (``GRADFLOW_COLLECTIVE_TIMEOUT`` seconds, default 300): a rank that raised or stopped
monitoring makes the others fail with an error, not wait forever.

Example (on every rank, after ``init_process_group`` and ``fully_shard(model)``; the monitor
does this, and tests/monitor/test_sharding.py runs it on real gloo groups)::

    layout = ShardLayout.of(names, params)          # None when no parameter is a DTensor
    grads = layout.local_grads(params, [p.grad for p in params], step=0)   # local tensors
    parts = layout.reduce(parts, recorded)          # the read-back's Reduced tensors, at the window's close
"""

from __future__ import annotations

import contextlib
import inspect
import os
import weakref
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch

from gradflow.monitor.tensors import MonitorError

COLLECTIVE_TIMEOUT_S = 300.0       # default; GRADFLOW_COLLECTIVE_TIMEOUT overrides (seconds)
ATTACH_TIMEOUT_S = 60.0            # how long an attach waits for every rank to attach; GRADFLOW_ATTACH_TIMEOUT
ROW_FIELDS = 2                     # per step and parameter: local sum of squares, local largest |g|


def _destroy_groups(groups: list) -> None:
    """Destroy the monitor's own process groups (a local clean-up, no collective); nothing to do
    once the default group is gone (the process is ending)."""
    import torch.distributed as dist

    for group in groups:
        if group is None or not dist.is_initialized():
            continue
        with contextlib.suppress(Exception):      # a finalizer never raises
            dist.destroy_process_group(group)
    groups.clear()


_DTENSOR: list = []       # torch's DTensor class (or None), once looked up


def _dtensor_type():
    """torch's DTensor class, or None where torch.distributed is not built in. Looked up once:
    an import statement costs about a microsecond even when the module is loaded, and ``local``
    runs on every tapped activation and every weight of a window."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (its ``to_local()``), or the tensor itself. Call it on a
    gradient only after ``ShardLayout.local_grads`` resolved any ``Partial`` placement."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_numel(tensor: torch.Tensor) -> int:
    """Elements of this rank's shard (0 for an empty shard); a plain tensor's own count."""
    return local(tensor).numel()


def local_rows(param: torch.Tensor) -> torch.Tensor:
    """The full tensor's index along dim 0 of each row of this rank's shard of ``param`` (a plain
    tensor's: every row), with no collective: ``arange(rows)`` split as the placements split dim 0
    (DTensor's own split, ``src_data_rank=None``: FSDP2's uneven chunks, an empty shard, HSDP's
    replicate dim, a ``_StridedShard``); a placement that shards another dim leaves the rows whole."""
    rows = torch.arange(param.shape[0], device=local(param).device)
    if not is_dtensor(param):
        return rows
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, placement_types

    strided = getattr(placement_types, "_StridedShard", Shard)
    placements = [p if isinstance(p, (Shard, strided)) and p.dim in (0, -param.dim()) else Replicate()
                  for p in param.placements]
    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:     # torch 2.7 on
        return distribute_tensor(rows, param.device_mesh, placements, src_data_rank=None).to_local()
    # Before it, distribute_tensor scatters rank 0's tensor: the same rows on every rank, and
    # every rank attaches (and so comes here) in the same order.
    return distribute_tensor(rows, param.device_mesh, placements).to_local()


def _seconds(variable: str, default: float) -> timedelta:
    value = os.environ.get(variable)
    if value is None:
        return timedelta(seconds=default)
    try:
        seconds = float(value)
    except ValueError:
        raise MonitorError(f"{variable} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise MonitorError(f"{variable} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def check_collective_safe(model) -> None:
    """Refuse, at attach, the sharded wrappers whose gradients the monitor cannot read as full ones.

    - DeepSpeed's engine: ZeRO partitions gradients into flat buffers outside ``p.grad`` and steps
      the optimizer inside ``backward`` (before any callback); its ``p.grad`` is None or a partition.
    - FSDP1 (``FullyShardedDataParallel``): flat parameters hold pieces of several parameters.

    Raises:
        MonitorError: naming the wrapper and what to use instead.
    """
    for module in (model, *model.modules()):
        cls = type(module)
        if cls.__name__ == "DeepSpeedEngine" or cls.__module__.startswith("deepspeed"):
            raise MonitorError("gradflow cannot monitor a DeepSpeed engine: ZeRO keeps gradients in partitioned "
                               "flat buffers (p.grad is None or a partition) and steps inside backward(), so "
                               "per-parameter statistics would be wrong; use FSDP2 (fully_shard) instead")
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):   # a ZeRO-3 partitioned parameter
            raise MonitorError("gradflow cannot monitor parameters partitioned by DeepSpeed ZeRO-3 (they carry ds_id): "
                               "their p.grad is not the gradient the optimizer applies; use FSDP2 (fully_shard)")
        if cls.__name__ == "FullyShardedDataParallel":
            raise MonitorError("gradflow cannot monitor FSDP1 (FullyShardedDataParallel): its flat parameters mix "
                               "pieces of several parameters; use FSDP2 (torch.distributed.fsdp.fully_shard), whose "
                               "parameters are DTensors the monitor reduces correctly")


def reshard_stand_ins(model) -> None:
    """Put FSDP2's sharded DTensor parameters back in ``model`` where a forward with no backward
    since (an evaluation pass before attaching) left its unsharded plain stand-ins registered: the
    monitor must attach to the DTensors the optimizer steps, and read as attached to plain tensors
    it stopped at the first step with "attach the monitor after sharding". ``FSDPModule.reshard``
    is what FSDP2 does after each backward: no collective, and the next forward all-gathers. A
    monitored submodule of a unit holds no FSDP2 module and is left as it is."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units and not all(is_dtensor(p) for p in model.parameters()):
        for unit in units:          # not recursive: each unit its own; a sharded one is left as it is
            unit.reshard()


def _misaligned(recorded: int, most: int, fewest: int, closed: int, ahead: int, behind: int) -> str | None:
    """What to say when the ranks closed a window after different steps (None when they did not):
    ``recorded``/``closed``: this rank's steps in the window and since attaching; ``most``/``fewest``,
    ``ahead``/``behind``: the same over the world."""
    if most == fewest and ahead == behind:
        return None
    return (f"the ranks closed this window after different optimizer steps (steps recorded in it: {fewest} to {most}, "
            f"{recorded} here; since attaching: {behind} to {ahead}, {closed} here): log() was called at different "
            "steps on different ranks, so each rank's per-step norms add up shards of different steps and the "
            "ranks' rows differ. Call log() on every rank after the same optimizer step")


@dataclass(frozen=True)
class GroupKey:
    """Parameters whose statistics reduce together: the same mesh (its ranks, in mesh order, and
    shape) and the same sharded mesh dims."""

    ranks: tuple[int, ...]
    shape: tuple[int, ...]
    dims: tuple[int, ...]

    def subgroups(self) -> list[list[int]]:
        """The rank lists to reduce over: ranks that share their coordinates on every other dim."""
        mesh = torch.tensor(self.ranks).reshape(self.shape)
        others = [d for d in range(len(self.shape)) if d not in self.dims]
        size = 1
        for d in self.dims:
            size *= self.shape[d]
        return mesh.permute(*others, *self.dims).reshape(-1, size).tolist()


def group_key(param: torch.Tensor) -> GroupKey | None:
    """How a parameter's local statistics reduce to full ones: None for a plain tensor or a DTensor
    replicated on every mesh dim (its local values are the full ones).

    Raises:
        MonitorError: a parameter with a ``Partial`` placement (a partial sum, not a value).
    """
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Partial, Replicate, Shard, placement_types

    # FSDP2 over tensor parallel shards a dim as _StridedShard, which is not a Shard in torch 2.13
    strided = getattr(placement_types, "_StridedShard", Shard)
    dims = []
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, (Shard, strided)):   # each element on one rank of the dim: sums add up
            dims.append(dim)
        elif not isinstance(placement, Replicate):
            kind = "a partial sum" if isinstance(placement, Partial) else f"{placement}"
            raise MonitorError(f"a parameter is placed as {placement} on mesh dim {dim} ({kind}); the monitor "
                               "reads Shard and Replicate parameters only")
    if not dims:
        return None
    mesh, dims = _in_root_mesh(param.device_mesh, dims)
    return GroupKey(tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), tuple(dims))


def _in_root_mesh(mesh, dims: list[int]) -> tuple:
    """A sub-mesh's dims as dims of the mesh it was sliced from (FSDP2 over tensor parallel: a layer
    with no tensor-parallel plan is sharded on ``mesh["dp"]`` alone, ranks 0, 2 on some ranks and 1, 3
    on the others): the same groups on every rank, and the root's other dims hold copies (not
    reduced, as ``Replicate``). A sub-mesh whose dims are not named dims of its root (a flattened
    one) is left as it is: a mesh that does not span the world is then refused."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    names, root_names = getattr(mesh, "mesh_dim_names", None), getattr(root, "mesh_dim_names", None)
    if root is mesh or not names or not root_names or not set(names) <= set(root_names):
        return mesh, dims
    return root, sorted(root_names.index(names[d]) for d in dims)


class ShardLayout:
    """Which parameters are sharded how, the monitor's process groups, and the window's per-step rows.

    Made at attach on every rank (``ShardLayout.of``); ``local_grads`` at each recorded step,
    ``reduce`` at each window's close, both on every rank in the same order.
    """

    def __init__(self, names: list[str], params: list[torch.Tensor], device: torch.device, parts: str = "") -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise MonitorError("the model has DTensor parameters but torch.distributed is not initialised; "
                               "attach the monitor after init_process_group and fully_shard/parallelize_module")
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        keys = [group_key(p) for p in params]
        for name, key in zip(names, keys):
            if key is not None and sorted(key.ranks) != list(range(self.world)):
                raise MonitorError(f"{name} lives on a device mesh of ranks {sorted(key.ranks)}, not every rank of "
                                   f"the world ({self.world}); the monitor reduces over meshes that span the world")
        self.keys = keys
        self.sharded = [i for i, key in enumerate(keys) if key is not None]
        self.groups: dict[GroupKey, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                self.groups.setdefault(key, []).append(i)
        self.device = device
        self.count = len(params)
        self.rows = torch.zeros(64, self.count, ROW_FIELDS, dtype=torch.float64, device=device)
        self._sentinel = torch.zeros(1, device=device)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}   # rows of each pattern of present gradients
        self.timeout = _seconds("GRADFLOW_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT_S)
        # Another part's per-parameter columns, summed over each column's parameter's group with the
        # gradients' sums (``share_columns``), and the local gradients it reads at each step (``kept``).
        self.columns: dict[str, tuple[list[int], bool]] = {}
        self.keep: set[int] = set()
        self.kept: dict[int, torch.Tensor] = {}
        self.step = 0
        self.closed = 0              # steps recorded since attaching, at the last window's close
        self.misaligned: str | None = None     # the last close's word on ranks that closed other steps
        self._wait_for_every_rank(names, params, parts)
        self._world_group = dist.new_group(list(range(self.world)), timeout=self.timeout)
        self._made = [self._world_group]                 # every group made, ours to destroy
        self._process_groups: dict[GroupKey, object] = {}
        for key in self.groups:                          # the same order on every rank (checked above)
            for ranks in key.subgroups():
                group = dist.new_group(ranks, timeout=self.timeout)
                if self.rank in ranks:
                    self._process_groups[key] = group
                self._made.append(group)
        # The groups go when the layout does (its monitor dropped), not at remove(): a log() after
        # remove() still reduces. Without this every attach would add groups for the process's life.
        weakref.finalize(self, _destroy_groups, self._made)

    @classmethod
    def of(cls, names: list[str], params: list[torch.Tensor], members: int = 1, parts: str = "") -> ShardLayout | None:
        """The layout of ``params``, or None when none is a DTensor (nothing to reduce: plain DDP).
        ``parts``: the monitor's parts that take part in the window's collectives (every rank must
        run the same ones: checked at attach with the layout).

        Raises:
            MonitorError: ``members`` > 1 with DTensor parameters, torch.distributed not initialised,
                a mesh that does not span the world, a ``Partial`` parameter, a rank that does not
                attach in time, or ranks that attach to different layouts.
        """
        if not any(is_dtensor(p) for p in params):
            return None
        if members != 1:
            raise MonitorError(f"members={members} with DTensor (sharded) parameters is not supported; "
                               "monitor each sharded model with members=1")
        return cls(names, params, local(params[0]).device, parts)

    # -- attach --------------------------------------------------------------------------

    _attaches = 0                                    # attaches in this process: the same sequence on every rank

    def _wait_for_every_rank(self, names: list[str], params: list[torch.Tensor], parts: str = "") -> None:
        """Every rank must attach, with the same parameters and layout, before any collective: each
        rank writes its layout's fingerprint to the store and waits (``GRADFLOW_ATTACH_TIMEOUT``
        seconds, default 60) for every other rank's. A missing rank or another layout is a
        MonitorError on the ranks that attached, not a hang."""
        import torch.distributed as dist

        ShardLayout._attaches += 1
        store = dist.distributed_c10d._get_default_store()
        prefix = f"gradflow/attach/{ShardLayout._attaches}/"
        description = repr([(n, tuple(p.shape), str(p.dtype), k) for n, p, k in zip(names, params, self.keys)]) + parts
        fingerprint = str(zlib.crc32(description.encode()))
        store.set(prefix + str(self.rank), fingerprint)
        keys = [prefix + str(r) for r in range(self.world)]
        try:
            store.wait(keys, _seconds("GRADFLOW_ATTACH_TIMEOUT", ATTACH_TIMEOUT_S))
        except Exception:                            # noqa: BLE001 - the store's timeout error differs by backend
            missing = [r for r in range(self.world) if not store.check([prefix + str(r)])]
            raise MonitorError(
                f"a GradientMonitor on a sharded model must be attached on every rank, at the same point; rank(s) "
                f"{missing} did not attach in time (a callback that attaches on rank 0 only hangs the others)") from None
        prints = [store.get(key).decode() for key in keys]
        if len(set(prints)) > 1:
            odd = [r for r, p in enumerate(prints) if p != fingerprint]
            raise MonitorError(f"rank(s) {odd} attached a monitor to other parameters or another sharding than rank "
                               f"{self.rank}; every rank must monitor the same model, sharded the same way")

    def share_columns(self, key: str, owners: list[int], per_step: bool, keep: list[int]) -> None:
        """A part's read-back tensor ``key`` (``"<part>/<key>"``) whose last dim's column c is a local
        sum of parameter ``owners[c]``'s shard: ``reduce`` sums each column over its parameter's
        group in that group's one SUM all-reduce (a plain or replicated parameter's column is left
        as it is). ``per_step``: a (steps, columns) tensor whose rows are ``step`` (the gradients'
        row of each recorded step), cut or padded to the window's steps. ``keep``: parameters whose
        local gradient each step's ``local_grads`` leaves in ``kept`` for the part to read (and clear)."""
        self.columns[key] = (list(owners), per_step)
        self.keep.update(keep)

    # -- each step -----------------------------------------------------------------------

    def reset(self) -> None:
        self.rows.zero_()

    def move(self, device: torch.device) -> None:
        """Carry the window's per-step rows to ``device`` (the model moved: ``model.to``)."""
        self.device = device
        self.rows = self.rows.to(device, copy=True)
        self._sentinel = torch.zeros(1, device=device)
        self._index = {}

    @torch.no_grad()
    def local_grads(self, params: list[torch.Tensor], grads: list[torch.Tensor | None],
                    step: int, unscale: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """This rank's shard of each gradient (None stays None), after redistributing any gradient
        whose placements differ from its parameter's (``Partial`` sums become the values the
        optimizer applies; one DTensor collective per such gradient, on every rank). Records the
        step's local squared norm and largest |g| of each parameter at row ``step``: no host sync.
        ``unscale``: 1 / the GradScaler's scale while a fused optimizer's gradients are still
        scaled; the local gradients (and so the rows) are multiplied by it."""
        out: list[torch.Tensor | None] = []
        for p, g in zip(params, grads):
            if g is not None and is_dtensor(g):
                if is_dtensor(p) and tuple(g.placements) != tuple(p.placements):
                    g = g.redistribute(p.device_mesh, p.placements)
                g = g.to_local()
            if g is not None and unscale is not None:
                g = g * unscale
            out.append(g)
        self.step = step
        if self.keep:
            self.kept = {i: out[i] for i in self.keep if out[i] is not None}
        present = [i for i, g in enumerate(out) if g is not None]
        if not present:
            return out
        if step >= self.rows.shape[0]:
            self.rows = torch.cat([self.rows, torch.zeros_like(self.rows)])
        tensors = [out[i].detach() for i in present]
        dense = [t.to_dense() if t.layout != torch.strided else t for t in tensors]
        squares = torch.stack(torch._foreach_norm(dense, 2, dtype=torch.float64)).square_()
        # inf norm of an empty shard has no identity: a zero sentinel stands in (every rank runs the same ops)
        largest = torch.stack(torch._foreach_norm([t if t.numel() else self._sentinel.to(t.dtype) for t in dense],
                                                  float("inf"))).to(torch.float64)
        key = tuple(present)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(present, device=self.device)
        self.rows[step].index_copy_(0, index, torch.stack([squares, largest], dim=1))
        return out

    # -- each window ---------------------------------------------------------------------

    @torch.no_grad()
    def reduce(self, parts: dict, recorded: int) -> dict:
        """Full-tensor versions of a window's device sums, the same on every rank; returns a new dict.

        ``parts`` is the monitor's read-back, ``{"<part>/<key>": part.Reduced}``. The per-parameter
        sums of the gradients and weights parts are reduced: ``gradients/totals`` (params, 4: sum g,
        sum |g|, sum over steps of the step's norm, of its largest |g|), ``gradients/counts``
        (params x 512 sign/exponent bins), ``gradients/tallies`` (params, 2: exact zeros,
        non-finite values), ``gradients/step_squares`` (steps, 1: recomputed from the reduced
        per-step rows), ``gradients/skipped_nonfinite`` (params,), ``weights/rows`` (params,
        4: L1, L2, distance moved, L2 at the start) and ``weights/counts`` (params, 512). The rest is
        left as it is: the clipping part's norms are full already (a DTensor norm is read whole),
        and activations describe this rank's batch.

        The read-back's own ``reduce`` hook (``window.read_back``) combines every SUM tensor over one
        group; sharded statistics need a group per mesh and sharded dims, rows of replicated
        parameters left alone, and the per-step rows for the norms: hence this step before it.

        Ranks that recorded other numbers of steps in this window or since attaching (``log()``
        called after another step on some rank) leave their word in ``misaligned`` (the gradients
        part warns it): their per-step rows are added as if the same steps.

        Collectives, on every rank in the same order: one MAX of the step counts over the world, then
        per group one SUM and one MAX all-reduce, each of one flat float64 tensor; with the
        first-non-finite part, one MAX of its keys over the world.
        ``recorded``: the steps this rank recorded.

        Raises:
            MonitorError: a collective failed (a peer did not call ``log()`` within
                ``GRADFLOW_COLLECTIVE_TIMEOUT`` seconds, or its process is gone; ``_all_reduce``).
        """
        import torch.distributed as dist

        from gradflow.monitor.part import Reduced

        self.closed += recorded
        # MAX of (n, -n) is the most and the fewest over the ranks, in the one collective
        header = torch.tensor([recorded, -recorded, self.closed, -self.closed], dtype=torch.float64, device=self.device)
        self._all_reduce(header, op=dist.ReduceOp.MAX, group=self._world_group)
        steps, fewest, ahead, behind = (int(v) for v in header.tolist())
        self.misaligned = _misaligned(recorded, steps, -fewest, self.closed, ahead, -behind)
        rows = self.rows[:steps].clone()
        if steps > rows.shape[0]:
            rows = torch.cat([rows, rows.new_zeros(steps - rows.shape[0], *rows.shape[1:])])
        tensor = {key: part.tensor for key, part in parts.items()}
        totals = tensor["gradients/totals"].clone()
        counts = tensor["gradients/counts"].view(self.count, -1).clone()
        tallies = tensor["gradients/tallies"].clone()
        skipped = tensor["gradients/skipped_nonfinite"].clone()
        weights = tensor["weights/rows"].clone() if "weights/rows" in tensor else None
        weight_counts = tensor["weights/counts"].view(self.count, -1).clone() if "weights/counts" in tensor else None
        shared = {name: self._shared_tensor(tensor[name], per_step, steps)
                  for name, (_, per_step) in self.columns.items() if name in tensor}
        for key, index_list in self.groups.items():
            index = torch.tensor(index_list, device=self.device)
            members = set(index_list)
            columns = [(shared[name], torch.tensor([c for c, i in enumerate(self.columns[name][0]) if i in members],
                                                   dtype=torch.long, device=self.device)) for name in shared]
            self._reduce_group(self._process_groups[key], index, rows, totals, counts, tallies, skipped, weights,
                               weight_counts, columns)
        if self.sharded:
            sharded = torch.tensor(self.sharded, device=self.device)
            totals[sharded, 2] = rows[:, sharded, 0].sqrt().sum(0).to(totals.dtype)
            totals[sharded, 3] = rows[:, sharded, 1].sum(0).to(totals.dtype)
        step_squares = tensor["gradients/step_squares"].clone()
        step_squares[:steps, 0] = rows[:, :, 0].sum(1).to(step_squares.dtype)
        reduced = {"gradients/totals": totals, "gradients/counts": counts.view(tensor["gradients/counts"].shape),
                   "gradients/tallies": tallies,
                   "gradients/step_squares": step_squares, "gradients/skipped_nonfinite": skipped}
        if "nonfinite/keys" in tensor:
            # The first non-finite source (nonfinite.py): its keys are negated, so MAX over every
            # rank is the earliest occurrence on any of them (issue 24: the earliest across ranks).
            keys = tensor["nonfinite/keys"].to(self.device, torch.float64).clone()
            self._all_reduce(keys, op=dist.ReduceOp.MAX, group=self._world_group)
            reduced["nonfinite/keys"] = keys
        reduced.update(shared)
        if weights is not None:
            reduced["weights/rows"] = weights
            reduced["weights/counts"] = weight_counts.view(tensor["weights/counts"].shape)
        return {key: Reduced(reduced[key], part.reduce) if key in reduced else part for key, part in parts.items()}

    def _shared_tensor(self, tensor: torch.Tensor, per_step: bool, steps: int) -> torch.Tensor:
        """A float64 copy of a ``share_columns`` tensor; a per-step one cut or zero-padded to ``steps`` rows."""
        out = tensor.to(self.device, torch.float64).clone()
        if per_step:
            out = out[:steps]
            if steps > out.shape[0]:
                out = torch.cat([out, out.new_zeros(steps - out.shape[0], *out.shape[1:])])
        return out

    def _all_reduce(self, tensor: torch.Tensor, op, group) -> None:
        """``dist.all_reduce`` in place; a failure (gloo/NCCL timeout, a closed peer: RuntimeError or its
        DistError kinds) is a MonitorError naming this rank, the timeout and torch's error (its
        ``__cause__``), instead of the backend's bare message."""
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=op, group=group)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise MonitorError(
                f"log() on rank {self.rank} could not close the window: a collective over the ranks failed "
                f"({type(e).__name__}: {first}). Call log() on every rank at the same step; a rank that "
                f"stopped, died or skipped log() makes the others fail after GRADFLOW_COLLECTIVE_TIMEOUT="
                f"{self.timeout.total_seconds():g} s") from e

    def _reduce_group(self, group, index, rows, totals, counts, tallies, skipped, weights, weight_counts,
                      columns=()) -> None:
        """One SUM and one MAX all-reduce for the parameters at ``index`` (in place in the arguments;
        ``columns``: (tensor, its columns of these parameters), ``share_columns``' tensors)."""
        import torch.distributed as dist

        sums = [totals[index, :2], counts[index].double(), rows[:, index, 0], skipped[index].double(),
                tallies[index].double()]
        if weights is not None:
            w = weights[index].double()
            sums += [w[:, :1], w[:, 1:].square(), weight_counts[index].double()]
        sums += [t[..., cols] for t, cols in columns]
        sizes = [t.numel() for t in sums]
        flat = torch.cat([t.reshape(-1).double() for t in sums])
        self._all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        largest = rows[:, index, 1].contiguous()
        self._all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        rows[:, index, 1] = largest
        parts = flat.split(sizes)
        totals[index, :2] = parts[0].view(-1, 2).to(totals.dtype)
        counts[index] = parts[1].view(len(index), -1).round().to(counts.dtype)
        rows[:, index, 0] = parts[2].view(rows.shape[0], len(index))   # 0 steps: (0, n)
        skipped[index] = parts[3].to(skipped.dtype)
        tallies[index] = parts[4].view(len(index), -1).round().to(tallies.dtype)
        if weights is not None:
            weights[index, :1] = parts[5].view(-1, 1).to(weights.dtype)
            weights[index, 1:] = parts[6].view(-1, 3).sqrt().to(weights.dtype)
            weight_counts[index] = parts[7].view(len(index), -1).round().to(weight_counts.dtype)
        for (t, cols), part in zip(columns, parts[len(parts) - len(columns):]):
            t[..., cols] = part.view(*t.shape[:-1], len(cols))
