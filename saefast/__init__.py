"""saefast: kernel-backed training and application of ensembles of sparse autoencoders.

Public API::

    cfg = SAEConfig(d_in=64, n_latents=512, k=16, activation="topk")
    bag = Ensemble.bagging(cfg, members=4, seed=0)       # or Ensemble.boosting(...), SAE(cfg, seed=0)
    history = train(bag, batches, steps=200, lr=1e-3)
    x_hat, codes = bag.reconstruct(x), bag.encode(x)
    metrics = evaluate(bag, x)
    bag.save("ckpt/"); again = load("ckpt/")
"""

from . import metrics, ref
from .checkpoint import CheckpointError, load, save
from .codes import SparseCodes
from .config import ACTIVATIONS, SAEConfig, TrainConfig
from .ensemble import Ensemble
from .evaluate import evaluate
from .sae import SAE
from .train import DataExhausted, train

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "CheckpointError",
    "DataExhausted",
    "Ensemble",
    "SAE",
    "SAEConfig",
    "SparseCodes",
    "TrainConfig",
    "evaluate",
    "load",
    "metrics",
    "ref",
    "save",
    "train",
]
