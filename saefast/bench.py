"""Benchmark harness: every case on every available backend, checked against eager before it is timed.

``saefast bench --preset cpu-small --json out.json`` (also ``run_benchmarks`` from Python). Cases:

* ``forward`` — bagging ensemble reconstruction, encode → top-k → decode;
* ``encode`` — the codes alone: per-member top-K values and indices ``[N, J, K]`` (checked as sets of latents
  with their values: near-equal latents may swap places in bf16);
* ``decode`` — the reconstruction alone, from given sparse codes;
* ``train_step`` — one bagging training step: forward + backward + Adam + decoder renormalisation;
* ``boosting_chain`` — boosting inference: every stage encodes the residual of the stages before it;
* ``sharpen`` — SAE-ception sharpened targets of a labelled batch (:func:`saefast.sharpen.targets`);
* ``metrics`` — ensemble dictionary metrics: diversity and the ``[J, J]`` member-to-member relaxed stability
  (:func:`saefast.metrics.member_similarity`, one pass over the cosines; ``eager_loop`` computes the dense
  cosine matrix of every pair of members). Its input is a decoder, not tokens: no tokens/s.

Backends:

* ``eager_loop`` — the way public trainers run an ensemble: a Python loop over members, each with a dense
  pre-activation GEMM, ``torch.topk``, a scatter into a dense ``[N, M]`` code and a dense decode GEMM;
* ``eager_stacked`` — saefast's eager reference (``backend="torch"``): the member axis stacked, one GEMM;
* ``compile`` — ``torch.compile`` of ``eager_stacked`` (its compile time is left out: it runs in the warm-up);
* ``triton`` — the Triton kernels (CUDA only: under the CPU interpreter timings mean nothing);
* ``native`` — the C++ extension (CPU).

Each result: median ms over ``repeats`` after ``warmup`` (inputs rotate over three batches; backends are
interleaved round by round; CUDA is synchronised around each call), tokens/s, the same median for the case's
floor where it has one (``floor_ms``: the dense encoder GEMM ``x·W_encᵀ`` writing the ``[N, J·M]``
pre-activations, timed in the same rounds — every eager path pays it; a fused backend never writes them and can
go below it), peak memory of the guard call
(CUDA: ``max_memory_allocated``; CPU: the peak of its allocations net of frees, from the PyTorch profiler — not
for ``compile``, whose generated code allocates out of the profiler's sight),
achieved FLOP/s and bytes/s of the case's nominal
(dense-equivalent, the same for every backend) work, and the speedup over
``eager_loop``. The device's peak FLOP/s and bytes/s are measured once per run (a large matmul and a large copy).
A backend whose output differs from ``eager_stacked`` (or that fails) gets an error in the report, no number.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import metrics, native, ops, sharpen
from .codes import SparseCodes
from .config import SAEConfig
from .ensemble import Ensemble

CASES = ("forward", "encode", "decode", "train_step", "boosting_chain", "sharpen", "metrics")
BACKENDS = ("eager_loop", "eager_stacked", "compile", "triton", "native")


@dataclass(frozen=True)
class Shape:
    """One benchmarked size: ``J`` members of ``M`` latents on ``d``-dim activations, top-``K``, ``N`` tokens."""

    name: str
    members: int
    d_in: int
    latents: int
    k: int
    tokens: int
    dtype: str = "float32"
    classes: int = 10
    top_n: int = 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, list[Shape]] = {
    "tiny": [Shape("tiny", 2, 32, 128, 8, 256, top_n=16)],
    "cpu-small": [Shape("J4 d256 M1024 K16", 4, 256, 1024, 16, 1024)],
    "cpu": [Shape("J8 d512 M4096 K32", 8, 512, 4096, 32, 4096, top_n=256)],
    "gpu": [Shape("Gemma-2-2B-like", 8, 2304, 16384, 64, 8192, "bfloat16", top_n=1024),
            Shape("Pythia-160M-like", 8, 768, 16128, 128, 8192, "bfloat16", top_n=1024)],
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ measurement


def _sync(device: torch.device) -> None:
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
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    flops = 2 * n**3 / best(lambda: a @ b)
    bytes_per_s = 2 * src.numel() * src.element_size() / best(lambda: dst.copy_(src))
    return flops, bytes_per_s


class _PeakMemory:
    """Peak memory the block needed: CUDA's ``max_memory_allocated``; on the CPU the peak of the running sum of
    the block's allocations minus its frees, from the PyTorch profiler's memory events (peak RSS cannot be told
    apart per call: the allocator keeps freed pages resident)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._profiler = device, None, None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._profiler.__exit__(*exc)
        running = peak = 0
        for event in sorted(self._profiler.events(), key=lambda e: e.time_range.start):
            running += event.self_cpu_memory_usage
            peak = max(peak, running)
        self.peak = int(peak)


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """Callables per backend (each ``fn(inputs) -> output`` to compare), the nominal FLOP and bytes of one call.

    ``inputs`` is ``prepare(x, i)`` of the ``i``-th token batch ``x [N, D]`` (untimed: codes for ``decode``,
    a decoder for ``metrics``; ``x`` itself by default)."""

    fns: dict[str, Callable[[Any], Any]]
    flop: float
    bytes: float
    compare: Callable[[Any], Any] = lambda out: out
    reference: Callable[[Any], Any] | None = None
    """The guard's eager output; default ``fns["eager_stacked"]`` (a stateful case needs its own instance)."""
    prepare: Callable[[torch.Tensor, int], Any] = lambda x, i: x
    check: Callable[[Any, Any, float], str | None] | None = None
    """Why ``compare(output)`` disagrees with the reference's at relative tolerance ``tol`` (None: it agrees);
    default: the largest difference relative to the reference's largest magnitude, against ``tol``."""
    floor: Callable[[Any], Any] | None = None
    """What every eager path of the case pays, timed alongside the backends (the dense encoder GEMM), or None."""
    tokens: bool = True
    """False: the case reads no tokens (``metrics``), so it has no tokens/s."""


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built on the first call (importing the compiler only when the backend runs)."""
    compiled: list[Callable] = []

    def call(*args: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args)

    return call


def _reconstruct_fns(model: Ensemble, loop: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Callable]:
    """``model.reconstruct`` under no grad on every backend (``compile``: the torch one compiled), plus ``loop``."""
    def fused(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.no_grad()(lambda x: model.reconstruct(x, backend=backend))

    return {"eager_loop": loop, "eager_stacked": fused("torch"), "triton": fused("triton"), "native": fused("native"),
            "compile": _compiled(fused("torch"))}


def _loop_codes(x: torch.Tensor, model: Ensemble, j: int) -> torch.Tensor:
    """Member ``j`` as public trainers write it: dense pre-activations, ``torch.topk``, scatter to a dense code."""
    pre = (x - model.b_dec[j]) @ model.W_enc[j].T + model.b_enc[j]
    values, indices = pre.topk(model.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))


def _encoder_gemm(model: Ensemble) -> Callable[[torch.Tensor], torch.Tensor]:
    """The floor of every eager TopK path: the dense pre-activation GEMM ``x·W_encᵀ`` over all ``J·M`` latents."""
    W = model.W_enc.detach().reshape(-1, model.cfg.d_in)
    return lambda x: x @ W.T


def _codes_check(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor],
                 tolerance: float) -> str | None:
    """Codes ``(values, indices) [N, J, K]`` agree: the same latents in ≥ 99.9 % of the slots (near-equal
    latents may swap in low precision) and each row's sorted values within ``tolerance`` of the largest."""
    (got_values, got_indices), (want_values, want_indices) = got, want
    if got_indices.shape != want_indices.shape:
        return f"codes shape {tuple(got_indices.shape)} != eager {tuple(want_indices.shape)}"
    n_latents = int(max(got_indices.max(), want_indices.max())) + 1
    chosen = torch.zeros(*want_indices.shape[:2], n_latents, dtype=torch.bool, device=want_indices.device)
    chosen.scatter_(-1, want_indices, True)
    same = float(chosen.gather(-1, got_indices).float().mean())
    if same < 0.999:
        return f"selected latents differ in {100 * (1 - same):.2f}% of the slots"
    err = _max_error(got_values.float().sort(-1).values, want_values.float().sort(-1).values)
    return None if err <= tolerance else f"code values differ by {err:.3e} (relative to their largest magnitude)"


