"""The native extension (csrc/, ``torch.ops.saefast.native_*`` and ``grouped_mm``) against the eager reference.

Every op on random ragged shapes (non-power-of-two N, J, K, M, D), forward and backward, with outputs poisoned
(NaN / -1) before the kernels write them; results bit-identical for 1 and 2 threads; bad input rejected with a
ValueError naming the problem; the native backend trains models that match the torch backend; and saefast still
imports (with one warning) when the extension is missing. Training on the native backend against the torch one,
and ``torch.compile`` through the ops, are in ``tests/test_ops.py`` beside the same tests for Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

from saefast import native, ops, ref
from saefast.codes import SparseCodes

pytestmark = pytest.mark.skipif(os.environ.get("SAEFAST_NO_EXTENSION") == "1",
                                reason="built without the extension on purpose")

OPS = torch.ops.saefast


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    from saefast import _C

    _C.set_poison_outputs(True)
    yield
    _C.set_poison_outputs(False)


def rand(*shape, seed=None, kind="randn"):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape) * 7 + len(shape))
    return getattr(torch, kind)(*shape, generator=g)


def random_stack(J, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(J, M, D, generator=g) / D**0.5
    b_enc, W_dec = 0.1 * torch.randn(J, M, generator=g), torch.randn(J, M, D, generator=g)
    return W_enc, b_enc, W_dec, torch.randn(J, D, generator=g)


def threads(n):
    class _Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Threads()


SHAPES = [(1, 1, 1, 1, 1), (7, 3, 5, 37, 24), (40, 2, 8, 9, 33), (130, 3, 32, 50, 16)]  # N, J, K, M, D


def test_extension_is_built_and_registered():
    assert native.available(), native.why_unavailable()
    assert native.supports(torch.device("cpu"))
    from saefast import _C

    assert _C.with_openmp()
    for name in ("grouped_mm", "native_sparse_decode", "native_sparse_decode_grad_values",
                 "native_sparse_decode_grad_weight", "native_topk_encode", "native_threshold_encode"):
        assert hasattr(OPS, name), name
    assert ops.resolve_backend("auto", torch.device("cpu")) == "native"
    assert ops.resolve_backend("auto", torch.device("cpu"), activation="relu") == "torch"
    with pytest.raises(ValueError, match="native.*relu"):
        ops.resolve_backend("native", torch.device("cpu"), activation="relu")


# ------------------------------------------------------------------------------------------------------
# Sparse decode and its backward
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("N", "J", "K", "M", "D"), SHAPES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sparse_decode_forward_and_backward_match_reference(N, J, K, M, D, per_member, with_mask):
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=N)
    values = rand(N, J, K, kind="rand")
    indices = torch.randint(0, M, (N, J, K), generator=torch.Generator().manual_seed(1))
    indices[0, 0, :] = indices[0, 0, 0]  # repeated latents add up
    alpha = torch.linspace(0.5, 2.0, J)
    mask = rand(N, J, K, kind="rand") > 0.3 if with_mask else None
    bias = b_dec if per_member else b_dec[0]
    leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, bias)]
    out = OPS.native_sparse_decode(leaves[0], indices, leaves[1], alpha, leaves[2], mask, per_member)
    ref_leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, bias)]
    kept = ref_leaves[0] if mask is None else ref_leaves[0] * mask
    members = ref.decode_members_sparse(SparseCodes(kept, indices, M), ref_leaves[1]) * alpha.view(1, J, 1)
    want = members + ref_leaves[2] if per_member else members.sum(1) + ref_leaves[2]
    assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = rand(*out.shape)
    for name, got, expected in zip(("values", "W_dec", "bias"), torch.autograd.grad((out * g).sum(), leaves),
                                   torch.autograd.grad((want * g).sum(), ref_leaves)):
        assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


def test_masked_slots_are_never_read():
    N, J, K, M, D = 5, 2, 4, 6, 8
    values = rand(N, J, K)
    values[:, :, -1] = float("nan")
    indices = torch.randint(0, M, (N, J, K))
    indices[:, :, -1] = 10**9  # out of range, but masked out
    mask = torch.ones(N, J, K, dtype=torch.bool)
    mask[:, :, -1] = False
    W = rand(J, M, D)
    out = OPS.native_sparse_decode(values, indices, W, torch.ones(J), None, mask, False)
    want = ref.decode_members_sparse(SparseCodes(values[..., :-1], indices[..., :-1], M), W).sum(1)
    assert_close(out, want, atol=1e-5)
    dv = OPS.native_sparse_decode_grad_values(rand(N, D), indices, W, torch.ones(J), mask)
    assert bool((dv[..., -1] == 0).all()) and bool(torch.isfinite(dv).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_low_precision_weights(dtype):
    N, J, K, M, D = 19, 2, 6, 30, 40
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=3)
    values, indices = rand(N, J, K, kind="rand"), torch.randint(0, M, (N, J, K))
    W = W_dec.to(dtype)
    out = OPS.native_sparse_decode(values, indices, W, torch.full((J,), 0.5), b_dec[0].to(dtype), None, False)
    assert out.dtype == dtype
    want = 0.5 * ref.decode_members_sparse(SparseCodes(values, indices, M), W.float()).sum(1) + b_dec[0].to(dtype)
    assert_close(out, want, atol=2e-2, rtol=1e-2)  # fp32 sums, one rounding to the storage type


@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_backward_equals_the_two_gradient_ops(with_mask):
    N, J, K, M, D = 37, 3, 6, 23, 19
    _, _, W_dec, _ = random_stack(J, M, D, seed=4)
    values, indices = rand(N, J, K), torch.randint(0, M, (N, J, K), generator=torch.Generator().manual_seed(2))
    mask = rand(N, J, K, kind="rand") > 0.4 if with_mask else None
    alpha = torch.linspace(0.3, 1.0, J)
    for g in (rand(N, D), rand(N, J, D)):
        dv, dW = OPS.native_sparse_decode_backward(g, values, indices, W_dec, alpha, mask)
        assert_close(dv, OPS.native_sparse_decode_grad_values(g, indices, W_dec, alpha, mask), atol=1e-5, rtol=1e-5)
        assert torch.equal(dW, OPS.native_sparse_decode_grad_weight(g, values, indices, M, alpha, mask, False))
        if mask is not None:
            assert bool((dv[~mask] == 0).all())


def test_grad_weight_gives_unselected_rows_exact_zeros_and_handles_collisions():
    N, J, K, M, D = 60, 2, 4, 50, 7
    values = rand(N, J, K)
    indices = torch.randint(0, 3, (N, J, K))  # only latents 0..2: heavy collisions, rows 3.. untouched
    g = rand(N, J, D)
    dW = OPS.native_sparse_decode_grad_weight(g, values, indices, M, torch.ones(J), None, False)
    assert bool((dW[:, 3:] == 0).all())
    want = torch.zeros(J, M, D)
    for j in range(J):
        want[j].index_add_(0, indices[:, j].reshape(-1), (values[:, j].unsqueeze(-1) * g[:, j].unsqueeze(1))
                           .reshape(-1, D))
    assert_close(dW, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Fused encode → top-k / threshold
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("N", "J", "M", "D", "k"), [(1, 1, 8, 5, 1), (13, 3, 37, 24, 8), (150, 2, 2100, 33, 32),
                                                    (20, 1, 64, 16, 64), (300, 2, 700, 20, 100)])  # k > 64: buffer
@pytest.mark.parametrize("per_member_input", [False, True])
def test_topk_encode_matches_reference_forward_and_backward(N, J, M, D, k, per_member_input):
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=N + M)
    x = rand(N, J, D) if per_member_input else rand(N, D)
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    codes, _ = ops.topk_encode(*leaves, k, backend="native")
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    pre = ref.pre_activations(*ref_leaves)
    want = pre.detach().topk(k, dim=-1)
    # Sorted descending, the same values; the indices point at those values (ties may pick either latent).
    assert_close(codes.values, torch.relu(want.values), atol=1e-5, rtol=1e-5)
    assert_close(pre.detach().gather(-1, codes.indices), want.values, atol=1e-5, rtol=1e-5)
    assert bool((codes.indices.sort(-1).values[..., 1:] != codes.indices.sort(-1).values[..., :-1]).all())
    weights = rand(N, J, M)
    grads = torch.autograd.grad((codes.to_dense().view(N, J, M) * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref.topk_activation(pre, k) * weights).sum(), ref_leaves)
    for name, got, expected in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        # Both sides sum in fp32 in different orders (native's depends on the CPU's vector width): each is ~4e-7
        # of the gradient's largest magnitude from the fp64 value (b_dec's reaches 80 here), so the bound scales.
        scale = float(expected.abs().max())
        assert_close(got, expected, atol=max(1e-5, 2e-6 * scale), rtol=1e-4, msg=f"grad {name}")


def test_topk_encode_ties_go_to_the_lower_latent_and_aux_pads_with_minus_inf():
    J, M, D = 2, 40, 4
    W_enc = torch.zeros(J, M, D)
    bias = torch.zeros(J, M)
    bias[:, 10:20] = 1.0  # ten tied maxima
    x = rand(3, D)
    dead = torch.zeros(J, M, dtype=torch.bool)
    dead[0, 5:8] = True  # three dead latents, aux_k = 5: two padding slots
    values, indices, aux_v, aux_i = OPS.native_topk_encode(x, W_enc, bias, 4, dead, 5)
    assert torch.equal(indices, torch.arange(10, 14).expand(3, J, 4))
    assert bool((values == 1).all())
    assert torch.equal(aux_i[:, 0, :3], torch.tensor([5, 6, 7]).expand(3, 3))
    assert bool(torch.isinf(aux_v[:, 0, 3:]).all()) and bool((aux_i[:, 0, 3:] == 0).all())
    assert bool(torch.isinf(aux_v[:, 1]).all())  # member 1 has no dead latent


def test_topk_encode_ties_with_more_than_64_slots():
    J, M, D = 2, 300, 4
    bias = torch.zeros(J, M)
    bias[:, 50:250] = 1.0  # 200 tied maxima for 100 slots: the append-buffer path keeps the lowest latents
    values, indices, _, _ = OPS.native_topk_encode(rand(5, D), torch.zeros(J, M, D), bias, 100, None, 0)
    assert torch.equal(indices, torch.arange(50, 150).expand(5, J, 100))
    assert bool((values == 1).all())


@pytest.mark.parametrize("aux_k", [6, 80])  # 80: the append-buffer top-k (more than 64 slots)
def test_auxk_codes_match_reference(aux_k):
    N, J, M, D, k = 33, 3, 2300, 16, 4  # M spans two column tiles
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=5)
    x = rand(N, D)
    dead = torch.zeros(J, M, dtype=torch.bool)
    dead[0, ::3] = True
    dead[1, 2040:2050] = True  # across the tile boundary
    _, aux = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend="native")
    _, want = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend="torch")
    assert_close(aux.to_dense(), want.to_dense(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_member_input", [False, True])
def test_threshold_encode_matches_dense_threshold(per_member_input):
    N, J, M, D = 21, 2, 2100, 12
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=9)
    x = rand(N, J, D) if per_member_input else rand(N, D)
    bias = ops.folded_bias(W_enc, b_enc, b_dec).float()
    lower = 0.3 * rand(J, M, kind="rand")
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    above = pre > lower
    capacity = int(above.sum(-1).max()) + 3  # every row fits, most rows have padding
    values, indices, counts, overflow = OPS.native_threshold_encode(x, W_enc, bias, lower, capacity)
    assert torch.equal(counts, above.sum(-1))
    assert not bool(overflow)
    for n, j in [(0, 0), (N - 1, J - 1), (N // 2, 1)]:
        c = int(counts[n, j])
        latents = above[n, j].nonzero().squeeze(-1)
        assert torch.equal(indices[n, j, :c], latents)  # ascending latent order
        assert_close(values[n, j, :c], pre[n, j, latents], atol=1e-5, rtol=1e-5)
        assert bool((values[n, j, c:] == 0).all()) and bool((indices[n, j, c:] == 0).all())
    small = OPS.native_threshold_encode(x, W_enc, bias, lower, 3)
    assert bool(small[3]) and torch.equal(small[2], counts)  # overflow flagged, counts before truncation
    assert torch.equal(small[1], indices[..., :3])  # the lowest-index latents are kept


# ------------------------------------------------------------------------------------------------------
# grouped_mm
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grouped_mm_matches_per_group_matmul_forward_and_backward(trans_a, trans_b, dtype):
    sizes = [(5, 3, 4), (300, 17, 2), (0, 4, 6), (9, 0, 5), (257, 33, 31)]  # (rows, inner, cols), ragged
    a = [rand(*((k, m) if trans_a else (m, k)), seed=i).to(dtype).requires_grad_(True)
         for i, (m, k, _) in enumerate(sizes)]
    b = [rand(*((n, k) if trans_b else (k, n)), seed=10 + i).to(dtype).requires_grad_(True)
         for i, (_, k, n) in enumerate(sizes)]
    out = ops.grouped_mm(a, b, trans_a, trans_b, backend="native")
    want = ops.grouped_mm(a, b, trans_a, trans_b, backend="torch")
    tol = 1e-5 if dtype != torch.bfloat16 else 3e-2
    for g, (got, expected) in enumerate(zip(out, want)):
        assert got.shape == expected.shape and got.dtype == dtype
        assert_close(got, expected, atol=tol, rtol=tol, msg=f"group {g}")
    weights = [rand(*o.shape, seed=20 + g).to(dtype) for g, o in enumerate(out)]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), a + b)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(want, weights)), a + b)
    for i, (got, expected) in enumerate(zip(grads, ref_grads)):
        assert_close(got, expected, atol=tol * 10, rtol=tol, msg=f"grad {i}")


def test_grouped_mm_agrees_with_torch_grouped_mm_and_strided_views():
    G, K, N = 3, 16, 8
    offsets = torch.tensor([5, 5, 21], dtype=torch.int32)  # group 1 empty
    a = rand(21, K)
    b = rand(G, K, N)
    starts = [0, *offsets.tolist()[:-1]]
    out = torch.cat(ops.grouped_mm([a[s:e] for s, e in zip(starts, offsets.tolist())], list(b), backend="native"))
    assert_close(out, torch._grouped_mm(a, b, offs=offsets), atol=1e-5, rtol=1e-5)
    wide = rand(40, 64)[:, ::2]  # non-contiguous operands are read in place
    assert_close(ops.grouped_mm([wide], [wide.t()], backend="native")[0], wide @ wide.t(), atol=1e-4, rtol=1e-5)


def test_grouped_mm_rejects_bad_input():
    with pytest.raises(ValueError, match="inner dimensions differ"):
        ops.grouped_mm([rand(3, 4)], [rand(5, 2)], backend="native")
    with pytest.raises(ValueError, match="2 groups but b has 1"):
        ops.grouped_mm([rand(3, 4), rand(3, 4)], [rand(4, 2)], backend="native")
    with pytest.raises(ValueError, match="share one dtype"):
        ops.grouped_mm([rand(3, 4), rand(3, 4).double()], [rand(4, 2), rand(4, 2)], backend="native")
    with pytest.raises(ValueError, match="2-D"):
        ops.grouped_mm([rand(3, 4, 1)], [rand(4, 2)], backend="native")


# ------------------------------------------------------------------------------------------------------
# Thread-count independence, validation, registration
# ------------------------------------------------------------------------------------------------------


def test_results_are_bit_identical_for_any_thread_count():
    N, J, K, M, D = 300, 3, 16, 2500, 40
    W_enc, b_enc, W_dec, b_dec = random_stack(J, M, D, seed=11)
    x = rand(N, D)
    bias = ops.folded_bias(W_enc, b_enc, b_dec).float()
    dead = rand(J, M, kind="rand") < 0.1
    g = rand(N, D)
    a = [rand(300, 40, seed=1), rand(700, 40, seed=2)]
    b = [rand(40, 50, seed=3), rand(40, 9, seed=4)]

    def run():
        values, indices, aux_v, aux_i = OPS.native_topk_encode(x, W_enc, bias, K, dead, 8)
        out = OPS.native_sparse_decode(values, indices, W_dec, torch.full((J,), 1 / J), b_dec[0], None, False)
        dv = OPS.native_sparse_decode_grad_values(g, indices, W_dec, torch.ones(J), None)
        dW = OPS.native_sparse_decode_grad_weight(g, values, indices, M, torch.ones(J), None, False)
        thr = OPS.native_threshold_encode(x, W_enc, bias, torch.full((J, M), 0.2), 64)
        fused = OPS.native_sparse_decode_backward(g, values, indices, W_dec, torch.ones(J), None)
        return [values, indices, aux_v, aux_i, out, dv, dW, *thr, *fused, *OPS.grouped_mm(a, b, False, False)]

    with threads(1):
        one = run()
    with threads(2):
        two = run()
    for i, (p, q) in enumerate(zip(one, two)):
        assert torch.equal(p, q), f"output {i} differs between 1 and 2 threads"


def test_bad_input_is_rejected_before_compute():
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
    x, bias = rand(4, D), torch.zeros(J, M)
    with pytest.raises(ValueError, match="k must satisfy"):
        OPS.native_topk_encode(x, W, bias, M + 1, None, 0)
    with pytest.raises(ValueError, match="aux_k > 0 needs"):
        OPS.native_topk_encode(x, W, bias, 2, None, 3)
    with pytest.raises(ValueError, match="bias must be float32"):
        OPS.native_topk_encode(x, W, bias.double(), 2, None, 0)
    with pytest.raises(ValueError, match="x has D = 5"):
        OPS.native_topk_encode(rand(4, 5), W, bias, 2, None, 0)
    with pytest.raises(ValueError, match="per-member input"):
        OPS.native_topk_encode(rand(4, J + 1, D), W, bias, 2, None, 0)
    with pytest.raises(ValueError, match="capacity must satisfy"):
        OPS.native_threshold_encode(x, W, bias, torch.zeros(J, M), 0)
    with pytest.raises(ValueError, match="lower must be"):
        OPS.native_threshold_encode(x, W, bias, torch.zeros(J, M + 1), 3)


def test_opcheck_of_the_native_ops():  # torch.compile through them: tests/test_ops.py
    N, J, M, D, K = 6, 2, 10, 8, 3
    W_enc, b_enc, W_dec, b_dec = random_stack(J, M, D, seed=2)
    values = rand(N, J, K, kind="rand").requires_grad_(True)
    indices = torch.randint(0, M, (N, J, K))
    alpha = torch.tensor([0.5, 0.5])
    torch.library.opcheck(OPS.native_sparse_decode.default,
                          (values, indices, W_dec.clone().requires_grad_(True), alpha, b_dec[0], None, False))
    torch.library.opcheck(OPS.native_sparse_decode.default,
                          (values, indices, W_dec, alpha, b_dec, rand(N, J, K, kind="rand") > 0.5, True))
    torch.library.opcheck(OPS.native_sparse_decode_backward.default,
                          (rand(N, J, D), values.detach(), indices, W_dec, alpha, rand(N, J, K, kind="rand") > 0.5))
    bias = ops.folded_bias(W_enc, b_enc, b_dec).detach()
    dead = torch.zeros(J, M, dtype=torch.bool)
    dead[:, :4] = True
    torch.library.opcheck(OPS.native_topk_encode.default,
                          (rand(N, D).requires_grad_(True), W_enc.clone().requires_grad_(True), bias, K, dead, 2))
    torch.library.opcheck(OPS.native_threshold_encode.default,
                          (rand(N, D).requires_grad_(True), W_enc.clone().requires_grad_(True), bias,
                           torch.full((J, M), 0.1), 6))
    torch.library.opcheck(OPS.grouped_mm.default, ([rand(3, 4).requires_grad_(True), rand(5, 4)],
                                                   [rand(2, 4), rand(7, 4).requires_grad_(True)], False, True))


# ------------------------------------------------------------------------------------------------------
# Without the extension (models on the native backend: tests/test_ops.py, with the Triton ones)
# ------------------------------------------------------------------------------------------------------


def test_without_the_extension_saefast_warns_once_on_first_use_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['saefast._C'] = None\n"  # makes `from .. import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, saefast as sf\n"
        "    from saefast import ops\n"
        "    assert not caught, [str(w.message) for w in caught]\n"  # importing does not load the extension
        "    assert not sf.native.available() and not sf.native.available()\n"
        "msgs = [str(w.message) for w in caught if 'native extension' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'saefast._C' in sf.native.why_unavailable()\n"
        "assert ops.resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
        "try:\n"
        "    ops.resolve_backend('native', torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    assert 'saefast._C' in str(e)\n"
        "else:\n"
        "    raise AssertionError('native should be refused')\n"
        "m = sf.SAE(sf.SAEConfig(d_in=8, n_latents=16, k=2))\n"
        "sf.train(m, [torch.randn(16, 8)], steps=2, progress=False)\n"
        "assert sf.ops.grouped_mm([torch.eye(3)], [torch.ones(3, 2)])[0].sum() == 6\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
