"""The fused sparse backward of a TopK / BatchTopK training step: one pass over the slots, bucketed by latent.

Contract of :func:`sparse_sae_backward` (the oracle is :func:`saefast.ops.ref.sparse_sae_backward`)::

    G[n, j]   = grad_out[n, j]       for slots s <  split (the codes)
              = aux_grad_out[n, j]   for slots s >= split (AuxK's)
    X[n, j]   = x[n] (x [N, D], shared by the members) or x[n, j] (x [N, J, D])
    per slot (n, j, s) of latent m = indices[n, j, s] and value v = values[n, j, s]:
        dv = ⟨G[n, j], W_dec[j, m]⟩,   dpre[n, j, s] = dv·[v > 0]
        dW_dec[j, m] += v·G[n, j],   dW_enc[j, m] += dpre·(X[n, j] − b_dec[j]),   db_enc[j, m] += dpre

Returns ``(dW_enc [J, M, D], db_enc [J, M], dW_dec [J, M, D], dpre [N, J, S])``, all fp32; rows of latents no
slot selects are 0. A slot whose value is 0 adds nothing and gets ``dpre = 0`` (it is dropped from the buckets,
so its ``W_dec`` row and gradients are never read: a NaN there does not leak).

Shapes and dtypes:

* ``values``  ``[N, J, S]`` fp32 / bf16 / fp16, ``indices`` ``[N, J, S]`` int64 (member-local, ``0 <= i < M``);
  any strides;
* ``split``   an int in ``[0, S]``; ``aux_grad_out`` is required when ``split < S`` and may be None when
  ``split == S`` (given then, it is shape-checked and unused);
* ``grad_out``, ``aux_grad_out`` ``[N, J, D]`` fp32 / bf16 / fp16, any strides (an expanded gradient is read
  in place);
* ``x``       ``[N, D]`` or ``[N, J, D]``, ``b_dec`` ``[J, D]`` or ``[1, D]``: fp32 / bf16 / fp16, any strides;
* ``W_dec``   ``[J, M, D]`` fp32 / bf16 / fp16, **contiguous**;
* everything is read in fp32 and computed in fp32.

Design. The ``j·M + index`` keys of the live slots (value ≠ 0, index in range) are sorted once by a stable torch
argsort into CSR segments, one per latent row ``r = j·M + m`` (dead slots get the key ``J·M``, past the last
segment, and are never read). Grid ``(row blocks,)``: each program owns ``ROWS`` consecutive latent rows and the
full ``D`` of each, and for each row

1. walks the segment ``CHUNK`` slots at a time, reducing ``dv`` over ``D`` in ``BLOCK_D`` steps against the one
   ``W_dec`` row the whole segment shares, and stores ``dpre`` at the slot and ``db_enc`` (a fixed-order sum);
2. after a block barrier (so every thread sees the ``dpre`` just stored), walks ``D`` in ``BLOCK_D`` steps and,
   for each, the segment again: ``v·G`` and ``dpre·X`` into two ``[CHUNK, BLOCK_D]`` accumulators (elementwise,
   no cross-thread traffic per chunk), summed over the chunk rows once and stored as the ``dW_dec`` row and the
   ``dW_enc`` row ``Σ dpre·X − db_enc·b_dec`` (one axpy per row instead of one per slot).

No atomics, a fixed walk (stable sort order, fixed chunks, fixed tree sums): the results are bit-identical from
run to run on the same device and shapes. Every ``dW_enc``/``db_enc``/``dW_dec`` row is written (0 for an empty
segment), so those need no fill; ``dpre`` is a zero fill (dead slots) written at every live slot. Extra memory:
``N·J·S`` int64 keys and permutation, the token and slot of each sorted entry as int32 (``N``, ``S`` < 2^31; the
kernel then needs no 64-bit division), ``J·M + 1`` offsets. Reads: ``G`` twice and ``X`` once per live slot, each a
contiguous ``D`` row (coalesced); ``W_dec`` once per row. Offsets that scale with ``N`` or ``J·M·D`` are int64.

Validation (ValueError, before any launch) and the index-range policy are those of
:mod:`saefast.kernels.sparse_decode`: shapes, dtypes, one device; the index range is checked on the host for CPU
tensors only, and on CUDA an out-of-range index is a dead slot (``dpre = 0``; never read or written out of bounds).
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from . import sparse_decode
from .compile_only import launch
from .sparse_decode import (
    INTERPRET_CAP,
    NUM_WARPS,
    block,
    check_device,
    check_float,
    check_slots,
    check_weight,
    interpreting,
)

# Block caps (4 warps): a program owns ROWS latent rows, walks a segment CHUNK slots at a time and D BLOCK_D
# columns at a time ([CHUNK, BLOCK_D] tiles of G and X).
ROWS = 8
CHUNK = 16
BLOCK_D_MAX = 128


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation for buffers the kernel writes in full: :func:`saefast.kernels.sparse_decode.empty` (looked
    up at call time, so a test that poisons either function poisons these outputs)."""
    return sparse_decode.empty(shape, dtype, device)


