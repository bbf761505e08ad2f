"""The CUDA ops of csrc/cuda_bindings.cpp, run on CPU tensors with the kernels under the host emulation (run.sh).

References: float64 torch for grouped_mm and the sparse decode family (the contracts of
kernels/saefast_triton/sparse_decode.py and kernels/saefast_triton/sparse_decode_backward.py, including dropped slots:
masked or out-of-range indices, NaN values there); the Triton kernels of kernels/saefast_triton/topk_encode.py (imported
as ``saefast_triton``, not through saefast) in Triton's interpreter for the encoders (integer-valued inputs, so every
fp32 sum is exact and both sides must agree bit for bit, ties and padding included). Not a pytest module: run.sh runs it
as a script (SAEFAST_EMU_LIB = the library it built).
"""

from __future__ import annotations

import itertools
import os
import time

import torch

torch.ops.load_library(os.environ["SAEFAST_EMU_LIB"])
S = torch.ops.saefast
F = [torch.float32, torch.bfloat16, torch.float16]
UNIT = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
checks = 0


def close(out, ref, dtype, msg):
    """``out`` within a few roundings (in ``dtype``) of the float64 ``ref``, and no NaN."""
    global checks
    assert out.shape == ref.shape, f"{msg}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel():
        scale = 1.0 + ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert not torch.isnan(out.double()).any(), f"{msg}: NaN in output"
        assert err <= 4 * UNIT[dtype] * scale + 1e-5 * scale, f"{msg}: max error {err:.3e} (scale {scale:.3g})"
    checks += 1


def expect_error(fn, what):
    try:
        fn()
    except RuntimeError as e:
        print(f"  ok: {what} -> {str(e).splitlines()[0][:110]}")
        return
    raise AssertionError(f"no error for {what}")


def test_grouped_mm():
    def op(t, tr):
        return t.t() if tr else t

    for dtype, ta, tb in itertools.product(F, [False, True], [False, True]):
        shapes = [(70, 130, 33), (0, 5, 7), (5, 0, 7), (64, 64, 0), (1, 1, 1), (129, 17, 64)]
        A = [torch.randn((k, m) if ta else (m, k)).to(dtype) for m, n, k in shapes]
        B = [torch.randn((n, k) if tb else (k, n)).to(dtype) for m, n, k in shapes]
        # Strided operands: op(a) = a [40, 36] row slice with a step, op(b) = a column-major [36, 11] (or, as b^T,
        # a [11, 36] row slice with a step).
        a_view = torch.randn(80, 90).to(dtype)[::2, 5:41]
        A.append(a_view.t() if ta else a_view)
        B.append(torch.randn(22, 36).to(dtype)[::2] if tb else torch.randn(11, 36).to(dtype).t())
        outs = S.grouped_mm(A, B, ta, tb)
        assert len(outs) == len(A)
        for g, (a, b, c) in enumerate(zip(A, B, outs)):
            assert c.dtype == dtype and c.is_contiguous()
            close(c, op(a, ta).double() @ op(b, tb).double(), dtype, f"grouped_mm group {g} {dtype} ta={ta} tb={tb}")
    expect_error(lambda: S.grouped_mm([torch.randn(2, 3)], [torch.randn(4, 2)]), "grouped_mm inner size mismatch")
    expect_error(lambda: S.grouped_mm([torch.randn(2, 3)], []), "grouped_mm list lengths")
    expect_error(lambda: S.grouped_mm([torch.randn(2, 3)], [torch.randn(3, 2).double()]), "grouped_mm dtype")


def kept_of(indices, mask, M):
    kept = (indices >= 0) & (indices < M)
    return kept & mask if mask is not None else kept


def gathered_rows(W, indices):
    """``W[j, indices[n, j, k]]`` as float64 ``[N, J, K, D]`` (clamped indices; callers zero the dropped slots)."""
    J, M, D = W.shape
    if M == 0:
        return torch.zeros(*indices.shape, D, dtype=torch.float64)
    return W.double()[torch.arange(J).view(1, J, 1), indices.clamp(0, M - 1)]


def make_slots(N, J, K, M, vdtype, strided, oob, with_mask):
    values = torch.randn(N, J, K).to(vdtype)
    indices = torch.randint(0, max(M, 1), (N, J, K))
    if strided:  # same logical [N, J, K] tensors, permuted storage
        values = values.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        indices = indices.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if oob:  # out-of-range indices are dropped slots, never dereferenced
        sel = torch.rand(N, J, K) < 0.25
        indices = torch.where(sel, torch.where(torch.rand(N, J, K) < 0.5, -3, M + 5), indices)
    mask = None
    if with_mask:
        mask = torch.rand(N, J, K) < 0.7
        values = torch.where(mask, values, torch.full((), float("nan"), dtype=vdtype))  # must not leak
    return values, indices, mask


