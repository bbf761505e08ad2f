"""saefast.eval.metrics: reconstruction, sparsity, dead-latent and dictionary metrics on hand-computed cases and
brute-force m x m references, streaming, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_codes

from saefast.eval.metrics import (
    FiringWindow,
    ReconstructionStats,
    _default_block_size,
    connectivity,
    dead_latent_fraction,
    diversity,
    explained_variance,
    explained_variance_per_dim,
    fvu,
    l0,
    l0_total,
    max_abs_cosine_to_others,
    member_similarity,
    mse,
    relaxed_stability,
)
from saefast.ops.codes import SparseCodes

# ------------------------------------------------------------------------------------------------------
# Independent float64 references (direct formulas, not via ReconstructionStats)
# ------------------------------------------------------------------------------------------------------


def ref_recon(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    x, x_hat = x.double(), x_hat.double()
    res = (x - x_hat).square()
    dev = (x - x.mean(0)).square()
    var_d = dev.sum(0)
    keep = var_d > 1e-12 * (1 + x.abs().amax(0)) ** 2
    f = (res.sum() / dev.sum()).item()
    return {
        "mse": res.sum(1).mean().item(),
        "fvu": f,
        "explained_variance": 1 - f,
        "explained_variance_per_dim": (1 - res.sum(0)[keep] / var_d[keep]).mean().item(),
    }


def unit(w: torch.Tensor) -> torch.Tensor:
    w = w.reshape(-1, w.shape[-1]).double()
    n = w.norm(dim=1, keepdim=True)
    return torch.where(n > 0, w / n.clamp_min(1e-300), torch.zeros_like(w))


def ref_max_abs_cos(w: torch.Tensor) -> torch.Tensor:
    u = unit(w)
    sims = (u @ u.T).abs()
    sims.fill_diagonal_(-1.0)
    return sims.amax(1)


def ref_stability(a: torch.Tensor, b: torch.Tensor) -> float:
    return (unit(a) @ unit(b).T).amax(1).mean().item()


def firing_matrix(batches: list[SparseCodes]) -> torch.Tensor:
    """Dense boolean [N_total, J*M]: slot-wise firing (a non-zero value), scattered by global index."""
    rows = []
    for c in batches:
        f = torch.zeros(c.n_tokens, c.n_latents_total, dtype=torch.bool)
        g = c.global_indices().reshape(c.n_tokens, -1)
        nz = (c.values != 0).reshape(c.n_tokens, -1)
        tok = torch.arange(c.n_tokens).unsqueeze(1).expand_as(g)
        f[tok[nz], g[nz]] = True
        rows.append(f)
    return torch.cat(rows)


def ref_connectivity(batches: list[SparseCodes]) -> float:
    f = firing_matrix(batches).double()
    m = f.shape[1]
    co = (f.T @ f) > 0
    co.fill_diagonal_(False)
    return 1 - (co.sum().item() / 2) / (m * (m - 1) / 2)


def codes_from_sets(token_sets: list[list[int]], m: int) -> SparseCodes:
    """J = 1 codes whose token n fires exactly the latents in token_sets[n] (padded with zero slots)."""
    k = max(1, max(len(s) for s in token_sets))
    vals = torch.zeros(len(token_sets), 1, k)
    idx = torch.zeros(len(token_sets), 1, k, dtype=torch.int64)
    for n, s in enumerate(token_sets):
        for slot, latent in enumerate(s):
            vals[n, 0, slot] = 1.0
            idx[n, 0, slot] = latent
    return SparseCodes(vals, idx, m)


# ------------------------------------------------------------------------------------------------------
# Reconstruction
# ------------------------------------------------------------------------------------------------------


def test_reconstruction_hand_case():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
    # residuals: [0, -1], [1, 0] -> per-token squared sums 1, 1 -> mse = (1 + 1) / 2 = 1.0
    assert mse(x, x_hat) == pytest.approx(1.0)
    # x̄ = [2, 2]; deviations [-1, -2], [1, 2] -> var_0 = 2, var_1 = 8, total = 10
    # fvu = (residual total 2) / 10 = 0.2 ; EV = 0.8
    assert fvu(x, x_hat) == pytest.approx(0.2)
    assert explained_variance(x, x_hat) == pytest.approx(0.8)
    # per-dim: dim0 1 - 1/2 = 0.5 ; dim1 1 - 1/8 = 0.875 ; mean = 0.6875 (differs from total EV 0.8)
    assert explained_variance_per_dim(x, x_hat) == pytest.approx(0.6875)


def test_perfect_reconstruction_and_mean_predictor():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=gen)
    assert mse(x, x) == 0.0
    assert fvu(x, x) == 0.0
    assert explained_variance_per_dim(x, x) == pytest.approx(1.0)
    # predicting the mean leaves exactly the total variance: fvu = 1
    x_bar = x.double().mean(0).expand_as(x)
    assert fvu(x, x_bar) == pytest.approx(1.0, rel=1e-6)
    assert explained_variance_per_dim(x, x_bar) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_dim_skips_zero_variance_dim(dtype):
    # dim1 is the constant 0.1. In float64, mean([0.1] * 3) != 0.1 after rounding, so a variance computed
    # from the mean is ~6e-34, not 0: the dimension must still be recognised as constant and skipped.
    x = torch.tensor([[1.0, 0.1], [3.0, 0.1], [2.0, 0.1]], dtype=dtype)
    x_hat = torch.tensor([[1.0, 0.6], [2.0, 0.1], [2.0, 0.1]], dtype=dtype)
    # dim0: x̄ = 2, var = 1 + 1 + 0 = 2 ; residual² = 0 + 1 + 0 = 1 -> EV_0 = 1 - 1/2 = 0.5 ; dim1 skipped
    assert explained_variance_per_dim(x, x_hat) == pytest.approx(0.5)
    # total form: residual² = 1 + 0.25 = 1.25 over total variance 2 -> fvu = 0.625
    assert fvu(x, x_hat) == pytest.approx(0.625, rel=1e-6)


def test_all_zero_variance_gives_nan():
    x = torch.full((4, 3), 0.1)
    x_hat = torch.zeros(4, 3)
    assert math.isnan(explained_variance_per_dim(x, x_hat))
    assert math.isnan(fvu(x, x_hat))
    assert math.isnan(explained_variance(x, x_hat))
    assert mse(x, x_hat) == pytest.approx(3 * 0.01, rel=1e-6)


def test_streaming_equals_one_shot_and_reference():
    gen = torch.Generator().manual_seed(1)
    # a large common offset stresses the variance computation (naive Σx² - (Σx)²/N in float32 would fail)
    batches = []
    for n in (17, 1, 40):
        x = torch.randn(n, 6, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.0]) + 1000.0
        x_hat = x + 0.3 * torch.randn(n, 6, generator=gen)
        x[:, 5] = 7.0  # a zero-variance dimension across all batches
        batches.append((x, x_hat))
    stats = ReconstructionStats()
    for x, x_hat in batches:
        stats.update(x, x_hat)
    got = stats.compute()
    x_all = torch.cat([b[0] for b in batches])
    xh_all = torch.cat([b[1] for b in batches])
    one_shot = {
        "mse": mse(x_all, xh_all),
        "fvu": fvu(x_all, xh_all),
        "explained_variance": explained_variance(x_all, xh_all),
        "explained_variance_per_dim": explained_variance_per_dim(x_all, xh_all),
    }
    ref = ref_recon(x_all, xh_all)
    for key in ref:
        assert got[key] == pytest.approx(one_shot[key], rel=1e-9, abs=1e-12), key
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    # the streaming result must depend on all batches: dropping one changes it
    partial = ReconstructionStats()
    partial.update(*batches[0])
    assert partial.compute()["fvu"] != pytest.approx(got["fvu"], rel=1e-3)


def test_streaming_ignores_empty_batch_and_reset():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
    stats = ReconstructionStats()
    stats.update(x[:0], x_hat[:0])
    stats.update(x[:1], x_hat[:1])
    stats.update(x[1:], x_hat[1:])
    assert stats.compute()["fvu"] == pytest.approx(0.2)
    stats.reset()
    with pytest.raises(ValueError, match=r"ReconstructionStats has seen no tokens; call update\(\)"):
        stats.compute()


@pytest.mark.parametrize("fn", [mse, fvu, explained_variance, explained_variance_per_dim])
def test_reconstruction_errors(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="no tokens"):
        fn(torch.zeros(0, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.zeros(3), torch.zeros(3))


def test_streaming_dim_change_error():
    stats = ReconstructionStats()
    stats.update(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="D=4"):
        stats.update(torch.zeros(2, 4), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------------
# Sparsity and dead latents
# ------------------------------------------------------------------------------------------------------


def test_l0_hand_case():
    # J = 2, K = 3. token 0: member0 values [1, 0, 2] (2 nz), member1 [0, 0, 0] (0 nz)
    #               token 1: member0 [0, 0, 3] (1 nz),    member1 [4, 5, 6] (3 nz)
    vals = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 3.0], [4.0, 5.0, 6.0]]])
    idx = torch.tensor([[[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [0, 1, 2]]])
    codes = SparseCodes(vals, idx, 4)
    # member0: (2 + 1) / 2 = 1.5 ; member1: (0 + 3) / 2 = 1.5
    torch.testing.assert_close(l0(codes), torch.tensor([1.5, 1.5], dtype=torch.float64))
    vals2 = vals.clone()
    vals2[1, 1, 0] = 0.0  # member1 token1 now 2 nz -> member1 mean = (0 + 2) / 2 = 1.0
    codes2 = SparseCodes(vals2, idx, 4)
    torch.testing.assert_close(l0(codes2), torch.tensor([1.5, 1.0], dtype=torch.float64))
    assert l0_total(codes2) == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"l0 needs at least one token \(N = 0\)"):
        l0(SparseCodes(vals[:0], idx[:0], 4))


def test_firing_window_hand_case():
    # J = 2, M = 3 -> 6 global latents. member0 fires local 1 (global 1); member1 fires local 0 (global 3);
    # member0 has a zero-valued slot on local 2 (global 2) which must NOT count as firing.
    vals = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    idx = torch.tensor([[[1, 2], [0, 0]]])
    codes = SparseCodes(vals, idx, 3)
    window = FiringWindow(6)
    assert window.dead_fraction() == 1.0
    window.update(codes)
    assert window.fired.tolist() == [False, True, False, True, False, False]
    assert window.n_tokens == 1
    assert window.dead_fraction() == pytest.approx(4 / 6)
    # second batch fires member1 local 2 (global 5) -> dead = 3/6
    window.update(SparseCodes(torch.tensor([[[0.0], [1.0]]]), torch.tensor([[[0], [2]]]), 3))
    assert window.dead_fraction() == pytest.approx(3 / 6)
    assert window.n_tokens == 2
    window.reset()
    assert window.dead_fraction() == 1.0 and window.n_tokens == 0
    with pytest.raises(ValueError, match="latents"):
        window.update(SparseCodes(vals, idx, 4))


def test_dead_latent_fraction_matches_brute_force():
    gen = torch.Generator().manual_seed(2)
    batches = [random_codes(5, 2, 20, 2, gen) for _ in range(3)]
    expected = 1 - firing_matrix(batches).any(0).double().mean().item()
    assert 0 < expected < 1
    assert dead_latent_fraction(batches, 40) == pytest.approx(expected)
    assert dead_latent_fraction(iter(batches), 40) == pytest.approx(expected)
    with pytest.raises(ValueError, match="expected at least one SparseCodes batch, got an empty iterable"):
        dead_latent_fraction([], 40)


# ------------------------------------------------------------------------------------------------------
# Dictionary metrics
# ------------------------------------------------------------------------------------------------------


def test_diversity_hand_vectors():
    w = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.99, 0.1, 0.0],  # cos with row 0 = 0.99 / sqrt(0.9901) ≈ 0.995 -> both rows 0, 1 not diverse
            [0.0, 0.0, -2.0],  # orthogonal to both -> diverse
        ]
    )
    assert diversity(w, threshold=0.7) == pytest.approx(1 / 3)
    expected = torch.tensor([0.99 / math.sqrt(0.9901), 0.99 / math.sqrt(0.9901), 0.0])
    torch.testing.assert_close(max_abs_cosine_to_others(w), expected.float())
    # anti-parallel counts too (absolute cosine): flipping row 1 changes nothing
    w_flip = w.clone()
    w_flip[1] = -w_flip[1]
    assert diversity(w_flip) == pytest.approx(1 / 3)
    # raising the threshold above 0.995 makes all three diverse
    assert diversity(w, threshold=0.999) == pytest.approx(1.0)


def test_max_abs_cosine_excludes_self_and_handles_zero_rows():
    # identical rows 0 and 1 are distinct features -> |cos| = 1; zero row 2 has cos 0 with everything
    w = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [2.0, -1.0]])
    got = max_abs_cosine_to_others(w)
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # a single feature has no others
    torch.testing.assert_close(max_abs_cosine_to_others(torch.tensor([[3.0, 4.0]])), torch.tensor([0.0]))
    assert diversity(torch.tensor([[3.0, 4.0]])) == 1.0


@pytest.mark.parametrize("block_size", [1, 3, 7, None])
def test_max_abs_cosine_and_diversity_vs_brute_force(block_size):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 11, 4, generator=gen)  # [J, M, D] -> m = 22, D = 4 (many large cosines)
    w[1, 5] = 0.0
    ref = ref_max_abs_cos(w)
    got = max_abs_cosine_to_others(w, block_size=block_size)
    assert got.shape == (22,)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)
    for t in (0.5, 0.7, 0.9):
        expected = (ref < t).double().mean().item()
        assert diversity(w, threshold=t, block_size=block_size) == pytest.approx(expected)
    # member-major flattening: [J, M, D] equals the explicit [J*M, D]
    torch.testing.assert_close(max_abs_cosine_to_others(w.reshape(22, 4), block_size=block_size), got)


def test_relaxed_stability_hand_case():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # A->B: cos([1,0],[1,1]) = 1/√2, cos([1,0],[0,-1]) = 0 -> max = 1/√2
    assert relaxed_stability(a, b) == pytest.approx(1 / math.sqrt(2))
    # B->A: [1,1] -> 1/√2 ; [0,-1] -> 0 ; mean = 1/(2√2). symmetric = (1/√2 + 1/(2√2)) / 2
    assert relaxed_stability(b, a) == pytest.approx(1 / (2 * math.sqrt(2)))
    assert relaxed_stability(a, b, symmetric=True) == pytest.approx(
        (1 / math.sqrt(2) + 1 / (2 * math.sqrt(2))) / 2
    )
    # signed, not absolute: a sign-flipped single-feature dictionary scores -1
    assert relaxed_stability(a, -a) == pytest.approx(-1.0)


@pytest.mark.parametrize("block_size", [1, 3, None])
def test_relaxed_stability_self_permuted_and_brute_force(block_size):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, 8, generator=gen)  # m = 15
    assert relaxed_stability(a, a, block_size=block_size) == pytest.approx(1.0, abs=1e-6)
    perm = torch.randperm(15, generator=gen)
    a_perm = a.reshape(15, 8)[perm] * 2.5  # scaled copy: cosines are scale-free
    assert relaxed_stability(a, a_perm, block_size=block_size) == pytest.approx(1.0, abs=1e-6)
    assert relaxed_stability(a, a_perm, symmetric=True, block_size=block_size) == pytest.approx(1.0, abs=1e-6)
    b = torch.randn(7, 8, generator=gen)
    ab, ba = ref_stability(a, b), ref_stability(b, a)
    assert ab < 0.99
    assert relaxed_stability(a, b, block_size=block_size) == pytest.approx(ab, abs=1e-6)
    assert relaxed_stability(b, a, block_size=block_size) == pytest.approx(ba, abs=1e-6)
    assert relaxed_stability(a, b, symmetric=True, block_size=block_size) == pytest.approx(
        (ab + ba) / 2, abs=1e-6
    )


def ref_member_similarity(w: torch.Tensor) -> torch.Tensor:
    """``[J, J]`` brute force: dense cosines of every member pair, the row itself excluded."""
    J, M, D = w.shape
    u = unit(w.reshape(J * M, D).double())
    cos = u @ u.T
    cos.fill_diagonal_(float("-inf"))
    best = cos.view(J * M, J, M).amax(-1)  # [m, J]
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best)
    return best.view(J, M, J).mean(1)


def test_member_similarity_hand_case():
    # member 0: e1, e2; member 1: e1, (e1 + e2)/√2 direction
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]]])
    got = member_similarity(w, threshold=0.9)
    c = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, (1 + c) / 2], [(1 + c) / 2, c]], dtype=torch.float64)
    torch.testing.assert_close(got["stability"], expected)
    torch.testing.assert_close(got["max_abs_cosine"], torch.tensor([1.0, c, 1.0, c]))
    assert got["diversity"] == pytest.approx(0.5)
    assert got["cross_member_stability"] == pytest.approx((1 + c) / 2)


@pytest.mark.parametrize("block_size", [1, 4, None])
@pytest.mark.parametrize("J, M", [(1, 1), (1, 6), (3, 1), (3, 5), (2, 9)])
def test_member_similarity_vs_pairwise_metrics(J, M, block_size):
    gen = torch.Generator().manual_seed(J * 10 + M)
    w = torch.randn(J, M, 3, generator=gen)  # D = 3: many large cosines, so maxima are contested
    w[-1, 0] = 0.0  # a zero row has cosine 0 with everything
    got = member_similarity(w, threshold=0.8, block_size=block_size)
    torch.testing.assert_close(got["max_abs_cosine"], max_abs_cosine_to_others(w), atol=1e-6, rtol=0)
    assert got["diversity"] == pytest.approx(diversity(w, threshold=0.8))
    torch.testing.assert_close(got["stability"], ref_member_similarity(w), atol=1e-6, rtol=0)
    for i in range(J):
        for j in range(J):
            if i != j:
                assert float(got["stability"][i, j]) == pytest.approx(relaxed_stability(w[i], w[j]), abs=1e-6)
    if J == 1:
        assert math.isnan(got["cross_member_stability"])
    else:
        off = ~torch.eye(J, dtype=torch.bool)
        assert got["cross_member_stability"] == pytest.approx(float(got["stability"][off].mean()))


def test_member_similarity_identical_members_and_errors():
    w = torch.randn(1, 7, 5).expand(3, 7, 5) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1)  # scaled copies
    got = member_similarity(w)
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(got["stability"][off], torch.ones(6, dtype=torch.float64))
    assert got["diversity"] == 0.0  # every latent has an exact copy in another member
    with pytest.raises(ValueError, match=r"member-stacked \[J, M, D\]"):
        member_similarity(torch.randn(6, 5))
    with pytest.raises(ValueError, match="block_size"):
        member_similarity(w, block_size=0)


def test_connectivity_hand_case():
    # 4 latents; token 0 fires {0, 1}, token 1 fires {1, 2} -> co-firing pairs {0,1}, {1,2}: 2 of 6
    codes = codes_from_sets([[0, 1], [1, 2]], m=4)
    assert connectivity(codes) == pytest.approx(1 - 2 / 6)
    assert connectivity(codes, block_size=1) == pytest.approx(1 - 2 / 6)
    # duplicate index in a row ({3, 3}) is not a pair; a lone latent is not a pair
    dup = codes_from_sets([[0, 1], [1, 2], [3, 3], [0]], m=4)
    assert connectivity(dup, block_size=3) == pytest.approx(1 - 2 / 6)
    # adding token {0, 2, 3} adds pairs {0,2}, {0,3}, {2,3} -> 5 of 6
    more = codes_from_sets([[0, 2, 3]], m=4)
    assert connectivity([codes, more], block_size=3) == pytest.approx(1 - 5 / 6)
    # nothing co-fires -> 1.0
    assert connectivity(codes_from_sets([[0], [1], []], m=4)) == 1.0


def test_connectivity_member_major_global_indices():
    # J = 2, M = 2: global latents 0,1 (member 0), 2,3 (member 1).
    # token 0: member0 local 1 (g1), member1 local 0 (g2) -> pair {1, 2}
    # token 1: member0 local 0 (g0), member1 zero-valued slot on local 1 (g3, must not fire) -> no pair
    vals = torch.tensor([[[1.0], [1.0]], [[1.0], [0.0]]])
    idx = torch.tensor([[[1], [0]], [[0], [1]]])
    assert connectivity(SparseCodes(vals, idx, 2), block_size=1) == pytest.approx(1 - 1 / 6)


@pytest.mark.parametrize("block_size", [1, 3, 5, None])
def test_connectivity_vs_brute_force(block_size):
    gen = torch.Generator().manual_seed(5)
    # varying K across batches; m = 2 * 13 = 26, sparse enough that connectivity is strictly in (0, 1)
    batches = [random_codes(6, 2, 13, k, gen) for k in (1, 2, 1)]
    ref = ref_connectivity(batches)
    assert 0 < ref < 1
    assert connectivity(batches, block_size=block_size) == pytest.approx(ref)
    assert connectivity(iter(batches), block_size=block_size) == pytest.approx(ref)


def test_connectivity_small_join_chunks(monkeypatch):
    # force the sparse join to run over many small chunks of firing entries within each block
    import saefast.eval.metrics as metrics

    gen = torch.Generator().manual_seed(6)
    batches = [random_codes(20, 3, 7, 3, gen, p_zero=0.5) for _ in range(2)]
    ref = ref_connectivity(batches)
    monkeypatch.setattr(metrics, "_JOIN_CHUNK_ELEMENTS", 10)
    assert connectivity(batches, block_size=4) == pytest.approx(ref)
    assert connectivity(batches) == pytest.approx(ref)


def test_connectivity_edge_cases_and_errors():
    single = SparseCodes(torch.ones(3, 1, 1), torch.zeros(3, 1, 1, dtype=torch.int64), 1)
    assert connectivity(single) == 1.0  # m = 1: no pairs
    with pytest.raises(ValueError, match="empty"):
        connectivity([])
    with pytest.raises(ValueError, match="same J and M"):
        connectivity([codes_from_sets([[0, 1]], 4), codes_from_sets([[0, 1]], 5)])
    with pytest.raises(ValueError, match="token"):
        connectivity(SparseCodes(torch.zeros(0, 1, 1), torch.zeros(0, 1, 1, dtype=torch.int64), 4))
    with pytest.raises(ValueError, match="block_size"):
        connectivity(codes_from_sets([[0, 1]], 4), block_size=0)


def test_dictionary_errors():
    with pytest.raises(ValueError, match="dict_b has D"):
        relaxed_stability(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="empty"):
        max_abs_cosine_to_others(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"\[m, D\]"):
        diversity(torch.zeros(4))
    with pytest.raises(ValueError, match="block_size"):
        diversity(torch.randn(4, 3), block_size=-1)


def test_default_block_size_bounds_memory():
    for m in (1, 1000, 131_072, 10**7):
        bs = _default_block_size(m)
        assert bs >= 1
        assert bs * m * 4 <= 256 * 2**20 or bs == 1
    assert _default_block_size(131_072) == 512


def test_brute_force_reference_on_hand_case():
    # the reference itself must reproduce the hand-derived value (1 - 2/6), else it proves nothing
    assert ref_connectivity([codes_from_sets([[0, 1], [1, 2]], m=4)]) == pytest.approx(2 / 3)
