"""The benchmark cases: for each, the callables of every implementation, its reference and its nominal work.

* ``forward`` — bagging reconstruction, encode → top-k → decode; ``encode`` — the codes alone (checked as sets of
  latents with their values: near-equal latents may swap in bf16); ``decode`` — from given sparse codes;
* ``train_step`` — one bagging :func:`saefast.training.training_step`; ``boosting_chain`` — boosting inference;
* ``sharpen`` — SAE-ception targets (:func:`saefast.sharpen.targets`); ``metrics`` — diversity and member-to-member
  stability (:func:`saefast.eval.metrics.member_similarity`), on a decoder (no tokens/s).

Implementations: ``eager_loop`` (a Python loop over members, dense codes: how public trainers run an ensemble),
``eager_stacked`` (saefast's ``torch`` backend), ``compile`` (``torch.compile`` of it), ``triton`` (CUDA only),
``native`` (the C++ extension).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops, sharpen
from ..config import SAEConfig
from ..eval import metrics
from ..models import Ensemble
from ..ops import native
from ..ops.codes import SparseCodes
from ..training import SAEAdam, training_step
from .shapes import DTYPES, Shape

CASES = ("forward", "encode", "decode", "train_step", "boosting_chain", "sharpen", "metrics")
"""The benchmarked cases."""

IMPLEMENTATIONS = ("eager_loop", "eager_stacked", "compile", "triton", "native")
"""What each case is timed on: the public trainers' per-member loop, saefast's eager backend, ``torch.compile`` of it,
and the two fused backends."""


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
    floor_flop: float | None = None
    """FLOP of that floor (:func:`encoder_gemm_flop`, ``2·N·d·J·M``): divided by the measured peak FLOP/s it is the
    peak-FLOP floor, what one call would cost if everything but the encoder GEMM were free and the GEMM ran at the
    peak; None when the case has no floor."""
    tokens: bool = True
    """False: the case reads no tokens (``metrics``), so it has no tokens/s."""


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built on the first call (importing the compiler only when the backend runs)."""
    compiled: list[Callable] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args, **kwargs)

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


def encoder_gemm_flop(shape: Shape) -> float:
    """FLOP of the dense encoder GEMM over every member's latents: ``2·N·d·J·M`` (a multiply and an add per term)."""
    return 2.0 * shape.tokens * shape.d_in * shape.members * shape.latents


def check_codes(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor],
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
    err = max_error(got_values.float().sort(-1).values, want_values.float().sort(-1).values)
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
                 check=check_codes, floor_flop=encoder_gemm_flop(shape), floor=_encoder_gemm(model))


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
                 floor_flop=encoder_gemm_flop(shape), floor=_encoder_gemm(model))


def _train_case(shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    cfg = SAEConfig(d_in=shape.d_in, n_latents=shape.latents, k=shape.k)
    autocast = None if dtype == torch.float32 else dtype

    def stepper(model: Any, backend: str, compiled: bool = False) -> Callable[[torch.Tensor], Any]:
        """One :func:`saefast.training.training_step` of ``model``; returns the loss and the encoder gradient."""
        model.b_dec_initialized.fill_(True)
        optimizer = SAEAdam(model, lr=1e-4)  # the trainer's optimizer: its fused step is part of what is timed
        terms = _compiled(model.training_terms) if compiled else None

        def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # No latent can die in the few steps timed here (dead_after_tokens is 10M tokens): max_dead = 0 is
            # exact, and the trainer, too, knows the count without a sync (a bound from the step before).
            result, _ = training_step(model, optimizer, x, backend=backend, max_dead=0, autocast_dtype=autocast,
                                      terms=terms)
            return result.loss.detach(), model.W_enc.grad.clone()  # the guard compares the first step's gradient

        return step

    def stacked(backend: str, compiled: bool = False) -> Callable[[torch.Tensor], Any]:
        return stepper(Ensemble.bagging(cfg, shape.members, seed=0).to(device), backend, compiled)

    member_steps = [stepper(Ensemble.bagging(cfg, shape.members, seed=0).to(device).member(j), "torch")
                    for j in range(shape.members)]

    def loop(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = zip(*(step(x) for step in member_steps))
        return torch.stack(losses).sum(), torch.stack(grads)

    fns = {"eager_loop": loop, "eager_stacked": stacked("torch"), "triton": stacked("triton"),
           "native": stacked("native"), "compile": stacked("torch", compiled=True)}
    N, D, L = shape.tokens, shape.d_in, shape.members * shape.latents
    # nominal (dense-equivalent) work: the encoder GEMM and its two backward GEMMs — a sparse backward does less,
    # so a fused backend can exceed 100 % of the peak on this count
    return Case(fns, flop=6 * N * D * L, bytes=4 * (6 * L * D + 2 * N * D),
                 compare=lambda out: torch.cat([out[0].reshape(1), out[1].reshape(-1)]), reference=stacked("torch"),
                 floor=_encoder_gemm(Ensemble.bagging(cfg, shape.members, seed=0).to(device=device, dtype=dtype)),
                 floor_flop=encoder_gemm_flop(shape))


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
                 floor_flop=encoder_gemm_flop(shape), floor=_encoder_gemm(model))


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
                 floor_flop=encoder_gemm_flop(shape), floor=_encoder_gemm(model))


BUILDERS: dict[str, Callable[[Shape, torch.device, torch.dtype], Case]] = {
    "forward": _forward_case, "encode": _encode_case, "decode": _decode_case, "train_step": _train_case,
    "boosting_chain": _boosting_case, "sharpen": _sharpen_case, "metrics": _metrics_case}
"""How each case of :data:`CASES` is built for a shape, a device and a dtype."""


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


def max_error(got: Any, want: Any) -> float:
    """``max |got − want|`` relative to ``want``'s largest magnitude (ValueError when the shapes differ)."""
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ValueError(f"output shape {tuple(got.shape)} != eager {tuple(want.shape)}")
    scale = max(float(want.abs().max()), 1e-6)
    return float((got - want).abs().max()) / scale


def make_case(name: str, shape: Shape, device: torch.device | str) -> Case:
    """Case ``name`` (one of :data:`CASES`) at ``shape`` on ``device``: its callables per implementation and its
    work."""
    if name not in BUILDERS:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    return BUILDERS[name](shape, torch.device(device), DTYPES[shape.dtype])
