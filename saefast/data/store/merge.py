"""Joining activation stores into one complete store without copying their data: :func:`concatenate`.

A distributed harvest (:mod:`saefast.data.harvest`) has every rank write its own part store; rank 0 then joins the
parts in rank order. The shard files are hard-linked under their new shard indices (copied where the filesystem
has no hard links), so their bytes and SHA-256s stay those of the parts, and the joined store is the one a single
writer appending the same shards would have written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...files import atomic_write, atomic_write_bytes, fsync_dir
from .format import MANIFEST, StoreError, check_files, dump_manifest, jsonable, read_manifest, settings_differences

SETTINGS = ("dtype", "hooks", "extras")
"""The manifest fields that every joined part must share (the metadata and state are the caller's)."""


def concatenate(out: str | os.PathLike, parts: Sequence[str | os.PathLike], metadata: dict[str, Any],
                state: dict[str, Any]) -> None:
    """Write at ``out`` the complete store holding the shards of the stores ``parts``, in order, with ``metadata``
    and ``state`` (JSON-able dicts) in place of the parts' own.

    The parts must have the same dtype, hooks and extras (:class:`StoreError` says what differs) and their files
    must be whole. ``out`` must not hold a manifest yet; shard files already there (from an interrupted join) are
    replaced. The manifest is written last, atomically, once every linked file is durable: a crash before it
    leaves ``out`` without a store and the parts untouched, so the join can simply run again.
    """
    root = Path(out)
    if (root / MANIFEST).exists():
        raise StoreError(f"cannot join activation stores into {root}: it already holds a store")
    if not parts:
        raise ValueError("concatenate needs at least one part store")
    metadata, state = jsonable(metadata, "metadata"), jsonable(state, "state")
    manifests = []
    for part in map(Path, parts):
        manifest = read_manifest(part)
        check_files(part, manifest)
        differs = settings_differences(manifest, {key: manifests[0][key] for key in SETTINGS}) if manifests else []
        if differs:
            raise StoreError(f"activation store {part} cannot be joined to {parts[0]}: " + "; ".join(differs))
        manifests.append(manifest)

    root.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    for part, manifest in zip(map(Path, parts), manifests):
        for shard in manifest["shards"]:
            index = len(shards)
            files = {}
            for name, entry in shard["files"].items():
                # "shard00003.<base>.npy" → the same base under the joined index
                file = f"shard{index:05d}.{entry['file'].split('.', 1)[1]}"
                _link(part / entry["file"], root / file)
                files[name] = dict(entry, file=file)
            shards.append({"index": index, "tokens": shard["tokens"], "files": files})
    fsync_dir(root)  # the links are durable before the manifest lists them
    joined = dict(manifests[0], metadata=metadata, tokens=sum(shard["tokens"] for shard in shards), complete=True,
                  state=state, shards=shards)
    atomic_write_bytes(root / MANIFEST, dump_manifest(joined))


def _link(source: Path, target: Path) -> None:
    """``target`` becomes another name of ``source`` (a durable copy where hard links are not supported)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        with open(source, "rb") as handle:
            atomic_write(target, lambda out: shutil.copyfileobj(handle, out))
