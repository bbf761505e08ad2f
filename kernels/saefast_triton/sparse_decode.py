"""Sparse decode of ``J`` members in one launch: a gather–scale–sum over the padded top-K slots.

Contract of :func:`sparse_decode` (the oracle is :func:`saefast.ref.decode_sparse` / ``decode_members_sparse``
with ``values · mask``)::

    per_member=False:  out[n, :]    = bias    + Σ_j alpha[j] Σ_k mask[n,j,k]·values[n,j,k]·W_dec[j, indices[n,j,k], :]
    per_member=True:   out[n, j, :] = bias[j] +     alpha[j] Σ_k mask[n,j,k]·values[n,j,k]·W_dec[j, indices[n,j,k], :]

Shapes and dtypes:

* ``values``  ``[N, J, K]`` fp32 / bf16 / fp16, any strides;
* ``indices`` ``[N, J, K]`` int64, member-local (``0 <= i < M``), any strides; repeated indices add up;
* ``W_dec``   ``[J, M, D]`` fp32 / bf16 / fp16, **contiguous** (each slot gathers one row of ``D``);
* ``alpha``   ``[J]`` float (made a contiguous fp32 copy when it is not one: ``J`` numbers);
* ``bias``    ``[D]`` (combined) or ``[J, D]`` (per member) fp32 / bf16 / fp16, or None (read in fp32);
* ``mask``    ``[N, J, K]`` bool or None; ``False`` drops the slot (its value is ignored and its row never
  read, so a NaN in either does not leak);
* output ``[N, D]`` or ``[N, J, D]`` in ``W_dec.dtype``; products and sums in fp32, rounded once at the store.
  ``K = 0`` gives the bias alone (zeros without one).

No dense ``[N, J·M]`` code is built: the work is ``O(N·J·K·D)``. The grid is ``(token blocks, D blocks)``
(and ``J`` for ``per_member``); each program keeps a ``[BLOCK_N, BLOCK_D]`` fp32 accumulator and walks the
``J·K`` slots (``K`` for ``per_member``), gathering ``BLOCK_N`` rows of ``W_dec`` per slot (coalesced along
``D``). Offsets that scale with ``N`` are int64 (``N·J·K`` and ``N·J·D`` may pass 2^31).

Validation (ValueError, before any launch): ranks, shapes, dtypes, one device for all tensors (CUDA, or CPU
under ``TRITON_INTERPRET=1``), ``W_dec`` contiguous. The index range is checked on the host only for CPU
tensors, where it is free; on CUDA that check would cost a device sync per call, so it is not made there and
the kernel instead treats an out-of-range index as a dropped slot (it never reads or writes out of bounds).

The same launcher is the encoder's input gradient: ``dx = sparse_decode(dpre, idx, W_enc, ones)``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import compile_only
from .compile_only import launch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Block caps, chosen from ptxas -v of the sm_90 build (fp32/bf16/fp16): a [16, 64] tile at 4 warps compiles
# with no register spills (wider tiles, [32, 64] or [16, 128], spill), and a 64-column bf16 row segment is
# one 128-byte line per gathered row.
BLOCK_N_MAX = 16
BLOCK_D_MAX = 64
NUM_WARPS = 4
# Under the interpreter a program instance costs ~1 ms of Python while a numpy tile is nearly free, so every
# cap is raised to this (test shapes then run in one or two programs).
INTERPRET_CAP = 128


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read at launch)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block(n: int, cap: int) -> int:
    """Power-of-two block covering ``n``, at most ``cap`` (``INTERPRET_CAP`` under the interpreter)."""
    if interpreting():
        cap = max(cap, INTERPRET_CAP)
    return min(cap, triton.next_power_of_2(max(n, 1)))


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of the launchers: every element is written by the kernel, so no fill pass.

    Tests replace this with a NaN-filled allocation to catch an element the kernel forgot to write."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device that Triton can run on (CUDA, or CPU with ``TRITON_INTERPRET=1``; ``meta``
    inside :func:`saefast.kernels.compile_only.compile_for`, which compiles instead of launching)."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) != 1:
        listed = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")
    device = devices.pop()
    if device.type == "meta" and compile_only.active():
        return device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {device}")
    return device


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    """``t`` has one of the kernel float dtypes (fp32 / bf16 / fp16 by default)."""
    if t.dtype not in dtypes:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {allowed}; got {t.dtype}")


def check_slots(
    values: torch.Tensor | None, indices: torch.Tensor, mask: torch.Tensor | None, J: int, M: int
) -> tuple[int, int, int]:
    """Validate the ``[N, J, K]`` slot tensors against ``J`` members of ``M`` latents; returns ``(N, J, K)``.

    ``values`` may be None (the gradient w.r.t. values does not read it). The index range is checked only
    for CPU tensors (see the module docstring)."""
    if indices.dim() != 3:
        raise ValueError(f"indices must be [N, J, K]; got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64; got {indices.dtype}")
    if indices.shape[1] != J:
        raise ValueError(f"indices have {indices.shape[1]} members but the weights have {J}")
    if values is not None:
        if values.shape != indices.shape:
            raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
        check_float("values", values)
    if mask is not None:
        if mask.shape != indices.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and indices {tuple(indices.shape)} differ in shape")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool; got {mask.dtype}")
    if indices.device.type == "cpu" and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= M:
            raise ValueError(f"indices must lie in [0, {M}); got values in [{lo}, {hi}]")
    N, J, K = indices.shape
    return N, J, K


def check_weight(W_dec: torch.Tensor) -> tuple[int, int, int]:
    """``W_dec`` must be a contiguous float ``[J, M, D]`` (each slot gathers one contiguous row); its shape."""
    if W_dec.dim() != 3:
        raise ValueError(f"W_dec must be [J, M, D]; got shape {tuple(W_dec.shape)}")
    check_float("W_dec", W_dec)
    if not W_dec.is_contiguous():
        raise ValueError("W_dec must be contiguous (each slot gathers one contiguous row)")
    J, M, D = W_dec.shape
    return J, M, D


def check_alpha(alpha: torch.Tensor, J: int) -> torch.Tensor:
    """``alpha`` as a contiguous fp32 ``[J]`` tensor (a copy only when it is not one already)."""
    if not isinstance(alpha, torch.Tensor) or alpha.shape != (J,):
        shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a [J] = [{J}] tensor; got {shape}")
    if not alpha.is_floating_point():
        raise ValueError(f"alpha must be a float tensor; got {alpha.dtype}")
    return alpha.to(torch.float32).contiguous()


def mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Kernel argument for ``mask``: a zero-copy uint8 view (bool pointers are awkward in Triton), or a dummy."""
    if mask is None:
        return like, (0, 0, 0)
    return mask.view(torch.uint8), mask.stride()


