"""Break tests (brk15c) of the monitor on sharded models: per-gate rows (``Window.gates``) of LSTM/GRU
weights under FSDP2 on 2, 3 and 4 ranks (shard boundaries on and inside gates, an empty shard,
``Shard(1)`` columns, gradient accumulation with the sync off, clip_grad_norm_, a plain GRU beside a
sharded LSTM, two optimizers in one step, a frozen weight, record() by hand) and HSDP 2x2 on 4
ranks; and that through time on a sharded LSTM is said, not recorded.

The oracle (brk15c_run.py): each gated gradient the step applies, ``full_tensor()`` in float64 at an
optimizer step pre-hook, cut into its gates by hand; each gate's L2 norm averaged over the window's
steps, each gate's weight norm from the full weight at the window's end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.fsdp")

from sharded_launch import launch  # noqa: E402

SCRIPT = Path(__file__).with_name("brk15c_run.py")
TWO = ["fsdp-gates", "fsdp-gates-columns", "fsdp-gates-accumulate", "fsdp-gates-clip", "fsdp-gates-mixed",
       "fsdp-gates-split", "fsdp-gates-frozen", "fsdp-gates-manual"]
GATED = ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0_reverse", "lstm.weight_hh_l0_reverse",
         "gru.weight_ih_l0", "gru.weight_hh_l0")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("brk15c2"), 2, [*TWO, "log-skew", "nan-in-one-ranks-layer"], timeout=200, script=SCRIPT)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("brk15c3"), 3, ["fsdp-gates"], timeout=200, script=SCRIPT)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("brk15c4"), 4, ["hsdp-gates", "fsdp-gates", "fsdp-tp-plain-norm"], timeout=300,
                  script=SCRIPT)


def ran(runs, case: str) -> list[dict]:
    results, errors = runs
    for rank, result in enumerate(results[case]):
        assert result is not None and "crash" not in result, f"{case} rank {rank}: {result and result['crash']} {errors[rank]}"
    return results[case]


def check_gates(case: str, ranks: list[dict]) -> None:
    """Every rank's gate rows equal rank 0's and the oracle's (1e-6 relative), every gated weight has them."""
    for rank, result in enumerate(ranks):
        assert result["windows"] == ranks[0]["windows"], f"{case}: rank {rank}'s windows differ from rank 0's"
        assert not [w for w in result["warnings"] if "per-gate" in w], (case, result["warnings"])
        assert len(result["windows"]) == len(result["oracle"]) == 2, case
        for window, oracle in zip(result["windows"], result["oracle"]):
            expected_names = [n for n in GATED if "frozen" not in case or n != "lstm.weight_hh_l0_reverse"]
            assert sorted(window["gates"]) == sorted(oracle) == sorted(expected_names), (case, sorted(window["gates"]))
            for name in expected_names:
                rows, expected = list(window["gates"][name].values()), oracle[name]
                assert [r["steps"] for r in rows] == [expected["steps"]] * len(rows), (case, name)
                for field in ("norm", "weight_norm"):
                    got = [r[field] for r in rows]
                    assert got == pytest.approx(expected[field], rel=1e-6), (case, rank, name, field)


@pytest.mark.parametrize("case", TWO, ids=["rows", "columns", "accumulate", "clip", "mixed-plain", "two-optimizers",
                                           "frozen", "manual-record"])
def test_gates_of_sharded_weights_on_two_ranks(two, case):
    check_gates(case, ran(two, case))


def test_gates_cut_by_shards_on_three_ranks(three):
    ranks = ran(three, "fsdp-gates")
    assert [r["shards"]["lstm.weight_ih_l0"][0] for r in ranks] == [7, 7, 6]     # boundaries inside gates of 5
    check_gates("fsdp-gates", ranks)


def test_gates_under_hsdp_on_four_ranks(four):
    check_gates("hsdp-gates", ran(four, "hsdp-gates"))


def test_gates_with_an_empty_shard_on_four_ranks(four):
    ranks = ran(four, "fsdp-gates")
    assert [r["shards"]["gru.weight_ih_l0"][0] for r in ranks] == [3, 3, 3, 0]    # rank 3 holds none of 9 rows
    check_gates("fsdp-gates", ranks)


def test_through_time_on_a_sharded_lstm_is_said_on_every_rank(two):
    """Through time cannot unroll FSDP2's LSTM (its unsharded weights live only inside the unit's
    forward and backward): Window.time stays empty and one warning at attach says so, on every rank."""
    for result in ran(two, "fsdp-gates"):
        assert result["time"] == ["{}", "{}"]
        said = [w for w in result["warnings"] if "through time is not recorded" in w]
        assert len(said) == 1 and "DTensor" in said[0], result["warnings"]


def test_ranks_that_log_after_different_steps_are_told(two):
    """Rank 0 logs after steps 1 and 3, rank 1 after their backward, before the step: rank 0's
    first window holds steps 0 and 1, rank 1's step 0 only. Its total_norm was 0.842 on rank 0 and
    0.936 on rank 1 where the steps' full norms were 0.936 and 0.896 (mean 0.916), with no word;
    the numbers cannot be made right (the ranks' shards are of different steps), so every rank
    now says so once."""
    ranks = ran(two, "log-skew")
    assert ranks[0]["totals"][0] != pytest.approx(ranks[1]["totals"][0])
    for rank, result in enumerate(ranks):
        said = [w for w in result["warnings"] if "different optimizer steps" in w]
        assert len(said) == 1 and f"1 to 2, {2 - rank} here" in said[0], result["warnings"]


def test_fsdp_over_tp_with_a_layer_on_the_dp_mesh_only(four):
    """FSDP2 over tensor parallel on a 2x2 (dp, tp) mesh with a LayerNorm that has no tensor-parallel
    plan: its parameters live on the dp sub-mesh (ranks 0, 2 or 1, 3). The attach raised 'norm.weight
    lives on a device mesh of ranks [0, 2], not every rank of the world (4)' on every rank; the
    sub-mesh is now read as a dim of its root mesh and every row matches the applied gradient."""
    ranks = ran(four, "fsdp-tp-plain-norm")
    assert ranks[0]["placements"]["norm.weight"] == "[0, 2] (Shard(dim=0),)"
    for result in ranks:
        assert result["windows"] == ranks[0]["windows"]
        for window, oracle in zip(result["windows"], result["oracle"]):
            assert sorted(window["rows"]) == sorted(oracle["rows"])
            for name, expected in oracle["rows"].items():
                for field in ("norm", "max_abs", "mean_abs", "zero_fraction"):
                    assert window["rows"][name][field] == pytest.approx(expected[field], rel=1e-6, abs=1e-12), (name, field)
            assert window["overall"]["total_norm"] == pytest.approx(oracle["total_norm"], rel=1e-6)


def test_a_nan_made_in_one_ranks_layer_is_named_on_every_rank(two):
    """Rank 1's module 2 makes a NaN in its forward at step 1; rank 0 gets it only through the
    gradient's reduce-scatter. Both ranks name rank 1's module, pass and step (was fine)."""
    assert [r["source"] for r in ran(two, "nan-in-one-ranks-layer")] == [["2", "forward", 1]] * 2
