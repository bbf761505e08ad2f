"""Ensembles of SAEs (Gadgil, Lin & Lee, "Ensembling Sparse Autoencoders"), parameters stacked on a member axis.

Two training modes make members read *different* inputs in one stacked step (``x_in [N, J, D]``, see
:meth:`SparseDictionary.training_terms <saefast.models.dictionary.SparseDictionary.training_terms>`):

* **bootstrap bagging** (``sf.train(..., bootstrap=True)``, a :class:`~saefast.TrainConfig` option): every bagging
  member trains on its own resample of each batch, see :func:`saefast.training.bootstrap_indices`;
* **multi-chain boosting** (``Ensemble.boosting(cfg, members=J, seed=s, chains=C)``): ``C`` independent boosting
  chains of ``J`` stages trained at once, stage ``j`` of every chain in one stacked step, each on its own
  residual ``r_j^c``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..config import SAEConfig
from ..ops.codes import SparseCodes
from .checkpoint import Checkpointable
from .dictionary import ALL_MEMBERS, SparseDictionary, cat_codes, init_dictionary
from .sae import SAE

Combine = Literal["bagging", "boosting"]


class Ensemble(Checkpointable, SparseDictionary):
    """``J`` SAEs of the same configuration, stored stacked: ``W_enc [J, M, D]``, ``b_enc [J, M]``,
    ``W_dec [J, M, D]``, ``b_dec [J, D]`` (``log_threshold``, ``threshold``, ``tokens_since_fired``: ``[J, M]``).

    * **bagging**: every member reads ``x``; ``x̂ = (1/J)·Σ_j x̂_j`` with ``x̂_j = W_dec_j·z_j + b_dec_j``.
      Training updates all members in one stacked forward/backward per step, each on its own loss
      (with ``bootstrap=True``, each on its own resample of the batch).
    * **boosting**: member ``j`` reads the residual ``r_j = x − Σ_{i<j} x̂_i`` (``r_0 = x``) and reconstructs it;
      ``x̂ = Σ_j x̂_j``. Training runs stage after stage with the earlier stages frozen.

    Member ``j`` is initialised exactly as ``SAE(cfg, seed=seed + j)``.

    **Chains** (boosting only): ``chains=C`` holds ``C`` independent boosting chains of ``J`` stages each; chain
    ``c`` is seeded ``seed + c·J`` (its stage ``j`` initialised as ``SAE(cfg, seed=seed + c·J + j)``, so the
    ``C·J`` members have the distinct seeds ``seed .. seed + C·J − 1``; :attr:`chain_seeds`). The ``C·J``
    members are stored **stage-major**: stacked index ``i = j·C + c`` is stage ``j`` of chain ``c``, so stage
    ``j`` of every chain is the contiguous slice ``slice(j·C, (j+1)·C)`` and training runs it as one stacked
    step in which chain ``c``'s stage reads its own residual ``r_j^c = x − Σ_{i<j} x̂_i^c`` (an ``[N, C, D]``
    input; stage 0 shares ``x``). :meth:`chain` returns chain ``c`` as a standalone boosting ensemble, equal to
    ``Ensemble.boosting(cfg, J, seed=seed + c·J)`` trained alone on the same batches. A multi-chain model has
    no single reconstruction: ``encode``, ``decode``, ``reconstruct``/``forward``, ``member`` and ``as_sae``
    raise and point to ``chain(c)``; ``head(j)`` keeps every chain's first ``j`` stages.
    """

    def __init__(self, cfg: SAEConfig, members: int, combine: Combine = "bagging", seed: int = 0, chains: int = 1):
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
        if not isinstance(members, int) or isinstance(members, bool) or members < 1:
            raise ValueError(f"an ensemble needs members >= 1, got {members!r}")
        if combine not in ("bagging", "boosting"):
            raise ValueError(f"unknown combine {combine!r}; choose 'bagging' or 'boosting'")
        if not isinstance(chains, int) or isinstance(chains, bool) or chains < 1:
            raise ValueError(f"chains must be an int >= 1, got {chains!r}")
        if chains > 1 and combine != "boosting":
            raise ValueError(f"chains={chains} applies to boosting only; for more bagging members raise members "
                             f"(bagging members are independent already)")
        if cfg.groups != 1:
            raise ValueError("ensemble members must have groups=1")
        super().__init__(cfg, n_stacked=members * chains, latents_per_stack=cfg.n_latents, single_output=False)
        self.combine: Combine = combine
        self.seed = int(seed)
        self._stages_per_chain = members
        self.chain_seeds: tuple[int, ...] = tuple(self.seed + c * members for c in range(chains))
        """Seed of each chain: chain ``c``'s stage ``j`` is initialised as ``SAE(cfg, seed=chain_seeds[c] + j)``."""
        W_dec = torch.stack([init_dictionary(cfg.n_latents, cfg.d_in, seed) for seed in self.member_seeds()])
        self._register(W_dec)

    checkpoint_kind = "ensemble"

    def checkpoint_fields(self) -> dict[str, Any]:
        """Members, combine, seed, chains and each chain's seed."""
        return {"members": self.members, "combine": self.combine, "seed": self.seed, "chains": self.chains,
                "chain_seeds": list(self.chain_seeds), "decode_only": False}

    @classmethod
    def from_checkpoint_fields(cls, cfg: SAEConfig, fields: dict[str, Any]) -> Ensemble:
        """An ensemble of the recorded shape; checkpoints older than multi-chain boosting have one chain."""
        chains = fields.get("chains", 1)
        model = cls(cfg, fields["members"], fields["combine"], seed=fields["seed"], chains=chains)
        chain_seeds = fields.get("chain_seeds", list(model.chain_seeds))
        if not isinstance(chain_seeds, list) or len(chain_seeds) != chains:
            raise ValueError(f"chain_seeds {chain_seeds!r} do not match chains={chains}")
        model.chain_seeds = tuple(int(s) for s in chain_seeds)
        return model

    @classmethod
    def bagging(cls, cfg: SAEConfig, members: int, seed: int = 0) -> Ensemble:
        """Naive bagging: ``J`` SAEs, same data, seeds ``seed .. seed+J−1``; ``x̂ = (1/J)·Σ_j x̂_j``.

        Train with ``bootstrap=True`` for bootstrap bagging (each member on its own resample of every batch)."""
        return cls(cfg, members, "bagging", seed)

    @classmethod
    def boosting(cls, cfg: SAEConfig, members: int, seed: int = 0, chains: int = 1) -> Ensemble:
        """Boosting: stage ``j`` learns the residual ``r_j = x − Σ_{i<j} x̂_i``; ``x̂ = Σ_j x̂_j``.

        ``chains=C > 1``: ``C`` independent chains of ``members`` stages (chain ``c`` seeded ``seed + c·members``,
        stored stage-major), trained together; see the class docstring and :meth:`chain`."""
        return cls(cfg, members, "boosting", seed, chains)

    @property
    def members(self) -> int:
        """``J``: members (bagging) or stages per chain (boosting)."""
        return self._stages_per_chain

    @property
    def chains(self) -> int:
        """``C``: boosting chains held (1 unless made with ``chains=C``)."""
        return len(self.chain_seeds)

    @property
    def alpha(self) -> float:
        """``1/J`` for bagging, ``1`` for boosting."""
        return 1.0 / self.members if self.combine == "bagging" else 1.0

    def member_seeds(self) -> list[int]:
        """Init seed of every stacked member in storage order (stage-major: ``j·C + c`` → ``chain_seeds[c] + j``)."""
        return [seed + j for j in range(self.members) for seed in self.chain_seeds]

    def _single_chain(self, what: str) -> None:
        if self.chains > 1:
            raise ValueError(
                f"{what} is undefined on a model of {self.chains} boosting chains (each chain has its own "
                f"reconstruction); take one chain with .chain(c) (a standalone boosting Ensemble) first"
            )

    def stages(self) -> list[slice]:
        """Bagging: one stage of every member; boosting: stage ``j`` of every chain, ``slice(j·C, (j+1)·C)``."""
        if self.combine == "bagging":
            return [ALL_MEMBERS]
        C = self.chains
        return [slice(j * C, (j + 1) * C) for j in range(self.members)]

    @torch.no_grad()
    def stage_input(self, x: torch.Tensor, stage: int, backend: str | None = None) -> torch.Tensor:
        """Bagging and stage 0: ``x``; boosting stage ``j``: the residual ``r_j = x − Σ_{i<j} x̂_i`` of every chain."""
        if self.combine == "bagging" or stage == 0:
            return x
        # Frozen stages run as at inference (BatchTopK: their learned thresholds), so the stage learns
        # the residual that reconstruct() will hand it.
        return self._boosting_pass(x, self.resolve_backend(backend, x.device), stop=stage, training=False)[1]

    def _boosting_pass(
        self, x: torch.Tensor, backend: str, stop: int | None = None, training: bool | None = None,
    ) -> tuple[SparseCodes | torch.Tensor, torch.Tensor]:
        """Run stages ``0 .. stop−1`` of every chain in order: their codes (``stop·C`` members, stage-major) and the
        final residual, ``[N, D]`` for one chain or ``[N, C, D]`` (``r^c = x − Σ_{j<stop} x̂_j^c``) for ``C``.

        Stage 0 of every chain reads the shared ``x [N, D]``; stage ``j ≥ 1`` of chain ``c`` reads its own
        residual, so the ``C`` stages ``slice(j·C, (j+1)·C)`` encode an ``[N, C, D]`` input in one call."""
        stop = self.members if stop is None else stop
        C = self.chains
        residual = x
        codes = []
        for j in range(stop):
            members = slice(j * C, (j + 1) * C)
            P = self.stacked(members)
            z = self._encode_codes(residual, members, training, backend)
            x_hat = self._member_outputs(z, P.W_dec, backend) + P.b_dec.unsqueeze(0)  # [N, C, D]
            residual = (residual.unsqueeze(1) if residual.dim() == 2 else residual) - x_hat
            if C == 1:
                residual = residual[:, 0]
            codes.append(z)
        return cat_codes(codes), residual

    def _encode_codes(
        self, x_in: torch.Tensor, members: slice, training: bool | None, backend: str,
    ) -> SparseCodes | torch.Tensor:
        if self.combine == "boosting" and members == ALL_MEMBERS:
            return self._boosting_pass(x_in, backend, training=training)[0]
        return super()._encode_codes(x_in, members, training, backend)

    def encode(self, x: torch.Tensor, backend: str | None = None) -> SparseCodes:
        """Sparse codes ``[N, J, K]`` of ``x [N, D]`` (boosting: stage ``j`` encodes ``r_j``). One chain only."""
        self._single_chain("encode")
        return super().encode(x, backend)

    def decode(self, codes: SparseCodes | torch.Tensor, backend: str | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x̂ = Σ_j α (W_dec_j·z_j + b_dec_j)`` ``[N, D]`` from codes (see the base class). One chain only."""
        self._single_chain("decode")
        return super().decode(codes, backend, mask)

    def reconstruct(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Bagging ``(1/J)·Σ_j x̂_j(x)``; boosting ``Σ_j x̂_j(r_j) = x − r_J``. ``[N, D]``. One chain only."""
        self._single_chain("reconstruct")
        if self.combine == "bagging":
            return super().reconstruct(x, backend)
        x = self.check_input(x)
        return x - self._boosting_pass(x, self.resolve_backend(backend, x.device))[1]

    def member(self, j: int) -> SAE:
        """Member ``j`` as a standalone :class:`SAE` (a copy). A boosting stage expects its residual as input."""
        self._single_chain("member(j)")
        if not isinstance(j, int) or not -self.members <= j < self.members:
            raise IndexError(f"member index {j!r} out of range for {self.members} members")
        j %= self.members
        sae = SAE(self.cfg, seed=self.seed + j)
        with torch.no_grad():
            for name, tensor in sae.state_dict().items():
                tensor.copy_(getattr(self, name)[j])
        sae.train(self.training)
        return sae.to(self.W_dec.device)

    @classmethod
    @torch.no_grad()
    def from_saes(cls, saes: Sequence[SAE], combine: Combine = "bagging") -> Ensemble:
        """An ensemble whose member ``j`` is ``saes[j]`` (copied): bagging ``x̂ = (1/J) Σ_j x̂_j`` or boosting
        ``x̂ = Σ_j x̂_j`` with stage ``j`` encoding ``x − Σ_{i<j} x̂_i`` — for SAEs trained separately (other seeds,
        other libraries: the paper's bagging). The inverse of :meth:`member`.

        The members are stacked, so they must agree on everything but their weights: ``d_in``, the number of
        latents, the activation and its settings (``k``, ...); a difference is an error that names the member and
        the field. The ensemble's seed is the first SAE's."""
        saes = list(saes)
        if not saes:
            raise ValueError("from_saes needs at least one SAE")
        for j, sae in enumerate(saes):
            if not isinstance(sae, SAE):
                raise TypeError(f"member {j} is a {type(sae).__name__}, not an SAE")
            if sae.cfg.groups != 1 or sae.decode_only:
                raise ValueError(f"member {j} is an ensemble's as_sae() (grouped or decode-only); stack plain SAEs")
        first = saes[0].cfg.to_dict()
        for j, sae in enumerate(saes[1:], start=1):
            other = sae.cfg.to_dict()
            fields = [f"{key}: {first[key]!r} in member 0, {other.get(key)!r} in member {j}"
                      for key in first if other.get(key) != first[key]]
            if fields:
                raise ValueError(f"from_saes stacks SAEs with the same configuration; {'; '.join(fields)}")
        ensemble = cls(saes[0].cfg, len(saes), combine, seed=saes[0].seed)
        reference = saes[0].W_dec
        for name, tensor in ensemble.state_dict().items():
            for j, sae in enumerate(saes):
                tensor[j].copy_(getattr(sae, name).to(tensor.device))
        ensemble.train(saes[0].training)
        return ensemble.to(device=reference.device, dtype=reference.dtype)

    @torch.no_grad()
    def head(self, members: int) -> Ensemble:
        """The ensemble of the first ``members`` members (a copy), combined the same way.

        Bagging: ``x̂ = (1/j)·Σ_{i<j} x̂_i`` — the j-member bagging ensemble, since members are trained
        independently. Boosting: the first ``j`` stages, ``x̂ = Σ_{i<j} x̂_i`` — exactly the ensemble boosting
        would have built had it stopped after ``j`` stages. This is how a single run gives the metrics against
        the number of members (Figure 2 of the paper).
        """
        if not isinstance(members, int) or isinstance(members, bool) or not 1 <= members <= self.members:
            raise ValueError(f"head needs 1 <= members <= {self.members}, got {members!r}")
        head = Ensemble(self.cfg, members, self.combine, seed=self.seed, chains=self.chains)
        head.chain_seeds = self.chain_seeds  # each chain keeps its own seed
        for name, tensor in head.state_dict().items():
            # every parameter and buffer is stacked on the member axis, stage-major: the first j stages of
            # every chain are the first j·C entries
            tensor.copy_(getattr(self, name)[:members * self.chains])
        head.train(self.training)
        return head.to(self.W_dec.device)

    @torch.no_grad()
    def chain(self, c: int) -> Ensemble:
        """Boosting chain ``c`` as a standalone boosting ensemble of :attr:`members` stages (a copy).

        Its stage ``j`` is stacked member ``j·C + c`` (stage-major storage: ``tensor[c::C]``); it is seeded
        ``chain_seeds[c]``, so it equals ``Ensemble.boosting(cfg, J, seed=chain_seeds[c])`` trained alone on the
        same batches (to float rounding: the stacked steps batch the chains' GEMMs). On a one-chain model,
        ``chain(0)`` is a copy of it."""
        if self.combine != "boosting":
            raise ValueError("chain(c) applies to boosting ensembles")
        C = self.chains
        if isinstance(c, bool) or not isinstance(c, int) or not -C <= c < C:
            raise IndexError(f"chain index {c!r} out of range for {C} chain(s)")
        c %= C
        alone = Ensemble(self.cfg, self.members, "boosting", seed=self.chain_seeds[c])
        for name, tensor in alone.state_dict().items():
            tensor.copy_(getattr(self, name)[c::C])
        alone.train(self.training)
        return alone.to(self.W_dec.device)

    @torch.no_grad()
    def as_sae(self) -> SAE:
        """The ensemble as ONE SAE with ``J·M`` latents (Prop. 3.1 of the paper): same reconstruction.

        Decoder: ``W_dec = [W_dec_1; …; W_dec_J]`` (rows concatenated, member-major), ``b_dec = Σ_j α b_dec_j``
        (bagging: the mean); codes are the members' codes times ``α`` (``1/J`` bagging, ``1`` boosting).
        Encoder (bagging): ``α·pre_j = α W_enc_j (x − b_dec) + α (b_enc_j + W_enc_j (b_dec − b_dec_j))``, so
        ``W_enc = α [W_enc_j]``, ``b_enc = α [b_enc_j + W_enc_j (b_dec − b_dec_j)]`` and thresholds ``α θ``:
        the positive scale keeps every member's top-k selection, which the combined SAE takes per group
        (``groups = J``). It reproduces ``reconstruct`` and ``encode`` (codes scaled by α).

        Boosting: only the decode side holds — ``decode(ensemble.encode(x)) == ensemble.reconstruct(x)``.
        Stage ``j`` encodes ``r_j = x − Σ_{i<j} x̂_i``, which depends on the earlier stages' top-k choices
        (a non-linear function of ``x``), so no single affine encoder followed by a per-group top-k gives
        the same codes. The returned SAE is marked ``decode_only`` and refuses to encode.
        """
        self._single_chain("as_sae")
        cfg, J, M = self.cfg, self.members, self.cfg.n_latents
        alpha = self.alpha
        big = SAE(cfg.replace(n_latents=J * M, groups=J), seed=self.seed)
        b_dec = alpha * self.b_dec.sum(0)
        offset_bias = self.b_enc + torch.einsum("jmd,jd->jm", self.W_enc, b_dec.unsqueeze(0) - self.b_dec)
        big.W_enc.copy_((alpha * self.W_enc).reshape(J * M, -1))
        big.b_enc.copy_((alpha * offset_bias).reshape(J * M))
        big.W_dec.copy_(self.W_dec.reshape(J * M, -1))
        big.b_dec.copy_(b_dec)
        if self.log_threshold is not None:
            big.log_threshold.copy_((self.log_threshold + math.log(alpha)).reshape(J * M))
        big.threshold.copy_(torch.where(self.threshold < 0, self.threshold, alpha * self.threshold).reshape(J * M))
        big.tokens_since_fired.copy_(self.tokens_since_fired.reshape(J * M))
        big.b_dec_initialized.fill_(bool(self.b_dec_initialized.all()))
        big.decode_only = self.combine == "boosting"
        big.train(self.training)
        return big.to(self.W_dec.device)

    def extra_repr(self) -> str:
        """The settings ``repr(model)`` shows."""
        cfg = self.cfg
        chains = f", chains={self.chains}" if self.chains > 1 else ""
        return (
            f"{self.combine}, members={self.members}{chains}, d_in={cfg.d_in}, n_latents={cfg.n_latents}, "
            f"k={cfg.k}, activation={cfg.activation!r}"
        )
