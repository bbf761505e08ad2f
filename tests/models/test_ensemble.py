"""saefast.models.ensemble: bagging and boosting ensembles — construction and members, the combination rules, training
equal to training lone SAEs (bagging: each member; boosting: stage by stage on the residuals), the smaller ensembles
of ``head`` and ``as_sae`` folding an ensemble into one SAE."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import ACTS, assert_close, data, state_close, state_equal, untie_encoder
from helpers import cfg_for as _cfg_for

import saefast as sf

cfg_for = functools.partial(_cfg_for, d_in=9, n_latents=14, k=3)


def perturb(model, seed: int, b_enc_shift: float = 0.0) -> None:
    """Give every member distinct, non-zero b_enc / b_dec (and thresholds) so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.b_enc.copy_(0.3 * torch.randn(model.b_enc.shape, generator=g) + b_enc_shift)
        model.b_dec.copy_(0.8 * torch.randn(model.b_dec.shape, generator=g) + 0.2)
        model.W_enc.add_(0.2 * torch.randn(model.W_enc.shape, generator=g))
        if model.log_threshold is not None:
            model.log_threshold.copy_(torch.log(0.1 + 0.5 * torch.rand(model.log_threshold.shape, generator=g)))


# ------------------------------------------------------------------------------------------------------
# Construction and members
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTS)
def test_member_at_init_equals_lone_sae(activation):
    cfg = cfg_for(activation)
    for combine in ("bagging", "boosting"):
        ens = sf.Ensemble(cfg, members=3, combine=combine, seed=7)
        for j in range(3):
            state_equal(ens.member(j).state_dict(), sf.SAE(cfg, seed=7 + j).state_dict())
        assert ens.member(-1).seed == 9
        state_equal(ens.member(-1).state_dict(), ens.member(2).state_dict())


def test_ensemble_shapes_and_alpha():
    cfg = cfg_for("topk", d_in=6, n_latents=11)
    bag = sf.Ensemble.bagging(cfg, members=3, seed=0)
    assert bag.W_enc.shape == (3, 11, 6) and bag.b_enc.shape == (3, 11)
    assert bag.W_dec.shape == (3, 11, 6) and bag.b_dec.shape == (3, 6)
    assert bag.threshold.shape == (3, 11) and bag.tokens_since_fired.shape == (3, 11)
    assert bag.n_latents_total == 33 and bag.members == 3
    assert bag.alpha == pytest.approx(1 / 3)
    assert sf.Ensemble.boosting(cfg, members=3).alpha == 1.0
    assert bag.combine == "bagging"


def test_bad_members_and_index():
    cfg = cfg_for("topk")
    with pytest.raises(ValueError, match="members"):
        sf.Ensemble(cfg, members=0)
    with pytest.raises(ValueError, match="members"):
        sf.Ensemble.bagging(cfg, members=-2)
    with pytest.raises(ValueError, match="combine"):
        sf.Ensemble(cfg, members=2, combine="stacking")
    ens = sf.Ensemble.bagging(cfg, members=3)
    for bad in (3, 4, -4):
        with pytest.raises(IndexError, match="out of range"):
            ens.member(bad)


def test_member_is_a_copy():
    ens = sf.Ensemble.bagging(cfg_for("relu"), members=2)
    m = ens.member(1)
    with torch.no_grad():
        m.W_dec.zero_()
    assert (ens.W_dec[1] != 0).any()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("combine", ["bagging", "boosting"])
