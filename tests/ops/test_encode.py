"""saefast.ops.encode: the encoders — TopK (with AuxK's top-k among dead latents), BatchTopK and its inference
threshold, JumpReLU — on every fused backend against the eager reference (``saefast.ops.ref``), forward and
gradients; the fused ops' shared contract (tie order, AuxK padding, threshold codes, ``opcheck``) on both backends;
and the Triton launchers of ``saefast.kernels.topk_encode`` directly.

Triton runs on the GPU when there is one, else on the CPU under Triton's interpreter (see conftest.py); native on
the CPU; kernel outputs are poisoned (see tests/ops/conftest.py). Comparisons do not depend on the order of tied
latents: returned values must equal the reference's sorted top-k values, and the reference pre-activation at every
returned index must equal the returned value (so a wrong index fails even when the values match).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    DEVICE,
    FUSED,
    FUSED_BACKENDS,
    INTERPRETED,
    assert_close,
    device_of,
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
    from saefast.kernels import topk_encode as te
    from saefast.kernels.topk_encode import threshold_encode, topk_encode
except ImportError:  # without triton the tests marked needs_triton are skipped
    te = threshold_encode = topk_encode = None

OPS = torch.ops.saefast


def per_backend(cases: dict[str, list], ids=str) -> list:
    """``(backend, device, case)`` params: each fused backend of ``FUSED`` with its own ``cases[backend]``."""
    params = []
    for fused in FUSED:
        backend, device = fused.values
        params += [pytest.param(backend, device, case, marks=fused.marks, id=f"{fused.id}-{ids(case)}")
                   for case in cases[backend]]
    return params


# ------------------------------------------------------------------------------------------------------
# TopK and AuxK codes on every fused backend
# ------------------------------------------------------------------------------------------------------

# (N, J, M, D, k): then M past one of native's column tiles and k past 64 (its append buffer). Inputs: x [N, D],
# a b_dec [1, D] shared by the members, and (native) per-member inputs x [N, J, D] (Triton takes those member by
# member: test_per_member_inputs_... below).
TOPK_SHAPES = [(1, 1, 8, 5, 1), (13, 3, 37, 24, 8), (20, 2, 64, 33, 32),
               (150, 2, 2100, 33, 32), (20, 1, 64, 16, 64), (300, 2, 700, 20, 100)]
TOPK_CASES = {
    "triton": [(shape, inputs) for shape in TOPK_SHAPES for inputs in ("x", "b_dec[1]")],
    "native": [(shape, inputs) for shape in TOPK_SHAPES for inputs in ("x", "b_dec[1]", "x[N,J]")],
}
# Gradient tolerance: both sides sum in fp32 in different orders (native's order depends on the CPU's vector width,
# Triton's on its tiles): each is ~4e-7 of the gradient's largest magnitude from the fp64 value, so the bound scales.
GRAD_ATOL_PER_SCALE = 2e-6


@pytest.mark.parametrize(("backend", "device", "case"), per_backend(
    TOPK_CASES, ids=lambda case: "x".join(map(str, case[0])) + "-" + case[1]))
def test_topk_encode_matches_reference_forward_and_backward(backend, device, case):
    (N, J, M, D, k), inputs = case
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=N + M, device=device)
    if inputs == "b_dec[1]":  # one b_dec shared by the members
        b_dec = b_dec[:1]
    x = rand(N, J, D, device=device) if inputs == "x[N,J]" else rand(N, D, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    codes, _ = ops.topk_encode(*leaves, k, backend=backend)
    expected, _ = ops.topk_encode(*(t.detach().requires_grad_(True) for t in leaves), k, backend="torch")
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    pre = ref.pre_activations(*ref_leaves)
    want = pre.detach().topk(k, dim=-1)
    # Sorted descending, the same values; the indices are distinct and point at those values.
    assert_close(codes.values, torch.relu(want.values), atol=1e-5, rtol=1e-5)
    assert_close(pre.detach().gather(-1, codes.indices), want.values, atol=1e-5, rtol=1e-5)
    assert bool((codes.indices.sort(-1).values[..., 1:] != codes.indices.sort(-1).values[..., :-1]).all())
    # The torch backend's latents (as sets: ties aside the order of equal selections is free) and values.
    order, ref_order = codes.indices.sort(-1), expected.indices.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    assert_close(codes.values.gather(-1, order.indices), expected.values.gather(-1, ref_order.indices),
                 atol=1e-5, rtol=1e-5)
    # Gradients of a loss through the codes reach x, W_enc, b_enc, b_dec only at the selected latents.
    weights = rand(N, J, M, device=device)
    grads = torch.autograd.grad((codes.to_dense().view(N, J, M) * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref.topk_activation(pre, k) * weights).sum(), ref_leaves)
    for name, got, want_grad in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        atol = max(1e-5, GRAD_ATOL_PER_SCALE * float(want_grad.abs().max()))
        assert_close(got, want_grad, atol=atol, rtol=1e-4, msg=f"grad {name}")


def _auxk_dead(case: str, J: int, M: int) -> torch.Tensor:
    dead = torch.zeros(J, M, dtype=torch.bool)
    if case == "one tile":
        dead[0, :12] = True  # plenty
        dead[1, 3:5] = True  # fewer dead latents than aux_k: the rest must be zeros
    else:
        dead[0, ::3] = True
        dead[1, 2040:2050] = True  # across the column-tile boundary
    return dead  # member 2: no dead latent


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize(("case", "N", "M", "aux_k"), [
    ("one tile", 11, 30, 6),
    ("two tiles", 33, 2300, 6),   # M spans two of native's column tiles
    ("two tiles", 33, 2300, 80),  # 80: native's append-buffer top-k (more than 64 slots)
])
def test_auxk_codes_match_reference(backend, device, case, N, M, aux_k):
    J, D, k = 3, 16, 4
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=5, device=device)
    x = rand(N, D, device=device)
    dead = _auxk_dead(case, J, M).to(device)
    _, aux = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend=backend)
    _, expected = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend="torch")
    assert_close(aux.to_dense(), expected.to_dense(), atol=1e-5, rtol=1e-5)
    assert bool((aux.to_dense().view(N, J, M)[:, 2] == 0).all())  # member 2 has no dead latent


@needs_triton
def test_triton_encode_follows_autocast(monkeypatch):
    """Under torch.autocast the fused encode gets the autocast dtype (as a matmul would), and fp32 master weights
    still get fp32 gradients; outside autocast it gets the weights' dtype."""
    seen = []
    original = te.topk_encode

    def spy(x, W_enc, *args, **kwargs):
        seen.append((x.dtype, W_enc.dtype))
        return original(x, W_enc, *args, **kwargs)

    monkeypatch.setattr(te, "topk_encode", spy)
    W_enc, b_enc, _, b_dec = random_stack(2, 40, 16, seed=3, device=DEVICE)
    W_enc.requires_grad_(True)
    x = rand(5, 16, device=DEVICE)
    ops.topk_encode(x, W_enc, b_enc, b_dec, 4, backend="triton")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        codes, _ = ops.topk_encode(x, W_enc, b_enc, b_dec, 4, backend="triton")
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    (grad,) = torch.autograd.grad(codes.values.sum(), [W_enc])
    assert grad.dtype == torch.float32 and grad.shape == W_enc.shape


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_per_member_inputs_of_the_fused_ops_equal_the_batched_reference(backend):
    """Triton (one call per member on x[:, j]) and native (one grouped call on the whole [N, J, D] input) equal the
    torch reference on the whole [N, J, D] input."""
    J, M, D, N = 3, 32, 16, 24
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, J, D, generator=g)
    W_enc = torch.randn(J, M, D, generator=g) / 4
    b_enc, b_dec = 0.1 * torch.randn(J, M, generator=g), 0.2 * torch.randn(J, D, generator=g)
    dead = torch.rand(J, M, generator=g) < 0.3
    log_threshold = torch.log(0.2 + 0.3 * torch.rand(J, M, generator=g))
    x, W_enc, b_enc, b_dec, dead, log_threshold = (t.to(device_of(backend))
                                                   for t in (x, W_enc, b_enc, b_dec, dead, log_threshold))
    got, got_aux = ops.per_member_inputs(ops.topk_encode, x, W_enc, b_enc, b_dec, 3, dead, 4, backend=backend)
    want, want_aux = ops.topk_encode(x, W_enc, b_enc, b_dec, 3, dead, 4, backend="torch")  # einsum over [N, J, D]
    assert got.members == J and got_aux.members == J
    assert_close(got.to_dense(), want.to_dense(), atol=1e-5)
    assert_close(got_aux.to_dense(), want_aux.to_dense(), atol=1e-5)
    codes, smallest, _ = ops.per_member_inputs(ops.batchtopk_encode, x, W_enc, b_enc, b_dec, 2, backend=backend)
    ref_codes, ref_smallest, _ = ops.batchtopk_encode(x, W_enc, b_enc, b_dec, 2, backend="torch")
    assert_close(codes.to_dense(), ref_codes.to_dense(), atol=1e-5)
    assert_close(smallest, ref_smallest, atol=1e-6)
    codes, l0 = ops.per_member_inputs(ops.jumprelu_encode, x, W_enc, b_enc, b_dec, log_threshold, 0.05,
                                      backend=backend)
    ref_codes, ref_l0 = ops.jumprelu_encode(x, W_enc, b_enc, b_dec, log_threshold, 0.05, backend="torch")
    assert_close(codes.to_dense(), ref_codes.to_dense(), atol=1e-5)
    assert_close(l0, ref_l0, atol=1e-6)
    # a shared [N, D] input passes straight through: one call
    shared = x[:, 0]
    a, _ = ops.per_member_inputs(ops.topk_encode, shared, W_enc, b_enc, b_dec, 3, backend="torch")
    b, _ = ops.topk_encode(shared, W_enc, b_enc, b_dec, 3, backend="torch")
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


