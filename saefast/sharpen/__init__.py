"""SAE-ception: class-level feature sharpening with an SAE (or ensemble) in the training loop.

For each class ``y``: ``μ_y`` = mean SAE code over the training examples of class ``y`` (:func:`class_stats`),
``T_y`` = the latents of its top-N means (:func:`class_masks`). An example's code ``z`` is *sharpened* by zeroing
every latent outside ``T_{y(x)}`` and decoded into the target ``t(x) = W_dec·z̃ + b_dec`` (:func:`targets`; for an
ensemble, the ensemble decode). The model is fine-tuned with ``L = task loss + λ·mean(1 − cos(h(x), t(x)))`` at the
hooked layer (:class:`AuxiliaryLoss`), then a fresh SAE is trained on the new model's activations, and the cycle
repeats (:class:`SAECeption`). Controls: per-example top-N (:func:`example_targets`), the complement mask
(``targets(..., complement=True)``) and random unit vectors (:func:`random_targets`). Tasks and their classifiers:
:mod:`.tasks`, :mod:`.classifiers`.
"""

from .aux_loss import AuxiliaryLoss, cosine_loss
from .runner import SAECeption, SharpenConfig, Split
from .stats import ClassStats, class_masks, class_stats
from .targets import TARGETS, Target, example_targets, random_targets, targets, targets_reference

__all__ = [
    "TARGETS",
    "AuxiliaryLoss",
    "ClassStats",
    "SAECeption",
    "SharpenConfig",
    "Split",
    "Target",
    "class_masks",
    "class_stats",
    "cosine_loss",
    "example_targets",
    "random_targets",
    "targets",
    "targets_reference",
]
