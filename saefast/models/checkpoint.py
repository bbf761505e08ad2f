"""Checkpoints: a directory of safetensors weights + a JSON config, written atomically, never unpickled.

Layout of ``DIR/``:

* ``model.<hash>.safetensors`` — every parameter and buffer (``state_dict``), exact dtypes;
* ``optimizer.<hash>.safetensors`` + ``optimizer.<hash>.json`` — optional Adam state for resuming;
* ``config.json`` — written last: kind, :class:`SAEConfig`, members, combine, seed, chains and chain seeds
  (multi-chain boosting; absent in older checkpoints: one chain), training state and the name and SHA-256 of
  every other file, so a corrupt checkpoint is detected and named on load.

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed into place.
Data files carry their content hash in their name, so saving over an existing checkpoint never touches
the files the old ``config.json`` points at: a crash at any moment leaves the old checkpoint or the new
one, complete. Files no longer referenced are removed after the new ``config.json`` is in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..config import SAEConfig
from ..files import atomic_write_bytes, read_versioned_json, sha256_bytes
from .dictionary import SparseDictionary

FORMAT = "saefast-checkpoint"
VERSION = 1
MODEL = "model"
OPTIM_TENSORS = "optimizer"
OPTIM_META = "optimizer_meta"
SUFFIX = {MODEL: ".safetensors", OPTIM_TENSORS: ".safetensors", OPTIM_META: ".json"}
PREFIX = {MODEL: "model", OPTIM_TENSORS: "optimizer", OPTIM_META: "optimizer"}
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()})


def _optimizer_payload(state: dict[str, Any]) -> tuple[bytes, bytes]:
    """Split an optimizer ``state_dict`` into tensors (safetensors) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{slot}"] = value
            else:
                scalars.setdefault(str(index), {})[slot] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return _tensors_bytes(tensors), json.dumps(meta).encode()


def _optimizer_state(tensor_bytes: bytes, meta_bytes: bytes) -> dict[str, Any]:
    meta = json.loads(meta_bytes)
    state: dict[int, dict[str, Any]] = {}
    for key, value in st_load(tensor_bytes).items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    for group in meta["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    model: SparseDictionary,
    optimizer_state: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` (and optionally an optimizer ``state_dict`` and JSON-able ``train_state``) to ``path/``."""
    if type(model).checkpoint_kind is None:
        raise TypeError(f"{type(model).__name__} has no checkpoint kind; save an SAE or an Ensemble")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payloads = {MODEL: _tensors_bytes(model.state_dict())}
    if optimizer_state is not None:
        payloads[OPTIM_TENSORS], payloads[OPTIM_META] = _optimizer_payload(optimizer_state)
    files: dict[str, dict[str, str]] = {}
    for role, data in payloads.items():
        digest = sha256_bytes(data)
        name = f"{PREFIX[role]}.{digest[:16]}{SUFFIX[role]}"
        if not (path / name).is_file() or sha256_bytes((path / name).read_bytes()) != digest:
            atomic_write_bytes(path / name, data)
        files[role] = {"name": name, "sha256": digest}
    config = {
        "format": FORMAT,
        "version": VERSION,
        "kind": type(model).checkpoint_kind,
        "config": model.cfg.to_dict(),
        **model.checkpoint_fields(),
        "files": files,
        "train_state": train_state,
    }
    atomic_write_bytes(path / CONFIG_FILE, json.dumps(config, indent=2).encode())
    keep = {entry["name"] for entry in files.values()}
    for old in path.glob("*"):
        if old.name not in keep and old.name != CONFIG_FILE and old.name.startswith(("model.", "optimizer.")):
            old.unlink(missing_ok=True)


def _read_verified(path: Path, entry: dict[str, str]) -> bytes:
    """Bytes of the file described by ``entry`` (``{"name", "sha256"}``), checked against its hash."""
    name = entry["name"]
    file = path / name
    if "/" in name or "\\" in name or not file.is_file():
        raise CheckpointError(f"checkpoint {path}: missing file {name}")
    data = file.read_bytes()
    if sha256_bytes(data) != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {name} is corrupt (SHA-256 does not match config.json)")
    return data


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``path/config.json`` (format and version)."""
    return read_versioned_json(Path(path), CONFIG_FILE, FORMAT, VERSION, CheckpointError, "checkpoint")


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[SparseDictionary, dict[str, Any] | None, dict[str, Any] | None]:
    """Load ``(model, optimizer_state or None, train_state or None)`` from ``path/`` (model in eval mode)."""
    path = Path(path)
    config = read_config(path)
    try:
        cfg = SAEConfig.from_dict(config["config"])
        cls = SparseDictionary.class_of_kind(config["kind"])
        if cls is None:
            raise CheckpointError(f"checkpoint {path}: unknown kind {config['kind']!r}")
        try:
            model = cls.from_checkpoint_fields(cfg, config)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: {err}") from None
        files = config["files"]
        model_entry = files[MODEL]
        tensors = st_load(_read_verified(path, model_entry))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} lacks a field ({err})") from None
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path}: {model_entry['name']} is unreadable ({err})") from None
    expected = model.state_dict()
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"checkpoint {path}: the weights hold {sorted(tensors)}, expected {sorted(expected)}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(expected[name].shape)} {expected[name].dtype}"
            )
    model.load_state_dict(tensors)
    model.to(map_location)
    model.eval()
    optimizer_state = None
    if OPTIM_TENSORS in files and OPTIM_META in files:
        optimizer_state = _optimizer_state(
            _read_verified(path, files[OPTIM_TENSORS]), _read_verified(path, files[OPTIM_META])
        )
    return model, optimizer_state, config.get("train_state")


_EXPORTERS: list[Callable[..., None]] = []
"""The writer of foreign formats (:func:`saefast.formats.save`), registered by :mod:`saefast.formats` on import:
the models sit below the formats, so they reach it through this hook instead of an import."""


def register_exporter(exporter: Callable[..., None]) -> None:
    """Let ``model.save(path, format=...)`` write formats other than saefast's through ``exporter``."""
    _EXPORTERS[:] = [exporter]


class Checkpointable:
    """Adds :meth:`save` to a :class:`SparseDictionary` subclass."""

    def save(self, path: str | os.PathLike, format: str = "saefast", metadata: dict[str, Any] | None = None) -> None:
        """Write a checkpoint directory (safetensors weights + JSON config; see :func:`saefast.save`), or with
        ``format="saelens"`` / ``"sparsify"`` that library's folder (:func:`saefast.formats.save`, with
        ``metadata`` such as the model and hook names)."""
        if format == "saefast":
            save_checkpoint(path, self)
            return
        if not _EXPORTERS:
            raise ValueError(f"format {format!r} needs saefast.formats (import saefast first)")
        _EXPORTERS[0](self, path, format=format, metadata=metadata)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SparseDictionary:
    """Load an :class:`~saefast.SAE` or :class:`~saefast.Ensemble` saved with ``.save(path)`` (eval mode)."""
    return load_checkpoint(path, map_location)[0]


def save(model: SparseDictionary, path: str | os.PathLike) -> None:
    """Save ``model`` to the checkpoint directory ``path`` (see the module docstring)."""
    save_checkpoint(path, model)
