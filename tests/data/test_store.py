"""saefast.data.store (format, writer, reader, batches): activation stores — exact round trips, reads across shards
and on subsets, shuffled batches (every row once, aligned extras), writing and resuming, corruption named, bad input
refused."""

from __future__ import annotations

import gc
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close

import saefast as sf
import saefast.data.store as st
import saefast.data.store.writer as store_writer
from saefast.data.store import ActivationStore, StoreError, StoreWriter, write_store
from saefast.data.store.reader import ShardFiles
from saefast.data.synthetic import SyntheticSparseData

SIZES = [37, 5, 1, 64, 23, 70]  # ragged shards: 200 rows


def indexed(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    """Rows whose column 0 is the row index (exact in float32), the rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x


def ragged_store(path: Path, x: torch.Tensor, sizes=SIZES, dtype=torch.float32, labels: bool = True) -> Path:
    """A store of ``x`` in shards of ``sizes`` rows with an int64 ``labels`` column (= 3·row + 1)."""
    extras = {"labels": torch.int64} if labels else None
    writer = StoreWriter(path, {"h": x.shape[1]}, dtype=dtype, extras=extras, metadata={"source": "test"})
    start = 0
    for size in sizes:
        rows = torch.arange(start, start + size)
        writer.append({"h": x[rows]}, {"labels": 3 * rows + 1} if labels else None, state={"next": start + size})
        start += size
    writer.finish()
    return path


def shard_file(path: Path, index: int, name: str = "h") -> Path:
    manifest = json.loads((path / st.MANIFEST).read_text())
    return path / manifest["shards"][index]["files"][name]["file"]


def rows_of(batches) -> list[torch.Tensor]:
    return [(b[0] if isinstance(b, tuple) else b)[:, 0].long() for b in batches]


# ------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_every_dtype(tmp_path, dtype):
    x = torch.randn(200, 9, dtype=torch.float64) * 3
    store = write_store(tmp_path, x, shard_tokens=37, dtype=dtype, metadata={"model": "m"})
    assert (len(store), store.d, store.dtype, store.n_shards, store.hook) == (200, 9, dtype, 6, "activations")
    assert store.complete and store.metadata == {"model": "m"} and store.extras == ()
    stored = store.read(0, 200, dtype=None)
    assert stored.dtype == dtype
    assert torch.equal(stored, x.to(dtype))
    assert torch.equal(store.read(0, 200), x.to(dtype).float())
    if dtype == torch.float32:
        assert_close(store.read(0, 200, dtype=torch.float64), x, atol=1e-6, rtol=1e-6)
    again = ActivationStore(tmp_path, verify="eager")
    assert torch.equal(again.read(0, 200, dtype=None), x.to(dtype))
    batch = next(iter(again.batches(200, shuffle=False, dtype=None)))
    assert batch.dtype == dtype and torch.equal(batch, x.to(dtype))


def test_multi_hook_store_with_extras_and_awkward_hook_names(tmp_path):
    hooks = {"model.layers.15": 4, "model/layers/15": 3, "Model.layers.15": 2, "../x": 5}
    extras = {"token_ids": torch.int32, "labels": torch.int64, "weight": torch.float32}
    writer = StoreWriter(tmp_path / "s", hooks, dtype=torch.float32, extras=extras, metadata={"ctx": 8})
    data = {name: torch.randn(60, d) for name, d in hooks.items()}
    cols = {"token_ids": torch.randint(0, 50000, (60,), dtype=torch.int32), "labels": torch.arange(60) * 7,
            "weight": torch.rand(60)}
    for a, b in [(0, 5), (5, 6), (6, 40), (40, 60)]:
        writer.append({k: v[a:b] for k, v in data.items()}, {k: v[a:b] for k, v in cols.items()})
    files = {p.name for p in (tmp_path / "s").iterdir()} - {st.MANIFEST}
    assert len(files) == 4 * (len(hooks) + len(extras))  # unique names though three hooks sanitize alike
    assert all("/" not in f and not f.startswith(".") for f in files)
    with pytest.raises(StoreError, match="several hooks"):
        ActivationStore(tmp_path / "s")
    with pytest.raises(StoreError, match="no hook 'nope'"):
        ActivationStore(tmp_path / "s", hook="nope")
    for name, d in hooks.items():
        store = ActivationStore(tmp_path / "s", hook=name)
        assert store.d == d and store.hooks == hooks and not store.complete
        assert torch.equal(store.read(3, 45), data[name][3:45])
    store = ActivationStore(tmp_path / "s", hook="model/layers/15")
    assert store.extras == ("token_ids", "labels", "weight")
    for name, col in cols.items():
        got = store.read_extra(name, 2, 58)
        assert got.dtype == extras[name] and torch.equal(got, col[2:58])
    assert torch.equal(store.with_hook("../x").read(0, 60), data["../x"])
    x, ids, labels = next(iter(store.batches(60, extras=["token_ids", "labels"])))
    order = torch.argsort(labels)
    assert torch.equal(labels[order], cols["labels"]) and torch.equal(ids[order], cols["token_ids"])
    assert torch.equal(x[order], data["model/layers/15"])


def test_read_across_shard_boundaries_and_on_subsets(tmp_path):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    for a, b in [(0, 200), (36, 38), (37, 42), (41, 43), (42, 43), (0, 1), (199, 200), (10, 190), (50, 50)]:
        assert torch.equal(store.read(a, b), x[a:b]), (a, b)
        assert torch.equal(store.read_extra("labels", a, b), 3 * torch.arange(a, b) + 1)
    train, held = store.subset(0, 120), store.subset(120, 200)  # shard offsets 0 37 42 43 107 130 200
    assert (len(train), len(held), train.n_shards, held.n_shards, store.n_shards) == (120, 80, 5, 2, 6)
    assert torch.equal(held.read(0, 80), x[120:]) and torch.equal(train.read(100, 120), x[100:120])
    inner = store.subset(30, 120).subset(5, 40)
    assert len(inner) == 35 and torch.equal(inner.read(2, 30), x[37:65])
    assert torch.equal(inner.read_extra("labels", 0, 35), 3 * torch.arange(35, 70) + 1)
    for bad in [(-1, 3), (5, 4), (0, 201)]:
        with pytest.raises(IndexError, match=re.escape(f"rows [{bad[0]}, {bad[1]}) are outside the store's [0, 200)")):
            store.read(*bad)
    with pytest.raises(IndexError, match=re.escape("rows [0, 81) are outside the store's [0, 80)")):
        held.read(0, 81)
    with pytest.raises(IndexError, match=re.escape("rows [100, 300) are outside the store's [0, 200)")):
        store.subset(100, 300)


# ------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size,shuffle_buffer,block_rows",
    [(1, 7, 3), (13, 50, 8), (64, 5, 16), (100, 1000, 1000), (7, 3, 1), (250, 64, 4096), (33, 97, 11)],
)
def test_shuffle_yields_every_row_exactly_once_with_aligned_extras(tmp_path, batch_size, shuffle_buffer,
                                                                    block_rows):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    batches = store.batches(batch_size, shuffle_buffer=shuffle_buffer, block_rows=block_rows, extras=["labels"],
                            seed=3)
    out = list(batches)
    assert len(out) == len(batches) == -(-200 // batch_size)
    assert [b[0].shape[0] for b in out[:-1]] == [batch_size] * (len(out) - 1)
    rows = torch.cat(rows_of(out))
    assert torch.equal(rows.sort().values, torch.arange(200))
    for xb, labels in out:
        assert xb.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(xb, x[xb[:, 0].long()])
        assert torch.equal(labels, 3 * xb[:, 0].long() + 1)
    if shuffle_buffer > 1 or block_rows > 1:
        assert not torch.equal(rows, torch.arange(200))


def test_subset_batches_cover_only_the_subset(tmp_path):
    x = indexed(200)
    held = ActivationStore(ragged_store(tmp_path, x)).subset(40, 130)
    rows = torch.cat(rows_of(held.batches(16, shuffle_buffer=20, block_rows=6)))
    assert torch.equal(rows.sort().values, torch.arange(40, 130))


def test_epochs_differ_are_deterministic_and_counted(tmp_path):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    batches = store.batches(32, epochs=3, shuffle_buffer=40, block_rows=8, seed=5)
    epochs = [torch.cat(rows_of(batches)) for _ in range(3)]
    assert batches.epoch == 3 and list(batches) == []  # spent
    for rows in epochs:
        assert torch.equal(rows.sort().values, torch.arange(200))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    again = store.batches(32, epochs=3, shuffle_buffer=40, block_rows=8, seed=5, prefetch=1)
    assert torch.equal(torch.cat(rows_of(again)), epochs[0])
    assert torch.equal(torch.cat(rows_of(again.iter_epoch(2))), epochs[2])
    other = store.batches(32, shuffle_buffer=40, block_rows=8, seed=6)
    assert not torch.equal(torch.cat(rows_of(other)), epochs[0])
    endless = store.batches(50, epochs=None)
    assert all(len(list(endless)) == 4 for _ in range(5))


def test_sequential_order_and_drop_last(tmp_path):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    assert torch.equal(torch.cat(list(store.batches(30, shuffle=False, block_rows=9, shuffle_buffer=20))), x)
    dropped = store.batches(64, drop_last=True, shuffle_buffer=50, block_rows=7)
    out = list(dropped)
    assert len(out) == len(dropped) == 3 and all(b.shape == (64, 6) for b in out)
    rows = torch.cat(rows_of(out))
    assert rows.unique().numel() == 192
    tail = list(store.batches(64, shuffle=False, drop_last=True))
    assert torch.equal(torch.cat(tail), x[:192])


class TestShard:
    """``shard=(index, count)``: each reader gets rows [size·index//count, size·(index+1)//count) of every batch."""

    @pytest.mark.parametrize("count", [1, 2, 3])
    @pytest.mark.parametrize("shuffle", [True, False])
    @pytest.mark.parametrize("drop_last", [False, True])
    @pytest.mark.parametrize("batch_size,shuffle_buffer,block_rows", [(13, 50, 8), (64, 5, 16), (7, 3, 1),
                                                                      (33, 97, 11), (2, 9, 4)])
    def test_shares_concatenate_to_the_global_batch(self, tmp_path, count, shuffle, drop_last, batch_size,
                                                    shuffle_buffer, block_rows):
        x = indexed(200)
        store = ActivationStore(ragged_store(tmp_path, x))
        kwargs = dict(shuffle=shuffle, shuffle_buffer=shuffle_buffer, block_rows=block_rows, extras=["labels"],
                      drop_last=drop_last, seed=4, epochs=2)
        whole = store.batches(batch_size, **kwargs)
        if drop_last and batch_size < count:  # some share of every batch would be empty
            with pytest.raises(ValueError, match="batch_size must be >= the shard count"):
                store.batches(batch_size, shard=(0, count), **kwargs)
            return
        readers = [store.batches(batch_size, shard=(i, count), **kwargs) for i in range(count)]
        assert all(len(r) == len(whole) for r in readers)
        for _epoch in range(2):
            full = list(whole)
            shares = [list(r) for r in readers]
            assert all(len(s) == len(full) for s in shares)
            for b, (xb, labels) in enumerate(full):
                size = xb.shape[0]
                parts = [s[b] for s in shares]
                assert [p[0].shape[0] for p in parts] == [size * (i + 1) // count - size * i // count
                                                          for i in range(count)]
                assert torch.equal(torch.cat([p[0] for p in parts]), xb)
                assert torch.equal(torch.cat([p[1] for p in parts]), labels)
                assert all(p[0].dtype == torch.float32 and p[1].dtype == torch.int64 for p in parts)
            rows = torch.cat([r for s in shares for r in rows_of(s)])
            expected = len(full) * batch_size if drop_last else 200
            assert rows.numel() == expected and rows.unique().numel() == expected

    def test_every_token_once_per_epoch_and_epochs_follow_the_seed(self, tmp_path):
        x = indexed(200)
        held = ActivationStore(ragged_store(tmp_path, x)).subset(20, 190)
        readers = [held.batches(16, shard=(i, 3), shuffle_buffer=30, block_rows=7, seed=9, epochs=None)
                   for i in range(3)]
        epochs = []
        for epoch in range(3):
            rows = torch.cat([torch.cat(rows_of(r.iter_epoch(epoch))) for r in readers])
            assert torch.equal(rows.sort().values, torch.arange(20, 190))
            epochs.append(rows)
        assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
        again = held.batches(16, shard=(1, 3), shuffle_buffer=30, block_rows=7, seed=9)
        assert torch.equal(torch.cat(rows_of(again)), torch.cat(rows_of(readers[1].iter_epoch(0))))

    def test_empty_shares_keep_their_shape_and_dtype(self, tmp_path):
        x = indexed(200)
        store = ActivationStore(ragged_store(tmp_path, x, dtype=torch.bfloat16))
        out = list(store.batches(2, shard=(0, 3), extras=["labels"], dtype=None))  # sizes 2·0//3 .. 2·1//3: 0
        assert len(out) == 100
        assert all(xb.shape == (0, 6) and xb.dtype == torch.bfloat16 for xb, _ in out)
        assert all(labels.shape == (0,) and labels.dtype == torch.int64 for _, labels in out)
        last = list(store.batches(3, shard=(0, 3)))  # 66 batches of 3, one row each, then a last batch of 2
        assert [b.shape[0] for b in last] == [1] * 66 + [0]

    def test_only_the_share_is_gathered_and_converted(self, tmp_path, monkeypatch):
        import saefast.data.store.batches as store_batches

        x = indexed(200)
        store = ActivationStore(ragged_store(tmp_path, x))
        gathered = []
        original = store_batches.gather_rows_

        def counting(sources, source_index, row_index, out):
            gathered.append(len(out))
            return original(sources, source_index, row_index, out)

        monkeypatch.setattr(store_batches, "gather_rows_", counting)
        out = list(store.batches(60, shard=(1, 4), shuffle_buffer=64, block_rows=8))
        assert sum(gathered) == sum(b.shape[0] for b in out) == 50  # shares of batches 60, 60, 60, 20
        assert [b.shape[0] for b in out] == [15, 15, 15, 5]

    def test_bad_shards_are_refused(self, tmp_path):
        store = ActivationStore(ragged_store(tmp_path, indexed(200)))
        for shard, match in [((2, 2), re.escape("shard index must be in [0, 2) for shard count 2, got 2")),
                             ((-1, 2), re.escape("shard index must be in [0, 2)")),
                             ((0, 0), "shard count must be >= 1, got 0"),
                             ((0, 1, 2), re.escape("shard must be a pair (index, count), got (0, 1, 2)")),
                             (3, "shard must be a pair"), ("01", "shard must be a pair")]:
            with pytest.raises(ValueError, match=match):
                store.batches(8, shard=shard)
        for shard in [(0.0, 2), (0, True), (None, 2)]:
            with pytest.raises(TypeError, match="shard (index|count) must be an integer"):
                store.batches(8, shard=shard)
        with pytest.raises(ValueError, match="batch_size must be >= the shard count"):
            store.batches(3, shard=(0, 4), drop_last=True)
        assert len(store.batches(4, shard=(3, 4), drop_last=True)) == 50
        assert len(store.batches(3, shard=(np.int64(3), 4))) == 67


def test_prefetch_thread_propagates_errors_and_never_leaks(tmp_path, monkeypatch):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    baseline = threading.active_count()
    it = iter(store.batches(8, prefetch=2, workers=2))
    next(it)
    # The planner and its workers (2 readers, at most 2 gatherers; pools start threads as work arrives) run...
    assert baseline + 2 <= threading.active_count() <= baseline + 5
    del it
    gc.collect()
    assert threading.active_count() == baseline  # ...and stop when the generator is collected
    for _ in range(3):
        for _batch in store.batches(4, prefetch=1, shuffle_buffer=10, block_rows=3):
            break
    assert threading.active_count() == baseline

    calls = {"n": 0}
    original = ShardFiles.load_rows

    def failing(self, shard, name, start, stop):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return original(self, shard, name, start, stop)

    monkeypatch.setattr(ShardFiles, "load_rows", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        list(store.batches(4, shuffle_buffer=10, block_rows=5))
    assert threading.active_count() == baseline


# ------------------------------------------------------------------------------------------------------
# Parallel reading: workers
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_token_once_per_epoch_and_the_same_epoch_for_any_worker_count(tmp_path, workers, shuffle):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    kwargs = dict(shuffle=shuffle, shuffle_buffer=45, block_rows=6, extras=["labels"], seed=11, epochs=2)
    reference = store.batches(17, workers=1, **kwargs)
    batches = store.batches(17, workers=workers, **kwargs)
    for _epoch in range(2):
        want, out = list(reference), list(batches)
        rows = torch.cat(rows_of(out))
        assert torch.equal(rows.sort().values, torch.arange(200))  # every token exactly once
        for xb, labels in out:
            assert torch.equal(xb, x[xb[:, 0].long()]) and torch.equal(labels, 3 * xb[:, 0].long() + 1)
        assert len(out) == len(want)  # ...and bit for bit the batches of one worker
        for (xb, labels), (xw, lw) in zip(out, want):
            assert torch.equal(xb, xw) and torch.equal(labels, lw)
    assert list(batches) == []  # two epochs asked for


@pytest.mark.parametrize("workers", [2, 4])
def test_worker_count_does_not_change_bf16_batches_or_shares(tmp_path, workers):
    x = indexed(200, d=10).to(torch.bfloat16)
    store = ActivationStore(ragged_store(tmp_path, x.float(), dtype=torch.bfloat16))
    for dtype in (None, torch.float32):
        for shard in (None, (1, 3)):
            one = list(store.batches(24, dtype=dtype, shard=shard, shuffle_buffer=70, block_rows=9, workers=1))
            many = list(store.batches(24, dtype=dtype, shard=shard, shuffle_buffer=70, block_rows=9,
                                      workers=workers))
            assert len(one) == len(many)
            assert all(a.dtype == b.dtype == (dtype or torch.bfloat16) and torch.equal(a, b)
                       for a, b in zip(one, many))


def test_batch_memory_is_reused_only_once_the_consumer_lets_go(tmp_path):
    x = indexed(400, d=8)
    store = ActivationStore(ragged_store(tmp_path, x, sizes=[100, 150, 150]))
    batches = store.batches(16, extras=["labels"], shuffle_buffer=64, block_rows=8, workers=2, epochs=None)
    held, views = [], []
    for _epoch in range(3):
        for i, (xb, labels) in enumerate(batches):
            if i % 3 == 0:
                held.append((xb.clone(), labels.clone(), xb, labels))  # what it held then, and the batch itself
            elif i % 3 == 1:
                views.append((xb[:, 0].clone(), xb[:, 0]))  # a view keeps the whole batch's memory
    for want_x, want_labels, xb, labels in held:  # never overwritten by a later batch
        assert torch.equal(xb, want_x) and torch.equal(labels, want_labels)
        assert torch.equal(xb, x[xb[:, 0].long()]) and torch.equal(labels, 3 * xb[:, 0].long() + 1)
    assert all(torch.equal(view, want) for want, view in views)

    from saefast.data.store.batches import OutputArrays

    pool = OutputArrays(keep=2)
    first = pool.take((4, 3), np.dtype(np.float32))
    view = torch.from_numpy(first)[:, 1]  # a user holds a view of it: not reusable
    del first
    second = pool.take((4, 3), np.dtype(np.float32))
    assert second.ctypes.data != view.data_ptr() - 4
    address = second.ctypes.data
    del second  # let go: handed out again
    assert pool.take((4, 3), np.dtype(np.float32)).ctypes.data == address
    assert pool.take((5, 3), np.dtype(np.float32)).shape == (5, 3)  # another shape: a new array
    assert len(pool.arrays) == 2


def test_epochs_read_at_once_share_buffers_without_mixing(tmp_path, monkeypatch):
    import time

    import saefast.data.store.batches as store_batches

    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    kwargs = dict(shuffle_buffer=48, block_rows=8, workers=2, extras=["labels"])
    want = [list(store.batches(30, **kwargs).iter_epoch(e)) for e in (0, 1)]
    original = store_batches.StoreBatches._assemble

    def slow_tail(self, pending):  # the last (short) batch of an epoch is gathered late
        if sum(len(rows) for _, rows in pending) < 30:
            time.sleep(0.3)
        return original(self, pending)

    monkeypatch.setattr(store_batches.StoreBatches, "_assemble", slow_tail)
    batches = store.batches(30, **kwargs)
    first = batches.iter_epoch(0)
    got = [next(first) for _ in range(len(want[0]) - 1)]  # all but the last batch, still being gathered...
    time.sleep(0.01)
    second = batches.iter_epoch(1)  # ...while another epoch fills buffers
    got_second = [next(second)]
    got.append(next(first))
    got_second += list(second)
    for got_epoch, want_epoch in ((got, want[0]), (got_second, want[1])):
        assert len(got_epoch) == len(want_epoch)
        for (xa, la), (xw, lw) in zip(got_epoch, want_epoch):
            assert torch.equal(xa, xw) and torch.equal(la, lw)
    assert list(first) == []


def test_fp32_store_to_bf16_and_fp16_batches(tmp_path):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path, x))
    for dtype in (torch.bfloat16, torch.float16):
        out = list(store.batches(64, dtype=dtype, workers=2, shuffle=False))
        assert all(b.dtype == dtype for b in out)
        assert torch.equal(torch.cat(out), x.to(dtype))


@pytest.mark.parametrize("workers", [1, 4])
def test_a_flipped_byte_is_named_by_parallel_readers_before_its_rows_are_used(tmp_path, workers):
    x = indexed(200)
    ragged_store(tmp_path, x)
    bad = shard_file(tmp_path, 4)  # rows 107..129
    flip_last_byte(bad)
    store = ActivationStore(tmp_path)
    seen = []
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        for batch in store.batches(8, workers=workers, shuffle_buffer=32, block_rows=4):
            seen.append(batch)
    # No batch delivered before the error holds a row of the bad shard.
    rows = torch.cat(rows_of(seen)) if seen else torch.empty(0, dtype=torch.long)
    assert not ((rows >= 107) & (rows < 130)).any()
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        store.verify()  # hashed in parallel; the bad file is named


@pytest.mark.parametrize("where", ["read", "gather"])
def test_a_worker_that_dies_raises_in_the_consumer_instead_of_hanging(tmp_path, monkeypatch, where):
    import saefast.data.store.batches as store_batches

    store = ActivationStore(ragged_store(tmp_path, indexed(200)))
    baseline = threading.active_count()
    calls = {"n": 0}
    if where == "read":
        original = ShardFiles.load_rows

        def failing(self, shard, name, start, stop):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(f"worker {threading.current_thread().name} lost its disk")
            return original(self, shard, name, start, stop)

        monkeypatch.setattr(ShardFiles, "load_rows", failing)
    else:
        original = store_batches.gather_rows_

        def failing(sources, source_index, row_index, out):
            calls["n"] += 1
            if calls["n"] > 3:
                raise MemoryError("gather worker out of memory")
            return original(sources, source_index, row_index, out)

        monkeypatch.setattr(store_batches, "gather_rows_", failing)
    done = {}

    def consume():
        try:
            list(store.batches(4, workers=4, prefetch=2, shuffle_buffer=20, block_rows=3))
        except BaseException as err:
            done["error"] = err

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "the consumer hung on a dead worker"
    error = done.get("error")
    if where == "read":
        assert isinstance(error, OSError) and "saefast-store-read" in str(error)
    else:
        assert isinstance(error, MemoryError) and "out of memory" in str(error)
    assert threading.active_count() == baseline  # every worker is gone


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_stays_bounded_while_reading_a_store_twice_the_limit(tmp_path):
    # 128 MiB of activations (32 shards of 4 MiB); the stated bound is 64 MiB of anonymous memory above the
    # start. The reader's own bound is three shuffle buffers (3 × 4 MiB) and prefetch + workers = 6 batches of
    # 0.25 MiB; glibc's per-thread arenas and its sliding mmap threshold keep some freed buffers, which settles
    # near 34 MiB here (19 MiB with MALLOC_MMAP_THRESHOLD_ fixed) and does not grow with the store. The store's
    # file pages are page cache (RssFile), not RssAnon.
    limit = 64 << 20
    d, shard_rows, shards = 256, 4096, 32
    writer = StoreWriter(tmp_path, {"h": d}, dtype=torch.float32)
    rows = torch.randn(shard_rows, d, generator=torch.Generator().manual_seed(0))
    for shard in range(shards):
        writer.append({"h": rows + shard})
    writer.finish()
    assert d * 4 * shard_rows * shards == 2 * limit
    store = ActivationStore(tmp_path)
    gc.collect()
    start, peak, rows = _rss_anon_bytes(), 0, 0
    for batch in store.batches(256, shuffle_buffer=4096, block_rows=512, workers=2, prefetch=4):
        rows += batch.shape[0]
        peak = max(peak, _rss_anon_bytes() - start)
        del batch
    assert rows == shard_rows * shards
    assert peak < limit, f"RssAnon grew by {peak / 2**20:.1f} MiB reading a {2 * limit >> 20} MiB store"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_on_the_device(tmp_path):
    x = indexed(200)
    store = ActivationStore(ragged_store(tmp_path / "fp32", x, dtype=torch.float32), verify="none")
    out = list(store.batches(64, device="cuda", extras=["labels"]))
    assert all(b[0].is_cuda and b[1].is_cuda and b[0].dtype == torch.float32 for b in out)
    rows = torch.cat([b[0][:, 0].long().cpu() for b in out])
    assert torch.equal(rows.sort().values, torch.arange(200))
    # Many epochs through the pinned ring, bf16 converted on the GPU: the same batches as on the CPU, bit for bit.
    bf16 = ActivationStore(ragged_store(tmp_path / "bf16", x, dtype=torch.bfloat16), verify="none")
    on_cpu = bf16.batches(16, epochs=3, seed=5, extras=["labels"])
    on_gpu = bf16.batches(16, epochs=3, seed=5, extras=["labels"], device="cuda")
    for _ in range(3):
        for (a, la), (b, lb) in zip(on_cpu, on_gpu, strict=True):
            assert b.dtype == torch.float32 and torch.equal(a, b.cpu()) and torch.equal(la, lb.cpu())


def test_training_an_sae_on_store_batches_lowers_the_loss(tmp_path):
    data = SyntheticSparseData(d_in=16, n_features=32, active=2, seed=0)
    store = write_store(tmp_path, data.sample(4096), shard_tokens=1000, dtype=torch.bfloat16)
    sae = sf.SAE(sf.SAEConfig(d_in=16, n_latents=64, k=2), seed=0)
    history = sf.train(sae, store.batches(256, epochs=None, shuffle_buffer=1024, block_rows=128), steps=120,
                       lr=3e-3, progress=False, log_every=20)
    assert history[-1]["fvu"] < 0.5 * history[0]["fvu"]
    assert history[-1]["tokens"] == 120 * 256  # 7.5 epochs of 16 batches: re-iterated by train


# ------------------------------------------------------------------------------------------------------
# Writing, resuming
# ------------------------------------------------------------------------------------------------------


def test_writer_resumes_and_removes_half_written_files(tmp_path):
    x = indexed(100)
    writer = StoreWriter(tmp_path, {"h": 6}, dtype=torch.float32, metadata={"m": 1})
    assert (writer.tokens, writer.state, writer.complete) == (0, {}, False)
    writer.append({"h": x[:30]}, state={"docs": 3, "rng": [1, 2]})
    writer.append({"h": x[30:50]}, state={"docs": 5, "rng": [3, 4]})
    # A crash while writing shard 2: a renamed-but-unlisted shard file and a temp file remain.
    stray = tmp_path / "shard00002.h.npy"
    np.save(stray, np.zeros((7, 6), np.float32))
    temp = tmp_path / ".shard00002.h.npy.abc123.tmp"
    temp.write_bytes(b"partial")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    partial = ActivationStore(tmp_path)
    assert (len(partial), partial.n_shards, partial.complete) == (50, 2, False)
    assert partial.state == {"docs": 5, "rng": [3, 4]}

    resumed = StoreWriter(tmp_path, {"h": 6}, dtype=torch.float32, metadata={"m": 1})
    assert (resumed.tokens, resumed.state, resumed.n_shards) == (50, {"docs": 5, "rng": [3, 4]}, 2)
    assert not stray.exists() and not temp.exists() and notes.exists()
    resumed.append({"h": x[50:100]})
    resumed.finish()
    store = ActivationStore(tmp_path, verify="eager")
    assert store.complete and store.n_shards == 3 and store.state == {}
    assert torch.equal(store.read(0, 100), x)
    with pytest.raises(StoreError, match="complete"):
        StoreWriter(tmp_path, {"h": 6}, dtype=torch.float32, metadata={"m": 1}).append({"h": x[:5]})


@pytest.mark.parametrize(
    "change,field",
    [({"hooks": {"h": 7}}, "hooks"), ({"hooks": {"g": 6}}, "hooks"), ({"dtype": torch.bfloat16}, "dtype"),
     ({"metadata": {"m": 2}}, "metadata"), ({"metadata": None}, "metadata"),
     ({"extras": {"labels": torch.int64}}, "extras")],
)
def test_resuming_with_other_settings_is_refused(tmp_path, change, field):
    settings = {"hooks": {"h": 6}, "dtype": torch.float32, "metadata": {"m": 1}}
    StoreWriter(tmp_path, **settings).append({"h": torch.randn(4, 6)})
    with pytest.raises(StoreError, match=rf"{field}(\.\w+)*: the store has"):
        StoreWriter(tmp_path, **{**settings, **change})
    assert len(ActivationStore(tmp_path)) == 4  # untouched


def test_a_failed_manifest_write_keeps_the_previous_store(tmp_path, monkeypatch):
    x = indexed(40)
    writer = StoreWriter(tmp_path, {"h": 6}, dtype=torch.float32)
    writer.append({"h": x[:20]}, state={"k": 1})

    def crash(path, data):
        raise OSError("power cut")

    monkeypatch.setattr(store_writer, "atomic_write_bytes", crash)
    with pytest.raises(OSError, match="power cut"):
        writer.append({"h": x[20:]}, state={"k": 2})
    monkeypatch.undo()
    store = ActivationStore(tmp_path, verify="eager")
    assert (len(store), store.state) == (20, {"k": 1})
    assert (tmp_path / "shard00001.h.npy").exists()  # written, never listed...
    StoreWriter(tmp_path, {"h": 6}, dtype=torch.float32)
    assert not (tmp_path / "shard00001.h.npy").exists()  # ...and removed on resume


def test_write_store_refuses_to_overwrite_unless_asked(tmp_path):
    write_store(tmp_path, torch.randn(50, 3), shard_tokens=20)
    with pytest.raises(StoreError, match="already holds"):
        write_store(tmp_path, torch.randn(10, 3))
    y = torch.randn(30, 4)
    store = write_store(tmp_path, {"a": y, "b": -y}, shard_tokens=7, dtype=torch.float32, overwrite=True,
                        extras={"labels": torch.arange(30)})
    assert store.hooks == {"a": 4, "b": 4} and len(store) == 30 and store.n_shards == 5
    assert len(list(tmp_path.glob("shard*.npy"))) == 15  # the old store's shards are gone
    assert torch.equal(ActivationStore(tmp_path, hook="b").read(0, 30), -y)


# ------------------------------------------------------------------------------------------------------
# Corruption
# ------------------------------------------------------------------------------------------------------


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x40
    file.write_bytes(bytes(data))


def test_flipped_byte_is_named_eagerly_and_lazily(tmp_path):
    x = indexed(200)
    ragged_store(tmp_path, x)
    bad = shard_file(tmp_path, 3)  # rows 43..106
    flip_last_byte(bad)
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        ActivationStore(tmp_path, verify="eager")
    lazy = ActivationStore(tmp_path)  # opening does not hash
    assert torch.equal(lazy.read(0, 43), x[:43])  # untouched shards read fine
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        lazy.read(40, 50)
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        lazy.read(100, 101)  # still refused on the second touch
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        list(ActivationStore(tmp_path).batches(16))  # raised in the prefetch thread, re-raised here
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        ActivationStore(tmp_path, verify="none").verify()
    trusting = ActivationStore(tmp_path, verify="none")
    assert not torch.equal(trusting.read(0, 200), x)  # the flip is real and goes unnoticed without hashing


@pytest.mark.parametrize("checksum", ["xxh3_128", "sha256"])
@pytest.mark.parametrize("old_store", [False, True])
def test_the_checksums_catch_a_flipped_byte_and_name_the_shard(tmp_path, checksum, old_store):
    import xxhash

    x = indexed(200)
    ragged_store(tmp_path, x)
    manifest = json.loads((tmp_path / st.MANIFEST).read_text())
    for shard in manifest["shards"]:  # the writer records both hashes of every file
        for entry in shard["files"].values():
            data = (tmp_path / entry["file"]).read_bytes()
            assert entry["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    if old_store:  # a store written before XXH3: every reader falls back to SHA-256
        edit_manifest(tmp_path, lambda m: [entry.pop("xxh3_128") for shard in m["shards"]
                                            for entry in shard["files"].values()])
    bad = shard_file(tmp_path, 2)
    flip_last_byte(bad)
    what = "XXH3-128" if checksum == "xxh3_128" and not old_store else "SHA-256"
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt \\(its {what} does not match"):
        ActivationStore(tmp_path, verify="eager", checksum=checksum)
    store = ActivationStore(tmp_path, checksum=checksum)
    assert torch.equal(store.read(0, 42), x[:42])
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt \\(its {what}"):
        list(store.batches(10, workers=2))
    with pytest.raises(ValueError, match="checksum must be one of"):
        ActivationStore(tmp_path, checksum="md5")


def test_a_shard_truncated_after_opening_is_named_by_the_readers(tmp_path):
    ragged_store(tmp_path, indexed(200))
    unmapped = ActivationStore(tmp_path, verify="none")  # opened before, its files not mapped yet
    batches = ActivationStore(tmp_path, verify="none").batches(16, workers=2, epochs=2)
    assert sum(len(b) for b in batches) == 200  # the first epoch maps every file
    bad = shard_file(tmp_path, 5)
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(StoreError, match=f"cannot map {bad.name} \\(it is {bad.stat().st_size} bytes"):
        list(unmapped.batches(16, workers=2))
    # Mapped already: the read-ahead of its last block fails (where a plain access would die of SIGBUS).
    with pytest.raises(StoreError, match=f"cannot read {bad.name}"):
        list(batches)


def test_corrupt_extra_column_is_named(tmp_path):
    ragged_store(tmp_path, indexed(200))
    bad = shard_file(tmp_path, 0, "labels")
    flip_last_byte(bad)
    store = ActivationStore(tmp_path)
    assert len(list(store.batches(50))) == 4  # the hook's files are fine
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt"):
        list(store.batches(50, extras=["labels"]))


def test_truncated_and_missing_shards_are_named_at_open(tmp_path):
    ragged_store(tmp_path, indexed(200))
    shard = shard_file(tmp_path, 2)
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(StoreError, match=f"{shard.name} is .* bytes but"):
        ActivationStore(tmp_path, verify="none")
    with pytest.raises(StoreError, match=f"{shard.name} is .* bytes but"):
        StoreWriter(tmp_path, {"h": 6}, dtype=torch.float32, extras={"labels": torch.int64},
                    metadata={"source": "test"})
    shard.unlink()
    with pytest.raises(StoreError, match=f"{shard.name} .* is missing"):
        ActivationStore(tmp_path, verify="none")


def test_a_shard_with_a_different_shape_is_named(tmp_path):
    ragged_store(tmp_path, indexed(200), labels=False)
    shard = shard_file(tmp_path, 0)  # 37 x 6: replaced by a 6 x 37 array of the same byte size
    np.save(shard, np.zeros((6, 37), np.float32))
    manifest = json.loads((tmp_path / st.MANIFEST).read_text())
    assert manifest["shards"][0]["files"]["h"]["bytes"] == shard.stat().st_size
    with pytest.raises(StoreError, match=rf"{shard.name} holds a \(6, 37\) float32 array"):
        ActivationStore(tmp_path, verify="none")


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / st.MANIFEST).read_text())
    edit(manifest)
    (path / st.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(format="other"), "not a saefast activation store file"),
        (lambda m: m.update(version=2), "unsupported version 2"),
        (lambda m: m.pop("shards"), "field shards must be present"),
        (lambda m: m.update(dtype="int8"), "field dtype must be one of"),
        (lambda m: m.update(tokens=199), "field tokens must be the sum of the shard tokens"),
        (lambda m: m["hooks"].update(h={"d": 0}), r"field hooks\['h'\].d must be a positive integer"),
        (lambda m: m["shards"][1].update(index=7), r"field shards\[1\].index must be 1"),
        (lambda m: m["shards"][2]["files"]["h"].update(file="../../etc/passwd"), r"shards\[2\].files\['h'\].file"),
        (lambda m: m["shards"][2]["files"].pop("labels"), r"shards\[2\].files must be an object"),
        (lambda m: m["shards"][3]["files"]["h"].update(sha256="xyz"), r"shards\[3\].files\['h'\].sha256"),
        (lambda m: m["shards"][4]["files"]["h"].update(xxh3_128="ab" * 20), r"shards\[4\].files\['h'\].xxh3_128"),
    ],
)
def test_a_bad_manifest_field_is_named(tmp_path, edit, match):
    ragged_store(tmp_path, indexed(200))
    edit_manifest(tmp_path, edit)
    with pytest.raises(StoreError, match=match):
        ActivationStore(tmp_path)


