"""saefast.ops.backend and saefast.ops.native: which backend runs an op (``use_backend``, ``resolve_backend`` and
their errors), the native extension (built and registered, loaded on first use, results bit-identical for 1 and 2
threads) and saefast without it (one warning on first use, then the torch backend)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from helpers import TRITON_OK, needs_extension, needs_triton, rand, random_stack

import saefast as sf
from saefast import ops
from saefast.ops import native

OPS = torch.ops.saefast


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


@needs_triton
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


@needs_triton
def test_models_refuse_triton_for_activations_it_does_not_implement():
    sae = sf.SAE(sf.SAEConfig(d_in=8, n_latents=16, activation="relu"))
    with pytest.raises(ValueError, match="topk, batchtopk and jumprelu activations, not 'relu'"):
        sae.encode(torch.randn(4, 8), backend="triton")


# ------------------------------------------------------------------------------------------------------
# The native extension
# ------------------------------------------------------------------------------------------------------


@needs_extension
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


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_extension
def test_results_are_bit_identical_for_any_thread_count():
    N, J, K, M, D = 300, 3, 16, 2500, 40
    W_enc, b_enc, W_dec, b_dec = random_stack(J, M, D, seed=11, small_decoder=False)
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


@needs_extension
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
