"""Evaluation metrics for sparse autoencoders and SAE ensembles: pure functions on tensors.

Three families:

* **Reconstruction** — :func:`mse`, :func:`fvu`, :func:`explained_variance`,
  :func:`explained_variance_per_dim` and the streaming :class:`ReconstructionStats` they are built on.
  Sums over tokens are accumulated in float64.
* **Sparsity / liveness** — :func:`l0`, :func:`l0_total`, :class:`FiringWindow`,
  :func:`dead_latent_fraction`, on :class:`~saefast.codes.SparseCodes`.
* **Ensemble dictionaries** — :func:`max_abs_cosine_to_others`, :func:`diversity`,
  :func:`relaxed_stability`, :func:`member_similarity` (the first and second for every pair of
  members of an ensemble, in one pass), :func:`connectivity`. None of them builds an ``m x m`` matrix: they work in
  blocks of ``block_size`` rows/columns, by default chosen so that one ``block_size x width`` block of
  scratch (float32 cosines, or booleans for :func:`connectivity`) is at most ~256 MB, ``width`` being the
  number of features compared against.

Notation: ``x, x_hat`` are ``[N, D]`` (tokens x model dimensions); ``x̄ = (1/N) Σ_n x_n``. A dictionary is
given by its decoder rows, ``[m, D]`` or member-stacked ``[J, M, D]`` (flattened member-major to
``[J*M, D]``, so row ``j*M + i`` is latent ``i`` of member ``j``, matching ``SparseCodes.to_dense``).
``cos(u, v) = u·v / (‖u‖‖v‖)``, with ``cos = 0`` whenever ``u`` or ``v`` is the zero vector.

This module imports only ``torch``, ``math`` and ``saefast.codes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..ops.codes import SparseCodes

__all__ = [
    "FiringWindow",
    "ReconstructionStats",
    "connectivity",
    "dead_latent_fraction",
    "diversity",
    "explained_variance",
    "explained_variance_per_dim",
    "fvu",
    "l0",
    "l0_total",
    "max_abs_cosine_to_others",
    "member_similarity",
    "mse",
    "relaxed_stability",
]

_BLOCK_BUDGET_BYTES = 256 * 2**20
"""Target size of one ``block_size x width`` block of scratch (default block sizes)."""


_JOIN_CHUNK_ELEMENTS = 2**23
"""Index pairs materialised at once by :func:`connectivity`'s sparse join (~64 MB of int64 per tensor)."""


