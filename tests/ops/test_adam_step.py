"""The fused Adam step (``kernels/saefast_triton/adam_step.py`` under Triton's interpreter, and
``csrc/cpu/adam_step.cpp``) against :func:`saefast.ops.ref.adam_step_` and ``torch.optim.Adam`` itself.

Contract: ``m ← lerp(m, g, 1 − β1)``, ``v ← β2·v + (1 − β2)·g²``, ``p ← p − (lr/bc1)·m/(√v/√bc2 + ε)``; with
``unit_rows`` the gradient projected off each row first (written back to ``grad``) and the row renormalised after.
Checked on ragged shapes (R, D not powers of two, D = 1, R = 1, empty), several steps (bias correction), a weight
``1 − β1 ≥ ½`` (torch's other lerp branch), member slices (rows outside stay bit-identical), thread counts, bad input.

Tolerance: the fused passes compute torch's formula in fp32 in torch's order, but may contract ``a·b + c`` into an
FMA where torch rounds twice (and the interpreter's numpy where torch's CPU kernels fuse), and sum the row norms in
another order: a few fp32 roundings per step. Each tensor must agree with the torch backend within
``2e-6·max|expected|`` plus ``1e-5`` relative, over three steps.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_BACKENDS, FUSED_BACKENDS, device_of, needs_native

from saefast import ops
from saefast.ops import ref

SHAPES = [(3, 7, 5), (130, 48), (1, 1), (1, 37), (9, 1), (17,), (2, 33, 129), (1, 5, 2100), (0, 6), (4, 0)]
NAMES = ("param", "grad", "exp_avg", "exp_avg_sq")


def random_state(shape, seed=0, device="cpu", unit=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(*shape, generator=g)
    if unit and p.numel():
        ref.normalize_rows_(p)
    grad = torch.randn(*shape, generator=g) * 0.1
    m = torch.randn(*shape, generator=g) * 0.01
    v = torch.rand(*shape, generator=g) * 1e-3
    return [t.to(device) for t in (p, grad, m, v)]


def close(got, want, msg=""):
    for name, a, e in zip(NAMES, got, want):
        a, e = a.double().cpu(), e.double().cpu()
        assert a.shape == e.shape
        if e.numel() == 0:
            continue
        bound = 2e-6 * float(e.abs().max()) + 1e-5 * e.abs()
        err = (a - e).abs()
        assert bool((err <= bound).all()), f"{msg} {name}: max error {float(err.max()):.3e}"


def run_steps(backend, tensors, steps, unit_rows, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    for step in steps:
        ops.adam_step_(*tensors, step, lr, betas[0], betas[1], eps, unit_rows=unit_rows, backend=backend)
    return tensors


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("unit_rows", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_torch_backend(backend, unit_rows, shape):
    start = random_state(shape, seed=sum(shape), unit=unit_rows)
    want = run_steps("torch", [t.clone() for t in start], (1, 2, 3), unit_rows)
    got = run_steps(backend, [t.clone().to(device_of(backend)) for t in start], (1, 2, 3), unit_rows)
    close(got, want, f"{backend} {shape}")
    # in place: every element the oracle changed has changed (and no other), in each of the four tensors
    for name, before, after, expected in zip(NAMES, start, got, want):
        assert torch.equal(after.cpu() != before, expected != before), name
    if unit_rows and start[0].numel():
        norms = got[0].reshape(-1, shape[-1]).double().norm(dim=-1)
        assert float((norms - 1).abs().max()) < 1e-6


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.5)])  # 1 − β1 ≥ ½: torch's other lerp branch
def test_matches_torch_optim_adam(backend, betas):
    """Against torch.optim.Adam itself, its state counting the steps (no rows: plain Adam)."""
    p, grad, _, _ = random_state((6, 11), seed=1)
    reference = torch.nn.Parameter(p.clone())
    adam = torch.optim.Adam([reference], lr=3e-3, betas=betas, eps=1e-6)
    device = device_of(backend)
    mine = [p.clone().to(device), grad.clone().to(device), torch.zeros_like(p, device=device),
            torch.zeros_like(p, device=device)]
    for step in range(1, 5):
        g = grad * step - 0.05  # a different gradient each step
        reference.grad = g.clone()
        adam.step()
        mine[1].copy_(g)
        ops.adam_step_(*mine, step, 3e-3, betas[0], betas[1], 1e-6, backend=backend)
    state = adam.state[reference]
    close(mine, [reference.detach(), grad * 4 - 0.05, state["exp_avg"], state["exp_avg_sq"]], backend)
    if backend == "torch":  # the oracle is torch's single-tensor CPU Adam, op for op
        assert torch.equal(mine[0], reference.detach())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unit_rows_is_projection_adam_normalisation(backend):
    """``unit_rows`` equals the training step's old three passes: projection, Adam, renormalisation."""
    start = random_state((4, 9, 23), seed=2, unit=True)
    p, grad, m, v = [t.clone() for t in start]
    ref.remove_parallel_grad_(p, grad)
    ref.adam_step_(p, grad, m, v, 1, 1e-2, 0.9, 0.999, 1e-8)
    ref.normalize_rows_(p)
    got = run_steps(backend, [t.clone().to(device_of(backend)) for t in start], (1,), True)
    close(got, [p, grad, m, v], backend)
    if backend == "torch":
        assert all(torch.equal(a, b) for a, b in zip(got, [p, grad, m, v]))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_zero_rows_stay_zero_rows(backend):
    """A zero row with a zero gradient and moments: the projection leaves g, Adam moves nothing, the norm clamp keeps
    it 0 (no NaN)."""
    p, grad, m, v = random_state((3, 5, 7), seed=3, device=device_of(backend), unit=True)
    for t in (p, grad, m, v):
        t[1, 2] = 0.0
    run_steps(backend, [p, grad, m, v], (1, 2), True)
    assert bool((p[1, 2] == 0).all()) and bool(torch.isfinite(p).all())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("unit_rows", [False, True])
