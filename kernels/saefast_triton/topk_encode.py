"""Fused encode → top-k for ``J`` stacked encoders: the ``N × J·M`` pre-activation matrix never exists in memory.

Contract (``N`` tokens, ``D`` = d_in, ``J`` members, ``M`` latents per member)::

    topk_encode(x [N, D], W_enc [J, M, D], bias [J, M] fp32, k, *, dead=None, aux_k=0, allow_tf32=False)
        pre[n, j, m] = x[n] · W_enc[j, m] + bias[j, m]          (fp32 accumulation; never written to memory)
        values      [N, J, k]      fp32   the k largest pre[n, j, :], sorted descending (raw: no ReLU)
        indices     [N, J, k]      int64  their member-local latents, 0 <= index < M
        aux_values  [N, J, aux_k]  fp32 | None   the aux_k largest pre[n, j, m] over the m with dead[j, m],
        aux_indices [N, J, aux_k]  int64 | None  sorted descending; a slot beyond member j's number of dead
                                                 latents holds value -inf and index 0

``bias`` is already folded by the caller (``b_enc − W_enc·b_dec``, cf. :func:`saefast.ref.pre_activations`), so
``values`` equal ``ref.pre_activations(x, W_enc, b_enc, b_dec).topk(k)`` and ReLU of the aux outputs equals what
:func:`saefast.ref.auxk_reconstruction` selects (its ``masked_fill(-inf)`` + ``topk``). The aux outputs are ``None``
unless ``dead [J, M]`` bool is given and ``aux_k > 0``; they come from the same pass over the tiles.

Ties: every candidate is ranked by the key ``(pre-activation, −latent)``, so among equal pre-activations the
lower latent index ranks first (and ``-0.0`` ranks just below ``+0.0``). NaN pre-activations are not supported.
``x`` and ``W_enc`` are fp32, fp16 or bf16 (the same dtype); fp32 inputs are multiplied in exact fp32 (IEEE)
unless ``allow_tf32``.

Algorithm: grid ``(cdiv(N, BLOCK_N), J)``; a program owns ``BLOCK_N`` rows of one member and sweeps the ``M``
latents in tiles of ``BLOCK_M``. Each tile of pre-activations ``[BLOCK_N, BLOCK_M]`` is one ``tl.dot`` chain over
``D`` in ``BLOCK_D`` chunks plus the bias; each entry becomes an int64 key ``(order-preserving int32 of the fp32
value) << 32 | (2³¹−1 − latent)``, so sorting keys sorts (value, index) pairs with no index payload. The tile's
top ``KP`` keys (``KP`` = next power of two ≥ k ≤ BLOCK_M) merge into a running ``[BLOCK_N, KP]`` buffer; the aux
buffer does the same with a copy of the keys in which non-dead latents are replaced by the padding key. The sorting
network is ``tl.topk``'s bitonic one, written out here with min/max compare-and-swap layers (see
:func:`_compare_swap`), so it runs at numpy speed under ``TRITON_INTERPRET=1`` and needs no ``tl.topk``.

The same file holds :func:`threshold_encode`, the fused encode → JumpReLU (``pre > θ``) into a fixed-capacity
sparse layout, with counts and an overflow flag (see its docstring).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import compile_only
from .compile_only import launch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _keys(pre, cols):
    """int64 keys of fp32 ``pre [BN, BM]`` at latents ``cols [BM]``: ordered like (value, −latent)."""
    bits = pre.to(tl.int32, bitcast=True)
    # Negative floats order backwards as signed ints: flipping their 31 low bits makes the map monotone.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    low = (0x7FFFFFFF - cols).to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low[None, :]


@triton.jit
def _indicator(n_dims: tl.constexpr, i: tl.constexpr):
    """0/1 along the ``i``-th innermost axis of a ``[2] * n_dims`` hypercube: is the element the right of its pair?"""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - i - 1) + [2] + [1] * i)


@triton.jit
def _compare_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """One compare-and-swap layer between the pairs along the ``i``-th innermost axis of the hypercube ``h``."""
    # min/max over the size-2 axis rather than tl.sort's xor_sum: the same network, but these two reductions are
    # vectorised by the interpreter, where xor_sum runs element by element in Python (~1000× slower).
    lo = tl.min(h, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(h, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)) != 0, hi, lo)


@triton.jit
def _bitonic_stages(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """Sort every bitonic run of ``2**stage`` along the innermost axes: ascending (order 0), descending (1) or
    alternating between neighbouring runs (2)."""
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for s in tl.static_range(stage):
        h = _compare_swap(h, flip, stage - 1 - s, n_dims)
    return h


@triton.jit
def _topk_rows(x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """The ``2**LOG_K`` largest of each row of ``x [2**LOG_ROWS, 2**LOG_N]``, sorted descending (bitonic top-k as
    in ``tl.topk``: sort runs of 2**LOG_K, then repeatedly keep the max of neighbouring opposite runs and re-merge)."""
    n_dims: tl.constexpr = LOG_ROWS + LOG_N
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_stages(h, i, 2 if i < LOG_N else 1, n_dims)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        # h has n_dims − (i − LOG_K − 1) axes here (a constexpr cannot be reassigned in an unrolled loop).
        h = tl.max(h, axis=n_dims - (i - LOG_K - 1) - 1 - LOG_K)
        h = _bitonic_stages(h, LOG_K, 2 if i < LOG_N else 1, n_dims - (i - LOG_K))
    return tl.reshape(h, [2**LOG_ROWS, 2**LOG_K])


@triton.jit
def _merge(best, tile_keys, LOG_ROWS: tl.constexpr, LOG_M: tl.constexpr, LOG_K: tl.constexpr):
    """Top ``2**LOG_K`` of ``best`` (rows ascending) ∪ ``tile_keys [rows, 2**LOG_M]``, returned rows ascending."""
    top = _topk_rows(tile_keys, LOG_ROWS, LOG_M, LOG_K)  # rows descending
    # max(ascending, descending) elementwise holds exactly the largest half of the union (the first half-cleaner
    # of a bitonic merge) and is bitonic, so LOG_K merge layers sort it: cheaper than a top-k of the concatenation.
    h = tl.reshape(tl.maximum(best, top), [2] * (LOG_ROWS + LOG_K))
    h = _bitonic_stages(h, LOG_K, 0, LOG_ROWS + LOG_K)
    return tl.reshape(h, [2**LOG_ROWS, 2**LOG_K])


@triton.jit
def _store_desc(best, out_val, out_idx, rows, row_mask, j, stride_on, stride_oj, K, KP: tl.constexpr,
                REPLACE_PAD: tl.constexpr):
    """Write the first ``K`` of the ascending buffer ``best [BN, KP]`` in descending order."""
    slot = KP - 1 - tl.arange(0, KP)  # ascending position p holds descending slot KP − 1 − p
    ordered = (best >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)  # the order map is an involution
    val = bits.to(tl.float32, bitcast=True)
    idx = (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int64)
    if REPLACE_PAD:
        # Only the aux buffer can hold padding among its first K (members with fewer dead latents than aux_k).
        pad = best == (tl.full([1, 1], -2147483648, tl.int64) << 32)
        val = tl.where(pad, float("-inf"), val)
        idx = tl.where(pad, 0, idx)
    offs = rows.to(tl.int64)[:, None] * stride_on + j * stride_oj + slot[None, :]
    mask = row_mask[:, None] & (slot[None, :] < K)
    tl.store(out_val + offs, val, mask=mask)
    tl.store(out_idx + offs, idx, mask=mask)


@triton.jit
def _pre_tile(x_ptr, w_ptr, bias_ptr, j, rows, row_mask, cols, col_mask, D,
              stride_xn, stride_xd, stride_wj, stride_wm, stride_wd, stride_bj, stride_bm,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 ``pre [BLOCK_N, BLOCK_M] = x[rows] · W_enc[j, cols]ᵀ + bias[j, cols]`` (0 at cols ≥ M, bias at rows ≥ N)."""
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_cols = w_ptr + j * stride_wj + cols.to(tl.int64)[None, :] * stride_wm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = (d0 + offs_d).to(tl.int64)  # dd · stride may pass 2³¹ for a transposed x
        d_mask = dd < D
        xt = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        # W loaded as [BLOCK_D, BLOCK_M] (transposed by addressing), zero beyond D and M.
        wt = tl.load(w_cols + dd[:, None] * stride_wd, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + j * stride_bj + cols * stride_bm, mask=col_mask, other=0.0)
    return acc + bias[None, :]


