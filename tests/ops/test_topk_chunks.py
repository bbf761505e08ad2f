"""saefast.ops.topk_chunks: the dead-latent lists, and the chunked top-k that ``ops.topk_encode`` takes on Triton
past the fused kernel's register limits (a large ``k``, AuxK's default ``aux_k = d/2``), against the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, needs_triton, rand, random_stack

from saefast import ops
from saefast.ops.codes import SparseCodes


def test_dead_latents_lists_each_members_dead_latents_padded():
    dead = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert ops.dead_latents(dead).tolist() == [[1, 3, 4], [-1, -1, -1], [0, -1, -1]]
    assert ops.dead_latents(torch.zeros(2, 4, dtype=torch.bool)).shape == (2, 0)
    # A caller that knows a bound on the counts (no host sync) gets the same lists, padded to it.
    assert ops.dead_latents(dead, max_dead=4).tolist() == [[1, 3, 4, -1], [-1] * 4, [0, -1, -1, -1]]
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"max_dead must be an int in \[0, 5\]"):
            ops.dead_latents(dead, max_dead=bad)


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
    W_enc, b_enc, _, b_dec = random_stack(J, M, D, seed=M + k, device=DEVICE)
    x = rand(N, D, device=DEVICE)
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
    weights, aux_weights = rand(N, J, M, device=DEVICE), rand(N, J, M, device=DEVICE)
    loss, ref_loss = _codes_loss(codes, weights), _codes_loss(expected, weights)
    if aux_k:
        assert aux.values.shape == (N, J, aux_k)
        assert_close(aux.to_dense(), expected_aux.to_dense(), atol=1e-5, rtol=1e-5)
        assert bool((aux.values[:, 2] == 0).all())
        loss, ref_loss = loss + _codes_loss(aux, aux_weights), ref_loss + _codes_loss(expected_aux, aux_weights)
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), torch.autograd.grad(loss, leaves),
                               torch.autograd.grad(ref_loss, ref_leaves)):
        assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"grad {name}")
