"""saefast.bench (run, cases, report): the report's schema, the cases, the correctness guard (a wrong or failing
backend gets an error, no number), the commit recorded outside git, and the quiet output (no profiler or
torch.compile noise unless verbose). Timings are never asserted. (The ``saefast bench`` command:
tests/cli/test_cli.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

import saefast as sf
from saefast import bench

ROW_KEYS = {"case", "backend", "shape", "ok", "ms", "tokens_per_s", "peak_mem_bytes", "speedup_vs_eager_loop",
            "error"}


def test_report_schema_and_unavailable_backends():
    report = bench.run_benchmarks("tiny", cases=["forward", "train_step"],
                                  backends=["eager_loop", "eager_stacked", "triton", "native"], repeats=1)
    assert {"device", "torch", "triton", "commit", "peak_flops", "peak_bytes_per_s", "results"} <= set(report)
    assert report["peak_flops"] > 0 and report["peak_bytes_per_s"] > 0
    rows = {(row["case"], row["backend"]): row for row in report["results"]}
    assert len(rows) == 8
    for row in rows.values():
        assert ROW_KEYS <= set(row)
        assert row["shape"]["name"] == "tiny"
        if row["ok"]:
            assert row["error"] is None and row["ms"] > 0 and row["tokens_per_s"] > 0
        else:
            assert isinstance(row["error"], str) and row["ms"] is None and row["speedup_vs_eager_loop"] is None
    for case in ("forward", "train_step"):
        assert rows[case, "eager_loop"]["ok"] and rows[case, "eager_stacked"]["ok"]
        assert rows[case, "eager_loop"]["speedup_vs_eager_loop"] == pytest.approx(1.0)
        if not torch.cuda.is_available():
            assert "CUDA only" in rows[case, "triton"]["error"]
        assert rows[case, "native"]["ok"] == sf.native.supports(torch.device("cpu"))
    # the per-member loop holds a dense [N, M] pre-activation and a dense [N, M] code at once
    shape = bench.PRESETS["tiny"][0]
    assert rows["forward", "eager_loop"]["peak_mem_bytes"] >= 2 * shape.tokens * shape.latents * 4
    table = bench.format_markdown(report)
    assert table.count("\n| tiny |") == 8


def test_guard_reports_a_wrong_or_failing_backend(monkeypatch):
    build = bench.cases.BUILDERS["forward"]

    def broken(shape, device, dtype):
        case = build(shape, device, dtype)
        good = case.fns["eager_stacked"]
        case.fns["native"] = lambda x: good(x) * 1.01
        case.fns["compile"] = lambda x: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
        return case

    monkeypatch.setitem(bench.cases.BUILDERS, "forward", broken)
    report = bench.run_benchmarks("tiny", cases=["forward"], backends=["eager_loop", "eager_stacked", "native",
                                                                       "compile"], repeats=1)
    rows = {row["backend"]: row for row in report["results"]}
    assert rows["eager_loop"]["ok"] and rows["eager_stacked"]["ok"]
    assert not rows["native"]["ok"] and "differs from the eager reference" in rows["native"]["error"]
    assert not rows["compile"]["ok"] and rows["compile"]["error"] == "RuntimeError: kernel exploded"
    assert rows["native"]["ms"] is None and rows["compile"]["ms"] is None


def test_encode_decode_and_metrics_cases():
    report = bench.run_benchmarks("tiny", cases=["encode", "decode", "metrics"],
                                  backends=["eager_loop", "eager_stacked", "native"], repeats=1)
    rows = {(row["case"], row["backend"]): row for row in report["results"]}
    native_ok = sf.native.supports(torch.device("cpu"))
    for case in ("encode", "decode"):
        assert rows[case, "eager_loop"]["ok"] and rows[case, "eager_stacked"]["ok"]
        assert rows[case, "native"]["ok"] == native_ok, rows[case, "native"]["error"]
    # the encoder GEMM floor is timed with the encode case; decode has none (the GEMM is not its floor)
    assert rows["encode", "eager_stacked"]["floor_ms"] > 0
    assert rows["decode", "eager_stacked"]["floor_ms"] is None
    # metrics: the loop and the one-pass metric agree with the single-pair reference; no tokens, no native kernel
    assert rows["metrics", "eager_loop"]["ok"] and rows["metrics", "eager_stacked"]["ok"]
    assert rows["metrics", "eager_stacked"]["tokens_per_s"] is None
    assert not rows["metrics", "native"]["ok"] and "GEMM-bound" in rows["metrics", "native"]["error"]
    assert "| tiny | metrics | eager_stacked |" in bench.format_markdown(report)


def test_codes_check_tolerates_a_rare_swap_but_not_wrong_codes():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(200, 2, 8, generator=gen).sort(-1, descending=True).values
    indices = torch.stack([torch.randperm(50, generator=gen)[:8] for _ in range(400)]).view(200, 2, 8)
    assert bench.cases.check_codes((values, indices), (values, indices), 1e-4) is None
    # codes in another slot order are the same codes
    assert bench.cases.check_codes((values.flip(-1), indices.flip(-1)), (values, indices), 1e-4) is None
    one_swap = indices.clone()
    one_swap[0, 0, -1] = next(i for i in range(50) if i not in indices[0, 0].tolist())  # 1 of 3200 slots
    assert bench.cases.check_codes((values, one_swap), (values, indices), 1e-4) is None
    shuffled = indices[torch.randperm(200, generator=gen)]
    assert "selected latents differ" in bench.cases.check_codes((values, shuffled), (values, indices), 1e-4)
    assert "code values differ" in bench.cases.check_codes((values * 1.01, indices), (values, indices), 1e-4)


def test_guard_on_the_encode_case_reports_wrong_codes(monkeypatch):
    build = bench.cases.BUILDERS["encode"]

    def broken(shape, device, dtype):
        case = build(shape, device, dtype)
        good = case.fns["eager_stacked"]

        def shifted(x):  # every latent index off by one: the right values on the wrong latents
            codes = good(x)
            return codes.values, (codes.indices + 1) % shape.latents

        case.fns["native"] = shifted
        return case

    monkeypatch.setitem(bench.cases.BUILDERS, "encode", broken)
    report = bench.run_benchmarks("tiny", cases=["encode"], backends=["eager_stacked", "native"], repeats=1)
    rows = {row["backend"]: row for row in report["results"]}
    assert rows["eager_stacked"]["ok"]
    assert not rows["native"]["ok"] and "selected latents differ" in rows["native"]["error"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.run_benchmarks("huge")
    with pytest.raises(ValueError, match="unknown case"):
        bench.run_benchmarks("tiny", cases=["backward"])
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmarks("tiny", repeats=0)


def test_git_revision_outside_git_takes_the_commit_from_the_environment(monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    monkeypatch.delenv("SAEFAST_COMMIT", raising=False)
    assert bench.git_revision() == "unknown"
    monkeypatch.setenv("SAEFAST_COMMIT", "abc1234")
    assert bench.git_revision() == "abc1234"


# ------------------------------------------------------------------------------------------------------
# Quiet output: no profiler or torch.compile noise unless --verbose
# ------------------------------------------------------------------------------------------------------

KINETO_LINE = b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n"


def test_native_quiet_drops_only_the_profilers_informational_lines(capfd):
    import os

    from saefast.bench.quiet import native_quiet, quiet

    with quiet(), native_quiet():
        os.write(2, KINETO_LINE + b"STAGE:2026-01-01 00:00:00 1:1 X.cpp:51] Completed Stage: Warm Up\n")
        os.write(2, b"WARNING:2026-01-01 00:00:00 1:1 X.cpp:9] a real problem\nsomething else\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "STAGE" not in err
    assert "a real problem" in err and "something else" in err
    for outer in (contextlib.nullcontext(), quiet(verbose=True)):  # outside quiet(), or verbose: untouched
        with outer, native_quiet():
            os.write(2, KINETO_LINE)
        assert "profiler_start" in capfd.readouterr().err


def test_quiet_hides_torch_compile_warnings_and_restores_the_loggers(capfd, monkeypatch):
    import logging
    import warnings

    from saefast.bench.quiet import quiet

    monkeypatch.delenv("TORCH_LOGS", raising=False)  # (an explicit TORCH_LOGS is left alone)

    dynamo = logging.getLogger("torch._dynamo")
    before = dynamo.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            logging.getLogger("torch._dynamo.variables.tensor").warning("Graph break from `Tensor.item()`")
            warnings.warn_explicit("TF32 not enabled", UserWarning, "compile_fx.py", 1,
                                   module="torch._inductor.compile_fx")
            warnings.warn_explicit("ours", UserWarning, "run.py", 1, module="saefast.bench.run")
    assert [str(w.message) for w in caught] == ["ours"]
    assert dynamo.level == before
    assert "Graph break" not in capfd.readouterr().err


def test_saefast_bench_prints_no_profiler_or_compile_noise(tmp_path):
    """The real command, in a fresh process (torch warns of a graph break once per process)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "saefast", "bench", "--preset", "tiny", "--cases", "encode",
                             "--backends", "eager_stacked", "compile", "--repeats", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "USDT" not in output and "graph break" not in output.lower(), result.stderr
    assert "| tiny | encode | compile |" in result.stdout
    assert result.stderr.strip() == ""


