"""Splitting a training job over ranks: which members each rank holds, and putting the trained members back together.

Member-parallel training gives each member shard of the ``members × data`` mesh (:class:`saefast.distributed.Layout`)
its own members as a smaller model of the same kind, trained by the ordinary loop: a bagging member, or a boosting
chain, never reads another's parameters, so the shard trains exactly as the members would inside the full model.

* Bagging: shard ``s`` of ``P_m`` holds members ``s·J/P_m .. (s+1)·J/P_m − 1`` — the ensemble
  ``Ensemble.bagging(cfg, J/P_m, seed=seed + s·J/P_m)``, since member ``j`` is seeded ``seed + j``.
* Boosting: stages stay sequential, so the shards split the chains: shard ``s`` holds chains
  ``s·C/P_m .. (s+1)·C/P_m − 1`` with all their stages (stacked stage-major, as in the full model).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..distributed import Layout
from ..models import Ensemble, SparseDictionary


def member_indices(model: SparseDictionary, shards: int, shard: int) -> list[int]:
    """The full model's stacked indices that member shard ``shard`` of ``shards`` holds, in the shard model's own
    storage order. ValueError, before any compute, when the model cannot be split that way."""
    if shards == 1:
        return list(range(model.n_stacked))
    if not isinstance(model, Ensemble):
        raise ValueError(f"member-parallel training splits an ensemble's members over the ranks; a single SAE has "
                         f"none to split over {shards} ranks: use parallel='data'")
    if model.combine == "bagging":
        J = model.members
        if J % shards:
            raise ValueError(f"member-parallel bagging needs the {J} members to divide evenly over the {shards} "
                             f"member shards (J not divisible by P): choose members = a multiple of {shards}")
        per = J // shards
        return list(range(shard * per, (shard + 1) * per))
    C, J = model.chains, model.members
    if C % shards:
        raise ValueError(f"member-parallel boosting splits the chains (its stages stay sequential); {C} chain(s) do "
                         f"not divide evenly over {shards} member shards: use chains = a multiple of {shards}, or "
                         f"parallel='data'")
    per = C // shards
    return [j * C + c for j in range(J) for c in range(shard * per, (shard + 1) * per)]


@torch.no_grad()
def select_members(model: SparseDictionary, shards: int, shard: int) -> SparseDictionary:
    """Member shard ``shard`` of ``model`` as a model of its own (a copy, on the same device, same mode), which
    trains exactly as those members would inside ``model``. ``model`` itself when there is one shard."""
    if shards == 1:
        return model
    indices = member_indices(model, shards, shard)
    if model.combine == "bagging":
        part = Ensemble(model.cfg, len(indices), "bagging", seed=model.seed + indices[0])
    else:
        per = model.chains // shards
        chain_seeds = model.chain_seeds[shard * per:(shard + 1) * per]
        part = Ensemble(model.cfg, model.members, "boosting", seed=chain_seeds[0], chains=per)
        part.chain_seeds = tuple(chain_seeds)
    rows = torch.tensor(indices, dtype=torch.long, device=model.W_dec.device)
    part = part.to(model.W_dec.device)
    for name, tensor in part.state_dict().items():
        tensor.copy_(getattr(model, name).index_select(0, rows))
    part.train(model.training)
    return part


@torch.no_grad()
def gather_members(model: SparseDictionary, part: SparseDictionary, layout: Layout) -> None:
    """Write every member shard's trained members back into ``model`` on every rank (all-gathers over the member
    group). Nothing to do with one member shard (``part`` is ``model``)."""
    if part is model:
        return
    shards = layout.member_shards
    where = [torch.tensor(member_indices(model, shards, s), dtype=torch.long, device=model.W_dec.device)
             for s in range(shards)]
    for name, tensor in part.state_dict().items():
        pieces = [torch.empty_like(tensor) for _ in range(shards)]
        dist.all_gather(pieces, tensor.contiguous(), group=layout.member_group)
        target = getattr(model, name)
        for rows, piece in zip(where, pieces):
            target.index_copy_(0, rows, piece.to(target.dtype))


def gather_member_values(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[..., J_shard]`` per-member values of every member shard, concatenated on the last axis in shard order —
    the full model's member order for a bagging stage and for a boosting stage's chains."""
    if layout.member_shards == 1:
        return values
    pieces = [torch.empty_like(values) for _ in range(layout.member_shards)]
    dist.all_gather(pieces, values.contiguous(), group=layout.member_group)
    return torch.cat(pieces, dim=-1)


def signature(model: SparseDictionary) -> dict[str, Any]:
    """What must match for a checkpoint to resume into ``model`` (the member seeds included: they fix the
    bootstrap resamples)."""
    return {"kind": type(model).__name__, "config": model.cfg.to_dict(),
            "members": getattr(model, "members", 1), "combine": getattr(model, "combine", None),
            "chains": getattr(model, "chains", 1), "seeds": model.member_seeds()}
