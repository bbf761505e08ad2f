"""The decoder-norm gradient projection, between the backward and the optimizer step.

``g_r ← g_r − (g_r·ŵ_r) ŵ_r`` for every decoder row, so a step cannot change a unit row's norm to first order.
Kernels: ``kernels/saefast_triton/decoder_grad_projection.py`` (``triton``),
``csrc/cpu/decoder_grad_projection.cpp`` (``native``); oracle :func:`saefast.ops.ref.remove_parallel_grad_`.
"""

from __future__ import annotations

import torch

from . import native, ref
from .backend import resolve_backend
from .registration import triton_custom_op


def _remove_parallel_grad_impl(W: torch.Tensor, grad: torch.Tensor) -> None:
    from ..kernels.decoder_grad_projection import remove_parallel_grad_ as fused

    fused(W, grad)


def _remove_parallel_grad_fake(W, grad):
    return None


_triton_remove_parallel_grad = triton_custom_op("saefast::remove_parallel_grad_", _remove_parallel_grad_impl,
                                                _remove_parallel_grad_fake, mutates_args=("grad",))


def remove_parallel_grad_(W: torch.Tensor, grad: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """In place ``g_r ← g_r − (g_r·ŵ_r) ŵ_r`` with ``ŵ_r = W_r / max(‖W_r‖, 1e-12)``, for every decoder row ``r`` of
    ``W [..., D]`` and its gradient ``grad`` (same shape), so an optimizer step cannot change a unit row's norm to
    first order; returns ``grad``.

    ``triton``: one fused pass (:mod:`saefast.kernels.decoder_grad_projection`); ``native``: the same on the CPU
    (``csrc/cpu/decoder_grad_projection.cpp``; CUDA tensors take the torch path: the extension has no CUDA kernel
    for it); ``torch``: :func:`saefast.ops.ref.remove_parallel_grad_`, which builds three ``[R, D]`` temporaries. The
    fused passes need ``grad`` viewable as ``[R, D]`` rows (contiguous, or a member slice of a contiguous tensor).
    """
    backend = resolve_backend(backend, W.device)
    if backend == "triton":
        _triton_remove_parallel_grad(W, grad)
    elif backend == "native" and W.device.type == "cpu" and native.available():
        torch.ops.saefast.native_remove_parallel_grad_(W, grad)
    else:
        ref.remove_parallel_grad_(W, grad)
    return grad
