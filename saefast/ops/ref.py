"""Eager PyTorch reference of every SAE operation, on stacked member-axis tensors.

This module is the oracle: the Triton kernels and the native (C++) ops are tested against these functions,
the benchmarks use them as the eager baseline, and the models run on them when no faster backend is chosen.

Shapes use fixed letters: N tokens, D = d_in, J members (or top-k groups), M latents per member,
K slots per token and member. Parameters of ``J`` members are stacked on a leading axis:
``W_enc [J, M, D]``, ``b_enc [J, M]``, ``W_dec [J, M, D]`` (row ``i`` is the decoder direction of
latent ``i``), ``b_dec [J, D]`` (or ``[1, D]`` when the members share one ``b_dec``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .codes import SparseCodes


def pre_activations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations ``pre[n, j, m] = W_enc[j, m] · (x_in[n, j] − b_dec[j]) + b_enc[j, m]``.

    ``x`` is ``[N, D]`` (the same input for every member: one GEMM of ``N × D × J·M``) or ``[N, J, D]``
    (one input per member, e.g. boosting residuals). ``b_dec`` is ``[J, D]`` or ``[1, D]``. Returns ``[N, J, M]``.
    """
    J, M, D = W_enc.shape
    if x.dim() == 2:
        # (x − b_dec_j)·W_enc_j + b_enc_j = x·W_enc_j + (b_enc_j − b_dec_j·W_enc_j): one GEMM for all members,
        # with the bias added inside it (addmm) rather than in a second pass over the N × J·M output.
        bias = b_enc - torch.einsum("jd,jmd->jm", b_dec.expand(J, D), W_enc)
        return torch.addmm(bias.reshape(J * M), x, W_enc.reshape(J * M, D).T).view(x.shape[0], J, M)
    return torch.einsum("njd,jmd->njm", x - b_dec, W_enc) + b_enc


def topk_codes(pre: torch.Tensor, k: int) -> SparseCodes:
    """TopK as sparse codes: ``values = ReLU(top-k values of pre[n, j, :])``, ``indices`` their latents, ``[N, J, k]``.

    Differentiable in ``values`` (the gradient reaches ``pre`` only at the selected entries)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCodes(F.relu(values), indices, pre.shape[-1])


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """TopK: ``z = ReLU(pre)`` on the ``k`` largest entries of each ``pre[n, j, :]``, 0 elsewhere. ``[N, J, M]``."""
    codes = topk_codes(pre, k)
    return codes.to_dense().view_as(pre)


def batchtopk_activation(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK: per member ``j``, keep the ``N·k`` largest entries of ``ReLU(pre[:, j, :])`` over the whole batch.

    Returns ``(z [N, J, M], smallest_kept [J])``; ``smallest_kept`` (the smallest positive kept activation,
    0 if none) feeds the inference threshold.
    """
    N, J, M = pre.shape
    flat = F.relu(pre).transpose(0, 1).reshape(J, N * M)
    values, indices = flat.topk(min(N * k, N * M), dim=-1, sorted=False)
    z = torch.zeros_like(flat).scatter(-1, indices, values).view(J, N, M).transpose(0, 1)
    positive = values.detach().masked_fill(values.detach() <= 0, float("inf"))
    smallest = positive.min(dim=-1).values
    return z, torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)