def test_head_is_the_smaller_ensemble(activation, combine):
    """head(j) of a trained ensemble: bagging averages the first j members, boosting runs the first j stages."""
    x = data(96, 9, seed=3)
    ens = sf.Ensemble(cfg_for(activation, k=3), members=3, combine=combine, seed=4)
    sf.train(ens, [x[:48], x[48:]], steps=4, lr=1e-2, progress=False)
    for j in (1, 2, 3):
        head = ens.head(j)
        assert head.members == j and head.combine == combine
        if combine == "bagging":
            expected = sum(ens.member(i).reconstruct(x) for i in range(j)) / j
        else:
            residual = x
            for i in range(j):
                residual = residual - ens.member(i).reconstruct(residual)
            expected = x - residual
        assert_close(head.reconstruct(x), expected, atol=1e-5, msg=f"head({j})")
    with torch.no_grad():
        ens.head(2).W_dec.zero_()
    assert (ens.W_dec != 0).any()
    for bad in (0, 4, 1.0):
        with pytest.raises(ValueError, match="head needs"):
            ens.head(bad)


# ------------------------------------------------------------------------------------------------------
# Bagging
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bagging_reconstruct_and_encode_match_members(activation, mode):
    cfg = cfg_for(activation)
    bag = sf.Ensemble.bagging(cfg, members=3, seed=2)
    perturb(bag, seed=3)
    getattr(bag, mode)()
    x = data(13, 9, seed=4)
    members = [bag.member(j) for j in range(3)]
    assert all(m.training == (mode == "train") for m in members)
    expected = sum(m.reconstruct(x) for m in members) / 3
    assert_close(bag.reconstruct(x), expected, atol=1e-5)
    codes = bag.encode(x)
    assert codes.members == 3 and codes.n_latents == 14
    expected_codes = torch.cat([m.encode(x).to_dense() for m in members], dim=1)
    assert_close(codes.to_dense(), expected_codes, atol=1e-5)
    assert_close(bag.decode(codes), expected, atol=1e-5)
    assert_close(bag.decode(codes.to_dense()), expected, atol=1e-5)


@pytest.mark.parametrize("activation", ACTS)
def test_bagging_training_equals_training_each_member_alone(activation):
    # topk/batchtopk: few tokens, k=1 and a short dead window, so AuxK is active from step 2 on
    kw = {"dead_after_tokens": 6, "k": 1} if activation in ("topk", "batchtopk") else {"k": 2}
    cfg = cfg_for(activation, d_in=8, n_latents=29, jumprelu_bandwidth=0.5, **kw)
    batches = [data(6, 8, seed=10 + s, scale=1.5) for s in range(4)]
    bag = sf.Ensemble.bagging(cfg, members=3, seed=5)
    # Move the encoder off its tied initialisation: with W_enc = W_dec (unit rows, b_enc = 0) the encoder
    # gradient of a top-1 SAE is analytically 0, so it is pure rounding noise that Adam would blow up to ±lr.
    untie_encoder(bag, seed=6)
    initial = [bag.member(j).state_dict() for j in range(3)]
    history = sf.train(bag, batches, steps=5, lr=3e-3, log_every=1, progress=False)
    if activation in ("topk", "batchtopk"):
        assert (bag.tokens_since_fired >= 6).any() and history[-1]["aux"] > 0, "test setup: AuxK should be active"
    for j in range(3):
        lone = sf.SAE(cfg, seed=5 + j)
        lone.load_state_dict(initial[j])
        sf.train(lone, batches, steps=5, lr=3e-3, progress=False)
        state_close(bag.member(j).state_dict(), lone.state_dict(), atol=1e-5)
    # and training really moved the weights
    assert not torch.allclose(bag.W_dec[0], sf.SAE(cfg, seed=5).W_dec)


