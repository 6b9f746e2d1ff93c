"""Break tests (brk13c) of the monitor on 2 gloo ranks, kinds earlier break tests did not try: DDP
with GradScaler("cpu") and a fused Adam (unscaled inside its step), DDP static_graph with
gradient_as_bucket_view and zero_grad(set_to_none=False), DDP's sparse EmbeddingBag gradient,
FSDP2 with awkward shards (5 rows on 2 ranks, a (1,) parameter), fully_shard on submodules only
(DTensor and plain parameters in one model), FSDP2 under GradScaler with a fused AdamW and a
skipped (overflowed) first step, an overflow in one rank's shard only, an LSTM under FSDP2,
torchtitan's clip (get_total_norm's DTensor given to clip_grads_with_norm_), a tensor-parallel
embedding with a plain BatchNorm, a NaN in one rank's sequence part under tensor parallel, a monitor
on a submodule of an FSDP2 unit, and a monitor attached after an evaluation forward.

The oracle (brk13c_run.py): each gradient the step applies (full_tensor() of a DTensor, a fused
optimizer's gradient divided by its grad_scale) in float64, from a step pre-hook registered after
the monitor's, averaged per window as the monitor does (sharded_run.Oracle); for the overflow,
the same training unsharded in one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.fsdp")

from sharded_launch import launch  # noqa: E402

SCRIPT = Path(__file__).with_name("brk13c_run.py")
FIELDS = ("mean_abs", "norm", "max_abs", "zero_fraction", "weight_l1", "weight_norm", "weight_update_ratio")
ORACLE_CASES = ["ddp-scaler-fused", "ddp-static", "ddp-sparse", "fsdp-odd", "fsdp-plain-mixed", "fsdp-scaler-fused",
                "fsdp-overflow-fused", "fsdp-lstm", "fsdp-titan-clip-dtensor", "tp-embedding"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, list[dict]], list[str]]:
    """Every case in one 2-rank run (process start-up dominates the time)."""
    return launch(tmp_path_factory.mktemp("brk13c"), 2, [*ORACLE_CASES, "one-rank-overflows", "tp-nonfinite",
                                                         "fsdp-submodule-evaluate", "fsdp-attach-after-evaluate",
                                                         "fsdp-submodule-attach-after-evaluate"],
                  timeout=200, script=SCRIPT)


def ran(runs, case: str) -> list[dict]:
    results, errors = runs
    for rank, result in enumerate(results[case]):
        assert result is not None and "crash" not in result, f"{case} rank {rank}: {result and result['crash']} {errors[rank]}"
    return results[case]


def check_against_oracle(name: str, ranks: list[dict]) -> None:
    """Every rank's windows (rows, overall, weights, every Window field but activations and time)
    and written scalars and texts equal rank 0's, log()'s return equals history's rows, and the
    rows match the oracle's to 1e-6 relative."""
    worst = 0.0
    for rank, result in enumerate(ranks):
        assert result["windows"] == ranks[0]["windows"], f"{name}: rank {rank}'s windows differ from rank 0's"
        assert len(result["windows"]) == len(result["oracle"]) == 2, name
        if "scalars" in result:                   # what a writer gets, but the activations' (this rank's batch)
            assert json.dumps(result["scalars"]) == json.dumps(ranks[0]["scalars"]), name
            assert result["texts"] == ranks[0]["texts"], name
        for window, oracle in zip(result["windows"], result["oracle"]):
            assert window["returned"] == window["rows"], name
            assert set(window["rows"]) == set(oracle["rows"]), (name, rank)
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


@pytest.mark.parametrize("case", ORACLE_CASES, ids=ORACLE_CASES)
def test_each_kind_matches_the_gradient_the_step_applies(runs, case):
    ranks = ran(runs, case)
    check_against_oracle(case, ranks)
    for result in ranks:                          # no word from the monitor where nothing is wrong
        said = [w for w in result["warnings"] if "FSDP2-wrapped module" not in w]   # torch's own
        if case != "fsdp-lstm":
            assert said == [], (case, said)
    if case == "fsdp-odd":                        # Linear(10, 5) on 2 ranks: rows 3 and 2; (1,): rank 1 empty
        assert ranks[0]["kinds"]["scale"] == "DTensor"
    if case == "fsdp-plain-mixed":
        assert ranks[0]["kinds"]["down.weight"] == "Parameter" and ranks[0]["kinds"]["up.weight"] == "DTensor"
    if case == "fsdp-overflow-fused":             # step 0 skipped (inf scale): every value non-finite, as unsharded
        for result in ranks:
            first, reference = result["windows"][0], result["reference"][0]
            assert first["overall"]["skipped_steps"] == reference["overall"]["skipped_steps"] == 1
            assert first["skipped_nonfinite"] == reference["skipped_nonfinite"] == result["numel"]
    if case == "fsdp-titan-clip-dtensor":         # get_total_norm's DTensor given to clip_grads_with_norm_
        for result in ranks:
            for w, window in enumerate(result["windows"]):
                expected = sum(result["before"][2 * w:2 * w + 2]) / 2
                assert window["overall"]["clip_calls"] == 2 and window["overall"]["clipped_steps"] == 2
                assert window["overall"]["total_norm_before_clip"] == pytest.approx(expected, rel=1e-6)
    if case == "tp-embedding":
        assert ranks[0]["kinds"]["embed.weight"] == "(Shard(dim=0),)" and ranks[0]["kinds"]["bn.weight"] == "plain"


