"""saefast.ops.codes: SparseCodes — the round trip through dense codes, member offsets of the global indices, which
latents fired, and constructors that refuse bad shapes and dtypes with a message naming the problem."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_M as M
from helpers import random_codes

import saefast as sf
from saefast.ops.codes import SparseCodes


@pytest.mark.parametrize("shape", [(5, 1, 7), (9, 3, 13), (4, 2, 1)])
def test_sparse_codes_dense_round_trip(shape):
    dense = torch.randn(shape) * (torch.rand(shape) < 0.3)
    codes = SparseCodes.from_dense(dense)
    assert codes.k == max(int((dense != 0).sum(-1).max()), 1)
    torch.testing.assert_close(codes.to_dense(), dense.reshape(shape[0], -1))
    flat = SparseCodes.from_dense(dense.reshape(shape[0], -1), members=shape[1])
    torch.testing.assert_close(flat.values, codes.values)
    offsets = flat.global_indices() - flat.indices
    assert torch.equal(offsets[0, :, 0], torch.arange(shape[1]) * shape[2])


def test_sparse_codes_reject_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        SparseCodes(torch.zeros(2, 1, 3), torch.zeros(2, 1, 2, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="int64"):
        SparseCodes(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot split"):
        SparseCodes.from_dense(torch.zeros(2, 7), members=2)



@pytest.mark.parametrize("n, j, m, k", [(1, 1, 1, 1), (7, 3, 5, 4), (33, 2, 17, 6), (0, 2, 4, 3)])
def test_sparse_codes_fired_matches_the_dense_codes(n, j, m, k):
    """Repeated indices, zero values (never firing), members offset by M, an empty batch."""
    gen = torch.Generator().manual_seed(n * 100 + m)
    codes = random_codes(n, j, m, k, gen, p_zero=0.4)
    fired = codes.fired()
    assert fired.dtype == torch.bool
    assert torch.equal(fired, (codes.to_dense() != 0).any(0))
    assert torch.equal(fired.nonzero().flatten(), codes.active_global_indices().unique())



def test_sparse_codes_constructor_checks():
    with pytest.raises(ValueError, match=r"same shape \[N, J, K\]"):
        sf.SparseCodes(torch.zeros(3, 1, 2), torch.zeros(3, 1, 3, dtype=torch.int64), M)
    with pytest.raises(ValueError, match=r"same shape \[N, J, K\]"):
        sf.SparseCodes(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int64), M)
    with pytest.raises(TypeError, match="int64"):
        sf.SparseCodes(torch.zeros(3, 1, 2), torch.zeros(3, 1, 2, dtype=torch.int32), M)
