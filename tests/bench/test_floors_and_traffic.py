"""The bench's peak-FLOP floor (``floor_flop_ms``, ``ratio_to_flop_floor``, the "× peak-FLOP floor" column, "–" for a
report that predates it), ``bench/profile_step.py`` (its per-op table, its report, the trainer's optimizer, a
quick run at the tiny preset) and the memory-traffic model :mod:`saefast.bench.traffic`. Timings are never
asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from saefast import bench
from saefast.bench import traffic

ROOT = Path(__file__).resolve().parents[2]


def _profile_step_module():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def profile_step():
    return _profile_step_module()


# ------------------------------------------------------------------------------------------------------
# The peak-FLOP floor column of saefast bench
# ------------------------------------------------------------------------------------------------------

def test_flop_floor_is_the_encoder_gemm_at_the_measured_peak(monkeypatch):
    peak = 2e11
    monkeypatch.setattr(bench.run, "device_peaks", lambda device, dtype: (peak, 1e10))  # (the 4096² GEMM is slow)
    report = bench.run_benchmarks("tiny", cases=["encode", "decode"], backends=["eager_stacked"], repeats=1)
    rows = {row["case"]: row for row in report["results"]}
    shape = bench.PRESETS["tiny"][0]
    flop = 2 * shape.tokens * shape.d_in * shape.members * shape.latents
    assert bench.cases.encoder_gemm_flop(shape) == flop
    encode = rows["encode"]
    assert encode["floor_flop_ms"] == pytest.approx(flop / peak * 1e3)
    assert encode["ratio_to_flop_floor"] == pytest.approx(encode["ms"] / encode["floor_flop_ms"])
    # decode has no encoder GEMM: no floor of either kind
    assert rows["decode"]["floor_flop_ms"] is None and rows["decode"]["ratio_to_flop_floor"] is None
    table = bench.format_markdown(report)
    assert "| × encoder GEMM | × peak-FLOP floor |" in table
    assert "peak-FLOP floor: ms over 2·N·d·J·M / measured peak FLOP/s" in table
    encode_line = next(line for line in table.splitlines() if line.startswith("| tiny | encode |"))
    cells = [c.strip() for c in encode_line.strip("|").split("|")]
    assert cells[7] == f"{encode['ratio_to_flop_floor']:,.2f}"
    assert cells[6] == f"{encode['ms'] / encode['floor_ms']:,.2f}"
    decode_line = next(line for line in table.splitlines() if line.startswith("| tiny | decode |"))
    assert [c.strip() for c in decode_line.strip("|").split("|")][6:8] == ["–", "–"]


def test_every_case_with_an_encoder_gemm_floor_has_a_flop_floor():
    shape = bench.PRESETS["tiny"][0]
    for name in bench.CASES:
        case = bench.make_case(name, shape, "cpu")
        assert (case.floor is None) == (case.floor_flop is None), name
        if case.floor_flop is not None:
            assert case.floor_flop == bench.cases.encoder_gemm_flop(shape)


def test_markdown_of_an_old_report_shows_a_dash_for_the_new_column():
    """A JSON written before the column existed (no floor_flop_ms, no ratio_to_flop_floor) still renders."""
    old_row = {"case": "train_step", "backend": "native", "shape": {"name": "J8"}, "ok": True, "ms": 2436.1,
               "tokens_per_s": 1681.0, "peak_mem_bytes": 448 * 2**20, "speedup_vs_eager_loop": 1.22,
               "flop_per_s": 1.7e11, "bytes_per_s": 1e9, "fraction_of_peak_flops": 0.99, "floor_ms": 1262.2,
               "error": None}
    report = {"device": "x86_64", "torch": "2.x", "commit": "ae88d5f", "preset": "cpu", "peak_flops": 1.72e11,
              "peak_bytes_per_s": 6.03e10, "results": [old_row]}
    line = bench.format_markdown(report).splitlines()[-1]
    assert line == "| J8 | train_step | native | 2,436.1 | 1,681 | 1.22 | 1.93 | – | 99 | 448 |"


def test_the_committed_cpu_report_still_renders():
    import json

    report = json.loads((ROOT / "bench" / "results" / "cpu.json").read_text())
    table = bench.format_markdown(report)
    assert table.count("\n| J8 d512 M4096 K32 |") == len(report["results"])


# ------------------------------------------------------------------------------------------------------
# bench/profile_step.py
# ------------------------------------------------------------------------------------------------------

def test_op_table_groups_the_small_ops_into_other(profile_step):
    ops = [("aten::mm", 6000.0, 6), ("aten::topk", 3000.0, 3), ("aten::add_", 30.0, 30), ("aten::view", 9.0, 90)]
    table = profile_step.op_table(ops, steps=3, wall_ms=3.5, min_share=0.01)
    assert [row["op"] for row in table["ops"]] == ["aten::mm", "aten::topk"]
    assert table["ops"][0]["self_cpu_ms_per_step"] == pytest.approx(2.0)
    assert table["ops"][0]["calls_per_step"] == pytest.approx(2.0)
    assert table["other"] == {"ops": 2, "self_cpu_ms_per_step": pytest.approx(0.013), "calls_per_step": 40.0}
    assert table["ops_ms_per_step"] == pytest.approx(3.013)
    assert table["outside_ops_ms_per_step"] == pytest.approx(3.5 - 3.013)
    # top caps the kept rows; the rest is other
    assert len(profile_step.op_table(ops, steps=1, top=1)["ops"]) == 1
    assert profile_step.op_table(ops, steps=1, top=1)["other"]["ops"] == 3


def test_the_optimizer_is_the_trainers(profile_step):
    from saefast.config import SAEConfig, TrainConfig
    from saefast.models import Ensemble
    from saefast.training import SAEAdam

    model = Ensemble.bagging(SAEConfig(d_in=4, n_latents=6, k=2), 2)
    optimizer = profile_step.trainer_optimizer(model)
    assert type(optimizer) is SAEAdam and optimizer.model is model  # what saefast.training.trainer builds
    assert optimizer.defaults["lr"] == TrainConfig().lr and optimizer.defaults["betas"] == TrainConfig().betas
    assert profile_step.optimizer_name(optimizer).startswith("saefast.training.optimizer.SAEAdam")


def test_profile_step_at_the_tiny_preset(profile_step, tmp_path):
    report = profile_step.profile_step("tiny", steps=1, warmup=1, implementations=["eager_stacked", "eager_loop"],
                                       device="cpu", peaks=(1e11, 1e10))
    shape = bench.PRESETS["tiny"][0]
    flop = 2 * shape.tokens * shape.d_in * shape.members * shape.latents
    assert report["encoder_gemm_flop"] == flop
    assert report["floor_flop_ms"] == pytest.approx(flop / 1e11 * 1e3)
    for impl in ("eager_stacked", "eager_loop"):
        r = report["implementations"][impl]
        assert r["ms_per_step"] > 0 and r["ratio_to_flop_floor"] == pytest.approx(r["ms_per_step"] /
                                                                                  report["floor_flop_ms"])
        assert r["profile"]["ops"] and r["profile"]["profiled_wall_ms_per_step"] > 0
    assert report["ratios"]["native_over_flop_floor"] is None  # native not profiled here
    assert {"device", "torch", "threads", "commit", "date", "optimizer", "peak_flops", "load_average"} <= set(report)
    text = profile_step.format_report(report)
    assert "| part | ms per step | calls per step |" in text and "## eager_loop" in text
    assert "| other (" in text and "peak-FLOP floor" in text
    with pytest.raises(ValueError, match="unknown implementation"):
        profile_step.profile_step("tiny", implementations=["compile"], peaks=(1e11, 1e10))


# ------------------------------------------------------------------------------------------------------
# The memory-traffic model
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [*bench.PRESETS["gpu"], *bench.PRESETS["cpu"]], ids=lambda s: s.name)
def test_traffic_totals_are_the_sums_of_their_parts(shape):
    model = traffic.traffic_per_step(shape)
    for plan in ("op_by_op", "fused"):
        assert model[plan]["total"] == sum(model[plan]["parts"].values())
        assert all(value > 0 for value in model[plan]["parts"].values())
    # the parts the two plans share are the same
    for part in ("encoder_gemm", "codes_write", "decode_forward", "loss"):
        assert model["op_by_op"]["parts"][part] == model["fused"]["parts"][part]


def test_fused_moves_fewer_bytes_at_the_gpu_preset():
    for shape in bench.PRESETS["gpu"]:
        model = traffic.traffic_per_step(shape)
        assert model["fused"]["total"] < model["op_by_op"]["total"]


def test_traffic_formulas_at_one_shape():
    shape = bench.PRESETS["gpu"][0]  # bf16
    N, D, J, M, K = shape.tokens, shape.d_in, shape.members, shape.latents, shape.k
    P, S = J * M * D, N * J * K
    parts = traffic.traffic_per_step(shape)
    op_by_op, fused = parts["op_by_op"]["parts"], parts["fused"]["parts"]
    assert op_by_op["encoder_gemm"] == 2 * (N * D + P)
    assert op_by_op["adam"] == 28 * (2 * P + J * M + J * D)
    assert op_by_op["renormalise"] == 8 * P and op_by_op["decoder_projection"] == 12 * P
    assert fused["fused_optimizer"] == 28 * P + 32 * P + 28 * (J * M + J * D)
    assert fused["fused_backward"] == min(J * M, S) * D * 2 + S * D * 6 + S * 12 + 8 * P
    table = traffic.format_traffic(bench.PRESETS["gpu"])
    assert "| **total** |" in table and f"{parts['op_by_op']['total'] / 1e9:,.2f}" in table
