"""Activation stores on disk: harvest activations once, train many SAEs on them.

:class:`StoreWriter` writes a store shard by shard (resumable, crash-safe; :func:`write_store` for in-memory
tensors), :class:`ActivationStore` reads it memory-mapped with hash checks, and :meth:`ActivationStore.batches`
streams shuffled batches with bounded memory (:class:`StoreBatches`). The format is in :mod:`.format`.
"""

from .batches import StoreBatches
from .format import (
    CHECKSUMS,
    EXTRA_DTYPES,
    FORMAT,
    MANIFEST,
    SINGLE_HOOK,
    STORE_DTYPES,
    VERIFY_MODES,
    VERSION,
    StoreError,
)
from .reader import ActivationStore
from .writer import StoreWriter, write_store

__all__ = [
    "CHECKSUMS",
    "EXTRA_DTYPES",
    "FORMAT",
    "MANIFEST",
    "SINGLE_HOOK",
    "STORE_DTYPES",
    "VERIFY_MODES",
    "VERSION",
    "ActivationStore",
    "StoreBatches",
    "StoreError",
    "StoreWriter",
    "write_store",
]
