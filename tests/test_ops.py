"""saefast.ops: backend choice, the Triton custom ops against the eager reference (forward and gradients,
under TRITON_INTERPRET=1 on a CPU), their registration (opcheck, torch.compile) and models trained on them."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import saefast as sf
from saefast import ops, ref
from saefast.codes import SparseCodes

pytest.importorskip("triton")
TRITON_OK = torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
# Where the kernels run: the GPU when there is one, else the CPU under Triton's interpreter (fp32 throughout).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The fused backends, each skipped where it cannot run on DEVICE.
FUSED_BACKENDS = [pytest.param("triton", marks=needs_triton),
                  pytest.param("native", marks=pytest.mark.skipif(not sf.native.supports(DEVICE),
                                                                   reason="native extension not built for DEVICE"))]


def rand(*shape: int, kind: str = "randn") -> torch.Tensor:
    """Random test data made on the CPU (reproducible) and moved to DEVICE."""
    return getattr(torch, kind)(*shape).to(DEVICE)


def random_stack(J: int, M: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(J, M, D, generator=g) / D**0.5
    b_enc = 0.1 * torch.randn(J, M, generator=g)
    W_dec = torch.randn(J, M, D, generator=g) / D**0.5
    b_dec = 0.2 * torch.randn(J, D, generator=g)
    return tuple(t.to(DEVICE) for t in (W_enc, b_enc, W_dec, b_dec))


# ------------------------------------------------------------------------------------------------------
# Backend choice
# ------------------------------------------------------------------------------------------------------


def test_use_backend_nests_and_restores():
    assert ops.current_backend() == "auto"
    with sf.use_backend("torch"):
        assert ops.current_backend() == "torch"
        with sf.use_backend("triton"):
            assert ops.current_backend() == "triton"
        assert ops.current_backend() == "torch"
    assert ops.current_backend() == "auto"


def test_backend_resolution_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    on_cpu = "native" if sf.native.available() else "torch"  # auto: Triton only for CUDA tensors, native on the CPU
    assert ops.resolve_backend("auto", cpu) == on_cpu
    assert ops.resolve_backend("auto", cpu, activation="relu") == "torch"  # relu is torch-only
    assert ops.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="unknown backend"), sf.use_backend("fast"):
        pass
    monkeypatch.setattr(sf.native, "_C", None)  # as if the extension had not been built
    monkeypatch.setattr(sf.native, "_error", "ImportError: no module saefast._C")
    with pytest.raises(ValueError, match="backend 'native' needs the compiled extension saefast._C"):
        ops.resolve_backend("native", cpu)
    assert ops.resolve_backend("auto", cpu) == "torch"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="implements the topk, batchtopk and jumprelu activations, not 'relu'"):
        ops.resolve_backend("triton", cpu, activation="relu")
    assert ops.resolve_backend("auto", cpu, activation="batchtopk") == on_cpu
    assert ops.resolve_backend("auto", cpu, activation="jumprelu") == on_cpu
    if TRITON_OK:
        assert ops.resolve_backend("triton", cpu, activation="batchtopk") == "triton"
        assert ops.resolve_backend("triton", cpu, activation="jumprelu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        sf.TrainConfig(backend="fastest")


def test_models_refuse_triton_for_activations_it_does_not_implement():
    sae = sf.SAE(sf.SAEConfig(d_in=8, n_latents=16, activation="relu"))
    with pytest.raises(ValueError, match="topk, batchtopk and jumprelu activations, not 'relu'"):
        sae.encode(torch.randn(4, 8), backend="triton")


# ------------------------------------------------------------------------------------------------------
# Ops against the reference
# ------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(("N", "J", "M", "D", "k"), [(1, 1, 8, 5, 1), (13, 3, 37, 24, 8), (20, 2, 64, 33, 32)])
@pytest.mark.parametrize("shared_b_dec", [False, True])
def test_topk_encode_matches_reference_forward_and_backward(N, J, M, D, k, shared_b_dec):
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=N + M)
    if shared_b_dec:
        b_dec = b_dec[:1]
    x = rand(N, D)
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    codes, _ = ops.topk_encode(*leaves, k, backend="triton")
    expected, _ = ops.topk_encode(*(t.detach().requires_grad_(True) for t in leaves), k, backend="torch")
    # Same latents (as sets: ties aside the order of equal selections is free) and the same values.
    order, ref_order = codes.indices.sort(-1), expected.indices.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    assert_close(codes.values.gather(-1, order.indices), expected.values.gather(-1, ref_order.indices),
                 atol=1e-5, rtol=1e-5)
    # Gradients of a loss through the codes reach x, W_enc, b_enc, b_dec only at the selected latents.
    weights = rand(N, J, M)
    loss = (codes.to_dense().view(N, J, M) * weights).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    pre = ref.pre_activations(*ref_leaves)
    ref_loss = (ref.topk_activation(pre, k) * weights).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")


@needs_triton
def test_topk_encode_auxk_codes_match_reference():
    N, J, M, D, k, aux_k = 11, 3, 30, 16, 4, 6
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=5)
    x = rand(N, D)
    dead = torch.zeros(J, M, dtype=torch.bool, device=DEVICE)
    dead[0, :12] = True  # plenty
    dead[1, 3:5] = True  # fewer dead latents than aux_k: the rest must be zeros
    _, aux = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend="triton")
    _, expected = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend="torch")
    assert_close(aux.to_dense(), expected.to_dense(), atol=1e-5, rtol=1e-5)
    assert bool((aux.to_dense().view(N, J, M)[:, 2] == 0).all())  # member 2 has no dead latent


def _codes_loss(codes: SparseCodes, weights: torch.Tensor) -> torch.Tensor:
    N, J, M = weights.shape
    return (codes.to_dense().view(N, J, M) * weights).sum()


@needs_triton
@pytest.mark.parametrize(("M", "k", "aux_k", "chunk"), [
    (300, 8, 260, None),     # AuxK past MAX_K_WITH_AUX (the default aux_k = d/2 at LLM scale): dead-latent path
    (600, 520, 0, None),     # k past max_k (fp32: 256; half: 512): the chunked top-k
    (70, 300 // 10, 40, 16),  # limits lowered (below) so small shapes take both paths over several chunks
])
def test_topk_encode_past_the_register_limits_matches_reference(M, k, aux_k, chunk, monkeypatch):
    """Past the fused kernel's register limits, ops.topk_encode gives the reference codes and AuxK codes (the dead
    latents alone: members with more dead latents than aux_k, fewer, none) and the reference gradients."""
    from saefast.kernels import topk_encode as kernel

    if chunk is not None:
        monkeypatch.setattr(ops.topk_chunks, "CHUNK_LATENTS", chunk)
        monkeypatch.setattr(kernel, "MAX_K_FP32", 16)
        monkeypatch.setattr(kernel, "MAX_K_WITH_AUX", 16)
    N, J, D = 9, 3, 20
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=M + k)
    x = rand(N, D)
    dead = torch.zeros(J, M, dtype=torch.bool)
    dead[0, torch.randperm(M, generator=torch.Generator().manual_seed(1))[: min(M, aux_k + 25)]] = True
    dead[1, 2: 2 + max(aux_k // 3, 1)] = True
    dead = dead.to(DEVICE) if aux_k else None  # member 2: no dead latent
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    codes, aux = ops.topk_encode(*leaves, k, dead, aux_k, backend="triton")
    expected, expected_aux = ops.topk_encode(*ref_leaves, k, dead, aux_k, backend="torch")
    assert codes.values.shape == (N, J, k)
    assert_close(codes.to_dense(), expected.to_dense(), atol=1e-5, rtol=1e-5)
    weights, aux_weights = rand(N, J, M), rand(N, J, M)
    loss, ref_loss = _codes_loss(codes, weights), _codes_loss(expected, weights)
    if aux_k:
        assert aux.values.shape == (N, J, aux_k)
        assert_close(aux.to_dense(), expected_aux.to_dense(), atol=1e-5, rtol=1e-5)
        assert bool((aux.values[:, 2] == 0).all())
        loss, ref_loss = loss + _codes_loss(aux, aux_weights), ref_loss + _codes_loss(expected_aux, aux_weights)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), torch.autograd.grad(loss, leaves),
                               torch.autograd.grad(ref_loss, ref_leaves)):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")


@needs_triton
def test_triton_encode_follows_autocast(monkeypatch):
    """Under torch.autocast the fused encode gets the autocast dtype (as a matmul would), and fp32 master weights
    still get fp32 gradients; outside autocast it gets the weights' dtype."""
    from saefast.kernels import topk_encode as kernel

    seen = []
    original = kernel.topk_encode

    def spy(x, W_enc, *args, **kwargs):
        seen.append((x.dtype, W_enc.dtype))
        return original(x, W_enc, *args, **kwargs)

    monkeypatch.setattr(kernel, "topk_encode", spy)
    W_enc, b_enc, _, b_dec = random_stack(2, 40, 16, seed=3)
    W_enc.requires_grad_(True)
    x = rand(5, 16)
    ops.topk_encode(x, W_enc, b_enc, b_dec, 4, backend="triton")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        codes, _ = ops.topk_encode(x, W_enc, b_enc, b_dec, 4, backend="triton")
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    (grad,) = torch.autograd.grad(codes.values.sum(), [W_enc])
    assert grad.dtype == torch.float32 and grad.shape == W_enc.shape


