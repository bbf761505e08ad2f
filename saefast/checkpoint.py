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

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import SAEConfig
from .dictionary import SparseDictionary

FORMAT = "saefast-checkpoint"
VERSION = 1
MODEL = "model"
OPTIM_TENSORS = "optimizer"
OPTIM_META = "optimizer_meta"
SUFFIX = {MODEL: ".safetensors", OPTIM_TENSORS: ".safetensors", OPTIM_META: ".json"}
PREFIX = {MODEL: "model", OPTIM_TENSORS: "optimizer", OPTIM_META: "optimizer"}
CONFIG_FILE = "config.json"
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], T]) -> T:
    """Create ``path`` atomically: ``write(handle)`` fills a temp file in the same directory, which is fsynced and
    renamed over ``path`` (then the directory is fsynced). A crash leaves the old file or the new one, never a
    partial one; a leftover ``.<name>.*.tmp`` is the only trace. Returns what ``write`` returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return result


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    from .ensemble import Ensemble

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payloads = {MODEL: _tensors_bytes(model.state_dict())}
    if optimizer_state is not None:
        payloads[OPTIM_TENSORS], payloads[OPTIM_META] = _optimizer_payload(optimizer_state)
    files: dict[str, dict[str, str]] = {}
    for role, data in payloads.items():
        digest = _sha256(data)
        name = f"{PREFIX[role]}.{digest[:16]}{SUFFIX[role]}"
        if not (path / name).is_file() or _sha256((path / name).read_bytes()) != digest:
            atomic_write_bytes(path / name, data)
        files[role] = {"name": name, "sha256": digest}
    is_ensemble = isinstance(model, Ensemble)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "ensemble" if is_ensemble else "sae",
        "config": model.cfg.to_dict(),
        "members": model.members if is_ensemble else 1,
        "combine": model.combine if is_ensemble else None,
        "seed": model.seed,
        "chains": model.chains if is_ensemble else 1,
        "chain_seeds": list(model.chain_seeds) if is_ensemble else [model.seed],
        "decode_only": bool(getattr(model, "decode_only", False)),
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
    if _sha256(data) != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {name} is corrupt (SHA-256 does not match config.json)")
    return data


def read_versioned_json(
    root: Path, filename: str, fmt: str, version: int, error: type[Exception], what: str
) -> dict[str, Any]:
    """Parse ``root/filename``, a JSON object whose ``format`` is ``fmt`` and ``version`` is ``version``.

    Anything else (no directory, no file, bad JSON, another format or version) raises ``error`` naming
    ``what`` (e.g. "checkpoint", "activation store") and the path.
    """
    if not root.is_dir():
        raise error(f"no {what} at {root} (not a directory)")
    file = root / filename
    if not file.is_file():
        raise error(f"{what} {root}: missing {filename}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {root}: {filename} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{what} {root}: {filename} is not a saefast {what} file ({fmt})")
    if data.get("version") != version:
        raise error(f"{what} {root}: {filename} has unsupported version {data.get('version')!r}")
    return data


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``path/config.json``."""
    return read_versioned_json(Path(path), CONFIG_FILE, FORMAT, VERSION, CheckpointError, "checkpoint")


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[SparseDictionary, dict[str, Any] | None, dict[str, Any] | None]:
    """Load ``(model, optimizer_state or None, train_state or None)`` from ``path/`` (model in eval mode)."""
    from .ensemble import Ensemble
    from .sae import SAE

    path = Path(path)
    config = read_config(path)
    try:
        cfg = SAEConfig.from_dict(config["config"])
        if config["kind"] == "ensemble":
            chains = config.get("chains", 1)
            model: SparseDictionary = Ensemble(cfg, config["members"], config["combine"], seed=config["seed"],
                                               chains=chains)
            chain_seeds = config.get("chain_seeds", list(model.chain_seeds))
            if not isinstance(chain_seeds, list) or len(chain_seeds) != chains:
                raise CheckpointError(f"checkpoint {path}: chain_seeds {chain_seeds!r} do not match chains={chains}")
            model.chain_seeds = tuple(int(s) for s in chain_seeds)
        elif config["kind"] == "sae":
            model = SAE(cfg, seed=config["seed"])
            model.decode_only = bool(config.get("decode_only", False))
        else:
            raise CheckpointError(f"checkpoint {path}: unknown kind {config['kind']!r}")
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


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SparseDictionary:
    """Load an :class:`~saefast.SAE` or :class:`~saefast.Ensemble` saved with ``.save(path)`` (eval mode)."""
    return load_checkpoint(path, map_location)[0]


def save(model: SparseDictionary, path: str | os.PathLike) -> None:
    """Save ``model`` to the checkpoint directory ``path`` (see the module docstring)."""
    save_checkpoint(path, model)
