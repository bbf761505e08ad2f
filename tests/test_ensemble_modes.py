"""Ensemble modes whose members read different inputs: bootstrap bagging and multi-chain boosting.

Both feed the stacked training step one input per member (``x_in [N, J, D]``). The tests check each mode
against training the same member (or chain) alone, on the torch backend and (TopK) on Triton in its CPU
interpreter, plus checkpoint resume, the stage-major layout and bad input.

Tolerance: 1e-5 absolute on every float parameter and buffer (``assert_close``); integer buffers exactly.
The stacked step and a lone model differ only by float rounding (one batched GEMM/einsum vs a smaller one),
measured at ≤ 5e-7 after these short runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import saefast as sf
from saefast import ops
from saefast.train import bootstrap_indices

ACTS = ["topk", "batchtopk", "relu", "jumprelu"]
TOL = 1e-5


def cfg_for(activation: str, d_in: int = 8, n_latents: int = 12, k: int = 2, **kw) -> sf.SAEConfig:
    return sf.SAEConfig(d_in=d_in, n_latents=n_latents, k=k, activation=activation, **kw)


def data(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g) + 0.4


def quiet(**kw):
    return dict(progress=False, **kw)


def state_close(a: dict, b: dict, atol: float = TOL) -> None:
    assert set(a) == set(b)
    for name in a:
        if a[name].is_floating_point():
            assert_close(a[name], b[name], atol=atol, msg=name)
        else:
            assert torch.equal(a[name], b[name]), f"{name} differs"


def state_equal(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


def untie_encoder(model, seed: int) -> None:
    """Move the encoder off its tied initialisation (W_enc = W_dec, b_enc = 0), where some encoder gradients are
    analytically 0 and pure rounding noise that Adam's first steps would blow up to ±lr."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.W_enc.add_(0.3 * torch.randn(model.W_enc.shape, generator=g))
        model.b_enc.add_(0.1 * torch.randn(model.b_enc.shape, generator=g))


def record_inputs(model) -> list[torch.Tensor]:
    """Spy on the training step: every ``x_in`` that ``training_terms`` reads, in order."""
    seen: list[torch.Tensor] = []
    terms = model.training_terms

    def spy(x_in, *args, **kwargs):
        seen.append(x_in.detach().clone())
        return terms(x_in, *args, **kwargs)

    model.training_terms = spy
    return seen


# ------------------------------------------------------------------------------------------------------
# Per-member inputs in the shared pieces
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_per_member_inputs_of_the_fused_ops_equal_the_batched_reference(backend):
    """Triton (one call per member on x[:, j]) and native (one grouped call on the whole [N, J, D] input) equal the
    torch reference on the whole [N, J, D] input."""
    J, M, D, N = 3, 32, 16, 24
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, J, D, generator=g)
    W_enc = torch.randn(J, M, D, generator=g) / 4
    b_enc, b_dec = 0.1 * torch.randn(J, M, generator=g), 0.2 * torch.randn(J, D, generator=g)
    dead = torch.rand(J, M, generator=g) < 0.3
    got, got_aux = ops.per_member_inputs(ops.topk_encode, x, W_enc, b_enc, b_dec, 3, dead, 4, backend=backend)
    ref, ref_aux = ops.topk_encode(x, W_enc, b_enc, b_dec, 3, dead, 4, backend="torch")  # einsum over [N, J, D]
    assert got.members == J and got_aux.members == J
    assert_close(got.to_dense(), ref.to_dense(), atol=1e-5)
    assert_close(got_aux.to_dense(), ref_aux.to_dense(), atol=1e-5)
    codes, smallest, _ = ops.per_member_inputs(ops.batchtopk_encode, x, W_enc, b_enc, b_dec, 2, backend=backend)
    ref_codes, ref_smallest, _ = ops.batchtopk_encode(x, W_enc, b_enc, b_dec, 2, backend="torch")
    assert_close(codes.to_dense(), ref_codes.to_dense(), atol=1e-5)
    assert_close(smallest, ref_smallest, atol=1e-6)
    log_threshold = torch.log(0.2 + 0.3 * torch.rand(J, M, generator=g))
    codes, l0 = ops.per_member_inputs(ops.jumprelu_encode, x, W_enc, b_enc, b_dec, log_threshold, 0.05,
                                      backend=backend)
    ref_codes, ref_l0 = ops.jumprelu_encode(x, W_enc, b_enc, b_dec, log_threshold, 0.05, backend="torch")
    assert_close(codes.to_dense(), ref_codes.to_dense(), atol=1e-5)
    assert_close(l0, ref_l0, atol=1e-6)
    # a shared [N, D] input passes straight through: one call
    shared = x[:, 0]
    a, _ = ops.per_member_inputs(ops.topk_encode, shared, W_enc, b_enc, b_dec, 3, backend="torch")
    b, _ = ops.topk_encode(shared, W_enc, b_enc, b_dec, 3, backend="torch")
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


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
# Bootstrap bagging
# ------------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("backend", ["triton", "native"])
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
# Checkpoints
# ------------------------------------------------------------------------------------------------------


