"""The fused decoder-norm gradient projection (``kernels/saefast_triton/decoder_grad_projection.py`` under Triton's
interpreter, and ``csrc/cpu/decoder_grad_projection.cpp``) against :func:`saefast.ops.ref.remove_parallel_grad_`.

Contract: ``g_r ← g_r − (g_r·W_r / max(‖W_r‖, 1e-12)²) W_r`` per row, in place, ``W`` untouched. Checked on ragged
shapes (non-power-of-two rows and D, D past one tile), member slices of a larger gradient (rows outside the slice
must stay bit-identical: the in-place write may not stray), zero rows, mixed dtypes (native) and bad input.
Tolerance: fp32 results within 2e-6 of the fp64 oracle relative to the gradient's largest magnitude (the oracle's
own fp32 rounding is of that order); bf16/fp16 within one rounding of the stored dtype.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, FUSED_BACKENDS, device_of, needs_native

from saefast import ops
from saefast.ops import ref


def oracle(W: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The eager reference in fp64 on the CPU (the fused passes accumulate in fp32 and round once)."""
    expected = grad.double().cpu().clone()
    ref.remove_parallel_grad_(W.double().cpu(), expected)
    return expected


def random_pair(shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g).to(device=device, dtype=dtype),
            torch.randn(*shape, generator=g).to(device=device, dtype=dtype))


def relative_error(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0) -> float:
    """Largest ``|got − want|`` relative to ``scale`` (the input gradient's largest magnitude: the projection can
    cancel a row to ~0, e.g. when D = 1, so the output's own magnitude is no scale)."""
    return float((got.double().cpu() - want).abs().max()) / scale


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 5), (2, 33, 129), (130, 48), (1, 5, 4100), (17,)])
def test_matches_reference(backend, shape):
    W, grad = random_pair(shape, seed=sum(shape), device=device_of(backend))
    W_before, want, scale = W.clone(), oracle(W, grad), float(grad.abs().max())
    got = ops.remove_parallel_grad_(W, grad, backend=backend)
    assert got is grad  # in place
    assert relative_error(grad, want, scale) <= 2e-6
    assert torch.equal(W, W_before)
    # what remains is orthogonal to every row
    rows_w, rows_g = W.reshape(-1, shape[-1]).double(), grad.reshape(-1, shape[-1]).double()
    residual = float((rows_w * rows_g).sum(-1).abs().max())
    assert residual <= 1e-5 * scale * float(rows_w.norm(dim=-1).max()) * shape[-1] ** 0.5


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_member_slice_updates_only_its_rows(backend):
    W, grad = random_pair((5, 19, 37), seed=3, device=device_of(backend))
    members = slice(1, 4)
    want, scale = grad.clone(), float(grad.abs().max())
    want[members] = oracle(W[members], grad[members]).float()
    ops.remove_parallel_grad_(W[members], grad[members], backend=backend)
    assert torch.equal(grad[0], want[0]) and torch.equal(grad[4], want[4])  # untouched, bit for bit
    assert relative_error(grad[members], want[members].double(), scale) <= 2e-6


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_zero_rows_keep_their_gradient_and_strided_W_is_read(backend):
    W, grad = random_pair((4, 6, 10), seed=4, device=device_of(backend))
    W[1, 2] = 0.0
    W_strided = W.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    before, want, scale = grad[1, 2].clone(), oracle(W, grad), float(grad.abs().max())
    ops.remove_parallel_grad_(W_strided, grad, backend=backend)
    assert torch.equal(grad[1, 2], before)
    assert relative_error(grad, want, scale) <= 2e-6


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.skipif(
    not CUDA, reason="Triton's interpreter computes bf16/fp16 arithmetic wrongly: half precision is checked on a GPU")),
    pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("w_dtype, g_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_half_precision_accumulates_in_fp32(backend, w_dtype, g_dtype):
    W, grad = random_pair((3, 11, 70), seed=5, device=device_of(backend))
    W, grad = W.to(w_dtype), grad.to(g_dtype)
    want, scale = oracle(W, grad), float(grad.float().abs().max())  # from the stored (rounded) inputs, in fp64
    ops.remove_parallel_grad_(W, grad, backend=backend)
    assert grad.dtype == g_dtype
    # one rounding to the stored dtype (plus fp32 accumulation, far below it)
    assert relative_error(grad, want, scale) <= torch.finfo(g_dtype).eps


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bad_input_raises_value_error(backend):
    W, grad = random_pair((2, 3, 4), device=device_of(backend))
    with pytest.raises(ValueError, match="one shape"):
        ops.remove_parallel_grad_(W, grad[:, :2], backend=backend)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ops.remove_parallel_grad_(W, grad.to(torch.int32), backend=backend)
    transposed = torch.randn(4, 3, 2, device=device_of(backend)).permute(2, 1, 0)  # [2, 3, 4] with no [rows, D] view
    with pytest.raises(ValueError, match="viewable"):
        ops.remove_parallel_grad_(W, transposed, backend=backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_training_projects_with_its_backend(monkeypatch, backend):
    """``sf.train`` with clipping (which needs the projected gradient's norm, so the projection runs on its own
    rather than inside the fused Adam step: ``tests/training/test_optimizer.py``) projects the decoder gradient on
    the training backend (that training on a fused backend equals the torch backend's, projection included, is
    ``tests/training/test_trainer.py::test_training_on_a_fused_backend_...``)."""
    import saefast as sf

    calls = []
    fused = ops.remove_parallel_grad_

    def spy(W, grad, backend="triton"):
        calls.append((backend, tuple(grad.shape)))
        return fused(W, grad, backend=backend)

    monkeypatch.setattr(ops, "remove_parallel_grad_", spy)
    device = device_of(backend)
    batches = [torch.randn(64, 12, generator=torch.Generator().manual_seed(i)).to(device) for i in range(2)]
    model = sf.Ensemble.boosting(sf.SAEConfig(d_in=12, n_latents=20, k=3), 2, seed=0).to(device)
    sf.train(model, batches, steps=2, lr=1e-3, backend=backend, progress=False, grad_clip=1e6)
    # boosting trains stage by stage: each projection sees one member's [1, M, D] slice
    assert calls == [(backend, (1, 20, 12))] * 4


@pytest.mark.parametrize("op", ["remove_parallel_grad_", pytest.param("native_remove_parallel_grad_",
                                                                     marks=needs_native)])
def test_opcheck(op):
    """The schema declares the in-place write to ``grad`` (and only that), and the fake implementation agrees."""
    W, grad = random_pair((3, 5, 7), seed=6, device=device_of("native" if op.startswith("native") else "triton"))
    torch.library.opcheck(getattr(torch.ops.saefast, op).default, (W, grad),
                          test_utils=("test_schema", "test_faketensor"))
