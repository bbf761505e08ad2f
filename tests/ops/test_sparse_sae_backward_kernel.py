"""The Triton launcher ``saefast.kernels.sparse_sae_backward.sparse_sae_backward`` (the fused sparse backward of a
TopK / BatchTopK training step, one pass over the slots bucketed by latent) against its oracle
``saefast.ops.ref.sparse_sae_backward``.

Triton runs on ``DEVICE``: CUDA when there is a GPU, else the CPU under Triton's interpreter (see conftest.py).
Inputs are drawn on the CPU, the oracle runs on the CPU copies and results are compared on the CPU.

Shapes are ragged (N, J, M, D, S not powers of two), with J = 1, with and without an AuxK part (``split < S``,
``split = 0``), shared ``x [N, D]`` and per-member ``x [N, J, D]``, ``b_dec`` ``[J, D]`` and ``[1, D]``; values
include zeros (dead slots) and negatives (live for ``dW_dec``, cut by the ReLU for ``dpre``); latents repeat within
a row and across tokens; under the interpreter (blocks of 128) two shapes have segments longer than one chunk, more
rows than one program and ``D`` wider than one column block. Inputs are fp32 (the interpreter's bf16 ``tl.dot`` is
unreliable; this kernel has no ``tl.dot``, so bf16 / fp16 inputs are checked too, against the oracle on the same
rounded inputs: both compute in fp32).

Tolerance: within ``1e-5`` relative to the largest expected magnitude of each output (fp32 sums of at most a few
hundred terms; the kernel subtracts ``db_enc·b_dec`` once per row where the oracle centres ``X`` per slot). Rows of
latents no live slot selects and ``dpre`` of dead or negative slots are checked to be exactly 0. Outputs are
poisoned (NaN-filled allocations), so an element the kernel fails to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, DEVICE, assert_close, needs_triton

from saefast.ops import ref

try:  # importing saefast.kernels imports triton
    from saefast.kernels import sparse_decode
    from saefast.kernels import sparse_sae_backward as kernel_module
    from saefast.kernels.sparse_sae_backward import sparse_sae_backward
except ImportError:  # without triton every test here is skipped (needs_triton)
    sparse_decode = kernel_module = sparse_sae_backward = None

pytestmark = needs_triton

NAMES = ("dW_enc", "db_enc", "dW_dec", "dpre")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """NaN-filled output allocations (the launcher's ``empty`` and the one it delegates to)."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_module, "empty", nan_empty)
    monkeypatch.setattr(sparse_decode, "empty", nan_empty)


def _inputs(N, J, M, D, S, split, per_member_x, shared_b_dec, seed=0, dtype=torch.float32):
    """Random CPU inputs: ``(x, b_dec, W_dec, values, indices, split, grad_out, aux_grad_out)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, J, D, generator=g) if per_member_x else torch.randn(N, D, generator=g)
    b_dec = torch.randn(1 if shared_b_dec else J, D, generator=g)
    W_dec = torch.randn(J, M, D, generator=g)
    values = torch.rand(N, J, S, generator=g) + 0.1
    values[torch.rand(N, J, S, generator=g) < 0.25] = 0.0  # dead slots
    values[torch.rand(N, J, S, generator=g) < 0.1] *= -1.0  # live for dW_dec, cut by the ReLU for dpre
    indices = torch.randint(0, M, (N, J, S), generator=g)
    if S > 1:
        indices[:, :, 1] = indices[:, :, 0]  # a repeated latent within every row
    grad_out = torch.randn(N, J, D, generator=g)
    aux = torch.randn(N, J, D, generator=g) if split < S else None
    cast = (lambda t: t.to(dtype)) if dtype != torch.float32 else (lambda t: t)
    return cast(x), cast(b_dec), cast(W_dec), cast(values), indices, split, cast(grad_out), \
        None if aux is None else cast(aux)


def _dev(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def _check(got, want, msg=""):
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32 and g.device.type == DEVICE.type, f"{msg} {name}: {g.dtype} on {g.device}"
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        assert_close(g.cpu(), w, atol=1e-5 * scale, rtol=1e-5, msg=f"{msg} {name}")


def _check_zeros(got, args):
    """Exact zeros: rows of latents no live slot selects; dpre of dead (value 0) and negative slots."""
    x, b_dec, W_dec, values, indices, split, grad_out, aux = args
    J, M, _ = W_dec.shape
    dW_enc, db_enc, dW_dec, dpre = (t.cpu() for t in got)
    unused = torch.ones(J, M, dtype=torch.bool)
    live = values != 0
    for j in range(J):
        unused[j, indices[:, j][live[:, j]]] = False
    assert (dW_enc[unused] == 0).all() and (dW_dec[unused] == 0).all() and (db_enc[unused] == 0).all()
    assert (dpre[values.float() <= 0] == 0).all()


# (N, J, M, D, S, split, per-member x, shared b_dec)
SHAPES = [
    (1, 1, 1, 1, 1, 1, False, True),
    (13, 3, 11, 37, 7, 5, True, False),  # codes + AuxK
    (29, 1, 19, 70, 9, 9, False, True),  # J = 1, no AuxK
    (9, 2, 5, 130, 6, 0, False, False),  # AuxK only; D over one interpreter column block
    (200, 2, 2, 9, 3, 2, True, True),  # ~225-slot segments: several chunks per segment
    (11, 3, 50, 12, 4, 3, False, False),  # 150 latent rows: several programs
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-J{}-M{}-D{}-S{}-split{}-xJ{:d}-b1{:d}".format(*s))
def test_matches_reference(shape):
    args = _inputs(*shape, seed=sum(shape))
    got = sparse_sae_backward(*_dev(args))
    _check(got, ref.sparse_sae_backward(*args), msg=str(shape))
    _check_zeros(got, args)


def test_deterministic_bit_identical():
    args = _dev(_inputs(200, 2, 2, 9, 3, 2, True, False, seed=5))  # heavy collisions, long segments, AuxK
    first, second = sparse_sae_backward(*args), sparse_sae_backward(*args)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_fp32(dtype):
    args = _inputs(13, 3, 11, 37, 7, 5, True, False, seed=3, dtype=dtype)
    got = sparse_sae_backward(*_dev(args))
    _check(got, ref.sparse_sae_backward(*args), msg=str(dtype))


def test_bf16_weight_with_fp32_activations():
    x, b_dec, W_dec, values, indices, split, g, aux = _inputs(13, 2, 11, 37, 7, 5, False, True, seed=4)
    args = (x, b_dec, W_dec.to(torch.bfloat16), values, indices, split, g, aux)
    _check(sparse_sae_backward(*_dev(args)), ref.sparse_sae_backward(*args), msg="bf16 W_dec")


def test_strided_and_expanded_inputs():
    N, J, M, D, S, split = 13, 3, 11, 37, 7, 5
    x, b_dec, W_dec, values, indices, _, g, aux = _inputs(N, J, M, D, S, split, True, True, seed=6)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # [N, J, D] with other strides
    v_t = values.transpose(0, 2).contiguous().transpose(0, 2)
    i_t = indices.transpose(1, 2).contiguous().transpose(1, 2)
    g_e = torch.randn(1, 1, D).expand(N, J, D)  # the gradient of a sum arrives expanded
    aux_t = aux.transpose(1, 2).contiguous().transpose(1, 2)  # another stride along D than grad_out
    b_e = b_dec.expand(J, D)  # [J, D] with stride 0 along J
    assert not any(t.is_contiguous() for t in (x_t, v_t, i_t, g_e, aux_t, b_e))
    args = (x_t, b_e, W_dec, v_t, i_t, split, g_e, aux_t)
    _check(sparse_sae_backward(*_dev(args)), ref.sparse_sae_backward(*args), msg="strided")


def test_dead_slots_never_read():
    """A dead slot (value 0) reads nothing: NaN in the W_dec rows only dead slots select, or in its G row, stays out."""
    N, J, M, D, S, split = 13, 2, 11, 37, 7, 7
    x, b_dec, W_dec, values, indices, _, g, _ = _inputs(N, J, M, D, S, split, False, False, seed=7)
    dead_token = 4
    values[dead_token] = 0.0
    g_nan = g.clone()
    g_nan[dead_token] = float("nan")
    W_nan = W_dec.clone()
    live = values != 0
    used = torch.zeros(J, M, dtype=torch.bool)
    for j in range(J):
        used[j, indices[:, j][live[:, j]]] = True
    W_nan[~used] = float("nan")
    got = sparse_sae_backward(*_dev((x, b_dec, W_nan, values, indices, split, g_nan, None)))
    assert all(torch.isfinite(t).all() for t in got)
    _check(got, ref.sparse_sae_backward(x, b_dec, W_dec, values, indices, split, g, None), msg="dead slots")


def test_split_equal_S_accepts_an_unused_aux_gradient():
    args = _inputs(9, 2, 7, 10, 4, 4, False, True, seed=8)
    aux = torch.full((9, 2, 10), float("nan"))  # never read: every slot is a code slot
    got = sparse_sae_backward(*_dev(args[:7]), aux.to(DEVICE))
    _check(got, ref.sparse_sae_backward(*args), msg="split = S with aux")


def test_empty_shapes():
    D = 6
    W = torch.randn(2, 5, D)
    for N, S in ((0, 3), (4, 0)):
        x, b = torch.randn(N, D), torch.randn(2, D)
        v, i = torch.zeros(N, 2, S), torch.zeros(N, 2, S, dtype=torch.int64)
        dW_enc, db_enc, dW_dec, dpre = sparse_sae_backward(*_dev((x, b, W, v, i, S, torch.zeros(N, 2, D))))
        assert dW_enc.shape == dW_dec.shape == (2, 5, D) and db_enc.shape == (2, 5) and dpre.shape == (N, 2, S)
        assert all((t == 0).all() for t in (dW_enc, db_enc, dW_dec))
    # No latents at all (and so no slots).
    out = sparse_sae_backward(*_dev((torch.randn(3, D), torch.randn(2, D), torch.randn(2, 0, D),
                                     torch.zeros(3, 2, 0), torch.zeros(3, 2, 0, dtype=torch.int64), 0,
                                     torch.zeros(3, 2, D))))
    assert [tuple(t.shape) for t in out] == [(2, 0, D), (2, 0), (2, 0, D), (3, 2, 0)]


def _bad_cases():
    N, J, M, D, S, split = 4, 3, 5, 6, 3, 2
    x, b, W, v, i, _, g, a = _inputs(N, J, M, D, S, split, False, False)
    good = dict(x=x, b_dec=b, W_dec=W, values=v, indices=i, split=split, grad_out=g, aux_grad_out=a)
    meta = torch.device("meta")
    cases = [
        ({"values": v[:, :, :2]}, "differ in shape"),
        ({"values": v[0]}, r"values must be \[N, J, S\]"),
        ({"values": v.double()}, "values must be"),
        ({"indices": i.int()}, "int64"),
        ({"indices": i + M}, "must lie in"),
        ({"indices": i - M}, "must lie in"),
        ({"W_dec": W[:2]}, "members"),
        ({"W_dec": W[0]}, r"\[J, M, D\]"),
        ({"W_dec": W.transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous"),
        ({"W_dec": W.to(torch.int32)}, "W_dec must be"),
        ({"split": S + 1}, "split"),
        ({"split": -1}, "split"),
        ({"split": True}, "split"),
        ({"split": 1.0}, "split"),
        ({"aux_grad_out": None}, "aux_grad_out is required"),
        ({"aux_grad_out": a[:, :, :-1]}, "aux_grad_out must be"),
        ({"grad_out": g[:, 0]}, "grad_out must be"),
        ({"grad_out": g[:-1]}, "grad_out must be"),
        ({"grad_out": g.to(torch.int32)}, "grad_out must be"),
        ({"x": x[:, :-1]}, "x must be"),
        ({"x": torch.randn(N, J + 1, D)}, "x must be"),
        ({"x": x.double()}, "x must be"),
        ({"b_dec": b[0]}, "b_dec"),
        ({"b_dec": b[:2]}, "b_dec"),
        ({"b_dec": b[:, :-1]}, "b_dec"),
        ({"aux_grad_out": a.to(meta)}, "one device"),
        ({k: t.to(meta) if isinstance(t, torch.Tensor) else t for k, t in good.items()}, "CUDA"),
    ]
    return good, cases


@pytest.mark.parametrize("case", range(len(_bad_cases()[1])))
def test_bad_input_raises_before_launch(case, monkeypatch):
    good, cases = _bad_cases()
    change, match = cases[case]
    kwargs = {k: t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
              for k, t in {**good, **change}.items()}

    def no_launch(*args, **kwargs):
        raise AssertionError("launched before the input was validated")

    monkeypatch.setattr(kernel_module, "launch", no_launch)
    with pytest.raises(ValueError, match=match):
        sparse_sae_backward(**kwargs)


@pytest.mark.skipif(not CUDA, reason="on CPU tensors the index range is checked on the host (a ValueError)")
def test_out_of_range_index_is_a_dead_slot_on_cuda():
    args = _inputs(13, 3, 11, 37, 7, 5, True, False, seed=9)
    x, b_dec, W_dec, values, indices, split, g, aux = args
    bad = indices.clone()
    bad[0, 0, 0], bad[1, 2, 3] = -1, 11
    dead = values.clone()
    dead[0, 0, 0] = dead[1, 2, 3] = 0.0
    got = sparse_sae_backward(*_dev((x, b_dec, W_dec, values, bad, split, g, aux)))
    _check(got, ref.sparse_sae_backward(x, b_dec, W_dec, dead, indices, split, g, aux), msg="out of range")
