"""The auxiliary loss of SAE-ception: ``λ·mean(1 − cos(h(x), t(x)))`` at a hooked layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.hooks import abbreviate_names, hidden_state, module_names
from ..devices import to_device


def cosine_loss(h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(1 − cos(h, t))`` over the positions (``h, t [..., D]``; ``mask [...]`` bool picks the ones counted)."""
    if h.shape != t.shape:
        raise ValueError(f"the hooked activation {tuple(h.shape)} and its targets {tuple(t.shape)} differ in shape")
    loss = 1 - F.cosine_similarity(h, t.to(h.dtype), dim=-1)
    if mask is None:
        return loss.mean()
    if mask.shape != loss.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match the positions {tuple(loss.shape)}")
    mask = mask.to(dtype=torch.bool)
    if not bool(mask.any()):  # checked where the mask was made (the host, for the runner's masks): no device sync
        raise ValueError("mask selects no position")
    mask = to_device(mask, loss.device)
    # A masked sum rather than loss[mask]: boolean indexing would read the count on the host.
    return torch.where(mask, loss, torch.zeros_like(loss)).sum() / mask.sum()


class AuxiliaryLoss:
    """``λ·mean(1 − cos(h(x), t(x)))`` on the output ``h`` of any module of any model, through a forward hook.

    ``with AuxiliaryLoss(model, "fc1", coef=λ) as aux: logits = model(x); loss = task + aux(t)``. The hook keeps
    the module's output (the tensor, or the first element of a tuple) **in the graph** — not detached — so the
    loss's gradient reaches the weights of that module and of every trainable module before it. The last forward's
    output is the one used.
    """

    def __init__(self, model: nn.Module, layer: str, coef: float = 1.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        modules = dict(model.named_modules())
        if not layer or layer not in modules:
            raise ValueError(f"model has no module {layer!r}; valid names: {abbreviate_names(module_names(model))}")
        if not coef >= 0:
            raise ValueError(f"coef must be >= 0, got {coef}")
        self.layer, self.coef = layer, float(coef)
        self.activation: torch.Tensor | None = None
        self._handle = modules[layer].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        self.activation = hidden_state(self.layer, output)

    def __call__(self, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``coef · cosine_loss(h, targets, mask)`` for the last forward's activation ``h``."""
        if self.activation is None:
            raise RuntimeError(f"no forward has run through {self.layer!r} since the hook was attached")
        return self.coef * cosine_loss(self.activation, targets.to(self.activation.device), mask)

    def remove(self) -> None:
        """Detach the hook (idempotent)."""
        self._handle.remove()
        self.activation = None

    def __enter__(self) -> AuxiliaryLoss:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
