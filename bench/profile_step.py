"""Where one training step's time goes, against the peak-FLOP floor: wall time and a per-op profile of
:func:`saefast.training.training_step` at a preset's shape.

    python bench/profile_step.py                          # preset cpu: J=8, d=512, M=4096, K=32, N=4096, fp32
    python bench/profile_step.py --preset tiny --steps 3  # a smoke run
    python bench/profile_step.py --impl native --steps 2 --out /tmp

Implementations (built as the ``train_step`` case of ``saefast bench`` builds them, ``saefast/bench/cases.py``):

* ``native`` — one bagging ``training_step(..., backend="native")`` of the stacked ensemble;
* ``eager_stacked`` — the same with ``backend="torch"``;
* ``eager_loop`` — a Python loop of ``J`` single-member steps (``backend="torch"``), each with its own optimizer.

Each model's optimizer is the one the trainer builds (:func:`trainer_optimizer`: :class:`saefast.training.SAEAdam`,
whose step fuses the decoder projection, Adam and the renormalisation); ``max_dead=0`` and an initialised ``b_dec``
as in the bench case; autocast in the shape's dtype when it is not float32 (master weights fp32).

Measured, per implementation: wall milliseconds per step (``time.perf_counter``, CUDA synchronised; median of
``--steps`` steps after ``--warmup`` warm-up steps), then a ``torch.profiler`` run over another ``--steps`` steps:
every op's self CPU time and calls per step, the ops under ``--min-share`` of the step grouped into "other", and
the profiled step's time outside any op (Python, the autograd engine's bookkeeping) as its own part. Self times
are those of the thread that runs the step (ops on OpenMP workers are not recorded), so the parts add up to the
profiled step's wall time; the ops a native kernel calls itself (the encoder's per-tile ``aten::addmm``) are parts
of their own, outside the kernel's row. Also the
device's measured peak FLOP/s (:func:`saefast.bench.device_peaks`), the encoder GEMM's FLOP ``2·N·d·J·M``, the
peak-FLOP floor ``2·N·d·J·M / peak`` (what the step would cost if everything but the encoder GEMM were free and the
GEMM ran at the measured peak), the measured dense encoder GEMM ``x·W_encᵀ`` (the bench's "× encoder GEMM"
floor), and the ratios native / floor, native / eager_loop, native / eager_stacked.

Writes ``<out>/step_profile_<preset>.json`` and ``.md`` (default ``bench/results/``), with the device, torch version,
threads, commit, date and the 1-minute load average before and after the run (numbers from a loaded shared machine
are noise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from saefast.bench import DTYPES, PRESETS, Shape, device_peaks, git_revision, synchronize, token_batches
from saefast.bench.cases import encoder_gemm_flop
from saefast.bench.quiet import native_quiet, quiet

IMPLEMENTATIONS = ("native", "eager_stacked", "eager_loop")
"""What is profiled: saefast's native backend, its eager (torch) backend, the per-member loop of public trainers."""

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------------
# The optimizer the trainer builds
# ------------------------------------------------------------------------------------------------------

