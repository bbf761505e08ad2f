"""Evaluating SAEs and ensembles: :func:`evaluate` (reconstruction and sparsity on held-out activations), the
metrics it and the ensemble comparisons use (:mod:`.metrics`), and class-structure metrics for SAE-ception
(:mod:`.class_metrics`, which needs scikit-learn and is imported on use), and the language-model cost of splicing
a dictionary into a model (:mod:`.splice`, with :func:`ablate_rows`), and example-level evaluations on
:class:`~saefast.data.examples.ExampleActivations`: sparse probing (:mod:`.probing`, :func:`sparse_probing`),
spurious-correlation removal (:mod:`.scr`, :func:`spurious_correlation_removal`), and confidence intervals over
seeds (:mod:`.confidence`). Those three import scikit-learn and scipy inside their functions, on use."""

from . import metrics
from .confidence import compare_intervals, format_ci, mean_ci, summarize
from .evaluate import evaluate
from .probing import fit_probe, one_vs_rest_splits, pooled_codes, probe_accuracy, sparse_probing, top_k_latents
from .scr import decoder_directions, shift_score, spurious_correlation_removal
from .splice import ablate_rows, loss_scores, splice, spliced_lm

__all__ = ["ablate_rows", "compare_intervals", "decoder_directions", "evaluate", "fit_probe", "format_ci",
           "loss_scores", "mean_ci", "metrics", "one_vs_rest_splits", "pooled_codes", "probe_accuracy", "shift_score",
           "sparse_probing", "splice", "spliced_lm", "spurious_correlation_removal", "summarize", "top_k_latents"]