def test_bench_verbose_still_runs(monkeypatch, capsys):
    from saefast.cli import main

    monkeypatch.setattr(bench.run, "device_peaks", lambda device, dtype: (1e12, 1e11))  # (the 4096² GEMM is slow)
    assert main(["bench", "--preset", "tiny", "--cases", "encode", "--backends", "eager_stacked", "native",
                 "--repeats", "1", "--no-progress", "--verbose"]) == 0
    assert "| tiny | encode | eager_stacked |" in capsys.readouterr().out


def test_the_data_case_measures_the_reader_and_cleans_up(tmp_path):
    report = bench.run_data_benchmark(dims=(8, 64), mib=1, batch=256, workers=(1, 2), shuffle_buffer=512,
                                      shard_rows=300, directory=tmp_path, step_ms=10.0)
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # d × out × workers × phase
    assert {(r["d"], r["out"], r["workers"], r["phase"]) for r in rows} == {
        (d, out, w, phase) for d in (8, 64) for out in ("bf16", "fp32") for w in (1, 2) for phase in ("cold", "warm")}
    assert all(r["rows_per_s"] > 0 and r["gb_per_s"] > 0 and r["disk_gb_per_s"] > 0 for r in rows)
    assert all(r["rows"] == (1 << 20) // (2 * r["d"]) for r in rows)
    assert report["copy_gb_per_s"] > 0 and report["need_rows_per_s"] == pytest.approx(8192 / 0.010)
    assert list(tmp_path.iterdir()) == []  # the temporary stores are gone
    table = bench.format_data_markdown(report)
    assert "| d | out | workers | phase | M rows/s |" in table and "| 64 | fp32 | 2 | warm |" in table
    assert "8,192 / 0.01 s = 0.82 M rows/s" in table
    with pytest.raises(ValueError, match="mib must be >= 1"):
        bench.run_data_benchmark(mib=0, directory=tmp_path)