def test_bagging_training_with_grad_clip_equals_training_alone():
    cfg = cfg_for("relu", d_in=8, n_latents=13, k=2)
    batches = [data(16, 8, seed=20 + s) for s in range(3)]
    bag = sf.Ensemble.bagging(cfg, members=3, seed=5)
    sf.train(bag, batches, steps=3, lr=1e-2, grad_clip=0.05, progress=False)
    for j in range(3):
        lone = sf.SAE(cfg, seed=5 + j)
        sf.train(lone, batches, steps=3, lr=1e-2, grad_clip=0.05, progress=False)
        state_close(bag.member(j).state_dict(), lone.state_dict(), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Boosting
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTS)
def test_boosting_reconstruct_is_sequential_residual_fit(activation):
    cfg = cfg_for(activation)
    boost = sf.Ensemble.boosting(cfg, members=3, seed=1)
    perturb(boost, seed=2)
    boost.eval()
    x = data(11, 9, seed=3)
    r = x
    total = torch.zeros_like(x)
    codes = []
    for j in range(3):
        m = boost.member(j)
        xhat_j = m.reconstruct(r)
        codes.append(m.encode(r).to_dense())
        total = total + xhat_j
        r = r - xhat_j
    assert_close(boost.reconstruct(x), total, atol=1e-5)
    assert_close(boost.encode(x).to_dense(), torch.cat(codes, dim=1), atol=1e-5)
    assert_close(boost.decode(boost.encode(x)), total, atol=1e-5)
    # it is not the bagging rule
    assert (boost.reconstruct(x) - sum(boost.member(j).reconstruct(x) for j in range(3)) / 3).abs().max() > 1e-2


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_boosting_training_stage_by_stage_equals_lone_saes(activation):
    cfg = cfg_for(activation, d_in=8, n_latents=12, k=2)
    batches = [data(20, 8, seed=30 + s, scale=2.0) for s in range(3)]
    boost = sf.Ensemble.boosting(cfg, members=3, seed=4)
    sf.train(boost, batches, steps=3, lr=1e-2, progress=False)

    inputs = batches
    for j in range(3):
        lone = sf.SAE(cfg, seed=4 + j)
        sf.train(lone, inputs, steps=3, lr=1e-2, progress=False)
        state_close(boost.member(j).state_dict(), lone.state_dict(), atol=1e-5)
        with torch.no_grad():
            inputs = [r - lone.reconstruct(r) for r in inputs]  # residual batches for the next stage


def test_boosting_stage_leaves_other_members_untouched():
    cfg = cfg_for("topk", d_in=8, n_latents=12, k=2)
    batches = [data(20, 8, seed=40 + s) for s in range(3)]
    init = sf.Ensemble.boosting(cfg, members=3, seed=4).state_dict()

    # run A: stage 0 completes, then the one-shot iterator runs out at stage 1, step 1
    partial = sf.Ensemble.boosting(cfg, members=3, seed=4)
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(partial, iter(batches + batches[:1]), steps=3, lr=1e-2, progress=False)
    assert not torch.equal(partial.W_dec[0], init["W_dec"][0])
    assert not torch.equal(partial.W_dec[1], init["W_dec"][1])  # one step of stage 1
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "tokens_since_fired", "b_dec_initialized"):
        assert torch.equal(getattr(partial, name)[2], init[name][2]), f"stage 2 {name} moved during stage 1"

    # run B: full training; member 0 must not move after stage 0
    stage0 = sf.Ensemble.boosting(cfg, members=3, seed=4)
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(stage0, iter(batches), steps=3, lr=1e-2, progress=False)
    full = sf.Ensemble.boosting(cfg, members=3, seed=4)
    sf.train(full, batches, steps=3, lr=1e-2, progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "tokens_since_fired"):
        assert torch.equal(getattr(full, name)[0], getattr(stage0, name)[0]), f"stage 0 {name} moved later"
        assert torch.equal(getattr(stage0, name)[1], init[name][1]), f"stage 1 {name} moved during stage 0"


def test_boosting_stage_b_dec_initialised_from_its_residual():
    cfg = cfg_for("topk", d_in=7, n_latents=10, k=2, b_dec_init="mean")
    x = data(40, 7, seed=50, scale=2.0) + torch.linspace(-3, 3, 7)
    boost = sf.Ensemble.boosting(cfg, members=2, seed=0)
    lr = 1e-7
    sf.train(boost, [x], steps=1, lr=lr, progress=False)
    with torch.no_grad():
        r1 = x - boost.member(0).reconstruct(x)
    assert (r1.mean(0) - x.mean(0)).abs().max() > 0.1, "test setup: residual mean must differ from data mean"
    assert_close(boost.b_dec[0], x.double().mean(0), atol=3 * lr + 1e-6)
    assert_close(boost.b_dec[1], r1.double().mean(0), atol=3 * lr + 1e-5)
    assert bool(boost.b_dec_initialized.all())


