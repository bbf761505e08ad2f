"""Shuffled batches from an activation store with bounded memory, read ahead by parallel workers.

A planner thread draws the epoch's plan from ``(seed, epoch)`` (block order, fills of the shuffle window, row
permutations) and hands the work to two pools of ``workers`` threads: reader workers bring the blocks of the next
fill into memory (hash-checked on first touch, read ahead sequentially into the page cache, memory-mapped: no copy)
while gather workers cut the current fill into batches, each row copied once from the mapped shard file into its
batch and converted on the way (:func:`saefast.ops.gather_rows_`). Workers only do what the plan names, so an epoch
is the same bit for bit for any ``workers``. Memory: ``prefetch + workers + 2`` batches (those in flight and the
free ones kept for reuse: :class:`OutputArrays`); the shuffle window lives in the page cache, which the kernel
reclaims as it needs (a store larger than RAM streams through it).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...ops.gather_rows import gather_rows_
from .format import as_index, check_out_dtype, numpy_dtype, positive_int, to_torch

if TYPE_CHECKING:
    from .reader import ActivationStore

PUT_POLL_SECONDS = 0.05
"""How often the reading thread checks, while the queue is full, whether the consumer has gone."""

_END = object()


def default_workers() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone (``stop``); True when it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=PUT_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _check_shard(shard: Any, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """``shard`` as ``(index, count)``; ValueError (TypeError for non-integers) naming the problem otherwise."""
    if isinstance(shard, (str, bytes)) or not isinstance(shard, Sequence) or len(shard) != 2:
        raise ValueError(f"shard must be a pair (index, count), got {shard!r}")
    index, count = as_index(shard[0], "shard index"), as_index(shard[1], "shard count")
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}) for shard count {count}, got {index}")
    if drop_last and batch_size < count:
        raise ValueError(f"drop_last with batch_size={batch_size} and shard count {count} gives some shards an "
                         f"empty share of every batch: batch_size must be >= the shard count")
    return index, count


class StoreBatches:
    """Re-iterable batches from an :class:`ActivationStore`: each ``iter()`` yields the next epoch.

    The object counts epochs itself (:attr:`epoch` is the next one); after ``epochs`` epochs ``iter()`` yields
    nothing (``epochs=None``: unlimited). ``len()`` is the number of batches per epoch (global batches, also
    with ``shard``). :meth:`iter_epoch` replays any epoch without moving the counter. See
    :meth:`ActivationStore.batches` for the parameters, ``shard`` included.
    """

    def __init__(self, store: ActivationStore, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = 1, shuffle_buffer: int = 1 << 18, block_rows: int = 4096, prefetch: int = 4,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = torch.float32,
                 extras: Sequence[str] = (), drop_last: bool = False, shard: tuple[int, int] | None = None,
                 workers: int | None = None):
        self.batch_size = positive_int(batch_size, "batch_size")
        self.shuffle_buffer = positive_int(shuffle_buffer, "shuffle_buffer")
        self.block_rows = positive_int(block_rows, "block_rows")
        self.prefetch = positive_int(prefetch, "prefetch")
        self.workers = default_workers() if workers is None else positive_int(workers, "workers")
        self.epochs = None if epochs is None else positive_int(epochs, "epochs")
        self.seed = as_index(seed, "seed")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        check_out_dtype(dtype)
        extras = (extras,) if isinstance(extras, str) else tuple(extras)
        for name in extras:
            store.check_extra(name)
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
        self.shard = None if shard is None else _check_shard(shard, self.batch_size, self.drop_last)
        self._cuda = self.device is not None and self.device.type == "cuda"
        # Batch arrays reused once the consumer lets go (CUDA: torch's caching host allocator does that).
        self._outputs = OutputArrays(0 if self._cuda else (self.prefetch + self.workers + 2) * (1 + len(extras)))
        # Blocks never cross a shard boundary (one contiguous memmap slice each) nor exceed the shuffle window.
        block = min(self.block_rows, self.shuffle_buffer)
        offsets = store.shard_files.offsets
        start, stop = store.rows
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
        return self._consume(as_index(epoch, "epoch"))

    # -- consumer side ---------------------------------------------------------------------------------

    def _consume(self, epoch: int) -> Iterator:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        readers = ThreadPoolExecutor(self.workers, thread_name_prefix=f"saefast-store-read-{epoch}")
        gatherers = ThreadPoolExecutor(self.workers, thread_name_prefix=f"saefast-store-gather-{epoch}")
        thread = threading.Thread(target=self._produce, args=(epoch, out, stop, readers, gatherers), daemon=True,
                                  name=f"saefast-store-prefetch-{epoch}")
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield self._deliver(item.result())  # a worker's error is raised here
        finally:
            # Runs on exhaustion, on an error, on an early break (generator close) and when the generator is
            # collected: the planner stops, queued work is cancelled, running work finishes (one block or batch).
            stop.set()
            thread.join()
            readers.shutdown(wait=True, cancel_futures=True)
            gatherers.shutdown(wait=True, cancel_futures=True)

    def _deliver(self, item: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.device is not None and self.device.type != "cpu":
            item = tuple(t.to(self.device, non_blocking=self._cuda) for t in item)
            if self.dtype is not None:
                item = (item[0].to(self.dtype), *item[1:])  # on the GPU: half the bytes crossed PCIe for bf16
        return item[0] if not self.extras else item

    # -- planner (background thread) and workers ---------------------------------------------------------

    def _produce(self, epoch: int, out: queue.Queue, stop: threading.Event, readers: Executor,
                 gatherers: Executor) -> None:
        try:
            for future in self._epoch_batches(epoch, stop, readers, gatherers):
                if not _put(out, future, stop):
                    return
            _put(out, _END, stop)
        except BaseException as err:  # re-raised in the consumer
            _put(out, _Failure(err), stop)

    def _epoch_batches(self, epoch: int, stop: threading.Event, readers: Executor,
                       gatherers: Executor) -> Iterator[Future]:
        """Futures of the epoch's batches, in order. The plan (block order, fills, row permutations) is
        drawn here from ``(seed, epoch)`` alone; workers only load and copy, so the batches do not depend on
        ``workers``. The blocks of fill ``k + 1`` are loaded while the batches of fill ``k`` are gathered."""
        rng = np.random.default_rng([self.seed, epoch])
        n_blocks = len(self._block_len)
        order = rng.permutation(n_blocks) if self.shuffle else np.arange(n_blocks)
        columns = [self.store.hook, *self.extras]
        fills: list[list[int]] = []  # the blocks of each fill, in order
        i = 0
        while i < n_blocks:
            chosen, rows = [], 0
            while i < n_blocks and rows + int(self._block_len[order[i]]) <= self.shuffle_buffer:
                chosen.append(int(order[i]))
                rows += int(self._block_len[order[i]])
                i += 1
            fills.append(chosen)
        pending: list[tuple[_Fill, np.ndarray]] = []  # pieces of the batch being cut: (fill, positions in it)
        pending_rows, batch = 0, 0  # rows of the global batch ``batch`` seen so far (owned or not)
        lo, hi = self._share(batch)
        upcoming = self._start_fill(fills[0], columns, stop, readers) if fills else None
        for k in range(len(fills)):
            if stop.is_set():
                return
            fill = upcoming
            upcoming = self._start_fill(fills[k + 1], columns, stop, readers) if k + 1 < len(fills) else None
            fill.wait()  # a load error (a corrupt shard, named) stops the epoch before any of its rows is used
            perm = rng.permutation(fill.rows) if self.shuffle else None
            pos = 0
            while pos < fill.rows:
                end = min(fill.rows, pos + self.batch_size - pending_rows)
                # Positions [pos, end) of the fill's order are rows [pending_rows, pending_rows + end - pos)
                # of the global batch; gather only those in this reader's share [lo, hi) of it.
                a = pos + max(lo - pending_rows, 0)
                z = pos + min(hi - pending_rows, end - pos)
                if a < z:
                    pending.append((fill, perm[a:z] if perm is not None else np.arange(a, z)))
                pending_rows += end - pos
                pos = end
                if pending_rows == self.batch_size:
                    yield gatherers.submit(self._assemble, pending)
                    pending, pending_rows, batch = [], 0, batch + 1
                    lo, hi = self._share(batch)
        if pending_rows and not self.drop_last:
            yield gatherers.submit(self._assemble, pending)

    def _share(self, batch: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of global batch ``batch`` that this reader yields (all of it without ``shard``)."""
        if batch >= len(self):  # the short tail that drop_last drops: gather nothing
            return 0, 0
        size = min(self.batch_size, len(self.store) - batch * self.batch_size)
        if self.shard is None:
            return 0, size
        index, count = self.shard
        return size * index // count, size * (index + 1) // count

    def _start_fill(self, chosen: list[int], columns: list[str], stop: threading.Event,
                    readers: Executor) -> _Fill:
        """The fill of blocks ``chosen``, its loading handed to the reader workers in ``workers`` runs of
        consecutive blocks of about equal rows."""
        fill = _Fill(self._block_len[chosen], len(columns))
        starts = fill.starts
        # Part p holds the blocks whose first row falls in [p·rows/parts, (p+1)·rows/parts).
        parts = min(self.workers, len(chosen))
        cuts = np.searchsorted(starts, [fill.rows * p // parts for p in range(parts + 1)])
        cuts[-1] = len(chosen)
        fill.loads = [readers.submit(self._load_blocks, chosen[cuts[p]:cuts[p + 1]], int(cuts[p]), columns, fill,
                                     stop) for p in range(parts) if cuts[p] < cuts[p + 1]]
        return fill

    def _load_blocks(self, chosen: list[int], first: int, columns: list[str], fill: _Fill,
                     stop: threading.Event) -> None:
        """Load the blocks ``chosen`` (blocks ``first, first + 1, ...`` of ``fill``) into memory and record their
        rows (views of the memory-mapped shard files) in ``fill``; runs in a reader worker.
        :meth:`ShardFiles.load_rows` hashes a file on its first touch when lazy, then reads the block ahead into
        the page cache in one sequential pass and maps it (no copy), so a cold block streams at the disk's speed
        while the gather workers copy the previous fill."""
        shared = self.store.shard_files
        for i, block in enumerate(chosen, start=first):
            if stop.is_set():
                return
            shard, start = int(self._block_shard[block]), int(self._block_start[block])
            stop_row = start + int(self._block_len[block])
            for name, column in zip(columns, fill.sources):
                column[i] = to_torch(shared.load_rows(shard, name, start, stop_row), self.store.column(name)[2])

    def _assemble(self, pending: list[tuple[_Fill, np.ndarray]]) -> tuple[torch.Tensor, ...]:
        """One batch from its pieces (a fill and positions in it); runs in a gather worker. Each column is one
        :func:`saefast.ops.gather_rows_` from the pieces' blocks, straight into the batch: each row read once
        from the page cache and written once, converted on the way when asked."""
        names = [self.store.hook, *self.extras]
        block_index, row_index, sources = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [[] for _ in names]
        for fill, positions in pending:
            blocks = np.searchsorted(fill.ends, positions, side="right")
            row_index.append(positions - fill.starts[blocks])
            block_index.append(blocks + len(sources[0]))
            for column, blocks_of in zip(sources, fill.sources):
                column.extend(blocks_of)
        source_index = torch.from_numpy(np.concatenate(block_index).astype(np.int64, copy=False))
        rows = torch.from_numpy(np.concatenate(row_index).astype(np.int64, copy=False))
        n = len(rows)
        columns = []
        for k, name in enumerate(names):
            shape, _, stored = self.store.column(name)
            convert = k == 0 and self.dtype is not None and not self._cuda and self.dtype != stored
            out_dtype = self.dtype if convert else stored
            if self._cuda:
                # Gathered straight into pinned memory from torch's caching host allocator: a ring of pinned
                # blocks, each reused only once the copy to the GPU that read it has completed (the copy records
                # an event on it), so no pinning copy and no page-locking per batch.
                out = torch.empty((n, *shape), dtype=out_dtype, pin_memory=True)
            else:
                out = to_torch(self._outputs.take((n, *shape), numpy_dtype(out_dtype)), out_dtype)
            if n:  # an empty share has no pieces
                gather_rows_(sources[k], source_index, rows, out)
            columns.append(out)
        return tuple(columns)


class _Fill:
    """One fill of the shuffle window: its blocks' rows per column (views of the shard files' memory maps, set by
    the reader workers), the blocks' cumulative row counts, and the loads to wait for."""

    def __init__(self, lengths: np.ndarray, n_columns: int):
        self.sources: list[list[torch.Tensor | None]] = [[None] * len(lengths) for _ in range(n_columns)]
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths
        self.rows = int(self.ends[-1]) if len(lengths) else 0
        self.loads: list[Future] = []

    def wait(self) -> None:
        """Wait for every load; the first error (in block order) is raised."""
        for load in self.loads:
            load.result()


class OutputArrays:
    """Batch arrays handed out again once nobody holds them: fresh memory costs a page fault per 4 KiB, about as
    much as the gather itself at d = 2,304.

    An array is reused only when this pool holds the last reference to it: a batch tensor made by
    ``torch.from_numpy`` keeps its array alive (so does every view of the tensor, through its storage), so a
    batch, or any slice of it, that the consumer still holds is never written. At most ``keep`` arrays are kept.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.arrays: list[np.ndarray] = []
        self.probe = [np.empty(0)]
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A free array of ``shape`` and ``dtype`` from the pool, else a new one; kept for reuse after."""
        with self.lock:
            # A free array is referenced exactly as the probe is: by one list and one local. The probe's count
            # is the baseline, whatever this interpreter counts for locals and arguments; any more is a user's.
            probe = self.probe[0]
            free = sys.getrefcount(probe)
            found = None
            for i in range(len(self.arrays)):
                array = self.arrays[i]
                if array.shape == shape and array.dtype == dtype and sys.getrefcount(array) <= free:
                    found = i
                    break
            array = None if found is None else self.arrays.pop(found)
        if array is None:
            array = np.empty(shape, dtype=dtype)
        with self.lock:
            self.arrays.append(array)
            if len(self.arrays) > self.keep:
                del self.arrays[: len(self.arrays) - self.keep]
        return array
