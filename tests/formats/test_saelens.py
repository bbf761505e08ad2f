"""saefast.formats.saelens: SAELens 6.x folders made by the real library (tests/fixtures/interop, see
make_saelens_sparsify.py) load with the library's own encode and forward on every backend; saefast's exports load
back (and, where sae_lens is installed, in SAELens itself); bad folders are refused naming the file and the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    ALL_BACKENDS,
    INTEROP_FIXTURES,
    check_library_outputs,
    close_to_library,
    copy_interop_fixture,
    edit_json,
    edit_safetensors,
    interop_expected,
)
from safetensors.torch import load_file

import saefast as sf
from saefast.formats import FormatError, detect_format, saelens

FIXTURES = INTEROP_FIXTURES
ACTIVATION_OF = {"saelens-standard": "relu", "saelens-standard-no-bdec-input": "relu", "saelens-topk": "topk",
                 "saelens-topk-rescaled": "topk", "saelens-jumprelu": "jumprelu", "saelens-batchtopk": "jumprelu"}
"""Each committed SAELens fixture and the saefast activation it loads as (SAELens saves BatchTopK as JumpReLU)."""
D, M = 16, 40


expected, copy_fixture, check_matches, close = (interop_expected, copy_interop_fixture, check_library_outputs,
                                                close_to_library)
WEIGHTS = "sae_weights.safetensors"


def edit_config(folder: Path, **changes) -> None:
    edit_json(folder / "cfg.json", **changes)


def edit_weights(folder: Path, edit) -> None:
    edit_safetensors(folder / WEIGHTS, edit)


def random_sae(activation: str, seed: int = 0, **cfg) -> sf.SAE:
    """An SAE with random weights: non-unit decoder rows, non-zero biases, thresholds in [0.05, 0.35)."""
    g = torch.Generator().manual_seed(seed)
    sae = sf.SAE(sf.SAEConfig(d_in=D, n_latents=M, k=5, activation=activation, normalize_decoder=False, **cfg),
                 seed=seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(M, D, generator=g) / D**0.5)
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=g))
        sae.W_dec.copy_(torch.randn(M, D, generator=g) * (0.5 + 1.5 * torch.rand(M, 1, generator=g)))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
        theta = 0.05 + 0.3 * torch.rand(M, generator=g)
        if sae.log_threshold is not None:
            sae.log_threshold.copy_(theta.log())
        if activation == "batchtopk":
            sae.threshold.copy_(theta)
    return sae.eval()


def inputs(n: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) + 0.4


# ------------------------------------------------------------------------------------------------------
# The real library's fixtures
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", sorted(ACTIVATION_OF))
def test_fixture_loads_with_the_librarys_outputs(name, backend):
    if ACTIVATION_OF[name] == "relu" and backend != "torch":
        pytest.skip("ReLU runs on the torch backend only")
    path = FIXTURES / name
    assert detect_format(path) == "saelens"
    reference = expected(name)
    for model in (sf.load(path), saelens.load(path)):
        assert isinstance(model, sf.SAE) and not model.training
        assert model.cfg.activation == ACTIVATION_OF[name]
        assert (model.cfg.d_in, model.cfg.n_latents) == (D, M)
        assert model.cfg.normalize_decoder is False
        check_matches(model, reference, backend, name)


def test_weights_load_as_stored_and_folds_are_exact():
    stored = load_file(str(FIXTURES / "saelens-jumprelu" / "sae_weights.safetensors"))
    model = sf.load(FIXTURES / "saelens-jumprelu")
    assert torch.equal(model.W_enc, stored["W_enc"].T) and torch.equal(model.W_dec, stored["W_dec"])
    assert torch.equal(model.b_enc, stored["b_enc"]) and torch.equal(model.b_dec, stored["b_dec"])
    close(model.log_threshold.exp(), stored["threshold"])
    assert bool(model.b_dec_initialized)

    # apply_b_dec_to_input=False: b_enc' = b_enc + W_enc·b_dec (saefast subtracts b_dec first).
    stored = load_file(str(FIXTURES / "saelens-standard-no-bdec-input" / "sae_weights.safetensors"))
    model = sf.load(FIXTURES / "saelens-standard-no-bdec-input")
    close(model.b_enc, stored["b_enc"] + stored["W_enc"].T @ stored["b_dec"])


def test_the_rescaled_topk_fixture_needs_its_fold(tmp_path):
    """rescale_acts_by_decoder_norm changes the codes of this fixture: ignoring the flag would not match."""
    folder = copy_fixture(tmp_path, "saelens-topk-rescaled")
    edit_config(folder, rescale_acts_by_decoder_norm=False)
    reference = expected("saelens-topk-rescaled")
    codes = sf.load(folder).encode(reference["x"]).to_dense()
    assert (codes - reference["feature_acts"]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_thresholds_at_or_below_zero_act_as_a_relu(tmp_path, backend):
    """SAELens' JumpReLU is ReLU(pre)·[pre > θ]: θ ≤ 0 keeps every positive pre-activation (saefast: θ = 0)."""
    folder = copy_fixture(tmp_path, "saelens-jumprelu")

    def lower(tensors):
        tensors["threshold"][:10] = 0.0
        tensors["threshold"][10:20] = -0.5

    edit_weights(folder, lower)
    w = load_file(str(folder / "sae_weights.safetensors"))
    x = expected("saelens-jumprelu")["x"]
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    feature_acts = pre.relu() * (pre > w["threshold"])
    model = sf.load(folder)
    assert torch.isinf(model.log_threshold[:20]).all()
    check_matches(model, {"x": x, "feature_acts": feature_acts, "x_hat": feature_acts @ w["W_dec"] + w["b_dec"]},
                  backend, "thresholds <= 0")


