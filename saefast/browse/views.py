"""What the browser shows beside each latent's examples: its nearest latents in the other members, the members'
shared features, and the tokens its decoder direction promotes through a language model's unembedding."""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest_latents(W_dec: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For every latent ``a`` of member ``i`` and every member ``j``: the latent of ``j`` with the largest cosine
    ``cos(w_a, w_b)`` between decoder rows, and that cosine: ``(cosine [J, M, J], index [J, M, J])`` (a member
    against itself: the best *other* latent). Blocks of ``block`` rows; never an ``M × M`` matrix per pair."""
    J, M, _ = W_dec.shape
    unit = torch.nn.functional.normalize(W_dec.detach().float(), dim=-1)
    cosine = torch.empty(J, M, J)
    index = torch.empty(J, M, J, dtype=torch.long)
    for i in range(J):
        for start in range(0, M, block):
            rows = unit[i, start:start + block]
            for j in range(J):
                sims = rows @ unit[j].T
                if i == j:
                    picked = torch.arange(rows.shape[0], device=sims.device)
                    sims[picked, picked + start] = float("-inf")
                best, where = sims.max(dim=1)
                cosine[i, start:start + rows.shape[0], j] = best.cpu()
                index[i, start:start + rows.shape[0], j] = where.cpu()
    return cosine, index


def shared_matrix(cosine: torch.Tensor, threshold: float) -> list[list[float]]:
    """``[J, J]``: the fraction of member ``i``'s latents whose nearest latent in member ``j`` has cosine ≥
    ``threshold`` (1 on the diagonal) — the features the two members share (the paper's diversity threshold)."""
    J = cosine.shape[0]
    shared = (cosine >= threshold).double().mean(1)  # [J (i), J (j)]
    shared[torch.arange(J), torch.arange(J)] = 1.0
    return [[round(v, 4) for v in row] for row in shared.tolist()]


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, unembed: torch.Tensor, norm_weight: torch.Tensor | None, k: int,
                  block: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` tokens each decoder row promotes and suppresses most through the unembedding:
    ``logit = W_U · (γ ⊙ w)`` with ``γ`` the final norm's weight (the direct path, ignoring the norm's scale).
    ``W_dec [G, d]``, ``unembed [V, d]``. Returns ``(top values, top ids, bottom values, bottom ids)``, ``[G, k]``."""
    rows = W_dec.detach().float()
    if norm_weight is not None:
        rows = rows * norm_weight.detach().float().to(rows.device)
    unembed = unembed.detach().float().to(rows.device)
    parts = []
    for start in range(0, rows.shape[0], block):
        logits = rows[start:start + block] @ unembed.T
        high, high_ids = logits.topk(k, dim=1)
        low, low_ids = (-logits).topk(k, dim=1)
        parts.append((high.cpu(), high_ids.cpu(), (-low).cpu(), low_ids.cpu()))
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]
