"""Input checks that run before any compute and name the problem."""

from __future__ import annotations

from typing import Any

import torch


def check_activations(x: object, d_in: int, name: str = "x", check_finite: bool = True) -> torch.Tensor:
    """Validate a batch of activations ``[N, d_in]``: a floating tensor, non-empty, finite. Returns it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, {d_in}], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32/bfloat16/float16/float64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, d_in={d_in}], got shape {tuple(x.shape)}")
    if x.shape[1] != d_in:
        raise ValueError(f"{name} has d_in={x.shape[1]} but the model expects d_in={d_in}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 tokens)")
    if check_finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise ValueError(f"{name} contains NaN or Inf values (in {bad} of {x.shape[0]} rows)")
    return x


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(name, old value, new value)`` for every field where ``new`` differs from ``old``, nested dicts compared
    field by field (named ``a.b``), a field missing on one side given as ``"<absent>"``: so that a refusal to resume
    or append can name each setting that changed and both its values."""
    changes = []
    for key in [*old, *(key for key in new if key not in old)]:
        name = f"{prefix}{key}"
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(before, dict) and isinstance(after, dict):
            changes += changed_fields(before, after, f"{name}.")
        elif before != after:
            changes.append((name, before, after))
    return changes
