"""saefast.ops.sparse_sae_backward: the training forward's outputs as one op whose backward is one fused sparse pass.

* the native kernel against the oracle :func:`saefast.ops.ref.sparse_sae_backward` (itself checked against autograd
  of the dense chain) on ragged shapes, shared and per-member inputs, shared and per-member ``b_dec``, with and
  without AuxK slots, zero and negative values; poisoned outputs; bit-identical for any thread count; bad input;
* :func:`saefast.ops.sparse_sae_outputs` on every fused backend against the op-by-op chain (forward and every
  gradient, the input's included);
* the models' training terms: the fused path gives the op-by-op path's loss and gradients.

Tolerance: fp32 results within ``1e-5`` of the largest expected magnitude (sums of at most a few hundred terms,
accumulated in another order).
"""

from __future__ import annotations

import pytest
import torch
from helpers import CPU, FUSED, assert_close, cfg_for, make, native_on

import saefast as sf
from saefast import ops
from saefast.ops import ref
from saefast.ops import sparse_sae_backward as fused_module
from saefast.ops.codes import SparseCodes

OPS = torch.ops.saefast


def _slots(N, J, M, D, S, split, seed, per_member_x=False, shared_b_dec=False, dtype=torch.float32):
    """Random inputs of the fused backward: some zero and negative values, repeated latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, J, D) if per_member_x else (N, D), generator=g)
    b_dec = torch.randn(1 if shared_b_dec else J, D, generator=g)
    W_dec = torch.randn(J, M, D, generator=g).to(dtype)
    values = torch.rand(N, J, S, generator=g)
    values[torch.rand(N, J, S, generator=g) < 0.25] = 0.0
    values[torch.rand(N, J, S, generator=g) < 0.1] *= -1.0  # a negative value: decoded, but no ReLU gradient
    indices = torch.randint(0, M, (N, J, S), generator=g)
    grad_out = torch.randn(N, J, D, generator=g)
    aux_grad = torch.randn(N, J, D, generator=g) if split < S else None
    return x, b_dec, W_dec, values, indices, split, grad_out, aux_grad


def _scaled_close(actual, expected, msg):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    assert_close(actual, expected, atol=1e-5 * max(scale, 1.0), msg=msg)


def test_oracle_matches_autograd_of_the_dense_chain():
    """The oracle's formulas are the gradient of decode(ReLU(W_enc(x − b_dec) + b_enc)) at fixed selections."""
    N, J, M, D, K, A = 7, 2, 11, 5, 3, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W_enc = torch.randn(J, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(J, M, generator=g, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(J, D, generator=g, dtype=torch.float64)
    W_dec = torch.randn(J, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(M, generator=g)[:K + A] for _ in range(N * J)]).view(N, J, K + A)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    z = torch.relu(pre.gather(-1, indices))
    y = ref.decode_members_sparse(SparseCodes(z[..., :K], indices[..., :K], M), W_dec)
    y_aux = ref.decode_members_sparse(SparseCodes(z[..., K:], indices[..., K:], M), W_dec)
    G, G_aux = torch.randn(N, J, D, generator=g, dtype=torch.float64), torch.randn(N, J, D, generator=g,
                                                                                   dtype=torch.float64)
    ((y * G).sum() + (y_aux * G_aux).sum()).backward()
    dW_enc, db_enc, dW_dec, _ = ref.sparse_sae_backward(x, b_dec, W_dec.detach(), z.detach(), indices, K, G, G_aux)
    assert_close(dW_enc, W_enc.grad, atol=1e-5)
    assert_close(db_enc, b_enc.grad, atol=1e-5)
    assert_close(dW_dec, W_dec.grad, atol=1e-5)


@native_on(CPU)
@pytest.mark.parametrize(("N", "J", "M", "D", "S", "split"),
                         [(13, 3, 37, 19, 5, 5), (13, 3, 37, 19, 7, 4), (1, 1, 1, 1, 1, 1), (31, 2, 5, 33, 9, 0),
                          (6, 4, 70, 17, 3, 2), (0, 2, 9, 4, 3, 3)])
@pytest.mark.parametrize("per_member_x", [False, True])
@pytest.mark.parametrize("shared_b_dec", [False, True])
def test_native_kernel_matches_oracle(N, J, M, D, S, split, per_member_x, shared_b_dec):
    args = _slots(N, J, M, D, S, split, seed=N + 10 * S, per_member_x=per_member_x, shared_b_dec=shared_b_dec)
    got = OPS.native_sparse_sae_backward(*args)
    want = ref.sparse_sae_backward(*args)
    for name, a, b in zip(("dW_enc", "db_enc", "dW_dec", "dpre"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        _scaled_close(a, b, name)


@native_on(CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_kernel_reads_half_precision_decoder_rows(dtype):
    args = _slots(9, 2, 23, 13, 4, 3, seed=5, dtype=dtype)
    got = OPS.native_sparse_sae_backward(*args)
    want = ref.sparse_sae_backward(*args)  # reads the same rounded rows, in fp32
    for name, a, b in zip(("dW_enc", "db_enc", "dW_dec", "dpre"), got, want):
        _scaled_close(a, b, name)


@native_on(CPU)
def test_native_kernel_is_bit_identical_for_any_thread_count():
    args = _slots(64, 3, 40, 24, 6, 4, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.native_sparse_sae_backward(*args)
        torch.set_num_threads(max(2, threads))
        many = OPS.native_sparse_sae_backward(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@native_on(CPU)
def test_native_kernel_ignores_the_indices_of_zero_slots_and_checks_the_others():
    x, b_dec, W_dec, values, indices, split, grad_out, aux = _slots(5, 2, 7, 3, 4, 4, seed=1)
    values[0, 1, 2] = 0.0
    indices[0, 1, 2] = 10**6  # padding: never read
    got = OPS.native_sparse_sae_backward(x, b_dec, W_dec, values, indices, split, grad_out, aux)
    assert float(got[3][0, 1, 2]) == 0.0
    values[0, 1, 2] = 0.5
    with pytest.raises(ValueError, match=r"member 1 has 1000000"):
        OPS.native_sparse_sae_backward(x, b_dec, W_dec, values, indices, split, grad_out, aux)


@native_on(CPU)
@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.update(x=a["x"][:, :-1]), "x must be"),
    (lambda a: a.update(b_dec=a["b_dec"][:, :2]), "b_dec must be"),
    (lambda a: a.update(values=a["values"][..., :-1]), "differ in shape"),
    (lambda a: a.update(indices=a["indices"].int()), "int64"),
    (lambda a: a.update(split=9), "split must lie"),
    (lambda a: a.update(split=2, aux_grad_out=None), "need aux_grad_out"),
    (lambda a: a.update(grad_out=a["grad_out"][:1]), "grad_out must be"),
    (lambda a: a.update(W_dec=a["W_dec"][:1]), "W_dec must be"),
])
def test_native_kernel_rejects_bad_input(change, message):
    names = ("x", "b_dec", "W_dec", "values", "indices", "split", "grad_out", "aux_grad_out")
    args = dict(zip(names, _slots(5, 2, 7, 3, 4, 4, seed=2)))
    change(args)
    with pytest.raises(ValueError, match=message):
        OPS.native_sparse_sae_backward(*(args[n] for n in names))


def _encoded(x, W_enc, b_enc, b_dec, k, dead, aux_k):
    with torch.no_grad():
        return ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k, backend="torch")


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("per_member_x", [False, True])
@pytest.mark.parametrize("shared_b_dec", [False, True])
@pytest.mark.parametrize("with_aux", [False, True])
def test_outputs_and_every_gradient_match_the_op_by_op_chain(backend, device, per_member_x, shared_b_dec, with_aux):
    if per_member_x and shared_b_dec:
        pytest.skip("per-member inputs are an ensemble's: one b_dec per member")
    N, J, M, D, k = 11, 3, 29, 13, 4
    g = torch.Generator().manual_seed(4)
    x = torch.randn((N, J, D) if per_member_x else (N, D), generator=g)
    W_enc = torch.randn(J, M, D, generator=g) / D ** 0.5
    W_dec = torch.randn(J, M, D, generator=g)
    b_enc = torch.randn(J, M, generator=g) * 0.1
    b_dec = torch.randn(1 if shared_b_dec else J, D, generator=g) * 0.1
    dead = torch.rand(J, M, generator=g) < 0.3 if with_aux else None
    codes, aux = _encoded(x, W_enc, b_enc, b_dec, k, dead, 6 if with_aux else 0)
    G = torch.randn(N, J, D, generator=g)
    G_aux = torch.randn(N, J, D, generator=g)

    def run(fused: bool):
        leaves = [t.clone().to(device).requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
        moved = [None if c is None else SparseCodes(c.values.to(device), c.indices.to(device), M) for c in (codes, aux)]
        if fused:
            y, y_aux = ops.sparse_sae_outputs(*leaves, *moved, backend=backend)
        else:
            y, y_aux = fused_module._op_by_op(*leaves, *moved, "torch")
        loss = (y * G.to(device)).sum() + (0 if y_aux is None else (y_aux * G_aux.to(device)).sum())
        loss.backward()
        return [y.detach().cpu()] + ([] if y_aux is None else [y_aux.detach().cpu()]) + \
            [t.grad.cpu() for t in leaves]

    names = ["y"] + (["y_aux"] if with_aux else []) + ["dx", "dW_enc", "db_enc", "db_dec", "dW_dec"]
    for name, got, want in zip(names, run(True), run(False)):
        _scaled_close(got, want, name)


@native_on(CPU)
@pytest.mark.parametrize("kind", ["sae", "bagging", "boosting"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_training_terms_take_the_fused_path_with_the_same_gradients(monkeypatch, kind, activation):
    """The models' training terms on ``native``: the fused op's loss and gradients are the op-by-op chain's."""
    cfg = cfg_for(activation, k=3)
    model = make(kind, cfg, members=3)
    x = torch.randn(40, cfg.d_in, generator=torch.Generator().manual_seed(0))
    model.init_b_dec_(x)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.05)
        model.tokens_since_fired.view(-1)[::4] = 10**9  # some dead latents: AuxK runs
    members = model.stages()[-1]
    x_in = model.stage_input(x, len(model.stages()) - 1)
    calls = []
    real = fused_module._SparseSAE.apply
    monkeypatch.setattr(fused_module._SparseSAE, "apply", lambda *a: calls.append(1) or real(*a))

    def grads(fused: bool):
        monkeypatch.setattr(sf.ops, "fused_backward_runs", (lambda b, d: fused_module.fused_backward_runs(b, d))
                            if fused else (lambda b, d: False))
        model.zero_grad(set_to_none=True)
        terms, _ = model.training_terms(x_in, members, backend="native")
        terms.loss.backward()
        return terms, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    fused_terms, fused_grads = grads(True)
    assert calls, "the fused op did not run"
    plain_terms, plain_grads = grads(False)
    assert_close(fused_terms.loss, plain_terms.loss, atol=0.0)  # the same forward
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        _scaled_close(fused_grads[name], plain_grads[name], name)
