"""Input checks and the inference context shared by the SAE-ception steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..models import SparseDictionary


@contextlib.contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """Eval mode (BatchTopK: its learned threshold, so codes do not depend on the batch) and no grad, restored."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def check_model(model: Any) -> SparseDictionary:
    """``model`` if it is an SAE or Ensemble; TypeError otherwise."""
    if not isinstance(model, SparseDictionary):
        raise TypeError(f"model must be an SAE or Ensemble, got {type(model).__name__}")
    return model


def check_labels(labels: Any, n: int, n_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    """Labels ``[n]`` of non-negative class ids (below ``n_classes`` when given), as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int class ids, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per example ({n}), got shape {tuple(labels.shape)}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be >= 0 (class ids), got {int(labels.min())}")
    if n_classes is not None and n and int(labels.max()) >= n_classes:
        raise ValueError(f"{name} has class {int(labels.max())} but there are only {n_classes} classes "
                         f"(mask rows); compute the statistics on data that holds every class")
    return labels.long()