def _resume_case(tmp_path, build, batches, steps, every, stop_after, **options):
    """Uninterrupted run vs. a run stopped after ``stop_after`` batches, resumed in a NEW model: equal bit for bit."""
    full = build()
    sf.train(full, batches, steps=steps, lr=1e-2, **quiet(**options))
    first = build()
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(first, iter(batches[:stop_after]), steps=steps, lr=1e-2, checkpoint_dir=str(tmp_path),
                 checkpoint_every=every, **quiet(**options))
    resumed = build()
    sf.train(resumed, batches, steps=steps, lr=1e-2, checkpoint_dir=str(tmp_path), checkpoint_every=every,
             resume=True, **quiet(**options))
    state_equal(resumed, full)
    return full


def test_resume_bootstrap_bagging_equals_uninterrupted(tmp_path):
    cfg = cfg_for("topk", dead_after_tokens=16)
    batches = [data(16, 8, seed=70 + s) for s in range(6)]
    _resume_case(tmp_path, lambda: sf.Ensemble.bagging(cfg, members=3, seed=1), batches, steps=6, every=2,
                 stop_after=3, bootstrap=True, seed=5)


def test_resume_refuses_to_switch_bootstrap(tmp_path):
    cfg = cfg_for("relu")
    batches = [data(16, 8, seed=s) for s in range(4)]
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(sf.Ensemble.bagging(cfg, members=2), iter(batches[:2]), steps=4, checkpoint_dir=str(tmp_path),
                 checkpoint_every=2, bootstrap=True, **quiet())
    with pytest.raises(ValueError, match="bootstrap=True"):
        sf.train(sf.Ensemble.bagging(cfg, members=2), batches, steps=4, checkpoint_dir=str(tmp_path),
                 resume=True, **quiet())
    with pytest.raises(ValueError, match="seed=0"):
        sf.train(sf.Ensemble.bagging(cfg, members=2), batches, steps=4, checkpoint_dir=str(tmp_path),
                 resume=True, bootstrap=True, seed=1, **quiet())


@pytest.mark.parametrize("stop_after", [3, 5])
def test_resume_multi_chain_boosting_equals_uninterrupted(tmp_path, stop_after):
    # steps=2 per stage, a checkpoint every step: 3 resumes mid stage 1, 5 mid stage 2
    cfg = cfg_for("topk")
    batches = [data(16, 8, seed=80 + s, scale=2.0) for s in range(6)]
    _resume_case(tmp_path, lambda: sf.Ensemble.boosting(cfg, members=3, seed=2, chains=2), batches, steps=2,
                 every=1, stop_after=stop_after)


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


def test_resume_rejects_a_different_number_of_chains(tmp_path):
    cfg = cfg_for("relu")
    batches = [data(16, 8, seed=s) for s in range(4)]
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(sf.Ensemble.boosting(cfg, members=2, seed=1, chains=2), iter(batches[:1]), steps=2,
                 checkpoint_dir=str(tmp_path), checkpoint_every=1, **quiet())
    for other in (sf.Ensemble.boosting(cfg, members=2, seed=1), sf.Ensemble.boosting(cfg, members=2, seed=1, chains=3)):
        with pytest.raises(ValueError, match="different model"):
            sf.train(other, batches, steps=2, checkpoint_dir=str(tmp_path), resume=True, **quiet())


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
