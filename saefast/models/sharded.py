"""Sharded checkpoints of a distributed run: one checkpoint per member shard plus a manifest, re-shardable on load.

Layout of ``DIR/shards/``:

* ``<tag>/shard-<s>/`` — an ordinary checkpoint (:mod:`.checkpoint`) of the members of shard ``s`` as a smaller
  model of the same kind, with its Adam state; ``<tag>`` is ``stage-<stage>-step-<step>``, so generations sort in
  training order;
* ``manifest.json`` — written last, by rank 0, once every shard of the generation is durable: the full model's
  kind, config and fields, the training state, and for each shard its directory, the full model's stacked indices
  it holds (in its own storage order) and the SHA-256 of its ``config.json`` (which itself hashes the shard's
  files). A ``kill -9`` of any rank while a generation is written leaves the previous manifest, and the
  generation it names, whole.

:func:`load_members` reads any stacked indices of the full model from the newest complete checkpoint — a manifest,
or a plain checkpoint in ``DIR`` (a single-process run's) — so a run resumes on any world size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ..files import atomic_write_bytes, read_versioned_json, sha256_bytes
from .checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint, read_config, save_checkpoint
from .dictionary import SparseDictionary

FORMAT = "saefast-sharded-checkpoint"
VERSION = 1
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"


def generation_tag(stage: int, step: int) -> str:
    """Directory name of the checkpoint taken at ``(stage, step)``; sorts in training order."""
    return f"stage-{stage:04d}-step-{step:09d}"


def shard_path(root: str | os.PathLike, tag: str, shard: int) -> Path:
    """Where shard ``shard`` of generation ``tag`` is written."""
    return Path(root) / SHARDS_DIR / tag / f"shard-{shard:04d}"


def write_shard(root: str | os.PathLike, tag: str, shard: int, model: SparseDictionary,
                optimizer_state: dict[str, Any] | None) -> None:
    """Write the members ``model`` holds as shard ``shard`` of generation ``tag`` (atomic, fsynced files)."""
    save_checkpoint(shard_path(root, tag, shard), model, optimizer_state)


def write_manifest(root: str | os.PathLike, tag: str, full: SparseDictionary, shards: list[list[int]],
                   train_state: dict[str, Any], layout: dict[str, int]) -> None:
    """Publish generation ``tag`` (rank 0, after every shard is durable): ``shards[s]`` lists the full model's
    stacked indices shard ``s`` holds, in its storage order. Then remove the older generations."""
    root = Path(root)
    entries = []
    for s, indices in enumerate(shards):
        config = shard_path(root, tag, s) / CONFIG_FILE
        if not config.is_file():
            raise CheckpointError(f"checkpoint {root}: shard {s} of {tag} was not written ({config} is missing)")
        entries.append({"path": str(shard_path(root, tag, s).relative_to(root)), "indices": list(indices),
                        "sha256": sha256_bytes(config.read_bytes())})
    manifest = {"format": FORMAT, "version": VERSION, "kind": type(full).checkpoint_kind,
                "config": full.cfg.to_dict(), **full.checkpoint_fields(), "tag": tag, "layout": layout,
                "shards": entries, "train_state": train_state}
    atomic_write_bytes(root / SHARDS_DIR / MANIFEST, json.dumps(manifest, indent=2).encode())
    for old in (root / SHARDS_DIR).iterdir():
        if old.is_dir() and old.name < tag:  # never a newer one: another rank may be writing it already
            shutil.rmtree(old, ignore_errors=True)


def remove_unpublished(root: str | os.PathLike) -> None:
    """Delete generations the manifest does not name (left by a run killed while writing them). Call it only while
    no rank writes (before training starts)."""
    directory = Path(root) / SHARDS_DIR
    if not directory.is_dir():
        return
    keep = read_manifest(root)["tag"] if (directory / MANIFEST).is_file() else None
    for old in directory.iterdir():
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``root/shards/manifest.json``."""
    return read_versioned_json(Path(root) / SHARDS_DIR, MANIFEST, FORMAT, VERSION, CheckpointError,
                               "sharded checkpoint")


def _progress(train_state: dict[str, Any] | None) -> tuple[int, int]:
    state = train_state or {}
    return int(state.get("stage", 0)), int(state.get("step", 0))


def newest(root: str | os.PathLike) -> str | None:
    """Which complete checkpoint in ``root`` is furthest in training: ``"sharded"`` (the manifest), ``"plain"``
    (``root/config.json``) or None. A tie goes to the plain one (a finished distributed run writes both)."""
    root = Path(root)
    plain = (root / CONFIG_FILE).is_file()
    sharded = (root / SHARDS_DIR / MANIFEST).is_file()
    if plain and sharded:
        plain_at = _progress(read_config(root).get("train_state"))
        sharded_at = _progress(read_manifest(root).get("train_state"))
        return "sharded" if sharded_at > plain_at else "plain"
    return "plain" if plain else "sharded" if sharded else None