@triton.jit
def _topk_encode_kernel(
    x_ptr, w_ptr, bias_ptr, dead_ptr,
    val_ptr, idx_ptr, aux_val_ptr, aux_idx_ptr,
    N, M, D, K, AUX_K,
    stride_xn, stride_xd, stride_wj, stride_wm, stride_wd, stride_bj, stride_bm, stride_dj, stride_dm,
    stride_on, stride_oj, stride_an, stride_aj,
    LOG_KP: tl.constexpr, LOG_AKP: tl.constexpr, HAS_AUX: tl.constexpr,
    LOG_N: tl.constexpr, LOG_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # Block sizes come as powers of two (log2) because the bitonic network works on [2] * n hypercubes.
    BLOCK_N: tl.constexpr = 2**LOG_N
    BLOCK_M: tl.constexpr = 2**LOG_M
    KP: tl.constexpr = 2**LOG_KP
    AKP: tl.constexpr = 2**LOG_AKP
    pid_n = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_m = tl.arange(0, BLOCK_M)

    # The padding key (latents ≥ M; non-dead latents in the aux buffer) is INT64_MIN: its high half INT32_MIN lies
    # below the ordered image of every fp32 value including -inf (0x807FFFFF), so it loses to every real key.
    tile_pad = tl.full([BLOCK_N, BLOCK_M], -2147483648, tl.int64) << 32
    best = tl.full([BLOCK_N, KP], -2147483648, tl.int64) << 32
    if HAS_AUX:
        aux_best = tl.full([BLOCK_N, AKP], -2147483648, tl.int64) << 32

    for m0 in range(0, M, BLOCK_M):
        cols = m0 + offs_m
        col_mask = cols < M
        pre = _pre_tile(x_ptr, w_ptr, bias_ptr, j, rows, row_mask, cols, col_mask, D, stride_xn, stride_xd, stride_wj,
                        stride_wm, stride_wd, stride_bj, stride_bm, BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        # Padded latents get the padding key, which loses to every real key: never selected since k ≤ M.
        keys = tl.where(col_mask[None, :], _keys(pre, cols), tile_pad)
        best = _merge(best, keys, LOG_N, LOG_M, LOG_KP)
        if HAS_AUX:
            dead = tl.load(dead_ptr + j * stride_dj + cols * stride_dm, mask=col_mask, other=0)
            aux_keys = tl.where((dead != 0)[None, :], keys, tile_pad)
            aux_best = _merge(aux_best, aux_keys, LOG_N, LOG_M, LOG_AKP)

    _store_desc(best, val_ptr, idx_ptr, rows, row_mask, j, stride_on, stride_oj, K, KP, False)
    if HAS_AUX:
        _store_desc(aux_best, aux_val_ptr, aux_idx_ptr, rows, row_mask, j, stride_an, stride_aj, AUX_K, AKP, True)


MAX_K = 512
"""Largest ``k`` of :func:`topk_encode` for fp16 / bf16 inputs. The running top-k lives in registers as
``[BLOCK_N, KP]`` int64 keys merged through a bitonic network; ``bench/gpu_build.py`` (ptxas for sm_80 / sm_90,
8 warps) finds KP = 512 at 255 registers and 136 KB shared memory with no spills, while KP = 1024 spills and needs
267 KB of shared memory, more than any GPU gives a block: such a launch would fail. Larger ``k`` is
:func:`saefast.ops.topk_encode`'s chunked path."""

MAX_K_FP32 = 256
"""Largest ``k`` for fp32 inputs, whose FMA dots hold larger operand tiles: KP = 512 spills (72 B with 32-wide D
chunks, 16 B with 16-wide ones) and takes ptxas two minutes for sm_80."""

MAX_K_WITH_AUX = 256
"""Largest ``max(k, aux_k)`` when the AuxK top-k shares the pass (two running buffers): 256/256 builds without spills,
512/512 spills and AuxK's default ``aux_k = d/2`` (e.g. 1152, KP = 2048) needs 529 KB of shared memory and a
9 KB stack frame per thread. Larger ``aux_k`` goes through :func:`saefast.ops.topk_encode`'s dead-latent path."""


def max_k(dtype: torch.dtype, with_aux: bool) -> int:
    """Largest ``k`` (with AuxK: ``max(k, aux_k)``) one :func:`topk_encode` launch takes for inputs of ``dtype``."""
    if with_aux:
        return MAX_K_WITH_AUX
    return MAX_K if dtype in (torch.float16, torch.bfloat16) else min(MAX_K, MAX_K_FP32)


def _block_sizes(N: int, M: int, D: int, kp: int, dtype: torch.dtype, interpret: bool,
                 has_aux: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps), powers of two: ``tl.dot`` needs blocks ≥ 16, the top-k BLOCK_M ≥ KP."""
    if interpret:
        # Each program instance and loop trip costs ~ms in the interpreter, while numpy is indifferent to block
        # size: cover small problems in as few, large blocks as possible.
        block_n = min(max(triton.next_power_of_2(N), 16), 64)
        block_m = max(min(triton.next_power_of_2(M), 256), kp, 16)
        block_d = min(max(triton.next_power_of_2(D), 16), 128)
        return block_n, block_m, block_d, 4
    # GPU (not yet timed on a device; every build checked by bench/gpu_build.py for sm_80 / sm_90): the int64 key
    # tile and its bitonic network dominate registers, so keep BLOCK_N·BLOCK_M ≤ 4096 keys (BLOCK_M ≥ KP forces a
    # smaller BLOCK_N for large k; KP ≤ MAX_K) with 8 warps. fp32 dots run on FMA units, whose operand tiles cost
    # more registers than tensor-core ones: half the D chunk.
    # With AuxK a second running buffer is live: 2048 keys a tile (sm_80 spilled 8–32 B at [32, 128] with both).
    block_m = max(64, kp)
    block_n = max(16, min(64, (2048 if has_aux else 4096) // block_m))
    block_d = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(D)))
    return block_n, block_m, block_d, 8


def _check_encoder(name: str, x, W_enc, bias, k_name: str, k, **masks) -> tuple[int, int, int, int]:
    """Validate ``x [N, D]``, ``W_enc [J, M, D]``, ``bias [J, M]`` fp32, ``1 <= k <= M``, the ``[J, M]`` tensors in
    ``masks`` (name → (tensor or None, dtype)) and one device; returns ``(N, D, J, M)``."""
    if not all(isinstance(t, torch.Tensor) for t in (x, W_enc, bias)):
        raise ValueError(f"{name} needs tensors x, W_enc and bias")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D]; got shape {tuple(x.shape)}")
    if W_enc.dim() != 3:
        raise ValueError(f"W_enc must be [J, M, D]; got shape {tuple(W_enc.shape)}")
    N, D = x.shape
    J, M, D_w = W_enc.shape
    if D_w != D:
        raise ValueError(f"x is [N, D={D}] but W_enc is [J, M, D={D_w}]")
    if J < 1 or M < 1:
        raise ValueError(f"W_enc needs J >= 1 members of M >= 1 latents; got shape {tuple(W_enc.shape)}")
    if tuple(bias.shape) != (J, M):
        raise ValueError(f"bias must be [J, M] = [{J}, {M}]; got shape {tuple(bias.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if W_enc.dtype != x.dtype:
        raise ValueError(f"W_enc dtype {W_enc.dtype} differs from x dtype {x.dtype}")
    if bias.dtype != torch.float32:
        raise ValueError(f"bias must be float32 (it is added to the fp32 accumulator); got {bias.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= M:
        raise ValueError(f"{k_name} must be an int with 1 <= {k_name} <= M = {M}; got {k!r}")
    tensors = {"x": x, "W_enc": W_enc, "bias": bias}
    for mask_name, (t, dtype) in masks.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (J, M):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{mask_name} must be a {dtype} tensor [J, M] = [{J}, {M}]; got {got}")
        tensors[mask_name] = t
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device; got {devices}")
    if not _interpreting() and x.device.type != "cuda" and not (x.device.type == "meta" and compile_only.active()):
        raise ValueError(f"{name} runs on CUDA tensors (or under TRITON_INTERPRET=1); got {x.device}")
    return N, D, J, M


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    *,
    dead: torch.Tensor | None = None,
    aux_k: int = 0,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Top-``k`` pre-activations of ``J`` stacked encoders (and the top-``aux_k`` dead ones) in one pass.

    ``x [N, D]`` (the same input for all members), ``W_enc [J, M, D]``, ``bias [J, M]`` fp32 (folded:
    ``b_enc − W_enc·b_dec``), ``1 <= k <= M`` and ``k <= max_k(dtype)`` (512 for fp16/bf16, 256 for fp32) and,
    with AuxK, ``max(k, aux_k) <= MAX_K_WITH_AUX`` (256): register limits of the GPU build (see :data:`MAX_K`).
    Returns ``(values [N, J, k] fp32 sorted descending, indices [N, J, k] int64, aux_values [N, J, aux_k] fp32 |
    None, aux_indices [N, J, aux_k] int64 | None)``; see the
    module docstring for the exact contract (aux padding, ties).
    """
    N, D, J, M = _check_encoder("topk_encode", x, W_enc, bias, "k", k, dead=(dead, torch.bool))
    if isinstance(aux_k, bool) or not isinstance(aux_k, int) or not 0 <= aux_k <= M:
        raise ValueError(f"aux_k must be an int with 0 <= aux_k <= M = {M}; got {aux_k!r}")
    if aux_k > 0 and dead is None:
        raise ValueError("aux_k > 0 needs the dead-latent mask dead [J, M]")
    has_aux = dead is not None and aux_k > 0
    # The GPU limits hold under the interpreter too, so CPU tests see the same contract as a device.
    if k > max_k(x.dtype, False):
        raise ValueError(f"topk_encode keeps k <= {max_k(x.dtype, False)} in registers for {x.dtype} inputs (MAX_K, "
                         f"MAX_K_FP32); got k = {k} (saefast.ops.topk_encode routes larger k to its chunked path)")
    if has_aux and max(k, aux_k) > MAX_K_WITH_AUX:
        raise ValueError(f"topk_encode with AuxK needs max(k, aux_k) <= MAX_K_WITH_AUX = {MAX_K_WITH_AUX}; got "
                         f"k = {k}, aux_k = {aux_k} (saefast.ops.topk_encode computes larger aux_k from the dead "
                         f"latents alone)")
    device = x.device
    # Poisoned outputs: an element the kernel fails to write shows up as NaN / -1, never as a plausible value.
    values = torch.full((N, J, k), float("nan"), dtype=torch.float32, device=device)
    indices = torch.full((N, J, k), -1, dtype=torch.int64, device=device)
    aux_values = aux_indices = None
    if has_aux:
        aux_values = torch.full((N, J, aux_k), float("nan"), dtype=torch.float32, device=device)
        aux_indices = torch.full((N, J, aux_k), -1, dtype=torch.int64, device=device)
    if N == 0:
        return values, indices, aux_values, aux_indices

    kp = triton.next_power_of_2(k)
    akp = triton.next_power_of_2(aux_k) if has_aux else 1
    block_n, block_m, block_d, num_warps = _block_sizes(N, M, D, max(kp, akp), x.dtype, _interpreting(), has_aux)
    # bool pointers are awkward in Triton: pass the mask as bytes (a view, no copy).
    dead_arg = dead.view(torch.uint8) if has_aux else bias
    aux_val_arg = aux_values if has_aux else values
    aux_idx_arg = aux_indices if has_aux else indices
    grid = (triton.cdiv(N, block_n), J)
    launch(_topk_encode_kernel, grid, 
        x, W_enc, bias, dead_arg,
        values, indices, aux_val_arg, aux_idx_arg,
        N, M, D, k, aux_k,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), W_enc.stride(2), bias.stride(0), bias.stride(1),
        dead_arg.stride(0), dead_arg.stride(1),
        values.stride(0), values.stride(1), aux_val_arg.stride(0), aux_val_arg.stride(1),
        LOG_KP=kp.bit_length() - 1, LOG_AKP=akp.bit_length() - 1, HAS_AUX=has_aux,
        LOG_N=block_n.bit_length() - 1, LOG_M=block_m.bit_length() - 1, BLOCK_D=block_d,
        PRECISION=_precision(x.dtype, allow_tf32),
        num_warps=num_warps,
    )
    return values, indices, aux_values, aux_indices


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    # Only fp32 operands have a choice; for fp16/bf16 the argument is ignored, "tf32" being the default.
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


@triton.jit
def _threshold_encode_kernel(
    x_ptr, w_ptr, bias_ptr, theta_ptr, val_ptr, idx_ptr, count_ptr,
    N, M, D, CAPACITY,
    stride_xn, stride_xd, stride_wj, stride_wm, stride_wd, stride_bj, stride_bm, stride_tj, stride_tm,
    stride_on, stride_oj, stride_cn, stride_cj,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    j = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_m = tl.arange(0, BLOCK_M)
    out_rows = rows.to(tl.int64)[:, None] * stride_on + j * stride_oj
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + offs_m
        col_mask = cols < M
        pre = _pre_tile(x_ptr, w_ptr, bias_ptr, j, rows, row_mask, cols, col_mask, D, stride_xn, stride_xd, stride_wj,
                        stride_wm, stride_wd, stride_bj, stride_bm, BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
        theta = tl.load(theta_ptr + j * stride_tj + cols * stride_tm, mask=col_mask, other=0.0)
        keep = (pre > theta[None, :]) & col_mask[None, :]
        # Stream compaction: a kept latent's slot is the row's count so far plus its rank among the tile's kept
        # ones, so slots fill in ascending latent order; slots ≥ CAPACITY are only counted.
        slot = count[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        store = keep & (slot < CAPACITY) & row_mask[:, None]
        tl.store(val_ptr + out_rows + slot, pre, mask=store)
        tl.store(idx_ptr + out_rows + slot, tl.broadcast_to(cols.to(tl.int64)[None, :], [BLOCK_N, BLOCK_M]),
                 mask=store)
        count += tl.sum(keep.to(tl.int32), axis=1)
    # Padding slots (count ≤ slot < CAPACITY) get value 0 and index 0, the SparseCodes convention.
    for c0 in range(0, CAPACITY, BLOCK_C):
        slot = c0 + tl.arange(0, BLOCK_C)
        pad = (slot[None, :] >= count[:, None]) & (slot[None, :] < CAPACITY) & row_mask[:, None]
        tl.store(val_ptr + out_rows + slot[None, :], tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32), mask=pad)
        tl.store(idx_ptr + out_rows + slot[None, :], tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int64), mask=pad)
    tl.store(count_ptr + rows.to(tl.int64) * stride_cn + j * stride_cj, count.to(tl.int64), mask=row_mask)


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor,
    capacity: int,
    *,
    allow_tf32: bool = False,
    raise_on_overflow: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused encode → JumpReLU / threshold: every ``pre[n, j, m] > threshold[j, m]`` as sparse codes, in one pass.

    ``x [N, D]``, ``W_enc [J, M, D]``, ``bias [J, M]`` fp32 (folded, as for :func:`topk_encode`), ``threshold
    [J, M]`` fp32, ``1 <= capacity <= M``. Returns ``(values [N, J, capacity] fp32, indices [N, J, capacity] int64,
    counts [N, J] int64, overflow [] bool)``: row ``(n, j)`` holds its kept pre-activations (raw, i.e. the forward
    of :func:`saefast.ref.jumprelu_activation` / ``threshold_activation``) in ascending latent order, then padding
    slots of value 0 and index 0; ``counts`` is the number of kept latents *before* truncation.

    Never silently drops: a row with more than ``capacity`` kept latents keeps its ``capacity`` lowest-index ones
    and sets ``overflow = (counts > capacity).any()``; with ``raise_on_overflow`` (the default) the launcher then
    raises RuntimeError (this reads ``overflow`` on the host: a device sync). Pass ``raise_on_overflow=False`` to
    stay asynchronous and check ``overflow`` or ``counts`` yourself (capacity = M never overflows).
    """
    N, D, J, M = _check_encoder("threshold_encode", x, W_enc, bias, "capacity", capacity,
                                threshold=(threshold, torch.float32))
    if threshold is None:
        raise ValueError("threshold_encode needs threshold [J, M]")
    device = x.device
    values = torch.full((N, J, capacity), float("nan"), dtype=torch.float32, device=device)
    indices = torch.full((N, J, capacity), -1, dtype=torch.int64, device=device)
    counts = torch.full((N, J), -1, dtype=torch.int64, device=device)
    if N == 0:
        return values, indices, counts, torch.zeros((), dtype=torch.bool, device=device)
    block_n, block_m, block_d, num_warps = _block_sizes(N, M, D, 1, x.dtype, _interpreting())
    block_c = min(max(triton.next_power_of_2(capacity), 16), 256)
    grid = (triton.cdiv(N, block_n), J)
    launch(_threshold_encode_kernel, grid, 
        x, W_enc, bias, threshold, values, indices, counts,
        N, M, D, capacity,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), W_enc.stride(2), bias.stride(0), bias.stride(1),
        threshold.stride(0), threshold.stride(1), values.stride(0), values.stride(1), counts.stride(0),
        counts.stride(1),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c, PRECISION=_precision(x.dtype, allow_tf32),
        num_warps=num_warps,
    )
    overflow = (counts > capacity).any()
    if raise_on_overflow and bool(overflow):
        raise RuntimeError(
            f"threshold_encode: {int(counts.max())} latents above threshold in one row exceed capacity {capacity}; "
            "raise the capacity (M never overflows) or pass raise_on_overflow=False and handle counts"
        )
    return values, indices, counts, overflow