def trainer_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer :class:`saefast.training.trainer.Trainer` builds, over ``model``: :class:`saefast.training.SAEAdam`
    with the default :class:`~saefast.config.TrainConfig`'s learning rate, betas and eps."""
    from saefast.config import TrainConfig
    from saefast.training import SAEAdam

    cfg = TrainConfig()
    return SAEAdam(model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """``module.Class`` of ``optimizer``, with its ``foreach``/``fused`` flags when it has them."""
    flags = {key: optimizer.defaults[key] for key in ("foreach", "fused") if key in optimizer.defaults}
    name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    return name + (f" ({', '.join(f'{k}={v}' for k, v in flags.items())})" if flags else "")


# ------------------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------------------

def make_steps(shape: Shape, device: torch.device,
               implementations: Sequence[str] = IMPLEMENTATIONS) -> tuple[dict[str, Callable[[torch.Tensor], Any]],
                                                                           str]:
    """One training step per implementation (``fn(x)``), as the bench's ``train_step`` case builds them but with
    the trainer's optimizer, and that optimizer's name."""
    from saefast.config import SAEConfig
    from saefast.models import Ensemble
    from saefast.training import training_step

    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    autocast = None if shape.dtype == "float32" else DTYPES[shape.dtype]
    names: list[str] = []

    def stepper(model: Any, backend: str) -> Callable[[torch.Tensor], Any]:
        model.b_dec_initialized.fill_(True)
        optimizer = trainer_optimizer(model)
        names.append(optimizer_name(optimizer))

        def step(x: torch.Tensor) -> Any:
            result, _ = training_step(model, optimizer, x, backend=backend, max_dead=0, autocast_dtype=autocast)
            return result.loss

        return step

    steps: dict[str, Callable[[torch.Tensor], Any]] = {}
    for impl in implementations:
        if impl == "eager_loop":
            members = [stepper(Ensemble.bagging(cfg, shape.members, seed=0).to(device).member(j), "torch")
                       for j in range(shape.members)]
            steps[impl] = lambda x, members=members: [step(x) for step in members]
        elif impl in ("native", "eager_stacked"):
            backend = "native" if impl == "native" else "torch"
            steps[impl] = stepper(Ensemble.bagging(cfg, shape.members, seed=0).to(device), backend)
        else:
            raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return steps, names[0] if names else "–"


def time_steps(fn: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor], warmup: int, steps: int,
               device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (batches rotating)."""
    times = []
    for i in range(warmup + steps):
        x = batches[i % len(batches)]
        synchronize(device)
        start = time.perf_counter()
        fn(x)
        synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def time_encoder_gemm(shape: Shape, batches: Sequence[torch.Tensor], warmup: int, steps: int,
                      device: torch.device) -> list[float]:
    """Milliseconds of the dense encoder GEMM ``x·W_encᵀ`` over all ``J·M`` latents in the shape's dtype (the bench's
    "× encoder GEMM" floor), per call."""
    dtype = DTYPES[shape.dtype]
    W = torch.randn(shape.members * shape.latents, shape.d_in, generator=torch.Generator().manual_seed(9)).to(
        device=device, dtype=dtype)
    return time_steps(lambda x: x @ W.T, [x.to(dtype) for x in batches], warmup, steps, device)


# ------------------------------------------------------------------------------------------------------
# The per-op table
# ------------------------------------------------------------------------------------------------------

def op_table(ops: Iterable[tuple[str, float, int]], steps: int, wall_ms: float | None = None,
             min_share: float = 0.01, top: int = 20) -> dict[str, Any]:
    """The per-step table of a profile: ``ops`` are ``(name, self CPU µs over all steps, calls over all steps)``
    (what ``torch.profiler``'s ``key_averages()`` gives). Returns ``{"ops": [{"op", "self_cpu_ms_per_step",
    "calls_per_step"}, ...]`` (largest first; at most ``top``, none under ``min_share`` of the ops' total — those
    summed in ``"other"``), ``"other"`` (``{"ops": how many, "self_cpu_ms_per_step", "calls_per_step"}``),
    ``"ops_ms_per_step"`` (all ops' self time) and, given the profiled wall ``wall_ms`` per step,
    ``"outside_ops_ms_per_step"`` (the step's time in no op: Python, autograd bookkeeping; None when not given)."""
    rows = sorted(((name, us / 1e3 / steps, calls / steps) for name, us, calls in ops), key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in rows)
    kept = [r for r in rows[:top] if total and r[1] >= min_share * total]
    rest = rows[len(kept):]
    return {"ops": [{"op": name, "self_cpu_ms_per_step": ms, "calls_per_step": calls} for name, ms, calls in kept],
            "other": {"ops": len(rest), "self_cpu_ms_per_step": sum(r[1] for r in rest),
                      "calls_per_step": sum(r[2] for r in rest)},
            "ops_ms_per_step": total,
            "outside_ops_ms_per_step": None if wall_ms is None else wall_ms - total}


def profile_ops(fn: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor], steps: int,
                device: torch.device, min_share: float = 0.01) -> dict[str, Any]:
    """:func:`op_table` of ``steps`` calls of ``fn`` under ``torch.profiler`` (CPU activity; CUDA too on a GPU,
    whose self device time per op is added as ``self_device_ms_per_step``), with the profiled wall ms per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with native_quiet():
        with profile(activities=activities) as prof:
            synchronize(device)
            start = time.perf_counter()
            for i in range(steps):
                fn(batches[i % len(batches)])
            synchronize(device)
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
    averages = prof.key_averages()
    table = op_table(((e.key, e.self_cpu_time_total, e.count) for e in averages), steps, wall_ms, min_share)
    if device.type == "cuda":
        device_us = {e.key: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                     for e in averages}
        for row in table["ops"]:
            row["self_device_ms_per_step"] = device_us.get(row["op"], 0) / 1e3 / steps
    table["profiled_wall_ms_per_step"] = wall_ms
    return table


# ------------------------------------------------------------------------------------------------------
# The run and its report
# ------------------------------------------------------------------------------------------------------

def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): a step timed on a shared machine whose
    load exceeds its cores is noise — an OpenMP region waits for its slowest thread."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def profile_step(preset: str = "cpu", steps: int = 3, warmup: int = 2, implementations: Sequence[str] = IMPLEMENTATIONS,
                 device: str | torch.device | None = None, shape_index: int = 0, min_share: float = 0.01,
                 peaks: tuple[float, float] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Profile one training step at ``PRESETS[preset][shape_index]`` for ``implementations`` (see the module
    docstring); ``peaks`` (FLOP/s, bytes/s) replaces the measured ones (tests). Returns the report."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if steps < 1 or warmup < 1:
        raise ValueError("steps and warmup must be >= 1 (the defaults, 3 after 2, are what a reported number needs)")
    unknown = [i for i in implementations if i not in IMPLEMENTATIONS]
    if unknown or not implementations:
        raise ValueError(f"unknown implementation(s) {unknown or 'none given'}; "
                         f"choose from {', '.join(IMPLEMENTATIONS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = PRESETS[preset][shape_index]
    dtype = DTYPES[shape.dtype]
    say = progress or (lambda _: None)
    load_before = _load_average()
    batches = token_batches(shape, device)  # the bench's three rotating batches, in the shape's dtype
    with quiet():
        say("peak FLOP/s")
        peak_flops, peak_bytes = peaks or device_peaks(device, dtype)
        flop = encoder_gemm_flop(shape)
        floor_ms = flop / peak_flops * 1e3
        say("encoder GEMM")
        gemm_ms = statistics.median(time_encoder_gemm(shape, batches, warmup, steps, device))
        fns, optimizer = make_steps(shape, device, implementations)
        results: dict[str, Any] = {}
        for impl, fn in fns.items():
            say(f"{impl}: timing")
            samples = time_steps(fn, batches, warmup, steps, device)
            ms = statistics.median(samples)
            say(f"{impl}: profiling")
            results[impl] = {"ms_per_step": ms, "samples_ms": samples, "ratio_to_flop_floor": ms / floor_ms,
                             "ratio_to_encoder_gemm": ms / gemm_ms,
                             "profile": profile_ops(fn, batches, steps, device, min_share)}
    native_ms = results.get("native", {}).get("ms_per_step")
    return {
        "preset": preset, "shape": shape.to_dict(), "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "optimizer": optimizer, "steps": steps, "warmup": warmup, "load_average": [load_before, _load_average()],
        "peak_flops": peak_flops, "peak_bytes_per_s": peak_bytes, "encoder_gemm_flop": flop,
        "floor_flop_ms": floor_ms, "encoder_gemm_ms": gemm_ms, "implementations": results,
        "ratios": {"native_over_flop_floor": _ratio(native_ms, floor_ms),
                   "native_over_eager_loop": _ratio(native_ms, results.get("eager_loop", {}).get("ms_per_step")),
                   "native_over_eager_stacked": _ratio(native_ms,
                                                       results.get("eager_stacked", {}).get("ms_per_step"))},
    }


def _num(value: float | None, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, more below 1 so that three significant digits show ("–" for None)."""
    if value is None:
        return "–"
    if 0 < abs(value) < 1:
        digits = max(digits, 2 - int(f"{abs(value):e}".split("e")[1]))
    return f"{value:,.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: a header, the summary per implementation, then each one's ``| part | ms per step |``
    table (ops largest first, "other", the time outside any op, the profiled total)."""
    s = report["shape"]
    ratios = report["ratios"]
    lines = [
        f"# One training step at preset `{report['preset']}`",
        "",
        f"J = {s['members']}, d = {s['d_in']}, M = {s['latents']}, K = {s['k']}, N = {s['tokens']}, {s['dtype']}. "
        f"{report['device']}, torch {report['torch']}, {report['threads']} threads, commit {report['commit']}, "
        f"{report['date']}; optimizer {report['optimizer']}; median of {report['steps']} steps after "
        f"{report['warmup']} warm-up steps; 1-minute load average "
        f"{' → '.join(_num(v, 2) for v in report.get('load_average') or [None])}.",
        "",
        f"Measured peak {report['peak_flops'] / 1e9:,.0f} GFLOP/s; encoder GEMM 2·N·d·J·M = "
        f"{_num(report['encoder_gemm_flop'] / 1e9)} GFLOP; **peak-FLOP floor {_num(report['floor_flop_ms'])} ms** (the "
        f"step if everything but the encoder GEMM were free and the GEMM ran at the measured peak); the dense encoder "
        f"GEMM x·W_encᵀ measured alone: {_num(report['encoder_gemm_ms'])} ms.",
        "",
        "| implementation | ms per step | × peak-FLOP floor | × encoder GEMM |",
        "|---|---:|---:|---:|",
    ]
    for impl, r in report["implementations"].items():
        lines.append(f"| {impl} | {_num(r['ms_per_step'])} | {_num(r['ratio_to_flop_floor'], 2)} | "
                     f"{_num(r.get('ratio_to_encoder_gemm'), 2)} |")
    lines += ["", f"native / floor {_num(ratios['native_over_flop_floor'], 2)}, native / eager_loop "
              f"{_num(ratios['native_over_eager_loop'], 2)}, native / eager_stacked "
              f"{_num(ratios['native_over_eager_stacked'], 2)}."]
    for impl, r in report["implementations"].items():
        p = r["profile"]
        device_col = any("self_device_ms_per_step" in row for row in p["ops"])
        lines += ["", f"## {impl}", "",
                  f"Self CPU time per step on the thread that runs the step, under torch.profiler (profiled step "
                  f"{_num(p['profiled_wall_ms_per_step'])} ms wall; unprofiled {_num(r['ms_per_step'])} ms): the "
                  f"rows add up to the profiled step; what an op hands to OpenMP workers is inside its own row, "
                  f"and ops a native kernel calls itself (the encoder's per-tile `aten::addmm`) are rows of "
                  f"their own.", "",
                  "| part | ms per step | calls per step |" + (" device ms per step |" if device_col else ""),
                  "|---|---:|---:|" + ("---:|" if device_col else "")]
        for row in p["ops"]:
            extra = f" {_num(row.get('self_device_ms_per_step'), 2)} |" if device_col else ""
            lines.append(f"| `{row['op']}` | {_num(row['self_cpu_ms_per_step'], 2)} | "
                         f"{_num(row['calls_per_step'], 1)} |" + extra)
        other = p["other"]
        pad = " |" if device_col else ""
        lines.append(f"| other ({other['ops']} ops) | {_num(other['self_cpu_ms_per_step'], 2)} | "
                     f"{_num(other['calls_per_step'], 1)} |" + pad)
        lines.append(f"| outside any op (Python, autograd) | {_num(p['outside_ops_ms_per_step'], 2)} | |" + pad)
        lines.append(f"| **profiled step** | **{_num(p['profiled_wall_ms_per_step'], 2)}** | |" + pad)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="default: cpu")
    parser.add_argument("--shape", type=int, default=0, help="which of the preset's shapes (default: the first)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed (and profiled) steps (default: 3; a reported number needs >= 3)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="warm-up steps (default: 2; a reported number needs >= 2)")
    parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations (default: all)")
    parser.add_argument("--min-share", type=float, default=0.01,
                        help="ops under this share of the profiled op time go into 'other' (default: 0.01)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=str(RESULTS), help="directory of the JSON and markdown (default: "
                        "bench/results)")
    args = parser.parse_args(argv)
    report = profile_step(args.preset, args.steps, args.warmup, args.impl, args.device, args.shape, args.min_share,
                          progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    text = format_report(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step_profile_{args.preset.replace('-', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
