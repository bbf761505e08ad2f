"""saefast.ops.ref, the eager oracle every kernel is tested against, on hand-computed cases: the sparse decode, the
pre-activations, JumpReLU's activation, L0 and straight-through gradients, and the geometric median."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import T, assert_close

from saefast.ops import ref
from saefast.ops.codes import SparseCodes


def test_decode_sparse_sums_alpha_weighted_member_outputs_and_biases():
    # J=2 members, M=3 latents, D=2; token 0 uses a repeated index in member 1 (contributions add up).
    W_dec = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                          [[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]]])
    b_dec = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    values = torch.tensor([[[2.0, 1.0], [1.0, 3.0]], [[0.0, 4.0], [0.5, 0.0]]])
    indices = torch.tensor([[[0, 2], [1, 1]], [[1, 2], [2, 0]]])
    codes = SparseCodes(values, indices, n_latents=3)
    # token 0: member 0 = 2·[1,0] + 1·[1,1] = [3,1]; member 1 = 1·[0,2] + 3·[0,2] = [0,8]
    # token 1: member 0 = 4·[1,1] = [4,4];             member 1 = 0.5·[1,-1] = [0.5,-0.5]
    alpha = torch.tensor([0.25, 2.0])
    expected = torch.tensor([
        [0.25 * (3 + 0.5) + 2.0 * (0 + 0), 0.25 * (1 + 0) + 2.0 * (8 - 1)],
        [0.25 * (4 + 0.5) + 2.0 * (0.5 + 0), 0.25 * (4 + 0) + 2.0 * (-0.5 - 1)],
    ])
    torch.testing.assert_close(ref.decode_sparse(codes, W_dec, b_dec, alpha), expected)
    # A shared bias [1, D] (one SAE whose groups add up) is added once, unscaled.
    shared = ref.decode_sparse(codes, W_dec, b_dec[:1], 1.0)
    torch.testing.assert_close(shared, torch.tensor([[3.5, 9.0], [4.5 + 0.5, 3.5]]))


def test_pre_activations_shared_and_per_member_inputs_agree():
    J, M, D, N = 3, 5, 4, 6
    W_enc, b_enc, b_dec = torch.randn(J, M, D), torch.randn(J, M), torch.randn(J, D)
    x = torch.randn(N, D)
    expected = torch.stack([(x - b_dec[j]) @ W_enc[j].T + b_enc[j] for j in range(J)], dim=1)
    torch.testing.assert_close(ref.pre_activations(x, W_enc, b_enc, b_dec), expected, atol=1e-5, rtol=1e-5)
    per_member = x.unsqueeze(1).expand(N, J, D)
    torch.testing.assert_close(ref.pre_activations(per_member, W_enc, b_enc, b_dec), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combine", ["bagging", "boosting"])
def test_decode_sparse_is_the_models_decode(combine):
    import saefast as sf

    model = sf.Ensemble(sf.SAEConfig(d_in=10, n_latents=14, k=3), members=3, combine=combine, seed=2)
    with torch.no_grad():
        model.b_dec.copy_(torch.randn(3, 10))
    codes = model.encode(torch.randn(7, 10))
    expected = ref.decode_sparse(codes, model.W_dec, model.b_dec, model.alpha)
    torch.testing.assert_close(model.decode(codes), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(codes.to_dense()), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# JumpReLU
# ------------------------------------------------------------------------------------------------------

# theta per latent and pre-activations chosen to straddle theta inside / outside the band (eps = 0.1)
THETA = [0.5, 1.0, 0.2, 0.8]
PRE = [
    [0.47, 0.50, -0.30, 0.76],  # in-band below | outside below | outside | in-band below
    [0.53, 1.04, 0.10, 0.86],  # in-band above | in-band above | outside (u = -1) | outside above (u = 0.6)
    [0.90, 0.96, 0.22, 0.70],  # outside above | in-band below | in-band above | outside below (u = -1)
]
EPS = 0.1


def _kernel(pre: float, theta: float, eps: float) -> float:
    return 1.0 if abs(pre - theta) / eps <= 0.5 else 0.0


def test_jumprelu_activation_forward_and_ste_backward():
    pre = torch.tensor(PRE, dtype=torch.float64).unsqueeze(1).requires_grad_()  # [N=3, J=1, M=4]
    theta = torch.tensor([THETA], dtype=torch.float64, requires_grad=True)  # [J=1, M=4]
    z = ref.jumprelu_activation(pre, theta, EPS)
    exp_z = [[v if v > THETA[i] else 0.0 for i, v in enumerate(row)] for row in PRE]
    assert_close(z[:, 0], T(exp_z), atol=0)
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.7, 1.5, -1.0, 2.0], [-0.3, 0.9, 1.1, -4.0]], dtype=torch.float64)
    z.backward(g.unsqueeze(1))
    exp_gpre = [[g[n, i].item() * (1.0 if PRE[n][i] > THETA[i] else 0.0) for i in range(4)] for n in range(3)]
    assert_close(pre.grad[:, 0], T(exp_gpre), atol=1e-12)
    exp_gtheta = [
        sum(g[n, i].item() * (-THETA[i] / EPS) * _kernel(PRE[n][i], THETA[i], EPS) for n in range(3)) for i in range(4)
    ]
    # every latent has at least one in-band value, latent 0 and 1 two of them
    assert all(v != 0 for v in exp_gtheta)
    assert_close(theta.grad[0], T(exp_gtheta), atol=1e-12)
    # explicit numbers for latent 0: in-band at n=0 (g=1) and n=1 (g=0.7): −(0.5/0.1)·(1 + 0.7)
    assert_close(theta.grad[0, 0], torch.tensor(-8.5, dtype=torch.float64), atol=1e-12)


def test_jumprelu_l0_value_and_threshold_gradient():
    pre = torch.tensor(PRE, dtype=torch.float64).unsqueeze(1).requires_grad_()
    theta = torch.tensor([THETA], dtype=torch.float64, requires_grad=True)
    l0 = ref.jumprelu_l0(pre, theta, EPS)
    exp = sum(1 for row in PRE for i, v in enumerate(row) if v > THETA[i]) / 3
    assert l0.shape == (1,)
    assert_close(l0, torch.tensor([exp], dtype=torch.float64), atol=1e-12)
    l0.sum().backward()
    exp_gtheta = [-(1 / EPS) * sum(_kernel(PRE[n][i], THETA[i], EPS) for n in range(3)) / 3 for i in range(4)]
    assert_close(theta.grad[0], T(exp_gtheta), atol=1e-12)
    assert pre.grad is None or (pre.grad == 0).all(), "the L0 step has no gradient w.r.t. pre"


def test_jumprelu_gradient_sums_over_members_and_tokens():
    # [N=2, J=2, M=2]: each (member, latent) threshold collects its own tokens' kernel terms
    pre = torch.tensor([[[0.51, 0.0], [0.3, 0.9]], [[0.48, 0.2], [0.33, 2.0]]], dtype=torch.float64)
    theta = torch.tensor([[0.5, 0.2], [0.3, 0.9]], dtype=torch.float64, requires_grad=True)
    ref.jumprelu_activation(pre, theta, 0.1).sum().backward()
    # member 0 latent 0: both tokens in band → 2·(−0.5/0.1); latent 1: token 1 at u=0 → −0.2/0.1
    # member 1 latent 0: u=0 and u=0.3 → 2·(−0.3/0.1); latent 1: u=0 only → −0.9/0.1
    expected = torch.tensor([[-10.0, -2.0], [-6.0, -9.0]], dtype=torch.float64)
    assert_close(theta.grad, expected, atol=1e-9)


# ------------------------------------------------------------------------------------------------------
# Geometric median (b_dec's initialisation)
# ------------------------------------------------------------------------------------------------------


def test_geometric_median_one_dimensional_is_the_median():
    pts = torch.tensor([[-1.0], [0.0], [0.5], [2.0], [1000.0]], dtype=torch.float64)
    assert_close(ref.geometric_median(pts), torch.tensor([0.5], dtype=torch.float64), atol=1e-4)
    assert ref.geometric_median(pts).dtype == torch.float64


def test_geometric_median_fermat_point_of_a_triangle():
    # isosceles triangle (−1, 0), (1, 0), (0, 3): every angle < 120°, the Fermat point is (0, 1/√3)
    pts = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float32)
    gm = ref.geometric_median(pts)
    assert gm.dtype == torch.float32
    assert_close(gm, torch.tensor([0.0, 1 / math.sqrt(3)]), atol=1e-4)
    # and it is not the mean (0, 1)
    assert abs(float(gm[1]) - 1.0) > 0.3


def test_geometric_median_symmetric_cross_is_its_centre():
    c = torch.tensor([2.0, -1.0, 0.5])
    offsets = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 3.0, 0], [0, -3.0, 0], [0, 0, 0.5], [0, 0, -0.5]])
    assert_close(ref.geometric_median(c + offsets), c, atol=1e-5)
