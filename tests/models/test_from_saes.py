"""Ensemble.from_saes: SAEs trained apart (other seeds, other libraries) stacked into one ensemble — the inverse of
Ensemble.member(j), for every activation and both combines — and configurations that cannot stack, refused by name."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import saefast as sf

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("combine", ("bagging", "boosting"))
def test_from_saes_inverts_member(activation, combine):
    cfg = sf.SAEConfig(d_in=12, n_latents=20, k=3, activation=activation)
    original = sf.Ensemble(cfg, 3, combine, seed=5)
    with torch.no_grad():  # non-trivial biases and thresholds, so every tensor matters
        generator = torch.Generator().manual_seed(0)
        for tensor in original.parameters():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
        original.threshold.fill_(0.05)
    rebuilt = sf.Ensemble.from_saes([original.member(j) for j in range(3)], combine=combine)
    for name, tensor in original.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    original.eval(), rebuilt.eval()
    assert_close(rebuilt.reconstruct(x), original.reconstruct(x), atol=0)
    assert rebuilt.combine == combine and rebuilt.members == 3 and rebuilt.seed == 5


def test_separately_trained_saes_bag_like_the_paper():
    cfg = sf.SAEConfig(d_in=8, n_latents=16, k=2)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    saes = [sf.SAE(cfg, seed=seed) for seed in (0, 100)]
    for sae in saes:
        sf.train(sae, list(x.split(64)), steps=4, progress=False)
    bag = sf.Ensemble.from_saes(saes).eval()
    expected = (saes[0].eval().reconstruct(x) + saes[1].eval().reconstruct(x)) / 2
    assert_close(bag.reconstruct(x), expected, atol=1e-5)
    assert_close(bag.as_sae().reconstruct(x), expected, atol=1e-4)  # and everything built on an ensemble
    assert sf.evaluate(bag, x)["l0"] == pytest.approx(4.0)


def test_configurations_that_cannot_stack_are_refused_by_field():
    cfg = sf.SAEConfig(d_in=8, n_latents=16, k=2)
    with pytest.raises(ValueError, match=r"n_latents: 16 in member 0, 24 in member 1"):
        sf.Ensemble.from_saes([sf.SAE(cfg), sf.SAE(cfg.replace(n_latents=24))])
    with pytest.raises(ValueError, match=r"k: 2 in member 0, 3 in member 2"):
        sf.Ensemble.from_saes([sf.SAE(cfg), sf.SAE(cfg), sf.SAE(cfg.replace(k=3))])
    with pytest.raises(ValueError, match="at least one SAE"):
        sf.Ensemble.from_saes([])
    with pytest.raises(TypeError, match="member 1 is a Ensemble"):
        sf.Ensemble.from_saes([sf.SAE(cfg), sf.Ensemble(cfg, 2)])
    with pytest.raises(ValueError, match="unknown combine"):
        sf.Ensemble.from_saes([sf.SAE(cfg)], combine="stacking")
