"""saefast.ops.registration: the fused ops are ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)``
traces through an encode and a decode on either fused backend without a graph break. (Each op's ``opcheck`` of its
schema, fake implementation and autograd is in the op's own test file.)"""

from __future__ import annotations

import pytest
import torch
from helpers import FUSED, NATIVE_CUDA, assert_close, rand, random_stack

from saefast import ops


@pytest.mark.parametrize(("backend", "device"), FUSED + NATIVE_CUDA)
def test_torch_compile_traces_through_the_ops_without_graph_breaks(backend, device):
    N, J, M, D, K = 8, 2, 16, 12, 4
    W_enc, b_enc, W_dec, b_dec = random_stack(J, M, D, seed=3, device=device)

    def step(x):
        codes, _ = ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend=backend)
        return ops.decode(codes, W_dec, b_dec, 0.5, backend=backend)

    x = rand(N, D, device=device)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert_close(compiled(x), step(x), atol=1e-6)
