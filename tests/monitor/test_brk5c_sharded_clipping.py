"""Value clipping of an FSDP2 model with empty local shards, on 2 gloo ranks (break test brk5c).

torch's ``clip_grad_value_`` clamps an empty shard fine; the monitor's look at the gradients
before it (their largest |g|) must neither raise on that rank nor leave the other waiting in a
collective. The oracle: each gradient's ``full_tensor()`` in float64, before clipping (the L2 norm
and whether some |g| exceeded the clip value) and at the optimizer step (each parameter's norm).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.fsdp")

from sharded_launch import launch  # noqa: E402


def test_value_clipping_with_empty_shards_matches_the_full_gradient(tmp_path):
    results, errors = launch(tmp_path, 2, ["value-clipping"], timeout=120,
                             script=Path(__file__).with_name("brk5c_sharded_run.py"))
    ranks = results["value-clipping"]
    for rank, result in enumerate(ranks):
        assert result is not None and "crash" not in result, f"rank {rank}: {result and result['crash']} {errors[rank]}"
    assert ranks[1]["local_rows"]["one"] == [0] and ranks[1]["local_rows"]["b.weight"] == [0, 3]
    for result in ranks:
        overall = result["overall"]
        assert result["clipped"] == 2 and overall["clipped_steps"] == 2 and overall["clip_calls"] == 4
        assert overall["total_norm_before_clip"] == pytest.approx(result["before"], rel=1e-6)
        for name, norm in result["oracle_norms"].items():
            assert result["norms"][name] == pytest.approx(norm, rel=1e-6), name