def test_dead_latents_lists_each_members_dead_latents_padded():
    dead = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert ops.dead_latents(dead).tolist() == [[1, 3, 4], [-1, -1, -1], [0, -1, -1]]
    assert ops.dead_latents(torch.zeros(2, 4, dtype=torch.bool)).shape == (2, 0)
    # A caller that knows a bound on the counts (no host sync) gets the same lists, padded to it.
    assert ops.dead_latents(dead, max_dead=4).tolist() == [[1, 3, 4, -1], [-1] * 4, [0, -1, -1, -1]]
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="max_dead"):
            ops.dead_latents(dead, max_dead=bad)


@needs_triton
@pytest.mark.parametrize("shared_b_dec", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_decode_matches_reference_forward_and_backward(shared_b_dec, with_mask):
    N, J, M, D, K = 9, 3, 21, 14, 5
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=7)
    if shared_b_dec:
        b_dec = b_dec[:1]
    values = rand(N, J, K, kind="rand")
    indices = torch.randint(0, M, (N, J, K)).to(DEVICE)
    indices[0, 0, :2] = 3  # a repeated latent within a row adds up
    alpha = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    mask = rand(N, J, K, kind="rand") > 0.3 if with_mask else None
    leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, b_dec)]
    out = ops.decode(SparseCodes(leaves[0], indices, M), leaves[1], leaves[2], alpha, mask, backend="triton")
    ref_leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, b_dec)]
    want = ops.decode(SparseCodes(ref_leaves[0], indices, M), ref_leaves[1], ref_leaves[2], alpha, mask,
                      backend="torch")
    assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = rand(N, D)
    for name, got, expected in zip(("values", "W_dec", "b_dec"), torch.autograd.grad((out * g).sum(), leaves),
                                   torch.autograd.grad((want * g).sum(), ref_leaves)):
        assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


