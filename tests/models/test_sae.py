"""saefast.models.sae and the training interface of saefast.models.dictionary: forward and backward of every SAE
architecture (TopK, BatchTopK, ReLU, JumpReLU; AuxK) against hand-derived values, the firing counters, and the
decoder, initialisation and b_dec steps of training.

Expected numbers are computed independently of saefast.ops.ref: explicit python loops over tokens and latents
(in float64 python floats) or closed-form gradients written out by hand. The models keep fp32 weights, so
model-level comparisons use atol ~1e-5. (The reference's own JumpReLU and geometric median are checked by hand in
tests/ops/test_ref.py.)
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import T, assert_close
from helpers import data as _data

import saefast as sf
from saefast.ops import ref
from saefast.ops.codes import SparseCodes

ALL = slice(None)


# ------------------------------------------------------------------------------------------------------
# Independent helpers (python loops, float64)
# ------------------------------------------------------------------------------------------------------


def make_sae(activation: str, d_in: int = 7, n_latents: int = 11, k: int = 3, seed: int = 0, **kw) -> sf.SAE:
    return sf.SAE(sf.SAEConfig(d_in=d_in, n_latents=n_latents, k=k, activation=activation, **kw), seed=seed)


def set_params(sae, **values) -> None:
    with torch.no_grad():
        for name, value in values.items():
            getattr(sae, name).copy_(value)


def random_params(sae, seed: int, b_enc_shift: float = 0.0, dec_norms: tuple[float, float] | None = None) -> dict:
    """Set W_enc, b_enc, W_dec, b_dec to explicit random values; returns them as float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    M, D = sae.W_enc.shape
    W_enc = torch.randn(M, D, generator=g) / math.sqrt(D)
    b_enc = 0.3 * torch.randn(M, generator=g) + b_enc_shift
    W_dec = torch.randn(M, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    if dec_norms is not None:
        lo, hi = dec_norms
        W_dec = W_dec * (lo + (hi - lo) * torch.rand(M, 1, generator=g))
    b_dec = 0.5 * torch.randn(D, generator=g)
    set_params(sae, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    return {name: getattr(sae, name).detach().double().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def hand_pre(x, W_enc, b_enc, b_dec) -> list[list[float]]:
    """pre[n][i] = Σ_d W_enc[i, d]·(x[n, d] − b_dec[d]) + b_enc[i], by explicit loops."""
    x, W_enc, b_enc, b_dec = (t.double().tolist() for t in (x, W_enc, b_enc, b_dec))
    out = []
    for xn in x:
        row = []
        for i in range(len(W_enc)):
            s = b_enc[i]
            for d in range(len(xn)):
                s += W_enc[i][d] * (xn[d] - b_dec[d])
            row.append(s)
        out.append(row)
    return out


def hand_topk(pre: list[list[float]], k: int) -> list[list[float]]:
    """Per row: ReLU of the k largest entries, 0 elsewhere."""
    out = []
    for row in pre:
        keep = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:k]
        out.append([max(row[i], 0.0) if i in keep else 0.0 for i in range(len(row))])
    return out


def hand_decode(z: list[list[float]], W_dec, b_dec) -> torch.Tensor:
    W_dec, b_dec = W_dec.double().tolist(), b_dec.double().tolist()
    out = []
    for zn in z:
        out.append([b_dec[d] + sum(zn[i] * W_dec[i][d] for i in range(len(zn))) for d in range(len(b_dec))])
    return torch.tensor(out, dtype=torch.float64)


data = functools.partial(_data, offset=0.7)


# ------------------------------------------------------------------------------------------------------
# TopK
# ------------------------------------------------------------------------------------------------------


def test_topk_forward_matches_hand_values():
    sae = make_sae("topk", d_in=7, n_latents=11, k=3)
    p = random_params(sae, seed=1)
    x = data(6, 7, seed=2)
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z = hand_topk(pre, 3)
    codes = sae.encode(x)
    assert codes.values.shape == (6, 1, 3) and codes.indices.shape == (6, 1, 3)
    assert codes.n_latents == 11
    assert_close(codes.to_dense(), T(z), atol=1e-5)
    assert_close(sae.reconstruct(x), hand_decode(z, p["W_dec"], p["b_dec"]), atol=1e-5)
    assert_close(sae.decode(codes), hand_decode(z, p["W_dec"], p["b_dec"]), atol=1e-5)
    assert_close(sae(x), sae.reconstruct(x), atol=0)


def test_topk_drops_negative_preactivations_among_the_k_largest():
    sae = make_sae("topk", d_in=5, n_latents=7, k=4)
    p = random_params(sae, seed=3, b_enc_shift=-1.5)  # most pre-activations negative
    x = data(9, 5, seed=4)
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z = hand_topk(pre, 4)
    n_neg_selected = sum(1 for row in pre for v in sorted(row, reverse=True)[:4] if v <= 0)
    assert n_neg_selected > 0, "test setup: some selected pre-activations must be negative"
    dense = sae.encode(x).to_dense()
    assert_close(dense, T(z), atol=1e-5)
    assert (dense >= 0).all()
    assert ((dense != 0).sum(1) <= 4).all()


def test_topk_l0_is_k_when_preactivations_are_positive():
    sae = make_sae("topk", d_in=9, n_latents=13, k=5)
    random_params(sae, seed=5, b_enc_shift=10.0)  # every pre-activation positive
    x = data(17, 9, seed=6)
    codes = sae.encode(x)
    dense = codes.to_dense()
    assert dense.shape == (17, 13)
    assert ((dense != 0).sum(1) == 5).all()
    assert (codes.l0() == 5).all()
    # training reports the same L0
    terms, _ = sae.training_terms(x, ALL)
    assert_close(terms.l0, torch.tensor([5.0]), atol=0)


def test_topk_backward_matches_hand_gradient():
    torch.manual_seed(11)
    sae = make_sae("topk", d_in=6, n_latents=10, k=3)
    p = random_params(sae, seed=7, b_enc_shift=-0.2)
    x = data(8, 6, seed=8)
    G = torch.randn(8, 6, dtype=torch.float64)
    (sae.reconstruct(x) * G.float()).sum().backward()

    W_enc, b_enc, W_dec, b_dec = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
    pre = T(hand_pre(x, W_enc, b_enc, b_dec))
    z = T(hand_topk(pre.tolist(), 3))
    selected = (z > 0).double()  # selected AND positive: where the gradient flows
    dz = G @ W_dec.T  # dL/dz[n, i] = G_n · W_dec[i]
    dpre = dz * selected
    xc = x.double() - b_dec
    exp_W_enc = dpre.T @ xc
    exp_b_enc = dpre.sum(0)
    exp_W_dec = z.T @ G
    exp_b_dec = G.sum(0) - (dpre @ W_enc).sum(0)
    assert_close(sae.W_enc.grad, exp_W_enc, atol=1e-4)
    assert_close(sae.b_enc.grad, exp_b_enc, atol=1e-5)
    assert_close(sae.W_dec.grad, exp_W_dec, atol=1e-4)
    assert_close(sae.b_dec.grad, exp_b_dec, atol=1e-4)
    never = selected.sum(0) == 0
    assert never.any(), "test setup: some latent must never be selected"
    assert (sae.W_enc.grad[never] == 0).all() and (sae.b_enc.grad[never] == 0).all()


def test_topk_backward_equals_autograd_of_explicit_masked_linear():
    sae = make_sae("topk", d_in=5, n_latents=9, k=2)
    random_params(sae, seed=9)
    x = data(7, 5, seed=10)
    G = torch.randn(7, 5)
    (sae.reconstruct(x) * G).sum().backward()
    # the same expression with a fixed (non-differentiable) mask: z = mask · relu(pre)
    W_enc = sae.W_enc.detach().clone().requires_grad_()
    b_enc = sae.b_enc.detach().clone().requires_grad_()
    W_dec = sae.W_dec.detach().clone().requires_grad_()
    b_dec = sae.b_dec.detach().clone().requires_grad_()
    pre = (x - b_dec) @ W_enc.T + b_enc
    mask = torch.zeros_like(pre)
    for n in range(7):
        order = sorted(range(9), key=lambda i: float(pre[n, i].detach()), reverse=True)[:2]
        mask[n, order] = 1.0
    xhat = (mask * torch.relu(pre)) @ W_dec + b_dec
    (xhat * G).sum().backward()
    for mine, theirs in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
        assert_close(mine.grad, theirs.grad, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# BatchTopK
# ------------------------------------------------------------------------------------------------------


def hand_batchtopk(pre: list[list[float]], k: int) -> tuple[list[list[float]], float]:
    """Keep the N·k largest ReLU'd entries of the whole batch; also the smallest positive kept value."""
    N, M = len(pre), len(pre[0])
    flat = sorted(((max(pre[n][i], 0.0), n, i) for n in range(N) for i in range(M)), reverse=True)[: N * k]
    z = [[0.0] * M for _ in range(N)]
    for v, n, i in flat:
        z[n][i] = v
    positive = [v for v, _, _ in flat if v > 0]
    return z, (min(positive) if positive else 0.0)


def test_batchtopk_training_mode_keeps_batch_topk():
    sae = make_sae("batchtopk", d_in=8, n_latents=12, k=2)
    p = random_params(sae, seed=12)
    # tokens of very different norms: top-k over the batch is NOT top-k per token
    x = data(6, 8, seed=13) * torch.tensor([[0.2], [3.0], [1.0], [0.5], [2.0], [1.0]])
    sae.train()
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z, _ = hand_batchtopk(pre, 2)
    counts = [sum(1 for v in row if v != 0) for row in z]
    assert sum(counts) == 12 and len(set(counts)) > 1, "test setup: rows must keep different counts"
    dense = sae.encode(x).to_dense()
    assert_close(dense, T(z), atol=1e-5)
    assert_close(sae.reconstruct(x), hand_decode(z, p["W_dec"], p["b_dec"]), atol=1e-5)


def test_batchtopk_threshold_first_update_then_ema():
    beta = 0.25
    sae = make_sae("batchtopk", d_in=6, n_latents=9, k=2, batchtopk_threshold_momentum=beta)
    p = random_params(sae, seed=14)
    assert (sae.threshold < 0).all(), "threshold starts unset (< 0)"
    sae.train()
    x1, x2 = data(5, 6, seed=15), data(7, 6, seed=16, scale=2.0)
    _, s1 = hand_batchtopk(hand_pre(x1, p["W_enc"], p["b_enc"], p["b_dec"]), 2)
    _, s2 = hand_batchtopk(hand_pre(x2, p["W_enc"], p["b_enc"], p["b_dec"]), 2)
    assert s1 > 0 and abs(s1 - s2) > 1e-3
    sae.training_terms(x1, ALL)
    assert_close(sae.threshold, torch.full((9,), s1), atol=1e-6)
    sae.training_terms(x2, ALL)
    assert_close(sae.threshold, torch.full((9,), (1 - beta) * s1 + beta * s2), atol=1e-6)


def test_batchtopk_after_train_uses_threshold_in_eval_mode():
    sae = make_sae("batchtopk", d_in=7, n_latents=10, k=2)
    batches = [data(16, 7, seed=s) for s in range(3)]
    sf.train(sae, batches, steps=3, lr=1e-2, progress=False)
    assert not sae.training
    assert (sae.threshold >= 0).all() and (sae.threshold > 0).any()
    x = data(9, 7, seed=20, scale=1.5)
    p = {n: getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    theta = sae.threshold.double().tolist()
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z = [[v if v > theta[i] else 0.0 for i, v in enumerate(row)] for row in pre]
    assert_close(sae.encode(x).to_dense(), T(z), atol=1e-5)
    assert_close(sae.reconstruct(x), hand_decode(z, p["W_dec"], p["b_dec"]), atol=1e-5)


def test_batchtopk_eval_threshold_set_by_hand():
    sae = make_sae("batchtopk", d_in=6, n_latents=8, k=2)
    p = random_params(sae, seed=21)
    theta = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.25]
    set_params(sae, threshold=torch.tensor(theta))
    sae.eval()
    x = data(11, 6, seed=22)
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z = [[v if v > theta[i] else 0.0 for i, v in enumerate(row)] for row in pre]
    assert_close(sae.encode(x).to_dense(), T(z), atol=1e-5)
    # in training mode the same model uses batch top-k instead
    sae.train()
    zb, _ = hand_batchtopk(pre, 2)
    assert_close(sae.encode(x).to_dense(), T(zb), atol=1e-5)


def test_batchtopk_eval_without_threshold_falls_back_to_batch_topk():
    sae = make_sae("batchtopk", d_in=6, n_latents=8, k=3)
    p = random_params(sae, seed=23)
    sae.eval()
    x = data(5, 6, seed=24)
    zb, _ = hand_batchtopk(hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"]), 3)
    assert_close(sae.encode(x).to_dense(), T(zb), atol=1e-5)


def test_batchtopk_backward_flows_only_through_kept_entries():
    sae = make_sae("batchtopk", d_in=6, n_latents=9, k=2)
    p = random_params(sae, seed=25)
    sae.train()
    x = data(5, 6, seed=26)
    G = torch.randn(5, 6, dtype=torch.float64)
    (sae.reconstruct(x) * G.float()).sum().backward()
    z, _ = hand_batchtopk(hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"]), 2)
    z = T(z)
    dpre = (G @ p["W_dec"].T) * (z > 0).double()
    assert_close(sae.W_enc.grad, dpre.T @ (x.double() - p["b_dec"]), atol=1e-4)
    assert_close(sae.b_enc.grad, dpre.sum(0), atol=1e-5)
    assert_close(sae.W_dec.grad, z.T @ G, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# ReLU
# ------------------------------------------------------------------------------------------------------


def test_relu_forward_and_decoder_norm_weighted_l1():
    lam = 0.07
    sae = make_sae("relu", d_in=7, n_latents=10, l1_coef=lam)
    p = random_params(sae, seed=30, dec_norms=(0.4, 2.5))
    norms = p["W_dec"].norm(dim=1)
    assert (norms - 1).abs().max() > 0.3, "test setup: decoder rows must not be unit norm"
    x = data(9, 7, seed=31)
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z = [[max(v, 0.0) for v in row] for row in pre]
    assert any(v == 0 for row in z for v in row) and any(v > 0 for row in z for v in row)
    assert_close(sae.encode(x).to_dense(), T(z), atol=1e-5)
    xhat = hand_decode(z, p["W_dec"], p["b_dec"])
    assert_close(sae.reconstruct(x), xhat, atol=1e-5)

    sae.train()
    terms, zz = sae.training_terms(x, ALL)
    l1 = lam * sum(z[n][i] * float(norms[i]) for n in range(9) for i in range(10)) / 9
    xd = x.double()
    fvu = ((xd - xhat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert_close(terms.sparsity, torch.tensor([l1]), atol=1e-6)
    assert_close(terms.fvu, fvu.reshape(1), atol=1e-6)
    assert_close(terms.aux, torch.zeros(1), atol=0)
    assert_close(terms.loss, fvu + l1, atol=1e-6)
    assert_close(zz[:, 0], T(z), atol=1e-5)
    # the unweighted L1 would differ: the weighting is really applied
    assert abs(l1 - lam * sum(map(sum, z)) / 9) > 1e-3


def test_relu_loss_gradient_matches_hand_formula():
    lam = 0.05
    sae = make_sae("relu", d_in=6, n_latents=8, l1_coef=lam)
    p = random_params(sae, seed=32, dec_norms=(0.5, 2.0))
    x = data(10, 6, seed=33)
    sae.train()
    terms, _ = sae.training_terms(x, ALL)
    terms.loss.backward()
    W_enc, W_dec, b_dec = p["W_enc"], p["W_dec"], p["b_dec"]
    pre = T(hand_pre(x, W_enc, p["b_enc"], b_dec))
    z = pre.clamp_min(0)
    xd = x.double()
    xhat = z @ W_dec + b_dec
    V = ((xd - xd.mean(0)) ** 2).sum()
    N = 10
    dxhat = 2 * (xhat - xd) / V
    norms = W_dec.norm(dim=1)
    dz = dxhat @ W_dec.T + lam * norms / N
    dpre = dz * (pre > 0).double()
    exp_W_dec = z.T @ dxhat + lam / N * z.sum(0)[:, None] * W_dec / norms[:, None]
    exp_W_enc = dpre.T @ (xd - b_dec)
    exp_b_enc = dpre.sum(0)
    exp_b_dec = dxhat.sum(0) - (dpre @ W_enc).sum(0)
    assert_close(sae.W_dec.grad, exp_W_dec, atol=1e-5)
    assert_close(sae.W_enc.grad, exp_W_enc, atol=1e-5)
    assert_close(sae.b_enc.grad, exp_b_enc, atol=1e-5)
    assert_close(sae.b_dec.grad, exp_b_dec, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# JumpReLU
# ------------------------------------------------------------------------------------------------------

def test_jumprelu_model_forward_and_backward():
    eps, lam = 0.3, 0.05
    sae = make_sae("jumprelu", d_in=6, n_latents=9, jumprelu_bandwidth=eps, l0_coef=lam)
    p = random_params(sae, seed=40)
    g = torch.Generator().manual_seed(41)
    theta = (0.2 + 0.6 * torch.rand(9, generator=g)).double()
    set_params(sae, log_threshold=theta.log().float())
    theta = sae.log_threshold.detach().double().exp()
    x = data(16, 6, seed=42)
    pre = T(hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"]))
    above = (pre > theta).double()
    z = pre * above
    inband = ((pre - theta).abs() / eps <= 0.5).double()
    assert inband.sum() >= 5, "test setup: need pre-activations inside the STE band"
    assert_close(sae.encode(x).to_dense(), z, atol=1e-5)
    xd = x.double()
    xhat = z @ p["W_dec"] + p["b_dec"]
    assert_close(sae.reconstruct(x), xhat, atol=1e-5)

    sae.train()
    terms, _ = sae.training_terms(x, ALL)
    N = 16
    V = ((xd - xd.mean(0)) ** 2).sum()
    fvu = ((xd - xhat) ** 2).sum() / V
    l0 = above.sum() / N
    assert_close(terms.fvu, fvu.reshape(1), atol=1e-6)
    assert_close(terms.sparsity, (lam * l0).reshape(1), atol=1e-6)
    assert_close(terms.l0, l0.reshape(1), atol=1e-6)
    assert_close(terms.loss, fvu + lam * l0, atol=1e-6)
    terms.loss.backward()
    dz = (2 * (xhat - xd) / V) @ p["W_dec"].T  # ∂fvu/∂z[n, i]
    dtheta = (dz * (-theta / eps) * inband).sum(0) + lam * (-(1 / eps) * inband.sum(0) / N)
    assert_close(sae.log_threshold.grad, theta * dtheta, atol=1e-5)  # d/dlogθ = θ·d/dθ
    dpre = dz * above  # the L0 step contributes nothing to pre
    assert_close(sae.W_enc.grad, dpre.T @ (xd - p["b_dec"]), atol=1e-5)
    assert_close(sae.b_enc.grad, dpre.sum(0), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# AuxK
# ------------------------------------------------------------------------------------------------------


def _auxk_setup(aux_k: int, dead: list[int], activation: str = "topk"):
    sae = make_sae(activation, d_in=8, n_latents=13, k=2, aux_k=aux_k, dead_after_tokens=5, aux_coef=0.5)
    p = random_params(sae, seed=50)
    counters = torch.zeros(13, dtype=torch.int64)
    counters[dead] = 5
    counters[[i for i in range(13) if i not in dead][:3]] = 4  # just below the limit: alive
    set_params(sae, tokens_since_fired=counters)
    x = data(10, 8, seed=51)
    return sae, p, x


def _hand_aux(p, x, dead: list[int], aux_k: int, k: int = 2):
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z = hand_topk(pre, k)
    xhat = hand_decode(z, p["W_dec"], p["b_dec"])
    e = x.double() - xhat
    zaux = []
    for row in pre:
        keep = sorted(dead, key=lambda i: row[i], reverse=True)[:aux_k]
        zaux.append([max(row[i], 0.0) if i in keep else 0.0 for i in range(len(row))])
    ehat = hand_decode(zaux, p["W_dec"], torch.zeros_like(p["b_dec"]))
    aux = ((e - ehat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    fvu = (e**2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
    return float(aux), float(fvu), zaux


def test_auxk_loss_matches_hand_value():
    dead = [1, 4, 6, 9, 11]
    sae, p, x = _auxk_setup(aux_k=3, dead=dead)
    aux, fvu, zaux = _hand_aux(p, x, dead, aux_k=3)
    assert any(v > 0 for row in zaux for v in row)
    terms, _ = sae.training_terms(x, ALL)
    assert_close(terms.aux, torch.tensor([aux]), atol=1e-5)
    assert_close(terms.fvu, torch.tensor([fvu]), atol=1e-5)
    assert_close(terms.loss, torch.tensor(fvu + 0.5 * aux), atol=1e-5)


def test_auxk_with_fewer_dead_latents_than_aux_k_uses_those():
    dead = [3, 7]
    sae, p, x = _auxk_setup(aux_k=5, dead=dead)
    aux, _, _ = _hand_aux(p, x, dead, aux_k=5)
    terms, _ = sae.training_terms(x, ALL)
    assert_close(terms.aux, torch.tensor([aux]), atol=1e-5)


def test_auxk_batchtopk_also_uses_dead_latents():
    dead = [0, 2, 5, 12]
    sae, p, x = _auxk_setup(aux_k=2, dead=dead, activation="batchtopk")
    sae.train()
    pre = hand_pre(x, p["W_enc"], p["b_enc"], p["b_dec"])
    z, _ = hand_batchtopk(pre, 2)
    e = x.double() - hand_decode(z, p["W_dec"], p["b_dec"])
    zaux = []
    for row in pre:
        keep = sorted(dead, key=lambda i: row[i], reverse=True)[:2]
        zaux.append([max(row[i], 0.0) if i in keep else 0.0 for i in range(13)])
    ehat = hand_decode(zaux, p["W_dec"], torch.zeros_like(p["b_dec"]))
    aux = ((e - ehat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    terms, _ = sae.training_terms(x, ALL)
    assert_close(terms.aux, aux.reshape(1), atol=1e-5)


def test_auxk_is_zero_without_dead_latents():
    sae, p, x = _auxk_setup(aux_k=3, dead=[])
    terms, _ = sae.training_terms(x, ALL)
    assert_close(terms.aux, torch.zeros(1), atol=0)
    _, fvu, _ = _hand_aux(p, x, [], aux_k=3)
    assert_close(terms.loss, torch.tensor(fvu), atol=1e-5)


def test_auxk_gradient_reaches_dead_latents():
    dead = [1, 4, 6, 9, 11]
    sae, p, x = _auxk_setup(aux_k=3, dead=dead)
    terms, codes = sae.training_terms(x, ALL)
    z = codes.to_dense().view(x.shape[0], 1, -1)
    terms.loss.backward()
    alive_unselected = [i for i in range(13) if i not in dead and not bool((z[:, 0, i] != 0).any())]
    aux_used = [i for i in dead if bool((z[:, 0, i] == 0).all())]
    grads = sae.b_enc.grad
    assert any(grads[i] != 0 for i in aux_used), "dead latents get gradient from the AuxK term"
    assert all(grads[i] == 0 for i in alive_unselected)


def test_record_firing_counts_tokens_since_fired():
    sae = make_sae("topk", d_in=5, n_latents=7, k=2)
    set_params(sae, tokens_since_fired=torch.tensor([0, 3, 10, 0, 2, 1, 100]))
    z = torch.zeros(4, 1, 7)
    z[0, 0, 1] = 0.5
    z[3, 0, 6] = 2.0
    z[2, 0, 2] = -1.0  # any non-zero counts as firing
    sae.record_firing_(z, ALL)
    assert sae.tokens_since_fired.tolist() == [4, 0, 0, 4, 6, 5, 0]
    # the same firing pattern as sparse codes (padding slots of value 0 never count)
    set_params(sae, tokens_since_fired=torch.tensor([0, 3, 10, 0, 2, 1, 100]))
    sae.record_firing_(SparseCodes.from_dense(z), ALL)
    assert sae.tokens_since_fired.tolist() == [4, 0, 0, 4, 6, 5, 0]


def test_training_updates_tokens_since_fired():
    sae = make_sae("topk", d_in=6, n_latents=20, k=1)
    x = data(3, 6, seed=55)
    sf.train(sae, [x], steps=1, lr=1e-3, progress=False)
    # with N=3 and k=1 at most 3 latents fire; the others count the 3 tokens
    counts = sae.tokens_since_fired.tolist()
    assert sorted(set(counts)) == [0, 3]
    assert 1 <= counts.count(0) <= 3


# ------------------------------------------------------------------------------------------------------
# Decoder, initialisation, b_dec
# ------------------------------------------------------------------------------------------------------


def test_initialisation_encoder_equals_decoder_and_unit_rows():
    sae = make_sae("topk", d_in=9, n_latents=14, k=3, seed=4)
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert_close(sae.W_dec.norm(dim=1), torch.ones(14), atol=1e-6)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    again = make_sae("topk", d_in=9, n_latents=14, k=3, seed=4)
    other = make_sae("topk", d_in=9, n_latents=14, k=3, seed=5)
    assert torch.equal(sae.W_dec, again.W_dec)
    assert not torch.equal(sae.W_dec, other.W_dec)
    j = make_sae("jumprelu", d_in=9, n_latents=14, jumprelu_init_threshold=0.25)
    assert_close(j.log_threshold.exp(), torch.full((14,), 0.25), atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
def test_decoder_rows_unit_norm_after_training(normalize):
    sae = make_sae("topk", d_in=7, n_latents=12, k=3, normalize_decoder=normalize)
    batches = [data(16, 7, seed=s, scale=3.0) for s in range(3)]
    sf.train(sae, batches, steps=4, lr=5e-2, progress=False)
    norms = sae.W_dec.detach().norm(dim=1)
    if normalize:
        assert_close(norms, torch.ones(12), atol=1e-6)
    else:
        assert (norms - 1).abs().max() > 1e-3  # without normalisation the rows drift


def test_project_decoder_grad_removes_parallel_component():
    sae = make_sae("relu", d_in=6, n_latents=9)
    g = torch.Generator().manual_seed(60)
    W = torch.randn(9, 6, generator=g) * (0.5 + torch.rand(9, 1, generator=g))  # rows of assorted norms
    grad = torch.randn(9, 6, generator=g)
    set_params(sae, W_dec=W)
    sae.W_dec.grad = grad.clone()
    sae.project_decoder_grad_(ALL)
    after = sae.W_dec.grad.double()
    Wd = W.double()
    assert_close((after * Wd).sum(1), torch.zeros(9, dtype=torch.float64), atol=1e-6)
    unit = Wd / Wd.norm(dim=1, keepdim=True)
    expected = grad.double() - (grad.double() * unit).sum(1, keepdim=True) * unit
    assert_close(after, expected, atol=1e-6)
    assert torch.equal(sae.W_dec.detach(), W), "the weights themselves are not touched"

    off = make_sae("relu", d_in=6, n_latents=9, normalize_decoder=False)
    off.W_dec.grad = grad.clone()
    off.project_decoder_grad_(ALL)
    assert torch.equal(off.W_dec.grad, grad)


def test_normalize_decoder_rows():
    sae = make_sae("relu", d_in=5, n_latents=7)
    W = torch.randn(7, 5) * torch.arange(1, 8).float()[:, None]
    set_params(sae, W_dec=W)
    sae.normalize_decoder_(ALL)
    assert_close(sae.W_dec.detach(), W / W.norm(dim=1, keepdim=True), atol=1e-6)


def test_init_b_dec_mean_and_geometric_median_direct():
    x = data(21, 6, seed=61)
    sae = make_sae("topk", d_in=6, n_latents=8, k=2, b_dec_init="mean")
    assert not bool(sae.b_dec_initialized)
    sae.init_b_dec_(x, ALL)
    assert_close(sae.b_dec, x.double().mean(0), atol=1e-6)
    assert bool(sae.b_dec_initialized)
    gm = make_sae("topk", d_in=6, n_latents=8, k=2, b_dec_init="geometric_median")
    gm.init_b_dec_(x, ALL)
    assert_close(gm.b_dec, ref.geometric_median(x), atol=1e-6)
    z = make_sae("topk", d_in=6, n_latents=8, k=2, b_dec_init="zeros")
    set_params(z, b_dec=torch.ones(6))
    z.init_b_dec_(x, ALL)
    assert (z.b_dec == 0).all()


def test_training_starts_b_dec_from_data_mean():
    x = data(32, 7, seed=62, scale=2.0) + torch.arange(7.0)
    sae = make_sae("topk", d_in=7, n_latents=10, k=2, b_dec_init="mean")
    lr = 1e-7
    sf.train(sae, [x], steps=1, lr=lr, progress=False)
    # one Adam step moves every entry by at most ~lr
    assert_close(sae.b_dec, x.double().mean(0), atol=3 * lr + 1e-6)
    assert bool(sae.b_dec_initialized)
    # b_dec is initialised once: a second run does not reset it to the new batch's mean
    set_params(sae, b_dec=torch.full((7,), 5.0))
    sf.train(sae, [x], steps=1, lr=lr, progress=False)
    assert_close(sae.b_dec, torch.full((7,), 5.0), atol=3 * lr + 1e-6)
