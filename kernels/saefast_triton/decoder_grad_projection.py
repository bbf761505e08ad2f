"""The decoder-norm gradient projection in one pass over the decoder and its gradient.

Contract of :func:`remove_parallel_grad_` (the oracle is :func:`saefast.ref.remove_parallel_grad_`)::

    for every row r:   grad[r, :] ← grad[r, :] − (grad[r, :]·W[r, :] / max(‖W[r, :]‖, 1e-12)²) · W[r, :]

i.e. ``g − (g·ŵ)ŵ`` with ``ŵ = w / max(‖w‖, 1e-12)``: the component of each row's gradient along its decoder row
is removed, so an optimizer step cannot change a unit row's norm to first order (a zero row leaves its gradient
as it is). In place on ``grad``; ``W`` is only read.

Shapes and dtypes:

* ``W``    ``[..., D]`` fp32 / bf16 / fp16 (``[J, M, D]`` for an ensemble, ``[M, D]`` for an SAE, or a member
  slice of either), any strides (rows are read through a ``[R, D]`` view, a copy when there is none);
* ``grad`` the same shape, fp32 / bf16 / fp16, laid out as rows of unit stride with one row stride (a contiguous
  tensor or a member slice of one: it is updated through a ``[R, D]`` view, so it must have one);
* the dot product and the norm are accumulated in fp32 and the update is computed in fp32, rounded once at the
  store.

Eager PyTorch makes three ``[R, D]`` temporaries (``ŵ``, ``g·ŵ`` and ``(g·ŵ)ŵ``) and about nine passes over
``R·D`` elements; this kernel reads ``W`` and ``grad`` once for the two row sums and once more (from cache:
the row was just read) for the update, writes ``grad`` once, and allocates nothing. The grid is
``cdiv(R, BLOCK_R)`` programs of ``BLOCK_R`` rows, walking ``D`` in ``BLOCK_D`` columns; row offsets are int64.

Validation (ValueError, before any launch): shapes, dtypes, one device (CUDA, or CPU under
``TRITON_INTERPRET=1``), ``grad`` viewable as ``[R, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_only import launch
from .sparse_decode import FLOAT_DTYPES, block, check_device

# A [BLOCK_R, BLOCK_D] tile of at most 4096 elements per operand at 4 warps: 32 fp32 registers a thread for each
# of W and grad, and a row of up to 4096 columns in one tile (d = 2304 or 4096 rows: one program per row), at most
# BLOCK_R_MAX rows. bench/gpu_build.py (sm_80 / sm_90, fp32 / bf16 / fp16) finds no spills for [1, 4096], [4, 1024]
# and [8, 512], but a 40–48 B stack frame of spills for [32, 128] (narrow rows, d < 128): hence the row cap.
BLOCK_D_MAX = 4096
TILE_ELEMENTS = 4096
BLOCK_R_MAX = 8
NUM_WARPS = 4


@triton.jit
def _remove_parallel_grad_kernel(W, G, R, D, stride_w, stride_g, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    w_rows = W + rows.to(tl.int64)[:, None] * stride_w
    g_rows = G + rows.to(tl.int64)[:, None] * stride_g
    norm_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        w = tl.load(w_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        norm_sq += tl.sum(w * w, axis=1)
        dot += tl.sum(g * w, axis=1)
    norm = tl.maximum(tl.sqrt(norm_sq), 1e-12)
    coef = dot / (norm * norm)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        w = tl.load(w_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(g_rows + cols[None, :], (g - coef[:, None] * w).to(G.dtype.element_ty), mask=ok)


def remove_parallel_grad_(W: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """In place ``grad[r] ← grad[r] − (grad[r]·ŵ_r) ŵ_r``, ``ŵ_r = W[r] / max(‖W[r]‖, 1e-12)``, for every row
    (see the module docstring); returns ``grad``."""
    if W.dim() < 1 or W.shape != grad.shape:
        raise ValueError(f"W and grad must have one shape [..., D]; got {tuple(W.shape)} and {tuple(grad.shape)}")
    for name, t in (("W", W), ("grad", grad)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    check_device(W=W, grad=grad)
    D = W.shape[-1]
    R = W.numel() // D if D else 0
    if R == 0 or D == 0:
        return grad
    try:
        rows_g = grad.view(R, D)
    except RuntimeError as err:
        raise ValueError(f"grad must be viewable as [rows, D] to be updated in place (contiguous rows); got strides "
                         f"{grad.stride()} for shape {tuple(grad.shape)}") from err
    if rows_g.stride(1) != 1:
        raise ValueError(f"grad's last dimension must have unit stride; got strides {grad.stride()}")
    rows_w = W.reshape(R, D)
    if rows_w.stride(1) != 1:
        rows_w = rows_w.contiguous()
    block_d = block(D, BLOCK_D_MAX)
    block_r = block(R, max(1, min(BLOCK_R_MAX, TILE_ELEMENTS // block_d)))
    grid = (triton.cdiv(R, block_r),)
    launch(_remove_parallel_grad_kernel, grid, rows_w, rows_g, R, D, rows_w.stride(0), rows_g.stride(0),
                                       BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return grad