def threshold_activation(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Inference form of BatchTopK: ``z = pre · [pre > θ]`` with ``θ [J, M]`` (θ ≥ 0)."""
    return pre * (pre > threshold)


def relu_activation(pre: torch.Tensor) -> torch.Tensor:
    """``z = max(pre, 0)``."""
    return F.relu(pre)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """Kernel ``K(u) = 1{−½ < u ≤ ½}`` of the JumpReLU straight-through estimator."""
    return ((u > -0.5) & (u <= 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z = pre · H(pre − θ)``; ``∂z/∂pre = H(pre − θ)``, ``∂z/∂θ = −(θ/ε)·K((pre − θ)/ε)`` (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, _sum_to(grad_threshold, threshold.shape), None


class _Step(torch.autograd.Function):
    """``H(pre − θ)``; ``∂/∂pre = 0``, ``∂/∂θ = −(1/ε)·K((pre − θ)/ε)`` (the L0 penalty's estimator)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, _sum_to(grad_threshold, threshold.shape), None


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (leading axes first)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    return grad


def jumprelu_activation(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU ``z = pre · H(pre − θ)``, ``θ [J, M] > 0``, with the straight-through gradient of bandwidth ε."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def jumprelu_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Per-member mean L0 ``(1/N)·Σ_n Σ_m H(pre − θ)``, ``[J]``, differentiable in θ by the STE."""
    return _Step.apply(pre, threshold, bandwidth).sum(-1).mean(0)


def decode_members_dense(z: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Per-member decoder output of dense codes ``z [N, J, M]``, without bias:
    ``y[n, j] = Σ_m z[n, j, m] · W_dec[j, m]``, ``[N, J, D]``."""
    return torch.einsum("njm,jmd->njd", z, W_dec)


def decode_members_sparse(codes: SparseCodes, W_dec: torch.Tensor) -> torch.Tensor:
    """Sparse per-member decoder output ``y[n, j] = Σ_s values[n, j, s] · W_dec[j, indices[n, j, s]]``, ``[N, J, D]``.

    One ``embedding_bag`` over the concatenated dictionary: ``O(N·J·K·D)`` work and no dense ``[N, J, M]``
    code, differentiable in ``values`` and ``W_dec``. Equals
    ``decode_members_dense(codes.to_dense().view(N, J, M), W_dec)``.
    """
    N, J, K = codes.values.shape
    M, D = W_dec.shape[1], W_dec.shape[2]
    flat = W_dec.reshape(J * M, D)
    bags = codes.global_indices().reshape(N * J, K)
    weights = codes.values.reshape(N * J, K).to(flat.dtype)
    return F.embedding_bag(bags, flat, per_sample_weights=weights, mode="sum").view(N, J, D)


def decode_codes(codes: SparseCodes | torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Per-member decoder output of sparse codes or dense codes ``[N, J, M]``, ``[N, J, D]``."""
    if isinstance(codes, SparseCodes):
        return decode_members_sparse(codes, W_dec)
    return decode_members_dense(codes.to(W_dec.dtype), W_dec)


def member_weights(alpha: float | torch.Tensor, J: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``α`` as a ``[J]`` tensor of ``dtype`` on ``device`` (a scalar is broadcast). A Python number is filled on
    the device: ``torch.as_tensor(number, device=cuda)`` would be a blocking copy from host memory."""
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=device, dtype=dtype).expand(J)
    return torch.full((J,), float(alpha), dtype=dtype, device=device)


def decode_sparse(
    codes: SparseCodes, W_dec: torch.Tensor, b_dec: torch.Tensor, alpha: torch.Tensor | float
) -> torch.Tensor:
    """Ensemble decode ``x̂ = Σ_j α_j (Σ_s values[n,j,s]·W_dec[j, indices[n,j,s]] + b_dec[j])``, ``[N, D]``.

    ``alpha`` is a scalar or ``[J]``; ``b_dec`` is ``[J, D]`` or ``[1, D]`` (a shared bias is added once,
    unscaled: that is the single-SAE case). Equivalent torch:
    ``(codes.to_dense() · repeat_interleave(α, M)) @ W_dec.flatten(0, 1) + Σ_j α_j b_dec[j]``.
    """
    J = W_dec.shape[0]
    alpha_t = member_weights(alpha, J, W_dec.dtype, W_dec.device)
    out = (decode_members_sparse(codes, W_dec) * alpha_t.view(1, J, 1)).sum(1)
    bias = b_dec[0] if b_dec.shape[0] == 1 else (alpha_t.view(J, 1) * b_dec).sum(0)
    return out + bias


class _MemberBias(torch.autograd.Function):
    """``y + b.unsqueeze(0)``, its bias gradient summed member by member on the CPU (:func:`add_member_bias`)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (y.dtype, bias.dtype)
        return y + bias.unsqueeze(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_dtype, bias_dtype = ctx.dtypes
        if grad.device.type == "cpu":
            bias_grad = torch.stack([grad[:, j].sum(0) for j in range(grad.shape[1])])
        else:
            bias_grad = grad.sum(0)
        return grad.to(y_dtype), bias_grad.to(bias_dtype)


class _MemberSquaredError(torch.autograd.Function):
    """``Σ_{n,d} (t − x̂)²`` per member ``[J]`` of ``[N, J, D]`` inputs, each member reduced on its own (the CPU form
    of :func:`fvu_loss`'s numerator; ``t`` without gradient). One Function: autograd through ``x̂[:, j]`` would build,
    per member, a zero gradient of the whole ``[N, J, D]`` output and add it in. Backward: ``dx̂ = −2(t − x̂)·g_j``."""

    @staticmethod
    def forward(ctx, target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        diff = target - x_hat
        ctx.save_for_backward(diff)
        return torch.cat([d.pow(2).sum(dim=(0, 2)) for d in diff.split(1, dim=1)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (diff,) = ctx.saved_tensors
        # −2·g_j·diff in one pass (scaling by −2 is exact: the same numbers as −(g_j·(2·diff)))
        return None, diff * (-2 * grad).view(1, -1, 1)


def add_member_bias(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y[n, j] + bias[j]`` for ``y [N, J, D]``, ``bias [J, D]``; differentiable.

    On the CPU the bias gradient ``Σ_n g[n, j]`` is reduced one member at a time: a reduction of the whole
    ``[N, J, D]`` gradient over ``N`` vectorises across ``J·D`` and rounds differently for another ``J``, so a member
    trained beside other members would differ in the last bits from the same member trained in a smaller ensemble —
    and member-parallel training would not give the single-process model bit for bit."""
    return _MemberBias.apply(y, bias)


def _total_variance(target: torch.Tensor) -> torch.Tensor:
    """``Σ_n‖t − t̄‖²`` of one member's target ``[N, 1, D]`` → ``[1]``."""
    return (target - target.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))


def fvu_loss(target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-member fraction of variance unexplained ``Σ_n‖t − x̂‖² / Σ_n‖t − t̄‖²`` for ``[N, J, D]`` inputs → ``[J]``.

    On the CPU each member is reduced on its own, so its value does not depend on how many members share the call
    (see :func:`add_member_bias`)."""
    if target.device.type == "cpu" and target.shape[1] > 1:
        if target.requires_grad:
            return torch.cat([fvu_loss(target[:, j:j + 1], x_hat[:, j:j + 1]) for j in range(target.shape[1])])
        err = _MemberSquaredError.apply(target, x_hat)
        if target.stride(1) == 0:  # one target shared by the members (expanded): its variance once
            total = _total_variance(target[:, :1]).expand(target.shape[1])
        else:
            total = torch.cat([_total_variance(t) for t in target.split(1, dim=1)])
        return err / total.clamp_min(torch.finfo(total.dtype).tiny)
    err = (target - x_hat).pow(2).sum(dim=(0, 2))
    total = (target - target.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))
    return err / total.clamp_min(torch.finfo(total.dtype).tiny)


def sparse_sae_backward(
    x: torch.Tensor, b_dec: torch.Tensor, W_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
    split: int, grad_out: torch.Tensor, aux_grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sparse backward of a TopK/BatchTopK training forward (encode → ReLU'd codes → decode), given the
    gradients of its per-member decoder outputs.

    Slots ``s < split`` of ``values``/``indices`` ``[N, J, S]`` are the codes, read with ``G = grad_out [N, J, D]``;
    slots ``s ≥ split`` are AuxK's, read with ``G = aux_grad_out``. ``X[n, j] = x[n]`` (``x [N, D]``) or ``x[n, j]``
    (``[N, J, D]``); ``b_dec`` is ``[J, D]`` or ``[1, D]``. For every slot of latent ``m = indices[n, j, s]``::

        dv = ⟨G[n, j], W_dec[j, m]⟩,   dpre = dv·[values > 0]           (the ReLU of the codes)
        dW_dec[j, m] += values·G[n, j],   dW_enc[j, m] += dpre·(X[n, j] − b_dec[j]),   db_enc[j, m] += dpre

    Returns ``(dW_enc [J, M, D], db_enc [J, M], dW_dec [J, M, D], dpre [N, J, S])``, fp32. A slot whose value is 0
    adds nothing (its ``dpre`` is 0). The rest of the backward follows from ``dpre``:
    ``db_dec[j] = −Σ_m db_enc[j, m]·W_enc[j, m]`` and ``dx[n(, j)] = Σ_{(j,) s} dpre·W_enc[j, indices]``.
    """
    N, J, S = indices.shape
    M, D = W_dec.shape[1], W_dec.shape[2]
    first = torch.arange(S, device=indices.device) < split
    G = grad_out.float().unsqueeze(2).expand(N, J, S, D)
    if aux_grad_out is not None and S > split:
        G = torch.where(first.view(1, 1, S, 1), G, aux_grad_out.float().unsqueeze(2).expand(N, J, S, D))
    member = torch.arange(J, device=indices.device).view(1, J, 1)
    rows = W_dec.float()[member.expand(N, J, S), indices]  # [N, J, S, D]
    v = values.float()
    dpre = (G * rows).sum(-1) * (v > 0)
    X = x.float().unsqueeze(1).expand(N, J, D) if x.dim() == 2 else x.float()
    Xc = X - b_dec.float().expand(J, D).unsqueeze(0)
    flat = (indices + member * M).reshape(-1)
    dW_dec = torch.zeros(J * M, D, device=W_dec.device).index_add_(0, flat, (v.unsqueeze(-1) * G).reshape(-1, D))
    dW_enc = torch.zeros(J * M, D, device=W_dec.device).index_add_(
        0, flat, (dpre.unsqueeze(-1) * Xc.unsqueeze(2)).reshape(-1, D))
    db_enc = torch.zeros(J * M, device=W_dec.device).index_add_(0, flat, dpre.reshape(-1))
    return dW_enc.view(J, M, D), db_enc.view(J, M), dW_dec.view(J, M, D), dpre


def auxk_reconstruction(pre: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor, aux_k: int) -> torch.Tensor | None:
    """AuxK (Gao et al. 2024): decoder output of each member's top ``aux_k`` *dead* latents, ``[N, J, D]``.

    ``ê[n, j] = Σ_{m ∈ topk_aux(pre[n, j] restricted to dead[j])} ReLU(pre[n, j, m]) · W_dec[j, m]`` (no bias).
    The AuxK loss is then ``fvu_loss(e, ê)`` with ``e`` the detached residual ``target − x̂``.
    Returns None when no member has a dead latent; a member with fewer dead latents than ``aux_k`` uses
    those it has (0 for a member with none). ``dead`` is ``[J, M]`` bool.
    """
    n_dead = int(dead.sum(-1).max().item())
    if n_dead == 0:
        return None
    masked = pre.masked_fill(~dead.unsqueeze(0), float("-inf"))
    # ReLU turns the −inf of a member with fewer dead latents than aux_k into 0.
    return decode_members_sparse(topk_codes(masked, min(aux_k, n_dead)), W_dec)


def normalize_rows_(W: torch.Tensor) -> None:
    """In place ``W[..., i, :] ← W[..., i, :] / ‖W[..., i, :]‖`` (decoder directions to unit norm)."""
    W.div_(W.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def remove_parallel_grad_(W: torch.Tensor, grad: torch.Tensor) -> None:
    """In place ``g_i ← g_i − (g_i · ŵ_i) ŵ_i`` per row, so a step cannot change a unit row's norm to first order."""
    unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    grad.sub_((grad * unit).sum(-1, keepdim=True) * unit)


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6,
                     total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Weiszfeld iterations for ``argmin_y Σ_n ‖x_n − y‖``, started from the mean, in float64. ``[N, D] → [D]``.

    ``total`` sums a tensor over the processes that hold the other rows of the point set (a data-parallel batch):
    every sum of the iteration (the mean, ``Σ_n w_n x_n``, ``Σ_n w_n``) then runs over all the points, so every
    process gets the geometric median of the global set and stops at the same iteration."""
    points = x.detach().to(torch.float64)
    if total is None:
        median = points.mean(0)
    else:
        sums = total(torch.cat([points.sum(0), points.new_tensor([points.shape[0]])]))
        median = sums[:-1] / sums[-1]
    for _ in range(iters):
        distances = (points - median).norm(dim=-1).clamp_min(1e-12)
        weights = 1.0 / distances
        if total is None:
            updated = (weights[:, None] * points).sum(0) / weights.sum()
        else:
            sums = total(torch.cat([(weights[:, None] * points).sum(0), weights.sum().reshape(1)]))
            updated = sums[:-1] / sums[-1]
        shift = (updated - median).norm()
        median = updated
        if shift <= tol * median.norm().clamp_min(1.0):
            break
    return median.to(x.dtype)


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
               lr: float, beta1: float, beta2: float, eps: float, unit_rows: bool = False) -> None:
    """In place, one step of ``torch.optim.Adam`` (amsgrad, weight decay and maximize off) at step count ``step``
    (≥ 1, after incrementing), with the op order of torch's single-tensor CPU path::

        m ← lerp(m, g, 1 − β1);   v ← β2·v + (1 − β2)·g²
        p ← p − (lr / bc1) · m / (√v / √bc2 + ε),   bc1 = 1 − β1^step, bc2 = 1 − β2^step (host doubles)

    With ``unit_rows`` (decoder rows ``[..., D]``): first :func:`remove_parallel_grad_` (written back to ``grad``),
    then the step, then :func:`normalize_rows_` — the training step's projection → Adam → renormalisation."""
    if unit_rows:
        remove_parallel_grad_(param, grad)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
    if unit_rows:
        normalize_rows_(param)


def gather_rows(sources: list[torch.Tensor], source_index: torch.Tensor, row_index: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``out[n] = sources[source_index[n]][row_index[n]]``, as ``dtype``: the oracle of
    :func:`saefast.ops.gather_rows_`, one row at a time."""
    rows = [sources[int(s)][int(r)].to(dtype) for s, r in zip(source_index.tolist(), row_index.tolist())]
    if not rows:
        return torch.empty((0, *sources[0].shape[1:]), dtype=dtype)
    return torch.stack(rows)
