"""Shuffled batches from an activation store with bounded memory, read ahead in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .format import as_index, check_out_dtype, positive_int, to_torch

if TYPE_CHECKING:
    from .reader import ActivationStore

PUT_POLL_SECONDS = 0.05
"""How often the reading thread checks, while the queue is full, whether the consumer has gone."""

_END = object()


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
                 extras: Sequence[str] = (), drop_last: bool = False, shard: tuple[int, int] | None = None):
        self.batch_size = positive_int(batch_size, "batch_size")
        self.shuffle_buffer = positive_int(shuffle_buffer, "shuffle_buffer")
        self.block_rows = positive_int(block_rows, "block_rows")
        self.prefetch = positive_int(prefetch, "prefetch")
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
        # Blocks never cross a shard boundary (one contiguous memmap slice each) nor exceed the buffer.
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
        columns = [self.store.hook, *self.extras]
        pending: list[tuple[np.ndarray, ...]] = []
        pending_rows, batch = 0, 0  # rows of the global batch ``batch`` seen so far (owned or not)
        lo, hi = self._share(batch)
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
                # Positions [pos, end) of the buffer's order are rows [pending_rows, pending_rows + end - pos)
                # of the global batch; gather only those in this reader's share [lo, hi) of it.
                a = pos + max(lo - pending_rows, 0)
                z = pos + min(hi - pending_rows, end - pos)
                if a < z:
                    index = perm[a:z] if perm is not None else slice(a, z)
                    pending.append(tuple(column[index] for column in buffer))
                pending_rows += end - pos
                pos = end
                if pending_rows == self.batch_size:
                    yield self._assemble(pending)
                    pending, pending_rows, batch = [], 0, batch + 1
                    lo, hi = self._share(batch)
        if pending_rows and not self.drop_last:
            yield self._assemble(pending)

    def _share(self, batch: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of global batch ``batch`` that this reader yields (all of it without ``shard``)."""
        if batch >= len(self):  # the short tail that drop_last drops: gather nothing
            return 0, 0
        size = min(self.batch_size, len(self.store) - batch * self.batch_size)
        if self.shard is None:
            return 0, size
        index, count = self.shard
        return size * index // count, size * (index + 1) // count

    def _read_blocks(self, chosen: list, rows: int, columns: list[str], stop: threading.Event):
        shared = self.store.shard_files
        buffer = []
        for name in columns:
            shape, np_dtype, _ = self.store.column(name)
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
        for k, name in enumerate([self.store.hook, *self.extras]):
            pieces = [piece[k] for piece in pending]
            if not pieces:  # an empty share (a batch with fewer rows than shards)
                shape, np_dtype, _ = self.store.column(name)
                pieces = [np.empty((0, *shape), dtype=np_dtype)]
            # Shuffled pieces are fresh gathers; sequential ones are views of the buffer and must be copied
            # so a batch never keeps the whole buffer alive.
            array = pieces[0] if len(pieces) == 1 and self.shuffle else np.concatenate(pieces)
            tensor = to_torch(array, self.store.column(name)[2])
            if k == 0 and self.dtype is not None and not self._cuda:
                tensor = tensor.to(self.dtype)
            columns.append(tensor.pin_memory() if self._cuda else tensor)
        return tuple(columns)
