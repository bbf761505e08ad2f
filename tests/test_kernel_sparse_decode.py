"""Triton sparse decode and its backward against float64 torch oracles (gather / index_add) and saefast.ref.

Inputs are random fp32 (the interpreter's bf16 arithmetic is unreliable; the half-precision test only checks
loads, fp32 accumulation and the rounding store). Tolerance: fp32 results within ``1e-5`` relative to the
largest expected magnitude (sums of at most a few hundred terms). Launcher outputs are NaN-poisoned (see
``_poison``), so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from saefast import ref
from saefast.codes import SparseCodes
from saefast.kernels import sparse_decode as sd_mod
from saefast.kernels import sparse_decode_backward as sb_mod
from saefast.kernels.sparse_decode import sparse_decode
from saefast.kernels.sparse_decode_backward import sparse_decode_grad_values, sparse_decode_grad_weight

# (N, J, K, M, D): non-power-of-two N, M and D, K ∈ {1, 8, 32} ≤ M, J ∈ {1, 3}.
SHAPES = [
    (1, 1, 1, 3, 5),
    (7, 3, 8, 19, 48),
    (33, 3, 32, 64, 70),
    (33, 1, 8, 64, 5),
    (7, 3, 1, 3, 70),
    (1, 3, 32, 64, 48),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Launcher outputs start as NaN instead of uninitialised memory: an unwritten element cannot pass."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(sd_mod, "empty", nan_empty)
    monkeypatch.setattr(sb_mod, "empty", nan_empty)


def _close(actual, expected, rel=1e-5, msg=""):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    assert_close(actual, expected, atol=rel * scale, rtol=rel, msg=msg)


def _inputs(N, J, K, M, D, masked, dtype=torch.float32):
    values = torch.randn(N, J, K).to(dtype)
    indices = torch.randint(0, M, (N, J, K))
    if K > 1:
        indices[:, :, 1] = indices[:, :, 0]  # a repeated index in every row: the two slots must add up
    W = torch.randn(J, M, D).to(dtype)
    alpha = torch.linspace(0.5, 2.0, J)  # not all equal
    mask = torch.rand(N, J, K) > 0.3 if masked else None
    return values, indices, W, alpha, mask


def _members64(values, indices, W, alpha, mask):
    """``alpha[j]·Σ_k mask·values·W[j, idx]`` per member in float64, ``[N, J, D]`` (the gather oracle)."""
    v = values.double() if mask is None else values.double() * mask
    rows = W.double()[torch.arange(W.shape[0]).view(1, -1, 1), indices]  # [N, J, K, D]
    return alpha.double().view(1, -1, 1) * (v.unsqueeze(-1) * rows).sum(2)


def _grad_weight64(g, values, indices, M, alpha, mask):
    """``dW`` by ``index_add`` in float64 over the flattened slots."""
    N, J, K = indices.shape
    D = g.shape[-1]
    g = g.double() if g.dim() == 3 else g.double().unsqueeze(1).expand(N, J, D)
    v = values.double() if mask is None else values.double() * mask
    contrib = (alpha.double().view(1, J, 1) * v).unsqueeze(-1) * g.unsqueeze(2)  # [N, J, K, D]
    keys = (indices + torch.arange(J).view(1, J, 1) * M).reshape(-1)
    return torch.zeros(J * M, D, dtype=torch.float64).index_add_(0, keys, contrib.reshape(-1, D)).view(J, M, D)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_gather_oracle(shape, per_member, masked):
    N, J, K, M, D = shape
    values, indices, W, alpha, mask = _inputs(N, J, K, M, D, masked)
    bias = torch.randn(J, D) if per_member else torch.randn(D)
    members = _members64(values, indices, W, alpha, mask)
    for b in (None, bias) if masked else (bias,):  # bias × mask without the full product
        out = sparse_decode(values, indices, W, alpha, bias=b, mask=mask, per_member=per_member)
        expected = members if per_member else members.sum(1)
        if b is not None:
            expected = expected + b.double()
        assert out.dtype == W.dtype
        _close(out, expected, msg=f"forward per_member={per_member} bias={b is not None}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grad_values_matches_gather_oracle(shape, per_member, masked):
    N, J, K, M, D = shape
    _, indices, W, alpha, mask = _inputs(N, J, K, M, D, masked)
    g = torch.randn(N, J, D) if per_member else torch.randn(N, D)
    rows = W.double()[torch.arange(J).view(1, -1, 1), indices]  # [N, J, K, D]
    g_slots = g.double().unsqueeze(2) if per_member else g.double().view(N, 1, 1, D)
    expected = alpha.double().view(1, J, 1) * (rows * g_slots).sum(-1)
    if mask is not None:
        expected = expected * mask
    dv = sparse_decode_grad_values(g, indices, W, alpha, mask=mask)
    assert dv.dtype == torch.float32
    _close(dv, expected, msg="grad_values")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grad_weight_atomic_and_deterministic_match_index_add(shape, per_member, masked):
    N, J, K, M, D = shape
    values, indices, _, alpha, mask = _inputs(N, J, K, M, D, masked)
    g = torch.randn(N, J, D) if per_member else torch.randn(N, D)
    expected = _grad_weight64(g, values, indices, M, alpha, mask)
    atomic = sparse_decode_grad_weight(g, values, indices, M, alpha, mask=mask)
    det = sparse_decode_grad_weight(g, values, indices, M, alpha, mask=mask, deterministic=True)
    again = sparse_decode_grad_weight(g, values, indices, M, alpha, mask=mask, deterministic=True)
    assert atomic.dtype == det.dtype == torch.float32
    _close(atomic, expected, msg="grad_weight atomic")
    _close(det, expected, msg="grad_weight deterministic")
    _close(det, atomic, msg="deterministic vs atomic")
    assert torch.equal(det, again), "deterministic grad_weight differs between two runs"
    never = torch.ones(J, M, dtype=torch.bool)
    never.view(-1)[(indices + torch.arange(J).view(1, J, 1) * M).reshape(-1)] = False
    assert (det[never] == 0).all() and (atomic[never] == 0).all(), "rows of unselected latents must be 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_accumulate_in_fp32_and_store_in_weight_dtype(dtype):
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, _ = _inputs(N, J, K, M, D, masked=False, dtype=dtype)
    bias = torch.randn(D).to(dtype)
    out = sparse_decode(values, indices, W, alpha, bias=bias)
    exact = _members64(values, indices, W, alpha, None).sum(1) + bias.double()
    assert out.dtype == dtype
    # One rounding of the fp32 sum: within one unit in the last place of the exact result.
    ulp = torch.finfo(dtype).eps
    assert_close(out, exact, atol=ulp, rtol=ulp, msg=f"{dtype} forward")
    g = torch.randn(N, D).to(dtype)
    dW = sparse_decode_grad_weight(g, values, indices, M, alpha, deterministic=True)
    _close(dW, _grad_weight64(g, values, indices, M, alpha, None), msg=f"{dtype} grad_weight")


def test_strided_inputs_and_expanded_grad():
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, mask = _inputs(N, J, K, M, D, masked=True)
    # [N, J, K] views with other strides, and a stride-0 grad (the gradient of a sum arrives expanded).
    v_t = values.transpose(0, 2).contiguous().transpose(0, 2)
    i_t = indices.transpose(1, 2).contiguous().transpose(1, 2)
    m_t = mask.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (v_t.is_contiguous() or i_t.is_contiguous() or m_t.is_contiguous())
    _close(sparse_decode(v_t, i_t, W, alpha, mask=m_t), _members64(values, indices, W, alpha, mask).sum(1))
    g = torch.ones(1, D).expand(N, D)
    g64 = g.contiguous()
    expected_dv = sparse_decode_grad_values(g64, indices, W, alpha, mask=mask)
    _close(sparse_decode_grad_values(g, i_t, W, alpha, mask=m_t), expected_dv.double())
    expected_dw = _grad_weight64(g64, values, indices, M, alpha, mask)
    for deterministic in (False, True):
        dW = sparse_decode_grad_weight(g, v_t, i_t, M, alpha, mask=m_t, deterministic=deterministic)
        _close(dW, expected_dw, msg=f"strided grad_weight deterministic={deterministic}")


def test_dropped_slots_never_leak_nan():
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, mask = _inputs(N, J, K, M, D, masked=True)
    values = values.masked_fill(~mask, float("nan"))
    W_nan = W.clone()
    used = torch.zeros(J, M, dtype=torch.bool)
    for j in range(J):
        used[j, indices[:, j][mask[:, j]]] = True
    W_nan[~used] = float("nan")  # rows that only dropped slots point at
    clean = torch.nan_to_num(values)
    assert torch.isfinite(sparse_decode(values, indices, W_nan, alpha, mask=mask)).all()
    _close(sparse_decode(values, indices, W_nan, alpha, mask=mask), _members64(clean, indices, W, alpha, mask).sum(1))
    assert torch.isfinite(sparse_decode_grad_values(torch.randn(N, D), indices, W_nan, alpha, mask=mask)).all()
    for deterministic in (False, True):
        dW = sparse_decode_grad_weight(torch.randn(N, D), values, indices, M, alpha, mask=mask,
                                       deterministic=deterministic)
        assert torch.isfinite(dW).all()


def test_empty_shapes():
    W, alpha = torch.randn(2, 5, 6), torch.ones(2)
    none = torch.zeros(0, 2, 3), torch.zeros(0, 2, 3, dtype=torch.int64)
    assert sparse_decode(*none, W, alpha).shape == (0, 6)
    assert sparse_decode_grad_values(torch.zeros(0, 6), none[1], W, alpha).shape == (0, 2, 3)
    for deterministic in (False, True):
        dW = sparse_decode_grad_weight(torch.zeros(0, 6), *none, 5, alpha, deterministic=deterministic)
        assert dW.shape == (2, 5, 6) and (dW == 0).all()
    # K = 0 slots: the output is the bias alone.
    bias = torch.randn(6)
    out = sparse_decode(torch.zeros(4, 2, 0), torch.zeros(4, 2, 0, dtype=torch.int64), W, alpha, bias=bias)
    assert torch.equal(out, bias.expand(4, 6))


class _Decode(torch.autograd.Function):
    """The launchers as one differentiable op in ``values``, ``W_dec`` and ``bias`` (what saefast.ops wires up)."""

    @staticmethod
    def forward(ctx, values, W_dec, bias, indices, alpha, per_member, deterministic):
        ctx.save_for_backward(values, W_dec, indices, alpha)
        ctx.per_member, ctx.deterministic = per_member, deterministic
        return sparse_decode(values, indices, W_dec, alpha, bias=bias, per_member=per_member)

    @staticmethod
    def backward(ctx, grad):
        values, W_dec, indices, alpha = ctx.saved_tensors
        dv = sparse_decode_grad_values(grad, indices, W_dec, alpha)
        dW = sparse_decode_grad_weight(grad, values, indices, W_dec.shape[1], alpha, deterministic=ctx.deterministic)
        return dv.to(values.dtype), dW.to(W_dec.dtype), grad.sum(0), None, None, None, None


@pytest.mark.parametrize("per_member,deterministic", [(False, False), (True, True)])
def test_autograd_matches_ref(per_member, deterministic):
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, _ = _inputs(N, J, K, M, D, masked=False)
    b_dec = torch.randn(J, D)
    target = torch.randn(N, J, D) if per_member else torch.randn(N, D)

    def grads(use_kernel):
        v, w, b = (t.clone().requires_grad_() for t in (values, W, b_dec))
        if use_kernel:
            bias = alpha.view(J, 1) * b if per_member else (alpha.view(J, 1) * b).sum(0)
            out = _Decode.apply(v, w, bias, indices, alpha, per_member, deterministic)
        elif per_member:
            out = alpha.view(1, J, 1) * (ref.decode_members_sparse(SparseCodes(v, indices, M), w) + b)
        else:
            out = ref.decode_sparse(SparseCodes(v, indices, M), w, b, alpha)
        ((out - target) ** 2).sum().backward()
        return out.detach(), v.grad, w.grad, b.grad

    for name, got, want in zip(("out", "values", "W_dec", "b_dec"), grads(True), grads(False)):
        _close(got, want.double(), msg=f"autograd {name}")


def _bad_cases():
    N, J, K, M, D = 4, 2, 3, 5, 6
    v, i, W, a = torch.randn(N, J, K), torch.randint(0, M, (N, J, K)), torch.randn(J, M, D), torch.ones(J)
    g = torch.randn(N, D)
    fwd = dict(values=v, indices=i, W_dec=W, alpha=a)
    gv = dict(grad_out=g, indices=i, W_dec=W, alpha=a)
    gw = dict(grad_out=g, values=v, indices=i, n_latents=M, alpha=a)
    meta = torch.device("meta")
    return [
        (sparse_decode, {**fwd, "values": v[:, :, :2]}, "differ in shape"),
        (sparse_decode, {**fwd, "indices": i.int()}, "int64"),
        (sparse_decode, {**fwd, "indices": i[0]}, r"\[N, J, K\]"),
        (sparse_decode, {**fwd, "indices": i + M}, "must lie in"),
        (sparse_decode, {**fwd, "indices": i - M}, "must lie in"),
        (sparse_decode, {**fwd, "values": v.double()}, "values must be"),
        (sparse_decode, {**fwd, "W_dec": W.transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
        (sparse_decode, {**fwd, "W_dec": W[:1]}, "members"),
        (sparse_decode, {**fwd, "W_dec": W[0]}, r"\[J, M, D\]"),
        (sparse_decode, {**fwd, "alpha": torch.ones(J + 1)}, "alpha"),
        (sparse_decode, {**fwd, "alpha": torch.ones(J, dtype=torch.int64)}, "alpha"),
        (sparse_decode, {**fwd, "bias": torch.randn(D + 1)}, "bias"),
        (sparse_decode, {**fwd, "bias": torch.randn(D), "per_member": True}, "bias"),
        (sparse_decode, {**fwd, "mask": torch.ones(N, J, K)}, "bool"),
        (sparse_decode, {**fwd, "mask": torch.ones(N, J, 1, dtype=torch.bool)}, "differ in shape"),
        (sparse_decode, {**fwd, "alpha": a.to(meta)}, "one device"),
        (sparse_decode, {k: t.to(meta) for k, t in fwd.items()}, "CUDA"),
        (sparse_decode_grad_values, {**gv, "grad_out": torch.randn(N, D + 1)}, "width"),
        (sparse_decode_grad_values, {**gv, "grad_out": torch.randn(N + 1, D)}, "grad_out"),
        (sparse_decode_grad_values, {**gv, "grad_out": torch.randn(N, J + 1, D)}, "grad_out"),
        (sparse_decode_grad_values, {**gv, "grad_out": g.to(torch.int32)}, "grad_out must be"),
        (sparse_decode_grad_values, {**gv, "mask": torch.ones(N, J, K, dtype=torch.bool).to(meta)}, "one device"),
        (sparse_decode_grad_weight, {**gw, "n_latents": 3}, "must lie in"),
        (sparse_decode_grad_weight, {**gw, "n_latents": -1}, "n_latents"),
        (sparse_decode_grad_weight, {**gw, "n_latents": 5.0}, "n_latents"),
        (sparse_decode_grad_weight, {**gw, "values": v.transpose(0, 1)}, "differ in shape"),
        (sparse_decode_grad_weight, {**gw, "grad_out": g[:, None]}, "grad_out"),
        (sparse_decode_grad_weight, {**gw, "indices": i.float()}, "int64"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_value_error(case):
    fn, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
