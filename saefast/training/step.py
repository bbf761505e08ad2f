"""One training step: forward, backward, the decoder-gradient projection, clipping, Adam, renormalisation (the last
three fused into one pass per parameter by :class:`~saefast.training.optimizer.SAEAdam` when nothing clips)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from ..distributed import LOCAL, TokenShards
from ..models import ALL_MEMBERS, SparseDictionary, StepTerms
from ..ops.codes import SparseCodes
from .optimizer import SAEAdam


def training_step(
    model: SparseDictionary,
    optimizer: torch.optim.Optimizer,
    x_in: torch.Tensor,
    members: slice = ALL_MEMBERS,
    *,
    lr: float | None = None,
    backend: str | None = None,
    grad_clip: float | None = None,
    max_dead: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    terms: Callable[..., tuple[StepTerms, SparseCodes | torch.Tensor]] | None = None,
    tokens: TokenShards = LOCAL,
    n_tokens: int | None = None,
) -> tuple[StepTerms, SparseCodes | torch.Tensor]:
    """One optimizer step of ``members`` reading ``x_in`` (``[N, D]``, or ``[N, J, D]`` one input per member):

    ``loss = Σ_j fvu_j + aux_coef·aux_j + sparsity_j`` (:meth:`SparseDictionary.training_terms`) → backward →
    ``g_r ← g_r − (g_r·ŵ_r)ŵ_r`` on the decoder rows → per-member norm clipping at ``grad_clip`` →
    ``optimizer.step()`` at learning rate ``lr`` (unchanged when None) → decoder rows back to unit norm → the
    firing counters of the latents.

    With an :class:`~saefast.training.optimizer.SAEAdam` and no ``grad_clip``, the projection, Adam and the
    renormalisation are one fused pass over each parameter of ``members``
    (``optimizer.step(members=members, normalize_decoder=True, backend=...)``, on ``backend`` resolved for the
    parameters' device; the same update up to fp32 rounding). Clipping needs the projected gradient's norm before
    Adam, so with ``grad_clip`` (or another optimizer) the three run as separate passes.

    Gradients are cleared at the start (set to None), so after the call they hold this step's. The forward runs
    under ``torch.autocast`` in ``autocast_dtype`` when given (master weights stay fp32). ``max_dead`` is a host-side
    bound on AuxK's dead-latent count (see :class:`saefast.training.dead_count.DeadCountAhead`); ``terms`` replaces
    ``model.training_terms`` (e.g. a ``torch.compile`` of it). Returns the loss terms and the codes.

    Data-parallel (``tokens`` split over a group, ``x_in`` this rank's share of a global batch of ``n_tokens``): the
    terms are this rank's shares (:meth:`SparseDictionary.training_terms`), and right after the backward the
    gradients of ``members`` are summed over the group in buckets, once per step — so projection, clipping, Adam
    and the firing counters see the global batch's gradient and statistics, identical on every rank.
    """
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    forward = model.training_terms if terms is None else terms
    device_type = model.W_enc.device.type
    with torch.autocast(device_type=device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        if tokens.split:
            step_terms, codes = forward(x_in, members, backend, max_dead=max_dead, tokens=tokens)
        else:
            step_terms, codes = forward(x_in, members, backend, max_dead=max_dead)
    step_terms.loss.backward()
    if tokens.split:
        tokens.sum_(model.member_gradients(members))
    if isinstance(optimizer, SAEAdam) and grad_clip is None:
        optimizer.step(members=members, normalize_decoder=True,
                       backend=ops.resolve_backend(backend, model.W_dec.device))
    else:
        model.project_decoder_grad_(members, backend)
        if grad_clip is not None:
            model.clip_grad_norm_(grad_clip, members)
        if isinstance(optimizer, SAEAdam):
            optimizer.step(members=members, backend=ops.resolve_backend(backend, model.W_dec.device))
        else:
            optimizer.step()
        model.normalize_decoder_(members)
    model.record_firing_(codes, members, tokens, n_tokens)
    return step_terms, codes
