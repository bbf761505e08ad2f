"""Sparse decode of ``J`` members in one launch, and its sparse backward.

``x̂ = bias + Σ_j α_j Σ_k mask·z[n, j, k]·W_dec[j, idx[n, j, k]]`` (combined, ``[N, D]``) or the per-member outputs
``[N, J, D]``, never building the dense ``[N, J·M]`` codes. Kernels: ``kernels/saefast_triton/sparse_decode.py``
and ``sparse_decode_backward.py`` (``triton``), ``csrc/cpu/sparse_decode.cpp`` and ``csrc/cuda/sparse_decode.cu``
(``native``); oracle :func:`saefast.ops.ref.decode_sparse`. The encoder's backward reuses these kernels with
``W_enc`` in the decoder's place (:mod:`saefast.ops.encode`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import native, ref
from .backend import resolve_backend
from .codes import SparseCodes
from .registration import FusedKernels, triton_custom_op


def _sparse_decode_impl(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, alpha: torch.Tensor,
                        bias: torch.Tensor | None, mask: torch.Tensor | None, per_member: bool) -> torch.Tensor:
    from ..kernels.sparse_decode import sparse_decode

    return sparse_decode(values, indices, W_dec, alpha, bias=bias, mask=mask, per_member=per_member)


def _sparse_decode_fake(values, indices, W_dec, alpha, bias, mask, per_member):
    N, J, _ = values.shape
    shape = (N, J, W_dec.shape[2]) if per_member else (N, W_dec.shape[2])
    return W_dec.new_empty(shape)


def _grad_values_impl(grad_out: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, alpha: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    from ..kernels.sparse_decode_backward import sparse_decode_grad_values

    return sparse_decode_grad_values(grad_out, indices, W_dec, alpha, mask=mask)


def _grad_values_fake(grad_out, indices, W_dec, alpha, mask):
    return indices.new_empty(indices.shape, dtype=torch.float32)


def _grad_weight_impl(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n_latents: int,
                      alpha: torch.Tensor, mask: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
    from ..kernels.sparse_decode_backward import sparse_decode_grad_weight

    return sparse_decode_grad_weight(grad_out, values, indices, n_latents, alpha, mask=mask,
                                     deterministic=deterministic)


def _grad_weight_fake(grad_out, values, indices, n_latents, alpha, mask, deterministic):
    return values.new_empty((values.shape[1], n_latents, grad_out.shape[-1]), dtype=torch.float32)


def _fused_backward_fake(grad_out, values, indices, W_dec, alpha, mask):
    return indices.new_empty(indices.shape, dtype=torch.float32), W_dec.new_empty(W_dec.shape, dtype=torch.float32)


_triton_sparse_decode = triton_custom_op("saefast::sparse_decode", _sparse_decode_impl, _sparse_decode_fake)
_triton_grad_values = triton_custom_op("saefast::sparse_decode_grad_values", _grad_values_impl, _grad_values_fake)
_triton_grad_weight = triton_custom_op("saefast::sparse_decode_grad_weight", _grad_weight_impl, _grad_weight_fake)


class DecodeKernels(NamedTuple):
    """One fused backend's sparse decode family (the contracts of the Triton kernels)."""

    sparse_decode: Callable[..., Any]
    grad_values: Callable[..., Any]
    grad_weight: Callable[..., Any]
    fused_backward: Callable[..., Any] | None = None
    """``(grad_values, grad_weight)`` in one latent-ordered pass, where the backend has it (native on the CPU)."""


decode_kernels = FusedKernels(DecodeKernels(_triton_sparse_decode, _triton_grad_values, _triton_grad_weight))
"""``decode_kernels(backend)``: the decode family of a resolved fused backend (``triton`` or ``native``)."""


