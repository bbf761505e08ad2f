"""Typed configuration of one SAE (architecture) and of a training run (optimisation)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

Activation = Literal["topk", "batchtopk", "relu", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
BDecInit = Literal["mean", "geometric_median", "zeros"]
Decay = Literal["linear", "cosine", "none"]


@dataclass
class SAEConfig:
    """Architecture of one sparse autoencoder ``x̂ = W_dec·h(W_enc(x − b_dec) + b_enc) + b_dec``."""

    d_in: int
    """Width ``D`` of the activations it reads."""
    n_latents: int
    """Dictionary size ``M`` (latents of one member)."""
    k: int = 32
    """Active latents per token: top-k for ``topk``; the batch average for ``batchtopk``; unused otherwise."""
    activation: Activation = "topk"
    """``topk`` | ``batchtopk`` | ``relu`` (+ decoder-norm-weighted L1) | ``jumprelu`` (+ L0 via STE)."""
    groups: int = 1
    """Top-k is taken separately in each of ``groups`` equal contiguous blocks of latents (``k`` per block).
    Only ``Ensemble.as_sae`` sets this (> 1) so that the combined SAE keeps every member's own top-k."""
    aux_k: int | None = None
    """AuxK: dead latents used to model the residual (``topk``/``batchtopk``); default ``min(D // 2, M)``."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024)."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (AuxK, dead fraction)."""
    l1_coef: float = 1e-3
    """``relu``: weight λ of the sparsity penalty λ·Σ_i |z_i|·‖W_dec[i]‖."""
    l0_coef: float = 1e-3
    """``jumprelu``: weight λ of the sparsity penalty λ·‖z‖₀ (gradient to the thresholds by STE)."""
    jumprelu_bandwidth: float = 1e-3
    """``jumprelu``: width ε of the rectangle kernel of the straight-through estimator."""
    jumprelu_init_threshold: float = 1e-3
    """``jumprelu``: initial threshold θ (learned as log θ)."""
    batchtopk_threshold_momentum: float = 0.01
    """``batchtopk``: EMA rate of the inference threshold (mean smallest kept activation per batch)."""
    normalize_decoder: bool = True
    """Keep every decoder row (one per latent) at unit norm and remove the gradient parallel to it."""
    b_dec_init: BDecInit = "geometric_median"
    """How ``b_dec`` is set from the first training batch (for boosting: from that stage's residual)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "k", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.n_latents % self.groups != 0:
            raise ValueError(f"n_latents={self.n_latents} is not divisible by groups={self.groups}")
        if self.activation in ("topk", "batchtopk") and self.k > self.latents_per_group:
            raise ValueError(
                f"k={self.k} exceeds the number of latents ({self.latents_per_group}"
                f"{' per group' if self.groups > 1 else ''})"
            )
        if self.aux_k is not None and not 1 <= self.aux_k <= self.n_latents:
            raise ValueError(f"aux_k must be in [1, n_latents={self.n_latents}], got {self.aux_k}")
        if self.b_dec_init not in get_args(BDecInit):
            raise ValueError(f"unknown b_dec_init {self.b_dec_init!r}; choose one of {get_args(BDecInit)}")
        for name in ("aux_coef", "l1_coef", "l0_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"SAEConfig.{name} must be >= 0")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "batchtopk_threshold_momentum"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SAEConfig.{name} must be > 0")

    @property
    def latents_per_group(self) -> int:
        """``n_latents // groups``."""
        return self.n_latents // self.groups

    @property
    def effective_aux_k(self) -> int:
        """AuxK width: ``aux_k`` if set, else ``min(max(⌊D/2⌋, 1), M)`` (Gao et al.'s default of half the input
        width, at most the latents)."""
        return self.aux_k if self.aux_k is not None else min(max(self.d_in // 2, 1), self.n_latents)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (used by checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a checkpoint from another version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SAEConfig field(s) {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class TrainConfig:
    """Optimisation of ``saefast.train``: Adam with linear warm-up then decay, fp32 master weights."""

    steps: int = 1000
    """Optimizer steps (for boosting: per stage)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int | None = None
    """Steps of linear warm-up from 0 to ``lr`` (see :meth:`lr_at`); default 5 % of ``steps``."""
    decay: Decay = "linear"
    """Shape of the decay to 0 over the last ``decay_fraction`` of the steps."""
    decay_fraction: float = 0.2
    """Fraction of the steps over which the learning rate decays."""
    grad_clip: float | None = None
    """If set, scale each member's gradient ``g_j`` (all its parameters) by ``min(1, grad_clip / (‖g_j‖ + 1e-6))``:
    per ensemble member, so that members stay independent (one norm for an SAE)."""
    log_every: int = 50
    """Record metrics every this many steps (and at the last step)."""
    autocast: bool = True
    """bf16 autocast for the forward on CUDA (weights stay fp32). Ignored on CPU."""
    seed: int = 0
    """Seeds torch for the run (data order is the caller's)."""
    progress: bool = True
    """Show progress: a live bar on a terminal, one plain line every 30 s otherwise (:mod:`saefast.progress`)."""
    checkpoint_dir: str | None = None
    """Save model + optimizer here every ``checkpoint_minutes`` / ``checkpoint_every`` steps, at the end, and when a
    SIGINT or SIGTERM stops the run (after the step under way), for resuming."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none counted in steps)."""
    checkpoint_minutes: float = 5.0
    """Minutes of wall time between checkpoints (0: none counted in time): what a ``kill -9`` can lose."""
    resume: bool = False
    """Resume from ``checkpoint_dir`` if it holds a checkpoint (skipping the batches already consumed); every
    setting that shapes the result must match the checkpoint's (:data:`RESUME_FIELDS`)."""
    backend: str | None = None
    """Op backend (``auto``/``torch``/``triton``/``native``, see :mod:`saefast.ops`); None: the current
    :func:`saefast.use_backend` choice, else ``auto``."""
    bootstrap: bool = False
    """Bootstrap bagging: every member trains on its own resample (with replacement, same size ``N``) of every
    batch, rows ``x[bootstrap_indices(N, member_seed, step, seed)]`` (:func:`saefast.training.bootstrap_indices`),
    ``b_dec`` initialised from its first resample. Depends only on the member's init seed, the step and ``seed``,
    so training ``SAE(cfg, seed=ens.seed + j)`` alone with this option gives member ``j``. Single SAEs and
    bagging ensembles only (a boosting stage reads its residual)."""

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.decay not in get_args(Decay):
            raise ValueError(f"unknown decay {self.decay!r}; choose one of {get_args(Decay)}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in [0, 1]")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0")
        if not self.checkpoint_minutes >= 0:
            raise ValueError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")
        if not isinstance(self.bootstrap, bool):
            raise ValueError(f"bootstrap must be a bool, got {self.bootstrap!r}")
        if self.backend is not None and self.backend not in ("auto", "torch", "triton", "native"):
            raise ValueError(f"unknown backend {self.backend!r}; choose auto, torch, triton or native")

    def resume_fields(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (:data:`RESUME_FIELDS`), JSON-able."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(self, name)) for name in RESUME_FIELDS)}

    @property
    def effective_warmup(self) -> int:
        """Warm-up steps ``W``: ``warmup_steps`` if set, else ``⌊steps / 20⌋`` (5 % of the run)."""
        return self.warmup_steps if self.warmup_steps is not None else max(self.steps // 20, 0)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``t`` (0-based): linear warm-up, plateau, decay towards 0.

        ``lr·(t + 1)/(W + 1)`` for ``t < W`` (:attr:`effective_warmup`); ``lr`` until the last
        ``S = round(steps·decay_fraction)`` steps (``S = 0`` for ``decay="none"``); from ``t₀ = steps − S`` on,
        with ``p = (t − t₀ + 1)/(S + 1)``: ``lr·(1 − p)`` (linear) or ``lr·½(1 + cos πp)`` (cosine)."""
        warmup = self.effective_warmup
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        decay_steps = int(round(self.steps * self.decay_fraction)) if self.decay != "none" else 0
        decay_start = self.steps - decay_steps
        if decay_steps == 0 or step < decay_start:
            return self.lr
        progress = (step - decay_start + 1) / (decay_steps + 1)
        if self.decay == "linear":
            return self.lr * (1 - progress)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))


RESUME_FIELDS = ("steps", "lr", "betas", "eps", "warmup_steps", "decay", "decay_fraction", "grad_clip", "autocast",
                 "seed", "bootstrap")
"""The :class:`TrainConfig` fields that shape the trained weights: resuming with any of them changed would not
give the run the checkpoint began (logging, checkpointing, progress and the backend do not count)."""
