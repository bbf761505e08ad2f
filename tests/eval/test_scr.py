"""saefast.eval.scr: spurious-correlation removal (SHIFT) — the score by hand, decoder directions against decode,
``ablate_rows`` against the splice hook, a planted spurious direction that the scores rank first and whose ablation
closes the gap (random latents do not), N = 0 and a missing gap, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import KINDS, assert_close, make, mirrored_identity_sae
from torch import nn

import saefast as sf
from saefast.data.examples import ExampleActivations
from saefast.eval import ablate_rows, decoder_directions, shift_score, splice, spurious_correlation_removal

pytest.importorskip("sklearn")

D = 16


def identity_relu_sae(d: int = D) -> sf.SAE:
    """ReLU SAE with latents ``e_i`` (index i) then ``−e_i`` (index d + i): ``x̂ = relu(x) − relu(−x) = x``."""
    return mirrored_identity_sae(d, activation="relu")


def planted(per_cell: int = 200, seed: int = 0, mu_target: float = 0.4, mu_spurious: float = 3.0
            ) -> tuple[ExampleActivations, torch.Tensor, torch.Tensor]:
    """Examples of 2..6 rows ``x = ±mu_target·e_0 (target) ± mu_spurious·e_1 (spurious) + N(0, I)``, ``per_cell``
    examples in each (target, spurious) cell: the target is weak and noisy, the spurious attribute strong."""
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor([0, 0, 1, 1]).repeat_interleave(per_cell)
    spurious = torch.tensor([0, 1, 0, 1]).repeat_interleave(per_cell)
    counts = torch.randint(2, 7, (len(target),), generator=g)
    example_of_row = torch.repeat_interleave(torch.arange(len(target)), counts)
    rows = torch.randn(len(example_of_row), D, generator=g)
    rows[:, 0] += mu_target * (2 * target[example_of_row] - 1)
    rows[:, 1] += mu_spurious * (2 * spurious[example_of_row] - 1)
    return ExampleActivations(rows, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])), target, spurious


# ------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------


def test_shift_score_by_hand():
    assert shift_score(0.6, 0.6, 0.9) == 0.0  # nothing gained
    assert shift_score(0.9, 0.6, 0.9) == 1.0  # the oracle's accuracy
    assert shift_score(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert shift_score(0.5, 0.6, 0.9) == pytest.approx(-1 / 3)  # worse than before
    assert math.isnan(shift_score(0.7, 0.6, 0.605))  # a gap of 0.005: no gap to close
    assert math.isnan(shift_score(0.7, 0.6, 0.595))
    assert shift_score(0.7, 0.6, 0.605, min_gap=0.001) == pytest.approx(20.0)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_directions_are_what_one_unit_of_code_adds_to_decode(kind):
    model = make(kind, sf.SAEConfig(d_in=5, n_latents=4, k=2), seed=1, members=3)
    with torch.no_grad():
        model.b_dec.normal_()
    total = model.n_latents_total
    directions = decoder_directions(model)
    assert directions.shape == (total, 5)
    with torch.no_grad():
        one_hot = model.decode(torch.eye(total)) - model.decode(torch.zeros(total, total))
    assert_close(directions, one_hot, atol=1e-6)
    if kind == "bagging":
        assert_close(directions[4:8], model.W_dec[1].detach() / 3)  # member 1, α = 1/3


def test_ablate_rows_is_the_splice_hooks_ablate_mode():
    """On a tiny module: the splice's ablate output at every position is ablate_rows of the layer's output."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 6)
    module = nn.Sequential(layer)
    sae = sf.SAE(sf.SAEConfig(d_in=6, n_latents=12, k=3), seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        x = torch.randn(2, 5, 6, generator=g)
        clean = module(x)
        codes = sae.encode(clean.reshape(-1, 6))
        latents = sorted({int(codes.global_indices()[0, 0, 0]), int(codes.global_indices()[3, 0, 1])})
        with splice(module, "0", sae, mode="ablate", ablate=latents):
            spliced = module(x)
        direct = ablate_rows(sae, clean.reshape(-1, 6), latents)
        assert torch.equal(spliced.reshape(-1, 6), direct)
        # and it is x minus the ablated latents' contribution
        dense = codes.to_dense()
        expected = clean.reshape(-1, 6) - dense[:, latents] @ sae.W_dec[latents]
        assert_close(direct, expected, atol=1e-5)
        assert not torch.allclose(direct, clean.reshape(-1, 6))
        assert torch.equal(ablate_rows(sae, clean.reshape(-1, 6), []), clean.reshape(-1, 6))  # nothing ablated
    with pytest.raises(ValueError, match="0..11"):
        ablate_rows(sae, clean.reshape(-1, 6).detach(), [12])


def test_ablate_rows_on_the_identity_sae_by_hand():
    """Latent 1 is ``relu(x_1)·e_1``: ablating it leaves ``min(x_1, 0)``; ablating 1 and d + 1 zeroes ``x_1``."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, -5.0, 6.0]])
    sae = identity_relu_sae(3)
    with torch.no_grad():
        assert_close(ablate_rows(sae, x, [1]), torch.tensor([[1.0, 0.0, 3.0], [4.0, -5.0, 6.0]]))
        assert_close(ablate_rows(sae, x, [1, 4]), torch.tensor([[1.0, 0.0, 3.0], [4.0, 0.0, 6.0]]))


# ------------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------------


def test_the_planted_spurious_direction_is_ranked_first_and_its_ablation_closes_the_gap():
    """The biased probe reads the strong spurious direction e_1 (chance on the balanced test set); the scores rank
    its two latents (e_1 and −e_1: indices 1 and D + 1) first, ablating them lets the unchanged biased probe read
    the target (S near 1) and leaves the spurious probe at chance; N = 0 gives S = 0 exactly, N above the model's
    latents is skipped, and random latents change nothing."""
    acts, target, spurious = planted()
    sae = identity_relu_sae()
    sae.train()
    result = spurious_correlation_removal(sae, acts, target, spurious, ns=(0, 2, 5, 1000), seed=0,
                                          random_control=True)
    assert sae.training
    assert result["ns"] == [0, 2, 5] and result["skipped_ns"] == [1000]
    assert result["n_per_cell"] == 200 and result["n_test"] == 200 and result["n_train"] == 600
    assert result["n_train_biased"] == 300 and result["n_latents_total"] == 2 * D
    assert sorted(result["ablated_latents"]["2"]) == [1, D + 1]
    assert result["top_scores"][1] > 100 * result["top_scores"][2]
    assert result["accuracy_biased"] <= 0.6 and result["accuracy_oracle"] >= 0.7
    assert result["spurious_accuracy"] >= 0.99
    assert result["S"]["0"] == 0.0 and result["accuracy_ablated"]["0"] == result["accuracy_biased"]
    assert result["S"]["2"] > 0.7 and result["S"]["5"] > 0.7
    assert abs(result["spurious_accuracy_ablated"]["2"] - 0.5) < 0.1
    for n in ("2", "5"):
        assert not {1, D + 1} & set(result["random_latents"][n])
        assert abs(result["S_random"][n]) < 0.2
    assert result["warning"] is None


def test_no_gap_gives_nan_and_a_warning():
    """A strong target and no spurious signal at all: the biased probe is perfect already, S is undefined."""
    acts, target, spurious = planted(per_cell=20, mu_target=5.0, mu_spurious=0.0)
    result = spurious_correlation_removal(identity_relu_sae(), acts, target, spurious, ns=(2,), seed=0)
    assert result["accuracy_biased"] == result["accuracy_oracle"] == 1.0
    assert math.isnan(result["S"]["2"])
    assert "no spurious gap" in result["warning"]


def test_bad_input_is_refused_before_any_compute(monkeypatch):
    acts, target, spurious = planted(per_cell=6)
    sae = identity_relu_sae()

    def forbidden(*args, **kwargs):
        raise AssertionError("encode ran before the input was validated")

    monkeypatch.setattr(sae, "encode", forbidden)
    with pytest.raises(ValueError, match=r"target must hold one value per example \(24\)"):
        spurious_correlation_removal(sae, acts, target[:-1], spurious)
    with pytest.raises(ValueError, match="spurious must be binary"):
        spurious_correlation_removal(sae, acts, target, spurious * 2)
    few = spurious.numpy().copy()
    index = np.flatnonzero((target.numpy() == 1) & (few == 0))[:3]
    few[index] = 1  # 3 of its 6 examples moved out: the cell target=1, spurious=0 keeps 3
    with pytest.raises(ValueError, match="cell target=1, spurious=0 has 3 example"):
        spurious_correlation_removal(sae, acts, target, few)
    with pytest.raises(ValueError, match="every N must be an int >= 0"):
        spurious_correlation_removal(sae, acts, target, spurious, ns=(-1,))
    with pytest.raises(ValueError, match="test_fraction"):
        spurious_correlation_removal(sae, acts, target, spurious, test_fraction=0.0)
    with pytest.raises(ValueError, match="d=16 but the model expects d_in=8"):
        spurious_correlation_removal(identity_relu_sae(8), acts, target, spurious)