def _decode_setup(ctx, inputs, output):
    values, indices, W_dec, alpha, bias, mask, per_member = inputs
    ctx.save_for_backward(values, indices, W_dec, alpha, mask)
    ctx.per_member = per_member
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _decode_backward(kernels: DecodeKernels, ctx, grad):
    """``dz[n,j,k] = α_j·mask·⟨g, W_dec[j, idx]⟩`` (gather-dot), ``dW_dec[j, m] = α_j Σ_{idx=m} mask·z·g``
    (transposed sparse–dense product), ``dbias = Σ_n g``."""
    values, indices, W_dec, alpha, mask = ctx.saved_tensors
    grad = grad.float().contiguous()
    grad_values = grad_W = grad_bias = None
    if (ctx.needs_input_grad[0] and ctx.needs_input_grad[2] and kernels.fused_backward is not None
            and grad.device.type == "cpu"):
        grad_values, grad_W = kernels.fused_backward(grad, values, indices, W_dec, alpha, mask)
        grad_values, grad_W = grad_values.to(values.dtype), grad_W.to(W_dec.dtype)
    elif ctx.needs_input_grad[0]:
        grad_values = kernels.grad_values(grad, indices, W_dec, alpha, mask).to(values.dtype)
    if ctx.needs_input_grad[2] and grad_W is None:
        grad_W = kernels.grad_weight(grad, values, indices, W_dec.shape[1], alpha, mask,
                                     torch.are_deterministic_algorithms_enabled()).to(W_dec.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)  # [D] combined, [J, D] per member
    return grad_values, None, grad_W, None, grad_bias, None, None


torch.library.register_autograd("saefast::sparse_decode",
                                functools.partial(_decode_backward, decode_kernels.triton), setup_context=_decode_setup)


@native.on_load
def _register_native() -> None:
    for name, fake in (("native_sparse_decode", _sparse_decode_fake), ("native_sparse_decode_grad_values",
                       _grad_values_fake), ("native_sparse_decode_grad_weight", _grad_weight_fake),
                       ("native_sparse_decode_backward", _fused_backward_fake)):
        torch.library.register_fake(f"saefast::{name}")(fake)
    ops = torch.ops.saefast
    decode_kernels.native = DecodeKernels(ops.native_sparse_decode, ops.native_sparse_decode_grad_values,
                                          ops.native_sparse_decode_grad_weight, ops.native_sparse_decode_backward)
    torch.library.register_autograd("saefast::native_sparse_decode",
                                    functools.partial(_decode_backward, decode_kernels.native),
                                    setup_context=_decode_setup)


def decode_members_sparse(codes: SparseCodes, W_dec: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Per-member decoder outputs (no bias) of sparse codes,
    ``y[n, j] = Σ_s values[n, j, s]·W_dec[j, indices[n, j, s]]``, ``[N, J, D]``; differentiable in the values and
    ``W_dec``. Oracle: :func:`saefast.ops.ref.decode_members_sparse`."""
    backend = resolve_backend(backend, W_dec.device)
    if backend == "torch":
        return ref.decode_members_sparse(codes, W_dec)
    J = W_dec.shape[0]
    ones = torch.ones(J, dtype=torch.float32, device=W_dec.device)
    values, indices = codes.values.contiguous(), codes.indices.contiguous()
    return decode_kernels(backend).sparse_decode(values, indices, W_dec.contiguous(), ones, None, None, True)


def decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: torch.Tensor, alpha: float | torch.Tensor,
           mask: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Ensemble decode ``x̂ = Σ_j α_j (Σ_s mask·values·W_dec[j, indices] + b_dec[j])`` ``[N, D]``, in one launch.

    ``b_dec`` is ``[J, D]`` or ``[1, D]`` (shared: added once, unscaled — the single-SAE case) and ``mask``
    ``[N, J, K]`` bool (False drops a slot; feature sharpening) or None. Oracle:
    :func:`saefast.ops.ref.decode_sparse`.
    """
    backend = resolve_backend(backend, W_dec.device)
    J = W_dec.shape[0]
    alpha_t = ref.member_weights(alpha, J, torch.float32, W_dec.device).contiguous()
    if backend == "torch":
        values = codes.values if mask is None else codes.values * mask
        return ref.decode_sparse(SparseCodes(values, codes.indices, codes.n_latents), W_dec, b_dec, alpha_t)
    bias = b_dec[0] if b_dec.shape[0] == 1 else (alpha_t.view(J, 1).to(b_dec.dtype) * b_dec).sum(0)
    values, indices = codes.values.contiguous(), codes.indices.contiguous()
    return decode_kernels(backend).sparse_decode(values, indices, W_dec.contiguous(), alpha_t, bias.contiguous(),
                                                 None if mask is None else mask.contiguous(), False)