def test_sparse_decode_family():
    # (200, 1, 3, 2, 40): CSR rows of ~300 slots, several staged chunks of 64 (blockDim for D = 40).
    cases = [(9, 3, 5, 11, 70), (1, 1, 1, 1, 1), (20, 2, 40, 7, 130), (5, 4, 0, 6, 33), (0, 2, 3, 4, 8),
             (200, 1, 3, 2, 40)]
    variants = [  # (W dtype, values dtype, per_member, strided, oob, mask, bias dtype, grad dtype, expanded grad)
        (torch.float32, torch.float32, False, False, False, False, None, torch.float32, False),
        (torch.float32, torch.float32, True, True, True, True, torch.float32, torch.float32, False),
        (torch.bfloat16, torch.float32, False, True, True, False, torch.float16, torch.bfloat16, False),
        (torch.bfloat16, torch.bfloat16, True, False, False, True, torch.bfloat16, torch.float32, True),
        (torch.float16, torch.float32, False, False, True, True, torch.float32, torch.float16, True),
        (torch.float16, torch.float16, True, True, False, False, None, torch.float16, False),
    ]
    for (N, J, K, M, D), (wdt, vdt, pm, strided, oob, with_mask, bdt, gdt, expanded) in itertools.product(
            cases, variants):
        tag = f"N,J,K,M,D={N, J, K, M, D} W={wdt} v={vdt} per_member={pm} strided={strided} oob={oob} mask={with_mask}"
        values, indices, mask = make_slots(N, J, K, M, vdt, strided, oob, with_mask)
        W = torch.randn(J, M, D).to(wdt)
        alpha = torch.rand(J) + 0.5
        bias = None if bdt is None else torch.randn(*((J, D) if pm else (D,))).to(bdt)
        kept = kept_of(indices, mask, M)
        zero = torch.zeros((), dtype=torch.float64)
        v = torch.where(kept, values.double().nan_to_num(), zero)
        rows = torch.where(kept[..., None], gathered_rows(W, indices), zero)
        a = alpha.double().view(1, J, 1)

        out = S.native_sparse_decode(values, indices, W, alpha, bias, mask, pm)
        assert out.dtype == wdt
        per = a * (v[..., None] * rows).sum(2)  # [N, J, D]
        ref = (per if pm else per.sum(1)) + (0 if bias is None else bias.double())
        close(out, ref, wdt, f"decode {tag}")

        g = torch.randn(*((N, J, D) if pm else (N, D))).to(gdt)
        if expanded:  # a broadcast grad_out (stride 0 along N) is read in place
            g = torch.randn(*g.shape[1:]).to(gdt).expand(*g.shape)
        gg = g.double() if pm else g.double()[:, None, :].expand(N, J, D)
        dv = S.native_sparse_decode_grad_values(g, indices, W, alpha, mask)
        assert dv.dtype == torch.float32
        # fp32 outputs of exactly representable inputs: only the fp32 accumulation differs from the reference.
        close(dv, torch.where(kept, a * (rows * gg[:, :, None, :]).sum(-1), zero), torch.float32,
              f"grad_values {tag}")

        ref_w = torch.zeros(J * M, D, dtype=torch.float64)
        flat = (indices.clamp(0, max(M - 1, 0)) + torch.arange(J).view(1, J, 1) * M)[kept]
        ref_w.index_add_(0, flat, (a[..., None] * v[..., None] * gg[:, :, None, :])[kept])
        for det in (False, True):
            dW = S.native_sparse_decode_grad_weight(g, values, indices, M, alpha, mask, det)
            assert dW.dtype == torch.float32
            close(dW, ref_w.view(J, M, D), torch.float32, f"grad_weight deterministic={det} {tag}")
    W = torch.randn(2, 5, 4)
    i32 = torch.zeros(3, 2, 2, dtype=torch.int32)
    i64 = torch.zeros(3, 2, 2, dtype=torch.long)
    expect_error(lambda: S.native_sparse_decode(torch.randn(3, 2, 2), i32, W, torch.ones(2), None, None, False),
                 "int32 indices")
    expect_error(lambda: S.native_sparse_decode(torch.randn(3, 2, 2), i64, W.transpose(1, 2), torch.ones(2), None,
                                                None, False), "non-contiguous W_dec")
    expect_error(lambda: S.native_sparse_decode(torch.randn(3, 2, 2), i64, W, torch.ones(2), torch.randn(4), None,
                                                True), "per-member decode with a [D] bias")
    expect_error(lambda: S.native_sparse_decode_grad_values(torch.randn(3, 7), i64, W, torch.ones(2), None),
                 "grad_out width")
    expect_error(lambda: S.native_sparse_decode_grad_weight(torch.randn(3, 4), torch.randn(3, 2, 2), i64, -1,
                                                            torch.ones(2), None, False), "negative n_latents")


