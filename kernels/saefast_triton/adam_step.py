"""One fused Adam step per parameter; for decoder rows, the gradient projection → Adam → renormalisation in one pass.

Contract of :func:`adam_step_` (the oracle is :func:`saefast.ref.adam_step_`), ``torch.optim.Adam``'s update
(amsgrad, weight decay and maximize off) with ``bc1 = 1 − β1^t``, ``bc2 = 1 − β2^t`` given by the caller::

    m ← lerp(m, g, 1 − β1);   v ← β2·v + (1 − β2)·g²;   p ← p − (lr/bc1) · m / (√v/√bc2 + ε)

With ``unit_rows`` the tensors are rows ``[R, D]`` (last dimension ``D``) and each row ``w`` first has its gradient
projected, ``g ← g − (g·w / max(‖w‖, 1e-12)²)·w`` (written back to ``grad``), then takes the step, then is
renormalised, ``w ← w / max(‖w‖, 1e-12)``. In place on all four tensors.

Shapes and dtypes: ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` one shape, fp32 (master weights and moments),
contiguous (a whole parameter or a member slice of one). Square roots and divisions are IEEE-rounded
(``sqrt_rn``, ``div_rn``) like torch's, not the approximate defaults.

Grids: ``unit_rows`` — one program per row, walking ``D`` in ``BLOCK_D`` columns three times (row sums; update,
accumulating the new norm; rescale): the row is read from memory once, the second and third sweeps hit cache;
otherwise ``cdiv(n, BLOCK)`` programs of ``BLOCK`` elements. Offsets are int64.

Validation (ValueError, before any launch): shapes, dtypes, contiguity, one device (CUDA, or CPU under
``TRITON_INTERPRET=1``), positive bias corrections.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_only import launch
from .sparse_decode import block, check_device

BLOCK = 1024
"""Elements per program of the elementwise step (4 warps: 8 fp32 per thread and operand)."""
BLOCK_D_MAX = 1024
"""Columns per sweep of a row (d = 2304: three sweeps). bench/gpu_build.py (sm_80 / sm_90, fp32): 90 registers a
thread at 1024 columns and 4 warps, no spills; 2048 columns needed 168 (no spills, but few resident programs)."""
NUM_WARPS = 4


@triton.jit
def _adam_update(p, g, m, v, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
                 SMALL_WEIGHT: tl.constexpr):
    """torch's op order: lerp (its two branches on the weight), mul + addcmul, sqrt / √bc2 + ε, addcdiv."""
    if SMALL_WEIGHT:
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_w)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    return p, m, v


@triton.jit
def _adam_kernel(P, G, Mo, V, n, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
                 SMALL_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    p = tl.load(P + offs, mask=ok, other=0.0)
    g = tl.load(G + offs, mask=ok, other=0.0)
    m = tl.load(Mo + offs, mask=ok, other=0.0)
    v = tl.load(V + offs, mask=ok, other=0.0)
    p, m, v = _adam_update(p, g, m, v, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, SMALL_WEIGHT)
    tl.store(Mo + offs, m, mask=ok)
    tl.store(V + offs, v, mask=ok)
    tl.store(P + offs, p, mask=ok)


@triton.jit
def _adam_rows_kernel(P, G, Mo, V, D, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
                      SMALL_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    norm_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        w = tl.load(P + row + cols, mask=ok, other=0.0)
        g = tl.load(G + row + cols, mask=ok, other=0.0)
        norm_sq += w * w
        dot += g * w
    norm = tl.maximum(tl.sqrt_rn(tl.sum(norm_sq, axis=0)), 1e-12)
    coef = tl.div_rn(tl.sum(dot, axis=0), norm * norm)
    new_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        w = tl.load(P + row + cols, mask=ok, other=0.0)
        g = tl.load(G + row + cols, mask=ok, other=0.0) - coef * w
        m = tl.load(Mo + row + cols, mask=ok, other=0.0)
        v = tl.load(V + row + cols, mask=ok, other=0.0)
        w, m, v = _adam_update(w, g, m, v, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
                               SMALL_WEIGHT)
        new_sq += tl.where(ok, w * w, 0.0)
        tl.store(G + row + cols, g, mask=ok)
        tl.store(Mo + row + cols, m, mask=ok)
        tl.store(V + row + cols, v, mask=ok)
        tl.store(P + row + cols, w, mask=ok)
    new_norm = tl.maximum(tl.sqrt_rn(tl.sum(new_sq, axis=0)), 1e-12)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        w = tl.load(P + row + cols, mask=ok, other=0.0)
        tl.store(P + row + cols, tl.div_rn(w, new_norm), mask=ok)


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, lr: float,
               beta1: float, beta2: float, eps: float, bias_correction1: float, bias_correction2: float,
               unit_rows: bool = False) -> None:
    """In place, one Adam step of ``param`` (rows projected before and renormalised after with ``unit_rows``); see
    the module docstring. ``bias_correction1/2`` are ``1 − β1^t`` and ``1 − β2^t``."""
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in tensors.items():
        if t.shape != param.shape:
            raise ValueError(f"param, grad, exp_avg and exp_avg_sq must have one shape; got {name} "
                             f"{tuple(t.shape)} for param {tuple(param.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (fp32 master weights and moments), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a whole parameter or a member slice of one); got strides "
                             f"{t.stride()} for shape {tuple(t.shape)}")
    check_device(**tensors)
    if unit_rows and param.dim() < 1:
        raise ValueError("unit_rows needs rows [..., D]; got a 0-d tensor")
    if not (bias_correction1 > 0 and bias_correction2 > 0):
        raise ValueError(f"bias corrections 1 − β^step must be positive (step ≥ 1, 0 ≤ β < 1); got "
                         f"{bias_correction1} and {bias_correction2}")
    n = param.numel()
    if n == 0:
        return
    weight = 1.0 - beta1
    scalars = (weight, beta2, 1.0 - beta2, bias_correction2 ** 0.5, eps, -(lr / bias_correction1))
    small = abs(weight) < 0.5
    if unit_rows:
        D = param.shape[-1]
        launch(_adam_rows_kernel, (n // D,), param, grad, exp_avg, exp_avg_sq, D, *scalars, SMALL_WEIGHT=small,
               BLOCK_D=block(D, BLOCK_D_MAX), num_warps=NUM_WARPS)
    else:
        launch(_adam_kernel, (triton.cdiv(n, BLOCK),), param, grad, exp_avg, exp_avg_sq, n, *scalars,
               SMALL_WEIGHT=small, BLOCK=BLOCK, num_warps=NUM_WARPS)
