"""Top-k over the latents in chunks: the unfused path for a ``k`` (or AuxK width) past the fused kernels' limits.

At most ``N·J·(k + CHUNK_LATENTS)`` pre-activations exist at once, never the ``N × J·M`` matrix; the result has the
contract of the fused top-k's outputs (:func:`saefast.kernels.topk_encode.topk_encode`).
"""

from __future__ import annotations

import torch

CHUNK_LATENTS = 2048
"""Latents per chunk of :func:`topk_over_latents`."""


def dead_latents(dead: torch.Tensor, max_dead: int | None = None) -> torch.Tensor:
    """The dead latents of each member, ``[J, L]`` int64 in ascending order, padded with −1 to ``L`` = the largest
    count, or to ``max_dead`` when given (≥ every member's count; without it, one host sync: ``L`` is a shape)."""
    counts = dead.sum(-1)
    if max_dead is None:
        L = int(counts.max()) if dead.numel() else 0
    elif isinstance(max_dead, bool) or not isinstance(max_dead, int) or not 0 <= max_dead <= dead.shape[-1]:
        raise ValueError(f"max_dead must be an int in [0, {dead.shape[-1]}], got {max_dead!r}")
    else:
        L = max_dead
    order = torch.argsort((~dead).to(torch.int8), dim=-1, stable=True)[:, :L]  # dead first, ascending
    return torch.where(torch.arange(L, device=dead.device) < counts.unsqueeze(-1), order, -1)


def topk_over_latents(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                      latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``pre[n, j, m] = x[n]·W_enc[j, m] + bias[j, m]`` (fp32 products and sums) over the latents
    ``latents[j]`` (``[J, L]`` int64, −1 = padding; default: all ``M``), as ``(values [N, J, k] fp32 sorted
    descending, indices [N, J, k] int64)``: the contract of the fused kernel's top-k (or AuxK) outputs — slots past
    a member's number of latents hold ``-inf`` and index 0 — for any ``k``.

    The latents are swept in chunks of :data:`CHUNK_LATENTS` with a running ``torch.topk``, so at most
    ``N·J·(k + CHUNK_LATENTS)`` pre-activations exist at once, never the ``N × J·M`` matrix. Differentiable through
    torch autograd in ``x``, ``W_enc`` and ``bias`` (only the selected entries get gradient). Among equal values the
    order is ``torch.topk``'s.
    """
    N, D = x.shape
    J, M, _ = W_enc.shape
    L = M if latents is None else latents.shape[1]
    xf = x.float()
    values = torch.full((N, J, 0), float("-inf"), dtype=torch.float32, device=x.device)
    indices = torch.zeros((N, J, 0), dtype=torch.int64, device=x.device)
    for start in range(0, L, CHUNK_LATENTS):
        stop = min(start + CHUNK_LATENTS, L)
        if latents is None:
            chunk = torch.arange(start, stop, device=x.device).expand(J, -1)
            W, b = W_enc[:, start:stop], bias[:, start:stop]
        else:
            chunk = latents[:, start:stop]
            rows = chunk.clamp_min(0)
            W = W_enc.gather(1, rows.unsqueeze(-1).expand(-1, -1, D))
            b = bias.gather(1, rows).masked_fill(chunk < 0, float("-inf"))
        pre = torch.einsum("nd,jcd->njc", xf, W.float()) + b.float()
        values = torch.cat([values, pre], -1)
        indices = torch.cat([indices, chunk.clamp_min(0).unsqueeze(0).expand(N, -1, -1)], -1)
        top = values.topk(min(k, values.shape[-1]), dim=-1)
        values, indices = top.values, indices.gather(-1, top.indices)
    if values.shape[-1] < k:  # fewer latents than k: the kernel's padding
        pad = k - values.shape[-1]
        values = torch.cat([values, values.new_full((N, J, pad), float("-inf"))], -1)
        indices = torch.cat([indices, indices.new_zeros((N, J, pad))], -1)
    return values, indices
