"""How well codes are organised by class labels: metrics for the SAE-ception feature-sharpening experiments.

Inputs are ``codes``, a float ``[n, L]`` tensor (one row of dense codes — or any activations — per example)
and ``labels``, an integer ``[n]`` tensor of class ids (non-negative, not necessarily contiguous; they are
mapped to ``0..C-1``). NumPy arrays are accepted for both. Inputs are validated before any compute.

Two views of "organised by class":

* **Clustering** — does the geometry of the codes follow the classes? :func:`silhouette`,
  :func:`davies_bouldin` and :func:`calinski_harabasz` score the label clustering of the code vectors;
  :func:`adjusted_rand_index` compares the labels with the clustering "which latent is most active"
  (:func:`argmax_latent`).
* **Single latents** — does each latent speak about one class? :func:`uncertainty_coefficient` is the
  fraction of a latent's firing entropy that is information about the label; :func:`class_selectivity_index`
  compares a latent's mean activation on its preferred class with its mean on the others.

:func:`class_structure` computes them all at once. Clustering scores come from scikit-learn; the per-latent
metrics are vectorised over latents (one ``[C, n] @ [n, L]`` matmul each). Per-latent results are float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score, silhouette_score

__all__ = [
    "adjusted_rand_index",
    "argmax_latent",
    "calinski_harabasz",
    "class_selectivity_index",
    "class_structure",
    "davies_bouldin",
    "silhouette",
    "uncertainty_coefficient",
]


# ------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------


def _as_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a numeric array, got numpy dtype {x.dtype}")
        return torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x


def _check_codes(codes: object) -> torch.Tensor:
    """``codes`` as a finite float32/float64 ``[n >= 2, L >= 1]`` tensor (detached)."""
    codes = _as_tensor(codes, "codes")
    if not codes.is_floating_point():
        raise TypeError(f"codes must have a floating dtype, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [n, L], got shape {tuple(codes.shape)}")
    if codes.shape[0] < 2:
        raise ValueError(f"codes needs n >= 2 examples, got n={codes.shape[0]}")
    if codes.shape[1] == 0:
        raise ValueError("codes has 0 latents (shape [n, 0])")
    codes = codes.detach()
    if codes.dtype not in (torch.float32, torch.float64):
        # half/bfloat16: too coarse for sums over n examples, and NumPy has no bfloat16.
        codes = codes.float()
    if not bool(torch.isfinite(codes).all()):
        bad = int((~torch.isfinite(codes)).any(1).sum())
        raise ValueError(f"codes contains NaN or Inf values (in {bad} of {codes.shape[0]} rows)")
    return codes


def _check_labels(labels: object, n: int, min_classes: int = 1, metric: str = "") -> tuple[torch.Tensor, int]:
    """Validate ``labels`` against ``n >= 1`` examples; returns (class index in ``0..C-1`` per example, C)."""
    labels = _as_tensor(labels, "labels")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [n], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has length {labels.shape[0]} but codes has n={n} rows")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class ids, got min {int(labels.min())}")
    _, class_index = torch.unique(labels.long(), return_inverse=True)
    num_classes = int(class_index.max()) + 1
    if num_classes < min_classes:
        raise ValueError(f"{metric} needs at least {min_classes} classes, labels have {num_classes}")
    return class_index, num_classes


def _check_sample_size(sample_size: int | None) -> None:
    if sample_size is not None and sample_size < 2:
        raise ValueError(f"sample_size must be >= 2 or None, got {sample_size}")


def _check_clustering_size(num_classes: int, n: int, metric: str) -> None:
    if not 2 <= num_classes <= n - 1:
        raise ValueError(f"{metric} needs 2 <= classes <= n-1 = {n - 1}, labels have {num_classes} classes")


# ------------------------------------------------------------------------------------------------------
# Clustering metrics
# ------------------------------------------------------------------------------------------------------


def _argmax_latent(codes: torch.Tensor) -> torch.Tensor:
    cluster = codes.argmax(1)
    # An all-zero row would otherwise be assigned latent 0: no latent fired is its own cluster.
    return cluster.masked_fill_((codes == 0).all(1), -1)


def argmax_latent(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Each example's most active latent: ``argmax_i codes[j, i]``, LongTensor ``[n]``.

    An all-zero row ("no latent fired") gets the cluster id ``-1``, so it is not mistaken for latent 0.
    """
    return _argmax_latent(_check_codes(codes))


