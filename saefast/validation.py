"""Input checks that run before any compute and name the problem."""

from __future__ import annotations

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
