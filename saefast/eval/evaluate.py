"""Evaluation of a trained SAE or ensemble on held-out activations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..devices import to_device
from ..models import SparseDictionary
from ..validation import check_activations
from . import metrics


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"data must be [N, d_in], got shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise ValueError("data is an empty batch (0 tokens)")
        return data.split(batch_size)
    return (batch[0] if isinstance(batch, (tuple, list)) else batch for batch in data)


@torch.no_grad()
def evaluate(model: SparseDictionary, data: torch.Tensor | Iterable, batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``model`` over ``data`` (a tensor ``[N, D]`` or an iterable of them).

    Returns ``mse`` (mean over tokens of Σ_d (x − x̂)²), ``fvu`` (Σ‖x − x̂‖² / Σ‖x − x̄‖²),
    ``explained_variance`` (1 − fvu), ``explained_variance_per_dim`` (mean over dimensions of 1 − SSE_d/SST_d),
    ``l0`` (mean active latents per token, summed over members), ``l0_per_member``, ``dead_fraction``
    (latents that never fired on ``data``) and ``n_tokens``. The model's train/eval mode is left as it is.
    """
    if not isinstance(model, SparseDictionary):
        raise TypeError(f"model must be an SAE or Ensemble, got {type(model).__name__}")
    device = model.W_enc.device
    recon = metrics.ReconstructionStats()
    window = metrics.FiringWindow(model.n_latents_total, device=device)
    l0_sum: torch.Tensor | None = None
    n_tokens = 0
    for index, batch in enumerate(_batches(data, batch_size)):
        x = to_device(check_activations(batch, model.cfg.d_in, name=f"batch {index}"), device, torch.float32)
        codes = model.encode(x)
        x_hat = model.decode(codes)
        recon.update(x, x_hat)
        window.update(codes)
        batch_l0 = codes.l0().sum(0).double()
        l0_sum = batch_l0 if l0_sum is None else l0_sum + batch_l0
        n_tokens += x.shape[0]
    if n_tokens == 0:
        raise ValueError("data holds no batches")
    result = dict(recon.compute())
    l0_per_member = (l0_sum / n_tokens).tolist()
    result.update(
        l0=float(sum(l0_per_member)),
        l0_per_member=l0_per_member,
        dead_fraction=window.dead_fraction(),
        n_tokens=n_tokens,
    )
    return result
