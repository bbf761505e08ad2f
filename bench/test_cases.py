"""The harness's cases as pytest-benchmark modules: one benchmark per (shape, case, backend).

    pytest bench/ --benchmark-only                                   # preset cpu-small (CPU) or gpu (CUDA)
    SAEFAST_BENCH_PRESET=cpu pytest bench/ --benchmark-json out.json --benchmark-group-by=param:case
    SAEFAST_BENCH_PRESET=tiny pytest bench/ --benchmark-disable      # smoke: every case once, guard included

The cases, backends, inputs and correctness guard are those of ``saefast bench`` (:mod:`saefast.bench`): before
a backend is timed its output is compared with the eager reference's on the same input, and a wrong or failing
backend fails its test instead of getting a number. A backend that cannot run here (``triton`` without CUDA,
``native`` without the extension) is skipped with the reason. Inputs rotate over three batches, CUDA is
synchronised after each call, and ``extra_info`` records the shape, tokens, the nominal FLOP and bytes and the
tokens/s of the median, so the JSON of ``--benchmark-json`` carries what the harness's report does (without the
per-run device peaks: ``saefast bench`` measures those).
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics

import pytest
import torch

from saefast import bench

DEVICE = torch.device(os.environ.get("SAEFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET = os.environ.get("SAEFAST_BENCH_PRESET") or ("gpu" if DEVICE.type == "cuda" else "cpu-small")
if PRESET not in bench.PRESETS:
    raise pytest.UsageError(f"SAEFAST_BENCH_PRESET={PRESET!r} is not a preset; choose one of "
                            f"{', '.join(bench.PRESETS)}")
WARMUP = int(os.environ.get("SAEFAST_BENCH_WARMUP", "1"))
REPEATS = int(os.environ.get("SAEFAST_BENCH_REPEATS", "5"))


@functools.cache
def _prepared(shape: bench.Shape, case_name: str) -> tuple[bench.Case, list, object]:
    """The case, its rotating inputs and the reference output, built once per (shape, case) for all backends."""
    case = bench.make_case(case_name, shape, DEVICE)
    inputs = [case.prepare(x, i) for i, x in enumerate(bench.token_batches(shape, DEVICE))]
    return case, inputs, bench.reference_output(case, inputs[0])


@pytest.mark.parametrize("backend", bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("case", bench.CASES)
@pytest.mark.parametrize("shape", bench.PRESETS[PRESET], ids=lambda shape: shape.name.replace(" ", "_"))
def test_case(benchmark, shape: bench.Shape, case: str, backend: str) -> None:
    reason = bench.unavailable(backend, DEVICE)
    if reason:
        pytest.skip(reason)
    built, inputs, want = _prepared(shape, case)
    problem, peak_mem = bench.guard(built, backend, inputs[0], want, bench.DTYPES[shape.dtype], DEVICE)
    if problem and problem.startswith("NotImplementedError"):
        pytest.skip(problem)
    assert problem is None, f"{backend} on {case} ({shape.name}): {problem}"

    fn = built.fns[backend]
    rotation = itertools.cycle(inputs[1:] + inputs[:1])

    def call(data):
        out = fn(data)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    benchmark.extra_info.update(shape=shape.to_dict(), device=str(DEVICE), peak_mem_bytes=peak_mem,
                                nominal_flop=built.flop, nominal_bytes=built.bytes)
    benchmark.pedantic(call, setup=lambda: ((next(rotation),), {}), rounds=REPEATS, warmup_rounds=WARMUP)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and built.tokens:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = shape.tokens / statistics.median(stats.stats.data)
