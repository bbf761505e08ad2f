"""Backward of :func:`saefast.kernels.sparse_decode.sparse_decode`: gradients w.r.t. the values and the weight.

With ``g[n] = grad_out[n]`` (combined output, ``grad_out [N, D]``) or ``g[n, j] = grad_out[n, j]``
(per-member output, ``grad_out [N, J, D]``), and ``mask`` 1 where a slot is kept (all ones when None):

* :func:`sparse_decode_grad_values` — ``dv[n, j, k] = alpha[j]·mask[n,j,k]·⟨g, W_dec[j, indices[n,j,k], :]⟩``,
  ``[N, J, K]`` fp32. Grid ``(token blocks, K blocks, J)``; each program gathers a ``[BLOCK_N, BLOCK_K, BLOCK_D]``
  tile of rows per step along ``D`` and reduces it against the matching ``g`` tile.
* :func:`sparse_decode_grad_weight` — ``dW[j, m, :] = alpha[j]·Σ_{(n,k): indices[n,j,k]=m} mask·values[n,j,k]·g``,
  ``[J, M, D]`` fp32, rows of never-selected latents 0. The transposed sparse–dense product, with no dense
  ``[N, J·M]`` intermediate:

  - default: grid ``(token blocks, D blocks)``, each program scatters ``alpha·values·g`` rows into a zeroed
    fp32 buffer with ``tl.atomic_add`` (the order of the additions, hence the last bits, varies from run to run);
  - ``deterministic=True``: the ``(j, index)`` keys of the kept slots are sorted once by a stable torch argsort
    into CSR segments (one per latent; dropped and out-of-range slots get a key past the last segment). Grid
    ``(latent blocks, D blocks)``; each program owns whole segments and reduces each in a fixed order (fixed
    chunks, fixed tree sum), with no atomics — bit-identical across runs on the same device and shapes. Extra
    memory: ``N·J·K`` int64 keys and permutation, ``J·M + 1`` offsets.

Dtypes: ``grad_out`` and ``values`` fp32 / bf16 / fp16 (read, then computed in fp32), ``indices`` int64,
``mask`` bool, ``alpha`` ``[J]`` float; the "weight" ``W_dec`` of :func:`sparse_decode_grad_values` is
``[J, M, D]`` fp32 / bf16 / fp16 and contiguous. Other tensors may have any strides (an expanded ``grad_out``
is read in place). Offsets that scale with ``N`` or ``J·M·D`` are int64.
Validation and the index-range policy are those of :mod:`saefast.kernels.sparse_decode`: ValueError before
any launch; indices range-checked on the host for CPU tensors only; on CUDA an out-of-range index is a dropped
slot (never read or written out of bounds).

The same kernels serve the encoder's backward: ``dW_enc = sparse_decode_grad_weight(x, dpre, idx, M, ones)``
with ``x [N, D]`` (one input for all members) or ``[N, J, D]``, so nothing here assumes a decoder.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from .compile_only import launch
from .sparse_decode import (
    INTERPRET_CAP,
    NUM_WARPS,
    block,
    check_alpha,
    check_device,
    check_float,
    check_slots,
    check_weight,
    empty,
    interpreting,
    load_slot,
    mask_arg,
)

# Block caps, chosen like those of sparse_decode (no register spills in the sm_90 build, 4 warps).
# grad_values holds a [BLOCK_N, BLOCK_K, BLOCK_D] = [8, 16, 32] gathered tile; K beyond 16 runs as more
# programs, D is walked inside the program.
GV_BLOCK_N = 8
GV_BLOCK_K = 16
GV_BLOCK_D = 32
# Atomic grad_weight: a [16, 64] tile of g scattered per slot.
GW_BLOCK_N = 16
GW_BLOCK_D = 64
# Deterministic grad_weight: a program owns SEG_ROWS consecutive latents (segments) of one D block and
# reduces each segment SEG_CHUNK entries at a time (a [SEG_CHUNK, SEG_BLOCK_D] tile summed over entries).
SEG_ROWS = 16
SEG_CHUNK = 16
SEG_BLOCK_D = 64


def _check_grad_out(grad_out: torch.Tensor, N: int, J: int) -> tuple[int, bool]:
    """``grad_out`` is ``[N, D]`` (combined) or ``[N, J, D]`` (per member); returns ``(D, per_member)``."""
    if grad_out.dim() == 2 and grad_out.shape[0] == N:
        per_member = False
    elif grad_out.dim() == 3 and grad_out.shape[:2] == (N, J):
        per_member = True
    else:
        raise ValueError(f"grad_out must be [N, D] = [{N}, D] or [N, J, D] = [{N}, {J}, D]; "
                         f"got {tuple(grad_out.shape)}")
    check_float("grad_out", grad_out)
    return grad_out.shape[-1], per_member


def _grad_strides(grad_out: torch.Tensor, per_member: bool) -> tuple[int, int, int]:
    """``(stride_n, stride_j, stride_d)`` of ``grad_out`` (``stride_j = 0`` for the combined ``[N, D]``)."""
    if per_member:
        return grad_out.stride()
    return grad_out.stride(0), 0, grad_out.stride(1)


@triton.jit
def _grad_values_kernel(
    grad, indices, mask, W, alpha, out,
    N, J, K, M, D,
    s_gn, s_gj, s_gd,
    s_in, s_ij, s_ik,
    s_mn, s_mj, s_mk,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j = tl.program_id(2)
    n64 = n.to(tl.int64)
    slot_ok = (n < N)[:, None] & (k < K)[None, :]
    idx = tl.load(indices + n64[:, None] * s_in + j * s_ij + k[None, :] * s_ik, mask=slot_ok, other=0)
    ok = slot_ok & (idx >= 0) & (idx < M)
    if HAS_MASK:
        ok = ok & (tl.load(mask + n64[:, None] * s_mn + j * s_mj + k[None, :] * s_mk, mask=slot_ok, other=0) != 0)
    rows = W + (j * M + idx)[:, :, None] * D  # [BLOCK_N, BLOCK_K, 1] row starts
    g_rows = grad + n64[:, None] * s_gn + j * s_gj  # stride_j is 0 for a combined grad_out
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        g = tl.load(g_rows + d[None, :] * s_gd, mask=(n < N)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(rows + d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[:, None, :], axis=2)
    dv = tl.where(ok, acc * tl.load(alpha + j), 0.0)
    tl.store(out + (n64[:, None] * J + j) * K + k[None, :], dv, mask=slot_ok)


def sparse_decode_grad_values(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    alpha: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dv[n, j, k] = alpha[j]·mask·⟨g, W_dec[j, indices[n, j, k]]⟩``, ``[N, J, K]`` fp32 (module docstring)."""
    J, M, D = check_weight(W_dec)
    device = check_device(grad_out=grad_out, indices=indices, W_dec=W_dec, alpha=alpha, mask=mask)
    N, _, K = check_slots(None, indices, mask, J, M)
    D_g, per_member = _check_grad_out(grad_out, N, J)
    if D_g != D:
        raise ValueError(f"grad_out has width {D_g} but W_dec rows have {D}")
    alpha = check_alpha(alpha, J)

    out = empty((N, J, K), torch.float32, device)
    if out.numel() == 0:
        return out
    mask_t, mask_strides = mask_arg(mask, indices)
    BLOCK_N, BLOCK_K, BLOCK_D = block(N, GV_BLOCK_N), block(K, GV_BLOCK_K), block(D, GV_BLOCK_D)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K), J)
    launch(_grad_values_kernel, grid, 
        grad_out, indices, mask_t, W_dec, alpha, out,
        N, J, K, M, D,
        *_grad_strides(grad_out, per_member), *indices.stride(), *mask_strides,
        HAS_MASK=mask is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    return out


@triton.jit
def _grad_weight_atomic_kernel(
    grad, values, indices, mask, alpha, out,
    N, J, K, M, D,
    s_gn, s_gj, s_gd,
    s_vn, s_vj, s_vk,
    s_in, s_ij, s_ik,
    s_mn, s_mj, s_mk,
    HAS_MASK: tl.constexpr, PER_MEMBER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    d_ok = d < D
    n64 = n.to(tl.int64)
    g_tile = grad + n64[:, None] * s_gn + d[None, :] * s_gd
    g_ok = n_ok[:, None] & d_ok[None, :]
    if not PER_MEMBER:  # one g row serves every member: load it once
        g = tl.load(g_tile, mask=g_ok, other=0.0).to(tl.float32)
    for j in range(J):
        if PER_MEMBER:
            g = tl.load(g_tile + j * s_gj, mask=g_ok, other=0.0).to(tl.float32)
        a = tl.load(alpha + j)
        for k in range(K):
            v, idx, ok = load_slot(values, indices, mask, n64, n_ok, j, k, M, s_vn, s_vj, s_vk, s_in, s_ij, s_ik,
                                   s_mn, s_mj, s_mk, HAS_MASK)
            # Duplicate indices (within the tile or across programs) are separate atomic adds: they sum.
            tl.atomic_add(
                out + (j * M + idx)[:, None] * D + d[None, :],
                (a * v)[:, None] * g,
                mask=ok[:, None] & d_ok[None, :],
                sem="relaxed",
            )


@triton.jit
def _grad_weight_segment_kernel(
    grad, values, perm, offsets, alpha, out,
    J, K, M, D,
    s_gn, s_gj, s_gd,
    s_vn, s_vj, s_vk,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    r_lo = tl.program_id(0) * ROWS
    r_hi = tl.minimum(r_lo + ROWS, J * M)
    JK = J * K
    # int64 base of this program's rows (J·M·D may pass 2^31); within the block (r − r_lo)·D is small.
    out_rows = out + r_lo.to(tl.int64) * D
    for r in range(r_lo, r_hi):
        j = r // M
        start = tl.load(offsets + r)
        end = tl.load(offsets + r + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # A fixed walk over the segment (stable sort order, fixed chunking, fixed tree sum): no atomics,
        # so the result is bit-identical from run to run.
        for e0 in range(start, end, CHUNK):
            e = e0 + tl.arange(0, CHUNK)
            e_ok = e < end
            slot = tl.load(perm + e, mask=e_ok, other=0)  # flat int64 slot n·J·K + j·K + k
            n = slot // JK
            k = slot % K
            v = tl.load(values + n * s_vn + j * s_vj + k * s_vk, mask=e_ok, other=0.0).to(tl.float32)
            g = tl.load(
                grad + n[:, None] * s_gn + j * s_gj + d[None, :] * s_gd,
                mask=e_ok[:, None] & d_ok[None, :], other=0.0,
            ).to(tl.float32)
            acc += tl.sum(tl.where(e_ok, v, 0.0)[:, None] * g, axis=0)
        # Every row is written (0 for an empty segment), so the output needs no zero fill.
        tl.store(out_rows + (r - r_lo) * D + d, acc * tl.load(alpha + j), mask=d_ok)


def sparse_decode_grad_weight(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    n_latents: int,
    alpha: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """``dW[j, m] = alpha[j]·Σ_{indices[n,j,k]=m} mask·values[n,j,k]·g``, ``[J, M, D]`` fp32 (module docstring)."""
    try:
        M = operator.index(n_latents)
    except TypeError:
        M = -1
    if isinstance(n_latents, bool) or M < 0:
        raise ValueError(f"n_latents must be a non-negative int; got {n_latents!r}")
    if indices.dim() != 3:
        raise ValueError(f"indices must be [N, J, K]; got shape {tuple(indices.shape)}")
    J = indices.shape[1]
    device = check_device(grad_out=grad_out, values=values, indices=indices, alpha=alpha, mask=mask)
    N, _, K = check_slots(values, indices, mask, J, M)
    D, per_member = _check_grad_out(grad_out, N, J)
    alpha = check_alpha(alpha, J)
    g_strides = _grad_strides(grad_out, per_member)

    if not deterministic:
        out = torch.zeros((J, M, D), dtype=torch.float32, device=device)  # atomics accumulate into zeros
        if N == 0 or J * K * M * D == 0:
            return out
        mask_t, mask_strides = mask_arg(mask, indices)
        BLOCK_N, BLOCK_D = block(N, GW_BLOCK_N), block(D, GW_BLOCK_D)
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
        launch(_grad_weight_atomic_kernel, grid, 
            grad_out, values, indices, mask_t, alpha, out,
            N, J, K, M, D,
            *g_strides, *values.stride(), *indices.stride(), *mask_strides,
            HAS_MASK=mask is not None, PER_MEMBER=per_member,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        )
        return out

    out = empty((J, M, D), torch.float32, device)
    if out.numel() == 0:
        return out
    # CSR by latent: key j·M + index per slot, flattened in (n, j, k) order; dropped and out-of-range slots get
    # the key J·M, which sorts after every segment and is never read.
    member = torch.arange(J, device=device).view(1, J, 1)
    keep = (indices >= 0) & (indices < M)
    if mask is not None:
        keep &= mask
    keys = torch.where(keep, indices + member * M, J * M).reshape(-1)
    sorted_keys, perm = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(J * M + 1, device=device))
    BLOCK_D = block(D, SEG_BLOCK_D)
    rows, chunk = (INTERPRET_CAP, INTERPRET_CAP) if interpreting() else (SEG_ROWS, SEG_CHUNK)
    grid = (triton.cdiv(J * M, rows), triton.cdiv(D, BLOCK_D))
    launch(_grad_weight_segment_kernel, grid, 
        grad_out, values, perm, offsets, alpha, out,
        J, K, M, D,
        *g_strides, *values.stride(),
        ROWS=rows, CHUNK=chunk, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    return out
