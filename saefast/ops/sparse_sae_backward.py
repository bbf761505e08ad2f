"""The training forward of a TopK / BatchTopK SAE as one differentiable op, whose backward is one fused sparse pass.

:func:`sparse_sae_outputs` takes codes computed *without* gradient by an encode of ``x`` (the top-k or BatchTopK
codes, and AuxK's) and returns the per-member decoder outputs, differentiable in ``x``, ``W_enc``, ``b_enc``,
``b_dec`` and ``W_dec`` exactly as the encode → ReLU → decode chain is. Op by op, that backward walks the
``N·J·K`` slots three or four times (the decoder's gradient of the codes, the decoder weight gradient, the encoder
weight gradient, AuxK's two) and builds a dense gradient of the folded encoder bias; here it is one pass over the
slots bucketed by latent, which reads each decoder row once and writes each gradient row once.

Kernels: ``csrc/cpu/sparse_sae_backward.cpp`` (``native``, CPU), ``kernels/saefast_triton/sparse_sae_backward.py``
(``triton``); oracle :func:`saefast.ops.ref.sparse_sae_backward`. The forward is the sparse decode of
:mod:`saefast.ops.decode`.
"""

from __future__ import annotations

import torch

from . import native
from .backend import resolve_backend
from .codes import SparseCodes
from .decode import decode_kernels
from .encode import folded_bias_grad_b_dec
from .registration import triton_custom_op


