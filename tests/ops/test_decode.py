"""saefast.ops.decode: the sparse decode of all members in one launch and its sparse backward (gradients w.r.t. the
code values, the decoder weights and the bias) on every fused backend against saefast.ops.ref and float64 torch
oracles (gather / index_add); the fused ops' shared contract and ``opcheck``; the native-only fused backward; and the
Triton launchers of ``saefast.kernels.sparse_decode`` and ``sparse_decode_backward`` directly.

Triton runs on ``DEVICE``: CUDA when there is a GPU, else the CPU under Triton's interpreter (see conftest.py);
native on the CPU. Random inputs are drawn on the CPU (the same numbers on either device) and moved to the kernels'
device; the float64 oracles are computed from the CPU copies and results are compared on the CPU (``assert_close``).

Launcher inputs are random fp32 (the interpreter's bf16 arithmetic is unreliable; the half-precision tests only check
loads, fp32 accumulation and the rounding store). Tolerance: fp32 results within ``1e-5`` relative to the largest
expected magnitude (sums of at most a few hundred terms). Kernel outputs are poisoned (NaN; see
tests/ops/conftest.py), so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CPU,
    CUDA,
    DEVICE,
    FUSED,
    assert_close,
    fused_op,
    needs_extension,
    needs_triton,
    rand,
    random_stack,
)

from saefast import ops
from saefast.ops import ref
from saefast.ops.codes import SparseCodes

try:  # the Triton launchers (importing saefast.kernels imports triton)
    from saefast.kernels.sparse_decode import sparse_decode
    from saefast.kernels.sparse_decode_backward import sparse_decode_grad_values, sparse_decode_grad_weight
except ImportError:  # without triton the tests marked needs_triton are skipped
    sparse_decode = sparse_decode_grad_values = sparse_decode_grad_weight = None

OPS = torch.ops.saefast


# ------------------------------------------------------------------------------------------------------
# ops.decode on every fused backend
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("shared_b_dec", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_decode_matches_reference_forward_and_backward(backend, device, shared_b_dec, with_mask):
    N, J, M, D, K = 9, 3, 21, 14, 5
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=7, device=device)
    if shared_b_dec:
        b_dec = b_dec[:1]
    values = rand(N, J, K, kind="rand", device=device)
    indices = torch.randint(0, M, (N, J, K)).to(device)
    indices[0, 0, :2] = 3  # a repeated latent within a row adds up
    alpha = torch.tensor([0.5, 1.0, 2.0], device=device)
    mask = rand(N, J, K, kind="rand", device=device) > 0.3 if with_mask else None
    leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, b_dec)]
    out = ops.decode(SparseCodes(leaves[0], indices, M), leaves[1], leaves[2], alpha, mask, backend=backend)
    ref_leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, b_dec)]
    want = ops.decode(SparseCodes(ref_leaves[0], indices, M), ref_leaves[1], ref_leaves[2], alpha, mask,
                      backend="torch")
    assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = rand(N, D, device=device)
    for name, got, expected in zip(("values", "W_dec", "b_dec"), torch.autograd.grad((out * g).sum(), leaves),
                                   torch.autograd.grad((want * g).sum(), ref_leaves)):
        assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_deterministic_mode_gives_identical_gradients(backend, device):
    N, J, M, D, K = 40, 2, 7, 12, 4  # few latents, many tokens: heavy collisions in the scatter
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=1, device=device)
    values, indices = rand(N, J, K, kind="rand", device=device), torch.randint(0, M, (N, J, K)).to(device)
    g = rand(N, D, device=device)

    def grad_w():
        W = W_dec.clone().requires_grad_(True)
        out = ops.decode(SparseCodes(values, indices, M), W, b_dec, 1.0, backend=backend)
        return torch.autograd.grad((out * g).sum(), W)[0]

    torch.use_deterministic_algorithms(True)
    try:
        first, second = grad_w(), grad_w()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert_close(first, grad_w(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# The fused ops (torch.ops.saefast.sparse_decode*, and their native_* twins): one contract
# ------------------------------------------------------------------------------------------------------

DECODE_SHAPES = [(1, 1, 1, 1, 1), (7, 3, 5, 37, 24), (40, 2, 8, 9, 33), (130, 3, 32, 50, 16)]  # N, J, K, M, D


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize(("N", "J", "K", "M", "D"), DECODE_SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sparse_decode_forward_and_backward_match_reference(backend, device, N, J, K, M, D, per_member, with_mask):
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=N, device=device, small_decoder=False)
    values = rand(N, J, K, kind="rand", device=device)
    indices = torch.randint(0, M, (N, J, K), generator=torch.Generator().manual_seed(1)).to(device)
    indices[0, 0, :] = indices[0, 0, 0]  # repeated latents add up
    alpha = torch.linspace(0.5, 2.0, J, device=device)
    mask = rand(N, J, K, kind="rand", device=device) > 0.3 if with_mask else None
    bias = b_dec if per_member else b_dec[0]
    leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, bias)]
    out = fused_op(backend, "sparse_decode")(leaves[0], indices, leaves[1], alpha, leaves[2], mask, per_member)
    ref_leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, bias)]
    kept = ref_leaves[0] if mask is None else ref_leaves[0] * mask
    members = ref.decode_members_sparse(SparseCodes(kept, indices, M), ref_leaves[1]) * alpha.view(1, J, 1)
    want = members + ref_leaves[2] if per_member else members.sum(1) + ref_leaves[2]
    assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = rand(*out.shape, device=device)
    for name, got, expected in zip(("values", "W_dec", "bias"), torch.autograd.grad((out * g).sum(), leaves),
                                   torch.autograd.grad((want * g).sum(), ref_leaves)):
        assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_low_precision_weights(backend, device, dtype):
    N, J, K, M, D = 19, 2, 6, 30, 40
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=3, small_decoder=False)
    values, indices = rand(N, J, K, kind="rand"), torch.randint(0, M, (N, J, K))
    W = W_dec.to(dtype)
    out = fused_op(backend, "sparse_decode")(values.to(device), indices.to(device), W.to(device),
                                             torch.full((J,), 0.5, device=device), b_dec[0].to(dtype).to(device),
                                             None, False)
    assert out.dtype == dtype
    want = 0.5 * ref.decode_members_sparse(SparseCodes(values, indices, M), W.float()).sum(1) + b_dec[0].to(dtype)
    assert_close(out, want, atol=2e-2, rtol=1e-2)  # fp32 sums, one rounding to the storage type


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_grad_weight_gives_unselected_rows_exact_zeros_and_handles_collisions(backend, device):
    N, J, K, M, D = 60, 2, 4, 50, 7
    values = rand(N, J, K)
    indices = torch.randint(0, 3, (N, J, K))  # only latents 0..2: heavy collisions, rows 3.. untouched
    g = rand(N, J, D)
    dW = fused_op(backend, "sparse_decode_grad_weight")(g.to(device), values.to(device), indices.to(device), M,
                                                        torch.ones(J, device=device), None, False)
    assert bool((dW[:, 3:] == 0).all())
    want = torch.zeros(J, M, D)
    for j in range(J):
        want[j].index_add_(0, indices[:, j].reshape(-1), (values[:, j].unsqueeze(-1) * g[:, j].unsqueeze(1))
                           .reshape(-1, D))
    assert_close(dW, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_opcheck_sparse_decode(backend, device):
    """The schema, fake implementation and autograd of ``sparse_decode``: combined with a [D] bias; per member with
    a [J, D] bias and a mask, with and without a gradient for W_dec."""
    N, J, M, D, K = 6, 2, 10, 8, 3
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=2, device=device)
    values = rand(N, J, K, kind="rand", device=device).requires_grad_(True)
    indices = torch.randint(0, M, (N, J, K)).to(device)
    alpha = torch.tensor([0.5, 0.5], device=device)
    op = fused_op(backend, "sparse_decode").default
    torch.library.opcheck(op, (values, indices, W_dec.clone().requires_grad_(True), alpha, b_dec[0], None, False))
    mask = rand(N, J, K, kind="rand", device=device) > 0.5
    for W in (W_dec.clone().requires_grad_(True), W_dec):
        torch.library.opcheck(op, (values, indices, W, alpha, b_dec, mask, True))


# ------------------------------------------------------------------------------------------------------
# The native ops alone: masked slots, the fused backward, input checks
# ------------------------------------------------------------------------------------------------------


@needs_extension
def test_masked_slots_are_never_read():
    N, J, K, M, D = 5, 2, 4, 6, 8
    values = rand(N, J, K)
    values[:, :, -1] = float("nan")
    indices = torch.randint(0, M, (N, J, K))
    indices[:, :, -1] = 10**9  # out of range, but masked out (the Triton launchers refuse it on the CPU)
    mask = torch.ones(N, J, K, dtype=torch.bool)
    mask[:, :, -1] = False
    W = rand(J, M, D)
    out = OPS.native_sparse_decode(values, indices, W, torch.ones(J), None, mask, False)
    want = ref.decode_members_sparse(SparseCodes(values[..., :-1], indices[..., :-1], M), W).sum(1)
    assert_close(out, want, atol=1e-5)
    dv = OPS.native_sparse_decode_grad_values(rand(N, D), indices, W, torch.ones(J), mask)
    assert bool((dv[..., -1] == 0).all()) and bool(torch.isfinite(dv).all())


@needs_extension
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_backward_equals_the_two_gradient_ops(with_mask):
    N, J, K, M, D = 37, 3, 6, 23, 19
    _, _, W_dec, _ = random_stack(J, M, D, seed=4, small_decoder=False)
    values, indices = rand(N, J, K), torch.randint(0, M, (N, J, K), generator=torch.Generator().manual_seed(2))
    mask = rand(N, J, K, kind="rand") > 0.4 if with_mask else None
    alpha = torch.linspace(0.3, 1.0, J)
    for g in (rand(N, D), rand(N, J, D)):
        dv, dW = OPS.native_sparse_decode_backward(g, values, indices, W_dec, alpha, mask)
        assert_close(dv, OPS.native_sparse_decode_grad_values(g, indices, W_dec, alpha, mask), atol=1e-5, rtol=1e-5)
        assert torch.equal(dW, OPS.native_sparse_decode_grad_weight(g, values, indices, M, alpha, mask, False))
        if mask is not None:
            assert bool((dv[~mask] == 0).all())


@needs_extension
def test_opcheck_native_sparse_decode_backward():
    N, J, M, D, K = 6, 2, 10, 8, 3
    _, _, W_dec, _ = random_stack(J, M, D, seed=2)
    values, indices = rand(N, J, K, kind="rand"), torch.randint(0, M, (N, J, K))
    torch.library.opcheck(OPS.native_sparse_decode_backward.default,
                          (rand(N, J, D), values, indices, W_dec, torch.tensor([0.5, 0.5]),
                           rand(N, J, K, kind="rand") > 0.5))


@needs_extension
def test_native_decode_rejects_bad_input_before_compute():
    J, M, D = 2, 10, 6
    W = rand(J, M, D)
    values, indices = rand(4, J, 3), torch.randint(0, M, (4, J, 3))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, M = 10\)"):
        OPS.native_sparse_decode(values, indices + 10, W, torch.ones(J), None, None, False)
    with pytest.raises(ValueError, match="indices must be int64"):
        OPS.native_sparse_decode(values, indices.int(), W, torch.ones(J), None, None, False)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.native_sparse_decode(values, indices, W.transpose(1, 2).contiguous().transpose(1, 2), torch.ones(J),
                                 None, None, False)
    with pytest.raises(ValueError, match="alpha must be"):
        OPS.native_sparse_decode(values, indices, W, torch.ones(J + 1), None, None, False)
    with pytest.raises(ValueError, match="bias must be"):
        OPS.native_sparse_decode(values, indices, W, torch.ones(J), torch.zeros(D + 1), None, False)
    with pytest.raises(ValueError, match="grad_out must be"):
        OPS.native_sparse_decode_grad_values(rand(5, D), indices, W, torch.ones(J), None)


# ------------------------------------------------------------------------------------------------------
# The Triton launchers (saefast.kernels.sparse_decode, sparse_decode_backward) directly, against float64 oracles
# ------------------------------------------------------------------------------------------------------

# (N, J, K, M, D): non-power-of-two N, M and D, K ∈ {1, 8, 32} ≤ M, J ∈ {1, 3}.
LAUNCHER_SHAPES = [
    (1, 1, 1, 3, 5),
    (7, 3, 8, 19, 48),
    (33, 3, 32, 64, 70),
    (33, 1, 8, 64, 5),
    (7, 3, 1, 3, 70),
    (1, 3, 32, 64, 48),
]


def _dev(*tensors):
    """The CPU-generated tensors on ``DEVICE`` (None stays None); one tensor for one argument."""
    moved = tuple(None if t is None else t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def _close(actual, expected, rel=1e-5, msg=""):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    assert_close(actual, expected, atol=rel * scale, rtol=rel, msg=msg)


def _inputs(N, J, K, M, D, masked, dtype=torch.float32):
    """Random slots and weights on the CPU (the oracles' inputs; ``_dev`` gives the kernels' copies)."""
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


@needs_triton
@pytest.mark.parametrize("shape", LAUNCHER_SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_gather_oracle(shape, per_member, masked):
    N, J, K, M, D = shape
    values, indices, W, alpha, mask = _inputs(N, J, K, M, D, masked)
    bias = torch.randn(J, D) if per_member else torch.randn(D)
    members = _members64(values, indices, W, alpha, mask)
    args, mask_d = _dev(values, indices, W, alpha), _dev(mask)
    for b in (None, bias) if masked else (bias,):  # bias × mask without the full product
        out = sparse_decode(*args, bias=_dev(b), mask=mask_d, per_member=per_member)
        expected = members if per_member else members.sum(1)
        if b is not None:
            expected = expected + b.double()
        assert out.dtype == W.dtype and out.device.type == DEVICE.type
        _close(out, expected, msg=f"forward per_member={per_member} bias={b is not None}")


@needs_triton
@pytest.mark.parametrize("shape", LAUNCHER_SHAPES)
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
    dv = sparse_decode_grad_values(*_dev(g, indices, W, alpha), mask=_dev(mask))
    assert dv.dtype == torch.float32 and dv.device.type == DEVICE.type
    _close(dv, expected, msg="grad_values")


@needs_triton
@pytest.mark.parametrize("shape", LAUNCHER_SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_grad_weight_atomic_and_deterministic_match_index_add(shape, per_member, masked):
    N, J, K, M, D = shape
    values, indices, _, alpha, mask = _inputs(N, J, K, M, D, masked)
    g = torch.randn(N, J, D) if per_member else torch.randn(N, D)
    expected = _grad_weight64(g, values, indices, M, alpha, mask)
    g_d, v_d, i_d, alpha_d, mask_d = _dev(g, values, indices, alpha, mask)
    atomic = sparse_decode_grad_weight(g_d, v_d, i_d, M, alpha_d, mask=mask_d)
    det = sparse_decode_grad_weight(g_d, v_d, i_d, M, alpha_d, mask=mask_d, deterministic=True)
    again = sparse_decode_grad_weight(g_d, v_d, i_d, M, alpha_d, mask=mask_d, deterministic=True)
    assert atomic.dtype == det.dtype == torch.float32
    assert atomic.device.type == det.device.type == DEVICE.type
    _close(atomic, expected, msg="grad_weight atomic")
    _close(det, expected, msg="grad_weight deterministic")
    _close(det, atomic, msg="deterministic vs atomic")
    assert torch.equal(det, again), "deterministic grad_weight differs between two runs"
    det, atomic = det.cpu(), atomic.cpu()
    never = torch.ones(J, M, dtype=torch.bool)
    never.view(-1)[(indices + torch.arange(J).view(1, J, 1) * M).reshape(-1)] = False
    assert (det[never] == 0).all() and (atomic[never] == 0).all(), "rows of unselected latents must be 0"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_accumulate_in_fp32_and_store_in_weight_dtype(dtype):
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, _ = _inputs(N, J, K, M, D, masked=False, dtype=dtype)
    bias = torch.randn(D).to(dtype)
    v_d, i_d, W_d, alpha_d = _dev(values, indices, W, alpha)
    out = sparse_decode(v_d, i_d, W_d, alpha_d, bias=_dev(bias))
    exact = _members64(values, indices, W, alpha, None).sum(1) + bias.double()
    assert out.dtype == dtype
    # One rounding of the fp32 sum: within one unit in the last place of the exact result.
    ulp = torch.finfo(dtype).eps
    assert_close(out, exact, atol=ulp, rtol=ulp, msg=f"{dtype} forward")
    g = torch.randn(N, D).to(dtype)
    g_d = _dev(g)
    dW = sparse_decode_grad_weight(g_d, v_d, i_d, M, alpha_d, deterministic=True)
    expected_dW = _grad_weight64(g, values, indices, M, alpha, None)
    _close(dW, expected_dW, msg=f"{dtype} grad_weight")
    # Half-precision grad_out and W_dec for the other backward paths: loads widened to fp32, fp32 results.
    _close(sparse_decode_grad_weight(g_d, v_d, i_d, M, alpha_d), expected_dW, msg=f"{dtype} grad_weight atomic")
    rows = W.double()[torch.arange(J).view(1, -1, 1), indices]  # [N, J, K, D]
    expected_dv = alpha.double().view(1, J, 1) * (rows * g.double().view(N, 1, 1, D)).sum(-1)
    dv = sparse_decode_grad_values(g_d, i_d, W_d, alpha_d)
    assert dv.dtype == torch.float32
    _close(dv, expected_dv, msg=f"{dtype} grad_values")


@needs_triton
def test_strided_inputs_and_expanded_grad():
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, mask = _inputs(N, J, K, M, D, masked=True)
    v_d, i_d, W_d, alpha_d, mask_d = _dev(values, indices, W, alpha, mask)
    # [N, J, K] views with other strides, and a stride-0 grad (the gradient of a sum arrives expanded).
    v_t = v_d.transpose(0, 2).contiguous().transpose(0, 2)
    i_t = i_d.transpose(1, 2).contiguous().transpose(1, 2)
    m_t = mask_d.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (v_t.is_contiguous() or i_t.is_contiguous() or m_t.is_contiguous())
    _close(sparse_decode(v_t, i_t, W_d, alpha_d, mask=m_t), _members64(values, indices, W, alpha, mask).sum(1))
    g = torch.ones(1, D, device=DEVICE).expand(N, D)
    g64 = g.contiguous()
    expected_dv = sparse_decode_grad_values(g64, i_d, W_d, alpha_d, mask=mask_d)
    _close(sparse_decode_grad_values(g, i_t, W_d, alpha_d, mask=m_t), expected_dv.double())
    expected_dw = _grad_weight64(g64.cpu(), values, indices, M, alpha, mask)
    for deterministic in (False, True):
        dW = sparse_decode_grad_weight(g, v_t, i_t, M, alpha_d, mask=m_t, deterministic=deterministic)
        _close(dW, expected_dw, msg=f"strided grad_weight deterministic={deterministic}")


@needs_triton
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
    v_d, i_d, W_d, alpha_d, mask_d = _dev(values, indices, W_nan, alpha, mask)
    assert torch.isfinite(sparse_decode(v_d, i_d, W_d, alpha_d, mask=mask_d)).all()
    _close(sparse_decode(v_d, i_d, W_d, alpha_d, mask=mask_d), _members64(clean, indices, W, alpha, mask).sum(1))
    assert torch.isfinite(sparse_decode_grad_values(_dev(torch.randn(N, D)), i_d, W_d, alpha_d, mask=mask_d)).all()
    for deterministic in (False, True):
        dW = sparse_decode_grad_weight(_dev(torch.randn(N, D)), v_d, i_d, M, alpha_d, mask=mask_d,
                                       deterministic=deterministic)
        assert torch.isfinite(dW).all()


@needs_triton
def test_empty_shapes():
    W, alpha = _dev(torch.randn(2, 5, 6), torch.ones(2))
    none = _dev(torch.zeros(0, 2, 3), torch.zeros(0, 2, 3, dtype=torch.int64))
    g0 = _dev(torch.zeros(0, 6))
    assert sparse_decode(*none, W, alpha).shape == (0, 6)
    assert sparse_decode_grad_values(g0, none[1], W, alpha).shape == (0, 2, 3)
    for deterministic in (False, True):
        dW = sparse_decode_grad_weight(g0, *none, 5, alpha, deterministic=deterministic)
        assert dW.shape == (2, 5, 6) and (dW == 0).all()
    # K = 0 slots: the output is the bias alone.
    bias = _dev(torch.randn(6))
    out = sparse_decode(*_dev(torch.zeros(4, 2, 0), torch.zeros(4, 2, 0, dtype=torch.int64)), W, alpha, bias=bias)
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


@needs_triton
@pytest.mark.parametrize("per_member,deterministic", [(False, False), (True, True)])
def test_autograd_matches_ref(per_member, deterministic):
    N, J, K, M, D = 7, 3, 8, 19, 48
    values, indices, W, alpha, _ = _inputs(N, J, K, M, D, masked=False)
    b_dec = torch.randn(J, D)
    target = torch.randn(N, J, D) if per_member else torch.randn(N, D)

    def grads(use_kernel):
        device = DEVICE if use_kernel else CPU  # the kernels on DEVICE, the eager reference on the CPU
        idx, a, tgt = (t.to(device) for t in (indices, alpha, target))
        v, w, b = (t.to(device, copy=True).requires_grad_() for t in (values, W, b_dec))
        if use_kernel:
            bias = a.view(J, 1) * b if per_member else (a.view(J, 1) * b).sum(0)
            out = _Decode.apply(v, w, bias, idx, a, per_member, deterministic)
        elif per_member:
            out = a.view(1, J, 1) * (ref.decode_members_sparse(SparseCodes(v, idx, M), w) + b)
        else:
            out = ref.decode_sparse(SparseCodes(v, idx, M), w, b, a)
        ((out - tgt) ** 2).sum().backward()
        return out.detach(), v.grad, w.grad, b.grad

    for name, got, want in zip(("out", "values", "W_dec", "b_dec"), grads(True), grads(False)):
        assert got.device.type == DEVICE.type and want.device.type == "cpu"
        _close(got, want.double(), msg=f"autograd {name}")


def _on_device(kwargs):
    """``kwargs`` with its CPU tensors moved to ``DEVICE`` (strides kept; meta tensors stay on meta)."""
    return {k: t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
            for k, t in kwargs.items()}


def _bad_cases():
    N, J, K, M, D = 4, 2, 3, 5, 6
    v, i, W, a = torch.randn(N, J, K), torch.randint(0, M, (N, J, K)), torch.randn(J, M, D), torch.ones(J)
    g = torch.randn(N, D)
    fwd = dict(values=v, indices=i, W_dec=W, alpha=a)
    gv = dict(grad_out=g, indices=i, W_dec=W, alpha=a)
    gw = dict(grad_out=g, values=v, indices=i, n_latents=M, alpha=a)
    meta = torch.device("meta")
    cases = [
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
    cases = [(fn, _on_device(kwargs), match) for fn, kwargs, match in cases]
    if CUDA:
        # CPU tensors beside CUDA ones, and CPU tensors alone without the interpreter (TRITON_INTERPRET is
        # unset on a GPU machine; under the interpreter CPU tensors are the ones the kernels run on).
        fwd_d, gv_d, gw_d = _on_device(fwd), _on_device(gv), _on_device(gw)
        cases += [
            (sparse_decode, {**fwd_d, "alpha": a}, "one device"),
            (sparse_decode, {**fwd_d, "bias": torch.randn(D)}, "one device"),
            (sparse_decode_grad_values, {**gv_d, "grad_out": g}, "one device"),
            (sparse_decode_grad_weight, {**gw_d, "values": v}, "one device"),
            (sparse_decode, fwd, "CUDA"),
            (sparse_decode_grad_values, gv, "CUDA"),
            (sparse_decode_grad_weight, gw, "CUDA"),
        ]
    return cases


def _check_out_of_range_is_dropped(fn, kwargs):
    """On CUDA the index range is not checked on the host (a device sync per call): the launchers must treat an
    out-of-range index as a dropped slot — the same result as masking it out — and still write every element."""
    i = kwargs["indices"]
    M = kwargs["n_latents"] if "n_latents" in kwargs else kwargs["W_dec"].shape[1]
    keep = (i >= 0) & (i < M)
    assert not bool(keep.all()), "the case must have out-of-range indices"
    masked = {**kwargs, "indices": i.clamp(0, M - 1), "mask": keep}
    _close(fn(**kwargs), fn(**masked).double(), msg="out-of-range index as a dropped slot")


@needs_triton
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_value_error(case):
    fn, kwargs, match = _bad_cases()[case]
    if match == "must lie in" and CUDA:
        _check_out_of_range_is_dropped(fn, kwargs)
        return
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
