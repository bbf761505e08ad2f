"""Confidence intervals over seeds (or any repeated measurements), and a conservative comparison of two of them.

For ``n`` values ``v_1..v_n`` with mean ``v̄`` and sample standard deviation ``s = √(Σ(v_i − v̄)²/(n − 1))``, the
Student-t interval at ``level`` is ``v̄ ± t_{(1+level)/2, n−1} · s/√n`` (:func:`mean_ci`). :func:`compare_intervals`
claims an order only when two such intervals do not overlap. scipy (a scikit-learn dependency) is imported on use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["compare_intervals", "format_ci", "mean_ci", "summarize"]


def _finite_values(values: Sequence[float] | np.ndarray | torch.Tensor, name: str = "values") -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array; NaN or Inf is an error that names the positions."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a confidence interval needs at least one value")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} holds NaN or Inf at positions {bad.tolist()}: drop or fix those runs first")
    return array


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def mean_ci(values: Sequence[float] | np.ndarray | torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The mean ``v̄`` and the half-width ``h = t_{(1+level)/2, n−1} · s/√n`` of the Student-t confidence interval
    ``[v̄ − h, v̄ + h]`` (``s``: sample standard deviation, ``n − 1`` degrees of freedom).

    ``n = 1`` gives ``h = nan`` (no spread to estimate). NaN or Inf in ``values`` is a ValueError naming them."""
    _check_level(level)
    array = _finite_values(values)
    n, mean = array.size, float(array.mean())
    if n == 1:
        return mean, float("nan")
    from scipy.stats import t

    return mean, float(t.ppf((1 + level) / 2, n - 1) * array.std(ddof=1) / math.sqrt(n))


def summarize(values: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, Any]:
    """``{"mean": v̄, "ci95": h, "n": n, "values": [...]}``, with ``h`` the 95 % half-width of :func:`mean_ci`."""
    array = _finite_values(values)
    mean, half = mean_ci(array, 0.95)
    return {"mean": mean, "ci95": half, "n": int(array.size), "values": [float(v) for v in array]}


def compare_intervals(a_values: Sequence[float] | np.ndarray | torch.Tensor,
                      b_values: Sequence[float] | np.ndarray | torch.Tensor, level: float = 0.95) -> str:
    """``"A > B"`` when A's interval lies wholly above B's (``ā − h_a > b̄ + h_b``), ``"A < B"`` when wholly below,
    else ``"not distinguishable"`` (overlapping intervals, or a side with one value and so no interval).

    Conservative: two non-overlapping ``level`` intervals imply a difference at a stricter level than ``level``
    (a difference can be significant while the intervals still overlap), so a claim made here is safe and a
    "not distinguishable" is no proof of equality."""
    mean_a, half_a = mean_ci(_finite_values(a_values, "a_values"), level)
    mean_b, half_b = mean_ci(_finite_values(b_values, "b_values"), level)
    if math.isnan(half_a) or math.isnan(half_b):
        return "not distinguishable"
    if mean_a - half_a > mean_b + half_b:
        return "A > B"
    if mean_a + half_a < mean_b - half_b:
        return "A < B"
    return "not distinguishable"


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    """``"0.812 ± 0.014"``: the mean and half-width with ``digits`` decimals (``nan`` for an undefined width)."""
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