def _sparse_sae_backward_impl(x: torch.Tensor, b_dec: torch.Tensor, W_dec: torch.Tensor, values: torch.Tensor,
                              indices: torch.Tensor, split: int, grad_out: torch.Tensor,
                              aux_grad_out: torch.Tensor | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.sparse_sae_backward import sparse_sae_backward

    return sparse_sae_backward(x, b_dec, W_dec, values, indices, split, grad_out, aux_grad_out)


def _sparse_sae_backward_fake(x, b_dec, W_dec, values, indices, split, grad_out, aux_grad_out):
    J, M, D = W_dec.shape
    f32 = torch.float32
    return (W_dec.new_empty((J, M, D), dtype=f32), W_dec.new_empty((J, M), dtype=f32),
            W_dec.new_empty((J, M, D), dtype=f32), values.new_empty(indices.shape, dtype=f32))


_triton_sparse_sae_backward = triton_custom_op("saefast::sparse_sae_backward", _sparse_sae_backward_impl,
                                               _sparse_sae_backward_fake)


@native.on_load
def _register_native() -> None:
    torch.library.register_fake("saefast::native_sparse_sae_backward")(_sparse_sae_backward_fake)


def fused_backward_runs(backend: str, device: torch.device) -> bool:
    """Whether the resolved ``backend`` has the fused backward on ``device``: ``triton`` (CUDA, or the interpreter),
    ``native`` on the CPU (its CUDA build has no such kernel yet); ``torch`` never (it is the op-by-op oracle)."""
    if backend == "triton":
        return True
    return backend == "native" and device.type == "cpu" and native.available()


def _kernel(backend: str):
    if backend == "native":
        return torch.ops.saefast.native_sparse_sae_backward
    return _triton_sparse_sae_backward


class _SparseSAE(torch.autograd.Function):
    """``(y, y_aux) = decode(codes), decode(aux codes)`` in the forward; the fused sparse backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, values, indices, aux_values, aux_indices, backend):
        kernels = decode_kernels(backend)
        J = W_dec.shape[0]
        ones = torch.ones(J, dtype=torch.float32, device=W_dec.device)
        W = W_dec.contiguous()
        y = kernels.sparse_decode(values, indices, W, ones, None, None, True)
        has_aux = aux_values is not None
        y_aux = kernels.sparse_decode(aux_values, aux_indices, W, ones, None, None, True) if has_aux else None
        if has_aux:  # one slot list, codes first: the kernel reads slots ≥ split with the AuxK gradient
            values, indices = torch.cat([values, aux_values], -1), torch.cat([indices, aux_indices], -1)
        ctx.save_for_backward(x, W_enc, b_dec, W_dec, values, indices)
        ctx.split = values.shape[-1] - (aux_values.shape[-1] if has_aux else 0)
        ctx.backend = backend
        ctx.dtypes = (x.dtype, W_enc.dtype, b_enc.dtype, b_dec.dtype, W_dec.dtype)
        return (y, y_aux) if has_aux else (y, None)

    @staticmethod
    def backward(ctx, grad_y, grad_y_aux):
        x, W_enc, b_dec, W_dec, values, indices = ctx.saved_tensors
        x_dtype, W_enc_dtype, b_enc_dtype, b_dec_dtype, W_dec_dtype = ctx.dtypes
        N, J, D = values.shape[0], W_dec.shape[0], W_dec.shape[2]
        split = ctx.split

        def per_member(grad):  # may arrive expanded (an SAE's groups sum to one output): the kernels read strides
            return torch.zeros(N, J, D, device=values.device) if grad is None else grad.float()

        aux_grad = per_member(grad_y_aux) if split < values.shape[-1] else None
        dW_enc, db_enc, dW_dec, dpre = _kernel(ctx.backend)(
            x.contiguous(), b_dec.contiguous(), W_dec.contiguous(), values, indices, split, per_member(grad_y),
            aux_grad)
        grad_x = grad_b_dec = None
        need = ctx.needs_input_grad
        if need[0]:
            ones = torch.ones(J, dtype=torch.float32, device=W_enc.device)
            grad_x = decode_kernels(ctx.backend).sparse_decode(dpre, indices, W_enc.contiguous(), ones, None, None,
                                                               x.dim() == 3).to(x_dtype)
        if need[3]:  # the folded bias b_enc − W_enc·b_dec
            grad_b_dec = folded_bias_grad_b_dec(W_enc.float(), db_enc, b_dec.shape[0]).to(b_dec_dtype)
        return (grad_x, dW_enc.to(W_enc_dtype) if need[1] else None, db_enc.to(b_enc_dtype) if need[2] else None,
                grad_b_dec, dW_dec.to(W_dec_dtype) if need[4] else None, None, None, None, None, None)


def sparse_sae_outputs(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, W_dec: torch.Tensor,
    codes: SparseCodes, aux_codes: SparseCodes | None = None, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-member decoder outputs ``y[n, j] = Σ_s z[n, j, s]·W_dec[j, idx[n, j, s]]`` ``[N, J, D]`` of ``codes``, and
    ``y_aux`` of ``aux_codes`` (None when None), where the codes are a TopK or BatchTopK encode of ``x`` computed
    without gradient: ``z = ReLU(pre)`` at the selected latents, ``pre = W_enc(x − b_dec) + b_enc``.

    Differentiable in ``x`` (``[N, D]`` or ``[N, J, D]``), ``W_enc``, ``b_enc``, ``b_dec`` (``[J, D]`` or
    ``[1, D]``) and ``W_dec`` as ``decode(ReLU(pre))`` is at the selected slots (the selection itself has no
    gradient, as in the op-by-op backward), with, for every slot of latent ``m`` and value ``z ≠ 0``::

        dpre = [z > 0]·⟨G, W_dec[j, m]⟩,  dW_dec[j, m] += z·G,  dW_enc[j, m] += dpre·(x − b_dec[j]),
        db_enc[j, m] += dpre,  db_dec[j] = −Σ_m db_enc[j, m]·W_enc[j, m],  dx += dpre·W_enc[j, m]

    (``G`` the gradient of the slot's output, ``y`` or ``y_aux``) — the backward of the op-by-op chain, computed in
    one pass over the slots (:func:`saefast.ops.ref.sparse_sae_backward`). Slots with value 0 (BatchTopK's unkept
    candidates, padding) add nothing, and their indices are never read. ``backend``: ``native`` (CPU) or ``triton``
    (:func:`fused_backward_runs`); ``torch`` runs the op-by-op reference.
    """
    backend = resolve_backend(backend, x.device)
    values, indices = codes.values.detach().float().contiguous(), codes.indices.contiguous()
    aux_values = aux_indices = None
    if aux_codes is not None:
        aux_values, aux_indices = aux_codes.values.detach().float().contiguous(), aux_codes.indices.contiguous()
    if not fused_backward_runs(backend, x.device):
        return _op_by_op(x, W_enc, b_enc, b_dec, W_dec, codes, aux_codes, backend)
    return _SparseSAE.apply(x, W_enc, b_enc, b_dec, W_dec, values, indices, aux_values, aux_indices, backend)


def _op_by_op(x, W_enc, b_enc, b_dec, W_dec, codes, aux_codes, backend):
    """The same outputs and gradients through the reference chain: the pre-activations of the selected slots
    (gathered from ``W_enc``), their ReLU, and the sparse decode of each."""
    from .decode import decode_members_sparse

    def outputs(c: SparseCodes) -> torch.Tensor:
        J = W_enc.shape[0]
        member = torch.arange(J, device=c.indices.device).view(1, J, 1)
        rows = W_enc[member.expand_as(c.indices), c.indices]  # [N, J, S, D]
        X = x.unsqueeze(1) if x.dim() == 2 else x
        pre = torch.einsum("njsd,njd->njs", rows, (X - b_dec.unsqueeze(0)).expand(-1, J, -1)) + \
            b_enc[member.expand_as(c.indices), c.indices]
        live = c.values.detach() != 0  # unkept BatchTopK candidates and padding stay 0, without gradient
        z = torch.where(live, torch.relu(pre), torch.zeros_like(pre))
        return decode_members_sparse(SparseCodes(z, c.indices, c.n_latents), W_dec, backend)

    return outputs(codes), None if aux_codes is None else outputs(aux_codes)

