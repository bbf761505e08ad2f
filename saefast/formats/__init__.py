"""Other libraries' SAE formats: load their SAEs into :class:`~saefast.SAE`, and export saefast's to theirs.

One module per format, each with ``detect(path) -> bool`` (are these its files?), ``load(path, map_location) ->
SAE``, and, where saefast can write the format, ``save(sae, path, metadata)``:

* ``saefast`` — saefast's own checkpoints (:mod:`saefast.models.checkpoint`);
* ``saelens`` — SAELens 6.x folders (``cfg.json`` + ``sae_weights.safetensors``): :mod:`.saelens`;
* ``sparsify`` — EleutherAI sparsify folders (``cfg.json`` + ``sae.safetensors``): :mod:`.sparsify`;
* ``dictionary_learning`` — ``ae.pt`` + ``config.json``: :mod:`.dictionary_learning`;
* ``openai`` — openai/sparse_autoencoder state dicts: :mod:`.openai`.

:func:`load` detects the format from the files; :func:`save` writes one. ``saefast.load`` is :func:`load`, and
``model.save(path, format=...)`` goes through :func:`save`.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..models import SparseDictionary
from ..models.checkpoint import CONFIG_FILE, register_exporter
from ..models.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..models.checkpoint import save as save_saefast
from ..models.sharded import MANIFEST, SHARDS_DIR
from ..models.sharded import load_latest as load_saefast

FORMATS = ("saefast", "saelens", "sparsify", "dictionary_learning", "openai")
"""Every format :func:`load` reads, in the order detection tries them."""

WRITABLE = ("saefast", "saelens", "sparsify")
"""The formats :func:`save` writes."""


class FormatError(ValueError):
    """A foreign SAE that cannot be read (or written) faithfully; the message names the file and the field."""


def _module(name: str) -> ModuleType | None:
    """The format's module (None for saefast's own, and for a format whose module is not there yet)."""
    if name == "saefast":
        return None
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            return None
        raise


def available_formats() -> list[str]:
    """The formats this installation reads."""
    return [name for name in FORMATS if name == "saefast" or _module(name) is not None]


def _saefast_evidence(path: Path) -> str:
    """How ``path`` looks as a saefast checkpoint: ``"checkpoint"`` (a ``config.json`` of our format, or the manifest
    of a distributed run's shards), ``"damaged"``
    (a ``config.json`` that is unreadable or of no other format's shape, or the ``model.<hash>.safetensors`` a
    config points to: the checkpoint reader then names the problem), else ``""``."""
    if not path.is_dir():
        return ""
    if (path / SHARDS_DIR / MANIFEST).is_file():  # a distributed run's sharded checkpoint
        return "checkpoint"
    if (path / CONFIG_FILE).is_file():
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return "damaged"
        if isinstance(config, dict) and config.get("format") == CHECKPOINT_FORMAT:
            return "checkpoint"
        if not isinstance(config, dict) or "trainer" not in config:  # dictionary_learning's has a "trainer"
            return "damaged"
    return "damaged" if any(path.glob("model.*.safetensors")) else ""


def detect_format(path: str | os.PathLike) -> str:
    """The format of the SAE at ``path`` (a directory, or a file for the single-file formats), from its files."""
    path = Path(path)
    if not path.exists():
        return "saefast"  # the checkpoint reader says there is nothing there
    evidence = _saefast_evidence(path)
    if evidence == "checkpoint":  # the common case, without importing the other formats' readers
        return "saefast"
    for name in FORMATS[1:]:
        module = _module(name)
        if module is not None and module.detect(path):
            return name
    if evidence:
        return "saefast"
    files = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    raise FormatError(f"{path} is not an SAE saefast can read: no saefast {CONFIG_FILE}, and none of the formats "
                      f"{', '.join(available_formats()[1:])} matches its files ({', '.join(files)})")


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", format: str | None = None,
         ) -> SparseDictionary:
    """Load the SAE or ensemble at ``path``: a saefast checkpoint, or another library's SAE (``format=None``
    detects which from the files). Foreign SAEs become an :class:`~saefast.SAE` whose ``reconstruct`` equals the
    original library's forward output."""
    name = detect_format(path) if format is None else format
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    if name == "saefast":
        return load_saefast(path, map_location)
    module = _module(name)
    if module is None:
        raise FormatError(f"reading the {name} format is not available in this version of saefast")
    return module.load(Path(path), map_location=map_location)


def save(model: SparseDictionary, path: str | os.PathLike, format: str = "saefast",
         metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` to ``path`` in ``format`` (``saefast``, or one of :data:`WRITABLE`'s foreign formats, with
    ``metadata`` such as the model and hook names those tools read)."""
    if format == "saefast":
        save_saefast(model, path)
        return
    if format not in WRITABLE:
        raise ValueError(f"cannot write format {format!r}; choose one of {', '.join(WRITABLE)}")
    module = _module(format)
    if module is None or not hasattr(module, "save"):
        raise FormatError(f"writing the {format} format is not available in this version of saefast")
    module.save(model, Path(path), metadata=metadata)


register_exporter(save)
