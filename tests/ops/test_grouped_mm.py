"""saefast.ops.grouped_mm: the native extension's grouped matmul (``torch.ops.saefast.grouped_mm``) against a matmul
per group and ``torch._grouped_mm``, forward and backward, on ragged groups (empty ones included), strided operands,
bad input and ``opcheck``. Outputs are poisoned (see tests/ops/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, needs_extension, rand

from saefast import ops

pytestmark = needs_extension

OPS = torch.ops.saefast


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


def test_opcheck_grouped_mm():
    torch.library.opcheck(OPS.grouped_mm.default, ([rand(3, 4).requires_grad_(True), rand(5, 4)],
                                                   [rand(2, 4), rand(7, 4).requires_grad_(True)], False, True))