def _encode_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    model = Ensemble.bagging(cfg, shape.members, seed=0).to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def loop(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = [], []
        for j in range(shape.members):
            pre = (x - model.b_dec[j]) @ model.W_enc[j].T + model.b_enc[j]
            top = pre.topk(shape.k, dim=-1)
            values.append(torch.relu(top.values))
            indices.append(top.indices)
        return torch.stack(values, 1), torch.stack(indices, 1)

    def fused(backend: str) -> Callable[[torch.Tensor], Any]:
        return torch.no_grad()(lambda x: model.encode(x, backend=backend))

    fns = {"eager_loop": loop, "eager_stacked": fused("torch"), "triton": fused("triton"), "native": fused("native"),
           "compile": _compiled(fused("torch"))}
    N, D, L, K = shape.tokens, shape.d_in, shape.members * shape.latents, shape.members * shape.k
    element = torch.finfo(dtype).bits // 8
    return Case(fns, flop=2 * N * D * L, bytes=element * (L * D + N * D) + 2 * N * K * 8,
                 compare=lambda out: out if isinstance(out, tuple) else (out.values, out.indices),
                 check=_codes_check, floor=_encoder_gemm(model))


def _decode_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    model = Ensemble.bagging(cfg, shape.members, seed=0).to(device=device, dtype=dtype).eval()
    M = shape.latents

    @torch.no_grad()
    def loop(codes: SparseCodes) -> torch.Tensor:
        out = 0
        for j in range(shape.members):
            dense = torch.zeros(codes.n_tokens, M, dtype=dtype, device=device)
            dense.scatter_(-1, codes.indices[:, j], codes.values[:, j])
            out = out + (dense @ model.W_dec[j] + model.b_dec[j]) / shape.members
        return out

    def fused(backend: str) -> Callable[[SparseCodes], torch.Tensor]:
        return torch.no_grad()(lambda codes: model.decode(codes, backend=backend))

    fns = {"eager_loop": loop, "eager_stacked": fused("torch"), "triton": fused("triton"), "native": fused("native"),
           "compile": _compiled(fused("torch"))}
    N, D, K = shape.tokens, shape.d_in, shape.members * shape.k
    element = torch.finfo(dtype).bits // 8
    # nominal work: the sparse decode itself (N·J·K rows of D gathered, scaled and summed)
    return Case(fns, flop=2 * N * K * D, bytes=element * (N * K * D + N * D) + N * K * 8,
                 prepare=lambda x, i: torch.no_grad()(model.encode)(x, backend="torch"))


def _metrics_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    J, M, D = shape.members, shape.latents, shape.d_in

    def decoder(x: torch.Tensor, i: int) -> torch.Tensor:
        """The ``i``-th batch's decoder ``[J, M, D]`` (rotating like the token batches), unit rows."""
        w = torch.randn(J, M, D, generator=torch.Generator().manual_seed(100 + i)).to(device=device, dtype=dtype)
        return w / w.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def loop(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How it is usually written: the dense cosine matrix of every pair of members."""
        unit = torch.nn.functional.normalize(w.float(), dim=-1)
        stability = torch.zeros(J, J, dtype=torch.float64, device=w.device)
        max_abs = []
        for i in range(J):
            own = torch.full((M,), -1.0, device=w.device)
            for j in range(J):
                cos = unit[i] @ unit[j].T
                if i == j:
                    cos.fill_diagonal_(float("-inf") if M > 1 else 0.0)
                stability[i, j] = cos.amax(1).double().mean()
                if i == j:
                    cos.fill_diagonal_(0.0)
                own = torch.maximum(own, cos.abs().amax(1))
            max_abs.append(own)
        return torch.cat(max_abs), stability

    def stacked(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = metrics.member_similarity(w)
        return result["max_abs_cosine"], result["stability"]

    def separate(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guard's reference: the single-pair metrics, one call per pair of members."""
        stability = torch.tensor([[metrics.relaxed_stability(w[i], w[j]) if i != j else 0.0 for j in range(J)]
                                  for i in range(J)], dtype=torch.float64, device=w.device)
        for i in range(J):  # within a member there is no single-pair form: its dense cosines, self excluded
            unit = torch.nn.functional.normalize(w[i].double(), dim=-1)
            cos = (unit @ unit.T).fill_diagonal_(float("-inf"))
            stability[i, i] = cos.amax(1).mean() if M > 1 else 0.0
        return metrics.max_abs_cosine_to_others(w), stability

    unsupported = "no kernel of its own: the metrics are GEMM-bound and run on torch's GEMM (see eager_stacked)"

    def unavailable(w: torch.Tensor) -> Any:
        raise NotImplementedError(unsupported)

    fns = {"eager_loop": loop, "eager_stacked": stacked, "compile": _compiled(stacked), "triton": unavailable,
           "native": unavailable}
    m = J * M
    return Case(fns, flop=2 * m * m * D, bytes=4 * m * D, prepare=decoder, reference=separate,
                 compare=lambda out: torch.cat([out[0].double(), out[1].reshape(-1)]), tokens=False)


def _forward_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    model = Ensemble.bagging(cfg, shape.members, seed=0).to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def loop(x: torch.Tensor) -> torch.Tensor:
        out = 0
        for j in range(shape.members):
            out = out + (_loop_codes(x, model, j) @ model.W_dec[j] + model.b_dec[j]) / shape.members
        return out

    fns = _reconstruct_fns(model, loop)
    N, D, L, K = shape.tokens, shape.d_in, shape.members * shape.latents, shape.members * shape.k
    element = torch.finfo(dtype).bits // 8
    return Case(fns, flop=2 * N * D * L + 2 * N * K * D, bytes=element * (2 * L * D + 2 * N * D),
                 floor=_encoder_gemm(model))


def _train_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)

    def stacked(backend: str, compiled: bool = False) -> Callable[[torch.Tensor], Any]:
        model = Ensemble.bagging(cfg, shape.members, seed=0).to(device)
        model.b_dec_initialized.fill_(True)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            # No firing statistics are recorded here, so no latent is ever dead: max_dead = 0 is exact, and the
            # trainer, too, knows the count without a sync (a bound from the step before).
            return model._terms(x, backend=backend, max_dead=0)[0].loss

        loss_fn = _compiled(loss_of) if compiled else loss_of

        def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_fn(x)
            loss.backward()
            grad = model.W_enc.grad.clone()  # what the guard compares: the first step's encoder gradient
            model._project_decoder_grad(slice(None), backend)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model._normalize_decoder(slice(None))
            return loss.detach(), grad

        return step

    members = [Ensemble.bagging(cfg, shape.members, seed=0).to(device).member(j) for j in range(shape.members)]
    for m in members:
        m.b_dec_initialized.fill_(True)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in members]

    def loop(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = [], []
        for model, optimizer in zip(members, optimizers):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model._terms(x, backend="torch")[0].loss
            loss.backward()
            grads.append(model.W_enc.grad.clone())
            model._project_decoder_grad(slice(None), "torch")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model._normalize_decoder(slice(None))
            losses.append(loss.detach())
        return torch.stack(losses).sum(), torch.stack(grads)

    fns = {"eager_loop": loop, "eager_stacked": stacked("torch"), "triton": stacked("triton"),
           "native": stacked("native"), "compile": stacked("torch", compiled=True)}
    N, D, L = shape.tokens, shape.d_in, shape.members * shape.latents
    # nominal (dense-equivalent) work: the encoder GEMM and its two backward GEMMs — a sparse backward does less,
    # so a fused backend can exceed 100 % of the peak on this count
    return Case(fns, flop=6 * N * D * L, bytes=4 * (6 * L * D + 2 * N * D),
                 compare=lambda out: torch.cat([out[0].reshape(1), out[1].reshape(-1)]), reference=stacked("torch"),
                 floor=_encoder_gemm(Ensemble.bagging(cfg, shape.members, seed=0).to(device=device, dtype=dtype)))


def _boosting_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    model = Ensemble.boosting(cfg, shape.members, seed=0).to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def loop(x: torch.Tensor) -> torch.Tensor:
        residual = x
        for j in range(shape.members):
            residual = residual - (_loop_codes(residual, model, j) @ model.W_dec[j] + model.b_dec[j])
        return x - residual

    fns = _reconstruct_fns(model, loop)
    N, D, L, K = shape.tokens, shape.d_in, shape.members * shape.latents, shape.members * shape.k
    element = torch.finfo(dtype).bits // 8
    return Case(fns, flop=2 * N * D * L + 2 * N * K * D, bytes=element * (2 * L * D + 2 * N * D * shape.members),
                 floor=_encoder_gemm(model))


def _sharpen_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    model = Ensemble.bagging(cfg, shape.members, seed=0).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(shape.tokens, shape.d_in, generator=generator).to(device=device, dtype=dtype)
    labels = torch.randint(0, shape.classes, (shape.tokens,), generator=generator).to(device)
    stats = sharpen.class_stats(model, [(calibration, labels)], backend="torch")
    masks = sharpen.class_masks(stats, top_n=min(shape.top_n, model.n_latents_total))
    M = shape.latents

    @torch.no_grad()
    def loop(x: torch.Tensor) -> torch.Tensor:
        out = 0
        for j in range(shape.members):
            z = _loop_codes(x, model, j) * masks[labels, j * M:(j + 1) * M]
            out = out + (z @ model.W_dec[j] + model.b_dec[j]) / shape.members
        return out

    def fused(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: sharpen.targets(model, x, labels, masks, backend=backend)

    fns = {"eager_loop": loop, "eager_stacked": lambda x: sharpen.targets_reference(model, x, labels, masks),
           "triton": fused("triton"), "native": fused("native"),
           "compile": _compiled(lambda x: sharpen.targets_reference(model, x, labels, masks))}
    N, D, L, K = shape.tokens, shape.d_in, shape.members * shape.latents, shape.members * shape.k
    element = torch.finfo(dtype).bits // 8
    return Case(fns, flop=2 * N * D * L + 2 * N * K * D, bytes=element * (2 * L * D + 2 * N * D),
                 floor=_encoder_gemm(model))


_BUILDERS = {"forward": _forward_case, "encode": _encode_case, "decode": _decode_case, "train_step": _train_case,
             "boosting_chain": _boosting_case, "sharpen": _sharpen_case, "metrics": _metrics_case}


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None: it can)."""
    if backend == "triton":
        if device.type != "cuda":
            return "triton is benchmarked on CUDA only (the CPU interpreter's timings mean nothing)"
        if not ops.triton_available():
            return "triton is not importable"
    if backend == "native" and not native.supports(device):
        return f"native extension unavailable on {device.type}: {native.why_unavailable() or 'no kernels'}"
    return None


def _max_error(got: Any, want: Any) -> float:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ValueError(f"output shape {tuple(got.shape)} != eager {tuple(want.shape)}")
    scale = max(float(want.abs().max()), 1e-6)
    return float((got - want).abs().max()) / scale


# ------------------------------------------------------------------------------------------------ the run


def run_benchmarks(preset: str = "cpu-small", cases: Sequence[str] = CASES, backends: Sequence[str] = BACKENDS,
                   warmup: int = 1, repeats: int = 5, device: str | torch.device | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``cases`` × ``backends`` for every shape of ``preset``; returns the report (see the module docstring).

    Relative tolerance of the correctness guard: 1e-4 of the eager output's max (fp32), 5e-2 (bf16/fp16)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for name, given, known in (("case", cases, CASES), ("backend", backends, BACKENDS)):
        unknown = [c for c in given if c not in known]
        if unknown or not given:
            raise ValueError(f"unknown {name}(s) {unknown or 'none given'}; choose from {', '.join(known)}")
    if warmup < 1 or repeats < 1:
        raise ValueError("warmup and repeats must be >= 1 (the warm-up also compiles)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    revision = git_revision()
    shapes = PRESETS[preset]
    peak_flops, peak_bytes = device_peaks(device, _DTYPES[shapes[0].dtype])
    results = []
    for shape in shapes:
        batches = token_batches(shape, device)
        for case_name in cases:
            if progress:
                progress(f"{shape.name}: {case_name}")
            case = make_case(case_name, shape, device)
            results.extend(_run_case(case_name, case, shape, backends, batches, device, _DTYPES[shape.dtype], warmup,
                                     repeats, peak_flops, peak_bytes))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "triton": _triton_version(),
            "commit": revision, "preset": preset, "peak_flops": peak_flops, "peak_bytes_per_s": peak_bytes,
            "results": results}


def token_batches(shape: Shape, device: torch.device | str) -> list[torch.Tensor]:
    """The three rotating token batches ``[N, D]`` of ``shape`` (seeds 0, 1, 2), in its dtype on ``device``."""
    return [torch.randn(shape.tokens, shape.d_in, generator=torch.Generator().manual_seed(i)).to(
        device=device, dtype=_DTYPES[shape.dtype]) for i in range(3)]


def make_case(name: str, shape: Shape, device: torch.device | str) -> Case:
    """Case ``name`` (one of :data:`CASES`) at ``shape`` on ``device``: its callables per backend and its work."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    return _BUILDERS[name](shape, torch.device(device), _DTYPES[shape.dtype])


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
        with _PeakMemory(device) as peak:
            got = case.compare(case.fns[backend](inputs))
            _sync(device)
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
    rows = []
    for backend in backends:
        row: dict[str, Any] = {"case": name, "backend": backend, "shape": shape.to_dict(), "ok": backend not in errors,
                               "ms": None, "tokens_per_s": None, "peak_mem_bytes": memory.get(backend),
                               "speedup_vs_eager_loop": None, "flop_per_s": None, "bytes_per_s": None,
                               "fraction_of_peak_flops": None, "floor_ms": floor * 1e3 if floor else None,
                               "error": errors.get(backend)}
        if backend not in errors:
            seconds = statistics.median(samples[backend])
            row.update(ms=seconds * 1e3, tokens_per_s=shape.tokens / seconds if case.tokens else None,
                       flop_per_s=case.flop / seconds, bytes_per_s=case.bytes / seconds,
                       fraction_of_peak_flops=case.flop / seconds / peak_flops,
                       speedup_vs_eager_loop=base / seconds if base else None)
        rows.append(row)
    return rows


_FLOOR = "floor"  # the key of a case's floor among the timed callables


def _check_max_error(got: Any, want: Any, tolerance: float) -> str | None:
    err = _max_error(got, want)
    if err <= tolerance:
        return None
    return f"differs from the eager reference by {err:.3e} (relative to its largest magnitude)"


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
            _sync(device)
            start = time.perf_counter()
            fn(data)
            _sync(device)
            if i >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def git_revision() -> str:
    """Short git hash of the saefast checkout, ``+dirty`` when tracked files differ from it: a result measured on
    uncommitted code says so. Outside git (a copy of the tree, as on a lent GPU machine): ``$SAEFAST_COMMIT`` if
    set, else ``unknown``."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------------------------------------ reports


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per (shape, case, backend); "× encoder GEMM" is ``ms / floor_ms``
    (how far above the dense encoder GEMM alone the backend is)."""
    lines = [f"{report['device']}, torch {report['torch']}, commit {report['commit']}, preset {report['preset']}; "
             f"measured peaks {report['peak_flops'] / 1e9:.0f} GFLOP/s, {report['peak_bytes_per_s'] / 1e9:.1f} GB/s",
             "", "| shape | case | backend | ms | tokens/s | × eager loop | × encoder GEMM | nominal % of peak FLOP/s "
             "| peak mem (MB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        mem = f"{row['peak_mem_bytes'] / 2**20:,.0f}" if row["peak_mem_bytes"] else "–"
        if row["ok"]:
            speed = f"{row['speedup_vs_eager_loop']:.2f}" if row["speedup_vs_eager_loop"] else "–"
            tokens = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "–"
            floor = f"{row['ms'] / row['floor_ms']:.2f}" if row.get("floor_ms") else "–"
            cells = [f"{row['ms']:,.1f}", tokens, speed, floor, f"{100 * row['fraction_of_peak_flops']:.0f}", mem]
        else:
            cells = ["error: " + row["error"].replace("|", "\\|"), "", "", "", "", ""]
        lines.append(f"| {row['shape']['name']} | {row['case']} | {row['backend']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Bar chart of the speedup over the eager loop, one group per (shape, case) (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["shape"]["name"], r["case"]) for r in report["results"]))
    backends = list(dict.fromkeys(r["backend"] for r in report["results"] if r["ok"]))  # the ones with a number
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4), constrained_layout=True)
    for b, backend in enumerate(backends):
        values = []
        for shape, case in groups:
            row = next((r for r in report["results"] if (r["shape"]["name"], r["case"], r["backend"])
                        == (shape, case, backend)), None)
            values.append(row["speedup_vs_eager_loop"] if row and row["ok"] and row["speedup_vs_eager_loop"] else 0)
        ax.bar([g + b * width for g in range(len(groups))], values, width, label=backend)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{c}\n{s}" for s, c in groups], fontsize=8)
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.set_ylabel("speedup over the eager per-member loop")
    ax.set_title(f"{report['device']} · preset {report['preset']} · commit {report['commit']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
