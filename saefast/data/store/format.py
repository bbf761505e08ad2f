"""The on-disk format of an activation store: its constants, the manifest and the ``.npy`` shard files.

A store is a directory:

* ``shardNNNNN.<name>.npy`` — one plain ``.npy`` file per shard and per hook point (``[n_i, d_hook]``) or per-token
  extra column (``[n_i]``), so every shard can be memory-mapped; bfloat16 is stored as its uint16 bits.
* ``manifest.json`` — format, version, dtype, hooks, extras, the writer's metadata, the token count, the
  ``complete`` flag, the writer's resume ``state`` and, per shard, its token count and the name, SHA-256, size
  and (written since the XXH3 checksums, optional for older stores) XXH3-128 of each of its files. It is
  rewritten atomically after every shard, and only once the shard's files are durable.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...files import atomic_write, read_versioned_json
from ...validation import changed_fields

FORMAT = "saefast-activations"
VERSION = 1
MANIFEST = "manifest.json"
VERIFY_MODES = ("eager", "lazy", "none")
CHECKSUMS = ("xxh3_128", "sha256")
"""What a reader checks files against: XXH3-128 (xxHash; the default, ~10× faster per core; SHA-256 for files
whose manifest entry predates it) or always SHA-256."""
STORE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXTRA_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
}
SINGLE_HOOK = "activations"
"""Hook name :func:`write_store` uses when it is given one tensor."""

SHARD_FILE = re.compile(r"^shard\d+\..+\.npy$")
"""Names of the shard files a writer creates (others in the directory are never touched)."""
_WRITE_CHUNK = 1 << 26
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_XXH3_128 = re.compile(r"^[0-9a-f]{32}$")


class StoreError(ValueError):
    """An activation store is missing, corrupt, or does not match what was asked of it."""




def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (how the manifest names dtypes)."""
    return str(dtype).removeprefix("torch.")


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The dtype a column is stored as on disk (bfloat16, which numpy lacks, as its uint16 bits)."""
    if dtype == torch.bfloat16:
        return np.dtype(np.uint16)
    return torch.empty(0, dtype=dtype).numpy().dtype


def to_torch(array: np.ndarray, stored: torch.dtype) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, reinterpreted as ``stored`` (uint16 bits → bfloat16)."""
    if stored == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def is_count(value: Any, minimum: int = 0) -> bool:
    """Whether ``value`` is an int (not a bool) ``>= minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def as_index(value: Any, what: str) -> int:
    """``value`` as an int (anything with ``__index__`` but a bool); TypeError naming ``what`` otherwise."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value.__index__())


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int ``>= 1``; TypeError / ValueError naming ``what`` otherwise."""
    value = as_index(value, what)
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def jsonable(value: Any, what: str) -> dict:
    """``value`` (a dict) as it will read back from JSON, so comparisons and ``state`` are JSON-exact."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serializable ({err})") from None


def file_bases(names: Sequence[str]) -> dict[str, str]:
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


def write_npy(path: Path, array: np.ndarray) -> tuple[str, str, int]:
    """Write ``array`` as ``.npy`` atomically (temp, fsync, rename); SHA-256, XXH3-128 and size of the bytes
    written (both hashes in the same pass over the bytes)."""
    import xxhash

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    digest, fast = hashlib.sha256(header.getvalue()), xxhash.xxh3_128(header.getvalue())

    def write(handle) -> None:
        handle.write(header.getvalue())
        for start in range(0, data.size, _WRITE_CHUNK):  # hash what is written, chunk by chunk
            chunk = memoryview(data[start : start + _WRITE_CHUNK])
            digest.update(chunk)
            fast.update(chunk)
            handle.write(chunk)

    atomic_write(path, write)
    return digest.hexdigest(), fast.hexdigest(), len(header.getvalue()) + data.size


def npy_header(file: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
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




def read_manifest(root: Path) -> dict[str, Any]:
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
        expect(is_count(d, 1), f"hooks[{name!r}].d", "a positive integer", d)
    expect(isinstance(extras, dict), "extras", "an object", extras)
    for name, dtype in extras.items():
        expect(dtype in EXTRA_DTYPES and name not in hooks, f"extras[{name!r}]",
               f"one of {sorted(EXTRA_DTYPES)} (and not a hook name)", dtype)
    for key, kind in (("metadata", dict), ("state", dict), ("complete", bool), ("shards", list)):
        expect(isinstance(manifest[key], kind), key, f"a {kind.__name__}", manifest[key])
    expect(is_count(manifest["tokens"]), "tokens", "a non-negative integer", manifest["tokens"])
    names = set(hooks) | set(extras)
    seen_files: set[str] = set()
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        expect(isinstance(shard, dict), where, "an object", shard)
        expect(shard.get("index") == i, f"{where}.index", str(i), shard.get("index"))
        expect(is_count(shard.get("tokens"), 1), f"{where}.tokens", "a positive integer", shard.get("tokens"))
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
            expect(is_count(entry.get("bytes")), f"{field}.bytes", "a non-negative integer", entry.get("bytes"))
            fast = entry.get("xxh3_128")
            expect(fast is None or (isinstance(fast, str) and _XXH3_128.match(fast) is not None),
                   f"{field}.xxh3_128", "an XXH3-128 hex (or absent)", fast)
        total += shard["tokens"]
    expect(manifest["tokens"] == total, "tokens", f"the sum of the shard tokens ({total})", manifest["tokens"])
    return manifest


def column_spec(manifest: dict[str, Any], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Row shape and dtype of column ``name`` of a store: a hook's rows are ``[d]`` in the store's dtype, an
    extra's one value of its own dtype."""
    hooks = manifest["hooks"]
    if name in hooks:
        return (hooks[name]["d"],), STORE_DTYPES[manifest["dtype"]]
    return (), EXTRA_DTYPES[manifest["extras"][name]]


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists, has its listed size and an ``.npy`` header of the listed shape and dtype."""
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
                shape, fortran, dtype, offset = npy_header(file)
            except (ValueError, OSError, SyntaxError) as err:
                raise StoreError(f"activation store {root}: {entry['file']} has no valid .npy header ({err})") from None
            row_shape, column_dtype = column_spec(manifest, name)
            want, want_dtype = (shard["tokens"], *row_shape), numpy_dtype(column_dtype)
            if shape != want or dtype != want_dtype or fortran:
                raise StoreError(f"activation store {root}: {entry['file']} holds a {shape} {dtype} array, "
                                 f"{MANIFEST} says {want} {want_dtype}")
            if offset + int(np.prod(shape)) * dtype.itemsize != size:
                raise StoreError(f"activation store {root}: {entry['file']} has {size - offset} data bytes, "
                                 f"its header needs {int(np.prod(shape)) * dtype.itemsize}")


def settings_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings (dotted keys) where ``wanted`` differs from ``stored``, so a refusal names what changed; only
    ``wanted``'s top-level keys count (the manifest holds more)."""
    stored = {key: stored.get(key, "<absent>") for key in wanted}
    return [f"{name}: the store has {have!r}, this writer {want!r}"
            for name, have, want in changed_fields(stored, wanted)]


def dump_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest as the bytes written to ``manifest.json``."""
    return json.dumps(manifest, indent=1).encode()



def check_out_dtype(dtype: Any) -> None:
    """A reader's output dtype must be a floating torch dtype, or None for the stored one."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype (or None for the stored one), got {dtype!r}")