def _default_block_size(width: int, element_size: int = 4) -> int:
    """Rows per block so that ``rows * width * element_size <= 256 MiB`` (at least 1)."""
    return max(1, _BLOCK_BUDGET_BYTES // (element_size * max(int(width), 1)))


def _check_block_size(block_size: int | None, width: int, element_size: int = 4) -> int:
    if block_size is None:
        return _default_block_size(width, element_size)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return int(block_size)


# --------------------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, D], got shape {tuple(x.shape)}")
    if x.shape != x_hat.shape:
        raise ValueError(
            f"x and x_hat must have the same shape [N, D]; got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"x has no dimensions (shape {tuple(x.shape)})")


class ReconstructionStats:
    """Streaming reconstruction statistics over a sequence of ``(x, x_hat)`` batches, one pass.

    Per model dimension ``d`` it keeps, in float64, over all tokens seen so far:

    * ``n`` — number of tokens;
    * ``mean_d = (1/n) Σ_n x_nd``;
    * ``m2_d = Σ_n (x_nd - mean_d)²`` — merged across batches with Chan et al.'s parallel update
      ``m2 ← m2 + m2_b + δ² · n·n_b / (n + n_b)``, ``δ = mean_b - mean`` (each batch's own ``m2_b`` is
      computed two-pass around its batch mean). This equals ``Σ x² - (Σ x)²/n`` but avoids its
      catastrophic cancellation when ``|x̄| ≫ std(x)``;
    * ``res_d = Σ_n (x_nd - x̂_nd)²``;
    * ``min_d``, ``max_d`` of ``x_nd`` — a dimension has zero variance exactly when ``min_d == max_d``
      (its ``m2_d`` is then taken as exactly 0, whatever the float rounding of the mean was).

    :meth:`compute` then returns, identically (up to float rounding) to the one-shot functions on the
    concatenation of all batches::

        mse                        = Σ_d res_d / n
        fvu                        = Σ_d res_d / Σ_d m2_d                  (nan if Σ_d m2_d == 0)
        explained_variance         = 1 - fvu
        explained_variance_per_dim = mean over {d : m2_d > 0} of (1 - res_d / m2_d)
                                                                          (nan if no such d)

    Batches with ``N = 0`` tokens are accepted and ignored; all batches must share ``D``.
    """

    def __init__(self) -> None:
        self.n: int = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.res: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget every batch seen."""
        self.__init__()

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add one batch: ``x``, ``x_hat`` of shape ``[N, D]`` (``D`` fixed across batches)."""
        _check_pair(x, x_hat)
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"batch has D={x.shape[1]} but earlier batches had D={self.mean.shape[0]}")
        nb = x.shape[0]
        if nb == 0:
            return
        xd = x.detach().to(torch.float64)
        res_b = (xd - x_hat.detach().to(device=xd.device, dtype=torch.float64)).square().sum(0)
        mean_b = xd.mean(0)
        m2_b = (xd - mean_b).square().sum(0)
        min_b = xd.amin(0)
        max_b = xd.amax(0)
        if self.mean is None:
            self.n, self.mean, self.m2, self.res, self.min, self.max = nb, mean_b, m2_b, res_b, min_b, max_b
            return
        dev = self.mean.device
        mean_b, m2_b, res_b, min_b, max_b = (t.to(dev) for t in (mean_b, m2_b, res_b, min_b, max_b))
        n_new = self.n + nb
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * nb / n_new)
        self.mean = self.mean + delta * (nb / n_new)
        self.res = self.res + res_b
        self.min = torch.minimum(self.min, min_b)
        self.max = torch.maximum(self.max, max_b)
        self.n = n_new

    def _totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0 or self.m2 is None:
            raise ValueError("ReconstructionStats has seen no tokens; call update() with a non-empty batch")
        var = torch.where(self.max > self.min, self.m2.clamp_min(0.0), torch.zeros_like(self.m2))
        return var, self.res

    def mse(self) -> float:
        """``(1/n) Σ_n Σ_d (x_nd - x̂_nd)²`` over all tokens seen."""
        _, res = self._totals()
        return float(res.sum().item() / self.n)

    def fvu(self) -> float:
        """``Σ_n ‖x_n - x̂_n‖² / Σ_n ‖x_n - x̄‖²``; ``nan`` when the total variance is 0."""
        var, res = self._totals()
        total = float(var.sum().item())
        if total == 0.0:
            return math.nan
        return float(res.sum().item()) / total

    def explained_variance(self) -> float:
        """``1 - fvu`` (``nan`` when the total variance is 0)."""
        return 1.0 - self.fvu()

    def explained_variance_per_dim(self) -> float:
        """``mean_{d: var_d > 0} [1 - Σ_n (x_nd - x̂_nd)² / Σ_n (x_nd - x̄_d)²]``.

        ``nan`` if every ``var_d = 0``.
        """
        var, res = self._totals()
        keep = var > 0
        if not bool(keep.any()):
            return math.nan
        return float((1.0 - res[keep] / var[keep]).mean().item())

    def compute(self) -> dict[str, float]:
        """All four statistics as a dict.

        Keys ``mse``, ``fvu``, ``explained_variance``, ``explained_variance_per_dim`` (formulas above).
        """
        fvu_value = self.fvu()
        return {
            "mse": self.mse(),
            "fvu": fvu_value,
            "explained_variance": 1.0 - fvu_value,
            "explained_variance_per_dim": self.explained_variance_per_dim(),
        }


