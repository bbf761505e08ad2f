"""Activations in: hook points of a model, harvesting them into an on-disk store, text sources, the embedded
models, and synthetic data with known features. Nothing here imports the models or the ops."""

from .harvest import TOKEN_IDS, harvest
from .hf import load_model
from .hooks import Capture, abbreviate_names, decoder_blocks, layer_hook, resolve_hooks
from .store import ActivationStore, StoreError, StoreWriter, write_store
from .text import pydoc_topics, text_source

__all__ = [
    "TOKEN_IDS",
    "ActivationStore",
    "Capture",
    "StoreError",
    "StoreWriter",
    "abbreviate_names",
    "decoder_blocks",
    "harvest",
    "layer_hook",
    "load_model",
    "pydoc_topics",
    "resolve_hooks",
    "text_source",
    "write_store",
]
