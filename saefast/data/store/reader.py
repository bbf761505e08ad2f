"""Reading an activation store: :class:`ActivationStore`, a read-only, memory-mapped view with hash checks."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import errno
import math
import mmap
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...files import sha256_file, xxh3_128_file
from .batches import StoreBatches, default_workers
from .format import (
    CHECKSUMS,
    EXTRA_DTYPES,
    MANIFEST,
    STORE_DTYPES,
    VERIFY_MODES,
    StoreError,
    as_index,
    check_files,
    check_out_dtype,
    column_spec,
    dtype_name,
    numpy_dtype,
    read_manifest,
    to_torch,
)

MAX_OPEN_MAPS = 64
"""Memory maps a store keeps cached (each holds a file descriptor), least recently used dropped first."""

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)
"""``madvise`` advice that faults a range of a mapping in at once (Linux ≥ 5.14; Python ≤ 3.12 lacks the name)."""

READ_THROUGH_BYTES = 4 << 20
"""Bytes per read when :meth:`ShardFiles.load_rows` brings a block into the page cache."""

UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
"""Errors of ``madvise`` that mean "this kernel cannot do that", not a bad file."""


def _load_mincore() -> Any:
    """libc's ``mincore`` through ctypes (Linux), or None where it cannot be had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mincore = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    mincore.restype = ctypes.c_int
    return mincore


_MINCORE = _load_mincore()