def test_missing_or_unparsable_manifest_is_named(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "nowhere")
    ragged_store(tmp_path, indexed(200))
    (tmp_path / st.MANIFEST).write_text('{"format": "saefast-activations", ')
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        ActivationStore(tmp_path)
    (tmp_path / st.MANIFEST).unlink()
    with pytest.raises(StoreError, match="missing manifest.json"):
        ActivationStore(tmp_path)


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def test_bad_appends_are_refused_before_anything_is_written(tmp_path):
    writer = StoreWriter(tmp_path, {"a": 4, "b": 2}, dtype=torch.float16, extras={"labels": torch.int32})
    good = {"a": torch.randn(5, 4), "b": torch.randn(5, 2)}
    labels = {"labels": torch.arange(5)}
    nan = torch.randn(5, 2)
    nan[3, 1] = float("nan")
    cases = [
        ({**good, "a": torch.randn(5, 3)}, labels, ValueError, r"hook 'a' must have shape \[n, 4\]"),
        ({**good, "b": nan}, labels, ValueError, "hook 'b' contains NaN or Inf"),
        ({**good, "a": torch.full((5, 4), float("inf"))}, labels, ValueError, "hook 'a' contains NaN or Inf"),
        ({**good, "a": torch.full((5, 4), 1e5)}, labels, ValueError, "hook 'a'.* overflow torch.float16"),
        ({**good, "b": torch.randn(6, 2)}, labels, ValueError, "hook 'b' has 6 rows but the other tensors have 5"),
        (good, {"labels": torch.arange(4)}, ValueError, "extra 'labels' has 4 rows"),
        ({"a": good["a"]}, labels, ValueError, r"missing \['b'\]"),
        ({**good, "c": torch.randn(5, 1)}, labels, ValueError, r"unknown \['c'\]"),
        (good, None, ValueError, r"extras .* missing \['labels'\]"),
        (good, {**labels, "x": torch.arange(5)}, ValueError, r"unknown \['x'\]"),
        ({"a": torch.randn(0, 4), "b": torch.randn(0, 2)}, {"labels": torch.arange(0)}, ValueError, "0 rows"),
        ({**good, "a": torch.ones(5, 4, dtype=torch.int64)}, labels, TypeError, "floating dtype"),
        (good, {"labels": torch.rand(5)}, TypeError, "declared torch.int32"),
        (good, {"labels": torch.tensor([0, 1, 2, 3, 2**40])}, ValueError, "do not fit"),
        ({**good, "a": good["a"].numpy()}, labels, TypeError, "must be a torch.Tensor"),
    ]
    for acts, extras, error, match in cases:
        with pytest.raises(error, match=match):
            writer.append(acts, extras)
    with pytest.raises(ValueError, match="JSON-serializable"):
        writer.append(good, labels, state={"x": object()})
    assert writer.tokens == 0 and sorted(p.name for p in tmp_path.iterdir()) == [st.MANIFEST]
    writer.append({**good, "a": good["a"].double()}, {"labels": torch.arange(5, dtype=torch.int16)})
    assert writer.tokens == 5


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        StoreWriter(tmp_path / "w", {"h": 3}, dtype=torch.float64)
    with pytest.raises(ValueError, match="d must be a positive integer"):
        StoreWriter(tmp_path / "w", {"h": 0})
    with pytest.raises(ValueError, match="not hook names"):
        StoreWriter(tmp_path / "w", {"h": 3}, extras={"h": torch.int64})
    with pytest.raises(ValueError, match="contains NaN"):
        write_store(tmp_path / "nan", torch.tensor([[1.0], [float("nan")]]), shard_tokens=1)
    assert not (tmp_path / "nan" / st.MANIFEST).exists()  # checked before anything was written
    store = ActivationStore(ragged_store(tmp_path / "s", indexed(200)))
    with pytest.raises(ValueError, match="verify must be one of"):
        ActivationStore(tmp_path / "s", verify="sometimes")
    for kwargs, match in [({"batch_size": 0}, "batch_size must be >= 1"), ({"batch_size": 4, "epochs": 0}, "epochs"),
                          ({"batch_size": 4, "shuffle_buffer": 0}, "shuffle_buffer"),
                          ({"batch_size": 4, "block_rows": -1}, "block_rows"), ({"batch_size": 4, "seed": -1}, "seed"),
                          ({"batch_size": 300, "drop_last": True}, "leaves no batch")]:
        with pytest.raises(ValueError, match=match):
            store.batches(**kwargs)
    with pytest.raises(StoreError, match="no extra 'tokens'"):
        store.batches(4, extras=["tokens"])
    with pytest.raises(StoreError, match="no extra 'tokens'"):
        store.read_extra("tokens", 0, 4)
    with pytest.raises(TypeError, match="floating torch dtype"):
        store.batches(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="no tokens"):
        store.subset(10, 10).batches(4)