def test_init_b_dec_on_ensemble_member_slice():
    cfg = cfg_for("relu", d_in=6, n_latents=8, b_dec_init="mean")
    ens = sf.Ensemble.boosting(cfg, members=3)
    x = data(12, 6, seed=51)
    ens.init_b_dec_(x, slice(1, 2))
    assert_close(ens.b_dec[1], x.double().mean(0), atol=1e-6)
    assert (ens.b_dec[0] == 0).all() and (ens.b_dec[2] == 0).all()
    assert ens.b_dec_initialized.tolist() == [False, True, False]


# ------------------------------------------------------------------------------------------------------
# as_sae
# ------------------------------------------------------------------------------------------------------


def _check_bagging_as_sae(bag, x, J, M):
    big = bag.as_sae()
    assert isinstance(big, sf.SAE)
    assert big.n_latents == J * M and big.cfg.n_latents == J * M and big.cfg.groups == J
    assert big.training == bag.training
    assert not big.decode_only
    assert_close(big.reconstruct(x), bag.reconstruct(x), atol=1e-5)
    big_dense = big.encode(x).to_dense()
    assert_close(big_dense, bag.encode(x).to_dense() / J, atol=1e-6)
    assert_close(big.b_dec, bag.b_dec.mean(0), atol=1e-6)
    assert torch.equal(big.W_dec.detach(), torch.cat([bag.W_dec[j] for j in range(J)], dim=0).detach())
    assert_close(big.decode(bag.encode(x).scaled(1 / J)), bag.reconstruct(x), atol=1e-5)
    return big, big_dense


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_bagging_as_sae_is_equivalent(activation):
    J, M = 3, 10
    cfg = cfg_for(activation, d_in=7, n_latents=M, k=3)
    bag = sf.Ensemble.bagging(cfg, members=J, seed=3)
    perturb(bag, seed=4)
    assert (bag.b_dec[0] - bag.b_dec[1]).abs().max() > 0.1
    bag.eval()
    x = data(15, 7, seed=5)
    big, dense = _check_bagging_as_sae(bag, x, J, M)
    if activation == "jumprelu":
        assert_close(big.log_threshold.exp(), bag.log_threshold.exp().reshape(-1) / J, atol=1e-6)
    nz = (dense != 0).view(15, J, M).sum(-1)
    assert nz.min() > 0


def test_bagging_as_sae_topk_keeps_k_per_member_block():
    J, M, k = 3, 10, 3
    cfg = cfg_for("topk", d_in=7, n_latents=M, k=k)
    bag = sf.Ensemble.bagging(cfg, members=J, seed=8)
    perturb(bag, seed=9, b_enc_shift=4.0)  # all pre-activations positive
    bag.eval()
    x = data(15, 7, seed=10)
    big, dense = _check_bagging_as_sae(bag, x, J, M)
    codes = big.encode(x)
    assert codes.values.shape == (15, J, k)
    assert ((dense != 0).view(15, J, M).sum(-1) == k).all()
    assert (codes.indices < M).all() and codes.n_latents == M


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bagging_as_sae_batchtopk(mode):
    J, M = 3, 10
    cfg = cfg_for("batchtopk", d_in=7, n_latents=M, k=2)
    bag = sf.Ensemble.bagging(cfg, members=J, seed=11)
    perturb(bag, seed=12)
    if mode == "eval":
        g = torch.Generator().manual_seed(13)
        with torch.no_grad():
            bag.threshold.copy_(0.05 + 0.5 * torch.rand(J, M, generator=g))
        bag.eval()
    else:
        bag.train()
    x = data(12, 7, seed=14, scale=1.5) * torch.linspace(0.3, 2.0, 12)[:, None]
    big, dense = _check_bagging_as_sae(bag, x, J, M)
    if mode == "eval":
        assert_close(big.threshold, bag.threshold.reshape(-1) / J, atol=1e-7)
    else:
        # batch top-k per member block: N·k kept in every block
        assert ((dense != 0).view(12, J, M).sum((0, 2)) == 12 * 2).all()


