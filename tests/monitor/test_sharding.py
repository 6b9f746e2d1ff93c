"""Statistics of sharded models (FSDP2, HSDP, tensor parallel) on real gloo process groups.

Each multi-process test starts one run of several cases (process start-up dominates the time) with
sharded_launch.py: every rank is killed at the run's timeout and tears its process group down, so a
hang fails the test instead of blocking it. The oracle is each gradient's full_tensor() at the
optimizer step in float64 (sharded_run.Oracle); the reference, the same model trained unsharded on
the whole batch in one process.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor, MonitorError
from gradflow.monitor.sharding import GroupKey, check_collective_safe

pytest.importorskip("torch.distributed.fsdp")

from sharded_launch import launch

FIELDS = ("mean_abs", "norm", "max_abs", "zero_fraction", "weight_l1", "weight_norm", "weight_update_ratio")


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_case(name: str, ranks: list[dict]) -> dict[str, float]:
    """Every rank's windows are the same; they match the oracle's (and its histograms' bins exactly)
    and the single-process reference. Returns the largest relative errors."""
    for rank, result in enumerate(ranks):
        assert result is not None and "crash" not in result, f"{name} rank {rank}: {result and result['crash']}"
    first = ranks[0]
    for other in ranks[1:]:
        assert other["windows"] == first["windows"], f"{name}: the ranks' statistics differ"
    worst = {"oracle": 0.0, "reference": 0.0}
    assert len(first["windows"]) == len(first["oracle"]) == 2
    for window, oracle, reference, histograms in zip(first["windows"], first["oracle"], first["reference"],
                                                     first["histograms"]):
        assert set(window["rows"]) == set(oracle["rows"]), name       # parameters without a gradient left out
        for param, expected in oracle["rows"].items():
            row, single = window["rows"][param], reference["rows"][param]
            assert row["steps"] == expected["steps"]
            assert row["nonfinite"] == 0
            assert abs(row["mean"] - expected["mean"]) <= 1e-6 * expected["mean_abs"]
            for field in FIELDS:
                if expected[field] is None:
                    assert math.isnan(row[field])
                    continue
                worst["oracle"] = max(worst["oracle"], relative(row[field], expected[field]))
                worst["reference"] = max(worst["reference"], relative(row[field], single[field]))
            assert histograms["grad/" + param.replace(".", "/")] == expected["histogram"], f"{name} {param} bins"
        for field in ("total_norm", "total_norm_max"):
            worst["oracle"] = max(worst["oracle"], relative(window["overall"][field], oracle[field]))
    assert worst["oracle"] < 1e-6, (name, worst)
    assert worst["reference"] < 1e-5, (name, worst)
    return worst


@pytest.mark.slow
def test_fsdp2_and_tensor_parallel_on_two_ranks(tmp_path):
    """FSDP2 with AdamW and clipping; tensor parallel (Colwise, Rowwise with a Replicate bias, a
    SequenceParallel LayerNorm whose gradients are Partial) with SGD and AdamW; a window in which the ranks
    recorded different numbers of steps still closes; then a rank that dies between two steps: the
    other's log() fails with an error instead of waiting."""
    cases = ["fsdp-adamw-clip", "tp-sgd", "tp-adamw", "uneven-records", "nonfinite-on-rank1", "groups-released",
             "writer-on-rank0", "raise-on-rank1"]
    results, errors = launch(tmp_path, 2, cases)
    for case in cases[:3]:
        check_case(case, results[case])
    placements = results["tp-sgd"][0]["grad_placements"]
    assert placements["norm.weight"] == "(Partial(sum),)" and placements["down.bias"] == "(Replicate(),)"
    assert placements["up.weight"] == "(Shard(dim=0),)" and placements["down.weight"] == "(Shard(dim=1),)"
    clipped = results["fsdp-adamw-clip"][0]                 # clip_grad_norm_ of DTensors: a DTensor norm, read whole
    for window, single in zip(clipped["windows"], clipped["reference"]):
        assert window["overall"]["clipped_steps"] == single["overall"]["clipped_steps"] == 2
        assert window["overall"]["total_norm_before_clip"] == pytest.approx(
            single["overall"]["total_norm_before_clip"], rel=1e-5)
    uneven = results["uneven-records"]
    assert [r["steps"] for r in uneven] == [2, 1], uneven
    # the first non-finite source: rank 1's input (step 2), on both ranks, though rank 0's own came a step later
    assert [r["source"] for r in results["nonfinite-on-rank1"]] == [["(input)", "forward", 2]] * 2
    for released in results["groups-released"]:       # each attach's groups go with its monitor
        during = released["during"]
        assert released["after"] <= released["before"] and during[0] == during[-1] > released["after"], released
    for rank in results["writer-on-rank0"]:          # weight counts kept on both ranks, drawn on rank 0 alone
        assert rank["norms"] == pytest.approx(rank["full"], rel=1e-6), rank
    assert results["writer-on-rank0"][0]["histograms"] > 0
    died = results["raise-on-rank1"][0]
    assert died is not None and died["error"], errors[0]


@pytest.mark.slow
def test_fsdp2_with_uneven_and_empty_shards_and_hsdp_on_four_ranks(tmp_path):
    """Linear(10, 3) and LayerNorm(10) on 4 ranks (shards of 1, 1, 1 and 0 rows; 3, 3, 3, 1), a module
    no rank uses (no gradient anywhere), HSDP on a 2x2 mesh (the replicate dim not reduced); then a
    monitor attached on rank 0 only: a MonitorError there, not a hang. Also FSDP2 over tensor parallel
    on a 2x2 (dp, tp) mesh: parameters sharded on both dims."""
    cases = ["fsdp-sgd", "fsdp-unused", "hsdp-adamw", "fsdp-tp-adamw", "attach-rank0-only"]
    results, _ = launch(tmp_path, 4, cases)
    for case in cases[:4]:
        check_case(case, results[case])
    shapes = [r["local_shapes"] for r in results["fsdp-sgd"]]
    assert [s["head.weight"] for s in shapes] == [[1, 10], [1, 10], [1, 10], [0, 10]]
    assert "spare.weight" not in results["fsdp-unused"][0]["windows"][0]["rows"]
    assert results["hsdp-adamw"][0]["placements"]["up.weight"] == "(Replicate(), Shard(dim=0))"
    two_dims = results["fsdp-tp-adamw"][0]["placements"]
    assert two_dims["up.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert two_dims["down.weight"] == "(Shard(dim=0), Shard(dim=1))" and two_dims["norm.weight"].endswith("Replicate())")
    error = results["attach-rank0-only"][0]["error"]
    assert error and "attached on every rank" in error and "[1, 2, 3]" in error


# -- single process ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dims, groups", [
    ((4,), (0,), [[0, 1, 2, 3]]),
    ((2, 2), (1,), [[0, 1], [2, 3]]),               # HSDP: shard within each replica
    ((2, 2), (0,), [[0, 2], [1, 3]]),
    ((2, 2), (0, 1), [[0, 1, 2, 3]]),               # FSDP over tensor parallel: both dims sharded
], ids=["fsdp", "hsdp", "first-dim", "both-dims"])
def test_reduction_groups_share_every_other_mesh_coordinate(shape, dims, groups):
    assert GroupKey(tuple(range(math.prod(shape))), shape, dims).subgroups() == groups


def test_fsdp1_is_refused_at_attach():
    class FullyShardedDataParallel(nn.Module):     # torch's FSDP1 needs a process group; the check reads the class name
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

    with pytest.raises(MonitorError, match="FSDP1"):
        check_collective_safe(nn.Sequential(FullyShardedDataParallel()))


def test_a_plain_model_builds_no_layout():
    monitor = GradientMonitor(nn.Linear(3, 2), None)
    assert monitor._sharding is None
    monitor.remove()


def test_dtensor_without_a_process_group_is_a_clear_error():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already up")
    from gradflow.monitor.sharding import ShardLayout

    class Fake:      # ShardLayout checks the process group before reading anything of the tensors
        pass

    with pytest.raises(MonitorError, match="not initialised"):
        ShardLayout(["w"], [Fake()], torch.device("cpu"))