def _resident(base: int, lo: int, hi: int) -> bool:
    """Whether every page of bytes ``[lo, hi)`` of the mapping at address ``base`` is in memory (``mincore``: the
    page cache for a file this user owns or may write, else this process's page tables); False when unknown."""
    if _MINCORE is None:
        return False
    aligned = lo - lo % mmap.PAGESIZE
    pages = np.empty(-(-(hi - aligned) // mmap.PAGESIZE), dtype=np.uint8)
    if _MINCORE(base + aligned, hi - aligned, pages.ctypes.data) != 0:
        return False
    return bool((pages & 1).all())


_scratch = threading.local()


def _read_through(handle: Any, lo: int, hi: int) -> None:
    """Read bytes ``[lo, hi)`` of ``handle`` into the page cache: plain reads of :data:`READ_THROUGH_BYTES` into
    one scratch per thread (it stays in cache, so the copy costs little beside the disk)."""
    scratch = getattr(_scratch, "view", None)
    if scratch is None:
        scratch = _scratch.view = memoryview(bytearray(READ_THROUGH_BYTES))
    handle.seek(lo)
    while lo < hi:
        n = handle.readinto(scratch[: min(len(scratch), hi - lo)])
        if not n:
            raise OSError(f"it ended {hi - lo} bytes early (truncated after opening?)")
        lo += n


class _Mapping:
    """One column file mapped copy-on-write (its pages shared with the page cache; nothing here writes them): the
    map, its rows as an array, the file offset of the first row, the map's address, and the first bytes of the
    ranges :meth:`ShardFiles.load_rows` has mapped in it."""

    def __init__(self, mapped: mmap.mmap, rows: np.ndarray, offset: int):
        self.map, self.rows, self.offset = mapped, rows, offset
        self.address = rows.ctypes.data - offset
        self.populated: set[int] = set()


class ShardFiles:
    """The files of one opened store, shared by its subset views: memmaps (LRU-bounded) and hash checks."""

    def __init__(self, root: Path, manifest: dict[str, Any], verify: str, checksum: str = "xxh3_128"):
        self.root = root
        self.manifest = manifest
        self.verify = verify
        self.checksum = checksum
        self.offsets = np.cumsum([0] + [shard["tokens"] for shard in manifest["shards"]]).astype(np.int64)
        self.verified: set[str] = set()
        self.maps: OrderedDict[str, _Mapping] = OrderedDict()
        self.lock = threading.Lock()
        self.hash_locks: dict[str, threading.Lock] = {}  # one per file: readers hash different files in parallel
        self.populate = MADV_POPULATE_READ is not None and hasattr(mmap.mmap, "madvise")

    def check(self, entry: dict[str, Any]) -> None:
        """Hash the file of ``entry`` once; :class:`StoreError` naming it if it does not match.

        Safe from many threads: each file is hashed at most once (a second caller waits for the first), and
        different files are hashed at once (``hashlib`` releases the GIL), so reader workers verify in parallel.
        A file that failed is hashed again (and refused again) on every touch.
        """
        file = entry["file"]
        if file in self.verified:
            return
        with self.lock:
            file_lock = self.hash_locks.setdefault(file, threading.Lock())
        with file_lock:
            if file in self.verified:
                return
            fast = self.checksum == "xxh3_128" and "xxh3_128" in entry
            key, what, hasher = ("xxh3_128", "XXH3-128", xxh3_128_file) if fast else ("sha256", "SHA-256", sha256_file)
            try:
                digest = hasher(self.root / file)
            except OSError as err:
                raise StoreError(f"activation store {self.root}: cannot read {file} ({err})") from None
            if digest != entry[key]:
                raise StoreError(f"activation store {self.root}: {file} is corrupt "
                                 f"(its {what} does not match {MANIFEST})")
            self.verified.add(file)

    def check_all(self, workers: int | None = None) -> None:
        """Hash every file of the store (each at most once), ``workers`` files at a time (default: the cores
        available); the error of the first bad file in manifest order is raised."""
        entries = [entry for shard in self.manifest["shards"] for entry in shard["files"].values()
                   if entry["file"] not in self.verified]
        workers = min(len(entries), default_workers() if workers is None else workers)
        if workers <= 1:
            for entry in entries:
                self.check(entry)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="saefast-store-verify") as pool:
            for future in [pool.submit(self.check, entry) for entry in entries]:
                future.result()

    def _mapping(self, shard: int, name: str) -> _Mapping:
        """Column ``name`` of ``shard``, mapped (once; least recently used maps dropped past
        :data:`MAX_OPEN_MAPS`)."""
        entry = self.manifest["shards"][shard]["files"][name]
        file = entry["file"]
        with self.lock:
            if file in self.maps:
                self.maps.move_to_end(file)
                return self.maps[file]
        row_shape, column_dtype = column_spec(self.manifest, name)
        dtype = numpy_dtype(column_dtype)
        tokens = self.manifest["shards"][shard]["tokens"]
        offset = entry["bytes"] - tokens * dtype.itemsize * math.prod(row_shape)  # check_files: the rows come last
        try:
            with open(self.root / file, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as err:
            raise StoreError(f"activation store {self.root}: cannot map {file} ({err})") from None
        self._check_size(file, mapped, entry["bytes"], "map")
        found = _Mapping(mapped, np.frombuffer(mapped, dtype=dtype, count=tokens * math.prod(row_shape),
                                               offset=offset).reshape(tokens, *row_shape), offset)
        with self.lock:
            self.maps[file] = found
            while len(self.maps) > MAX_OPEN_MAPS:
                self.maps.popitem(last=False)  # views still in use keep their map open
        return found

    def _check_size(self, file: str, mapped: mmap.mmap, size: int, what: str) -> None:
        """StoreError unless the mapped file still has its manifest's size (``mmap.size`` asks the file system): a
        file cut short after opening would read as zeros in its last page and kill the process past it."""
        if mapped.size() != size:
            raise StoreError(f"activation store {self.root}: cannot {what} {file} (it is {mapped.size()} bytes, "
                             f"{MANIFEST} says {size}: changed after opening?)")

    def array(self, shard: int, name: str) -> np.ndarray:
        """The rows of column ``name`` in ``shard``, memory-mapped (hash-checked first when lazy)."""
        self._check_lazy(shard, name)
        return self._mapping(shard, name).rows

    def _check_lazy(self, shard: int, name: str) -> None:
        entry = self.manifest["shards"][shard]["files"][name]
        if self.verify == "lazy" and entry["file"] not in self.verified:
            self.check(entry)

    def load_rows(self, shard: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of column ``name`` in ``shard``, memory-mapped and in memory: hash-checked first
        when lazy, then read ahead into the page cache in one sequential pass and mapped (:meth:`_read_ahead`),
        so that gathering from them never waits for the disk. :class:`StoreError` names a file that cannot be
        read (changed or truncated after opening, an I/O error)."""
        self._check_lazy(shard, name)
        mapping = self._mapping(shard, name)
        if stop > start:
            first, row_bytes = mapping.offset, mapping.rows.strides[0]
            self._read_ahead(shard, name, mapping, first + start * row_bytes, first + stop * row_bytes)
        return mapping.rows[start:stop]

    def _read_ahead(self, shard: int, name: str, mapping: _Mapping, lo: int, hi: int) -> None:
        """Bring bytes ``[lo, hi)`` of the file into the page cache with large sequential reads, then into
        ``mapping``. A range already in memory (``mincore``) is not read
        again, nor mapped again once mapped: a warm epoch costs the readers almost nothing. The reads are plain
        4 MiB reads; ``bench/read_ahead.py`` compared them on cold d = 2,304 epochs with ``sendfile`` to
        ``/dev/null``, ``POSIX_FADV_WILLNEED`` and faulting the range in (``MADV_POPULATE_READ`` alone): plain reads
        were the fastest and steadiest, at the disk's sequential read (1.57 GB/s median against 1.49, 1.47 and
        1.31; ``bench/results/cpu_read_ahead.md``)."""
        entry = self.manifest["shards"][shard]["files"][name]
        file = entry["file"]
        self._check_size(file, mapping.map, entry["bytes"], "read")
        if not _resident(mapping.address, lo, hi):
            self._read_into_cache(file, lo, hi)
            mapping.populated.discard(lo)  # evicted, so unmapped too
        if self.populate and lo not in mapping.populated:  # map it now, not one fault per 64 KiB in the gather
            aligned = lo - lo % mmap.PAGESIZE
            try:
                mapping.map.madvise(MADV_POPULATE_READ, aligned, hi - aligned)
                mapping.populated.add(lo)
            except OSError as err:
                if err.errno not in UNSUPPORTED:
                    raise StoreError(f"activation store {self.root}: cannot read {file} ({err})") from None
                self.populate = False  # a kernel before 5.14: the gather faults the pages in

    def _read_into_cache(self, file: str, lo: int, hi: int) -> None:
        """Read bytes ``[lo, hi)`` of ``file`` into the page cache; :class:`StoreError` naming the file if it cannot
        be read."""
        try:
            with open(self.root / file, "rb", buffering=0) as handle:
                _read_through(handle, lo, hi)
        except OSError as err:
            raise StoreError(f"activation store {self.root}: cannot read {file} ({err})") from None

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
    ``verify``: ``"eager"`` hashes every file now (in parallel), ``"lazy"`` hashes each file the first time this
    reader (or one of its reader workers, in parallel) touches it, before any of its rows is used; ``"none"``
    trusts the files. ``checksum`` (one of :data:`CHECKSUMS`): ``"xxh3_128"`` checks the XXH3-128 the writer
    recorded (~11 GB/s per core against SHA-256's ~1.2 GB/s here; files of older stores, which lack it, fall back
    to SHA-256), ``"sha256"`` always checks the SHA-256 (a cryptographic hash, for files that crossed untrusted
    hands). Row indices are relative to the view:
    :meth:`subset` gives a view on a row range that every method respects.
    """

    def __init__(self, path: str | os.PathLike, hook: str | None = None, verify: str = "lazy",
                 checksum: str = "xxh3_128"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, got {checksum!r}")
        root = Path(path)
        manifest = read_manifest(root)
        check_files(root, manifest)
        hooks = list(manifest["hooks"])
        if hook is None:
            if len(hooks) != 1:
                raise StoreError(f"activation store {root} holds several hooks {hooks}: pass hook=<one of them>")
            hook = hooks[0]
        elif hook not in manifest["hooks"]:
            raise StoreError(f"activation store {root} has no hook {hook!r}; it holds {hooks}")
        self._shared = ShardFiles(root, manifest, verify, checksum)
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

    @property
    def shard_files(self) -> ShardFiles:
        """The store's files (memory maps, hash checks), shared by every view of it."""
        return self._shared

    @property
    def rows(self) -> tuple[int, int]:
        """``(start, stop)``: the rows of this view, counted from the store's first row."""
        return self._start, self._stop

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, hook={self.hook!r}, d={self.d}, tokens={self.n_tokens}, "
                f"dtype={dtype_name(self.dtype)}, complete={self.complete})")

    # -- reading ---------------------------------------------------------------------------------------

    def _range(self, start: Any, stop: Any) -> tuple[int, int]:
        start, stop = as_index(start, "start"), as_index(stop, "stop")
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) are outside the store's [0, {self.n_tokens})")
        return self._start + start, self._start + stop

    def column(self, name: str) -> tuple[tuple[int, ...], np.dtype, torch.dtype]:
        """Row shape, on-disk numpy dtype and torch dtype of column ``name`` (the hook or an extra)."""
        shape, dtype = column_spec(self._shared.manifest, name)
        return shape, numpy_dtype(dtype), dtype

    def check_extra(self, name: str) -> None:
        """StoreError unless the store has the extra column ``name``."""
        if name not in self.extra_dtypes:
            raise StoreError(f"activation store {self.path} has no extra {name!r}; it has {list(self.extras)}")

    def read(self, start: int, stop: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Rows ``[start, stop)`` of :attr:`hook` as a ``[stop − start, d]`` tensor (``dtype=None``: stored)."""
        check_out_dtype(dtype)
        start, stop = self._range(start, stop)
        out = np.empty((stop - start, self.d), dtype=numpy_dtype(self.dtype))
        self._shared.gather(self._hook, start, stop, out)
        x = to_torch(out, self.dtype)
        return x if dtype is None else x.to(dtype)

    def read_extra(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the extra column ``name``, in its stored dtype."""
        self.check_extra(name)
        start, stop = self._range(start, stop)
        _, np_dtype, dtype = self.column(name)
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
        shard: tuple[int, int] | None = None,
        workers: int | None = None,
    ) -> StoreBatches:
        """Batches of this view for training: a re-iterable :class:`StoreBatches`, one epoch per ``iter()``.

        Shuffling keeps memory bounded: each shard is cut into contiguous blocks of ``block_rows`` rows, the
        block order is shuffled, consecutive blocks of that order form fills of at most ``shuffle_buffer`` rows
        and the rows of each fill are shuffled; every row appears exactly once per epoch. Epoch ``e`` depends only
        on ``(seed, e)`` — not on ``workers``, bit for bit. ``extras`` names per-token columns to return
        alongside: batches are then tuples ``(x, extra_1, ...)``, aligned row by row. Reading runs ``prefetch``
        batches ahead: ``workers`` reader threads (default: the cores available) bring the next fill's blocks into
        memory (each file hash-checked on first touch; each block read ahead sequentially into the page cache and
        memory-mapped, not copied) while ``workers`` gather threads cut the current fill into batches (each row
        copied once from the mapped file into its batch, converted on the way: :func:`saefast.ops.gather_rows_`);
        an error in any of them (a corrupt shard, named) is raised here, in the consumer. Memory: ``prefetch +
        workers + 2`` batches (batch memory the consumer has let go of is reused); the fills live in the page
        cache, which the kernel reclaims as it needs. With a CUDA ``device`` batches arrive there (copied from
        pinned memory in the stored dtype, converted on the GPU).

        ``shard=(index, count)`` reads this reader's share of every batch, for data-parallel training: each
        yielded batch is rows ``[size*index//count, size*(index+1)//count)`` of the global batch that
        ``shard=None`` yields for the same ``seed`` and epoch, where ``size`` is that global batch's row count
        (the short last batch included when ``drop_last`` is false); a share is empty when its batch has fewer
        rows than ``count``. Extras are cut alike. So ``count`` readers with the same arguments see every row
        exactly once per epoch, and the shares of batch ``b`` concatenated in index order are exactly global
        batch ``b``. ``len()`` stays the number of global batches. Each reader still loads every block of the
        fill (the fill fixes the shuffle), but gathers, converts and copies only its own rows. With ``drop_last``
        every share must be non-empty, so ``batch_size`` must be at least ``count``.
        """
        return StoreBatches(self, batch_size, shuffle=shuffle, seed=seed, epochs=epochs,
                            shuffle_buffer=shuffle_buffer, block_rows=block_rows, prefetch=prefetch, device=device,
                            dtype=dtype, extras=extras, drop_last=drop_last, shard=shard,
                            workers=workers)