def adjusted_rand_index(codes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Agreement between the labels and the argmax-latent clustering, chance-adjusted.

    ``ARI = sklearn.metrics.adjusted_rand_score(labels, argmax_latent(codes))``: 1 when the most active
    latent determines the class one-to-one, ~0 for an unrelated clustering.
    """
    codes = _check_codes(codes)
    class_index, _ = _check_labels(labels, codes.shape[0])
    return _ari(codes, class_index)


def _ari(codes: torch.Tensor, class_index: torch.Tensor) -> float:
    return float(adjusted_rand_score(class_index.cpu().numpy(), _argmax_latent(codes).cpu().numpy()))


def silhouette(
    codes: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    sample_size: int | None = 2000,
    seed: int = 0,
) -> float:
    """Mean Euclidean silhouette of the codes under a clustering (``sklearn.metrics.silhouette_score``).

    ``s_j = (b_j − a_j) / max(a_j, b_j)`` with ``a_j`` the mean distance from ``j`` to the other members
    of its cluster and ``b_j`` the smallest mean distance to the members of another cluster; the score is
    the mean of ``s_j``. The clustering is the labels, or the argmax-latent clustering when ``labels`` is
    None. When ``n > sample_size`` the score is taken on ``sample_size`` examples drawn without replacement
    by ``numpy.random.RandomState(seed)`` — the same draw as ``silhouette_score(..., sample_size,
    random_state=seed)`` — so it is deterministic given ``seed``.

    Returns ``nan`` when the scored clustering has fewer than 2 or more than ``m − 1`` distinct clusters
    (``m`` examples scored), where the silhouette is undefined.
    """
    codes = _check_codes(codes)
    _check_sample_size(sample_size)
    clusters = _argmax_latent(codes) if labels is None else _check_labels(labels, codes.shape[0])[0]
    return _silhouette(codes, clusters, sample_size, seed)


def _silhouette(codes: torch.Tensor, clusters: torch.Tensor, sample_size: int | None, seed: int) -> float:
    x, c = codes.cpu().numpy(), clusters.cpu().numpy()
    if sample_size is not None and x.shape[0] > sample_size:
        # Draw the sample here rather than inside sklearn so the cluster count is checked on what is scored.
        keep = np.random.RandomState(seed).permutation(x.shape[0])[:sample_size]
        x, c = x[keep], c[keep]
    if not 2 <= len(np.unique(c)) <= x.shape[0] - 1:
        return math.nan
    return float(silhouette_score(x, c, metric="euclidean"))


def davies_bouldin(codes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Davies–Bouldin index of the label clustering (``sklearn.metrics.davies_bouldin_score``); lower is better.

    ``DB = (1/C) Σ_c max_{c'≠c} (s_c + s_c') / ‖m_c − m_c'‖`` with ``m_c`` the centroid of class ``c`` and
    ``s_c`` the mean distance of its members to ``m_c``. Needs ``2 <= C <= n − 1``.
    """
    codes = _check_codes(codes)
    class_index, num_classes = _check_labels(labels, codes.shape[0])
    _check_clustering_size(num_classes, codes.shape[0], "davies_bouldin")
    return float(davies_bouldin_score(codes.cpu().numpy(), class_index.cpu().numpy()))


def calinski_harabasz(codes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Calinski–Harabasz index of the label clustering (``sklearn.metrics.calinski_harabasz_score``).

    ``CH = [tr(B) / (C − 1)] / [tr(W) / (n − C)]``, between-class over within-class dispersion
    (``B = Σ_c n_c (m_c − m)(m_c − m)ᵀ``, ``W = Σ_c Σ_{j∈c} (x_j − m_c)(x_j − m_c)ᵀ``); higher is better.
    Needs ``2 <= C <= n − 1``.
    """
    codes = _check_codes(codes)
    class_index, num_classes = _check_labels(labels, codes.shape[0])
    _check_clustering_size(num_classes, codes.shape[0], "calinski_harabasz")
    return float(calinski_harabasz_score(codes.cpu().numpy(), class_index.cpu().numpy()))


# ------------------------------------------------------------------------------------------------------
# Per-latent metrics
# ------------------------------------------------------------------------------------------------------


def _class_sums(values: torch.Tensor, class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Σ_{j in class c} values[j, i]`` as ``[C, L]`` float64, via one-hot ``[n, C]`` ᵀ @ ``[n, L]``."""
    one_hot = torch.nn.functional.one_hot(class_index.to(values.device), num_classes).to(values.dtype)
    return (one_hot.T @ values).double()


def _mean_over_defined(per_latent: torch.Tensor) -> tuple[float, int]:
    defined = ~torch.isnan(per_latent)
    count = int(defined.sum())
    return (float(per_latent[defined].mean()) if count else math.nan), count


def uncertainty_coefficient(
    codes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, threshold: float = 0.0
) -> dict[str, float | int | torch.Tensor]:
    """Per latent, the fraction of its firing entropy that is information about the class (Theil's U).

    With ``b_i = [codes[:, i] > threshold]`` and the class ``y``: ``U_i = I(b_i; y) / H(b_i)``, where
    ``I(b; y) = Σ_{c,v} p(c, v) log₂(p(c, v) / (p(c) p(v)))`` and ``H(b) = −Σ_v p(v) log₂ p(v)`` — both in
    bits, from the empirical ``[C, 2]`` contingency table. ``U_i = 1`` when the class determines whether
    latent ``i`` fires, 0 when firing is independent of the class. Latents with ``H(b_i) = 0`` (never or
    always fire) are undefined: ``nan`` in ``per_latent`` and left out of the mean.

    Returns ``{"u": mean of U_i over defined latents (nan if none), "u_latents": number of defined latents,
    "per_latent": float64 [L]}``. Needs at least 2 classes.
    """
    codes = _check_codes(codes)
    class_index, num_classes = _check_labels(labels, codes.shape[0], 2, "uncertainty_coefficient")
    per_latent = _uncertainty_per_latent(codes, class_index, num_classes, threshold)
    u, count = _mean_over_defined(per_latent)
    return {"u": u, "u_latents": count, "per_latent": per_latent}


def _uncertainty_per_latent(
    codes: torch.Tensor, class_index: torch.Tensor, num_classes: int, threshold: float
) -> torch.Tensor:
    n = codes.shape[0]
    # 0/1 sums in float32 are exact only below 2**24 examples.
    count_dtype = torch.float32 if n < 2**24 else torch.float64
    fired = _class_sums((codes > threshold).to(count_dtype), class_index, num_classes)  # [C, L]
    class_sizes = torch.bincount(class_index, minlength=num_classes).double().to(fired.device)[:, None]
    silent = class_sizes - fired
    fired_total = fired.sum(0)

    def plogp_bits(count: torch.Tensor, total: torch.Tensor | float) -> torch.Tensor:
        """``(count/n) log₂(count/total)``, 0 where count = 0."""
        return torch.special.xlogy(count, count / total) / (n * math.log(2))

    entropy = -(plogp_bits(fired_total, n) + plogp_bits(n - fired_total, n))
    conditional_entropy = -(plogp_bits(fired, class_sizes) + plogp_bits(silent, class_sizes)).sum(0)
    # Rounding can push I slightly below 0 or above H; the exact values lie in [0, H].
    ratio = ((entropy - conditional_entropy) / entropy).clamp(0.0, 1.0)
    defined = (fired_total > 0) & (fired_total < n)
    return torch.where(defined, ratio, math.nan).cpu()


def class_selectivity_index(
    codes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> dict[str, float | int | torch.Tensor]:
    """Per latent, how much more it is active on its preferred class than on the others (Morcos et al. 2018).

    With ``μ_c`` the mean of ``codes[:, i]`` over the examples of class ``c``: ``μ_max = max_c μ_c`` and
    ``μ_other`` the mean of ``μ_c`` over the other ``C − 1`` classes (class-balanced), and
    ``CSI_i = (μ_max − μ_other) / (μ_max + μ_other)``. For non-negative codes CSI lies in [0, 1]: 1 when the
    latent is active on one class only, 0 when its class means are equal. Defined only where
    ``μ_max + μ_other > 0`` (for non-negative codes: latents that fire at all); undefined latents are ``nan``
    in ``per_latent`` and left out of the mean.

    Returns ``{"csi": mean over defined latents (nan if none), "csi_latents": number of defined latents,
    "per_latent": float64 [L]}``. Needs at least 2 classes.
    """
    codes = _check_codes(codes)
    class_index, num_classes = _check_labels(labels, codes.shape[0], 2, "class_selectivity_index")
    per_latent = _selectivity_per_latent(codes, class_index, num_classes)
    csi, count = _mean_over_defined(per_latent)
    return {"csi": csi, "csi_latents": count, "per_latent": per_latent}


def _selectivity_per_latent(codes: torch.Tensor, class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    class_sizes = torch.bincount(class_index, minlength=num_classes).double().to(codes.device)[:, None]
    class_means = _class_sums(codes, class_index, num_classes) / class_sizes  # [C, L]
    mean_max = class_means.amax(0)
    mean_other = (class_means.sum(0) - mean_max) / (num_classes - 1)
    denominator = mean_max + mean_other
    defined = denominator > 0
    csi = (mean_max - mean_other) / torch.where(defined, denominator, 1.0)
    return torch.where(defined, csi, math.nan).cpu()


# ------------------------------------------------------------------------------------------------------
# All at once
# ------------------------------------------------------------------------------------------------------


def class_structure(
    codes: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    sample_size: int | None = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Every class-organisation metric of this module in one dict; what ``saefast.sharpen`` logs per cycle.

    Keys: ``ari`` (:func:`adjusted_rand_index`), ``silhouette_labels`` and ``silhouette_argmax``
    (:func:`silhouette` under the labels and under the argmax-latent clustering, ``sample_size``/``seed``
    as there; may be ``nan``), ``davies_bouldin``, ``calinski_harabasz``, ``uncertainty`` (mean U of
    :func:`uncertainty_coefficient`, threshold 0), ``csi`` (mean CSI of :func:`class_selectivity_index`),
    ``n`` (examples) and ``classes`` (distinct labels). Needs ``2 <= classes <= n − 1``.
    """
    codes = _check_codes(codes)
    n = codes.shape[0]
    class_index, num_classes = _check_labels(labels, n)
    _check_clustering_size(num_classes, n, "class_structure")
    _check_sample_size(sample_size)
    x, y = codes.cpu().numpy(), class_index.cpu().numpy()
    uncertainty, _ = _mean_over_defined(_uncertainty_per_latent(codes, class_index, num_classes, 0.0))
    csi, _ = _mean_over_defined(_selectivity_per_latent(codes, class_index, num_classes))
    return {
        "ari": _ari(codes, class_index),
        "silhouette_labels": _silhouette(codes, class_index, sample_size, seed),
        "silhouette_argmax": _silhouette(codes, _argmax_latent(codes), sample_size, seed),
        "davies_bouldin": float(davies_bouldin_score(x, y)),
        "calinski_harabasz": float(calinski_harabasz_score(x, y)),
        "uncertainty": uncertainty,
        "csi": csi,
        "n": n,
        "classes": num_classes,
    }
