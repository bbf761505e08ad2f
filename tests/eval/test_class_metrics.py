"""saefast.eval.class_metrics: class-structure metrics of SAE codes — hand-derived values, scikit-learn as an
oracle, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    mutual_info_score,
    silhouette_score,
)

from saefast.eval.class_metrics import (
    adjusted_rand_index,
    argmax_latent,
    calinski_harabasz,
    class_selectivity_index,
    class_structure,
    davies_bouldin,
    silhouette,
    uncertainty_coefficient,
)


def assert_close_nan(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    """Elementwise closeness of the same dtype in which nan (an undefined latent) must meet nan."""
    assert_close(actual, expected, atol=atol, equal_nan=True, check_dtype=True)


def binary_entropy_bits(p: float) -> float:
    return -sum(q * math.log2(q) for q in (p, 1 - p) if q > 0)


def clustered_codes(n_per_class: int = 20, classes: int = 3, latents: int = 6, seed: int = 0):
    """Non-negative codes in which class ``c`` mostly drives latent ``c``, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    codes = torch.rand(len(labels), latents, generator=g, dtype=torch.float64) * 0.5
    codes[torch.arange(len(labels)), labels] += 1.0
    codes[torch.rand(codes.shape, generator=g) < 0.3] = 0.0
    return codes, labels


# ------------------------------------------------------------------------------------------------------
# Uncertainty coefficient
# ------------------------------------------------------------------------------------------------------


def test_uncertainty_hand_cases():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    codes = torch.tensor(
        [
            # on class 0 only | half of each class | never | always
            [1.0, 2.0, 0.0, 1.0],
            [1.0, 2.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 1.0],
            [0.0, 2.0, 0.0, 1.0],
            [0.0, 2.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    result = uncertainty_coefficient(codes, labels)
    assert_close_nan(result["per_latent"], torch.tensor([1.0, 0.0, math.nan, math.nan], dtype=torch.float64), 1e-12)
    assert result["u_latents"] == 2
    assert result["u"] == pytest.approx(0.5, abs=1e-12)


def test_uncertainty_asymmetric_in_bits():
    # labels [0,0,1,1], firing [1,1,1,0]: p(b=1) = 3/4; given y=0 always fires, given y=1 fires half the time.
    labels = torch.tensor([0, 0, 1, 1])
    codes = torch.tensor([[0.5], [0.2], [0.9], [0.0]])
    entropy = binary_entropy_bits(3 / 4)
    conditional_entropy = 0.5 * binary_entropy_bits(1.0) + 0.5 * binary_entropy_bits(0.5)  # = 0.5 bit
    expected = (entropy - conditional_entropy) / entropy  # ≈ 0.3837
    result = uncertainty_coefficient(codes, labels)
    assert result["u"] == pytest.approx(expected, abs=1e-12)
    assert result["u"] == pytest.approx(0.38369, abs=1e-5)  # a nats/bits mix-up would give 0.266 or 0.553


def test_uncertainty_threshold_is_strict():
    labels = torch.tensor([0, 0, 1, 1])
    codes = torch.tensor([[0.5], [0.5], [0.2], [0.2]])
    assert uncertainty_coefficient(codes, labels)["u"] == pytest.approx(math.nan, nan_ok=True)  # always fires
    assert uncertainty_coefficient(codes, labels, threshold=0.3)["u"] == pytest.approx(1.0, abs=1e-12)
    assert uncertainty_coefficient(codes, labels, threshold=0.5)["u_latents"] == 0  # > 0.5 never fires


def test_uncertainty_matches_sklearn_mutual_information():
    g = torch.Generator().manual_seed(1)
    n, latents = 300, 12
    labels = torch.randint(0, 4, (n,), generator=g)
    fire_rate = torch.rand(4, latents, generator=g)[labels]  # class-dependent firing
    codes = (torch.rand(n, latents, generator=g) < fire_rate) * torch.rand(n, latents, generator=g)
    codes[:, 0] = 0.0  # never fires: undefined
    result = uncertainty_coefficient(codes, labels)
    expected = []
    for i in range(latents):
        fired = (codes[:, i] > 0).numpy()
        p = fired.mean()
        if p in (0.0, 1.0):
            expected.append(math.nan)
            continue
        mutual_information_bits = mutual_info_score(labels.numpy(), fired) / math.log(2)
        expected.append(mutual_information_bits / binary_entropy_bits(p))
    assert_close_nan(result["per_latent"], torch.tensor(expected, dtype=torch.float64), 1e-10)
    assert result["u_latents"] == latents - 1
    assert result["u"] == pytest.approx(np.nanmean(expected), abs=1e-10)


# ------------------------------------------------------------------------------------------------------
# Class selectivity index
# ------------------------------------------------------------------------------------------------------


def test_csi_hand_cases():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.tensor(
        [
            # only class 1 | equal means | means [3, 1, 1] | dead
            [0.0, 2.0, 2.0, 0.0],
            [0.0, 0.0, 4.0, 0.0],
            [1.0, 1.0, 1.0, 0.0],
            [3.0, 1.0, 1.0, 0.0],
            [0.0, 0.5, 0.0, 0.0],
            [0.0, 1.5, 2.0, 0.0],
        ],
        dtype=torch.float64,
    )
    result = class_selectivity_index(codes, labels)
    assert_close_nan(result["per_latent"], torch.tensor([1.0, 0.0, 0.5, math.nan], dtype=torch.float64), 1e-12)
    assert result["csi_latents"] == 3
    assert result["csi"] == pytest.approx(0.5, abs=1e-12)


def test_csi_is_class_balanced():
    # Class means [4, 2, 0] with class sizes 1, 1, 3: μ_other = (2 + 0) / 2 = 1, so CSI = (4 − 1) / (4 + 1).
    # (The pooled mean of the other examples, 2 / 4, would give 0.777....)
    labels = torch.tensor([0, 1, 2, 2, 2])
    codes = torch.tensor([[4.0], [2.0], [0.0], [0.0], [0.0]])
    assert class_selectivity_index(codes, labels)["csi"] == pytest.approx(0.6, abs=1e-7)


def test_csi_undefined_where_means_sum_to_zero_or_less():
    labels = torch.tensor([0, 0, 1, 1])
    codes = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [-2.0, 1.0], [-2.0, -1.0]])  # means [-1,-2] and [0,0]
    result = class_selectivity_index(codes, labels)
    assert result["csi_latents"] == 0 and math.isnan(result["csi"])


# ------------------------------------------------------------------------------------------------------
# argmax latent and ARI
# ------------------------------------------------------------------------------------------------------


def test_argmax_latent_all_zero_rows_are_minus_one():
    codes = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    assert argmax_latent(codes).tolist() == [-1, 0, 2, -1]
    assert argmax_latent(codes).dtype == torch.int64


def test_ari_is_one_for_a_relabelling():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.zeros(6, 4)
    codes[torch.arange(6), torch.tensor([3, 3, 0, 0, 1, 1])] = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    assert adjusted_rand_index(codes, labels) == pytest.approx(1.0, abs=1e-12)


def test_ari_counts_silent_rows_as_their_own_cluster():
    # argmax [-1, -1, 0, 0] matches the labels exactly; without the -1 cluster it would be [0, 0, 0, 0] (ARI 0).
    labels = torch.tensor([0, 0, 1, 1])
    codes = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.5]])
    assert adjusted_rand_index(codes, labels) == pytest.approx(1.0, abs=1e-12)


