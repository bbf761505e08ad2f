"""Ensemble modes whose members read different inputs (``x_in [N, J, D]``): the stacked training terms on one input
per member, and multi-chain boosting (independent boosting chains stored stage-major, each trained on its own
residuals) against the same chain trained alone; its checkpoints and bad input. (Bootstrap bagging, the other such
mode: tests/training/test_bootstrap.py; the fused encoders on per-member inputs: tests/ops/test_encode.py.)

Tolerance: 1e-5 absolute on every float parameter and buffer (``state_close``); integer buffers exactly. The stacked
step and a lone model differ only by float rounding (one batched GEMM/einsum vs a smaller one), measured at ≤ 5e-7
after these short runs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import ACTS, assert_close, data, quiet, record_inputs, state_close, state_equal, untie_encoder
from helpers import cfg_for as _cfg_for

import saefast as sf

cfg_for = functools.partial(_cfg_for, d_in=8, n_latents=12, k=2)


# ------------------------------------------------------------------------------------------------------
# The training terms on per-member inputs
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTS)
def test_terms_with_per_member_inputs_equal_each_member_on_its_own_input(activation):
    cfg = cfg_for(activation, jumprelu_bandwidth=0.5)
    bag = sf.Ensemble.bagging(cfg, members=3, seed=1)
    untie_encoder(bag, seed=2)
    x = torch.stack([data(10, 8, seed=3 + j) for j in range(3)], dim=1)  # [N, J, D]
    terms, _ = bag.training_terms(x)
    for j in range(3):
        lone_terms, _ = bag.member(j).training_terms(x[:, j])
        for field in ("fvu", "aux", "sparsity", "l0"):
            assert_close(getattr(terms, field)[j], getattr(lone_terms, field)[0], atol=1e-5, msg=field)


# ------------------------------------------------------------------------------------------------------
# Multi-chain boosting
# ------------------------------------------------------------------------------------------------------


def test_chains_are_stored_stage_major_and_seeded_per_chain():
    cfg = cfg_for("topk")
    C, J = 2, 3
    ens = sf.Ensemble.boosting(cfg, members=J, seed=4, chains=C)
    assert ens.members == J and ens.chains == C and ens.chain_seeds == (4, 7)
    assert ens.W_dec.shape == (C * J, 12, 8) and ens.b_dec.shape == (C * J, 8) and ens.n_latents_total == C * J * 12
    assert ens.stages() == [slice(0, 2), slice(2, 4), slice(4, 6)]
    for j in range(J):
        for c in range(C):
            assert torch.equal(ens.W_dec[j * C + c], sf.SAE(cfg, seed=4 + c * J + j).W_dec)
    for c in range(C):
        state_equal(ens.chain(c), sf.Ensemble.boosting(cfg, members=J, seed=4 + c * J))
    assert ens.chain(-1).seed == 7
    one = sf.Ensemble.boosting(cfg, members=J, seed=4)
    assert one.chains == 1 and one.chain_seeds == (4,)
    state_equal(one.chain(0), one)
    assert "chains=2" in repr(ens)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_chain_equals_boosting_trained_alone(activation):
    C, J = 2, 3
    cfg = cfg_for(activation)
    batches = [data(20, 8, seed=30 + s, scale=2.0) for s in range(3)]
    ens = sf.Ensemble.boosting(cfg, members=J, seed=4, chains=C)
    history = sf.train(ens, batches, steps=3, lr=1e-2, log_every=1, **quiet())
    assert [h["stage"] for h in history] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(h["fvu_per_member"]) == C for h in history)
    for c in range(C):
        alone = sf.Ensemble.boosting(cfg, members=J, seed=4 + c * J)
        sf.train(alone, batches, steps=3, lr=1e-2, **quiet())
        chain = ens.chain(c)
        assert chain.members == J and chain.chains == 1 and chain.seed == 4 + c * J
        state_close(chain.state_dict(), alone.state_dict())
    assert not torch.allclose(ens.chain(0).W_dec, ens.chain(1).W_dec)


@pytest.mark.parametrize("activation", ACTS)
def test_chain_equals_boosting_trained_alone_from_any_start(activation):
    """Every activation, from encoders moved off their tied init (chain c's state written into [c::C])."""
    C, J = 2, 3
    cfg = cfg_for(activation)
    batches = [data(20, 8, seed=30 + s, scale=2.0) for s in range(3)]
    ens = sf.Ensemble.boosting(cfg, members=J, seed=4, chains=C)
    alone = [sf.Ensemble.boosting(cfg, members=J, seed=4 + c * J) for c in range(C)]
    with torch.no_grad():
        for c in range(C):
            untie_encoder(alone[c], seed=100 + c)
            for name, tensor in ens.state_dict().items():
                tensor[c::C] = alone[c].state_dict()[name]
    sf.train(ens, batches, steps=3, lr=1e-2, **quiet())
    for c in range(C):
        sf.train(alone[c], batches, steps=3, lr=1e-2, **quiet())
        state_close(ens.chain(c).state_dict(), alone[c].state_dict())


def test_each_chain_stage_reads_its_own_residual():
    C, J = 2, 3
    cfg = cfg_for("topk", b_dec_init="mean")
    batches = [data(20, 8, seed=60 + s, scale=2.0) for s in range(2)]
    ens = sf.Ensemble.boosting(cfg, members=J, seed=1, chains=C)
    seen = record_inputs(ens)
    sf.train(ens, batches, steps=2, lr=1e-2, **quiet())
    assert len(seen) == J * 2
    assert seen[0].shape == (20, 8), "stage 0 of every chain reads the shared batch"
    assert torch.equal(seen[0], batches[0])
    for j in range(1, J):
        x_in = seen[2 * j]  # first step of stage j: batch 0
        assert x_in.shape == (20, C, 8)
        for c in range(C):
            # stages < j are frozen from stage j on: their final weights made this residual
            with torch.no_grad():
                expected = batches[0] - ens.chain(c).head(j).reconstruct(batches[0])
            assert_close(x_in[:, c], expected, atol=1e-5, msg=f"stage {j} chain {c}")
        assert (x_in[:, 0] - x_in[:, 1]).abs().max() > 1e-2, "the chains' residuals differ"
    # b_dec of each chain's stage from its own first residual
    for c in range(C):
        with torch.no_grad():
            r1 = batches[0] - ens.chain(c).head(1).reconstruct(batches[0])
        assert_close(ens.b_dec[1 * C + c], r1.double().mean(0), atol=0.05)
    with torch.no_grad():
        r = ens.stage_input(batches[1], J - 1)
    assert r.shape == (20, C, 8)


def test_multi_chain_has_no_single_reconstruction():
    ens = sf.Ensemble.boosting(cfg_for("topk"), members=2, seed=0, chains=3)
    x = data(5, 8, seed=1)
    for call in (lambda: ens.reconstruct(x), lambda: ens(x), lambda: ens.encode(x), lambda: ens.member(0),
                 lambda: ens.as_sae(), lambda: ens.decode(torch.zeros(5, 6 * 12)), lambda: sf.evaluate(ens, x)):
        with pytest.raises(ValueError, match=r"\.chain\(c\)"):
            call()
    head = ens.head(1)
    assert head.members == 1 and head.chains == 3 and head.chain_seeds == ens.chain_seeds
    for c in range(3):
        state_equal(head.chain(c), ens.chain(c).head(1))


# ------------------------------------------------------------------------------------------------------
# Checkpoints (resuming a multi-chain run: tests/training/test_resume.py)
# ------------------------------------------------------------------------------------------------------


def test_multi_chain_checkpoint_round_trip(tmp_path):
    cfg = cfg_for("batchtopk")
    ens = sf.Ensemble.boosting(cfg, members=2, seed=3, chains=3)
    sf.train(ens, [data(16, 8, seed=s) for s in range(2)], steps=2, **quiet())
    head = ens.head(1)  # its chain seeds (3, 5, 7) are not those a 1-stage constructor would pick
    for model, name in ((ens, "ens"), (head, "head")):
        model.save(str(tmp_path / name))
        again = sf.load(tmp_path / name)
        assert (again.members, again.chains, again.chain_seeds) == (model.members, model.chains, model.chain_seeds)
        state_equal(again, model)
        state_equal(again.chain(2), model.chain(2))


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def test_bad_chains_and_modes_raise():
    cfg = cfg_for("topk")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="chains must be an int"):
            sf.Ensemble.boosting(cfg, members=2, chains=bad)
    with pytest.raises(ValueError, match="boosting only"):
        sf.Ensemble(cfg, members=2, combine="bagging", chains=2)
    with pytest.raises(ValueError, match="chain.* applies to boosting"):
        sf.Ensemble.bagging(cfg, members=2).chain(0)
    ens = sf.Ensemble.boosting(cfg, members=2, chains=2)
    for bad in (2, -3, True):
        with pytest.raises(IndexError, match="chain index"):
            ens.chain(bad)
    x = data(8, 8, seed=0)
    with pytest.raises(ValueError, match="bootstrap=True applies to single SAEs and bagging"):
        sf.train(ens, [x], steps=1, bootstrap=True, **quiet())
    with pytest.raises(ValueError, match="bootstrap=True applies"):
        sf.train(sf.Ensemble.boosting(cfg, members=2), [x], steps=1, bootstrap=True, **quiet())
    with pytest.raises(ValueError, match="bootstrap must be a bool"):
        sf.TrainConfig(bootstrap="yes")


def test_wrong_per_member_input_shapes_raise_before_compute():
    cfg = cfg_for("topk")
    bag = sf.Ensemble.bagging(cfg, members=3)
    for bad in (torch.zeros(5, 2, 8), torch.zeros(5, 3, 7), torch.zeros(0, 3, 8), torch.zeros(5, 3, 8, 1),
                torch.zeros(5, 7)):
        with pytest.raises(ValueError, match=r"shared \[N, 8\] or per member \[N, 3, 8\]"):
            bag.training_terms(bad)
    with pytest.raises(ValueError, match=r"per member \[N, 1, 8\]"):
        bag.training_terms(torch.zeros(5, 3, 8), slice(1, 2))
    with pytest.raises(ValueError, match=r"per member \[N, 2, 8\]"):
        bag.init_b_dec_(torch.zeros(5, 3, 8), slice(0, 2))
    with pytest.raises(ValueError, match=r"must be shared \[N, 8\] for"):
        sf.SAE(cfg).training_terms(torch.zeros(5, 1, 8))  # an SAE's groups reconstruct one input together
    assert not bool(bag.b_dec_initialized.any())
