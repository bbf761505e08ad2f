"""Evaluating SAEs and ensembles: :func:`evaluate` (reconstruction and sparsity on held-out activations), the
metrics it and the ensemble comparisons use (:mod:`.metrics`), and class-structure metrics for SAE-ception
(:mod:`.class_metrics`, which needs scikit-learn and is imported on use), and the language-model cost of splicing
a dictionary into a model (:mod:`.splice`)."""

from . import metrics
from .evaluate import evaluate
from .splice import loss_scores, splice, spliced_lm

__all__ = ["evaluate", "loss_scores", "metrics", "splice", "spliced_lm"]
