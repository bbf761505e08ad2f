"""The reference ops that the kernels will be tested against, on hand-computed cases."""

import pytest
import torch

from saefast import ref
from saefast.codes import SparseCodes


def test_decode_sparse_sums_alpha_weighted_member_outputs_and_biases():
    # J=2 members, M=3 latents, D=2; token 0 uses a repeated index in member 1 (contributions add up).
    W_dec = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                          [[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]]])
    b_dec = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    values = torch.tensor([[[2.0, 1.0], [1.0, 3.0]], [[0.0, 4.0], [0.5, 0.0]]])
    indices = torch.tensor([[[0, 2], [1, 1]], [[1, 2], [2, 0]]])
    codes = SparseCodes(values, indices, n_latents=3)
    # token 0: member 0 = 2·[1,0] + 1·[1,1] = [3,1]; member 1 = 1·[0,2] + 3·[0,2] = [0,8]
    # token 1: member 0 = 4·[1,1] = [4,4];             member 1 = 0.5·[1,-1] = [0.5,-0.5]
    alpha = torch.tensor([0.25, 2.0])
    expected = torch.tensor([
        [0.25 * (3 + 0.5) + 2.0 * (0 + 0), 0.25 * (1 + 0) + 2.0 * (8 - 1)],
        [0.25 * (4 + 0.5) + 2.0 * (0.5 + 0), 0.25 * (4 + 0) + 2.0 * (-0.5 - 1)],
    ])
    torch.testing.assert_close(ref.decode_sparse(codes, W_dec, b_dec, alpha), expected)
    # A shared bias [1, D] (one SAE whose groups add up) is added once, unscaled.
    shared = ref.decode_sparse(codes, W_dec, b_dec[:1], 1.0)
    torch.testing.assert_close(shared, torch.tensor([[3.5, 9.0], [4.5 + 0.5, 3.5]]))


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


def test_pre_activations_shared_and_per_member_inputs_agree():
    J, M, D, N = 3, 5, 4, 6
    W_enc, b_enc, b_dec = torch.randn(J, M, D), torch.randn(J, M), torch.randn(J, D)
    x = torch.randn(N, D)
    expected = torch.stack([(x - b_dec[j]) @ W_enc[j].T + b_enc[j] for j in range(J)], dim=1)
    torch.testing.assert_close(ref.pre_activations(x, W_enc, b_enc, b_dec), expected, atol=1e-5, rtol=1e-5)
    per_member = x.unsqueeze(1).expand(N, J, D)
    torch.testing.assert_close(ref.pre_activations(per_member, W_enc, b_enc, b_dec), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combine", ["bagging", "boosting"])
def test_decode_sparse_is_the_models_decode(combine):
    import saefast as sf

    model = sf.Ensemble(sf.SAEConfig(d_in=10, n_latents=14, k=3), members=3, combine=combine, seed=2)
    with torch.no_grad():
        model.b_dec.copy_(torch.randn(3, 10))
    codes = model.encode(torch.randn(7, 10))
    expected = ref.decode_sparse(codes, model.W_dec, model.b_dec, model.alpha)
    torch.testing.assert_close(model.decode(codes), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(codes.to_dense()), expected, atol=1e-5, rtol=1e-5)
