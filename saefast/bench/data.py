"""The ``data`` case of ``saefast bench``: the activation-store reader's throughput against the machine.

For each width ``d`` a bf16 store of ``mib`` MiB of random rows (shards of ``shard_rows``) is written under
``directory`` (and removed after); one shuffled epoch of ``store.batches(batch, shuffle_buffer=...)`` is timed per
output dtype (``bf16``: ``dtype=None``; ``fp32``) and per ``workers``:

* **cold**: the store's files evicted from the page cache first (``POSIX_FADV_DONTNEED`` on every shard file) and a
  fresh reader with the default lazy XXH3-128 check, as in the first epoch after a harvest;
* **warm**: ``verify="none"``, the files in the page cache, from the third epoch of one ``StoreBatches`` on (its
  maps open and its batch memory recycled).

Rows/s and GB/s count the stored bytes delivered (``rows · d · 2``). Beside them: ``copy_gb_per_s``, a one-thread
``torch`` copy of 256 MiB (the machine's memory bandwidth for one core), and ``disk_gb_per_s``, a plain sequential
read of the same files after the same cache drop (16 MiB ``readinto``, ``POSIX_FADV_SEQUENTIAL``). The need of a
training step: ``N`` rows per step of ``step_ms``, ``need = N / step`` rows/s (``need · d · 2`` bytes/s of bf16).
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..data.store import ActivationStore, write_store
from .run import git_revision

DATA_DIMS = (576, 2304)
"""Widths the data case measures: SmolLM2-135M's residual stream and Gemma-2-2B's (the gpu preset's ``d``)."""


def drop_cache(files: list[Path]) -> str:
    """Evict ``files`` from the page cache: each is fsynced, then ``posix_fadvise(POSIX_FADV_DONTNEED)`` (only these
    files: other processes' caches stay, unlike ``/proc/sys/vm/drop_caches``); returns how (for the report). The
    kernel keeps pages that a mapping still holds, so readers must be gone first (collected here)."""
    gc.collect()
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def sequential_read(files: list[Path]) -> float:
    """Bytes/s of a plain sequential read of ``files``, 16 MiB at a time into one buffer, with the kernel told
    the reads are sequential (the fastest plain read measured here: 1 MiB reads reached 0.6–1.3 GB/s, these 1.7)."""
    view, total, t0 = memoryview(bytearray(16 << 20)), 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := handle.readinto(view):
                total += n
    return total / (time.perf_counter() - t0)


def copy_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes`` with one thread (each byte counted once, as a memcpy's size)."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        return 4 * nbytes / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def _epochs(path: Path, batch: int, shuffle_buffer: int, dtype: torch.dtype | None, workers: int, verify: str,
            skip: int, repeats: int) -> tuple[list[float], int]:
    """Seconds of ``repeats`` epochs of one :class:`StoreBatches` after ``skip`` untimed ones, and rows per epoch."""
    batches = ActivationStore(path, verify=verify).batches(batch, shuffle_buffer=shuffle_buffer, dtype=dtype,
                                                          workers=workers, seed=0, epochs=skip + repeats)
    times, rows = [], 0
    for epoch in range(skip + repeats):
        t0, rows = time.perf_counter(), 0
        for x in batches:
            rows += x.shape[0]
        if epoch >= skip:
            times.append(time.perf_counter() - t0)
    return times, rows


def run_data_benchmark(dims: tuple[int, ...] = DATA_DIMS, mib: int = 384, batch: int = 8192,
                       workers: tuple[int, ...] = (1, 2), shuffle_buffer: int = 1 << 15, shard_rows: int = 16384,
                       directory: str | os.PathLike | None = None, step_ms: float = 12.0, n_step: int = 8192,
                       repeats: int = 3, progress=None) -> dict[str, Any]:
    """Measure the reader (see the module docstring); the report: machine numbers and one row per
    ``(d, out, workers, phase)``, the median of ``repeats`` epochs (cold: each of a fresh reader after its own
    cache drop; warm: epochs 3, 4, ... of one reader). ``step_ms`` is a training step's time at the gpu preset
    (``N = n_step``): the issue's 0.6–0.8 M rows/s for an H100 is 10–14 ms; 12 ms is its middle, not a
    measurement."""
    for name, value in (("mib", mib), ("batch", batch), ("shuffle_buffer", shuffle_buffer),
                        ("shard_rows", shard_rows), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not dims or not workers or min(dims) < 1 or min(workers) < 1:
        raise ValueError(f"dims and workers must be non-empty and positive, got {dims} and {workers}")
    root = Path(tempfile.mkdtemp(prefix="saefast-bench-data-", dir=directory))
    rows_out: list[dict[str, Any]] = []
    copy_bw = copy_bandwidth()
    disks = {}
    try:
        for d in dims:
            n = max(1, (mib << 20) // (2 * d))
            path = root / f"d{d}"
            g = torch.Generator().manual_seed(d)
            write_store(path, torch.randn(n, d, generator=g), shard_tokens=shard_rows, dtype=torch.bfloat16)
            files = sorted(path.glob("shard*.npy"))
            how = drop_cache(files)
            disks[d] = sequential_read(files)
            for out in (None, torch.float32):
                for w in workers:
                    for phase in ("cold", "warm"):
                        if progress is not None:
                            progress(f"data: d={d} {'bf16' if out is None else 'fp32'} workers={w} {phase}")
                        if phase == "cold":
                            times = []
                            for _ in range(repeats):
                                drop_cache(files)
                                cold, rows = _epochs(path, batch, shuffle_buffer, out, w, "lazy", 0, 1)
                                times += cold
                        else:
                            times, rows = _epochs(path, batch, shuffle_buffer, out, w, "none", 2, repeats)
                        seconds = statistics.median(times)
                        if rows != n:
                            raise RuntimeError(f"the data case read {rows} rows of a store of {n}")
                        rows_out.append({"d": d, "out": "bf16" if out is None else "fp32", "workers": w,
                                         "phase": phase, "rows": n, "seconds": seconds, "all_seconds": times,
                                         "rows_per_s": n / seconds,
                                         "gb_per_s": n * d * 2 / seconds / 1e9, "disk_gb_per_s": disks[d] / 1e9,
                                         "cache_drop": how})
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    need = n_step / (step_ms / 1e3)
    return {"case": "data", "machine": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "mib": mib, "batch": batch, "shuffle_buffer": shuffle_buffer,
            "shard_rows": shard_rows, "repeats": repeats, "copy_gb_per_s": copy_bw / 1e9, "step_ms": step_ms,
            "n_step": n_step, "need_rows_per_s": need, "commit": git_revision(), "rows": rows_out}


def format_data_markdown(report: dict[str, Any]) -> str:
    """The data case as a markdown table, with the machine's copy and disk bandwidth and the step's need."""
    lines = [f"Store reader, `store.batches({report['batch']}, shuffle_buffer={report['shuffle_buffer']})` on "
             f"{report['cores']} cores; bf16 stores of {report['mib']} MiB in shards of {report['shard_rows']} rows; "
             f"GB/s of stored bf16 delivered (median of {report['repeats']} epochs). "
             f"One-thread copy: {report['copy_gb_per_s']:.1f} GB/s.",
             "",
             "| d | out | workers | phase | M rows/s | GB/s | disk sequential GB/s | of disk | of copy |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['d']:,} | {row['out']} | {row['workers']} | {row['phase']} | "
                     f"{row['rows_per_s'] / 1e6:.2f} | {row['gb_per_s']:.2f} | {row['disk_gb_per_s']:.2f} | "
                     f"{row['gb_per_s'] / row['disk_gb_per_s']:.2f} | "
                     f"{row['gb_per_s'] / report['copy_gb_per_s']:.2f} |")
    need = report["need_rows_per_s"]
    lines += ["", f"A training step of N = {report['n_step']:,} rows every {report['step_ms']:g} ms needs "
              f"{report['n_step']:,} / {report['step_ms'] / 1e3:g} s = {need / 1e6:.2f} M rows/s = "
              f"{need * 2304 * 2 / 1e9:.2f} GB/s of bf16 at d = 2,304."]
    return "\n".join(lines)