def _one_shot(x: torch.Tensor, x_hat: torch.Tensor) -> ReconstructionStats:
    _check_pair(x, x_hat)
    if x.shape[0] == 0:
        raise ValueError("x has no tokens (N = 0)")
    stats = ReconstructionStats()
    stats.update(x, x_hat)
    return stats


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error per token: ``(1/N) Σ_n Σ_d (x_nd - x̂_nd)²`` (float64 accumulation).

    ``x``, ``x_hat``: ``[N, D]``. Raises ``ValueError`` on shape mismatch or ``N = 0``.
    """
    return _one_shot(x, x_hat).mse()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, total-variance form.

    ``fvu = Σ_n ‖x_n - x̂_n‖² / Σ_n ‖x_n - x̄‖²`` with ``x̄ = (1/N) Σ_n x_n`` (float64 accumulation).
    Returns ``nan`` when the denominator is 0 (every dimension of ``x`` constant).
    """
    return _one_shot(x, x_hat).fvu()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - fvu(x, x_hat) = 1 - Σ_n ‖x_n - x̂_n‖² / Σ_n ‖x_n - x̄‖²`` (``nan`` if total variance is 0)."""
    return _one_shot(x, x_hat).explained_variance()


def explained_variance_per_dim(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Per-dimension explained variance, averaged over dimensions.

    ``(1/|S|) Σ_{d ∈ S} [1 - Σ_n (x_nd - x̂_nd)² / Σ_n (x_nd - x̄_d)²]`` where
    ``S = {d : x_·d is not constant}`` — zero-variance dimensions are skipped. Returns ``nan`` if every
    dimension has zero variance (``S`` empty).
    """
    return _one_shot(x, x_hat).explained_variance_per_dim()


# --------------------------------------------------------------------------------------------------------
# Sparsity and dead latents
# --------------------------------------------------------------------------------------------------------


def l0(codes: SparseCodes) -> torch.Tensor:
    """Mean number of non-zero coefficients per token, per member: ``[J]`` float64.

    ``l0[j] = (1/N) Σ_n #{s : values[n, j, s] ≠ 0}`` (slots are counted as in ``SparseCodes.l0``).
    Raises ``ValueError`` if ``N = 0``.
    """
    if codes.n_tokens == 0:
        raise ValueError("l0 needs at least one token (N = 0)")
    return (codes.values != 0).sum(-1).to(torch.float64).mean(0)


def l0_total(codes: SparseCodes) -> float:
    """Sum of :func:`l0` over members: ``Σ_j (1/N) Σ_n #{s : values[n, j, s] ≠ 0}``."""
    return float(l0(codes).sum().item())


class FiringWindow:
    """Which of ``n_latents_total`` latents (global indices, ``j*M + i``) fired in a window of batches.

    ``fired[g]`` is True once some token has a non-zero coefficient on global latent ``g``;
    ``n_tokens`` counts the tokens seen. :meth:`dead_fraction` is
    ``#{g : not fired[g]} / n_latents_total`` (1.0 before any update). :meth:`reset` starts a new window.
    """

    def __init__(self, n_latents_total: int, device: torch.device | str | None = None) -> None:
        if int(n_latents_total) < 1:
            raise ValueError(f"n_latents_total must be >= 1, got {n_latents_total}")
        self.n_latents_total = int(n_latents_total)
        self.fired = torch.zeros(self.n_latents_total, dtype=torch.bool, device=device)
        self.n_tokens = 0

    def reset(self) -> None:
        """Mark every latent as not fired and zero the token count."""
        self.fired.zero_()
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, codes: SparseCodes) -> None:
        """Mark every global latent with a non-zero coefficient in ``codes`` as fired; count its tokens."""
        if codes.n_latents_total != self.n_latents_total:
            raise ValueError(
                f"codes have J*M = {codes.members}*{codes.n_latents} = {codes.n_latents_total} latents, "
                f"FiringWindow tracks {self.n_latents_total}"
            )
        fired = codes.fired()
        if fired.device != self.fired.device:
            self.fired = self.fired.to(fired.device)
        self.fired |= fired
        self.n_tokens += codes.n_tokens

    def dead_fraction(self) -> float:
        """``#{latents that never fired in the window} / n_latents_total``."""
        return 1.0 - int(self.fired.sum().item()) / self.n_latents_total


def _as_batches(codes: SparseCodes | Iterable[SparseCodes]) -> list[SparseCodes]:
    batches = [codes] if isinstance(codes, SparseCodes) else list(codes)
    if not batches:
        raise ValueError("expected at least one SparseCodes batch, got an empty iterable")
    for c in batches:
        if not isinstance(c, SparseCodes):
            raise TypeError(f"expected SparseCodes, got {type(c).__name__}")
    return batches


def dead_latent_fraction(codes_iterable: SparseCodes | Iterable[SparseCodes], n_latents_total: int) -> float:
    """Fraction of the ``n_latents_total`` global latents with no non-zero coefficient in any batch.

    ``#{g : ∀ batch, n, j, s with global_indices[n, j, s] = g: values[n, j, s] = 0} / n_latents_total``.
    Accepts one ``SparseCodes`` or an iterable of them; raises ``ValueError`` if there are none.
    """
    window = FiringWindow(n_latents_total)
    for c in _as_batches(codes_iterable):
        window.update(c)
    return window.dead_fraction()