@triton.jit
def load_slot(values, indices, mask, n64, n_ok, j, k, M,
              s_vn, s_vj, s_vk, s_in, s_ij, s_ik, s_mn, s_mj, s_mk, HAS_MASK: tl.constexpr):
    """Slot ``(n, j, k)`` of a ``[BLOCK_N]`` token block: ``(value as fp32, index, kept)``; a slot is kept when its
    token is in range, its index lies in ``[0, M)`` and (with ``HAS_MASK``) its mask is set."""
    v = tl.load(values + n64 * s_vn + j * s_vj + k * s_vk, mask=n_ok, other=0.0).to(tl.float32)
    idx = tl.load(indices + n64 * s_in + j * s_ij + k * s_ik, mask=n_ok, other=0)
    ok = n_ok & (idx >= 0) & (idx < M)
    if HAS_MASK:
        ok = ok & (tl.load(mask + n64 * s_mn + j * s_mj + k * s_mk, mask=n_ok, other=0) != 0)
    return v, idx, ok


@triton.jit
def _sparse_decode_kernel(
    values, indices, mask, W, alpha, bias, out,
    N, J, K, M, D,
    s_vn, s_vj, s_vk,
    s_in, s_ij, s_ik,
    s_mn, s_mj, s_mk,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PER_MEMBER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    d_ok = d < D
    # int64 token offsets: N·J·K and N·J·D can pass 2^31.
    n64 = n.to(tl.int64)
    if PER_MEMBER:
        j_lo = tl.program_id(2)
        j_hi = j_lo + 1
    else:
        j_lo = 0
        j_hi = J
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(j_lo, j_hi):
        a = tl.load(alpha + j)
        for k in range(K):
            v, idx, ok = load_slot(values, indices, mask, n64, n_ok, j, k, M, s_vn, s_vj, s_vk, s_in, s_ij, s_ik,
                                   s_mn, s_mj, s_mk, HAS_MASK)
            # A dropped slot contributes exactly 0, even when its value is NaN/inf. alpha scales the [BLOCK_N]
            # coefficients rather than a second [BLOCK_N, BLOCK_D] per-member accumulator (registers).
            v = tl.where(ok, a * v, 0.0)
            rows = W + (j * M + idx)[:, None] * D + d[None, :]
            w = tl.load(rows, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += v[:, None] * w
    if HAS_BIAS:
        if PER_MEMBER:
            acc += tl.load(bias + j_lo * D + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        else:
            acc += tl.load(bias + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if PER_MEMBER:
        dst = out + (n64 * J + j_lo)[:, None] * D + d[None, :]
    else:
        dst = out + n64[:, None] * D + d[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    alpha: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    per_member: bool = False,
) -> torch.Tensor:
    """``Σ_j alpha[j] Σ_k mask·values·W_dec[j, indices]`` (+ bias): ``[N, D]``, or ``[N, J, D]`` with ``per_member``.

    See the module docstring for the exact contract. Output dtype ``W_dec.dtype``, fp32 accumulation."""
    J, M, D = check_weight(W_dec)
    device = check_device(values=values, indices=indices, W_dec=W_dec, alpha=alpha, bias=bias, mask=mask)
    N, _, K = check_slots(values, indices, mask, J, M)
    alpha = check_alpha(alpha, J)
    if bias is not None:
        expected = (J, D) if per_member else (D,)
        if tuple(bias.shape) != expected:
            raise ValueError(f"bias must be {list(expected)} (per_member={per_member}); got {tuple(bias.shape)}")
        check_float("bias", bias)
        bias = bias.contiguous()

    out = empty((N, J, D) if per_member else (N, D), W_dec.dtype, device)
    if out.numel() == 0:
        return out
    mask_t, mask_strides = mask_arg(mask, indices)
    BLOCK_N, BLOCK_D = block(N, BLOCK_N_MAX), block(D, BLOCK_D_MAX)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D), J if per_member else 1)
    launch(_sparse_decode_kernel, grid, 
        values, indices, mask_t, W_dec, alpha, bias if bias is not None else alpha, out,
        N, J, K, M, D,
        *values.stride(), *indices.stride(), *mask_strides,
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, PER_MEMBER=per_member,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )
    return out
