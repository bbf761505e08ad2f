"""Fused encode → top-k kernel against the eager oracle: ``ref.pre_activations`` in float64 + ``torch.topk``.

Comparisons never depend on ties: the returned values must equal the reference's sorted top-k values, and the
reference pre-activation at every returned index must equal the returned value (so a wrong index fails even when
the values match). Without a GPU the kernel runs under Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close

from saefast import ref
from saefast.codes import SparseCodes
from saefast.kernels import topk_encode as te
from saefast.kernels.topk_encode import threshold_encode, topk_encode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _problem(N, D, J, M, dtype=torch.float32, shift=0.0):
    """Inputs, the folded fp32 bias the kernel gets (as its caller computes it) and the float64 reference ``pre``."""
    x = torch.randn(N, D).to(dtype)
    W_enc = (torch.randn(J, M, D) / D**0.5).to(dtype)
    b_enc = torch.randn(J, M) + shift
    b_dec = torch.randn(1, D)
    bias = b_enc - torch.einsum("jd,jmd->jm", b_dec.expand(J, D), W_enc.float())
    pre = ref.pre_activations(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    return x.to(DEVICE), W_enc.to(DEVICE), bias.to(DEVICE), pre


def _tol(pre):
    # fp32 accumulation of D products: errors ~ 1e-6 of the largest magnitude; wrong latents differ by ~1e-1.
    return 1e-5 * (1.0 + float(pre[torch.isfinite(pre)].abs().max()))


def _check_sorted_selection(values, indices, candidates, pre, count, msg=""):
    """``values [.., count]`` are the ``count`` largest of ``candidates`` (= ``pre`` or a masked copy), sorted
    descending, and ``pre`` at ``indices`` equals ``values``; the indices are distinct latents."""
    M = pre.shape[-1]
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert not torch.isnan(values).any(), f"{msg} unwritten (NaN) value"
    assert ((indices >= 0) & (indices < M)).all(), f"{msg} index out of [0, M) (-1 = unwritten)"
    if count > 1:
        assert (values[..., :-1] >= values[..., 1:]).all(), f"{msg} values not sorted descending"
        srt = indices.sort(-1).values
        assert (srt[..., 1:] != srt[..., :-1]).all(), f"{msg} repeated index in a row"
    tol = _tol(pre)
    expected = candidates.topk(count, dim=-1).values
    assert_close(values, expected, atol=tol, rtol=1e-5, msg=f"{msg} top-k values")
    assert_close(values, pre.gather(-1, indices.cpu()), atol=tol, rtol=1e-5, msg=f"{msg} pre at returned indices")


def _check_aux(aux_values, aux_indices, pre, dead, aux_k):
    """Per member: the dead latents' top ``aux_k`` (real slots), then ``-inf`` with index 0; and the AuxK decode
    of ReLU(aux) equals ``ref.auxk_reconstruction``'s."""
    N, J, M = pre.shape
    assert aux_values.shape == aux_indices.shape == (N, J, aux_k)
    aux_values, aux_indices, dead = aux_values.cpu(), aux_indices.cpu(), dead.cpu()
    n_dead = dead.sum(-1)
    for j in range(J):
        real = min(aux_k, int(n_dead[j]))
        v, i = aux_values[:, j, :real], aux_indices[:, j, :real]
        masked = pre[:, j].masked_fill(~dead[j], float("-inf"))
        _check_sorted_selection(v, i, masked, pre[:, j], real, msg=f"aux member {j}")
        assert dead[j, i].all(), f"aux member {j} selected a live latent"
        assert (aux_values[:, j, real:] == float("-inf")).all(), f"aux member {j}: slots past its dead latents"
        assert (aux_indices[:, j, real:] == 0).all()
    W_dec = torch.randn(J, M, 5, dtype=torch.float64)
    codes = SparseCodes(aux_values.double().clamp_min(0.0), aux_indices, M)
    ours = ref.decode_members_sparse(codes, W_dec)
    expected = ref.auxk_reconstruction(pre, dead, W_dec, aux_k)
    if expected is None:  # no member has a dead latent: every slot is -inf, i.e. a zero reconstruction
        assert (ours == 0).all()
        return
    # The selected set is tie-free only where the aux_k-th and next dead pre-activations differ beyond rounding.
    masked = pre.masked_fill(~dead, float("-inf"))
    if aux_k < M:
        edge = masked.topk(aux_k + 1, dim=-1).values
        clear = ~((edge[..., -2] - edge[..., -1]) <= _tol(pre))
        assert clear.float().mean() > 0.5
        ours, expected = ours[clear], expected[clear]
    assert_close(ours, expected, atol=1e-4 * (1.0 + float(expected.abs().max())), msg="AuxK reconstruction")