def test_without_madv_populate_read_the_gather_faults_the_pages_in(tmp_path, monkeypatch):
    """Where the kernel lacks MADV_POPULATE_READ (before 5.14) blocks are read into the page cache and the gather
    faults them into the mapping; the batches are the same."""
    import mmap

    import saefast.data.store.reader as store_reader

    def epoch(store):
        batches = list(store.batches(16, seed=3, extras=["labels"], shuffle_buffer=50, block_rows=7))
        return torch.cat([x for x, _ in batches]), torch.cat([labels for _, labels in batches])

    store = ActivationStore(ragged_store(tmp_path, indexed(200)))
    want = epoch(store)
    assert sorted(want[1].tolist()) == list(range(1, 600, 3))
    monkeypatch.setattr(store_reader, "_resident", lambda address, lo, hi: False)  # as if evicted: read again
    monkeypatch.setattr(store_reader, "MADV_POPULATE_READ", 4321)  # advice this kernel refuses: EINVAL
    fresh = ActivationStore(tmp_path)
    assert fresh.shard_files.populate == hasattr(mmap.mmap, "madvise")
    assert all(torch.equal(a, b) for a, b in zip(want, epoch(fresh)))
    assert not fresh.shard_files.populate  # switched off for good


def test_blocks_in_memory_are_not_read_again_and_evicted_ones_are(tmp_path, monkeypatch):
    import saefast.data.store.reader as store_reader
    from saefast.bench.data import drop_cache

    if store_reader._MINCORE is None:
        pytest.skip("mincore is Linux's")
    write_store(tmp_path, torch.randn(4096, 64), shard_tokens=1024)  # files of 256 KiB: pages the kernel can drop
    reads = []
    original = ShardFiles._read_into_cache

    def counting(self, file, lo, hi):
        reads.append(file)
        return original(self, file, lo, hi)

    monkeypatch.setattr(ShardFiles, "_read_into_cache", counting)
    assert sum(len(x) for x in ActivationStore(tmp_path).batches(256, block_rows=128)) == 4096
    assert reads == []  # just written: every block is in the page cache
    files = sorted(tmp_path.glob("shard*.npy"))
    drop_cache(files)
    mapping = ActivationStore(tmp_path).shard_files._mapping(0, "activations")  # mapped, untouched
    if store_reader._resident(mapping.address, 0, len(mapping.map)):
        pytest.skip("this file system keeps the files in memory (tmpfs): nothing can be evicted")
    del mapping
    # verify="none": a lazy check would read each file whole (into the page cache) before its first block
    assert sum(len(x) for x in ActivationStore(tmp_path, verify="none").batches(256, block_rows=128)) == 4096
    assert sorted(set(reads)) == sorted(f.name for f in files)  # evicted: read again, every file
    assert len(reads) <= 4096 // 128  # at most once per block (the kernel's own read-ahead may bring in more)