@needs_triton
def test_deterministic_mode_gives_identical_gradients():
    N, J, M, D, K = 40, 2, 7, 12, 4  # few latents, many tokens: heavy collisions in the scatter
    _, _, W_dec, b_dec = random_stack(J, M, D, seed=1)
    values, indices = rand(N, J, K, kind="rand"), torch.randint(0, M, (N, J, K)).to(DEVICE)
    g = rand(N, D)

    def grad_w():
        W = W_dec.clone().requires_grad_(True)
        out = ops.decode(SparseCodes(values, indices, M), W, b_dec, 1.0, backend="triton")
        return torch.autograd.grad((out * g).sum(), W)[0]

    torch.use_deterministic_algorithms(True)
    try:
        first, second = grad_w(), grad_w()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert_close(first, grad_w(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Registration: opcheck (schema, fake impls, autograd) and torch.compile
# ------------------------------------------------------------------------------------------------------


@needs_triton
def test_opcheck_of_the_custom_ops():
    N, J, M, D, K = 6, 2, 10, 8, 3
    W_enc, b_enc, W_dec, b_dec = random_stack(J, M, D, seed=2)
    values = rand(N, J, K, kind="rand").requires_grad_(True)
    indices = torch.randint(0, M, (N, J, K)).to(DEVICE)
    alpha = torch.tensor([0.5, 0.5], device=DEVICE)
    torch.library.opcheck(torch.ops.saefast.sparse_decode.default,
                          (values, indices, W_dec.requires_grad_(True), alpha, b_dec[0], None, False))
    torch.library.opcheck(torch.ops.saefast.sparse_decode.default,
                          (values, indices, W_dec, alpha, b_dec, rand(N, J, K, kind="rand") > 0.5, True))
    bias = ops.folded_bias(W_enc, b_enc, b_dec).detach()
    dead = torch.zeros(J, M, dtype=torch.bool, device=DEVICE)
    dead[:, :4] = True
    torch.library.opcheck(torch.ops.saefast.topk_encode.default,
                          (rand(N, D).requires_grad_(True), W_enc.requires_grad_(True), bias, K, dead, 2))
    lower = torch.full((J, M), 0.1, device=DEVICE)
    torch.library.opcheck(torch.ops.saefast.threshold_encode.default,
                          (rand(N, D).requires_grad_(True), W_enc.requires_grad_(True), bias, lower, 6))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_traces_through_the_ops_without_graph_breaks(backend):
    N, J, M, D, K = 8, 2, 16, 12, 4
    W_enc, b_enc, W_dec, b_dec = random_stack(J, M, D, seed=3)

    def step(x):
        codes, _ = ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend=backend)
        return ops.decode(codes, W_dec, b_dec, 0.5, backend=backend)

    x = rand(N, D)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert_close(compiled(x), step(x), atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Models on the Triton backend
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize(("activation", "kind"), [("topk", "single"), ("topk", "bagging"), ("topk", "boosting"),
                                                  ("batchtopk", "single"), ("batchtopk", "bagging"),
                                                  ("jumprelu", "single"), ("jumprelu", "bagging")])
def test_training_on_a_fused_backend_matches_the_torch_backend(activation, kind, backend):
    # Latents die fast, so AuxK runs too. JumpReLU: thresholds and a bandwidth on the scale of the pre-activations,
    # so that the straight-through gradients (of the codes and of the L0 penalty) reach log_threshold.
    extra = dict(jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.2, l0_coef=0.05) if activation == "jumprelu" else {}
    cfg = sf.SAEConfig(d_in=12, n_latents=24, k=3, activation=activation, dead_after_tokens=20, **extra)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 12, generator=g).to(DEVICE) for _ in range(3)]

    def build():
        return (sf.SAE(cfg, seed=1) if kind == "single" else sf.Ensemble(cfg, 2, kind, seed=1)).to(DEVICE)

    models, histories = [], []
    for which in ("torch", backend):
        model = build()
        histories.append(sf.train(model, batches, steps=4, lr=1e-2, log_every=1, progress=False, backend=which))
        models.append(model)
    if activation == "topk":
        assert any(h["aux"] > 0 for h in histories[0])  # the AuxK path was exercised
    elif activation == "batchtopk":
        assert bool((models[0].threshold >= 0).all())  # the BatchTopK inference threshold was learned
    else:
        assert all(h["sparsity"] > 0 for h in histories[1])  # the fused L0 penalty was trained on
        assert not torch.equal(models[1].log_threshold, build().log_threshold)  # and the thresholds moved
    for a, b in zip(*histories):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["l0"] == pytest.approx(b["l0"], rel=1e-4)
    for name, tensor in models[0].state_dict().items():
        other = models[1].state_dict()[name]
        if tensor.is_floating_point():
            assert_close(other, tensor, atol=1e-4, rtol=1e-3, msg=name)
        else:
            assert torch.equal(other, tensor), name
    x = rand(10, 12)  # eval mode (train leaves it there): BatchTopK uses its threshold
    with sf.use_backend(backend):
        assert_close(models[0].reconstruct(x), models[0].reconstruct(x, backend="torch"), atol=1e-5)
        codes = models[0].encode(x)
    assert_close(codes.to_dense(), models[0].encode(x, backend="torch").to_dense(), atol=1e-5)
    assert_close(models[0].decode(codes, backend=backend), models[0].decode(codes, backend="torch"), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# BatchTopK on the Triton backend (candidates + exact fallback)
# ------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(("N", "J", "M", "D", "k", "capacity", "overflows"),
                         [(24, 3, 40, 16, 3, 4, False), (16, 2, 32, 12, 4, 1, True), (9, 2, 12, 8, 4, 4, False)])
