"""saefast.config: SAEConfig refuses bad sizes, activations and options with a message that names the field, and
TrainConfig's learning-rate schedule (warm-up, then linear or cosine decay)."""

from __future__ import annotations

import pytest
from helpers import SMALL_D as D
from helpers import SMALL_M as M

import saefast as sf


def test_k_larger_than_n_latents():
    with pytest.raises(ValueError, match=r"k=12 exceeds the number of latents \(11"):
        sf.SAEConfig(d_in=D, n_latents=11, k=12)
    sf.SAEConfig(d_in=D, n_latents=11, k=11)  # the boundary is fine


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, activation="gelu")


@pytest.mark.parametrize("field, value", [("d_in", 0), ("n_latents", -3), ("k", 0), ("d_in", 7.0), ("k", True)])
def test_non_positive_sizes(field, value):
    kw = {"d_in": D, "n_latents": M, "k": 3, field: value}
    with pytest.raises(ValueError, match=rf"SAEConfig\.{field} must be a positive int"):
        sf.SAEConfig(**kw)


def test_other_config_errors():
    with pytest.raises(ValueError, match="aux_k"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, aux_k=M + 1)
    with pytest.raises(ValueError, match="b_dec_init"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, b_dec_init="median")
    with pytest.raises(ValueError, match="jumprelu_bandwidth"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, jumprelu_bandwidth=0.0)
    with pytest.raises(ValueError, match="l1_coef"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, l1_coef=-1.0)
    with pytest.raises(ValueError, match="not divisible by groups"):
        sf.SAEConfig(d_in=D, n_latents=M, k=1, groups=2)
    with pytest.raises(ValueError, match="unknown SAEConfig field"):
        sf.SAEConfig.from_dict({"d_in": D, "n_latents": M, "k": 3, "width": 3})


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = sf.TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay="linear", decay_fraction=0.2)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10:80] == [1.0] * 70
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(1 / 21)
    cosine = sf.TrainConfig(steps=100, lr=1.0, warmup_steps=0, decay="cosine", decay_fraction=0.5)
    assert cosine.lr_at(0) == 1.0 and cosine.lr_at(99) < 0.01
