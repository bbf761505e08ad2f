"""A single sparse autoencoder ``x̂ = W_dec·h(W_enc(x − b_dec) + b_enc) + b_dec``."""

from __future__ import annotations

from typing import Any

import torch

from ..config import SAEConfig
from ..ops.codes import SparseCodes
from .checkpoint import Checkpointable
from .dictionary import SparseDictionary, init_dictionary


class SAE(Checkpointable, SparseDictionary):
    """One SAE with ``cfg.n_latents`` latents.

    Parameters (stored flat): ``W_enc [M, D]``, ``b_enc [M]``, ``W_dec [M, D]`` (row ``i`` = decoder direction
    of latent ``i``, unit norm), ``b_dec [D]``; ``log_threshold [M]`` for JumpReLU. Buffers: ``threshold [M]``
    (BatchTopK inference; < 0 until training estimated it), ``tokens_since_fired [M]`` (dead latents).

    With ``cfg.groups = G > 1`` (made by ``Ensemble.as_sae``) the latents form ``G`` contiguous blocks and the
    activation (top-k, batch top-k) is taken in each block separately; codes are then ``[N, G, K]``.
    """

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
        super().__init__(cfg, n_stacked=cfg.groups, latents_per_stack=cfg.latents_per_group, single_output=True)
        self.seed = int(seed)
        self.decode_only = False
        """True for a boosting ensemble's ``as_sae()``: its decoder is exact, its encoder is not (see there)."""
        self._register(init_dictionary(cfg.n_latents, cfg.d_in, self.seed))

    checkpoint_kind = "sae"

    def checkpoint_fields(self) -> dict[str, Any]:
        """The seed and the decode-only flag (plus the one-member fields every checkpoint records)."""
        return {"members": 1, "combine": None, "seed": self.seed, "chains": 1, "chain_seeds": [self.seed],
                "decode_only": bool(self.decode_only)}

    @classmethod
    def from_checkpoint_fields(cls, cfg: SAEConfig, fields: dict[str, Any]) -> SAE:
        """An SAE of ``cfg`` with the recorded seed and decode-only flag."""
        sae = cls(cfg, seed=fields["seed"])
        sae.decode_only = bool(fields.get("decode_only", False))
        return sae

    @property
    def n_latents(self) -> int:
        """``M``."""
        return self.cfg.n_latents

    def _check_encodable(self) -> None:
        if self.decode_only:
            raise RuntimeError(
                "this SAE is the decoder of a boosting ensemble (as_sae of boosting): its decode is exact "
                "but a boosting stage encodes the residual of the earlier stages, which no single encoder "
                "reproduces; encode with the ensemble instead"
            )

    def encode(self, x: torch.Tensor, backend: str | None = None) -> SparseCodes:
        """Sparse codes ``z = h(W_enc(x − b_dec) + b_enc)`` as ``[N, G, K]`` (``to_dense()``: ``[N, M]``)."""
        self._check_encodable()
        return super().encode(x, backend)

    def reconstruct(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """``x̂ = W_dec·h(W_enc(x − b_dec) + b_enc) + b_dec``, ``[N, D]``."""
        self._check_encodable()
        return super().reconstruct(x, backend)

    def extra_repr(self) -> str:
        """The settings ``repr(model)`` shows."""
        cfg = self.cfg
        return (
            f"d_in={cfg.d_in}, n_latents={cfg.n_latents}, k={cfg.k}, activation={cfg.activation!r}, "
            f"groups={cfg.groups}"
        )
