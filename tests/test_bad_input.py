"""Bad input is refused before any compute, with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

import saefast as sf
from saefast import ref

D, M = 7, 11


def cfg_for(activation: str = "topk", **kw) -> sf.SAEConfig:
    return sf.SAEConfig(d_in=D, n_latents=M, k=3, activation=activation, **kw)


def good(n: int = 5) -> torch.Tensor:
    return torch.randn(n, D)


MODELS = {
    "sae": lambda: sf.SAE(cfg_for(), seed=0),
    "bagging": lambda: sf.Ensemble.bagging(cfg_for(), members=2),
    "boosting": lambda: sf.Ensemble.boosting(cfg_for(), members=2),
}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture
def no_compute(monkeypatch):
    """Fail if any encoder math runs: validation must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("compute ran before the input was validated")

    monkeypatch.setattr(ref, "pre_activations", forbidden)


def with_nan() -> torch.Tensor:
    x = good(6)
    x[2, 3] = float("nan")
    return x


def with_inf() -> torch.Tensor:
    x = good(6)
    x[0, 0] = float("inf")
    x[4, 1] = float("-inf")
    return x


BAD = [
    # (input, exception, message pattern)
    pytest.param(lambda: torch.randn(5, D + 2), ValueError, rf"d_in=9.*expects d_in={D}", id="wrong-d_in"),
    pytest.param(lambda: torch.randn(5, D - 1), ValueError, rf"d_in=6.*expects d_in={D}", id="narrow-d_in"),
    pytest.param(lambda: torch.ones(5, D, dtype=torch.int64), TypeError, r"floating dtype.*int64", id="int"),
    pytest.param(lambda: torch.ones(5, D, dtype=torch.bool), TypeError, r"floating dtype", id="bool"),
    pytest.param(with_nan, ValueError, r"NaN or Inf.*1 of 6 rows", id="nan"),
    pytest.param(with_inf, ValueError, r"NaN or Inf.*2 of 6 rows", id="inf"),
    pytest.param(lambda: torch.empty(0, D), ValueError, r"empty batch", id="empty"),
    pytest.param(lambda: torch.randn(D), ValueError, r"2-D", id="1-D"),
    pytest.param(lambda: torch.randn(2, 3, D), ValueError, r"2-D", id="3-D"),
    pytest.param(lambda: torch.randn(5, D).tolist(), TypeError, r"torch\.Tensor", id="list"),
    pytest.param(lambda: torch.randn(5, D).numpy(), TypeError, r"torch\.Tensor.*ndarray", id="numpy"),
    pytest.param(lambda: None, TypeError, r"torch\.Tensor.*NoneType", id="none"),
]


@pytest.mark.parametrize("make_x, exc, pattern", BAD)
def test_encode_refuses(model, no_compute, make_x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        model.encode(make_x())


@pytest.mark.parametrize("make_x, exc, pattern", BAD)
def test_reconstruct_refuses(model, no_compute, make_x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        model.reconstruct(make_x())
    with pytest.raises(exc, match=pattern):
        model(make_x())


@pytest.mark.parametrize("make_x, exc, pattern", BAD[:8])
def test_training_batch_refused_and_named(model, no_compute, make_x, exc, pattern):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=rf"batch 0.*{pattern}|{pattern}") as info:
        sf.train(model, [make_x()], steps=2, progress=False)
    assert "batch 0" in str(info.value)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed although the batch was refused"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_non_fp32_floating_input_is_handled(dtype):
    x = good(6)
    for make in MODELS.values():
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


def test_bad_batch_later_in_training_is_named_by_index():
    model = sf.SAE(cfg_for(), seed=0)
    batches = [good(8), good(8), with_nan()]
    with pytest.raises(ValueError, match=r"batch 2 contains NaN or Inf"):
        sf.train(model, batches, steps=5, progress=False)
    assert not model.training


def test_train_with_a_single_tensor_instead_of_batches():
    with pytest.raises(TypeError, match="iterable of"):
        sf.train(sf.SAE(cfg_for()), good(8), steps=1, progress=False)


def test_train_with_a_non_model():
    with pytest.raises(TypeError, match="SAE or Ensemble"):
        sf.train(torch.nn.Linear(3, 3), [good()], steps=1, progress=False)


def test_train_with_empty_batches():
    with pytest.raises(ValueError, match="batches is empty"):
        sf.train(sf.SAE(cfg_for()), [], steps=1, progress=False)


# ------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------


def test_k_larger_than_n_latents():
    with pytest.raises(ValueError, match=r"k=12 exceeds the number of latents \(11"):
        sf.SAEConfig(d_in=D, n_latents=11, k=12)
    sf.SAEConfig(d_in=D, n_latents=11, k=11)  # the boundary is fine


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, activation="gelu")