def test_pre_6_configs_are_converted(tmp_path):
    folder = copy_fixture(tmp_path, "saelens-topk")
    edit_config(folder, metadata=None, architecture=None, k=None, hook_point="blocks.0.hook_resid_post",
                activation_fn_str="topk", activation_fn_kwargs={"k": 5}, normalize_activations=False)
    edit_weights(folder, lambda t: t.update(scaling_factor=torch.ones(M)))
    model = sf.load(folder)
    assert model.cfg.activation == "topk" and model.cfg.k == 5
    check_matches(model, expected("saelens-topk"), "torch", "pre-6.0 topk")

    folder = copy_fixture(tmp_path, "saelens-standard")
    edit_config(folder, metadata=None, architecture=None, activation_fn_str="relu")
    check_matches(sf.load(folder), expected("saelens-standard"), "torch", "pre-6.0 relu")


# ------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------

METADATA = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "context_size": 128, "dtype": "float32"}


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_export_round_trip(tmp_path, activation):
    model = random_sae(activation, seed=3)
    model.save(tmp_path / "out", format="saelens", metadata=METADATA)
    config = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert config["architecture"] == {"relu": "standard", "topk": "topk"}.get(activation, "jumprelu")
    assert (config["d_in"], config["d_sae"], config["dtype"]) == (D, M, "float32")
    assert config["apply_b_dec_to_input"] is True and config["normalize_activations"] == "none"
    assert config["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert config["metadata"]["context_size"] == 128 and config["metadata"]["sae_lens_version"].startswith("6.")
    assert detect_format(tmp_path / "out") == "saelens"
    back = sf.load(tmp_path / "out")
    x = inputs()
    close(back.encode(x).to_dense(), model.encode(x).to_dense())
    close(back.reconstruct(x), model.reconstruct(x))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # stored as they are (transposed W_enc, transposed back)
        assert torch.equal(getattr(back, name), getattr(model, name)), name


def test_bagging_as_sae_of_relu_and_jumprelu_exports(tmp_path):
    for activation in ("relu", "jumprelu"):
        ensemble = sf.Ensemble(sf.SAEConfig(d_in=D, n_latents=12, activation=activation), members=3,
                               combine="bagging", seed=1).eval()
        with torch.no_grad():
            ensemble.b_enc.normal_(0, 0.2)
            ensemble.b_dec.normal_(0, 0.3)
        ensemble.as_sae().save(tmp_path / activation, format="saelens")
        x = inputs()
        close(sf.load(tmp_path / activation).reconstruct(x), ensemble.reconstruct(x), activation)


def test_export_refusals(tmp_path):
    ensemble = sf.Ensemble(sf.SAEConfig(d_in=D, n_latents=12, k=2), members=2, combine="bagging")
    with pytest.raises(FormatError, match=r"as_sae\(\) for ReLU/JumpReLU bagging.*boosting cannot be encoded"):
        ensemble.save(tmp_path / "a", format="saelens")
    with pytest.raises(FormatError, match="groups=2"):
        ensemble.as_sae().save(tmp_path / "b", format="saelens")
    boosting = sf.Ensemble(sf.SAEConfig(d_in=D, n_latents=12, activation="relu"), members=2, combine="boosting")
    with pytest.raises(FormatError, match="boosting"):
        boosting.as_sae().save(tmp_path / "c", format="saelens")
    with pytest.raises(FormatError, match="threshold has not been estimated"):
        sf.SAE(sf.SAEConfig(d_in=D, n_latents=M, k=3, activation="batchtopk")).save(tmp_path / "d", format="saelens")
    assert not (tmp_path / "d").exists()


def test_export_loads_in_sae_lens(tmp_path):
    """Only where sae_lens is installed (not in saefast's own environment; make_saelens_sparsify.py runs the same
    check with the real library)."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAE as SAELensSAE

    x = inputs()
    for activation in ("relu", "topk", "jumprelu", "batchtopk"):
        model = random_sae(activation, seed=4)
        model.save(tmp_path / activation, format="saelens", metadata=METADATA)
        theirs = SAELensSAE.load_from_disk(tmp_path / activation)
        with torch.no_grad():
            close(theirs.encode(x), model.encode(x).to_dense(), activation)
            close(theirs(x), model.reconstruct(x), activation)


# ------------------------------------------------------------------------------------------------------
# Bad input: FormatError naming the file and the field
# ------------------------------------------------------------------------------------------------------


def _drop_b_enc(t):
    del t["b_enc"]


def _transpose_W_dec(t):
    t["W_dec"] = t["W_dec"].T.contiguous()


def _add_b_mag(t):
    t["b_mag"] = torch.zeros(M)


def _nan_in_W_enc(t):
    t["W_enc"][0, 0] = float("nan")


BAD_WEIGHTS = [
    (_drop_b_enc, "'b_enc'"),
    (_transpose_W_dec, r"'W_dec' has shape \(16, 40\), expected \(40, 16\)"),
    (_add_b_mag, "'b_mag'"),
    (_nan_in_W_enc, "'W_enc' holds non-finite"),
]


@pytest.mark.parametrize("edit, field", BAD_WEIGHTS, ids=["missing-key", "wrong-shape", "extra-key", "nan"])
def test_bad_weights_are_refused_by_name(tmp_path, edit, field):
    folder = copy_fixture(tmp_path, "saelens-standard")
    edit_weights(folder, edit)
    with pytest.raises(FormatError, match=rf"sae_weights\.safetensors.*{field}"):
        sf.load(folder)


BAD_CONFIGS = [
    ({"architecture": "gated"}, "'architecture' is 'gated'"),
    ({"d_in": 17}, r"'W_enc' has shape \(16, 40\), expected \(17, 40\) from cfg\.json \(d_in=17, d_sae=40\)"),
    ({"d_sae": 41}, r"expected \(16, 41\) from cfg\.json \(d_in=16, d_sae=41\)"),
    ({"d_sae": "wide"}, "'d_sae' must be a positive integer"),
    ({"normalize_activations": "expected_average_only_in"}, "'normalize_activations' is 'expected_average_only_in'"),
    ({"apply_b_dec_to_input": "yes"}, "'apply_b_dec_to_input'"),
]


@pytest.mark.parametrize("changes, field", BAD_CONFIGS,
                         ids=["architecture", "d_in", "d_sae", "d_sae-type", "normalize", "apply_b_dec"])
def test_bad_configs_are_refused_by_name(tmp_path, changes, field):
    folder = copy_fixture(tmp_path, "saelens-standard")
    edit_config(folder, **changes)
    with pytest.raises(FormatError, match=rf"{re.escape(str(folder))}.*{field}"):
        sf.load(folder)


def test_bad_topk_and_pre_6_fields_are_refused_by_name(tmp_path):
    folder = copy_fixture(tmp_path, "saelens-topk")
    edit_config(folder, k=41)
    with pytest.raises(FormatError, match=r"cfg\.json: field 'k' is 41, more than d_sae=40"):
        sf.load(folder)
    edit_config(folder, k=None)
    with pytest.raises(FormatError, match=r"cfg\.json: field 'k'"):
        sf.load(folder)

    folder = copy_fixture(tmp_path, "saelens-standard")
    edit_config(folder, metadata=None, activation_fn_str="tanh-relu")
    with pytest.raises(FormatError, match=r"cfg\.json: field 'activation_fn_str' is 'tanh-relu'"):
        sf.load(folder)
    edit_config(folder, activation_fn_str="relu")
    edit_weights(folder, lambda t: t.update(scaling_factor=torch.full((M,), 2.0)))
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors: key 'scaling_factor'"):
        sf.load(folder)

    folder = copy_fixture(tmp_path, "saelens-jumprelu")
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"cfg\.json: not a readable JSON"):
        sf.load(folder)
    (folder / "cfg.json").write_text((FIXTURES / "saelens-jumprelu" / "cfg.json").read_text())
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors: not a readable safetensors"):
        sf.load(folder)
