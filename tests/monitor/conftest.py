"""Fixtures the monitor's tests share."""

import pytest

from gradflow.monitor import stats as S


@pytest.fixture(params=["fused", "torch-ops"])
def reduction_path(request, monkeypatch):
    """Both ways the CPU reduces: numba's fused kernels, and torch ops (the way every
    accelerator reduces, so that path is checked here too)."""
    if request.param == "torch-ops":
        monkeypatch.setattr(S, "_KERNELS", False)
    elif S.fused_kernels() is None:
        pytest.skip("numba is not installed")
    return request.param
