"""Evaluating SAEs and ensembles: :func:`evaluate` (reconstruction and sparsity on held-out activations), the
metrics it and the ensemble comparisons use (:mod:`.metrics`), and class-structure metrics for SAE-ception
(:mod:`.class_metrics`, which needs scikit-learn and is imported on use)."""

from . import metrics
from .evaluate import evaluate

__all__ = ["evaluate", "metrics"]
