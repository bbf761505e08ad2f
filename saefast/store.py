"""Activation stores on disk: harvest activations once, train many SAEs on them.

A store is a directory:

* ``shardNNNNN.<name>.npy`` — one plain ``.npy`` file per shard and per hook point (``[n_i, d_hook]``) or per-token
  extra column (``[n_i]``), so every shard can be memory-mapped; bfloat16 is stored as its uint16 bits.
* ``manifest.json`` — format, version, dtype, hooks, extras, the writer's metadata, the token count, the
  ``complete`` flag, the writer's resume ``state`` and, per shard, its token count and the name, SHA-256 and size
  of each of its files. It is rewritten atomically after every shard, and only once the shard's files are durable.

A crash at any moment therefore leaves a valid manifest describing whole shards; files it does not list are
leftovers that the next :class:`StoreWriter` on the directory removes. :class:`ActivationStore` checks the
manifest and every file's size and ``.npy`` header on open, and SHA-256 hashes eagerly, lazily (the first time
a file is touched) or not at all. :meth:`ActivationStore.batches` streams shuffled batches with bounded memory
from a background thread, ready for :func:`saefast.train`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write, atomic_write_bytes, read_versioned_json

FORMAT = "saefast-activations"
VERSION = 1
MANIFEST = "manifest.json"
VERIFY_MODES = ("eager", "lazy", "none")
STORE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXTRA_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
}
SINGLE_HOOK = "activations"
"""Hook name :func:`write_store` uses when it is given one tensor."""

_MAX_OPEN_MAPS = 64  # every memmap holds a file descriptor: keep at most this many open per store
_HASH_CHUNK = 1 << 24
_WRITE_CHUNK = 1 << 26
_SHARD_FILE = re.compile(r"^shard\d+\..+\.npy$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PUT_POLL_S = 0.05


class StoreError(ValueError):
    """An activation store is missing, corrupt, or does not match what was asked of it."""


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The dtype a column is stored as on disk (bfloat16, which numpy lacks, as its uint16 bits)."""
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)
    return torch.empty(0, dtype=dtype).numpy().dtype


def _to_torch(array: np.ndarray, stored: torch.dtype) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, reinterpreted as ``stored`` (uint16 bits → bfloat16)."""
    if stored == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value.__index__())


def _positive(value: Any, what: str) -> int:
    value = _index(value, what)
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def _jsonable(value: Any, what: str) -> dict:
    """``value`` (a dict) as it will read back from JSON, so comparisons and ``state`` are JSON-exact."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serializable ({err})") from None


def _file_bases(names: Sequence[str]) -> dict[str, str]:
    """A file-name-safe, unique (even case-insensitively) base for every hook/extra name."""
    bases = {}
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".")[:80]
        bases[name] = base or "_"
    taken: dict[str, int] = {}
    for base in bases.values():
        taken[base.lower()] = taken.get(base.lower(), 0) + 1
    # '~' never survives sanitizing, so a suffixed base cannot equal any other base.
    return {
        name: base if taken[base.lower()] == 1 else f"{base}~{hashlib.sha256(name.encode()).hexdigest()[:10]}"
        for name, base in bases.items()
    }


