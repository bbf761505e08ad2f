"""What :class:`~saefast.SAE` and :class:`~saefast.Ensemble` share: ``J`` stacked dictionaries of ``M`` latents.

Parameters are viewed stacked on a leading axis (``W_enc [J, M, D]``, ...). For an ensemble ``J`` is the member
axis and the parameters are stored that way; for a single SAE ``J`` is its number of top-k groups (1 unless made by
``Ensemble.as_sae``), stored flat (``W_enc [J·M, D]``) and viewed stacked. Every computation runs on the stacked
views through :mod:`saefast.ops`, so an SAE and an ensemble share one implementation and one backend policy.

The training forward reads one input shared by the members, ``x [N, D]``, or one input per member,
``x_in [N, J, D]`` (bootstrap bagging: member ``j``'s resample; multi-chain boosting: chain ``c``'s residual). The
methods under *training interface* are what :mod:`saefast.training` drives.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import ops
from ..config import SAEConfig
from ..distributed import LOCAL, TokenShards
from ..ops import ref
from ..ops.codes import SparseCodes
from ..validation import check_activations

ALL_MEMBERS = slice(None)
"""The ``members`` slice that selects every stacked dictionary."""


class Stacked(NamedTuple):
    """Stacked views of the parameters of some members (all ``[J, ...]``)."""

    W_enc: torch.Tensor
    """``[J, M, D]``."""
    b_enc: torch.Tensor
    """``[J, M]``."""
    W_dec: torch.Tensor
    """``[J, M, D]``; row ``m`` is latent ``m``'s decoder direction."""
    b_dec: torch.Tensor
    """``[J, D]``, or ``[1, D]`` when shared (single SAE)."""
    log_threshold: torch.Tensor | None
    """``[J, M]`` (``jumprelu``)."""
    threshold: torch.Tensor
    """``[J, M]`` inference threshold (``batchtopk``; ``< 0`` until estimated)."""


class StepTerms(NamedTuple):
    """Loss terms of one training step for the trained members (each ``[J]`` unless stated)."""

    loss: torch.Tensor
    """Scalar to minimise: ``Σ_j fvu_j + aux_coef·aux_j + sparsity_j``."""
    fvu: torch.Tensor
    """Reconstruction loss (fraction of variance unexplained of each member's target)."""
    aux: torch.Tensor
    """AuxK loss (0 where unused)."""
    sparsity: torch.Tensor
    """Weighted sparsity penalty (``relu``: L1; ``jumprelu``: L0; else 0)."""
    l0: torch.Tensor
    """Mean active latents per token."""


class Encoded(NamedTuple):
    """What one encode gives the model, on any backend."""

    codes: SparseCodes | torch.Tensor
    """Sparse codes, or dense ``[N, J, M]`` ones (``relu``)."""
    smallest_kept: torch.Tensor | None
    """BatchTopK training: the smallest kept activation per member ``[J]`` (feeds the inference threshold)."""
    aux_codes: SparseCodes | None
    """AuxK codes of the dead latents (training, TopK/BatchTopK), or None."""
    l0: torch.Tensor | None
    """JumpReLU: the straight-through L0 per member ``[J]`` (feeds the sparsity penalty)."""


def mean_l0(codes: SparseCodes | torch.Tensor) -> torch.Tensor:
    """Mean non-zero codes per token, per member: ``[J]``."""
    if isinstance(codes, SparseCodes):
        return codes.l0().mean(0)
    return (codes != 0).sum(-1).float().mean(0)


def fvu_over(target: torch.Tensor, x_hat: torch.Tensor, tokens: TokenShards = LOCAL) -> torch.Tensor:
    """Per-member FVU ``[J]`` of ``[N, J, D]`` inputs (:func:`saefast.ops.ref.fvu_loss`), over a token axis that may be
    split over processes: then it is this rank's ``Σ_{n∈rank}‖t − x̂‖²`` over the *global* ``Σ_n‖t − t̄‖²`` (``t̄``
    and the denominator summed over ``tokens``' group), so that the ranks' values, and their gradients, add up to
    the FVU of the global batch."""
    if not tokens.split:
        return ref.fvu_loss(target, x_hat)
    sums = tokens.sum(torch.cat([target.sum(0).reshape(-1), target.new_tensor([target.shape[0]])]))
    mean = (sums[:-1] / sums[-1]).view(1, *target.shape[1:])
    total = tokens.sum((target - mean).pow(2).sum(dim=(0, 2)))
    err = (target - x_hat).pow(2).sum(dim=(0, 2))
    return err / total.clamp_min(torch.finfo(total.dtype).tiny)