# ------------------------------------------------------------------------------------------------------
# BatchTopK on every fused backend (candidates + exact fallback)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize(("N", "J", "M", "D", "k", "capacity", "overflows"),
                         [(24, 3, 40, 16, 3, 4, False), (16, 2, 32, 12, 4, 1, True), (9, 2, 12, 8, 4, 4, False)])
def test_batchtopk_encode_matches_reference(backend, device, N, J, M, D, k, capacity, overflows, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=N + M, device=device)
    x = rand(N, D, device=device)
    # Spread the per-token scale so the batch top-k is uneven across rows (some rows keep more than k; with the
    # tiny capacity, more than their candidates).
    x = x * torch.linspace(0.2, 3.0, N, device=device).unsqueeze(1) if overflows else x
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    if overflows:
        with pytest.warns(RuntimeWarning, match="exceeded its capacity"):
            codes, smallest, _ = ops.batchtopk_encode(*leaves, k, capacity=capacity, backend=backend)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            codes, smallest, _ = ops.batchtopk_encode(*leaves, k, capacity=capacity, backend=backend)
        assert codes.k == min(M, capacity * k)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    z, want_smallest = ref.batchtopk_activation(ref.pre_activations(*ref_leaves), k)
    assert_close(codes.to_dense(), z.reshape(N, J * M), atol=1e-5, rtol=1e-5)
    assert_close(smallest, want_smallest, atol=1e-5, rtol=1e-5)
    assert bool((codes.l0().sum(0) == (z != 0).sum((0, 2))).all())  # zero-valued slots do not count
    weights = rand(N, J * M, device=device)
    grads = torch.autograd.grad((codes.to_dense() * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((z.reshape(N, J * M) * weights).sum(), ref_leaves)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_batchtopk_capacity_warning_is_shown_once(backend, device, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    W_enc, b_enc, _, b_dec = random_stack(2, 32, 12, seed=4, device=device)
    x = rand(16, 12, device=device) * torch.linspace(0.2, 3.0, 16, device=device).unsqueeze(1)
    with pytest.warns(RuntimeWarning, match="exceeded its capacity") as record:
        for _ in range(2):
            ops.batchtopk_encode(x, W_enc, b_enc, b_dec, 4, capacity=1, backend=backend)
    assert sum("exceeded its capacity" in str(w.message) for w in record) == 1


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize(("capacity", "overflows"), [(4, False), (1, True)])
def test_threshold_encode_matches_reference(backend, device, capacity, overflows, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    N, J, M, D, k = 14, 3, 36, 12, 3
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=11, device=device)
    x = rand(N, D, device=device)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    # Per-member thresholds: about k latents per row pass (a few rows more); member 2 per-latent thresholds.
    threshold = pre.transpose(0, 1).reshape(J, -1).quantile(1 - k / M, dim=-1).clamp_min(0)[:, None].expand(J, M)
    threshold = threshold.clone()
    threshold[2] += 0.05 * torch.rand(M, generator=torch.Generator().manual_seed(0)).to(device)
    if overflows:
        with pytest.warns(RuntimeWarning, match="exceeded its capacity"):
            codes = ops.threshold_encode(x, W_enc, b_enc, b_dec, threshold, k, capacity=capacity, backend=backend)
    else:
        codes = ops.threshold_encode(x, W_enc, b_enc, b_dec, threshold, k, capacity=capacity, backend=backend)
        assert codes.k == capacity * k
    want = ref.threshold_activation(pre, threshold).reshape(N, J * M)
    assert_close(codes.to_dense(), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# BatchTopK's default capacity adapts: an overflow runs the dense path once, silently, and grows the capacity
# ------------------------------------------------------------------------------------------------------


class _PathSpy:
    """Counts the dense fallbacks and the fused candidate calls of saefast.ops.encode."""

    def __init__(self, monkeypatch):
        self.dense = self.fused = 0
        dense, fused = ops.encode._batchtopk_dense, ops.encode.topk_encode

        def counting_dense(*args):
            self.dense += 1
            return dense(*args)

        def counting_fused(*args, **kwargs):
            self.fused += 1
            return fused(*args, **kwargs)

        monkeypatch.setattr(ops.encode, "_batchtopk_dense", counting_dense)
        monkeypatch.setattr(ops.encode, "topk_encode", counting_fused)


def _assert_batchtopk_matches_reference(codes, smallest, leaves, k):
    N, J = leaves[0].shape[0], leaves[1].shape[0]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    z, want_smallest = ref.batchtopk_activation(ref.pre_activations(*ref_leaves), k)
    assert_close(codes.to_dense(), z.reshape(N, -1), atol=1e-5, rtol=1e-5)
    assert_close(smallest, want_smallest, atol=1e-5, rtol=1e-5)
    weights = rand(N, z.shape[1] * z.shape[2], device=z.device)
    grads = torch.autograd.grad((codes.to_dense() * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((z.reshape(N, -1) * weights).sum(), ref_leaves)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")
    assert J == z.shape[1]


def _uneven_rows(N, D, device, spread=3.0):
    """Rows whose norms differ: the batch top-N·k gives the large rows many more than k latents."""
    return rand(N, D, device=device) * torch.linspace(0.2, spread, N, device=device).unsqueeze(1)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_batchtopk_default_capacity_grows_after_an_overflow_without_a_warning(backend, device, monkeypatch):
    """The old default (a fixed 4k candidates) warned and ran fused + dense on every such batch; now one batch runs
    the dense path, silently, and the next ones run fused on the grown capacity, exact all along."""
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    monkeypatch.setattr(ops.encode, "_DENSE_FRACTION", 1)  # (this M is small: keep every capacity fused)
    spy = _PathSpy(monkeypatch)
    N, J, M, D, k = 16, 2, 64, 12, 2
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=5, device=device)
    x = _uneven_rows(N, D, device)
    start = ops.encode.BATCHTOPK_CAPACITY * k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in range(3):
            leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
            codes, smallest, _ = ops.batchtopk_encode(*leaves, k, backend=backend)
            _assert_batchtopk_matches_reference(codes, smallest, leaves, k)
            if call == 0:
                assert spy.dense == 1, "the first batch must overflow the starting capacity"
                need = codes.k  # the dense codes are packed to the most latents a row kept
                assert need > start
            else:  # fused, on candidates with room for the need
                assert spy.dense == 1 and spy.fused == call + 1
                assert codes.k >= 1.5 * need and codes.k > start


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_batchtopk_grown_capacity_shrinks_back_and_runs_dense_past_its_limit(backend, device, monkeypatch):
    monkeypatch.setattr(ops.encode, "_CAPACITY_WINDOW", 2)
    spy = _PathSpy(monkeypatch)
    N, J, M, D, k = 16, 2, 64, 12, 2
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=5, device=device)
    start = ops.encode.BATCHTOPK_CAPACITY * k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.batchtopk_encode(_uneven_rows(N, D, device), W_enc, b_enc, b_dec, k, backend=backend)
        assert (spy.dense, spy.fused) == (1, 1)
        # grown past M/16 candidates: the dense path runs directly, no fused attempt first
        same = rand(1, D, device=device).expand(N, D)  # identical rows: each keeps exactly k latents
        for _ in range(2):
            leaves = [t.clone().requires_grad_(True) for t in (same, W_enc, b_enc, b_dec)]
            codes, smallest, _ = ops.batchtopk_encode(*leaves, k, backend=backend)
            _assert_batchtopk_matches_reference(codes, smallest, leaves, k)
        assert (spy.dense, spy.fused) == (3, 1)
        # the window (2 calls) needed k candidates per row: back to the start, fused again
        leaves = [t.clone().requires_grad_(True) for t in (same, W_enc, b_enc, b_dec)]
        codes, smallest, _ = ops.batchtopk_encode(*leaves, k, backend=backend)
        assert (spy.dense, spy.fused) == (3, 2) and codes.k == start
        _assert_batchtopk_matches_reference(codes, smallest, leaves, k)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_threshold_encode_default_capacity_grows_without_a_warning(backend, device, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    monkeypatch.setattr(ops.encode, "BATCHTOPK_CAPACITY", 1)  # a start the rows below overflow
    monkeypatch.setattr(ops.encode, "_DENSE_FRACTION", 1)
    spy = _PathSpy(monkeypatch)
    N, J, M, D, k = 14, 3, 36, 12, 3
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=11, device=device)
    x = rand(N, D, device=device)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    threshold = pre.transpose(0, 1).reshape(J, -1).quantile(1 - k / M, dim=-1).clamp_min(0)[:, None].expand(J, M)
    want = ref.threshold_activation(pre, threshold).reshape(N, J * M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = ops.threshold_encode(x, W_enc, b_enc, b_dec, threshold, k, backend=backend)
        second = ops.threshold_encode(x, W_enc, b_enc, b_dec, threshold, k, backend=backend)
    assert spy.fused == 2
    assert first.k != k and second.k > k  # the first fell back (dense packing), the second ran on grown candidates
    for codes in (first, second):
        assert_close(codes.to_dense(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_batchtopk_training_on_uneven_rows_does_not_warn(backend, device, monkeypatch):
    """Ordinary training (default capacity) on activations whose norms vary: no capacity warning (the old default
    warned at the first step), at most one batch that ran both paths, and the model the torch backend trains."""
    import saefast as sf

    overflows = []
    grow = ops.encode._AdaptiveCapacity.overflowed
    monkeypatch.setattr(ops.encode._AdaptiveCapacity, "overflowed",
                        lambda self, need, k: overflows.append(need) or grow(self, need, k))
    cfg = sf.SAEConfig(d_in=16, n_latents=256, k=2, activation="batchtopk")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 16, generator=g) * torch.randn(32, 1, generator=g).exp()).to(device)
               for _ in range(4)]
    models = {}
    for name in (backend, "torch"):
        models[name] = sf.SAE(cfg, seed=0).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            # eps = 1e-6: a latent at the edge of the batch's top-k gets a gradient at the rounding level (1e-10
            # on one backend, 1e-9 on another: they sum in other orders), which Adam at the default eps (1e-8)
            # turns into steps of a good fraction of lr that differ between the backends.
            sf.train(models[name], batches, steps=4, backend=name, progress=False, eps=1e-6)
    assert len(overflows) == 1, overflows
    for (key, got), want in zip(models[backend].state_dict().items(), models["torch"].state_dict().values()):
        assert_close(got, want, atol=1e-4, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------------------------------------
# JumpReLU on every fused backend (every entry above θ − ε/2 + exact fallback)
# ------------------------------------------------------------------------------------------------------


def _jumprelu_case(N, J, M, D, seed, bandwidth, device):
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=seed, device=device)
    x = rand(N, D, device=device)
    g = torch.Generator().manual_seed(seed)
    theta = 0.4 + 0.3 * torch.rand(J, M, generator=g)
    log_threshold = theta.log().to(device)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    th = log_threshold.exp()
    below = ((pre > th - bandwidth / 2) & (pre <= th)).sum()  # the band under θ: z = 0, STE gradient ≠ 0
    above = ((pre > th) & (pre <= th + bandwidth / 2)).sum()
    assert int(below) > 0 and int(above) > 0, "the case must put pre-activations in the band on both sides"
    return x, W_enc, b_enc, b_dec, log_threshold


def _assert_jumprelu_matches_reference(leaves, codes, l0, eps, l0_weights):
    """Fused JumpReLU codes and L0 equal the dense reference's, and so do the gradients of
    ``(codes·w).sum() + (L0·l0_weights).sum()`` w.r.t. x, W_enc, b_enc, b_dec, log_threshold. Returns the dense
    reference codes and gradients."""
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    pre = ref.pre_activations(*ref_leaves[:4])
    N, J, M = pre.shape
    theta = ref_leaves[4].exp()
    z, want_l0 = ref.jumprelu_activation(pre, theta, eps), ref.jumprelu_l0(pre, theta, eps)
    assert_close(codes.to_dense(), z.reshape(N, J * M), atol=1e-5, rtol=1e-5)
    assert_close(l0, want_l0, atol=1e-6, rtol=1e-6)
    weights = rand(N, J * M, device=pre.device)
    grads = torch.autograd.grad((codes.to_dense() * weights).sum() + (l0 * l0_weights).sum(), leaves)
    ref_grads = torch.autograd.grad((z.reshape(N, J * M) * weights).sum() + (want_l0 * l0_weights).sum(), ref_leaves)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec", "log_threshold"), grads, ref_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")
    return z, ref_grads


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("shared_b_dec", [False, True])
def test_jumprelu_encode_matches_reference_forward_and_backward(backend, device, shared_b_dec, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    N, J, M, D, eps = 16, 3, 40, 12, 0.2
    x, W_enc, b_enc, b_dec, log_threshold = _jumprelu_case(N, J, M, D, seed=21, bandwidth=eps, device=device)
    if shared_b_dec:
        b_dec = b_dec[:1]
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec, log_threshold)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default capacity (M here) never falls back
        codes, l0 = ops.jumprelu_encode(*leaves, eps, backend=backend)
    z, ref_grads = _assert_jumprelu_matches_reference(leaves, codes, l0, eps, l0_weights=rand(J, device=device))
    assert bool((codes.l0().sum(0) == (z != 0).sum((0, 2))).all())  # band and padding slots hold exact zeros
    assert bool((ref_grads[4] != 0).any())  # the STE did reach the thresholds


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_jumprelu_encode_falls_back_exactly_past_its_capacity(backend, device, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    N, J, M, D, eps = 10, 2, 24, 8, 0.2
    x, W_enc, b_enc, b_dec, log_threshold = _jumprelu_case(N, J, M, D, seed=22, bandwidth=eps, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec, log_threshold)]
    with pytest.warns(RuntimeWarning, match="JumpReLU exceeded its capacity"):
        codes, l0 = ops.jumprelu_encode(*leaves, eps, capacity=1, backend=backend)
    _assert_jumprelu_matches_reference(leaves, codes, l0, eps, l0_weights=torch.ones(J, device=device))
    with pytest.raises(ValueError, match=r"capacity must be an int in \[1, 24\]"):
        ops.jumprelu_encode(*leaves, eps, capacity=M + 1, backend=backend)


# ------------------------------------------------------------------------------------------------------
# The fused ops (torch.ops.saefast.topk_encode / threshold_encode and their native_* twins): one contract
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_ties_rank_lower_latent_first(backend, device):
    # The documented tie order (not torch's, which is unspecified): equal pre-activations come lowest index first.
    N, D, M, J, k = 3, 4, 40, 2, 8
    x = torch.zeros(N, D, device=device)
    W_enc = torch.randn(J, M, D).to(device)
    bias = torch.zeros(J, M, device=device)
    bias[1, 30:] = 1.0  # member 1: latents 30..39 beat the rest, and tie among themselves
    values, indices, _, _ = fused_op(backend, "topk_encode")(x, W_enc, bias, k, None, 0)
    assert (indices[:, 0].cpu() == torch.arange(k)).all() and (values[:, 0] == 0).all()
    assert (indices[:, 1].cpu() == torch.arange(30, 30 + k)).all() and (values[:, 1] == 1).all()


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_topk_encode_ties_go_to_the_lower_latent_and_aux_pads_with_minus_inf(backend, device):
    J, M, D = 2, 40, 4
    W_enc = torch.zeros(J, M, D, device=device)
    bias = torch.zeros(J, M, device=device)
    bias[:, 10:20] = 1.0  # ten tied maxima
    x = rand(3, D, device=device)
    dead = torch.zeros(J, M, dtype=torch.bool, device=device)
    dead[0, 5:8] = True  # three dead latents, aux_k = 5: two padding slots
    outputs = fused_op(backend, "topk_encode")(x, W_enc, bias, 4, dead, 5)
    values, indices, aux_v, aux_i = (t.cpu() for t in outputs)
    assert torch.equal(indices, torch.arange(10, 14).expand(3, J, 4))
    assert bool((values == 1).all())
    assert torch.equal(aux_i[:, 0, :3], torch.tensor([5, 6, 7]).expand(3, 3))
    assert bool(torch.isinf(aux_v[:, 0, 3:]).all()) and bool((aux_i[:, 0, 3:] == 0).all())
    assert bool(torch.isinf(aux_v[:, 1]).all())  # member 1 has no dead latent


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_topk_encode_ties_with_more_than_64_slots(backend, device):
    J, M, D = 2, 300, 4
    bias = torch.zeros(J, M, device=device)
    bias[:, 50:250] = 1.0  # 200 tied maxima for 100 slots: native's append-buffer path keeps the lowest latents
    values, indices, _, _ = fused_op(backend, "topk_encode")(rand(5, D, device=device),
                                                             torch.zeros(J, M, D, device=device), bias, 100, None, 0)
    assert torch.equal(indices.cpu(), torch.arange(50, 150).expand(5, J, 100))
    assert bool((values == 1).all())


@pytest.mark.parametrize(("backend", "device", "per_member_input"),
                         per_backend({"triton": [False], "native": [False, True]}, ids=lambda p: f"per_member={p}"))
def test_threshold_encode_matches_dense_threshold(backend, device, per_member_input):
    """Every ``pre > lower`` as ``(values, indices, counts, overflow)``: ascending latents, padding slots 0; past the
    capacity the lowest-index latents, with the overflow flagged. (Triton takes per-member inputs member by
    member, in ops.per_member_inputs.)"""
    N, J, M, D = 21, 2, 2100, 12
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=9, device=device, small_decoder=False)
    x = rand(N, J, D, device=device) if per_member_input else rand(N, D, device=device)
    bias = ops.folded_bias(W_enc, b_enc, b_dec).float()
    lower = 0.3 * rand(J, M, kind="rand", device=device)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    above = pre > lower
    capacity = int(above.sum(-1).max()) + 3  # every row fits, most rows have padding
    op = fused_op(backend, "threshold_encode")
    values, indices, counts, overflow = op(x, W_enc, bias, lower, capacity)
    assert torch.equal(counts, above.sum(-1))
    assert not bool(overflow)
    for n, j in [(0, 0), (N - 1, J - 1), (N // 2, 1)]:
        c = int(counts[n, j])
        latents = above[n, j].nonzero().squeeze(-1)
        assert torch.equal(indices[n, j, :c], latents)  # ascending latent order
        assert_close(values[n, j, :c], pre[n, j, latents], atol=1e-5, rtol=1e-5)
        assert bool((values[n, j, c:] == 0).all()) and bool((indices[n, j, c:] == 0).all())
    small = op(x, W_enc, bias, lower, 3)
    assert bool(small[3]) and torch.equal(small[2], counts)  # overflow flagged, counts before truncation
    assert torch.equal(small[1], indices[..., :3])  # the lowest-index latents are kept


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_opcheck_topk_encode(backend, device):
    """The schema, fake implementation and autograd of ``topk_encode`` (with AuxK) agree with the kernel."""
    N, J, M, D, K = 6, 2, 10, 8, 3
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=2, device=device)
    bias = ops.folded_bias(W_enc, b_enc, b_dec).detach()
    dead = torch.zeros(J, M, dtype=torch.bool, device=device)
    dead[:, :4] = True
    torch.library.opcheck(fused_op(backend, "topk_encode").default,
                          (rand(N, D, device=device).requires_grad_(True), W_enc.clone().requires_grad_(True), bias,
                           K, dead, 2))


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_opcheck_threshold_encode(backend, device):
    N, J, M, D = 6, 2, 10, 8
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=2, device=device)
    bias = ops.folded_bias(W_enc, b_enc, b_dec).detach()
    lower = torch.full((J, M), 0.1, device=device)
    torch.library.opcheck(fused_op(backend, "threshold_encode").default,
                          (rand(N, D, device=device).requires_grad_(True), W_enc.clone().requires_grad_(True), bias,
                           lower, 6))


@needs_extension
def test_native_encode_rejects_bad_input_before_compute():
    J, M, D = 2, 10, 6
    W = rand(J, M, D)
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


# ------------------------------------------------------------------------------------------------------
# The Triton launchers (saefast.kernels.topk_encode) directly, against ref.pre_activations in float64 + torch.topk
# ------------------------------------------------------------------------------------------------------


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
LAUNCHER_SHAPES = [
    (1, 3, 8, 1, 1), (1, 37, 130, 32, 3), (1, 64, 50, 8, 1),
    (9, 3, 50, 8, 3), (9, 37, 8, 8, 1), (9, 64, 130, 1, 3), (9, 37, 50, 50, 1),
    (40, 3, 130, 8, 1), (40, 37, 50, 32, 3), (40, 64, 8, 1, 3), (40, 64, 130, 32, 3), (40, 37, 130, 5, 1),
]


@needs_triton
@pytest.mark.parametrize("N,D,M,k,J", LAUNCHER_SHAPES)
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


@needs_triton
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


@needs_triton
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


@needs_triton
@pytest.mark.parametrize("n_dead", ["none", "all"])
def test_aux_with_no_or_all_dead_latents(n_dead):
    N, D, M, J, aux_k = 9, 16, 50, 2, 8
    x, W_enc, bias, pre = _problem(N, D, J, M)
    dead = torch.full((J, M), n_dead == "all")
    _, _, aux_values, aux_indices = topk_encode(x, W_enc, bias, 4, dead=dead.to(DEVICE), aux_k=aux_k)
    _check_aux(aux_values, aux_indices, pre, dead, aux_k)
    # No aux outputs unless both a mask and aux_k > 0 are given.
    assert topk_encode(x, W_enc, bias, 4, dead=dead.to(DEVICE), aux_k=0)[2:] == (None, None)


@needs_triton
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


@needs_triton
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


@needs_triton
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


@needs_triton
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


@needs_triton
@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("N,D,M,J,theta_shift", [(9, 37, 130, 3, 0.5), (40, 3, 50, 1, -0.5), (1, 64, 8, 2, 0.5)])
def test_threshold_encode_matches_jumprelu_forward(request, blocks, N, D, M, J, theta_shift):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, W_enc, bias, threshold, pre, expected, near = _threshold_problem(N, D, J, M, theta_shift)
    values, indices, counts, overflow = threshold_encode(x, W_enc, bias, threshold, M)  # capacity M: no overflow
    assert not bool(overflow)
    _check_threshold_codes(values, indices, counts, pre, expected, near, M)


@needs_triton
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


@needs_triton
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


@needs_triton
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


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(te, "_interpreting", lambda: False)
    x, W_enc, bias = _args()
    with pytest.raises(ValueError, match="CUDA"):
        topk_encode(x.cpu(), W_enc.cpu(), bias.cpu(), 4)


@needs_triton
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