def _sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: Path, array: np.ndarray) -> tuple[str, int]:
    """Write ``array`` as ``.npy`` atomically (temp, fsync, rename); SHA-256 and size of the bytes written."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    digest = hashlib.sha256(header.getvalue())

    def write(handle) -> None:
        handle.write(header.getvalue())
        for start in range(0, data.size, _WRITE_CHUNK):  # hash what is written, chunk by chunk
            chunk = memoryview(data[start : start + _WRITE_CHUNK])
            digest.update(chunk)
            handle.write(chunk)

    atomic_write(path, write)
    return digest.hexdigest(), len(header.getvalue()) + data.size


def _npy_header(file: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` from an ``.npy`` file's header."""
    with open(file, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, fortran, dtype, handle.tell()


# ------------------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------------------


def _read_manifest(root: Path) -> dict[str, Any]:
    """Parse ``root/manifest.json`` and check every field; :class:`StoreError` names the first bad one."""
    manifest = read_versioned_json(root, MANIFEST, FORMAT, VERSION, StoreError, "activation store")

    def expect(ok: bool, field: str, want: str, value: Any) -> None:
        if not ok:
            raise StoreError(f"activation store {root}: {MANIFEST} field {field} must be {want}, got {value!r}")

    for key in ("dtype", "hooks", "extras", "metadata", "tokens", "complete", "state", "shards"):
        expect(key in manifest, key, "present", None)
    expect(manifest["dtype"] in STORE_DTYPES, "dtype", f"one of {sorted(STORE_DTYPES)}", manifest["dtype"])
    hooks, extras = manifest["hooks"], manifest["extras"]
    expect(isinstance(hooks, dict) and len(hooks) > 0, "hooks", "a non-empty object", hooks)
    for name, spec in hooks.items():
        d = spec.get("d") if isinstance(spec, dict) else None
        expect(_is_count(d, 1), f"hooks[{name!r}].d", "a positive integer", d)
    expect(isinstance(extras, dict), "extras", "an object", extras)
    for name, dtype in extras.items():
        expect(dtype in EXTRA_DTYPES and name not in hooks, f"extras[{name!r}]",
               f"one of {sorted(EXTRA_DTYPES)} (and not a hook name)", dtype)
    for key, kind in (("metadata", dict), ("state", dict), ("complete", bool), ("shards", list)):
        expect(isinstance(manifest[key], kind), key, f"a {kind.__name__}", manifest[key])
    expect(_is_count(manifest["tokens"]), "tokens", "a non-negative integer", manifest["tokens"])
    names = set(hooks) | set(extras)
    seen_files: set[str] = set()
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        expect(isinstance(shard, dict), where, "an object", shard)
        expect(shard.get("index") == i, f"{where}.index", str(i), shard.get("index"))
        expect(_is_count(shard.get("tokens"), 1), f"{where}.tokens", "a positive integer", shard.get("tokens"))
        files = shard.get("files")
        expect(isinstance(files, dict) and set(files) == names, f"{where}.files",
               f"an object with one entry per hook and extra {sorted(names)}", files)
        for name, entry in files.items():
            field = f"{where}.files[{name!r}]"
            expect(isinstance(entry, dict), field, "an object", entry)
            file_name = entry.get("file")
            safe = (isinstance(file_name, str) and file_name == Path(file_name).name and "\\" not in file_name
                    and not file_name.startswith(".") and file_name not in seen_files)
            expect(safe, f"{field}.file", "a unique plain file name", file_name)
            seen_files.add(file_name)
            sha = entry.get("sha256")
            expect(isinstance(sha, str) and _SHA256.match(sha) is not None, f"{field}.sha256", "a SHA-256 hex", sha)
            expect(_is_count(entry.get("bytes")), f"{field}.bytes", "a non-negative integer", entry.get("bytes"))
        total += shard["tokens"]
    expect(manifest["tokens"] == total, "tokens", f"the sum of the shard tokens ({total})", manifest["tokens"])
    return manifest


def _check_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists, has its listed size and an ``.npy`` header of the listed shape and dtype."""
    dims = {name: (spec["d"],) for name, spec in manifest["hooks"].items()}
    dims.update({name: () for name in manifest["extras"]})
    dtypes = {name: _numpy_dtype(STORE_DTYPES[manifest["dtype"]]) for name in manifest["hooks"]}
    dtypes.update({name: _numpy_dtype(EXTRA_DTYPES[dt]) for name, dt in manifest["extras"].items()})
    for shard in manifest["shards"]:
        for name, entry in shard["files"].items():
            file = root / entry["file"]
            if not file.is_file():
                raise StoreError(f"activation store {root}: {entry['file']} (listed in {MANIFEST}) is missing")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise StoreError(f"activation store {root}: {entry['file']} is {size} bytes but {MANIFEST} lists "
                                 f"{entry['bytes']} (truncated or overwritten)")
            try:
                shape, fortran, dtype, offset = _npy_header(file)
            except (ValueError, OSError, SyntaxError) as err:
                raise StoreError(f"activation store {root}: {entry['file']} has no valid .npy header ({err})") from None
            want = (shard["tokens"], *dims[name])
            if shape != want or dtype != dtypes[name] or fortran:
                raise StoreError(f"activation store {root}: {entry['file']} holds a {shape} {dtype} array, "
                                 f"{MANIFEST} says {want} {dtypes[name]}")
            if offset + int(np.prod(shape)) * dtype.itemsize != size:
                raise StoreError(f"activation store {root}: {entry['file']} has {size - offset} data bytes, "
                                 f"its header needs {int(np.prod(shape)) * dtype.itemsize}")


def _differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """The leaves where ``wanted`` differs from ``stored`` (dotted keys), so a refusal names what changed."""
    out = []
    for key in sorted(set(stored) | set(wanted) if prefix else wanted):
        name = f"{prefix}{key}"
        have, want = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(have, dict) and isinstance(want, dict):
            out += _differences(have, want, f"{name}.")
        elif have != want:
            out.append(f"{name}: the store has {have!r}, this writer {want!r}")
    return out


def _dump(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()


# ------------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------------


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
            if not _is_count(d, 1):
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
            "dtype": _dtype_name(dtype),
            "hooks": {name: {"d": int(d)} for name, d in hooks.items()},
            "extras": {name: _dtype_name(dt) for name, dt in extras.items()},
            "metadata": _jsonable({} if metadata is None else metadata, "metadata"),
        }
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"cannot write an activation store at {self.path}: it is not a directory")
        fresh = not (self.path / MANIFEST).exists()
        if fresh:
            self._manifest = {"format": FORMAT, "version": VERSION, **settings, "tokens": 0, "complete": False,
                              "state": {}, "shards": []}
        else:
            self._manifest = _read_manifest(self.path)
            differs = _differences(self._manifest, settings)
            if differs:
                raise StoreError(f"activation store {self.path} was written with other settings; resume with the "
                                 f"same ones or use a new directory. " + "; ".join(differs))
            _check_files(self.path, self._manifest)
        self.path.mkdir(parents=True, exist_ok=True)
        self._bases = _file_bases([*settings["hooks"], *settings["extras"]])
        self._remove_unlisted()
        if fresh:
            atomic_write_bytes(self.path / MANIFEST, _dump(self._manifest))

    def _remove_unlisted(self) -> None:
        # Only names this module writes: a stray README or user file in the directory is left alone.
        listed = {entry["file"] for shard in self._manifest["shards"] for entry in shard["files"].values()}
        for file in self.path.iterdir():
            ours = _SHARD_FILE.match(file.name) or (file.name.startswith(".") and file.name.endswith(".tmp"))
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
        state = _jsonable({} if state is None else state, "state")
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
                digest, size = _write_npy(self.path / file, array)
                files[name] = {"file": file, "sha256": digest, "bytes": size}
            _fsync_dir(self.path)  # the shard files' renames are durable before the manifest lists them
        except BaseException:
            for entry in files.values():
                (self.path / entry["file"]).unlink(missing_ok=True)
            raise
        manifest = dict(self._manifest, tokens=self.tokens + n, state=state,
                        shards=[*self._manifest["shards"], {"index": index, "tokens": n, "files": files}])
        atomic_write_bytes(self.path / MANIFEST, _dump(manifest))
        self._manifest = manifest

    def finish(self) -> None:
        """Mark the store complete (readers see ``complete=True``; further appends raise :class:`StoreError`)."""
        manifest = dict(self._manifest, complete=True)
        atomic_write_bytes(self.path / MANIFEST, _dump(manifest))
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
    dtype: torch.dtype = torch.bfloat16,
    extras: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> ActivationStore:
    """Write in-memory activations to a complete store at ``path`` and open it (on the first hook).

    ``x`` is ``[n, d]`` (stored under the hook name ``"activations"``) or ``{hook: [n, d_hook]}``; ``extras``
    are ``{name: [n]}`` columns stored in their own dtype. Every value is checked before anything is written.
    A directory that already holds a store raises :class:`StoreError` unless ``overwrite=True``.
    """
    acts = {SINGLE_HOOK: x} if isinstance(x, torch.Tensor) else x
    if not isinstance(acts, Mapping) or not acts:
        raise TypeError("x must be a [n, d] tensor or a non-empty dict {hook name: [n, d] tensor}")
    extras = {} if extras is None else extras
    if not isinstance(extras, Mapping):
        raise TypeError(f"extras must be a dict {{name: [n] tensor}}, got {type(extras).__name__}")
    shard_tokens = _positive(shard_tokens, "shard_tokens")
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


# ------------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------------


class _Shards:
    """The files of one opened store, shared by its subset views: memmaps (LRU-bounded) and hash checks."""

    def __init__(self, root: Path, manifest: dict[str, Any], verify: str):
        self.root = root
        self.manifest = manifest
        self.verify = verify
        self.offsets = np.cumsum([0] + [shard["tokens"] for shard in manifest["shards"]]).astype(np.int64)
        self.verified: set[str] = set()
        self.maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()
        self.hash_lock = threading.Lock()

    def check(self, entry: dict[str, Any]) -> None:
        """Hash the file of ``entry`` once; :class:`StoreError` naming it if it does not match."""
        file = entry["file"]
        with self.hash_lock:
            if file in self.verified:
                return
            try:
                digest = _sha256_file(self.root / file)
            except OSError as err:
                raise StoreError(f"activation store {self.root}: cannot read {file} ({err})") from None
            if digest != entry["sha256"]:
                raise StoreError(f"activation store {self.root}: {file} is corrupt "
                                 f"(its SHA-256 does not match {MANIFEST})")
            self.verified.add(file)

    def check_all(self) -> None:
        for shard in self.manifest["shards"]:
            for entry in shard["files"].values():
                self.check(entry)

    def array(self, shard: int, name: str) -> np.ndarray:
        """The memory-mapped ``.npy`` of column ``name`` in ``shard`` (hash-checked first when lazy)."""
        entry = self.manifest["shards"][shard]["files"][name]
        file = entry["file"]
        if self.verify == "lazy" and file not in self.verified:
            self.check(entry)
        with self.lock:
            if file in self.maps:
                self.maps.move_to_end(file)
                return self.maps[file]
        try:
            mapped = np.load(self.root / file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise StoreError(f"activation store {self.root}: cannot map {file} ({err})") from None
        with self.lock:
            self.maps[file] = mapped
            while len(self.maps) > _MAX_OPEN_MAPS:
                self.maps.popitem(last=False)
        return mapped

    def gather(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Copy absolute rows ``[start, stop)`` of column ``name`` (across shards) into ``out``."""
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = 0
        while start < stop:
            base = int(self.offsets[shard])
            end = min(stop, int(self.offsets[shard + 1]))
            out[pos : pos + end - start] = self.array(shard, name)[start - base : end - base]
            pos += end - start
            start = end
            shard += 1


class ActivationStore:
    """A read-only, memory-mapped view of an activation store written by :class:`StoreWriter`.

    Opening checks the manifest and every file's size and ``.npy`` header (:class:`StoreError` names the
    problem and the file). ``hook`` picks the hook point to read (optional when the store has one).
    ``verify``: ``"eager"`` hashes every file now, ``"lazy"`` hashes each file the first time this reader (or
    its prefetch thread) touches it, ``"none"`` trusts the files. Row indices are relative to the view:
    :meth:`subset` gives a view on a row range that every method respects.
    """

    def __init__(self, path: str | os.PathLike, hook: str | None = None, verify: str = "lazy"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        root = Path(path)
        manifest = _read_manifest(root)
        _check_files(root, manifest)
        hooks = list(manifest["hooks"])
        if hook is None:
            if len(hooks) != 1:
                raise StoreError(f"activation store {root} holds several hooks {hooks}: pass hook=<one of them>")
            hook = hooks[0]
        elif hook not in manifest["hooks"]:
            raise StoreError(f"activation store {root} has no hook {hook!r}; it holds {hooks}")
        self._shared = _Shards(root, manifest, verify)
        if verify == "eager":
            self._shared.check_all()
        self._hook = hook
        self._start, self._stop = 0, manifest["tokens"]

    # -- properties ------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._shared.root

    @property
    def hook(self) -> str:
        """The hook point this reader reads."""
        return self._hook

    @property
    def hooks(self) -> dict[str, int]:
        """Every hook point in the store, ``{name: d}``."""
        return {name: spec["d"] for name, spec in self._shared.manifest["hooks"].items()}

    @property
    def d(self) -> int:
        """Width of :attr:`hook`'s activations."""
        return self._shared.manifest["hooks"][self._hook]["d"]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are stored in."""
        return STORE_DTYPES[self._shared.manifest["dtype"]]

    @property
    def n_tokens(self) -> int:
        """Rows in this view (``len(store)``)."""
        return self._stop - self._start

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def metadata(self) -> dict:
        """The writer's metadata (a copy)."""
        return copy.deepcopy(self._shared.manifest["metadata"])

    @property
    def state(self) -> dict:
        """The resume state stored with the last shard (a copy)."""
        return copy.deepcopy(self._shared.manifest["state"])

    @property
    def complete(self) -> bool:
        """Whether the writer finished the store (an incomplete one is a harvest still running or cut off)."""
        return self._shared.manifest["complete"]

    @property
    def extras(self) -> tuple[str, ...]:
        """Names of the per-token extra columns."""
        return tuple(self._shared.manifest["extras"])

    @property
    def extra_dtypes(self) -> dict[str, torch.dtype]:
        """``{extra name: dtype}``."""
        return {name: EXTRA_DTYPES[dt] for name, dt in self._shared.manifest["extras"].items()}

    @property
    def n_shards(self) -> int:
        """Shards holding rows of this view."""
        if self.n_tokens == 0:
            return 0
        offsets = self._shared.offsets
        first = int(np.searchsorted(offsets, self._start, side="right")) - 1
        last = int(np.searchsorted(offsets, self._stop - 1, side="right")) - 1
        return last - first + 1

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, hook={self.hook!r}, d={self.d}, tokens={self.n_tokens}, "
                f"dtype={_dtype_name(self.dtype)}, complete={self.complete})")

    # -- reading ---------------------------------------------------------------------------------------

    def _range(self, start: Any, stop: Any) -> tuple[int, int]:
        start, stop = _index(start, "start"), _index(stop, "stop")
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) are outside the store's [0, {self.n_tokens})")
        return self._start + start, self._start + stop

    def _column(self, name: str) -> tuple[tuple[int, ...], np.dtype, torch.dtype]:
        """Row shape, on-disk numpy dtype and torch dtype of column ``name`` (the hook or an extra)."""
        if name == self._hook:
            return (self.d,), _numpy_dtype(self.dtype), self.dtype
        dtype = self.extra_dtypes[name]
        return (), _numpy_dtype(dtype), dtype

    def _check_extra(self, name: str) -> None:
        if name not in self.extra_dtypes:
            raise StoreError(f"activation store {self.path} has no extra {name!r}; it has {list(self.extras)}")

    def read(self, start: int, stop: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Rows ``[start, stop)`` of :attr:`hook` as a ``[stop − start, d]`` tensor (``dtype=None``: stored)."""
        _check_out_dtype(dtype)
        start, stop = self._range(start, stop)
        out = np.empty((stop - start, self.d), dtype=_numpy_dtype(self.dtype))
        self._shared.gather(self._hook, start, stop, out)
        x = _to_torch(out, self.dtype)
        return x if dtype is None else x.to(dtype)

    def read_extra(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the extra column ``name``, in its stored dtype."""
        self._check_extra(name)
        start, stop = self._range(start, stop)
        _, np_dtype, dtype = self._column(name)
        out = np.empty(stop - start, dtype=np_dtype)
        self._shared.gather(name, start, stop, out)
        return torch.from_numpy(out)

    def subset(self, start: int, stop: int) -> ActivationStore:
        """A view on rows ``[start, stop)`` of this one (e.g. a train / held-out split); shares open files."""
        start, stop = self._range(start, stop)
        view = object.__new__(ActivationStore)
        view._shared, view._hook = self._shared, self._hook
        view._start, view._stop = start, stop
        return view

    def with_hook(self, hook: str) -> ActivationStore:
        """The same view reading another hook point of the store."""
        if hook not in self.hooks:
            raise StoreError(f"activation store {self.path} has no hook {hook!r}; it holds {list(self.hooks)}")
        view = self.subset(0, self.n_tokens)
        view._hook = hook
        return view

    def verify(self) -> None:
        """Hash every file of the store now (whatever the ``verify`` mode); :class:`StoreError` names a bad one."""
        self._shared.check_all()

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        shuffle_buffer: int = 1 << 18,
        block_rows: int = 4096,
        prefetch: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = torch.float32,
        extras: Sequence[str] = (),
        drop_last: bool = False,
    ) -> StoreBatches:
        """Batches of this view for training: a re-iterable :class:`StoreBatches`, one epoch per ``iter()``.

        Shuffling keeps memory bounded: each shard is cut into contiguous blocks of ``block_rows`` rows, the
        block order is shuffled, blocks are read into a buffer of at most ``shuffle_buffer`` rows and the rows
        of the buffer are shuffled; every row appears exactly once per epoch. Epoch ``e`` depends only on
        ``(seed, e)``. ``extras`` names per-token columns to return alongside: batches are then tuples
        ``(x, extra_1, ...)``, aligned row by row. Reading runs ``prefetch`` batches ahead in a background
        thread; with a CUDA ``device`` batches arrive there (copied from pinned memory, converted on the GPU).
        """
        return StoreBatches(self, batch_size, shuffle=shuffle, seed=seed, epochs=epochs,
                            shuffle_buffer=shuffle_buffer, block_rows=block_rows, prefetch=prefetch, device=device,
                            dtype=dtype, extras=extras, drop_last=drop_last)


