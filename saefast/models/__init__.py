"""The models: an :class:`SAE` and an :class:`Ensemble` (bagging, boosting), parameters stacked on a member axis.

:mod:`.dictionary` holds what both share (the stacked math and the training interface), :mod:`.checkpoint` their
files (:func:`save`, :func:`load`).
"""

from .checkpoint import CheckpointError, load, load_checkpoint, save, save_checkpoint
from .dictionary import ALL_MEMBERS, SparseDictionary, Stacked, StepTerms
from .ensemble import Ensemble
from .sae import SAE

__all__ = [
    "ALL_MEMBERS",
    "SAE",
    "CheckpointError",
    "Ensemble",
    "SparseDictionary",
    "Stacked",
    "StepTerms",
    "load",
    "load_checkpoint",
    "save",
    "save_checkpoint",
]