# --------------------------------------------------------------------------------------------------------
# Ensemble dictionary metrics
# --------------------------------------------------------------------------------------------------------


def _unit_rows(dictionary: torch.Tensor, name: str = "dictionary") -> torch.Tensor:
    """Flatten ``[m, D]`` / ``[J, M, D]`` to ``[m, D]`` and L2-normalise rows (zero rows stay zero)."""
    if dictionary.dim() == 3:
        dictionary = dictionary.reshape(-1, dictionary.shape[-1])
    if dictionary.dim() != 2:
        raise ValueError(f"{name} must be [m, D] or [J, M, D], got shape {tuple(dictionary.shape)}")
    if dictionary.shape[0] == 0 or dictionary.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(dictionary.shape)})")
    rows = dictionary.detach()
    if rows.dtype != torch.float64:
        rows = rows.to(torch.float32)
    norms = rows.norm(dim=1, keepdim=True)
    return torch.where(
        norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), torch.zeros_like(rows)
    )


@torch.no_grad()
def max_abs_cosine_to_others(dictionary: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """For each feature ``a``: ``max_{b ≠ a} |cos(w_a, w_b)|``, shape ``[m]``.

    ``dictionary``: decoder rows ``[m, D]`` or ``[J, M, D]`` (flattened member-major). Zero rows have
    cosine 0 with everything. Computed in blocks of ``block_size`` rows against all ``m`` rows
    (never ``m x m``). With ``m = 1`` there are no other features and the result is ``[0.]``.
    """
    unit = _unit_rows(dictionary)
    m = unit.shape[0]
    out = torch.zeros(m, dtype=unit.dtype, device=unit.device)
    if m == 1:
        return out
    bs = _check_block_size(block_size, m, unit.element_size())
    for start in range(0, m, bs):
        stop = min(start + bs, m)
        sims = (unit[start:stop] @ unit.T).abs_()
        rows = torch.arange(stop - start, device=unit.device)
        sims[rows, rows + start] = -1.0  # exclude the feature itself
        out[start:stop] = sims.amax(dim=1)
    return out


def diversity(dictionary: torch.Tensor, threshold: float = 0.7, block_size: int | None = None) -> float:
    """Fraction of features far from all others: ``(1/m) #{a : max_{b ≠ a} |cos(w_a, w_b)| < threshold}``.

    See :func:`max_abs_cosine_to_others` (``m = 1`` gives 1.0).
    """
    return float(
        (max_abs_cosine_to_others(dictionary, block_size) < threshold).to(torch.float64).mean().item()
    )


@torch.no_grad()
def _mean_max_cosine(unit_a: torch.Tensor, unit_b: torch.Tensor, block_size: int | None) -> float:
    """``(1/m_A) Σ_a max_b cos(a, b)`` over unit rows, in blocks of rows of ``unit_a``."""
    bs = _check_block_size(block_size, unit_b.shape[0], unit_b.element_size())
    total = 0.0
    for start in range(0, unit_a.shape[0], bs):
        best = (unit_a[start : start + bs] @ unit_b.T).amax(dim=1)
        total += float(best.to(torch.float64).sum().item())
    return total / unit_a.shape[0]


def relaxed_stability(
    dict_a: torch.Tensor, dict_b: torch.Tensor, symmetric: bool = False, block_size: int | None = None
) -> float:
    """Relaxed stability of dictionary A against dictionary B (signed cosines).

    ``s(A→B) = (1/m_A) Σ_{a ∈ A} max_{b ∈ B} cos(w_a, w_b)`` — every feature of A is matched to its most
    similar feature of B (not a one-to-one matching; a cosine of -1 is the worst match, not a good one).
    With ``symmetric=True`` returns ``(s(A→B) + s(B→A)) / 2``. Both dictionaries are ``[m, D]`` or
    ``[J, M, D]`` with the same ``D``; ``m_A`` and ``m_B`` may differ. Zero rows have cosine 0 with
    everything. Blockwise over rows (never ``m_A x m_B``).
    """
    unit_a = _unit_rows(dict_a, "dict_a")
    unit_b = _unit_rows(dict_b, "dict_b")
    if unit_a.shape[1] != unit_b.shape[1]:
        raise ValueError(f"dict_a has D={unit_a.shape[1]} but dict_b has D={unit_b.shape[1]}")
    if unit_a.dtype != unit_b.dtype:
        unit_a, unit_b = unit_a.to(torch.float64), unit_b.to(torch.float64)
    unit_b = unit_b.to(unit_a.device)
    forward = _mean_max_cosine(unit_a, unit_b, block_size)
    if not symmetric:
        return forward
    return 0.5 * (forward + _mean_max_cosine(unit_b, unit_a, block_size))


@torch.no_grad()
def member_similarity(
    dictionary: torch.Tensor, threshold: float = 0.7, block_size: int | None = None
) -> dict[str, torch.Tensor | float]:
    """Diversity and member-to-member stability of an ensemble's decoder ``[J, M, D]``, in one pass over the cosines.

    With ``w_a`` the rows flattened member-major (``m = J·M``) and ``j(a)`` the member of row ``a``:

    * ``max_abs_cosine[a] = max_{b ≠ a} |cos(w_a, w_b)|`` (``[m]``, as :func:`max_abs_cosine_to_others`);
    * ``diversity = (1/m) #{a : max_abs_cosine[a] < threshold}`` (as :func:`diversity`);
    * ``stability[i, j] = (1/M) Σ_{a ∈ i} max_{b ∈ j, b ≠ a} cos(w_a, w_b)`` (``[J, J]``, float64): off the
      diagonal, :func:`relaxed_stability` of member ``i`` against member ``j`` (signed cosines); on it, how
      close each latent comes to another latent of its own member (0 when ``M = 1``);
    * ``cross_member_stability``: the mean of the off-diagonal entries (NaN for ``J = 1``).

    Blocks of ``block_size`` rows of member ``i`` are multiplied with member ``j``'s rows, for every ``(i, j)``;
    both the ``|cos|`` maximum and the signed best match come from that one ``[b, M]`` block, so the whole costs
    ``2·m²·D`` FLOP where :func:`diversity` plus the ``J(J−1)`` pairwise :func:`relaxed_stability` calls cost
    about twice that. Default ``block_size``: a ~256 MB float32 block; never ``m x m``.
    """
    if dictionary.dim() != 3:
        raise ValueError(f"dictionary must be member-stacked [J, M, D], got shape {tuple(dictionary.shape)}")
    J, M, _ = dictionary.shape
    unit = _unit_rows(dictionary).view(J, M, -1)
    bs = _check_block_size(block_size, M, unit.element_size())
    max_abs = torch.zeros(J, M, dtype=unit.dtype, device=unit.device)  # stays 0 for m = 1: no other feature
    best_sums = torch.zeros(J, J, dtype=torch.float64, device=unit.device)  # Σ over rows of member i, best in j
    for i in range(J):
        for start in range(0, M, bs):
            rows = unit[i, start:start + bs]
            diagonal = (torch.arange(rows.shape[0], device=unit.device),
                        torch.arange(start, start + rows.shape[0], device=unit.device))
            for j in range(J):
                sims = rows @ unit[j].T  # [b, M]: one GEMM serves both maxima (cache-sized: a member at a time)
                if i == j:
                    sims[diagonal] = 0.0  # |cos| of the others is >= 0: a zero wins only if every other is 0
                block_abs = max_abs[i, start:start + bs]
                torch.maximum(block_abs, torch.maximum(sims.amax(dim=1), -sims.amin(dim=1)), out=block_abs)
                if i == j:
                    if M == 1:  # a member's only latent is the row itself: no match within the member
                        continue
                    sims[diagonal] = float("-inf")  # no latent is its own match
                best_sums[i, j] += sims.amax(dim=1).sum(dtype=torch.float64)
    max_abs = max_abs.view(-1)
    stability = best_sums / M
    off = ~torch.eye(J, dtype=torch.bool, device=unit.device)
    cross = float(stability[off].mean()) if J > 1 else float("nan")
    return {"max_abs_cosine": max_abs, "diversity": float((max_abs < threshold).to(torch.float64).mean()),
            "stability": stability, "cross_member_stability": cross}


@torch.no_grad()
def connectivity(codes: SparseCodes | Iterable[SparseCodes], block_size: int | None = None) -> float:
    """Co-firing connectivity of the ``m = J*M`` latents over a window of tokens.

    Latents ``a ≠ b`` (global indices) *co-fire* if some token has a non-zero coefficient on both.
    ``connectivity = 1 - #{unordered pairs {a, b}, a ≠ b, that co-fire} / (m(m-1)/2)``, so 1.0 means no two
    latents ever fire together. With ``m = 1`` there are no pairs and the result is 1.0.

    ``codes`` is one ``SparseCodes`` or an iterable of them (same ``J`` and ``M``; ``K`` may differ).
    Repeated indices within a (token, member) count once; zero-valued slots never fire.

    Computation (blockwise, never an ``m x m`` matrix): with ``A [N_total, m]`` the binary firing matrix,
    kept sparse as the per-token lists of firing latents, the latent columns are processed in blocks ``c``
    of ``block_size``. For each block the upper-triangular part of the boolean co-firing matrix
    ``(A[:, c]ᵀ · A > 0)``, shape ``[|c|, m]``, is built directly as a sparse-sparse product: every firing
    entry ``(token n, latent b ∈ c)`` marks ``(b, a)`` for each latent ``a > b`` firing on token ``n``
    (total cost ``≤ Σ_n nnz(A[n])² / 2``, independent of ``block_size``). Each unordered pair is thus
    marked once, in the row of its smaller latent, the diagonal never, and the marks are counted. The
    default ``block_size`` keeps one ``block_size x m`` boolean block at ~256 MB (2048 columns for
    ``m = 131072``). Raises ``ValueError`` for no batches or no tokens.
    """
    batches = _as_batches(codes)
    members, n_lat = batches[0].members, batches[0].n_latents
    for c in batches[1:]:
        if (c.members, c.n_latents) != (members, n_lat):
            raise ValueError(
                f"all batches need the same J and M; got J={c.members}, M={c.n_latents} "
                f"after J={members}, M={n_lat}"
            )
    m = members * n_lat
    n_total = sum(c.n_tokens for c in batches)
    if n_total == 0:
        raise ValueError("connectivity needs at least one token; all batches are empty")
    if m == 1:
        return 1.0
    device = batches[0].values.device

    # Padded global indices of firing slots per token, -1 where the slot does not fire: G [N_total, W].
    width = max(c.members * c.k for c in batches)
    padded = []
    for c in batches:
        g = torch.where(c.values != 0, c.global_indices(), torch.full_like(c.indices, -1))
        g = g.reshape(c.n_tokens, -1).to(device)
        if g.shape[1] < width:
            g = torch.nn.functional.pad(g, (0, width - g.shape[1]), value=-1)
        padded.append(g)
    fired_idx = torch.cat(padded, dim=0)

    # Distinct (latent, token) firing entries, sorted by latent then token.
    tok, slot = (fired_idx >= 0).nonzero(as_tuple=True)
    keys = torch.unique(fired_idx[tok, slot] * n_total + tok)
    lat_sorted = keys // n_total
    tok_sorted = keys % n_total

    bs = _check_block_size(block_size, m, 1)
    chunk = max(1, _JOIN_CHUNK_ELEMENTS // width)  # firing entries joined at once (bounds the scratch)
    bounds = torch.arange(0, m + bs, bs, device=device).clamp_max(m)
    edges = torch.searchsorted(lat_sorted, bounds).tolist()
    pairs = 0  # unordered co-firing pairs {a, b}, a < b
    buffer = torch.empty(min(bs, m) * m, dtype=torch.bool, device=device)  # one [block, m] boolean block
    for blk in range(len(edges) - 1):
        lo, hi = edges[blk], edges[blk + 1]
        if hi == lo:
            continue
        c0 = int(bounds[blk])
        b = int(bounds[blk + 1]) - c0
        cols = m - c0  # only partners a > b >= c0 can be marked: columns c0..m-1 suffice
        cofire = buffer[: b * cols]  # flat [b, cols]: row b - c0, column a - c0
        cofire.zero_()
        for e0 in range(lo, hi, chunk):
            e1 = min(e0 + chunk, hi)
            lat = lat_sorted[e0:e1].unsqueeze(1)
            partners = fired_idx[tok_sorted[e0:e1]]  # [E, W]: latents firing on each entry's token
            # Only partners a > b: each unordered pair is marked once, in the row of its smaller latent,
            # and the diagonal (a latent with itself, or a repeated index) is never marked.
            upper = partners > lat
            cofire[((lat - c0) * cols + (partners - c0))[upper]] = True
        pairs += int(torch.count_nonzero(cofire).item())
    return 1.0 - pairs / (m * (m - 1) / 2)