@triton.jit
def _g_rows(grad, aux, n, j, s, split, s_gn, s_gj, s_an, s_aj, HAS_AUX: tl.constexpr):
    """Start of the ``G`` row of each slot of a chunk, ``[CHUNK]`` pointers: ``grad_out[n, j]`` for ``s < split``,
    else ``aux_grad_out[n, j]`` (the two share their stride along ``D``)."""
    rows = grad + (n * s_gn + j * s_gj)
    if HAS_AUX:
        rows = tl.where(s < split, rows, aux + (n * s_an + j * s_aj))
    return rows


@triton.jit
def _sparse_sae_backward_kernel(
    x, b_dec, W, values, slot_n, slot_s, offsets, grad, aux,
    dW_enc, db_enc, dW_dec, dpre,
    J, S, M, D, split,
    s_xn, s_xj, s_xd,
    s_bj, s_bd,
    s_vn, s_vj, s_vs,
    s_gn, s_gj, s_an, s_aj, s_gd,
    HAS_AUX: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r_lo = tl.program_id(0) * ROWS
    r_hi = tl.minimum(r_lo + ROWS, J * M)
    JS = J * S
    for r in range(r_lo, r_hi):
        j = r // M
        r64 = r_lo.to(tl.int64) + (r - r_lo)  # J·M·D may pass 2^31
        w_row = W + r64 * D
        start = tl.load(offsets + r)
        end = tl.load(offsets + r + 1)

        # 1. dv of every slot of the segment (full-D dot with the segment's one W_dec row), dpre, db_enc.
        db = 0.0  # a scalar fp32 sum of the chunks' tree sums, in segment order
        for e0 in range(start, end, CHUNK):
            e = e0 + tl.arange(0, CHUNK)
            e_ok = e < end
            n = tl.load(slot_n + e, mask=e_ok, other=0).to(tl.int64)  # token and slot of each entry
            s = tl.load(slot_s + e, mask=e_ok, other=0)
            slot = n * JS + j * S + s  # offset in dpre, a contiguous [N, J, S]
            v = tl.load(values + n * s_vn + j * s_vj + s * s_vs, mask=e_ok, other=0.0).to(tl.float32)
            g_rows = _g_rows(grad, aux, n, j, s, split, s_gn, s_gj, s_an, s_aj, HAS_AUX)
            dv = tl.zeros([CHUNK], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                w = tl.load(w_row + d, mask=d_ok, other=0.0).to(tl.float32)
                g = tl.load(g_rows[:, None] + d[None, :] * s_gd, mask=e_ok[:, None] & d_ok[None, :],
                            other=0.0).to(tl.float32)
                dv += tl.sum(g * w[None, :], axis=1)
            dp = tl.where(e_ok & (v > 0), dv, 0.0)  # the ReLU of the codes
            tl.store(dpre + slot, dp, mask=e_ok)
            db += tl.sum(dp, axis=0)
        tl.store(db_enc + r, db)
        # The dpre just stored is read back below by other threads of this program: a block barrier (bar.sync)
        # orders those global stores before the loads.
        tl.debug_barrier()

        # 2. dW_dec = Σ v·G and dW_enc = Σ dpre·X − db_enc·b_dec, one BLOCK_D column block at a time; the
        # [CHUNK, BLOCK_D] accumulators are summed over the chunk rows once, at the end of the segment.
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            acc_dec = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
            acc_enc = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
            for e0 in range(start, end, CHUNK):
                e = e0 + tl.arange(0, CHUNK)
                e_ok = e < end
                n = tl.load(slot_n + e, mask=e_ok, other=0).to(tl.int64)
                s = tl.load(slot_s + e, mask=e_ok, other=0)
                slot = n * JS + j * S + s
                v = tl.load(values + n * s_vn + j * s_vj + s * s_vs, mask=e_ok, other=0.0).to(tl.float32)
                dp = tl.load(dpre + slot, mask=e_ok, other=0.0)
                ok = e_ok[:, None] & d_ok[None, :]
                g_rows = _g_rows(grad, aux, n, j, s, split, s_gn, s_gj, s_an, s_aj, HAS_AUX)
                g = tl.load(g_rows[:, None] + d[None, :] * s_gd, mask=ok, other=0.0).to(tl.float32)
                xx = tl.load(x + (n * s_xn + j * s_xj)[:, None] + d[None, :] * s_xd, mask=ok, other=0.0)
                acc_dec += v[:, None] * g
                acc_enc += dp[:, None] * xx.to(tl.float32)
            b = tl.load(b_dec + j * s_bj + d * s_bd, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(dW_dec + r64 * D + d, tl.sum(acc_dec, axis=0), mask=d_ok)
            tl.store(dW_enc + r64 * D + d, tl.sum(acc_enc, axis=0) - db * b, mask=d_ok)


def _check_split(split, S: int) -> int:
    try:
        value = operator.index(split)
    except TypeError:
        value = None
    if isinstance(split, bool) or value is None or not 0 <= value <= S:
        raise ValueError(f"split must be an int in [0, S] = [0, {S}]; got {split!r}")
    return value


def _check_rows(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must be {list(expected)}; got {tuple(t.shape)}")
    check_float(name, t)


def sparse_sae_backward(
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    split: int,
    grad_out: torch.Tensor,
    aux_grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dW_enc [J, M, D], db_enc [J, M], dW_dec [J, M, D], dpre [N, J, S])`` fp32 of the sparse SAE backward; see
    the module docstring for the exact contract (that of :func:`saefast.ops.ref.sparse_sae_backward`)."""
    J, M, D = check_weight(W_dec)
    device = check_device(x=x, b_dec=b_dec, W_dec=W_dec, values=values, indices=indices, grad_out=grad_out,
                          aux_grad_out=aux_grad_out)
    if values.dim() != 3:
        raise ValueError(f"values must be [N, J, S]; got shape {tuple(values.shape)}")
    N, _, S = check_slots(values, indices, None, J, M)
    split = _check_split(split, S)
    _check_rows("grad_out", grad_out, (N, J, D))
    if aux_grad_out is not None:
        _check_rows("aux_grad_out", aux_grad_out, (N, J, D))
    elif split < S:
        raise ValueError(f"aux_grad_out is required when split < S (slots [{split}, {S}) read it)")
    if x.dim() == 2:
        _check_rows("x", x, (N, D))
        s_x = (x.stride(0), 0, x.stride(1))
    else:
        _check_rows("x", x, (N, J, D))
        s_x = x.stride()
    if b_dec.dim() != 2 or b_dec.shape[0] not in (1, J):
        raise ValueError(f"b_dec must be [J, D] = [{J}, {D}] or [1, {D}]; got {tuple(b_dec.shape)}")
    _check_rows("b_dec", b_dec, (b_dec.shape[0], D))
    s_b = (b_dec.stride(0) if b_dec.shape[0] == J and J > 1 else 0, b_dec.stride(1))

    dW_enc = empty((J, M, D), torch.float32, device)
    db_enc = empty((J, M), torch.float32, device)
    dW_dec = empty((J, M, D), torch.float32, device)
    dpre = torch.zeros((N, J, S), dtype=torch.float32, device=device)  # dead slots stay 0
    if J * M == 0:
        return dW_enc, db_enc, dW_dec, dpre

    # CSR by latent row j·M + index over the live slots, flattened in (n, j, s) order; dead slots (value 0, or an
    # out-of-range index on CUDA) get the key J·M, which sorts after every segment and is never read.
    member = torch.arange(J, device=device).view(1, J, 1)
    live = (values != 0) & (indices >= 0) & (indices < M)
    keys = torch.where(live, indices + member * M, J * M).reshape(-1)
    sorted_keys, perm = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(J * M + 1, device=device))
    # The (n, s) of each sorted entry as int32 (64-bit division in the kernel would be a slow subroutine call).
    slot_n = torch.div(perm, max(J * S, 1), rounding_mode="floor").to(torch.int32)
    slot_s = (perm % max(S, 1)).to(torch.int32)

    if interpreting():  # a program instance costs ~1 ms of Python there: few, wide programs
        rows, chunk, block_d = INTERPRET_CAP, INTERPRET_CAP, block(D, INTERPRET_CAP)
    else:
        rows, chunk, block_d = ROWS, CHUNK, block(D, BLOCK_D_MAX)
    has_aux = aux_grad_out is not None and split < S
    aux = aux_grad_out if has_aux else grad_out
    if aux.stride(2) != grad_out.stride(2):  # the kernel reads both with one stride along D
        grad_out, aux = grad_out.contiguous(), aux.contiguous()
    grid = (triton.cdiv(J * M, rows),)
    launch(_sparse_sae_backward_kernel, grid,
        x, b_dec, W_dec, values, slot_n, slot_s, offsets, grad_out, aux,
        dW_enc, db_enc, dW_dec, dpre,
        J, S, M, D, split,
        *s_x, *s_b, *values.stride(), *grad_out.stride()[:2], *aux.stride()[:2], grad_out.stride(2),
        HAS_AUX=has_aux, ROWS=rows, CHUNK=chunk, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return dW_enc, db_enc, dW_dec, dpre
