"""Writing an activation store shard by shard, resumable after a crash (:class:`StoreWriter`, :func:`write_store`).

Each shard's files are written atomically and made durable before the manifest lists them, so a crash at any
moment leaves a valid manifest describing whole shards; files it does not list are leftovers that the next
:class:`StoreWriter` on the directory removes.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...files import atomic_write_bytes, fsync_dir
from .format import (
    EXTRA_DTYPES,
    FORMAT,
    MANIFEST,
    SHARD_FILE,
    SINGLE_HOOK,
    STORE_DTYPES,
    VERSION,
    StoreError,
    check_files,
    dtype_name,
    dump_manifest,
    file_bases,
    is_count,
    jsonable,
    positive_int,
    read_manifest,
    settings_differences,
    write_npy,
)
from .reader import ActivationStore


class StoreWriter:
    """Write an activation store shard by shard; opening it on an existing store resumes that store.

    ``hooks`` maps hook names to their width ``d``; every :meth:`append` writes one shard holding the same
    ``n`` token rows for every hook (and every declared per-token ``extras`` column). Reopening an existing
    store requires the same hooks, dtype, extras and metadata (:class:`StoreError` says what differs), removes
    files the manifest does not list (half-written shards, temp files) and continues from :attr:`tokens` with
    :attr:`state` — whatever resume information the previous writer passed with its last shard.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        hooks: dict[str, int],
        dtype: torch.dtype = torch.bfloat16,
        extras: dict[str, torch.dtype] | None = None,
        metadata: dict | None = None,
    ):
        self.path = Path(path)
        if not isinstance(hooks, Mapping) or not hooks:
            raise ValueError("hooks must be a non-empty dict {hook name: d}")
        for name, d in hooks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"hook names must be non-empty strings, got {name!r}")
            if not is_count(d, 1):
                raise ValueError(f"hook {name!r}: d must be a positive integer, got {d!r}")
        if dtype not in STORE_DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype}")
        extras = {} if extras is None else extras
        if not isinstance(extras, Mapping):
            raise TypeError(f"extras must be a dict {{name: torch dtype}}, got {type(extras).__name__}")
        for name, extra_dtype in extras.items():
            if not isinstance(name, str) or not name or name in hooks:
                raise ValueError(f"extra names must be non-empty strings that are not hook names, got {name!r}")
            if extra_dtype not in EXTRA_DTYPES.values():
                raise ValueError(f"extra {name!r}: dtype must be one of {sorted(EXTRA_DTYPES)}, got {extra_dtype}")
        settings = {
            "dtype": dtype_name(dtype),
            "hooks": {name: {"d": int(d)} for name, d in hooks.items()},
            "extras": {name: dtype_name(dt) for name, dt in extras.items()},
            "metadata": jsonable({} if metadata is None else metadata, "metadata"),
        }
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"cannot write an activation store at {self.path}: it is not a directory")
        fresh = not (self.path / MANIFEST).exists()
        if fresh:
            self._manifest = {"format": FORMAT, "version": VERSION, **settings, "tokens": 0, "complete": False,
                              "state": {}, "shards": []}
        else:
            self._manifest = read_manifest(self.path)
            differs = settings_differences(self._manifest, settings)
            if differs:
                raise StoreError(f"activation store {self.path} was written with other settings; resume with the "
                                 f"same ones or use a new directory. " + "; ".join(differs))
            check_files(self.path, self._manifest)
        self.path.mkdir(parents=True, exist_ok=True)
        self._bases = file_bases([*settings["hooks"], *settings["extras"]])
        self._remove_unlisted()
        if fresh:
            atomic_write_bytes(self.path / MANIFEST, dump_manifest(self._manifest))

    def _remove_unlisted(self) -> None:
        # Only names this module writes: a stray README or user file in the directory is left alone.
        listed = {entry["file"] for shard in self._manifest["shards"] for entry in shard["files"].values()}
        for file in self.path.iterdir():
            ours = SHARD_FILE.match(file.name) or (file.name.startswith(".") and file.name.endswith(".tmp"))
            if ours and file.name not in listed and file.is_file():
                file.unlink(missing_ok=True)

    @property
    def tokens(self) -> int:
        """Tokens in the complete shards written so far (by this writer and earlier ones)."""
        return self._manifest["tokens"]

    @property
    def state(self) -> dict:
        """The ``state`` passed with the last appended shard (``{}`` for a new store)."""
        return copy.deepcopy(self._manifest["state"])

    @property
    def complete(self) -> bool:
        """Whether :meth:`finish` has marked the store complete."""
        return self._manifest["complete"]

    @property
    def n_shards(self) -> int:
        """Shards written so far."""
        return len(self._manifest["shards"])

    @property
    def hooks(self) -> dict[str, int]:
        """``{hook name: d}``."""
        return {name: spec["d"] for name, spec in self._manifest["hooks"].items()}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are stored in."""
        return STORE_DTYPES[self._manifest["dtype"]]

    @property
    def extras(self) -> dict[str, torch.dtype]:
        """``{extra name: dtype}``."""
        return {name: EXTRA_DTYPES[dt] for name, dt in self._manifest["extras"].items()}

    def append(
        self,
        activations: dict[str, torch.Tensor],
        extras: dict[str, torch.Tensor] | None = None,
        state: dict | None = None,
    ) -> None:
        """Write one shard: ``activations[hook]`` is ``[n, d_hook]``, ``extras[name]`` is ``[n]``, ``n > 0``.

        Activations may have any floating dtype and live on any device; they are converted to the store dtype
        and must be finite after conversion. Everything is checked before any file is written. ``state`` (a
        JSON-able dict, e.g. how far a harvest got) is stored with the shard and read back as :attr:`state`.
        """
        if self.complete:
            raise StoreError(f"activation store {self.path} is marked complete; it cannot be appended to")
        hooks, declared = self.hooks, self.extras
        extras = {} if extras is None else extras
        for what, given, expected in (("activations", activations, hooks), ("extras", extras, declared)):
            if not isinstance(given, Mapping):
                raise TypeError(f"{what} must be a dict {{name: tensor}}, got {type(given).__name__}")
            missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
            if missing or unknown:
                raise ValueError(f"{what} for activation store {self.path}: missing {missing}, unknown {unknown} "
                                 f"(the store has {sorted(expected)})")
        state = jsonable({} if state is None else state, "state")
        n = None
        for name, tensor in [*activations.items(), *extras.items()]:
            is_hook = name in hooks
            what = f"hook {name!r}" if is_hook else f"extra {name!r}"
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
            want = f"[n, {hooks[name]}]" if is_hook else "[n]"
            if tensor.dim() != (2 if is_hook else 1) or (is_hook and tensor.shape[1] != hooks[name]):
                raise ValueError(f"{what} must have shape {want}, got {tuple(tensor.shape)}")
            if is_hook and not tensor.is_floating_point():
                raise TypeError(f"{what} must have a floating dtype, got {tensor.dtype}")
            if n is None:
                n = tensor.shape[0]
            elif tensor.shape[0] != n:
                raise ValueError(f"{what} has {tensor.shape[0]} rows but the other tensors have {n}")
        if n == 0:
            raise ValueError("a shard must hold at least one token (got 0 rows)")
        arrays = {name: _activation_array(name, activations[name], self.dtype) for name in hooks}
        arrays.update({name: _extra_array(name, extras[name], dt) for name, dt in declared.items()})

        index = self.n_shards
        files: dict[str, dict[str, Any]] = {}
        try:
            for name, array in arrays.items():
                file = f"shard{index:05d}.{self._bases[name]}.npy"
                digest, fast, size = write_npy(self.path / file, array)
                files[name] = {"file": file, "sha256": digest, "xxh3_128": fast, "bytes": size}
            fsync_dir(self.path)  # the shard files' renames are durable before the manifest lists them
        except BaseException:
            for entry in files.values():
                (self.path / entry["file"]).unlink(missing_ok=True)
            raise
        manifest = dict(self._manifest, tokens=self.tokens + n, state=state,
                        shards=[*self._manifest["shards"], {"index": index, "tokens": n, "files": files}])
        atomic_write_bytes(self.path / MANIFEST, dump_manifest(manifest))
        self._manifest = manifest

    def finish(self) -> None:
        """Mark the store complete (readers see ``complete=True``; further appends raise :class:`StoreError`)."""
        manifest = dict(self._manifest, complete=True)
        atomic_write_bytes(self.path / MANIFEST, dump_manifest(manifest))
        self._manifest = manifest

    def __repr__(self) -> str:
        return (f"StoreWriter({str(self.path)!r}, tokens={self.tokens}, shards={self.n_shards}, "
                f"complete={self.complete})")


def _activation_array(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``tensor`` converted to the store dtype, checked finite (NaN/Inf or overflow), as a CPU numpy array."""
    converted = tensor.detach().to(dtype)
    finite = torch.isfinite(converted)
    if not bool(finite.all()):
        bad = int((~finite).any(-1).sum())
        if bool(torch.isfinite(tensor).all()):
            raise ValueError(f"hook {name!r}: {bad} of {tensor.shape[0]} rows overflow {dtype} "
                             f"(max |x| = {float(tensor.abs().max()):.3g}); store as float32")
        raise ValueError(f"hook {name!r} contains NaN or Inf values (in {bad} of {tensor.shape[0]} rows)")
    converted = converted.cpu().contiguous()
    if dtype == torch.bfloat16:
        return converted.view(torch.int16).numpy().view(np.uint16)
    return converted.numpy()


def _extra_array(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """An extra column in its declared dtype; integer columns must convert exactly (no float, no overflow)."""
    tensor = tensor.detach()
    if not dtype.is_floating_point:
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"extra {name!r} is declared {dtype} but was given {tensor.dtype} values")
        if not torch.equal(tensor.to(dtype).to(tensor.dtype), tensor):
            raise ValueError(f"extra {name!r}: some values do not fit in its declared dtype {dtype}")
    return tensor.to(dtype).cpu().contiguous().numpy()


def write_store(
    path: str | os.PathLike,
    x: torch.Tensor | dict[str, torch.Tensor],
    shard_tokens: int = 65536,
    dtype: torch.dtype | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> ActivationStore:
    """Write in-memory activations to a complete store at ``path`` and open it (on the first hook).

    ``x`` is ``[n, d]`` (stored under the hook name ``"activations"``) or ``{hook: [n, d_hook]}``; ``extras``
    are ``{name: [n]}`` columns stored in their own dtype. ``dtype`` is the storage dtype of the activations
    (bfloat16, float16 or float32); None keeps the input's (float64 is stored as float32, the widest a store
    holds; hooks of different dtypes are stored in their promoted dtype), so nothing is rounded unless asked.
    Every value is checked before anything is written.
    A directory that already holds a store raises :class:`StoreError` unless ``overwrite=True``.
    """
    acts = {SINGLE_HOOK: x} if isinstance(x, torch.Tensor) else x
    if not isinstance(acts, Mapping) or not acts:
        raise TypeError("x must be a [n, d] tensor or a non-empty dict {hook name: [n, d] tensor}")
    extras = {} if extras is None else extras
    if not isinstance(extras, Mapping):
        raise TypeError(f"extras must be a dict {{name: [n] tensor}}, got {type(extras).__name__}")
    shard_tokens = positive_int(shard_tokens, "shard_tokens")
    hooks = {}
    for name, tensor in acts.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"hook {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"hook {name!r} must have shape [n, d], got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"hook {name!r} must have a floating dtype, got {tensor.dtype}")
        hooks[name] = tensor.shape[1]
    for name, tensor in extras.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"extra {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1 or tensor.dtype not in EXTRA_DTYPES.values():
            raise ValueError(f"extra {name!r} must be a [n] tensor of one of {sorted(EXTRA_DTYPES)}, "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
    if dtype is None:
        dtype = functools.reduce(torch.promote_types, (tensor.dtype for tensor in acts.values()))
        dtype = torch.float32 if dtype == torch.float64 else dtype
    if dtype not in STORE_DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype}")
    n = next(iter(acts.values())).shape[0]
    for name, tensor in [*acts.items(), *extras.items()]:
        if tensor.shape[0] != n:
            raise ValueError(f"{name!r} has {tensor.shape[0]} rows but the first hook has {n}")
    if n == 0:
        raise ValueError("x holds no tokens (0 rows)")
    root = Path(path)
    if (root / MANIFEST).exists() and not overwrite:
        raise StoreError(f"{root} already holds an activation store; pass overwrite=True to replace it")
    # The writer checks each shard before writing it; checking every shard first keeps a bad value from
    # leaving a half-written store behind.
    for start in range(0, n, shard_tokens):
        for name, tensor in acts.items():
            _activation_array(name, tensor[start : start + shard_tokens], dtype)
    if overwrite:
        (root / MANIFEST).unlink(missing_ok=True)  # the writer then removes the old shard files
    writer = StoreWriter(root, hooks, dtype, {name: t.dtype for name, t in extras.items()}, metadata)
    for start in range(0, n, shard_tokens):
        stop = min(n, start + shard_tokens)
        writer.append({name: t[start:stop] for name, t in acts.items()},
                      {name: t[start:stop] for name, t in extras.items()})
    writer.finish()
    return ActivationStore(root, hook=next(iter(acts)))

