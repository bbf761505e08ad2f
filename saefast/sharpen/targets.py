"""Sharpened targets: the class's latents kept, the rest zeroed, decoded (:func:`targets`); and the controls."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from ..models import SparseDictionary
from .checks import check_labels, check_model, inference

Target = Literal["class", "complement", "example", "random"]
TARGETS: tuple[str, ...] = get_args(Target)
"""Target kinds: SAE-ception's class targets, and the controls (complement mask, per-example top-N, random)."""



def _check_masks(model: SparseDictionary, masks: Any) -> torch.Tensor:
    L = model.n_latents_total
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != L:
        got = (f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__)
        raise ValueError(f"masks must be a bool tensor [n_classes, {L}] (class_masks of this model); got {got}")
    return masks


def targets(model: SparseDictionary, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, *,
            complement: bool = False, backend: str | None = None) -> torch.Tensor:
    """Sharpened targets ``t(x) = decode(z̃)``, ``z̃ = z ⊙ masks[y]`` (``complement``: ``z ⊙ ¬masks[y]``), ``[N, D]``.

    SAE: ``t = W_dec·z̃ + b_dec``; ensemble: ``t = Σ_j α (W_dec_j·z̃_j + b_dec_j)`` (boosting stages encode their
    residuals unmasked, as in ``reconstruct``; only the decode is masked). Inference codes, no grad: a target
    is a fixed point to pull the model's layer towards. One fused pass on ``native``/``triton``: encode →
    top-k → gather ``masks[y, slot latent]`` at the ``[N, J, K]`` slots → masked sparse decode.
    """
    model = check_model(model)
    x = model.check_input(x)
    masks = _check_masks(model, masks)
    labels = check_labels(labels, x.shape[0], masks.shape[0]).to(x.device)
    with inference(model):
        codes = model.encode(x, backend=backend)
        keep = masks.to(x.device)[labels.view(-1, 1, 1), codes.global_indices()]
        if complement:
            keep = ~keep
        return model.decode(codes, backend=backend, mask=keep)


def targets_reference(model: SparseDictionary, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, *,
                      complement: bool = False) -> torch.Tensor:
    """Eager oracle of :func:`targets`: dense codes ``Z [N, L]`` (torch backend), ``Z ⊙ masks[y]``, dense decode."""
    model = check_model(model)
    x = model.check_input(x)
    masks = _check_masks(model, masks)
    labels = check_labels(labels, x.shape[0], masks.shape[0]).to(x.device)
    with inference(model):
        dense = model.encode(x, backend="torch").to_dense()
        keep = masks.to(x.device)[labels]
        return model.decode(dense * (~keep if complement else keep), backend="torch")


def example_targets(model: SparseDictionary, x: torch.Tensor, top_n: int, backend: str | None = None) -> torch.Tensor:
    """Per-example top-k control: ``t = decode(z̃)`` with ``z̃`` keeping each example's own ``top_n`` largest
    coefficients over the concatenated dictionary (no labels), ``[N, D]``."""
    model = check_model(model)
    x = model.check_input(x)
    L = model.n_latents_total
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= L:
        raise ValueError(f"top_n must be an int in [1, {L}] (the latents), got {top_n!r}")
    with inference(model):
        codes = model.encode(x, backend=backend)
        values = codes.values.reshape(codes.n_tokens, -1)
        keep = torch.ones_like(values, dtype=torch.bool)
        if top_n < values.shape[1]:
            keep = torch.zeros_like(keep).scatter_(1, values.topk(top_n, dim=1).indices, True)
        return model.decode(codes, backend=backend, mask=keep.view_as(codes.values))


def random_targets(n: int, d_in: int, seed: int = 0, device: str | torch.device | None = None) -> torch.Tensor:
    """Random-unit-vector baseline: ``[n, d_in]`` rows ``u / ‖u‖``, ``u ~ N(0, I)`` from a generator seeded ``seed``."""
    if n < 1 or d_in < 1:
        raise ValueError(f"random_targets needs n >= 1 and d_in >= 1, got {n} and {d_in}")
    u = torch.randn(n, d_in, generator=torch.Generator().manual_seed(int(seed)))
    return F.normalize(u, dim=1).to(device)