def cat_codes(parts: list[SparseCodes | torch.Tensor]) -> SparseCodes | torch.Tensor:
    """Concatenate the codes of consecutive members along the member axis (all sparse or all dense)."""
    return SparseCodes.cat(parts) if isinstance(parts[0], SparseCodes) else torch.cat(parts, dim=1)


def init_dictionary(n_latents: int, d_in: int, seed: int) -> torch.Tensor:
    """Random unit-norm decoder rows ``[M, D]`` from a generator seeded with ``seed`` (fp32, CPU)."""
    generator = torch.Generator().manual_seed(int(seed))
    W = torch.randn(n_latents, d_in, generator=generator)
    ref.normalize_rows_(W)
    return W


class SparseDictionary(nn.Module):
    """Base of SAE and Ensemble; subclasses register the parameters (:meth:`_register`) and their checkpoint kind."""

    cfg: SAEConfig
    checkpoint_kind: ClassVar[str | None] = None
    """The ``kind`` a checkpoint records for this class (set by each concrete subclass)."""
    _kinds: ClassVar[dict[str, type[SparseDictionary]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.checkpoint_kind is not None:
            SparseDictionary._kinds[cls.checkpoint_kind] = cls

    @classmethod
    def class_of_kind(cls, kind: str) -> type[SparseDictionary] | None:
        """The class that saved checkpoints of ``kind`` (None if no such class is defined)."""
        return SparseDictionary._kinds.get(kind)

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint records besides the config and the weights, to rebuild this model."""
        raise NotImplementedError

    @classmethod
    def from_checkpoint_fields(cls, cfg: SAEConfig, fields: dict[str, Any]) -> SparseDictionary:
        """A model (untrained weights) of the shape :meth:`checkpoint_fields` recorded; ValueError if they do not
        fit."""
        raise NotImplementedError

    def __init__(self, cfg: SAEConfig, n_stacked: int, latents_per_stack: int, single_output: bool):
        super().__init__()
        self.cfg = cfg
        self._n_stacked = n_stacked
        self._latents = latents_per_stack
        self._single_output = single_output

    # ----- parameters -------------------------------------------------------------------------------------

    def _register(self, W_dec: torch.Tensor) -> None:
        """Create parameters from decoder rows ``W_dec`` as stored (``[J, M, D]``, or flat ``[J·M, D]`` for an SAE).

        ``W_enc`` starts as ``W_dec^T`` (its rows equal the decoder rows), ``b_enc = 0``, ``b_dec = 0`` until
        training sets it from data."""
        cfg = self.cfg
        lat_shape = W_dec.shape[:-1]
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(lat_shape))
        self.W_dec = nn.Parameter(W_dec.clone())
        b_dec_shape = (cfg.d_in,) if self._single_output else (self._n_stacked, cfg.d_in)
        self.b_dec = nn.Parameter(torch.zeros(b_dec_shape))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full(lat_shape, math.log(cfg.jumprelu_init_threshold)))
        else:
            self.log_threshold = None
        self.register_buffer("threshold", torch.full(lat_shape, -1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(lat_shape, dtype=torch.int64))
        b_init_shape = () if self._single_output else (self._n_stacked,)
        self.register_buffer("b_dec_initialized", torch.zeros(b_init_shape, dtype=torch.bool))

    def _view(self, t: torch.Tensor, members: slice) -> torch.Tensor:
        """View a parameter-shaped tensor (data or grad) as ``[J, M, ...]`` and select ``members``."""
        if self._single_output:  # single SAE: stored flat [J·M, ...]
            t = t.view(self._n_stacked, self._latents, *t.shape[1:])
        if members.indices(self._n_stacked) == (0, self._n_stacked, 1):
            # All members: no slice. A slice's backward builds a zero tensor of the whole parameter and copies the
            # gradient into it, twice the parameter's size in memory traffic per step, for nothing.
            return t
        return t[members]

    def stacked(self, members: slice = ALL_MEMBERS) -> Stacked:
        """Stacked views ``[J, ...]`` of the parameters of ``members`` (differentiable)."""
        b_dec = self.b_dec.view(1, -1) if self._single_output else self._view(self.b_dec, members)
        log_threshold = None if self.log_threshold is None else self._view(self.log_threshold, members)
        return Stacked(
            self._view(self.W_enc, members),
            self._view(self.b_enc, members),
            self._view(self.W_dec, members),
            b_dec,
            log_threshold,
            self._view(self.threshold, members),
        )

    @property
    def d_in(self) -> int:
        """Input width ``D``."""
        return self.cfg.d_in

    @property
    def n_stacked(self) -> int:
        """``J``: stacked dictionaries (an ensemble's members, all chains; an SAE's top-k groups)."""
        return self._n_stacked

    @property
    def latents_per_stack(self) -> int:
        """``M``: latents of each stacked dictionary."""
        return self._latents

    @property
    def n_latents_total(self) -> int:
        """All latents: ``J · M``."""
        return self._n_stacked * self._latents

    @property
    def single_output(self) -> bool:
        """True for an SAE: its stacked dictionaries are top-k groups that share ``b_dec`` and add up to one
        reconstruction of one input. False for an ensemble: members, each with its own ``b_dec`` and output."""
        return self._single_output

    @property
    def alpha(self) -> float:
        """Weight ``α`` of each member's output in the combined reconstruction."""
        return 1.0

    def member_seeds(self) -> list[int]:
        """Init seed of every stacked member, in storage order (an SAE's groups share its one seed)."""
        return [self.seed]

    def resolve_backend(self, backend: str | None, device: torch.device) -> str:
        """The backend this model's ops run on, on ``device`` (:func:`saefast.ops.resolve_backend` for its
        activation): decided once per public call and handed down resolved."""
        return ops.resolve_backend(backend, device, self.cfg.activation)

    # ----- the forward pieces -----------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Validate activations ``x [N, d_in]`` (finite, on the model's device) and cast them to the parameters'
        dtype (bf16/fp16/fp64 inputs are accepted)."""
        check_activations(x, self.cfg.d_in, name)
        param = self.W_enc
        if x.device != param.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {param.device}")
        return x.to(param.dtype)

    def _n_members(self, members: slice) -> int:
        """How many stacked dictionaries ``members`` selects."""
        return len(range(*members.indices(self._n_stacked)))

    def _check_inputs(self, x_in: torch.Tensor, members: slice) -> None:
        """An internal training/stage input must be ``[N, D]`` (shared) or ``[N, J, D]`` with ``J`` the members of
        the slice (one input each; never for an SAE, whose groups reconstruct one input together)."""
        J, D = self._n_members(members), self.cfg.d_in
        if x_in.dim() == 2 and x_in.shape[1] == D and x_in.shape[0] > 0:
            return
        if x_in.dim() == 3 and not self._single_output and x_in.shape[1:] == (J, D) and x_in.shape[0] > 0:
            return
        per_member = "" if self._single_output else f" or per member [N, {J}, {D}]"
        raise ValueError(f"input must be shared [N, {D}]{per_member} for these {J} member(s), got shape "
                         f"{tuple(x_in.shape)}")

    def _encode(
        self, x_in: torch.Tensor, P: Stacked, members: slice, backend: str, training: bool, aux: bool,
        max_dead: int | None = None,
    ) -> Encoded:
        """Codes of ``members`` for ``x_in`` (``[N, D]`` shared or ``[N, J, D]`` one per member) through
        :mod:`saefast.ops` on the resolved ``backend`` (:func:`saefast.ops.per_member_inputs` splits per-member
        inputs where the backend needs it).

        TopK: top-k; BatchTopK: the batch top-``N·k`` (``training``, or no threshold learned yet) or the learned
        threshold; JumpReLU: the thresholded codes and their straight-through L0; ReLU: dense codes. With ``aux``
        (training) the AuxK codes of the dead latents; ``max_dead`` bounds the largest number of dead latents of a
        member (0: none, AuxK is skipped; known on the host without a sync, see :meth:`next_dead_count_bound`), or
        None to read the exact count (a host sync)."""
        cfg = self.cfg
        run = ops.per_member_inputs
        if cfg.activation == "relu":
            return Encoded(run(ops.relu_encode, x_in, P.W_enc, P.b_enc, P.b_dec, backend=backend), None, None, None)
        if cfg.activation == "jumprelu":
            codes, l0 = run(ops.jumprelu_encode, x_in, P.W_enc, P.b_enc, P.b_dec, P.log_threshold,
                            cfg.jumprelu_bandwidth, backend=backend)
            return Encoded(codes, None, None, l0)
        if cfg.activation == "batchtopk" and not training and not bool((P.threshold < 0).any()):
            codes = run(ops.threshold_encode, x_in, P.W_enc, P.b_enc, P.b_dec, P.threshold, cfg.k, backend=backend)
            return Encoded(codes, None, None, None)
        dead = self.dead_latents(members) if aux and self.uses_auxk else None
        # The largest number of dead latents in a member decides whether AuxK runs at all, its k, and the width of
        # the dead-latent lists: shapes, so the host needs it. A bound gives the same codes (its extra slots are
        # padding, value 0); without one it is read here (a host sync).
        if dead is None:
            max_dead = 0
        elif max_dead is None:
            max_dead = int(dead.sum(-1).max())
        if max_dead == 0:
            dead = None
        aux_k = min(cfg.effective_aux_k, max_dead)
        if cfg.activation == "batchtopk":
            codes, smallest, aux_codes = run(ops.batchtopk_encode, x_in, P.W_enc, P.b_enc, P.b_dec, cfg.k, dead,
                                             aux_k, max_dead=max_dead, backend=backend)
            return Encoded(codes, smallest, aux_codes, None)
        codes, aux_codes = run(ops.topk_encode, x_in, P.W_enc, P.b_enc, P.b_dec, cfg.k, dead, aux_k,
                               max_dead=max_dead, backend=backend)
        return Encoded(codes, None, aux_codes, None)

    @staticmethod
    def _member_outputs(codes: SparseCodes | torch.Tensor, W_dec: torch.Tensor, backend: str) -> torch.Tensor:
        """Per-member decoder outputs ``[N, J, D]`` (no bias) of sparse codes, or of dense ``[N, J, M]`` ones."""
        if isinstance(codes, SparseCodes):
            return ops.decode_members_sparse(codes, W_dec, backend)
        return ref.decode_members_dense(codes.to(W_dec.dtype), W_dec)

    def _sparsity(self, enc: Encoded, P: Stacked) -> torch.Tensor:
        """``relu``: ``λ·(1/N)Σ_n Σ_m z·‖W_dec[m]‖`` (dense codes); ``jumprelu``: ``λ·L0`` (the encode's
        straight-through L0); else 0. ``[J]``."""
        cfg = self.cfg
        if cfg.activation == "relu":
            z = enc.codes
            return cfg.l1_coef * torch.einsum("njm,jm->j", z.float(), P.W_dec.norm(dim=-1)) / z.shape[0]
        if cfg.activation == "jumprelu":
            return cfg.l0_coef * enc.l0.float()
        return P.W_dec.new_zeros(P.W_dec.shape[0], dtype=torch.float32)

    def _combine(self, y: torch.Tensor, P: Stacked) -> torch.Tensor:
        """Combined reconstruction from per-member decoder outputs ``y [N, J, D]``:
        ``Σ_j y_j + b_dec`` (shared bias) or ``Σ_j α (y_j + b_dec_j)``."""
        if self._single_output:
            return self.alpha * y.sum(1) + P.b_dec[0]
        return (self.alpha * (y + P.b_dec.unsqueeze(0))).sum(1)

    # ----- training interface (driven by saefast.training) ---------------------------------------------------

    def stages(self) -> list[slice]:
        """Members trained together, stage after stage (boosting: one stage per member of each chain)."""
        return [ALL_MEMBERS]

    def stage_input(self, x: torch.Tensor, stage: int, backend: str | None = None) -> torch.Tensor:
        """What training stage ``stage`` reads and reconstructs (boosting: its residual). No gradient."""
        return x

    @property
    def uses_auxk(self) -> bool:
        """Whether training adds the AuxK loss (TopK / BatchTopK with ``aux_coef ≠ 0``)."""
        return self.cfg.activation in ("topk", "batchtopk") and self.cfg.aux_coef != 0

    def dead_latents(self, members: slice = ALL_MEMBERS) -> torch.Tensor:
        """``[J, M]`` bool: latents that have not fired for ``dead_after_tokens`` training tokens."""
        return self._view(self.tokens_since_fired, members) >= self.cfg.dead_after_tokens

    @torch.no_grad()
    def next_dead_count_bound(self, members: slice, n_tokens: int) -> torch.Tensor:
        """A bound, known before this step runs, on the largest number of dead latents of a member at the *next*
        step: ``max_j |{m : tokens_since_fired[j, m] + n_tokens ≥ dead_after_tokens}|`` (a 0-d device tensor).
        This step adds ``n_tokens`` to every counter and resets those that fire, so the next step's dead latents
        are a subset of that set."""
        counter = self._view(self.tokens_since_fired, members)
        return (counter + n_tokens >= self.cfg.dead_after_tokens).sum(-1).max()

    def b_dec_ready(self, members: slice = ALL_MEMBERS) -> bool:
        """Whether ``b_dec`` of every member of ``members`` has been set from data (a host read)."""
        flags = self.b_dec_initialized
        return bool(flags.all() if flags.dim() == 0 else flags[members].all())

    def training_terms(
        self, x_in: torch.Tensor, members: slice = ALL_MEMBERS, backend: str | None = None,
        max_dead: int | None = None, tokens: TokenShards = LOCAL,
    ) -> tuple[StepTerms, SparseCodes | torch.Tensor]:
        """Training loss terms of ``members`` reading and reconstructing ``x_in``, and their codes.

        ``x_in`` is ``[N, D]`` — one input shared by the ``J`` members of the slice — or ``[N, J, D]``, one input
        per member: member ``j`` reads and reconstructs its target ``t_j = x_in[:, j]`` (``x_in`` when shared), with
        ``pre[n, j] = W_enc[j](t_j[n] − b_dec[j]) + b_enc[j]``, ``x̂_j = W_dec[j]·z_j + b_dec[j]`` and
        ``fvu_j = Σ_n‖t_j[n] − x̂_j[n]‖² / Σ_n‖t_j[n] − t̄_j‖²``; the AuxK target is its own residual
        ``t_j − x̂_j``: ``aux_j = fvu(t_j − x̂_j, x̂_aux_j)``. An SAE's groups add up to one reconstruction of one
        shared input. The codes (sparse, or dense ``[N, J, M]`` for ReLU) feed the firing statistics. ``max_dead``:
        a host-side bound on the largest dead-latent count of a member, or None (see :meth:`_encode`).

        ``tokens`` (data-parallel training): ``x_in`` is this rank's share of a batch split over ``tokens``' group.
        Every term is then this rank's share of the global batch's term — the FVU denominators are global
        (:func:`fvu_over`), the per-token means (sparsity, L0) are divided by the global token count — so the terms
        and their gradients add up over the ranks to a single process's; BatchTopK keeps its top ``N_r·k`` per rank,
        and the inference-threshold estimate it feeds is averaged over the ranks so that every rank keeps the same.
        """
        joint = self._single_output
        self._check_inputs(x_in, members)
        backend = self.resolve_backend(backend, x_in.device)
        P = self.stacked(members)
        if self.cfg.activation in ("topk", "batchtopk") and ops.fused_backward_runs(backend, x_in.device):
            # The codes without gradient, then one op whose backward is a single fused sparse pass (encoder, decoder
            # and AuxK gradients together): the same gradients as the op-by-op chain below.
            with torch.no_grad():
                enc = self._encode(x_in, P, members, backend, training=True, aux=True, max_dead=max_dead)
            y, aux_y = ops.sparse_sae_outputs(x_in, P.W_enc, P.b_enc, P.b_dec, P.W_dec, enc.codes, enc.aux_codes,
                                              backend)
        else:
            enc = self._encode(x_in, P, members, backend, training=True, aux=True, max_dead=max_dead)
            y = self._member_outputs(enc.codes, P.W_dec, backend)
            aux_y = None if enc.aux_codes is None else self._member_outputs(enc.aux_codes, P.W_dec, backend)
        x_hat = (y.sum(1) + P.b_dec[0]).unsqueeze(1) if joint else ref.add_member_bias(y, P.b_dec)
        tgt = x_in.float() if x_in.dim() == 3 else x_in.float().unsqueeze(1)  # [N, J, D] or [N, 1, D]
        x_hat = x_hat.float()
        fvu = fvu_over(tgt.expand_as(x_hat), x_hat, tokens)
        if enc.aux_codes is None:
            aux = torch.zeros_like(fvu)
        else:
            aux_hat = aux_y.float()
            aux_hat = aux_hat.sum(1, keepdim=True) if joint else aux_hat
            residual = (tgt - x_hat).detach()
            aux = fvu_over(residual.expand_as(aux_hat), aux_hat, tokens)
            has_dead = self.dead_latents(members).any(-1)
            has_dead = has_dead.any(0, keepdim=True) if joint else has_dead
            aux = torch.where(has_dead, aux, torch.zeros_like(aux))  # no dead latent: nothing to model
        sparsity = self._sparsity(enc, P)
        l0 = mean_l0(enc.codes)
        if tokens.split:  # per-token means of this rank's share → its part of the global mean
            n_local = x_in.new_tensor(float(x_in.shape[0]), dtype=torch.float32)
            share = n_local / tokens.sum(n_local)
            sparsity, l0 = sparsity * share, l0 * share
        if joint:
            sparsity, l0 = sparsity.sum(0, keepdim=True), l0.sum(0, keepdim=True)
        loss = fvu.sum() + self.cfg.aux_coef * aux.sum() + sparsity.sum()
        if enc.smallest_kept is not None:
            self._record_threshold(tokens.mean(enc.smallest_kept), members)
        return StepTerms(loss, fvu.detach(), aux.detach(), sparsity.detach(), l0), enc.codes.detach()

    @torch.no_grad()
    def record_firing_(self, codes: SparseCodes | torch.Tensor, members: slice = ALL_MEMBERS,
                       tokens: TokenShards = LOCAL, n_tokens: int | None = None) -> None:
        """``tokens_since_fired += N``, reset to 0 for every latent that fired (sparse or dense ``[N, J, M]`` codes).

        Data-parallel (``tokens`` split): a latent fired if it fired on any rank, and ``N`` is the global batch
        (``n_tokens``), so every rank keeps the same counters, hence the same dead latents for AuxK."""
        counter = self._view(self.tokens_since_fired, members)
        if isinstance(codes, SparseCodes):
            fired = codes.fired().view_as(counter)  # no host sync
            local = codes.n_tokens
        else:
            fired, local = (codes != 0).any(0), codes.shape[0]
        fired = tokens.max(fired)
        n_tokens = local if n_tokens is None else n_tokens
        counter.add_(n_tokens)
        counter.masked_fill_(fired, 0)

    @torch.no_grad()
    def _record_threshold(self, smallest: torch.Tensor, members: slice) -> None:
        """BatchTopK threshold EMA ``θ ← (1 − β)θ + β·smallest_kept`` (set directly the first time)."""
        threshold = self._view(self.threshold, members)
        beta = self.cfg.batchtopk_threshold_momentum
        value = smallest.to(threshold.dtype).unsqueeze(-1).expand_as(threshold)
        unset = threshold < 0
        threshold.copy_(torch.where(unset, value, (1 - beta) * threshold + beta * value))

    @torch.no_grad()
    def project_decoder_grad_(self, members: slice = ALL_MEMBERS, backend: str | None = None) -> None:
        """``g_r ← g_r − (g_r·ŵ_r) ŵ_r`` for every decoder row of ``members``: the gradient's component along its
        row is removed, so a step keeps the unit norm to first order (:func:`saefast.ops.remove_parallel_grad_`,
        fused on the ``triton`` and ``native`` backends). Nothing without ``normalize_decoder``."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            W, grad = self._view(self.W_dec.data, members), self._view(self.W_dec.grad, members)
            resolved = ops.resolve_backend(backend, W.device)  # the projection has no activation
            if resolved != "torch" and not grad.is_contiguous():
                resolved = "torch"  # the fused passes update grad through a [rows, D] view
            ops.remove_parallel_grad_(W, grad, backend=resolved)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, members: slice = ALL_MEMBERS) -> None:
        """Scale the gradients so that each member's norm ``‖g_j‖ = (Σ_{p} ‖g_p[j]‖²)^½`` over its parameters is at
        most ``max_norm``: ``g_j ← g_j · min(1, max_norm / (‖g_j‖ + 1e-6))`` (one norm for an SAE). Per member, so
        that clipping never couples ensemble members: each still trains as if alone."""
        grads = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if not grads:
            return
        if self._single_output:
            total = torch.sqrt(sum(g.float().pow(2).sum() for _, g in grads))
            scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for _, g in grads:
                g.mul_(scale.to(g.dtype))
            return
        per_member = [g[members].float().pow(2).reshape(g[members].shape[0], -1).sum(-1) for _, g in grads]
        scale = (max_norm / (torch.stack(per_member).sum(0).sqrt() + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            view = g[members]
            view.mul_(scale.view(-1, *([1] * (view.dim() - 1))).to(g.dtype))

    def member_part(self, t: torch.Tensor, members: slice = ALL_MEMBERS) -> torch.Tensor:
        """A parameter-shaped tensor (a parameter's data, its gradient, an optimizer moment) restricted to
        ``members``: a view on the member axis for an ensemble; a single SAE's whole tensor (its groups are trained
        together, and its ``b_dec`` is not stacked)."""
        return t if self._single_output else self._view(t, members)

    def member_gradients(self, members: slice = ALL_MEMBERS) -> list[torch.Tensor]:
        """The gradients of ``members`` (views on the member axis; a missing gradient becomes zeros), in parameter
        order: what data-parallel training sums over its ranks."""
        grads = []
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(self.member_part(p.grad, members))
        return grads

    @torch.no_grad()
    def normalize_decoder_(self, members: slice = ALL_MEMBERS) -> None:
        """Decoder rows of ``members`` back to unit norm after an optimizer step: ``w_r ← w_r / ‖w_r‖``."""
        if self.cfg.normalize_decoder:
            ref.normalize_rows_(self._view(self.W_dec.data, members))

    @torch.no_grad()
    def init_b_dec_(self, data: torch.Tensor, members: slice = ALL_MEMBERS, tokens: TokenShards = LOCAL) -> None:
        """Set ``b_dec`` of ``members`` from a batch: mean, geometric median or zeros (``cfg.b_dec_init``).

        ``data`` is ``[N, D]`` (one value for every member) or ``[N, J, D]``: member ``j`` gets the statistic of
        its own input ``data[:, j]`` (the geometric median member by member: this runs once per stage, and each
        member's Weiszfeld iterations then stop exactly where its own would).

        Data-parallel (``data`` this rank's share of a batch split over ``tokens``' group): the statistic of the
        global batch — the mean from summed rows and counts, the geometric median by Weiszfeld iterations whose sums
        run over every rank's rows — the same on every rank."""
        self._check_inputs(data, members)
        how = self.cfg.b_dec_init
        total = tokens.sum if tokens.split else None
        if how == "mean":
            if total is None and data.dim() == 3 and data.device.type == "cpu":  # per member: see ref.fvu_loss
                value = torch.stack([data[:, j].float().mean(0) for j in range(data.shape[1])])
            elif total is None:
                value = data.float().mean(0)
            else:
                sums = total(torch.cat([data.float().sum(0).reshape(-1), data.new_tensor([data.shape[0]]).float()]))
                value = (sums[:-1] / sums[-1]).view(data.shape[1:])
        elif how == "geometric_median":
            if data.dim() == 3:
                value = torch.stack([ref.geometric_median(data[:, j].float(), total=total)
                                     for j in range(data.shape[1])])
            else:
                value = ref.geometric_median(data.float(), total=total)
        else:
            value = torch.zeros(data.shape[-1], device=data.device)
        if self._single_output:
            self.b_dec.copy_(value)
            self.b_dec_initialized.fill_(True)
        else:
            self.b_dec[members] = value
            self.b_dec_initialized[members].fill_(True)  # members is a slice: a view

    # ----- the public surface shared by SAE and Ensemble ----------------------------------------------------

    def _encode_codes(
        self, x_in: torch.Tensor, members: slice, training: bool | None, backend: str,
    ) -> SparseCodes | torch.Tensor:
        """Codes of ``members`` for input ``x_in`` (``[N, D]`` shared, or ``[N, J, D]`` one per member) on the
        resolved ``backend``; ``training`` (default: the module's mode) picks BatchTopK's batch top-k over its
        threshold."""
        self._check_inputs(x_in, members)
        training = self.training if training is None else training
        return self._encode(x_in, self.stacked(members), members, backend, training=training, aux=False).codes

    def _check_codes(self, codes: SparseCodes) -> None:
        """Sparse codes must match the model's members and latents and hold at least one token."""
        J, M = self._n_stacked, self._latents
        if codes.members != J or codes.n_latents != M:
            raise ValueError(
                f"codes have {codes.members} member(s) of {codes.n_latents} latents; this model has {J} of {M}"
            )
        if codes.n_tokens == 0:
            raise ValueError("codes are an empty batch (0 tokens)")

    def _dense_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validate dense codes ``[N, J·M]`` for :meth:`decode`; returns them as ``[N, J, M]``."""
        J, M = self._n_stacked, self._latents
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be SparseCodes or a dense tensor, got {type(codes).__name__}")
        if codes.dim() != 2 or codes.shape[1] != J * M:
            raise ValueError(f"dense codes must be [N, {J * M}], got {tuple(codes.shape)}")
        if not codes.is_floating_point():
            raise TypeError(f"codes must have a floating dtype, got {codes.dtype}")
        if codes.shape[0] == 0:
            raise ValueError("codes are an empty batch (0 tokens)")
        return codes.view(-1, J, M)

    def decode(self, codes: SparseCodes | torch.Tensor, backend: str | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x̂ [N, D]`` from codes (:class:`SparseCodes` or dense ``[N, J·M]``, member-major).

        SAE: ``x̂ = W_dec·z + b_dec``; ensemble: ``x̂ = Σ_j α (W_dec_j·z_j + b_dec_j)``. ``mask`` (sparse codes
        only): ``[N, J, K]`` bool, False drops that slot's coefficient — ``z̃ = mask ⊙ z`` decoded in the same
        launch on the fused backends (feature sharpening, :mod:`saefast.sharpen`).
        """
        P = self.stacked()
        if isinstance(codes, SparseCodes):
            self._check_codes(codes)
            if mask is not None and (mask.dtype != torch.bool or mask.shape != codes.values.shape
                                     or mask.device != codes.values.device):
                raise ValueError(f"mask must be a bool tensor shaped like the codes {tuple(codes.values.shape)} on "
                                 f"{codes.values.device}; got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
            b_dec = P.b_dec[:1] if self._single_output else P.b_dec
            return ops.decode(codes, P.W_dec, b_dec, self.alpha, mask=mask,
                              backend=ops.resolve_backend(backend, codes.values.device))
        if mask is not None:
            raise ValueError("mask applies to SparseCodes; multiply dense codes by the mask instead")
        codes = self._dense_codes(codes)
        return self._combine(ref.decode_members_dense(codes.to(P.W_dec.dtype), P.W_dec), P)

    def encode(self, x: torch.Tensor, backend: str | None = None) -> SparseCodes:
        """Sparse codes ``[N, J, K]`` of ``x [N, D]`` (``to_dense()``: ``[N, J·M]``)."""
        x = self.check_input(x)
        codes = self._encode_codes(x, ALL_MEMBERS, None, self.resolve_backend(backend, x.device))
        return codes if isinstance(codes, SparseCodes) else SparseCodes.from_dense(codes)

    def reconstruct(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """``x̂ = decode(encode(x))``, ``[N, D]``."""
        x = self.check_input(x)
        backend = self.resolve_backend(backend, x.device)
        z = self._encode_codes(x, ALL_MEMBERS, None, backend)
        P = self.stacked()
        return self._combine(self._member_outputs(z, P.W_dec, backend), P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`reconstruct`."""
        return self.reconstruct(x)
