"""Sparse latent codes in a padded top-K ("ELL") layout, with an explicit member axis.

Every SAE and ensemble in saefast returns its codes as :class:`SparseCodes`:

* ``values``  ``[N, J, K]`` float — the coefficients, ``0`` in padding slots;
* ``indices`` ``[N, J, K]`` int64 — the latent each coefficient belongs to, *local to its member*
  (``0 <= index < n_latents``);
* ``n_latents`` — latents per member ``M``.

``N`` is the token axis, ``J`` the member axis (``J = 1`` for a single SAE; for a grouped SAE made by
``Ensemble.as_sae`` it is the number of groups). The dense equivalent is member-major:
latent ``i`` of member ``j`` is column ``j * M + i`` of ``to_dense()``.

Decoding sums ``values[n, j, s] * W_dec[j, indices[n, j, s]]`` over ``s``, so repeated indices add up;
:meth:`to_dense` uses ``scatter_add`` to keep the same meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseCodes:
    """Padded top-K codes ``[N, J, K]`` (values, member-local indices) of ``J`` members of ``M`` latents."""

    values: torch.Tensor
    """``[N, J, K]`` coefficients; padding slots hold 0."""
    indices: torch.Tensor
    """``[N, J, K]`` int64 latent index within the member, in ``[0, n_latents)``."""
    n_latents: int
    """Latents per member (``M``)."""

    def __post_init__(self) -> None:
        if self.values.dim() != 3 or self.values.shape != self.indices.shape:
            raise ValueError(
                "SparseCodes needs values and indices of the same shape [N, J, K]; got "
                f"{tuple(self.values.shape)} and {tuple(self.indices.shape)}"
            )
        if self.indices.dtype != torch.int64:
            raise TypeError(f"SparseCodes.indices must be int64, got {self.indices.dtype}")

    @property
    def n_tokens(self) -> int:
        """``N``."""
        return self.values.shape[0]

    @property
    def members(self) -> int:
        """``J``."""
        return self.values.shape[1]

    @property
    def k(self) -> int:
        """Slots per member and token (``K``)."""
        return self.values.shape[2]

    @property
    def n_latents_total(self) -> int:
        """``J * M``: width of :meth:`to_dense`."""
        return self.members * self.n_latents

    def to_dense(self) -> torch.Tensor:
        """Dense codes ``z[n, j*M + i] = sum_s values[n, j, s] * [indices[n, j, s] == i]``, shape ``[N, J*M]``."""
        dense = self.values.new_zeros(self.n_tokens, self.members, self.n_latents)
        dense = dense.scatter_add(-1, self.indices, self.values)
        return dense.reshape(self.n_tokens, self.n_latents_total)

    def global_indices(self) -> torch.Tensor:
        """Indices into the concatenated dictionary, ``indices[n, j, s] + j * M``, shape ``[N, J, K]``."""
        offsets = torch.arange(self.members, device=self.indices.device).view(1, -1, 1) * self.n_latents
        return self.indices + offsets

    def active_global_indices(self) -> torch.Tensor:
        """Global indices (``indices + j * M``) of the slots with a non-zero coefficient: 1-D, may repeat (its
        length is data: on a GPU the host waits for it; :meth:`fired` does not)."""
        return self.global_indices()[self.values != 0]

    def fired(self) -> torch.Tensor:
        """``[J*M]`` bool: ``fired[j*M + i]`` iff some slot of member ``j`` holds latent ``i`` with a non-zero
        coefficient. Without a host sync: slots with a zero value are written to a spare entry past the end
        instead of being filtered out by a boolean mask, and every write stores True (any order, same result)."""
        total = self.n_latents_total
        target = torch.where(self.values != 0, self.global_indices(), total)
        marks = torch.zeros(total + 1, dtype=torch.bool, device=self.values.device)
        return marks.index_fill_(0, target.reshape(-1), True)[:total]

    def detach(self) -> SparseCodes:
        """The same codes with ``values`` detached from the autograd graph."""
        return SparseCodes(self.values.detach(), self.indices, self.n_latents)

    @staticmethod
    def cat(parts: list[SparseCodes]) -> SparseCodes:
        """Concatenate codes of consecutive members along the member axis (same ``N`` and ``M``; parts with fewer
        slots ``K`` are padded to the largest with value-0, index-0 slots)."""
        k = max(p.k for p in parts)

        def pad(t: torch.Tensor, p: SparseCodes) -> torch.Tensor:
            return t if p.k == k else torch.nn.functional.pad(t, (0, k - p.k))

        return SparseCodes(torch.cat([pad(p.values, p) for p in parts], 1),
                           torch.cat([pad(p.indices, p) for p in parts], 1), parts[0].n_latents)

    def l0(self) -> torch.Tensor:
        """Non-zero coefficients per token and member, ``[N, J]`` (float)."""
        return (self.values != 0).sum(-1).to(torch.float32)

    def scaled(self, factor: float) -> SparseCodes:
        """The same codes with every coefficient multiplied by ``factor``."""
        return SparseCodes(self.values * factor, self.indices, self.n_latents)

    @staticmethod
    def from_dense(dense: torch.Tensor, members: int = 1) -> SparseCodes:
        """Pack dense codes ``[N, J*M]`` (member-major) or ``[N, J, M]`` into the padded layout.

        ``K`` is the largest number of non-zeros of any (token, member), at least 1. Non-zeros come first in
        ascending latent order; padding slots point at distinct zero-valued latents, so the packing is exact.
        """
        if dense.dim() == 2:
            if members < 1 or dense.shape[1] % members != 0:
                raise ValueError(f"cannot split {dense.shape[1]} latents into {members} members")
            dense = dense.reshape(dense.shape[0], members, dense.shape[1] // members)
        if dense.dim() != 3:
            raise ValueError(f"dense codes must be [N, J*M] or [N, J, M], got {tuple(dense.shape)}")
        nonzero = dense != 0
        k = max(int(nonzero.sum(-1).max().item()) if dense.numel() else 0, 1)
        k = min(k, dense.shape[-1])
        # Stable sort of the "is zero" flag puts the non-zeros first, in ascending latent order.
        order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :k]
        return SparseCodes(dense.gather(-1, order), order, dense.shape[-1])
