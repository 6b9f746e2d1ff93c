"""Break tests (brk11a) of the monitor on 2 gloo ranks: FSDP2 cases not in test_sharding.py
(reshard_after_forward=False, a bf16/fp32 MixedPrecisionPolicy, bf16 parameters, a frozen parameter
inside a sharded module and one unfrozen after two windows, accumulation with
set_requires_gradient_sync(False), sharding on dim 1, HSDP 2x1 and 1x2, clipping), DDP with find_unused_parameters and a
branch only rank 0 uses, DDP no_sync accumulation, members=2 over DDP and over FSDP2, and log() on
rank 0 only.

The oracle (brk11a_run.py): each gradient's full_tensor() (DTensor) or p.grad (DDP) in float64 at the
optimizer step, from a step pre-hook registered after the monitor's, averaged per window as the
monitor does (sharded_run.Oracle).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.fsdp")

from sharded_launch import launch  # noqa: E402

SCRIPT = Path(__file__).with_name("brk11a_run.py")
FIELDS = ("mean_abs", "norm", "max_abs", "zero_fraction", "weight_l1", "weight_norm", "weight_update_ratio")
ORACLE_CASES = ["fsdp-noreshard", "fsdp-mixed", "fsdp-frozen", "fsdp-accumulate", "ddp-unused", "ddp-nosync",
                "fsdp-bf16", "fsdp-unfreeze"]

CLIP_CASES = ["fsdp-clip-inf", "fsdp-clip-accumulate", "tp-clip"]
ALL_CASES = [*ORACLE_CASES, "ddp-members", "fsdp-members", "fsdp-shard1", "hsdp-2x1", "hsdp-1x2", *CLIP_CASES,
             "fsdp-after-attach", "two-monitors", "log-twice", "fsdp-evaluate"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, list[dict]], list[str]]:
    """Every case but log-rank0-only in one 2-rank run (process start-up dominates the time)."""
    return launch(tmp_path_factory.mktemp("brk11a"), 2, ALL_CASES, timeout=200, script=SCRIPT)


def ran(runs, case: str) -> list[dict]:
    results, errors = runs
    for rank, result in enumerate(results[case]):
        assert result is not None and "crash" not in result, f"{case} rank {rank}: {result and result['crash']} {errors[rank]}"
    return results[case]


def check_against_oracle(name: str, ranks: list[dict]) -> float:
    """Every rank's windows equal rank 0's and match the oracle's; returns the largest relative error."""
    for rank, result in enumerate(ranks):
        assert result is not None and "crash" not in result, f"{name} rank {rank}: {result and result['crash']}"
    worst = 0.0
    for rank, result in enumerate(ranks):
        assert result["windows"] == ranks[0]["windows"], f"{name}: rank {rank}'s statistics differ from rank 0's"
        assert len(result["windows"]) == len(result["oracle"]) >= 2, name
        for window, oracle in zip(result["windows"], result["oracle"]):
            assert set(window["rows"]) == set(oracle["rows"]), (name, rank)   # no gradient: no row
            for param, expected in oracle["rows"].items():
                row = window["rows"][param]
                assert row["steps"] == expected["steps"], (name, param)
                assert abs(row["mean"] - expected["mean"]) <= 1e-6 * expected["mean_abs"], (name, param)
                for field in FIELDS:
                    if expected[field] is None:
                        assert math.isnan(row[field]), (name, param, field)
                        continue
                    worst = max(worst, abs(row[field] - expected[field]) / max(abs(expected[field]), 1e-12))
            for field in ("total_norm", "total_norm_max"):
                worst = max(worst, abs(window["overall"][field] - oracle[field]) / oracle[field])
    assert worst < 1e-6, (name, worst)
    return worst


def test_fsdp2_ddp_variants_and_members_match_the_full_gradient(runs):
    results = {case: ran(runs, case) for case in [*ORACLE_CASES, "ddp-members", "fsdp-members"]}
    for case in ORACLE_CASES:
        check_against_oracle(case, results[case])
    frozen = results["fsdp-frozen"][0]["windows"][0]["rows"]
    assert "up.bias" not in frozen and "up.weight" in frozen
    unfrozen = results["fsdp-unfreeze"][0]["windows"]      # frozen in windows 0-1, trained in 2-3
    assert len(unfrozen) == 4 and "up.bias" not in unfrozen[1]["rows"] and "up.bias" in unfrozen[2]["rows"]
    assert results["fsdp-bf16"][0]["grad_dtypes"]["up.weight"] == "torch.bfloat16"
    unused = results["ddp-unused"]
    for rank in unused:                    # the rank-0-only branch has a gradient on both ranks; `never` on none
        assert set(rank["windows"][0]["rows"]) == {"trunk.weight", "trunk.bias", "rank0.weight", "rank0.bias"}
    for result in results["ddp-members"]:
        for got, expected in zip(result["norms"], result["expected"]):
            assert got == pytest.approx(expected, rel=1e-6)
    for result in results["fsdp-members"]:
        assert result["error"] and "members=2" in result["error"], result