def test_member_slice_updates_only_its_members(backend, unit_rows):
    full = random_state((5, 19, 37), seed=4, device=device_of(backend), unit=True)
    before = [t.clone() for t in full]
    members = slice(1, 4)
    want = run_steps("torch", [t[members].clone().cpu() for t in full], (1, 2), unit_rows)
    run_steps(backend, [t[members] for t in full], (1, 2), unit_rows)
    for name, t, b in zip(NAMES, full, before):
        assert torch.equal(t[0], b[0]) and torch.equal(t[4], b[4]), name  # untouched, bit for bit
    close([t[members] for t in full], want, backend)


@needs_native
@pytest.mark.parametrize("unit_rows", [False, True])
def test_native_is_the_same_for_any_thread_count(unit_rows):
    start = random_state((3, 301, 77), seed=5, unit=unit_rows)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_steps("native", [t.clone() for t in start], (1, 2), unit_rows))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input_raises_value_error(backend):
    device = device_of(backend)
    p, grad, m, v = random_state((2, 3, 4), device=device)
    with pytest.raises(ValueError, match="one shape"):
        ops.adam_step_(p, grad[:, :2], m, v, 1, 1e-3, 0.9, 0.999, 1e-8, backend=backend)
    with pytest.raises(ValueError, match="floating"):
        ops.adam_step_(p, grad, m.to(torch.int32), v, 1, 1e-3, 0.9, 0.999, 1e-8, backend=backend)
    with pytest.raises(ValueError, match="step"):
        ops.adam_step_(p, grad, m, v, 0, 1e-3, 0.9, 0.999, 1e-8, backend=backend)
    with pytest.raises(ValueError, match="betas"):
        ops.adam_step_(p, grad, m, v, 1, 1e-3, 1.0, 0.999, 1e-8, backend=backend)
    if backend == "torch":
        return
    with pytest.raises(ValueError, match="exp_avg_sq must be float32"):
        ops.adam_step_(p, grad, m, v.double(), 1, 1e-3, 0.9, 0.999, 1e-8, backend=backend)
    transposed = torch.randn(4, 3, 2, device=device).permute(2, 1, 0)  # [2, 3, 4], not contiguous
    with pytest.raises(ValueError, match="grad must be contiguous"):
        ops.adam_step_(p, transposed, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, unit_rows=True, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_device_mismatch_raises_value_error(backend):
    p, grad, m, v = random_state((2, 3), device=device_of(backend))
    with pytest.raises(ValueError, match="exp_avg_sq is on meta"):
        ops.adam_step_(p, grad, m, v.to("meta"), 1, 1e-3, 0.9, 0.999, 1e-8, backend=backend)


@needs_native
def test_native_rejects_a_bad_bias_correction():
    p, grad, m, v = random_state((2, 3))
    with pytest.raises(ValueError, match="bias corrections"):
        torch.ops.saefast.native_adam_step_(p, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.001, False)


@pytest.mark.parametrize("op", ["adam_step_", pytest.param("native_adam_step_", marks=needs_native)])
def test_opcheck(op):
    """The schema declares the in-place writes (all four tensors), and the fake implementation agrees."""
    tensors = random_state((3, 5, 7), seed=6, device=device_of("native" if op.startswith("native") else "triton"))
    torch.library.opcheck(getattr(torch.ops.saefast, op).default,
                          (*tensors, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001, True),
                          test_utils=("test_schema", "test_faketensor"))