def describe(root: str | os.PathLike) -> dict[str, Any]:
    """The newest checkpoint's description — the full model's ``kind``, ``config`` and fields, and its
    ``train_state`` — without reading any weights (CheckpointError when there is none)."""
    which = newest(root)
    if which is None:
        raise CheckpointError(f"{root} holds no checkpoint ({CONFIG_FILE} or {SHARDS_DIR}/{MANIFEST})")
    return read_config(root) if which == "plain" else read_manifest(root)


def _select(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return tensor.index_select(0, torch.tensor(rows, dtype=torch.long, device=tensor.device))


def _sources(root: Path, map_location: Any) -> tuple[dict[str, Any], list[tuple[list[int], SparseDictionary,
                                                                                   dict[str, Any] | None]]]:
    """(the full model's description, [(indices, shard model, shard optimizer state)]) of the newest checkpoint."""
    description = describe(root)
    if description["format"] != FORMAT:
        model, optimizer_state, train_state = load_checkpoint(root, map_location)
        description = {**read_config(root), "train_state": train_state}
        return description, [(list(range(model.n_stacked)), model, optimizer_state)]
    manifest = read_manifest(root)
    sources = []
    for entry in manifest["shards"]:
        path = root / entry["path"]
        config = path / CONFIG_FILE
        if not config.is_file() or sha256_bytes(config.read_bytes()) != entry["sha256"]:
            raise CheckpointError(f"sharded checkpoint {root}: {entry['path']} is missing or corrupt (its "
                                  f"{CONFIG_FILE} does not match the manifest)")
        model, optimizer_state, _ = load_checkpoint(path, map_location)
        sources.append(([int(i) for i in entry["indices"]], model, optimizer_state))
    return manifest, sources


def load_members(root: str | os.PathLike, indices: list[int], map_location: Any = "cpu",
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read the full model's stacked members ``indices`` (in that order) from the newest checkpoint in ``root``,
    however it was sharded: ``(description, state_dict, optimizer state)``. ``description`` holds the full model's
    ``kind``, ``config`` and fields and the ``train_state``; the optimizer state (None if a source lacks one) is
    Adam's, sliced the same way. A single SAE is never sharded: its one source is returned whole."""
    root = Path(root)
    description, sources = _sources(root, map_location)
    where: dict[int, tuple[int, int]] = {}
    for s, (held, _, _) in enumerate(sources):
        for position, index in enumerate(held):
            where[index] = (s, position)
    missing = [i for i in indices if i not in where]
    if missing:
        raise CheckpointError(f"checkpoint {root} holds no member(s) {missing}")
    stacked = sources[0][1].single_output is False
    if not stacked:
        return description, sources[0][1].state_dict(), sources[0][2]
    picks = [where[i] for i in indices]

    def gather(tensor_of) -> torch.Tensor:
        return torch.cat([_select(tensor_of(s), [p]) for s, p in picks])

    names = list(sources[0][1].state_dict())
    states = [model.state_dict() for _, model, _ in sources]
    state_dict = {name: gather(lambda s, name=name: states[s][name]) for name in names}
    optimizer_state = None
    if all(optim is not None for _, _, optim in sources):
        first = sources[0][2]
        merged: dict[int, dict[str, Any]] = {}
        for param, slots in first["state"].items():
            merged[param] = {}
            for slot, value in slots.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    merged[param][slot] = gather(lambda s, param=param, slot=slot: sources[s][2]["state"][param][slot])
                else:
                    merged[param][slot] = value  # Adam's step: one count for every member
        optimizer_state = {"state": merged, "param_groups": first["param_groups"]}
    return description, state_dict, optimizer_state


def load_latest(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SparseDictionary:
    """The full model of the newest checkpoint in ``path`` (plain or sharded; eval mode)."""
    path = Path(path)
    if newest(path) != "sharded":
        return load_checkpoint(path, map_location)[0]
    manifest = read_manifest(path)
    cls = SparseDictionary.class_of_kind(manifest["kind"])
    if cls is None:
        raise CheckpointError(f"sharded checkpoint {path}: unknown kind {manifest['kind']!r}")
    model = cls.from_checkpoint_fields(SAEConfig.from_dict(manifest["config"]), manifest)
    _, state_dict, _ = load_members(path, list(range(model.n_stacked)), map_location)
    model.load_state_dict(state_dict)
    model.to(map_location)
    model.eval()
    return model