@pytest.mark.parametrize("field, value", [("d_in", 0), ("n_latents", -3), ("k", 0), ("d_in", 7.0), ("k", True)])
def test_non_positive_sizes(field, value):
    kw = {"d_in": D, "n_latents": M, "k": 3, field: value}
    with pytest.raises(ValueError, match=rf"SAEConfig\.{field} must be a positive int"):
        sf.SAEConfig(**kw)


def test_other_config_errors():
    with pytest.raises(ValueError, match="aux_k"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, aux_k=M + 1)
    with pytest.raises(ValueError, match="b_dec_init"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, b_dec_init="median")
    with pytest.raises(ValueError, match="jumprelu_bandwidth"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, jumprelu_bandwidth=0.0)
    with pytest.raises(ValueError, match="l1_coef"):
        sf.SAEConfig(d_in=D, n_latents=M, k=3, l1_coef=-1.0)
    with pytest.raises(ValueError, match="not divisible by groups"):
        sf.SAEConfig(d_in=D, n_latents=M, k=1, groups=2)
    with pytest.raises(ValueError, match="unknown SAEConfig field"):
        sf.SAEConfig.from_dict({"d_in": D, "n_latents": M, "k": 3, "width": 3})


@pytest.mark.parametrize("members", [0, -1, 1.5, True])
def test_members_below_one(members):
    with pytest.raises(ValueError, match=r"members >= 1"):
        sf.Ensemble(cfg_for(), members=members)


def test_cfg_must_be_an_saeconfig():
    with pytest.raises(TypeError, match="SAEConfig"):
        sf.SAE({"d_in": D, "n_latents": M})
    with pytest.raises(TypeError, match="SAEConfig"):
        sf.Ensemble({"d_in": D, "n_latents": M}, members=2)


def test_train_config_errors():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=0, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=1, resume=True, progress=False)
    with pytest.raises(TypeError):
        sf.train(sf.SAE(cfg_for()), [good()], steps=1, no_such_option=3)


# ------------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------------


def test_decode_wrong_dense_codes_shape(model):
    J = getattr(model, "members", 1)
    with pytest.raises(ValueError, match=rf"dense codes must be \[N, {J * M}\], got \(4, {J * M + 1}\)"):
        model.decode(torch.zeros(4, J * M + 1))
    with pytest.raises(ValueError, match=r"dense codes must be"):
        model.decode(torch.zeros(J * M))
    with pytest.raises(ValueError, match=r"dense codes must be"):
        model.decode(torch.zeros(2, J, M))


def test_decode_wrong_sparse_codes(model):
    J = getattr(model, "members", 1)
    x = good(4)
    other = sf.Ensemble.bagging(sf.SAEConfig(d_in=D, n_latents=M + 2, k=3), members=J)
    with pytest.raises(ValueError, match=rf"codes have {J} member\(s\) of {M + 2} latents; this model has {J} of {M}"):
        model.decode(other.encode(x))
    wrong_members = sf.Ensemble.bagging(cfg_for(), members=J + 1)
    with pytest.raises(ValueError, match=rf"codes have {J + 1} member"):
        model.decode(wrong_members.encode(x))


def test_decode_other_bad_codes(model):
    J = getattr(model, "members", 1)
    with pytest.raises(TypeError, match="floating dtype"):
        model.decode(torch.zeros(3, J * M, dtype=torch.int64))
    with pytest.raises(TypeError, match="SparseCodes or a dense tensor"):
        model.decode([[0.0] * (J * M)])
    with pytest.raises(ValueError, match="empty batch"):
        model.decode(torch.zeros(0, J * M))


def test_sparse_codes_constructor_checks():
    with pytest.raises(ValueError, match=r"same shape \[N, J, K\]"):
        sf.SparseCodes(torch.zeros(3, 1, 2), torch.zeros(3, 1, 3, dtype=torch.int64), M)
    with pytest.raises(ValueError, match=r"same shape \[N, J, K\]"):
        sf.SparseCodes(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int64), M)
    with pytest.raises(TypeError, match="int64"):
        sf.SparseCodes(torch.zeros(3, 1, 2), torch.zeros(3, 1, 2, dtype=torch.int32), M)


def test_evaluate_bad_data():
    model = sf.SAE(cfg_for())
    with pytest.raises(ValueError, match="empty batch"):
        sf.evaluate(model, torch.empty(0, D))
    with pytest.raises(ValueError, match=r"batch 1 contains NaN"):
        sf.evaluate(model, [good(3), with_nan()])
    with pytest.raises(ValueError, match="expects d_in"):
        sf.evaluate(model, torch.randn(4, D + 1))