def integer_problem(N, D, J, M):
    """Small-integer inputs: exact fp32 sums (identical pre-activations on both sides) and many ties."""
    return (torch.randint(-2, 3, (N, D)).float(), torch.randint(-2, 3, (J, M, D)).float(),
            torch.randint(-2, 3, (J, M)).float())


def test_encoders():
    from saefast_triton.topk_encode import threshold_encode, topk_encode  # kernels/ on PYTHONPATH (run.sh)

    global checks
    for N, D, J, M, k, aux_k in [(7, 5, 3, 40, 4, 3), (1, 3, 1, 1, 1, 1), (33, 8, 2, 70, 70, 70), (0, 4, 2, 9, 2, 2)]:
        x, W, b = integer_problem(N, D, J, M)
        for dead in (None, torch.rand(J, M) < 0.3, torch.zeros(J, M, dtype=torch.bool)):
            ak = aux_k if dead is not None else 0
            ours = S.native_topk_encode(x, W, b, k, dead, ak)
            ref = topk_encode(x, W, b, k, dead=dead, aux_k=ak)
            for o, r, name in zip(ours, ref, ["values", "indices", "aux_values", "aux_indices"]):
                if r is None:
                    assert o.shape == (N, J, 0), name
                    continue
                assert o.dtype == r.dtype and torch.equal(o, r), f"topk_encode {name} N,D,J,M={N, D, J, M} k={k}"
                checks += 1
    for N, D, J, M, cap in [(7, 5, 3, 40, 4), (9, 3, 2, 30, 30), (0, 2, 2, 5, 3)]:
        x, W, b = integer_problem(N, D, J, M)
        lower = torch.randint(-2, 3, (J, M)).float()
        ours = S.native_threshold_encode(x, W, b, lower, cap)
        ref = threshold_encode(x, W, b, lower, cap, raise_on_overflow=False)
        for o, r, name in zip(ours, ref, ["values", "indices", "counts", "overflow"]):
            assert o.dtype == r.dtype and torch.equal(o, r), f"threshold_encode {name} N,D,J,M={N, D, J, M}"
            checks += 1
    # Several row blocks: J*M = 4M entries make a block 2 rows (topk) / 4 rows (threshold) of the 5.
    N, D, J, M = 5, 3, 2, 1 << 21
    x, W, b = torch.randn(N, D), torch.randn(J, M, D), torch.randn(J, M)
    pre = torch.addmm(b.reshape(-1), x, W.reshape(J * M, D).T).view(N, J, M)
    dead = torch.rand(J, M) < 0.01
    v, i, av, ai = S.native_topk_encode(x, W, b, 5, dead, 4)
    rv, ri = pre.topk(5, -1)
    rav, rai = pre.masked_fill(~dead, float("-inf")).topk(4, -1)
    # Values may differ in the last bit: the blocks' matmuls need not round like the reference's single one.
    assert torch.equal(i, ri) and torch.equal(ai, rai)
    assert torch.allclose(v, rv, rtol=1e-6, atol=1e-5) and torch.allclose(av, rav, rtol=1e-6, atol=1e-5)
    lower = torch.full((J, M), 3.0)
    tv, ti, tc, overflow = S.native_threshold_encode(x, W, b, lower, 64)
    keep = pre > lower
    assert torch.equal(tc, keep.sum(-1)) and bool(overflow) == bool((tc > 64).any())
    for n, j in itertools.product(range(N), range(J)):
        idx = keep[n, j].nonzero().flatten()[:64]
        c = len(idx)
        assert torch.equal(ti[n, j, :c], idx) and torch.allclose(tv[n, j, :c], pre[n, j, idx], rtol=1e-6, atol=1e-5)
        assert (ti[n, j, c:] == 0).all() and (tv[n, j, c:] == 0).all()
    checks += 2
    W = torch.randn(2, 5, 4)
    expect_error(lambda: S.native_topk_encode(torch.randn(3, 4), W, torch.randn(2, 5), 6, None, 0), "k > M")
    expect_error(lambda: S.native_topk_encode(torch.randn(3, 4), W, torch.randn(2, 5), 2, None, 1),
                 "aux_k without dead")
    expect_error(lambda: S.native_threshold_encode(torch.randn(3, 4), W, torch.randn(2, 5),
                                                   torch.randn(2, 5).double(), 2), "float64 lower")


if __name__ == "__main__":
    for test in (test_grouped_mm, test_sparse_decode_family, test_encoders):
        torch.manual_seed(0)
        t0 = time.time()
        test()
        print(f"{test.__name__}: ok ({time.time() - t0:.1f}s, {checks} checks so far)", flush=True)
    print(f"emu: all {checks} checks passed")
