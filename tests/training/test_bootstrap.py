"""saefast.training.bootstrap: bootstrap bagging — every member trains on its own resample (with replacement) of each
batch — against the same member trained alone with bootstrap, on the torch backend and on the fused ones; the
resamples themselves (reproducible, different per member, step and run seed) and b_dec initialised from a member's
own first resample. (Resuming a bootstrap run: tests/training/test_resume.py.)

Tolerance: 1e-5 absolute on every float parameter and buffer (``state_close``); integer buffers exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import ACTS, FUSED_BACKENDS, assert_close, data, quiet, record_inputs, state_close, untie_encoder
from helpers import cfg_for as _cfg_for

import saefast as sf
from saefast.training.bootstrap import bootstrap_indices

cfg_for = functools.partial(_cfg_for, d_in=8, n_latents=12, k=2)


def test_bootstrap_indices_are_a_reproducible_resample_with_replacement():
    idx = bootstrap_indices(50, member_seed=3, step=7, train_seed=0)
    assert idx.dtype == torch.int64 and idx.shape == (50,)
    assert int(idx.min()) >= 0 and int(idx.max()) < 50
    assert idx.unique().numel() < 50, "with replacement: some rows repeat"
    assert torch.equal(idx, bootstrap_indices(50, 3, 7, 0))
    for other in (bootstrap_indices(50, 4, 7, 0), bootstrap_indices(50, 3, 8, 0), bootstrap_indices(50, 3, 7, 1)):
        assert not torch.equal(idx, other), "each of member seed, step and run seed changes the resample"


@pytest.mark.parametrize("activation", ACTS)
def test_bootstrap_member_equals_lone_sae_trained_with_bootstrap(activation):
    # topk/batchtopk: k=1 and a short dead window, so AuxK is active from step 2 on
    kw = {"dead_after_tokens": 6, "k": 1} if activation in ("topk", "batchtopk") else {"k": 2}
    cfg = cfg_for(activation, n_latents=29, jumprelu_bandwidth=0.5, **kw)
    batches = [data(6, 8, seed=10 + s, scale=1.5) for s in range(4)]
    bag = sf.Ensemble.bagging(cfg, members=3, seed=5)
    untie_encoder(bag, seed=6)
    initial = [bag.member(j).state_dict() for j in range(3)]
    history = sf.train(bag, batches, steps=5, lr=3e-3, bootstrap=True, log_every=1, **quiet())
    if activation in ("topk", "batchtopk"):
        assert history[-1]["aux"] > 0, "test setup: AuxK should be active"
    for j in range(3):
        lone = sf.SAE(cfg, seed=5 + j)
        lone.load_state_dict(initial[j])
        sf.train(lone, batches, steps=5, lr=3e-3, bootstrap=True, **quiet())
        state_close(bag.member(j).state_dict(), lone.state_dict())
    # and bootstrap changed the training: the plain bagging run ends elsewhere
    plain = sf.Ensemble.bagging(cfg, members=3, seed=5)
    untie_encoder(plain, seed=6)
    sf.train(plain, batches, steps=5, lr=3e-3, **quiet())
    assert (plain.b_dec - bag.b_dec).abs().max() > 1e-2


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bootstrap_fused_member_equals_lone_sae(backend):
    """TopK on the Triton backend (CPU interpreter: the per-member encode loop) and on native (one grouped encode of
    the [N, J, D] resamples): each member equals the lone SAE, and the torch backend's batched einsum."""
    cfg = sf.SAEConfig(d_in=16, n_latents=32, k=3, dead_after_tokens=30)
    batches = [data(24, 16, seed=20 + s) for s in range(3)]
    bag = sf.Ensemble.bagging(cfg, members=2, seed=1)
    history = sf.train(bag, batches, steps=3, lr=1e-2, bootstrap=True, backend=backend, log_every=1, **quiet())
    assert history[-1]["aux"] > 0, "test setup: AuxK should be active"
    for j in range(2):
        lone = sf.SAE(cfg, seed=1 + j)
        sf.train(lone, batches, steps=3, lr=1e-2, bootstrap=True, backend=backend, **quiet())
        state_close(bag.member(j).state_dict(), lone.state_dict())
    eager = sf.Ensemble.bagging(cfg, members=2, seed=1)
    sf.train(eager, batches, steps=3, lr=1e-2, bootstrap=True, backend="torch", **quiet())
    state_close(bag.state_dict(), eager.state_dict(), atol=1e-4)


def test_bootstrap_members_read_different_resamples_with_replacement():
    cfg = cfg_for("topk")
    batches = [data(24, 8, seed=40 + s) for s in range(2)]
    bag = sf.Ensemble.bagging(cfg, members=3, seed=2)
    seen = record_inputs(bag)
    sf.train(bag, batches, steps=2, lr=1e-2, bootstrap=True, seed=9, **quiet())
    assert len(seen) == 2
    for step, (x, x_in) in enumerate(zip(batches, seen)):
        assert x_in.shape == (24, 3, 8)
        rows = []
        for j in range(3):
            # every row of member j's input is a row of the batch: recover which one
            match = torch.cdist(x_in[:, j], x) == 0
            assert bool((match.sum(-1) == 1).all())
            rows.append(match.float().argmax(-1))
            assert torch.equal(rows[j], bootstrap_indices(24, 2 + j, step, 9))
            assert rows[j].unique().numel() < 24, "with replacement: some rows repeat, some are left out"
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.equal(rows[a], rows[b]), f"members {a} and {b} read the same rows"
    # b_dec (geometric median) came from each member's own first resample
    assert (bag.b_dec[0] - bag.b_dec[1]).abs().max() > 1e-3


def test_bootstrap_b_dec_is_initialised_from_the_members_own_first_resample():
    cfg = cfg_for("relu", b_dec_init="mean")
    x = data(30, 8, seed=50, scale=2.0)
    lr = 1e-7
    bag = sf.Ensemble.bagging(cfg, members=3, seed=4)
    sf.train(bag, [x], steps=1, lr=lr, bootstrap=True, seed=3, **quiet())
    for j in range(3):
        resample = x[bootstrap_indices(30, 4 + j, 0, 3)]
        assert_close(bag.b_dec[j], resample.double().mean(0), atol=3 * lr + 1e-6)
        assert (resample.mean(0) - x.mean(0)).abs().max() > 1e-2, "test setup: the resample mean must differ"
    sae = sf.SAE(cfg, seed=5)
    sf.train(sae, [x], steps=1, lr=lr, bootstrap=True, seed=3, **quiet())
    assert_close(sae.b_dec, bag.b_dec[1], atol=1e-6)