def test_shard_dim_1_degenerate_hsdp_and_clipping_match_the_full_gradient(runs):
    """FSDP2 sharded on dim 1 (shard_placement_fn), HSDP meshes 2x1 and 1x2 (a mesh dim of size 1),
    clip_grad_norm_ by the inf norm on DTensors, clipping after set_requires_gradient_sync accumulation,
    and tensor parallel clipped: total_norm_before_clip is the full L2 norm whatever norm clips."""
    cases = ["fsdp-shard1", "hsdp-2x1", "hsdp-1x2", *CLIP_CASES]
    results = {case: ran(runs, case) for case in cases}
    for case in cases:
        check_against_oracle(case, results[case])
    assert "Shard(dim=1)" in results["fsdp-shard1"][0]["placements"]["head.weight"]
    for case in CLIP_CASES:
        for result in results[case]:
            before = result["before"]
            for w, window in enumerate(result["windows"]):
                expected = before[w * 2:(w + 1) * 2]
                assert window["overall"]["clip_calls"] == 2, case
                assert window["overall"]["total_norm_before_clip"] == pytest.approx(sum(expected) / 2, rel=1e-6), case


def test_log_on_rank_0_only_fails_rank_0_at_the_collective_timeout(tmp_path):
    """Rank 0 calls log(), rank 1 does not (it waits until rank 0's log() has returned, then removes
    its monitor): rank 0's log() fails at GRADFLOW_COLLECTIVE_TIMEOUT (1 s) with an error that says
    what to do; no hang."""
    results, errors = launch(tmp_path, 2, ["log-rank0-only"], timeout=60, script=SCRIPT,
                             env={"GRADFLOW_COLLECTIVE_TIMEOUT": "1", "BRK11A_RANK0_DONE": str(tmp_path / "rank0-done")})
    rank0, rank1 = results["log-rank0-only"]
    assert rank0 is not None and rank0["error"], errors[0]
    assert rank0["error"].startswith("MonitorError") and "every rank" in rank0["error"], rank0["error"]
    assert rank0["seconds"] < 30 and rank1["error"] is None



def test_sharding_after_attaching_is_said_not_read_as_local_shards(runs):
    """GradientMonitor(model) first, then fully_shard: the parameters become DTensors the monitor
    planned no collectives for. Before the fix the first step raised torch's 'Cannot flatten unevenly
    sharded tensor' out of optimizer.step() (Linear(10, 3) on 2 ranks); evenly sharded ones would
    have been read as local shards. Now training goes on, a warning says it, and log() raises."""
    for result in ran(runs, "fsdp-after-attach"):
        assert result["stepped"] == 2 and not result["rows"]
        assert "a DTensor sharded as (Shard(dim=0),)" in result["error"] and "attach the monitor after" in result["error"]
        assert any("stopped recording" in w for w in result["warnings"]), result["warnings"]


def test_two_fsdp2_models_each_monitored_like_a_gan_match_the_full_gradient(runs):
    """G and D, each fully_shard'ed with its own monitor and optimizer; D's step runs G's forward
    with no backward through G (FSDP2 then leaves G's root parameters unsharded, plain tensors,
    until G's next backward); then G's monitor is replaced by a new one for a second window."""
    ranks = ran(runs, "two-monitors")
    for model in ("g", "d"):
        check_against_oracle(model, [result[model] for result in ranks])


def test_log_again_with_no_step_returns_nothing_on_every_rank(runs):
    """log() twice with no step between: {} as in one process. Before the fix the second log() of an
    FSDP2 model raised 'cannot reshape tensor of 0 elements into shape [0, -1]' in the reduction."""
    for result in ran(runs, "log-twice"):
        assert "up.weight" in result["first"] and result["second"] == {}


def test_an_evaluation_forward_between_steps_matches_the_full_gradient(runs):
    """A no_grad forward after each FSDP2 step: the root's parameters stay unsharded (plain tensors)
    until the next backward, which is not a replacement for the monitor to follow. (Tensor parallel
    with an uneven Colwise dimension, Linear(8, 15) on 2 ranks, fails inside torch's own forward on
    torch 2.13, so it is not a case here.)"""
    check_against_oracle("fsdp-evaluate", ran(runs, "fsdp-evaluate"))
