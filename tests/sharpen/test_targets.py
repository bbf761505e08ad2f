"""saefast.sharpen.targets: sharpened targets (each example's code masked by its class's latents, decoded) against a
hand case and the eager oracle on every backend, for SAEs and ensembles; the per-example and random controls; and bad
input."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_BACKENDS, HAND_CODES, HAND_LABELS, assert_close, identity_sae, trained

import saefast as sf
from saefast import sharpen

MODELS = {
    "sae": lambda cfg: sf.SAE(cfg, seed=1),
    "bagging": lambda cfg: sf.Ensemble.bagging(cfg, 3, seed=1),
    "boosting": lambda cfg: sf.Ensemble.boosting(cfg, 2, seed=1),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_targets_hand_case(backend):
    sae = identity_sae("topk", k=2)
    x = HAND_CODES + 0.5
    masks = torch.tensor([[True, False, False, False], [False, True, False, False]])
    kept = torch.tensor([[1.0, 0, 0, 0], [3, 0, 0, 0], [0, 5, 0, 0]])  # z ⊙ mask[y]
    assert_close(sharpen.targets(sae, x, HAND_LABELS, masks, backend=backend), kept + 0.5)
    assert_close(sharpen.targets(sae, x, HAND_LABELS, masks, complement=True, backend=backend),
                 HAND_CODES - kept + 0.5)
    # per-example top-1: each example's largest coefficient, whatever its class
    assert_close(sharpen.example_targets(sae, x, 1, backend=backend),
                 torch.tensor([[0.0, 0, 2, 0], [3, 0, 0, 0], [0, 5, 0, 0]]) + 0.5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("n, d, m, k", [(37, 12, 40, 5), (64, 12, 24, 3)])
def test_targets_match_eager_oracle(backend, kind, n, d, m, k):
    model = trained(MODELS[kind](sf.SAEConfig(d_in=d, n_latents=m, k=k)), d=d)
    x, y = torch.randn(n, d), torch.randint(0, 5, (n,))
    stats = sharpen.class_stats(model, [(x, y)])
    masks = sharpen.class_masks(stats, top_n=7)
    for complement in (False, True):
        fast = sharpen.targets(model, x, y, masks, complement=complement, backend=backend)
        assert_close(fast, sharpen.targets_reference(model, x, y, masks, complement=complement), atol=2e-5,
                     msg=f"{kind} complement={complement}")
    # top_n >= every slot keeps everything: the example control is then the reconstruction
    assert_close(sharpen.example_targets(model, x, model.n_latents_total, backend=backend),
                 model.reconstruct(x, backend="torch"), atol=2e-5)


def test_bagging_targets_are_the_mean_of_masked_member_decodes():
    """Independent oracle: member j's dense code, masked by its block of the concatenated mask, decoded alone."""
    cfg = sf.SAEConfig(d_in=10, n_latents=16, k=3)
    bag = trained(sf.Ensemble.bagging(cfg, 3, seed=2), d=10)
    x, y = torch.randn(50, 10), torch.randint(0, 3, (50,))
    masks = sharpen.class_masks(sharpen.class_stats(bag, [(x, y)]), top_n=10)
    expected = torch.zeros(50, 10)
    for j in range(3):
        member = bag.member(j).eval()
        z = member.encode(x, backend="torch").to_dense() * masks[y, j * 16:(j + 1) * 16]
        expected += (z @ member.W_dec + member.b_dec) / 3
    assert_close(sharpen.targets(bag, x, y, masks), expected, atol=2e-5)


def test_relu_sae_targets_and_dense_codes_never_needed_by_fast_path():
    sae = trained(sf.SAE(sf.SAEConfig(d_in=8, n_latents=32, activation="relu", l1_coef=1e-2), seed=0), d=8)
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    masks = sharpen.class_masks(sharpen.class_stats(sae, [(x, y)]), top_percent=20)
    assert_close(sharpen.targets(sae, x, y, masks), sharpen.targets_reference(sae, x, y, masks), atol=2e-5)


def test_targets_bad_input():
    sae = identity_sae()
    x = HAND_CODES + 0.5
    masks = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="only 2 classes"):
        sharpen.targets(sae, x, torch.tensor([0, 1, 2]), masks)
    with pytest.raises(ValueError, match=r"bool tensor \[n_classes, 4\]"):
        sharpen.targets(sae, x, HAND_LABELS, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool tensor \[n_classes, 4\]"):
        sharpen.targets(sae, x, HAND_LABELS, torch.ones(2, 4))
    with pytest.raises(TypeError, match="integer dtype"):
        sharpen.targets(sae, x, HAND_LABELS.float(), masks)
    with pytest.raises(ValueError, match="NaN"):
        sharpen.targets(sae, torch.full((3, 4), float("inf")), HAND_LABELS, masks)
    with pytest.raises(ValueError, match="top_n"):
        sharpen.example_targets(sae, x, 0)
    with pytest.raises(ValueError, match="multi|chain"):
        boost = sf.Ensemble.boosting(sf.SAEConfig(d_in=4, n_latents=4, k=2), 2, chains=2)
        sharpen.targets(boost, x, HAND_LABELS, torch.ones(2, 16, dtype=torch.bool))


def test_random_targets_are_seeded_unit_vectors():
    t = sharpen.random_targets(50, 7, seed=3)
    assert t.shape == (50, 7)
    assert_close(t.norm(dim=1), torch.ones(50), atol=1e-6)
    assert torch.equal(t, sharpen.random_targets(50, 7, seed=3))
    assert not torch.equal(t, sharpen.random_targets(50, 7, seed=4))
