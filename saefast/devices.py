"""Moving tensors to the model's device without making the host wait for the GPU."""

from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` on ``device`` (in ``dtype``, else its own).

    Host to GPU goes through pinned memory without blocking, and the dtype is converted on the GPU: a copy from
    pageable memory (which a conversion on the host would also produce) makes the host wait for everything queued
    on the GPU first. Other moves are plain ``Tensor.to``."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        x = (x if x.is_pinned() else x.pin_memory()).to(device=device, non_blocking=True)
    return x.to(device=device, dtype=dtype or x.dtype)