def test_bagging_as_sae_after_training():
    cfg = cfg_for("batchtopk", d_in=8, n_latents=11, k=2)
    bag = sf.Ensemble.bagging(cfg, members=2, seed=0)
    batches = [data(16, 8, seed=s) for s in range(3)]
    sf.train(bag, batches, steps=3, lr=1e-2, progress=False)
    assert (bag.threshold >= 0).all()
    x = data(10, 8, seed=99)
    big = bag.as_sae()
    assert_close(big.reconstruct(x), bag.reconstruct(x), atol=1e-5)
    assert torch.equal(big.tokens_since_fired, bag.tokens_since_fired.reshape(-1))
    assert bool(big.b_dec_initialized)


@pytest.mark.parametrize("activation", ACTS)
def test_boosting_as_sae_decodes_exactly_and_refuses_to_encode(activation):
    J, M = 3, 9
    cfg = cfg_for(activation, d_in=6, n_latents=M, k=2)
    boost = sf.Ensemble.boosting(cfg, members=J, seed=2)
    perturb(boost, seed=3)
    boost.eval()
    x = data(10, 6, seed=4)
    big = boost.as_sae()
    assert big.decode_only
    assert big.n_latents == J * M
    assert_close(big.decode(boost.encode(x)), boost.reconstruct(x), atol=1e-5)
    assert_close(big.decode(boost.encode(x).to_dense()), boost.reconstruct(x), atol=1e-5)
    assert_close(big.b_dec, boost.b_dec.sum(0), atol=1e-6)
    assert torch.equal(big.W_dec.detach(), boost.W_dec.reshape(J * M, -1).detach())
    with pytest.raises(RuntimeError, match="boosting"):
        big.encode(x)
    with pytest.raises(RuntimeError, match="boosting"):
        big.reconstruct(x)
    with pytest.raises(ValueError, match="decode-only"):
        sf.train(big, [x], steps=1, progress=False)


def test_as_sae_single_member_is_the_member():
    cfg = cfg_for("topk", d_in=6, n_latents=9, k=2)
    bag = sf.Ensemble.bagging(cfg, members=1, seed=3)
    perturb(bag, seed=4)
    bag.eval()
    x = data(8, 6, seed=5)
    big = bag.as_sae()
    m = bag.member(0)
    assert_close(big.reconstruct(x), m.reconstruct(x), atol=1e-6)
    assert_close(big.encode(x).to_dense(), m.encode(x).to_dense(), atol=1e-6)
    assert math.isclose(bag.alpha, 1.0)


def test_boosting_stages_train_on_the_inference_residual_of_batchtopk_stages():
    # Frozen BatchTopK stages must hand later stages the residual reconstruct() produces (threshold mode),
    # not the batch-top-k residual of training mode.
    cfg = sf.SAEConfig(d_in=12, n_latents=20, k=3, activation="batchtopk")
    boost = sf.Ensemble.boosting(cfg, members=2, seed=3)
    batches = [torch.randn(40, 12) for _ in range(3)]
    sf.train(boost, batches, steps=3, progress=False)
    assert bool((boost.threshold[0] > 0).all())
    x = torch.randn(17, 12)
    boost.train()
    stage0 = boost.member(0)
    stage0.eval()
    expected = x - stage0.reconstruct(x)
    torch.testing.assert_close(boost.stage_input(x, 1), expected, atol=1e-6, rtol=1e-6)
    stage0.train()
    assert not torch.allclose(x - stage0.reconstruct(x), expected, atol=1e-4)