def test_batchtopk_encode_matches_reference(N, J, M, D, k, capacity, overflows, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=N + M)
    x = rand(N, D)
    # Spread the per-token scale so the batch top-k is uneven across rows (some rows keep more than k; with the
    # tiny capacity, more than their candidates).
    x = x * torch.linspace(0.2, 3.0, N, device=DEVICE).unsqueeze(1) if overflows else x
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    if overflows:
        with pytest.warns(RuntimeWarning, match="exceeded its capacity"):
            codes, smallest, _ = ops.batchtopk_encode(*leaves, k, capacity=capacity, backend="triton")
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            codes, smallest, _ = ops.batchtopk_encode(*leaves, k, capacity=capacity, backend="triton")
        assert codes.k == min(M, capacity * k)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
    z, want_smallest = ref.batchtopk_activation(ref.pre_activations(*ref_leaves), k)
    assert_close(codes.to_dense(), z.reshape(N, J * M), atol=1e-5, rtol=1e-5)
    assert_close(smallest, want_smallest, atol=1e-5, rtol=1e-5)
    assert bool((codes.l0().sum(0) == (z != 0).sum((0, 2))).all())  # zero-valued slots do not count
    weights = rand(N, J * M)
    grads = torch.autograd.grad((codes.to_dense() * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((z.reshape(N, J * M) * weights).sum(), ref_leaves)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")


@needs_triton
def test_batchtopk_capacity_warning_is_shown_once(monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    W_enc, b_enc, _, b_dec = random_stack(2, 32, 12, seed=4)
    x = rand(16, 12) * torch.linspace(0.2, 3.0, 16, device=DEVICE).unsqueeze(1)
    with pytest.warns(RuntimeWarning, match="exceeded its capacity") as record:
        for _ in range(2):
            ops.batchtopk_encode(x, W_enc, b_enc, b_dec, 4, capacity=1, backend="triton")
    assert sum("exceeded its capacity" in str(w.message) for w in record) == 1


@needs_triton
@pytest.mark.parametrize(("capacity", "overflows"), [(4, False), (1, True)])
def test_threshold_encode_matches_reference(capacity, overflows, monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    N, J, M, D, k = 14, 3, 36, 12, 3
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=11)
    x = rand(N, D)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    # Per-member thresholds: about k latents per row pass (a few rows more); member 2 per-latent thresholds.
    threshold = pre.transpose(0, 1).reshape(J, -1).quantile(1 - k / M, dim=-1).clamp_min(0)[:, None].expand(J, M)
    threshold = threshold.clone()
    threshold[2] += 0.05 * torch.rand(M, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if overflows:
        with pytest.warns(RuntimeWarning, match="exceeded its capacity"):
            codes = ops.threshold_encode(x, W_enc, b_enc, b_dec, threshold, k, capacity=capacity, backend="triton")
    else:
        codes = ops.threshold_encode(x, W_enc, b_enc, b_dec, threshold, k, capacity=capacity, backend="triton")
        assert codes.k == capacity * k
    want = ref.threshold_activation(pre, threshold).reshape(N, J * M)
    assert_close(codes.to_dense(), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# JumpReLU on the Triton backend (every entry above θ − ε/2 + exact fallback)
# ------------------------------------------------------------------------------------------------------


def _jumprelu_case(N, J, M, D, seed, bandwidth):
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=seed)
    x = rand(N, D)
    g = torch.Generator().manual_seed(seed)
    theta = 0.4 + 0.3 * torch.rand(J, M, generator=g)
    log_threshold = theta.log().to(DEVICE)
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
    weights = rand(N, J * M)
    grads = torch.autograd.grad((codes.to_dense() * weights).sum() + (l0 * l0_weights).sum(), leaves)
    ref_grads = torch.autograd.grad((z.reshape(N, J * M) * weights).sum() + (want_l0 * l0_weights).sum(), ref_leaves)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec", "log_threshold"), grads, ref_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")
    return z, ref_grads


@needs_triton
@pytest.mark.parametrize("shared_b_dec", [False, True])
def test_jumprelu_encode_matches_reference_forward_and_backward(shared_b_dec, monkeypatch):
    import warnings

    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    N, J, M, D, eps = 16, 3, 40, 12, 0.2
    x, W_enc, b_enc, b_dec, log_threshold = _jumprelu_case(N, J, M, D, seed=21, bandwidth=eps)
    if shared_b_dec:
        b_dec = b_dec[:1]
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec, log_threshold)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default capacity (M here) never falls back
        codes, l0 = ops.jumprelu_encode(*leaves, eps, backend="triton")
    z, ref_grads = _assert_jumprelu_matches_reference(leaves, codes, l0, eps, l0_weights=rand(J))
    assert bool((codes.l0().sum(0) == (z != 0).sum((0, 2))).all())  # band and padding slots hold exact zeros
    assert bool((ref_grads[4] != 0).any())  # the STE did reach the thresholds


@needs_triton
def test_jumprelu_encode_falls_back_exactly_past_its_capacity(monkeypatch):
    monkeypatch.setattr(ops.encode, "_capacity_warned", False)
    N, J, M, D, eps = 10, 2, 24, 8, 0.2
    x, W_enc, b_enc, b_dec, log_threshold = _jumprelu_case(N, J, M, D, seed=22, bandwidth=eps)
    leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec, log_threshold)]
    with pytest.warns(RuntimeWarning, match="JumpReLU exceeded its capacity"):
        codes, l0 = ops.jumprelu_encode(*leaves, eps, capacity=1, backend="triton")
    _assert_jumprelu_matches_reference(leaves, codes, l0, eps, l0_weights=torch.ones(J, device=DEVICE))
    with pytest.raises(ValueError, match="capacity must be an int"):
        ops.jumprelu_encode(*leaves, eps, capacity=M + 1, backend="triton")
