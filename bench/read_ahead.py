"""How a cold block of an activation store is best brought into memory: one cold epoch of the store reader per
method of ``ShardFiles._read_into_cache`` (the step before a block's rows are mapped and gathered).

    python bench/read_ahead.py                       # a 1 GiB bf16 store at d = 2,304 under /tmp, 3 rounds
    python bench/read_ahead.py --mib 256 --rounds 1  # a smoke run

Methods (each then maps the range with ``MADV_POPULATE_READ``, as the reader does):

* ``read_through`` — plain 4 MiB reads into a scratch that stays in cache (the reader's method);
* ``sendfile`` — ``sendfile`` of the block to ``/dev/null``: the kernel reads the pages, nothing is copied;
* ``populate`` — nothing first: ``MADV_POPULATE_READ`` faults the cold range in itself;
* ``willneed`` — ``posix_fadvise(POSIX_FADV_WILLNEED)`` on the block, then the populate waits for it.

Each round and method: the store's files evicted (``POSIX_FADV_DONTNEED``), a fresh ``ActivationStore(...,
verify="none")`` (so no hash reads the files first), one epoch of ``batches(8192, shuffle_buffer=32768,
dtype=None, workers=2)``; GB/s of stored bf16 delivered, beside a plain sequential read of the same files after the
same eviction (16 MiB reads, ``POSIX_FADV_SEQUENTIAL``). Methods are interleaved per round. A warm epoch is the same
for every method: a block already in memory is not read again (``mincore``). Prints a markdown table (median and
range over the rounds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saefast.bench.data import drop_cache, sequential_read
from saefast.data.store import ActivationStore, write_store
from saefast.data.store import reader as store_reader

ORIGINAL = store_reader.ShardFiles._read_into_cache


def _populate_only(self, file, lo, hi):
    return None


def _sendfile(self, file, lo, hi):
    with open(os.devnull, "wb", buffering=0) as null, open(self.root / file, "rb", buffering=0) as handle:
        while lo < hi:
            sent = os.sendfile(null.fileno(), handle.fileno(), lo, hi - lo)
            if not sent:
                raise OSError(f"{file} ended early")
            lo += sent


def _willneed(self, file, lo, hi):
    fd = os.open(self.root / file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


METHODS = {"read_through": ORIGINAL, "sendfile": _sendfile, "populate": _populate_only, "willneed": _willneed}


def cold_epoch(path: Path, files: list[Path], method: str, d: int) -> float:
    """GB/s of one cold epoch with ``method``."""
    drop_cache(files)
    store_reader.ShardFiles._read_into_cache = METHODS[method]
    try:
        store = ActivationStore(path, verify="none")
        t0, rows = time.perf_counter(), 0
        for x in store.batches(8192, shuffle_buffer=1 << 15, dtype=None, workers=2):
            rows += x.shape[0]
        return rows * d * 2 / (time.perf_counter() - t0) / 1e9
    finally:
        store_reader.ShardFiles._read_into_cache = ORIGINAL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the bf16 store (default 1024)")
    parser.add_argument("--d", type=int, default=2304, help="row width (default 2304)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every method (default 3)")
    parser.add_argument("--dir", default=None, help="where to write the store (default: the temp directory)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="saefast-read-ahead-", dir=args.dir))
    try:
        n = (args.mib << 20) // (2 * args.d)
        write_store(root / "store", torch.randn(n, args.d, generator=torch.Generator().manual_seed(0)),
                    shard_tokens=16384, dtype=torch.bfloat16)
        files = sorted((root / "store").glob("shard*.npy"))
        seen: dict[str, list[float]] = {name: [] for name in [*METHODS, "disk sequential read"]}
        for _ in range(args.rounds):
            for method in METHODS:
                seen[method].append(cold_epoch(root / "store", files, method, args.d))
            drop_cache(files)
            seen["disk sequential read"].append(sequential_read(files) / 1e9)
        print(f"Cold epochs, d = {args.d}, {args.mib} MiB bf16 store, 2 workers, {args.rounds} rounds (GB/s)\n")
        print("| method | median | range |\n|---|---:|---:|")
        for name, values in seen.items():
            print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
