"""Running the benchmarks: every case × implementation × shape of a preset, guarded, timed and reported."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .cases import CASES, IMPLEMENTATIONS, Case, make_case, max_error, unavailable
from .measure import PeakMemory, device_peaks, synchronize, time_interleaved
from .quiet import quiet
from .shapes import DTYPES, PRESETS, Shape


def run_benchmarks(preset: str = "cpu-small", cases: Sequence[str] = CASES, backends: Sequence[str] = IMPLEMENTATIONS,
                   warmup: int = 1, repeats: int = 5, device: str | torch.device | None = None,
                   progress: Callable[[str], None] | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run ``cases`` × ``backends`` for every shape of ``preset``; returns the report (see the module docstring).

    torch.compile's warnings and the profiler's native log lines are hidden unless ``verbose`` (see :mod:`.quiet`).

    Relative tolerance of the correctness guard: 1e-4 of the eager output's max (fp32), 5e-2 (bf16/fp16)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for name, given, known in (("case", cases, CASES), ("backend", backends, IMPLEMENTATIONS)):
        unknown = [c for c in given if c not in known]
        if unknown or not given:
            raise ValueError(f"unknown {name}(s) {unknown or 'none given'}; choose from {', '.join(known)}")
    if warmup < 1 or repeats < 1:
        raise ValueError("warmup and repeats must be >= 1 (the warm-up also compiles)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    revision = git_revision()
    shapes = PRESETS[preset]
    results = []
    with quiet(verbose):
        peak_flops, peak_bytes = device_peaks(device, DTYPES[shapes[0].dtype])
        for shape in shapes:
            batches = token_batches(shape, device)
            for case_name in cases:
                if progress:
                    progress(f"{shape.name}: {case_name}")
                case = make_case(case_name, shape, device)
                results.extend(_run_case(case_name, case, shape, backends, batches, device, DTYPES[shape.dtype],
                                         warmup, repeats, peak_flops, peak_bytes))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "triton": _triton_version(),
            "commit": revision, "preset": preset, "peak_flops": peak_flops, "peak_bytes_per_s": peak_bytes,
            "results": results}


def token_batches(shape: Shape, device: torch.device | str) -> list[torch.Tensor]:
    """The three rotating token batches ``[N, D]`` of ``shape`` (seeds 0, 1, 2), in its dtype on ``device``."""
    return [torch.randn(shape.tokens, shape.d_in, generator=torch.Generator().manual_seed(i)).to(
        device=device, dtype=DTYPES[shape.dtype]) for i in range(3)]


def reference_output(case: Case, inputs: Any) -> Any:
    """The eager reference's output on ``inputs``, as the guard compares it."""
    return case.compare((case.reference or case.fns["eager_stacked"])(inputs))


def guard(case: Case, backend: str, inputs: Any, want: Any, dtype: torch.dtype,
          device: torch.device) -> tuple[str | None, int | None]:
    """The correctness guard: run ``backend`` once on ``inputs`` and compare with the reference output ``want``
    (relative tolerance 1e-4 in fp32, 5e-2 in bf16/fp16). Returns ``(why it is wrong or failed | None, peak
    memory of the call in bytes | None)``."""
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    try:
        with PeakMemory(device) as peak:
            got = case.compare(case.fns[backend](inputs))
            synchronize(device)
        # inductor's generated CPU code allocates beneath the dispatcher, out of the profiler's sight
        memory = None if backend == "compile" and device.type == "cpu" else peak.peak
        return (case.check or _check_max_error)(got, want, tolerance), memory
    except Exception as exc:  # a backend that cannot run this case reports why instead of a number
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None


def _run_case(name: str, case: Case, shape: Shape, backends: Sequence[str], batches: list[torch.Tensor],
              device: torch.device, dtype: torch.dtype, warmup: int, repeats: int, peak_flops: float,
              peak_bytes: float) -> list[dict[str, Any]]:
    errors: dict[str, str] = {}
    for backend in backends:
        reason = unavailable(backend, device)
        if reason:
            errors[backend] = reason
    inputs = [case.prepare(x, i) for i, x in enumerate(batches)]
    # The guard: every backend's first call, on the same input, against the eager reference's.
    want = reference_output(case, inputs[0])
    memory: dict[str, int | None] = {}
    for backend in backends:
        if backend in errors:
            continue
        problem, memory[backend] = guard(case, backend, inputs[0], want, dtype, device)
        if problem:
            errors[backend] = problem
    timed = {b: case.fns[b] for b in backends if b not in errors}
    if case.floor is not None:
        timed[_FLOOR] = case.floor
    samples = time_interleaved(timed, inputs, warmup, repeats, device)
    base = statistics.median(samples["eager_loop"]) if "eager_loop" in samples else None
    floor = statistics.median(samples[_FLOOR]) if _FLOOR in samples else None
    # the peak-FLOP floor: the encoder GEMM's FLOP at the measured peak (everything else free)
    flop_floor = case.floor_flop / peak_flops if case.floor_flop and peak_flops > 0 else None
    rows = []
    for backend in backends:
        row: dict[str, Any] = {"case": name, "backend": backend, "shape": shape.to_dict(), "ok": backend not in errors,
                               "ms": None, "tokens_per_s": None, "peak_mem_bytes": memory.get(backend),
                               "speedup_vs_eager_loop": None, "flop_per_s": None, "bytes_per_s": None,
                               "fraction_of_peak_flops": None, "floor_ms": floor * 1e3 if floor else None,
                               "floor_flop_ms": flop_floor * 1e3 if flop_floor else None,
                               "ratio_to_flop_floor": None, "error": errors.get(backend)}
        if backend not in errors:
            seconds = statistics.median(samples[backend])
            row.update(ms=seconds * 1e3, tokens_per_s=shape.tokens / seconds if case.tokens else None,
                       flop_per_s=case.flop / seconds, bytes_per_s=case.bytes / seconds,
                       fraction_of_peak_flops=case.flop / seconds / peak_flops,
                       speedup_vs_eager_loop=base / seconds if base else None,
                       ratio_to_flop_floor=seconds / flop_floor if flop_floor else None)
        rows.append(row)
    return rows


_FLOOR = "floor"  # the key of a case's floor among the timed callables


def _check_max_error(got: Any, want: Any, tolerance: float) -> str | None:
    err = max_error(got, want)
    if err <= tolerance:
        return None
    return f"differs from the eager reference by {err:.3e} (relative to its largest magnitude)"


def git_revision() -> str:
    """Short git hash of the saefast checkout, ``+dirty`` when tracked files differ from it: a result measured on
    uncommitted code says so. Outside git (a copy of the tree, as on a lent GPU machine): ``$SAEFAST_COMMIT`` if
    set, else ``unknown``."""
    import subprocess

    root = Path(__file__).resolve().parent
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, check=True,  # noqa: E731
                                           cwd=root).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SAEFAST_COMMIT") or "unknown"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__