def _check_out_dtype(dtype: Any) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype (or None for the stored one), got {dtype!r}")


# ------------------------------------------------------------------------------------------------------
# Shuffled batches
# ------------------------------------------------------------------------------------------------------


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone (``stop``); True when it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_PUT_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class StoreBatches:
    """Re-iterable batches from an :class:`ActivationStore`: each ``iter()`` yields the next epoch.

    The object counts epochs itself (:attr:`epoch` is the next one); after ``epochs`` epochs ``iter()`` yields
    nothing (``epochs=None``: unlimited). ``len()`` is the number of batches per epoch. :meth:`iter_epoch`
    replays any epoch without moving the counter. See :meth:`ActivationStore.batches` for the parameters.
    """

    def __init__(self, store: ActivationStore, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = 1, shuffle_buffer: int = 1 << 18, block_rows: int = 4096, prefetch: int = 4,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = torch.float32,
                 extras: Sequence[str] = (), drop_last: bool = False):
        self.batch_size = _positive(batch_size, "batch_size")
        self.shuffle_buffer = _positive(shuffle_buffer, "shuffle_buffer")
        self.block_rows = _positive(block_rows, "block_rows")
        self.prefetch = _positive(prefetch, "prefetch")
        self.epochs = None if epochs is None else _positive(epochs, "epochs")
        self.seed = _index(seed, "seed")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _check_out_dtype(dtype)
        extras = (extras,) if isinstance(extras, str) else tuple(extras)
        for name in extras:
            store._check_extra(name)
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} was asked for but CUDA is not available")
        if len(store) == 0:
            raise ValueError(f"activation store {store.path}: the view holds no tokens to batch")
        self.store, self.shuffle, self.dtype, self.extras = store, bool(shuffle), dtype, extras
        self.drop_last = bool(drop_last)
        self.epoch = 0
        if self.drop_last and len(store) < self.batch_size:
            raise ValueError(f"drop_last with batch_size={self.batch_size} leaves no batch of the {len(store)} rows")
        self._cuda = self.device is not None and self.device.type == "cuda"
        # Blocks never cross a shard boundary (one contiguous memmap slice each) nor exceed the buffer.
        block = min(self.block_rows, self.shuffle_buffer)
        offsets, start, stop = store._shared.offsets, store._start, store._stop
        shards, starts, lengths = [], [], []
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        for shard in range(first, len(offsets) - 1):
            lo, hi = max(start, int(offsets[shard])), min(stop, int(offsets[shard + 1]))
            if lo >= hi:
                break
            begin = np.arange(lo, hi, block, dtype=np.int64)
            shards.append(np.full(len(begin), shard, dtype=np.int64))
            starts.append(begin - int(offsets[shard]))
            lengths.append(np.minimum(block, hi - begin))
        self._block_shard, self._block_start = np.concatenate(shards), np.concatenate(starts)
        self._block_len = np.concatenate(lengths)

    def __len__(self) -> int:
        n = len(self.store)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator:
        if self.epochs is not None and self.epoch >= self.epochs:
            return iter(())
        self.epoch += 1
        return self.iter_epoch(self.epoch - 1)

    def iter_epoch(self, epoch: int) -> Iterator:
        """Batches of epoch ``epoch`` (deterministic given ``seed`` and ``epoch``); does not move the counter."""
        return self._consume(_index(epoch, "epoch"))

    # -- consumer side ---------------------------------------------------------------------------------

    def _consume(self, epoch: int) -> Iterator:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(epoch, out, stop), daemon=True,
                                  name=f"saefast-store-prefetch-{epoch}")
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield self._deliver(item)
        finally:
            # Runs on exhaustion, on an early break (generator close) and when the generator is collected.
            stop.set()
            thread.join()

    def _deliver(self, item: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.device is not None and self.device.type != "cpu":
            item = tuple(t.to(self.device, non_blocking=self._cuda) for t in item)
            if self.dtype is not None:
                item = (item[0].to(self.dtype), *item[1:])  # on the GPU: half the bytes crossed PCIe for bf16
        return item[0] if not self.extras else item

    # -- producer side (background thread) -------------------------------------------------------------

    def _produce(self, epoch: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self._epoch_batches(epoch, stop):
                if not _put(out, batch, stop):
                    return
            _put(out, _END, stop)
        except BaseException as err:  # re-raised in the consumer
            _put(out, _Failure(err), stop)

    def _epoch_batches(self, epoch: int, stop: threading.Event) -> Iterator[tuple[torch.Tensor, ...]]:
        rng = np.random.default_rng([self.seed, epoch])
        n_blocks = len(self._block_len)
        order = rng.permutation(n_blocks) if self.shuffle else np.arange(n_blocks)
        columns = [self.store._hook, *self.extras]
        pending: list[tuple[np.ndarray, ...]] = []
        pending_rows = 0
        i = 0
        while i < n_blocks:
            if stop.is_set():
                return
            chosen, rows = [], 0
            while i < n_blocks and rows + int(self._block_len[order[i]]) <= self.shuffle_buffer:
                chosen.append(order[i])
                rows += int(self._block_len[order[i]])
                i += 1
            buffer = self._read_blocks(chosen, rows, columns, stop)
            if buffer is None:
                return
            perm = rng.permutation(rows) if self.shuffle else None
            pos = 0
            while pos < rows:
                end = min(rows, pos + self.batch_size - pending_rows)
                index = perm[pos:end] if perm is not None else slice(pos, end)
                pending.append(tuple(column[index] for column in buffer))
                pending_rows += end - pos
                pos = end
                if pending_rows == self.batch_size:
                    yield self._assemble(pending)
                    pending, pending_rows = [], 0
        if pending_rows and not self.drop_last:
            yield self._assemble(pending)

    def _read_blocks(self, chosen: list, rows: int, columns: list[str], stop: threading.Event):
        shared = self.store._shared
        buffer = []
        for name in columns:
            shape, np_dtype, _ = self.store._column(name)
            buffer.append(np.empty((rows, *shape), dtype=np_dtype))
        pos = 0
        for block in chosen:
            if stop.is_set():
                return None
            shard, start = int(self._block_shard[block]), int(self._block_start[block])
            length = int(self._block_len[block])
            for name, column in zip(columns, buffer):
                column[pos : pos + length] = shared.array(shard, name)[start : start + length]
            pos += length
        return buffer

    def _assemble(self, pending: list[tuple[np.ndarray, ...]]) -> tuple[torch.Tensor, ...]:
        columns = []
        for k, name in enumerate([self.store._hook, *self.extras]):
            pieces = [piece[k] for piece in pending]
            # Shuffled pieces are fresh gathers; sequential ones are views of the buffer and must be copied
            # so a batch never keeps the whole buffer alive.
            array = pieces[0] if len(pieces) == 1 and self.shuffle else np.concatenate(pieces)
            tensor = _to_torch(array, self.store._column(name)[2])
            if k == 0 and self.dtype is not None and not self._cuda:
                tensor = tensor.to(self.dtype)
            columns.append(tensor.pin_memory() if self._cuda else tensor)
        return tuple(columns)
