"""Throughput of the store reader (``store.batches``) against the machine's copy bandwidth and the disk.

    python bench/bench_reader.py --json bench/results/cpu_reader.json

For each width ``d`` a bf16 store of ``--mib`` MiB of random rows (shards of ``--shard-rows``) is written to
``--dir``; one shuffled epoch of ``store.batches(--batch, shuffle_buffer=--shuffle-buffer)`` is timed per output
dtype (bf16 = ``dtype=None``, fp32) and ``workers``:

* **cold**: the page cache dropped first (``/proc/sys/vm/drop_caches`` where this process may write it, else
  ``POSIX_FADV_DONTNEED`` on every shard file; the JSON says which), the default lazy XXH3-128 check on, as in
  training;
* **warm**: ``verify="none"``, the files in the page cache, the third epoch of one ``StoreBatches`` (its shuffle
  buffers recycled).

Rows/s and GB/s count the stored bytes read (``rows·d·2``). Beside them: ``memcpy``, the one-thread ``torch``
copy bandwidth of a 256 MiB buffer, and ``disk``, a plain sequential read of the same files after the same cache
drop (1 MiB ``readinto``). The gpu preset's need: ``N = 8,192`` rows per training step of ``--step-ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

import saefast as sf
from saefast.data.store import ActivationStore


def drop_cache(files: list[Path]) -> str:
    """Empty the page cache of ``files``; how it was done."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return "drop_caches"
    except OSError:
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed"


def sequential_read(files: list[Path]) -> float:
    """Bytes/s of a plain sequential read of ``files`` into one 1 MiB buffer."""
    buffer = bytearray(1 << 20)
    view, total, t0 = memoryview(buffer), 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(view):
                total += n
    return total / (time.perf_counter() - t0)


def copy_bandwidth() -> float:
    """Bytes/s of ``dst.copy_(src)`` on 256 MiB (one thread; read + write counted once, as a memcpy's size)."""
    src, dst = torch.empty(1 << 28, dtype=torch.uint8).fill_(1), torch.empty(1 << 28, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        return 4 * src.numel() / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def epoch_seconds(path: Path, batch: int, buffer: int, dtype, workers: int, verify: str,
                  epochs: int = 1) -> tuple[float, int]:
    """Seconds and rows of the last of ``epochs`` epochs of one :class:`StoreBatches`."""
    store = ActivationStore(path, verify=verify)
    batches = store.batches(batch, shuffle_buffer=buffer, dtype=dtype, workers=workers, seed=0, epochs=epochs)
    for _ in range(epochs):
        t0, rows = time.perf_counter(), 0
        for x in batches:
            rows += x.shape[0]
        seconds = time.perf_counter() - t0
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 2304])
    parser.add_argument("--mib", type=int, default=384, help="size of each store (bf16)")
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--shard-rows", type=int, default=16384, help="rows per shard file, as a harvest writes")
    parser.add_argument("--shuffle-buffer", type=int, default=1 << 15,
                        help="rows per shuffle buffer (the default 2^18 would hold a whole small store)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default="/tmp/saefast-bench-reader")
    parser.add_argument("--step-ms", type=float, default=12.0, help="the gpu preset's training step, ms")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(args.dir)
    rows_out, copy_bw = [], copy_bandwidth()
    print(f"memcpy (1 thread): {copy_bw / 1e9:.1f} GB/s")
    try:
        for d in args.dims:
            n = (args.mib << 20) // (2 * d)
            path = root / f"d{d}"
            shutil.rmtree(path, ignore_errors=True)
            sf.write_store(path, torch.randn(n, d), shard_tokens=args.shard_rows,
                           dtype=torch.bfloat16)
            files = sorted(path.glob("shard*.npy"))
            how = drop_cache(files)
            disk = sequential_read(files)
            print(f"d={d}: {n} rows, disk sequential {disk / 1e9:.2f} GB/s (cache: {how})")
            for out in (None, torch.float32):
                for workers in args.workers:
                    for phase in ("cold", "warm"):
                        if phase == "cold":
                            drop_cache(files)
                        seconds, rows = epoch_seconds(path, args.batch, args.shuffle_buffer, out, workers,
                                                      "lazy" if phase == "cold" else "none",
                                                      1 if phase == "cold" else 3)
                        assert rows == n
                        row = {"d": d, "out": "bf16" if out is None else "fp32", "workers": workers,
                               "phase": phase, "rows_per_s": rows / seconds,
                               "gb_per_s": rows * d * 2 / seconds / 1e9, "disk_gb_per_s": disk / 1e9,
                               "copy_gb_per_s": copy_bw / 1e9, "cache_drop": how}
                        rows_out.append(row)
                        print(f"  {row['out']} workers={workers} {phase}: {row['rows_per_s'] / 1e6:.2f} M rows/s, "
                              f"{row['gb_per_s']:.2f} GB/s", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    need = 8192 / (args.step_ms / 1e3)
    print(f"gpu preset: N=8192 rows per {args.step_ms} ms step = {need / 1e6:.2f} M rows/s "
          f"= {need * 2304 * 2 / 1e9:.2f} GB/s of bf16 at d=2304")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "copy_gb_per_s": copy_bw / 1e9, "need_rows_per_s": need,
            "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