def test_sharded_lstm_weights_have_gate_rows(runs):
    """An LSTM under FSDP2: its gate-stacked weights are Shard(0) DTensors. brk13c found Window.gates
    empty with no word and added a warning; brk15c records their gate rows (test_brk15c_sharded.py
    checks them against the oracle), with no warning, on every rank."""
    for result in ran(runs, "fsdp-lstm"):
        assert "'lstm.weight_ih_l0': {'input'" in result["gates"] and "'lstm.weight_hh_l0'" in result["gates"]
        assert not [w for w in result["warnings"] if "per-gate rows" in w], result["warnings"]


def test_an_overflow_in_one_ranks_shard_is_skipped_on_every_rank(runs):
    """Rank 1's target overflows the scaled gradient of head row 2 only (rank 1's shard): torch's
    GradScaler skips the step on both ranks, and both report one recorded step, one skipped, and
    the skipped step's non-finite values (row 2's 10 weights and 1 bias), the same on each."""
    ranks = ran(runs, "one-rank-overflows")
    for result in ranks:
        assert result["skipped"] == [False, True]
        assert result["overall"]["steps"] == 1 and result["overall"]["skipped_steps"] == 1
        assert result["skipped_nonfinite"] == {"weight": 10, "bias": 1}
        assert result["rows"] == ranks[0]["rows"] and result["rows"]["weight"]["nonfinite"] == 0
        assert not result["warnings"], result["warnings"]


def test_a_nan_in_one_ranks_sequence_part_under_tensor_parallel_is_found_on_every_rank(runs):
    """SequenceParallel LayerNorm (DTensor outputs), Colwise and Rowwise with the first-non-finite
    part: rank 1's input part has a NaN at step 2; both ranks name the input at step 2."""
    for result in ran(runs, "tp-nonfinite"):
        assert result["source"] == ["(input)", "forward", 2] and not result["warnings"], result


def test_a_monitored_submodule_of_an_fsdp2_unit_follows_its_unsharded_stand_ins(runs):
    """GradientMonitor(outer.body), where fully_shard(outer) holds the body's parameters (the body
    holds no FSDP2 module), and a no_grad forward after each step leaves them unsharded (plain
    tensors of the full shape) at log(). Before the fix log() raised "norm.weight was sharded as
    (Shard(dim=0),) when the monitor attached and is now a plain tensor: attach the monitor after
    sharding": the stand-ins were told from a replacement only where the monitored module itself
    held an FSDP2 module. Now the rows match the applied gradient, with no warning."""
    ranks = ran(runs, "fsdp-submodule-evaluate")
    check_against_oracle("fsdp-submodule-evaluate", ranks)
    for result in ranks:
        assert not result["warnings"], result["warnings"]


def test_attaching_after_an_evaluation_forward_attaches_to_the_sharded_parameters(runs):
    """A no_grad forward before the monitor attaches (a validation pass first) leaves the FSDP2 root
    unit's parameters as plain unsharded stand-ins. Before the fix the monitor attached to those,
    stopped at the first step, and log() raised "norm.weight was a plain tensor when the monitor
    attached and is now a DTensor sharded as (Shard(dim=0),): attach the monitor after sharding",
    though it was attached after sharding. Now it attaches to the DTensors: rows as applied. A
    monitored submodule of the unit cannot reach the unit: its error names the way out."""
    ranks = ran(runs, "fsdp-attach-after-evaluate")
    assert ranks[0]["kinds"]["norm.weight"] == "Parameter"      # a stand-in when the monitor attached
    check_against_oracle("fsdp-attach-after-evaluate", ranks)
    for result in ranks:
        assert not result["warnings"], result["warnings"]
    for result in ran(runs, "fsdp-submodule-attach-after-evaluate"):
        # a submodule of the unit, attached after the evaluation: the unit is out of its reach; said
        assert "call reshard() on that FSDP2 module before attaching" in result["error"], result
