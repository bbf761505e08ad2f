"""Shared test fixtures: a fixed torch seed per test and a closeness helper that reports the error.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton is
first imported — hence here, at the top of the first module pytest loads.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state (so tests are independent of their order)."""
    torch.manual_seed(0)
    yield


def assert_close(actual, expected, atol: float = 1e-6, rtol: float = 0.0, msg: str = "") -> None:
    """``|actual − expected| <= atol + rtol·|expected|`` elementwise; on failure prints the max abs error."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    ok = bool((err <= bound).all()) and not bool(torch.isnan(a).any() ^ torch.isnan(e).any())
    if not ok:
        worst = int(torch.nan_to_num(err - bound, nan=float("inf")).argmax())
        raise AssertionError(
            f"{msg} not close: max abs error {float(err.max()):.3e} (atol={atol}, rtol={rtol}); "
            f"worst at flat index {worst}: actual {float(a.flatten()[worst])!r} "
            f"vs expected {float(e.flatten()[worst])!r}"
        )
