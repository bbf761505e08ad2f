"""Which devices this machine can use, and moving tensors to one without making the host wait for the GPU."""

from __future__ import annotations

import os

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


def check_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)`` if this machine and this torch build can use it; else a one-line ``ValueError``
    saying why (a CPU-only torch asked for CUDA, a GPU index past the last one, an unknown device type)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r} ({str(err).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {name!r} is not available: this torch ({torch.__version__}) was built without "
                             f"CUDA; use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise ValueError(f"device {name!r} is not available: torch sees no CUDA GPU on this machine "
                             f"(CUDA_VISIBLE_DEVICES={visible}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} is not available: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise ValueError(f"device {name!r} is not available here; use cpu" +
                         (" or cuda" if torch.cuda.is_available() else ""))
    return device
