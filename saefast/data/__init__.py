"""Activations in: hook points of a model, harvesting them into an on-disk store, text sources, the embedded
models, synthetic data with known features, and labelled text for probing and SCR. Nothing here imports the
models or the ops."""

from .harvest import TOKEN_IDS, harvest
from .hf import load_model
from .hooks import Capture, abbreviate_names, decoder_blocks, layer_hook, resolve_hooks
from .labelled import (
    PROBING_DATASETS,
    DatasetUnavailable,
    LabelledTexts,
    SpuriousTexts,
    probing_dataset,
    scr_dataset,
)
from .store import ActivationStore, StoreError, StoreWriter, write_store
from .text import pydoc_topics, text_source

__all__ = [
    "PROBING_DATASETS",
    "TOKEN_IDS",
    "ActivationStore",
    "Capture",
    "DatasetUnavailable",
    "LabelledTexts",
    "SpuriousTexts",
    "StoreError",
    "StoreWriter",
    "abbreviate_names",
    "decoder_blocks",
    "harvest",
    "layer_hook",
    "load_model",
    "probing_dataset",
    "pydoc_topics",
    "resolve_hooks",
    "scr_dataset",
    "text_source",
    "write_store",
]
