"""Measuring: timing interleaved over rounds, peak memory of a call, the device's peak FLOP/s and bytes/s."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .quiet import native_quiet


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` (CUDA) to finish its queued work; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Measured peak FLOP/s (a square matmul in ``dtype``) and bytes/s (a 256 MB copy) of ``device``."""
    n = 8192 if device.type == "cuda" else 4096  # large enough to reach the BLAS's peak; best of 5 against noise
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.empty(64 * 2**20, device=device)  # 256 MB of fp32
    dst = torch.empty_like(src)

    def best(fn: Callable[[], Any], repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    flops = 2 * n**3 / best(lambda: a @ b)
    bytes_per_s = 2 * src.numel() * src.element_size() / best(lambda: dst.copy_(src))
    return flops, bytes_per_s


class PeakMemory:
    """Peak memory the block needed: CUDA's ``max_memory_allocated``; on the CPU the peak of the running sum of
    the block's allocations minus its frees, from the PyTorch profiler's memory events (peak RSS cannot be told
    apart per call: the allocator keeps freed pages resident)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._profiler = device, None, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with native_quiet():  # the profiler's native start/stop log lines (see .quiet)
                self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        with native_quiet():
            self._profiler.__exit__(*exc)
        running = peak = 0
        for event in sorted(self._profiler.events(), key=lambda e: e.time_range.start):
            running += event.self_cpu_memory_usage
            peak = max(peak, running)
        self.peak = int(peak)


def time_interleaved(fns: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], warmup: int, repeats: int,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of every ``fns[name]``: ``warmup + repeats`` rounds, in each round every function once
    (round robin: a slow phase of a shared machine hits every function alike) on the round's input (``inputs``
    rotate, so no function meets the same data twice in a row and caches do not flatter); CUDA is synchronised
    around each call. Returns the ``repeats`` samples after the warm-up, per name."""
    device = torch.device(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            data = inputs[(i + 1) % len(inputs)]
            synchronize(device)
            start = time.perf_counter()
            fn(data)
            synchronize(device)
            if i >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples
