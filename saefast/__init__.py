"""saefast: kernel-backed training and application of ensembles of sparse autoencoders.

Public API::

    cfg = SAEConfig(d_in=64, n_latents=512, k=16, activation="topk")
    bag = Ensemble.bagging(cfg, members=4, seed=0)       # or Ensemble.boosting(...), SAE(cfg, seed=0)
    history = train(bag, batches, steps=200, lr=1e-3)
    x_hat, codes = bag.reconstruct(x), bag.encode(x)
    metrics = evaluate(bag, x)
    bag.save("ckpt/"); again = load("ckpt/")

    model, tokenizer = load_model("smollm2")              # embedded SmolLM2-135M, offline
    store = harvest(model, "acts/", "model.layers.15", tokens=100_000, tokenizer=tokenizer, texts=pydoc_topics())
    train(bag, store.batches(1024, epochs=None), steps=1000)

    stats = sharpen.class_stats(bag, labelled_batches)          # SAE-ception: (x, labels) batches
    t = sharpen.targets(bag, x, labels, sharpen.class_masks(stats, top_n=25))   # sharpened targets [N, d]
"""

from . import cpu, metrics, native, ops, ref, sharpen
from .checkpoint import CheckpointError, load, save
from .codes import SparseCodes
from .config import ACTIVATIONS, SAEConfig, TrainConfig
from .ensemble import Ensemble
from .evaluate import evaluate
from .harvest import harvest, layer_hook, resolve_hooks
from .hf import load_model
from .ops import use_backend
from .sae import SAE
from .store import ActivationStore, StoreError, StoreWriter, write_store
from .text import pydoc_topics, text_source
from .train import DataExhausted, train

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ActivationStore",
    "CheckpointError",
    "DataExhausted",
    "Ensemble",
    "SAE",
    "SAEConfig",
    "SparseCodes",
    "StoreError",
    "StoreWriter",
    "TrainConfig",
    "cpu",
    "evaluate",
    "harvest",
    "layer_hook",
    "load",
    "load_model",
    "metrics",
    "native",
    "ops",
    "pydoc_topics",
    "ref",
    "resolve_hooks",
    "save",
    "sharpen",
    "text_source",
    "train",
    "use_backend",
    "write_store",
]