def test_ari_matches_sklearn():
    codes, labels = clustered_codes()
    expected = adjusted_rand_score(labels.numpy(), codes.argmax(1).numpy())  # no all-zero rows here
    assert adjusted_rand_index(codes, labels) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------------------
# Silhouette, Davies–Bouldin, Calinski–Harabasz
# ------------------------------------------------------------------------------------------------------


def test_silhouette_hand_case():
    # Points 0, 1 | 10, 11 on a line. Point 0: a = 1, b = (10 + 11) / 2; point 1: a = 1, b = (9 + 10) / 2;
    # the other class mirrors them.
    codes = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    expected = ((1 - 1 / 10.5) + (1 - 1 / 9.5)) / 2
    assert silhouette(codes, torch.tensor([0, 0, 1, 1])) == pytest.approx(expected, abs=1e-7)


def test_clustering_scores_match_sklearn():
    codes, labels = clustered_codes()
    x, y = codes.numpy(), labels.numpy()
    assert silhouette(codes, labels) == pytest.approx(silhouette_score(x, y), abs=1e-12)
    assert silhouette(codes) == pytest.approx(silhouette_score(x, codes.argmax(1).numpy()), abs=1e-12)
    assert davies_bouldin(codes, labels) == pytest.approx(davies_bouldin_score(x, y), abs=1e-12)
    assert calinski_harabasz(codes, labels) == pytest.approx(calinski_harabasz_score(x, y), rel=1e-12)


def test_silhouette_nan_when_undefined():
    codes = torch.rand(5, 3)
    assert math.isnan(silhouette(codes, torch.zeros(5, dtype=torch.int64)))  # one cluster
    assert math.isnan(silhouette(codes, torch.arange(5)))  # every point its own cluster
    one_hot_latent = torch.zeros(5, 3)
    one_hot_latent[:, 1] = torch.arange(1.0, 6.0)
    assert math.isnan(silhouette(one_hot_latent))  # argmax: everything on latent 1


