"""Bad input to a model (SAE, bagging, boosting) — its encode, reconstruct and decode, its construction — is refused
before any compute, with a message that names the problem. (Bad batches for ``train``: tests/training/test_trainer.py;
for ``evaluate``: tests/eval/test_evaluate.py; bad configs: tests/test_config.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import BAD, BAD_INPUT_MODELS, cfg_for, good
from helpers import SMALL_D as D
from helpers import SMALL_M as M

import saefast as sf


@pytest.mark.parametrize("make_x, exc, pattern", BAD)
def test_encode_refuses(each_model, no_compute, make_x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        each_model.encode(make_x())


@pytest.mark.parametrize("make_x, exc, pattern", BAD)
def test_reconstruct_refuses(each_model, no_compute, make_x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        each_model.reconstruct(make_x())
    with pytest.raises(exc, match=pattern):
        each_model(make_x())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_non_fp32_floating_input_is_handled(dtype):
    x = good(6)
    for make in BAD_INPUT_MODELS.values():
        m = make()
        for method in ("encode", "reconstruct"):
            try:
                out = getattr(m, method)(x.to(dtype))
            except (TypeError, ValueError) as err:  # refusing is fine, if it says why
                assert "dtype" in str(err)
            else:
                out = out.to_dense() if method == "encode" else out
                want = getattr(m, method)(x.to(dtype).float())
                want = want.to_dense() if method == "encode" else want
                assert torch.allclose(out.float(), want, atol=5e-2)


# ------------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [0, -1, 1.5, True])
def test_members_below_one(members):
    with pytest.raises(ValueError, match=r"members >= 1"):
        sf.Ensemble(cfg_for(), members=members)


def test_cfg_must_be_an_saeconfig():
    with pytest.raises(TypeError, match="SAEConfig"):
        sf.SAE({"d_in": D, "n_latents": M})
    with pytest.raises(TypeError, match="SAEConfig"):
        sf.Ensemble({"d_in": D, "n_latents": M}, members=2)


# ------------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------------


def test_decode_wrong_dense_codes_shape(each_model):
    J = getattr(each_model, "members", 1)
    with pytest.raises(ValueError, match=rf"dense codes must be \[N, {J * M}\], got \(4, {J * M + 1}\)"):
        each_model.decode(torch.zeros(4, J * M + 1))
    with pytest.raises(ValueError, match=r"dense codes must be"):
        each_model.decode(torch.zeros(J * M))
    with pytest.raises(ValueError, match=r"dense codes must be"):
        each_model.decode(torch.zeros(2, J, M))


def test_decode_wrong_sparse_codes(each_model):
    J = getattr(each_model, "members", 1)
    x = good(4)
    other = sf.Ensemble.bagging(sf.SAEConfig(d_in=D, n_latents=M + 2, k=3), members=J)
    with pytest.raises(ValueError, match=rf"codes have {J} member\(s\) of {M + 2} latents; this model has {J} of {M}"):
        each_model.decode(other.encode(x))
    wrong_members = sf.Ensemble.bagging(cfg_for(), members=J + 1)
    with pytest.raises(ValueError, match=rf"codes have {J + 1} member"):
        each_model.decode(wrong_members.encode(x))


def test_decode_other_bad_codes(each_model):
    J = getattr(each_model, "members", 1)
    with pytest.raises(TypeError, match="floating dtype"):
        each_model.decode(torch.zeros(3, J * M, dtype=torch.int64))
    with pytest.raises(TypeError, match="SparseCodes or a dense tensor"):
        each_model.decode([[0.0] * (J * M)])
    with pytest.raises(ValueError, match="empty batch"):
        each_model.decode(torch.zeros(0, J * M))