# (N, D, M, k, J): every N ∈ {1, 9, 40}, D ∈ {3, 37, 64}, M ∈ {8, 50, 130}, k ∈ {1, 8, 32} and J ∈ {1, 3} meet
# every other; plus k = M and k not a power of two.
SHAPES = [
    (1, 3, 8, 1, 1), (1, 37, 130, 32, 3), (1, 64, 50, 8, 1),
    (9, 3, 50, 8, 3), (9, 37, 8, 8, 1), (9, 64, 130, 1, 3), (9, 37, 50, 50, 1),
    (40, 3, 130, 8, 1), (40, 37, 50, 32, 3), (40, 64, 8, 1, 3), (40, 64, 130, 32, 3), (40, 37, 130, 5, 1),
]


@pytest.mark.parametrize("N,D,M,k,J", SHAPES)
def test_topk_matches_reference(N, D, M, k, J):
    x, W_enc, bias, pre = _problem(N, D, J, M)
    values, indices, aux_values, aux_indices = topk_encode(x, W_enc, bias, k)
    assert values.shape == indices.shape == (N, J, k)
    assert aux_values is None and aux_indices is None
    _check_sorted_selection(values.cpu(), indices.cpu(), pre, pre, k)


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide blocks (BLOCK_M = KP when larger): several row blocks, latent tiles and D chunks, all ragged."""
    monkeypatch.setattr(te, "_block_sizes", lambda N, M, D, kp, *_: (16, max(16, kp), 16, 4))


@pytest.mark.parametrize("N,D,M,k,J", [(40, 37, 130, 8, 3), (33, 20, 130, 32, 2), (17, 64, 50, 1, 1)])
def test_topk_merges_across_tiles(small_blocks, N, D, M, k, J):
    x, W_enc, bias, pre = _problem(N, D, J, M)
    values, indices, _, _ = topk_encode(x, W_enc, bias, k)
    _check_sorted_selection(values.cpu(), indices.cpu(), pre, pre, k)


def _dead_masks(J, M):
    """Some dead (member 0: 3 latents, fewer than aux_k), none (member 1), all (member 2), random (member 3)."""
    dead = torch.zeros(J, M, dtype=torch.bool)
    dead[0, torch.randperm(M)[:3]] = True
    dead[2] = True
    dead[3] = torch.rand(M) < 0.3
    return dead


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("N,D,M,k,aux_k", [(9, 37, 130, 8, 8), (40, 20, 50, 32, 16), (5, 3, 8, 1, 8)])
def test_aux_topk_of_dead_latents(request, blocks, N, D, M, k, aux_k):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    J = 4
    x, W_enc, bias, pre = _problem(N, D, J, M)
    dead = _dead_masks(J, M)
    values, indices, aux_values, aux_indices = topk_encode(x, W_enc, bias, k, dead=dead.to(DEVICE), aux_k=aux_k)
    _check_sorted_selection(values.cpu(), indices.cpu(), pre, pre, k)
    _check_aux(aux_values, aux_indices, pre, dead, aux_k)


@pytest.mark.parametrize("n_dead", ["none", "all"])
def test_aux_with_no_or_all_dead_latents(n_dead):
    N, D, M, J, aux_k = 9, 16, 50, 2, 8
    x, W_enc, bias, pre = _problem(N, D, J, M)
    dead = torch.full((J, M), n_dead == "all")
    _, _, aux_values, aux_indices = topk_encode(x, W_enc, bias, 4, dead=dead.to(DEVICE), aux_k=aux_k)
    _check_aux(aux_values, aux_indices, pre, dead, aux_k)
    # No aux outputs unless both a mask and aux_k > 0 are given.
    assert topk_encode(x, W_enc, bias, 4, dead=dead.to(DEVICE), aux_k=0)[2:] == (None, None)


def test_negative_and_infinite_pre_activations_beat_padding():
    # All pre-activations negative (the sign flip of the key order), some -inf: with k = M every latent, -inf
    # ones included, must come back exactly once, before any padded latent (M = 13 is padded to a 16+ tile).
    N, D, M, J = 9, 8, 13, 2
    x, W_enc, bias, pre = _problem(N, D, J, M, shift=-50.0)
    bias[0, [2, 7]] = float("-inf")
    pre[:, 0, [2, 7]] = float("-inf")
    values, indices, _, _ = topk_encode(x, W_enc, bias, M)
    values, indices = values.cpu(), indices.cpu()
    assert (indices.sort(-1).values == torch.arange(M)).all()
    assert (values[:, 0, -2:] == float("-inf")).all() and torch.isfinite(values[:, 0, :-2]).all()
    finite = values[:, 0, :-2]
    assert_close(finite, pre[:, 0].topk(M - 2).values, atol=_tol(pre), rtol=1e-5)
    _check_sorted_selection(values[:, 1:], indices[:, 1:], pre[:, 1:], pre[:, 1:], M)


def test_ties_rank_lower_latent_first():
    # The documented tie order (not torch's, which is unspecified): equal pre-activations come lowest index first.
    N, D, M, J, k = 3, 4, 40, 2, 8
    x = torch.zeros(N, D, device=DEVICE)
    W_enc = torch.randn(J, M, D, device=DEVICE)
    bias = torch.zeros(J, M, device=DEVICE)
    bias[1, 30:] = 1.0  # member 1: latents 30..39 beat the rest, and tie among themselves
    values, indices, _, _ = topk_encode(x, W_enc, bias, k)
    assert (indices[:, 0].cpu() == torch.arange(k)).all() and (values[:, 0] == 0).all()
    assert (indices[:, 1].cpu() == torch.arange(30, 30 + k)).all() and (values[:, 1] == 1).all()


def test_strided_inputs_and_fp16():
    N, D, M, J, k = 9, 37, 50, 2, 8
    x, W_enc, bias, pre = _problem(N, D, J, M)
    x_t = x.T.contiguous().T  # column-major x
    W_wide = torch.zeros(J, M, D + 5, device=DEVICE)
    W_wide[:, :, 2 : D + 2] = W_enc  # W_enc as a non-contiguous slice
    values, indices, _, _ = topk_encode(x_t, W_wide[:, :, 2 : D + 2], bias, k)
    _check_sorted_selection(values.cpu(), indices.cpu(), pre, pre, k)

    x16, W16, bias16, pre16 = _problem(N, D, J, M, dtype=torch.float16)
    values, indices, _, _ = topk_encode(x16, W16, bias16, k)  # fp16 operands, fp32 accumulation
    _check_sorted_selection(values.cpu(), indices.cpu(), pre16, pre16, k)


def test_allow_tf32_and_empty_batch():
    N, D, M, J, k = 9, 37, 50, 2, 8
    x, W_enc, bias, pre = _problem(N, D, J, M)
    values, indices, _, _ = topk_encode(x, W_enc, bias, k, allow_tf32=True)
    # TF32 keeps 10 mantissa bits: only the consistency of indices with values is checked, loosely.
    tol = 1e-2 * (1.0 + float(pre.abs().max()))
    assert_close(values.cpu(), pre.gather(-1, indices.cpu()), atol=tol)
    values, indices, aux_values, _ = topk_encode(x[:0], W_enc, bias, k, dead=torch.ones(J, M, dtype=torch.bool,
                                                                                       device=DEVICE), aux_k=3)
    assert values.shape == indices.shape == (0, J, k) and aux_values.shape == (0, J, 3)


def test_bf16_runs():
    N, D, M, J, k = 9, 37, 50, 2, 8
    x, W_enc, bias, pre = _problem(N, D, J, M, dtype=torch.bfloat16)
    values, indices, _, _ = topk_encode(x, W_enc, bias, k)
    assert values.dtype == torch.float32 and values.shape == indices.shape == (N, J, k)
    assert not torch.isnan(values).any() and ((indices >= 0) & (indices < M)).all()
    srt = indices.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()
    if INTERPRETED:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly: bf16 values are only checked on a GPU")
    _check_sorted_selection(values.cpu(), indices.cpu(), pre, pre, k)


def _threshold_problem(N, D, J, M, theta_shift=0.5):
    x, W_enc, bias, pre = _problem(N, D, J, M)
    # θ > 0 as JumpReLU has keeps about a third of the latents; the kernel also takes θ <= 0 (padding must not pass).
    threshold = torch.rand(J, M) + theta_shift
    expected = ref.jumprelu_activation(pre, threshold.double(), 0.1)  # forward: pre · [pre > θ]
    # A latent within rounding of its threshold may go either way: such entries are left out of the comparison.
    near = (pre - threshold.double()).abs() <= _tol(pre)
    return x, W_enc, bias, threshold.to(DEVICE), pre, expected, near


def _check_threshold_codes(values, indices, counts, pre, expected, near, capacity):
    N, J, M = pre.shape
    values, indices, counts = values.cpu(), indices.cpu(), counts.cpu()
    assert values.shape == indices.shape == (N, J, capacity) and counts.shape == (N, J)
    assert not torch.isnan(values).any() and ((indices >= 0) & (indices < M)).all() and (counts >= 0).all()
    kept = (expected != 0).sum(-1)
    assert ((counts - kept).abs() <= near.sum(-1)).all(), "counts of latents above threshold"
    slots = torch.arange(capacity)
    real = slots < counts.clamp_max(capacity)[..., None]
    assert (values[~real] == 0).all() and (indices[~real] == 0).all(), "padding slots must be value 0, index 0"
    # Real slots: ascending distinct latents, each above its threshold, with its pre-activation as value.
    step = indices[..., 1:] - indices[..., :-1]
    assert ((step > 0) | ~real[..., 1:]).all(), "kept latents must come in ascending latent order"
    assert_close(values[real], pre.gather(-1, indices)[real], atol=_tol(pre), rtol=1e-5)
    if bool((counts <= capacity).all()):  # nothing truncated: the dense codes are the reference forward
        dense = SparseCodes(values.double(), indices, M).to_dense().view(N, J, M)
        assert_close(dense.masked_fill(near, 0), expected.masked_fill(near, 0), atol=_tol(pre), rtol=1e-5)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("N,D,M,J,theta_shift", [(9, 37, 130, 3, 0.5), (40, 3, 50, 1, -0.5), (1, 64, 8, 2, 0.5)])
def test_threshold_encode_matches_jumprelu_forward(request, blocks, N, D, M, J, theta_shift):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, W_enc, bias, threshold, pre, expected, near = _threshold_problem(N, D, J, M, theta_shift)
    values, indices, counts, overflow = threshold_encode(x, W_enc, bias, threshold, M)  # capacity M: no overflow
    assert not bool(overflow)
    _check_threshold_codes(values, indices, counts, pre, expected, near, M)


def test_threshold_encode_reports_overflow():
    N, D, M, J = 40, 37, 130, 2
    x, W_enc, bias, threshold, pre, expected, near = _threshold_problem(N, D, J, M)
    capacity = int((expected != 0).sum(-1).float().median())  # about half the rows overflow
    with pytest.raises(RuntimeError, match="exceed capacity"):
        threshold_encode(x, W_enc, bias, threshold, capacity)
    values, indices, counts, overflow = threshold_encode(x, W_enc, bias, threshold, capacity, raise_on_overflow=False)
    assert bool(overflow) and bool((counts > capacity).any())
    _check_threshold_codes(values, indices, counts, pre, expected, near, capacity)
    # A truncated row keeps its lowest-index kept latents.
    clear = ~near.any(-1).cpu() & (counts.cpu() > capacity)
    first = torch.stack([(expected[n, j] != 0).nonzero()[:capacity, 0] for n, j in clear.nonzero().tolist()])
    assert torch.equal(indices.cpu()[clear], first)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "capacity": 0}, "capacity must be"),
        (lambda a: {**a, "capacity": 11}, "capacity must be"),
        (lambda a: {**a, "threshold": None}, "needs threshold"),
        (lambda a: {**a, "threshold": torch.rand(2, 9)}, "threshold must be"),
        (lambda a: {**a, "threshold": torch.rand(2, 10).double()}, "threshold must be"),
        (lambda a: {**a, "threshold": torch.rand(2, 10, device="meta")}, "one device"),
    ],
)
def test_threshold_encode_bad_input(change, match):
    x, W_enc, bias = _args()
    kwargs = change({"x": x, "W_enc": W_enc, "bias": bias, "threshold": torch.rand(2, 10), "capacity": 4})
    with pytest.raises(ValueError, match=match):
        threshold_encode(**kwargs)


def _args(J=2, M=10, D=4, N=3):
    return torch.randn(N, D), torch.randn(J, M, D), torch.randn(J, M)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "k": 11}, "k must be"),
        (lambda a: {**a, "k": 0}, "k must be"),
        (lambda a: {**a, "k": True}, "k must be"),
        (lambda a: {**a, "aux_k": 2}, "needs the dead-latent mask"),
        (lambda a: {**a, "aux_k": 11, "dead": torch.ones(2, 10, dtype=torch.bool)}, "aux_k must be"),
        (lambda a: {**a, "aux_k": -1}, "aux_k must be"),
        (lambda a: {**a, "dead": torch.ones(2, 10), "aux_k": 2}, "dead must be a torch.bool"),
        (lambda a: {**a, "dead": torch.ones(2, 9, dtype=torch.bool), "aux_k": 2}, "dead must be a torch.bool"),
        (lambda a: {**a, "x": a["x"][None]}, "x must be"),
        (lambda a: {**a, "W_enc": a["W_enc"][0]}, "W_enc must be"),
        (lambda a: {**a, "x": torch.randn(3, 5)}, "x is"),
        (lambda a: {**a, "bias": torch.randn(2, 9)}, "bias must be"),
        (lambda a: {**a, "bias": a["bias"].double()}, "bias must be float32"),
        (lambda a: {**a, "x": a["x"].double(), "W_enc": a["W_enc"].double()}, "x must be float32"),
        (lambda a: {**a, "W_enc": a["W_enc"].half()}, "W_enc dtype"),
        (lambda a: {**a, "bias": torch.randn(2, 10, device="meta")}, "one device"),
    ],
)
def test_bad_input_raises_before_launch(change, match):
    x, W_enc, bias = _args()
    kwargs = change({"x": x, "W_enc": W_enc, "bias": bias, "k": 4})
    with pytest.raises(ValueError, match=match):
        topk_encode(kwargs.pop("x"), kwargs.pop("W_enc"), kwargs.pop("bias"), kwargs.pop("k"), **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(te, "_interpreting", lambda: False)
    x, W_enc, bias = _args()
    with pytest.raises(ValueError, match="CUDA"):
        topk_encode(x.cpu(), W_enc.cpu(), bias.cpu(), 4)


def test_k_past_the_register_limits_is_refused(monkeypatch):
    """The GPU build's register limits (MAX_K, MAX_K_FP32, MAX_K_WITH_AUX; see their docstrings) hold under the
    interpreter too."""
    assert te.max_k(torch.bfloat16, False) == te.max_k(torch.float16, False) == te.MAX_K
    assert te.max_k(torch.float32, False) == te.MAX_K_FP32 < te.MAX_K
    assert te.max_k(torch.float32, True) == te.max_k(torch.bfloat16, True) == te.MAX_K_WITH_AUX
    monkeypatch.setattr(te, "MAX_K", 8)
    monkeypatch.setattr(te, "MAX_K_FP32", 4)
    monkeypatch.setattr(te, "MAX_K_WITH_AUX", 3)
    x, W_enc, bias = (t.to(DEVICE) for t in _args())
    dead = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="k <= 4 in registers for torch.float32"):
        topk_encode(x, W_enc, bias, 5)
    with pytest.raises(ValueError, match="MAX_K_WITH_AUX = 3"):
        topk_encode(x, W_enc, bias, 2, dead=dead, aux_k=4)
    with pytest.raises(ValueError, match="MAX_K_WITH_AUX = 3"):
        topk_encode(x, W_enc, bias, 4, dead=dead, aux_k=1)
    assert topk_encode(x, W_enc, bias, 4)[0].shape[-1] == 4  # at the limit: fine