def test_silhouette_sample_is_deterministic_and_matches_sklearn():
    codes, labels = clustered_codes(n_per_class=40)
    x, y = codes.numpy(), labels.numpy()
    first = silhouette(codes, labels, sample_size=50, seed=3)
    assert silhouette(codes, labels, sample_size=50, seed=3) == first
    assert silhouette(codes, labels, sample_size=50, seed=4) != first
    assert first == pytest.approx(silhouette_score(x, y, sample_size=50, random_state=3), abs=1e-12)
    assert silhouette(codes, labels, sample_size=None) == pytest.approx(silhouette_score(x, y), abs=1e-12)


# ------------------------------------------------------------------------------------------------------
# class_structure, label ids, numpy input
# ------------------------------------------------------------------------------------------------------


def test_class_structure_collects_every_metric():
    codes, labels = clustered_codes()
    result = class_structure(codes, labels, sample_size=40, seed=1)
    assert set(result) == {
        "ari", "silhouette_labels", "silhouette_argmax", "davies_bouldin", "calinski_harabasz",
        "uncertainty", "csi", "n", "classes",
    }  # fmt: skip
    assert result["n"] == 60 and result["classes"] == 3
    assert result["ari"] == adjusted_rand_index(codes, labels)
    assert result["silhouette_labels"] == silhouette(codes, labels, sample_size=40, seed=1)
    assert result["silhouette_argmax"] == silhouette(codes, sample_size=40, seed=1)
    assert result["davies_bouldin"] == davies_bouldin(codes, labels)
    assert result["calinski_harabasz"] == calinski_harabasz(codes, labels)
    assert result["uncertainty"] == uncertainty_coefficient(codes, labels)["u"]
    assert result["csi"] == class_selectivity_index(codes, labels)["csi"]


def test_non_contiguous_labels_and_numpy_input_give_the_same_results():
    codes, labels = clustered_codes(classes=2)
    reference = class_structure(codes, labels)
    sparse_ids = torch.tensor([3, 7])[labels]
    assert class_structure(codes, sparse_ids) == reference
    assert class_structure(codes.numpy(), sparse_ids.numpy().astype(np.int32)) == reference
    assert_close_nan(
        uncertainty_coefficient(codes, sparse_ids)["per_latent"], uncertainty_coefficient(codes, labels)["per_latent"]
    )
    assert_close_nan(
        class_selectivity_index(codes, sparse_ids)["per_latent"], class_selectivity_index(codes, labels)["per_latent"]
    )


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------

GOOD_CODES = torch.rand(6, 3)
GOOD_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
NAN_CODES = GOOD_CODES.clone()
NAN_CODES[2, 1] = math.nan
INF_CODES = GOOD_CODES.clone()
INF_CODES[4, 0] = math.inf


@pytest.mark.parametrize(
    "metric",
    [adjusted_rand_index, silhouette, davies_bouldin, calinski_harabasz, uncertainty_coefficient,
     class_selectivity_index, class_structure],
)  # fmt: skip
@pytest.mark.parametrize(
    "codes, labels, error, match",
    [
        (GOOD_CODES[0], GOOD_LABELS, ValueError, "codes must be 2-D"),
        (GOOD_CODES, GOOD_LABELS[None], ValueError, "labels must be 1-D"),
        (GOOD_CODES, GOOD_LABELS[:5], ValueError, "labels has length 5 but codes has n=6"),
        (GOOD_CODES, GOOD_LABELS.double(), TypeError, "labels must have an integer dtype"),
        (GOOD_CODES, GOOD_LABELS - 1, ValueError, "labels must be non-negative"),
        (NAN_CODES, GOOD_LABELS, ValueError, "codes contains NaN or Inf"),
        (INF_CODES, GOOD_LABELS, ValueError, "codes contains NaN or Inf"),
        (GOOD_CODES[:1], GOOD_LABELS[:1], ValueError, "n >= 2"),
        (GOOD_CODES.tolist(), GOOD_LABELS, TypeError, "codes must be a torch.Tensor or numpy.ndarray"),
        (GOOD_CODES.long(), GOOD_LABELS, TypeError, "codes must have a floating dtype"),
    ],
)
def test_bad_input_is_named(metric, codes, labels, error, match):
    with pytest.raises(error, match=match):
        metric(codes, labels)


@pytest.mark.parametrize(
    "metric, match",
    [
        (davies_bouldin, "davies_bouldin needs 2 <= classes"),
        (calinski_harabasz, "calinski_harabasz needs 2 <= classes"),
        (class_structure, "class_structure needs 2 <= classes"),
        (uncertainty_coefficient, "uncertainty_coefficient needs at least 2 classes"),
        (class_selectivity_index, "class_selectivity_index needs at least 2 classes"),
    ],
)
def test_metrics_needing_two_classes_refuse_one(metric, match):
    with pytest.raises(ValueError, match=match):
        metric(GOOD_CODES, torch.full((6,), 4))


def test_bad_sample_size():
    with pytest.raises(ValueError, match="sample_size must be >= 2"):
        silhouette(GOOD_CODES, GOOD_LABELS, sample_size=1)
