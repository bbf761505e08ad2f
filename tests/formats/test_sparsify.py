"""saefast.formats.sparsify: sparsify folders made by the real library (tests/fixtures/interop, see
make_saelens_sparsify.py) load with the library's own codes and ``sae_out`` on every backend, also from the run
folder above one hookpoint; saefast's TopK exports load back (and, where sparsify is installed, in sparsify itself);
bad folders, skip connections and transcoders are refused naming the file and the field."""

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
from saefast.formats import FormatError, detect_format, sparsify

FIXTURES = INTEROP_FIXTURES
NAMES = ["sparsify-topk", "sparsify-groupmax"]
D, M = 16, 40


expected, copy_fixture, check_matches, close = (interop_expected, copy_interop_fixture, check_library_outputs,
                                                close_to_library)
WEIGHTS = "sae.safetensors"


def edit_config(folder: Path, **changes) -> None:
    edit_json(folder / "cfg.json", **changes)


def edit_weights(folder: Path, edit) -> None:
    edit_safetensors(folder / WEIGHTS, edit)


def random_topk(seed: int = 0, k: int = 5, groups: int = 1, activation: str = "topk") -> sf.SAE:
    g = torch.Generator().manual_seed(seed)
    sae = sf.SAE(sf.SAEConfig(d_in=D, n_latents=M, k=k, groups=groups, activation=activation,
                              normalize_decoder=False), seed=seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(M, D, generator=g) / D**0.5)
        sae.b_enc.copy_(0.2 * torch.randn(M, generator=g))
        sae.W_dec.copy_(torch.randn(M, D, generator=g) * (0.5 + 1.5 * torch.rand(M, 1, generator=g)))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
    return sae.eval()


def inputs(n: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) + 0.4


# ------------------------------------------------------------------------------------------------------
# The real library's fixtures
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_with_the_librarys_outputs(name, backend):
    path = FIXTURES / name
    assert detect_format(path) == "sparsify"
    reference = expected(name)
    for model in (sf.load(path), sparsify.load(path)):
        assert isinstance(model, sf.SAE) and not model.training
        assert model.cfg.activation == "topk" and model.cfg.normalize_decoder is False
        # groupmax: the max of each of k = 4 contiguous groups of 10 latents = a top-1 in each of 4 groups
        assert (model.cfg.k, model.cfg.groups) == ((5, 1) if name == "sparsify-topk" else (1, 4))
        check_matches(model, reference, backend, name)
    stored = load_file(str(path / "sae.safetensors"))
    assert torch.equal(model.W_enc, stored["encoder.weight"]) and torch.equal(model.b_enc, stored["encoder.bias"])
    assert torch.equal(model.W_dec, stored["W_dec"]) and torch.equal(model.b_dec, stored["b_dec"])


def test_the_run_folder_above_one_hookpoint_loads(tmp_path):
    run = tmp_path / "run"
    copy_fixture(tmp_path, "sparsify-topk", run / "layers.3")
    (run / "config.json").write_text(json.dumps({"sae": {"k": 5}, "batch_size": 32}))  # the trainer's config
    assert detect_format(run) == "sparsify"
    check_matches(sf.load(run), expected("sparsify-topk"), "torch", "run folder")
    copy_fixture(tmp_path, "sparsify-groupmax", run / "layers.5")
    hookpoints = r"holds 2 sparsify hookpoints \(layers.3, layers.5\)"
    with pytest.raises(FormatError, match=rf"{re.escape(str(run))}: {hookpoints}"):
        sf.load(run)
    check_matches(sf.load(run / "layers.5"), expected("sparsify-groupmax"), "torch", "one hookpoint")


# ------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 4], ids=["topk", "groupmax"])
def test_export_round_trip(tmp_path, groups):
    model = random_topk(seed=2, k=5 if groups == 1 else 1, groups=groups)
    model.save(tmp_path / "out", format="sparsify")
    config = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert config["activation"] == ("topk" if groups == 1 else "groupmax")
    assert (config["d_in"], config["num_latents"], config["k"]) == (D, M, 5 if groups == 1 else 4)
    assert config["skip_connection"] is False and config["transcode"] is False
    assert detect_format(tmp_path / "out") == "sparsify"
    back = sf.load(tmp_path / "out")
    assert (back.cfg.k, back.cfg.groups) == (model.cfg.k, model.cfg.groups)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(model, name)), name
    x = inputs()
    close(back.encode(x).to_dense(), model.encode(x).to_dense())
    close(back.reconstruct(x), model.reconstruct(x))


def test_export_refusals(tmp_path):
    for activation in ("relu", "jumprelu", "batchtopk"):
        with pytest.raises(FormatError, match=f"cannot write a {activation} SAE in the sparsify format.*SAELens"):
            random_topk(activation=activation).save(tmp_path / activation, format="sparsify")
    with pytest.raises(FormatError, match="top 2 latents of each of 2 groups"):
        random_topk(k=2, groups=2).save(tmp_path / "grouped", format="sparsify")
    ensemble = sf.Ensemble(sf.SAEConfig(d_in=D, n_latents=12, k=2), members=2, combine="boosting")
    with pytest.raises(FormatError, match=r"as_sae\(\) for ReLU/JumpReLU bagging"):
        ensemble.save(tmp_path / "ensemble", format="sparsify")
    assert not any((tmp_path / name).exists() for name in ("relu", "grouped", "ensemble"))


def test_export_loads_in_sparsify(tmp_path):
    """Only where sparsify is installed (not in saefast's own environment; make_saelens_sparsify.py runs the same
    check with the real library)."""
    pytest.importorskip("sparsify")
    from sparsify import SparseCoder

    x = inputs()
    for groups in (1, 4):
        model = random_topk(seed=6, k=5 if groups == 1 else 1, groups=groups)
        model.save(tmp_path / str(groups), format="sparsify")
        theirs = SparseCoder.load_from_disk(tmp_path / str(groups))
        with torch.no_grad():
            out = theirs.encode(x)
            dense = torch.zeros(x.shape[0], M).scatter_add(-1, out.top_indices, out.top_acts)
            close(dense, model.encode(x).to_dense())
            close(theirs(x).sae_out, model.reconstruct(x))


# ------------------------------------------------------------------------------------------------------
# Bad input: FormatError naming the file and the field
# ------------------------------------------------------------------------------------------------------


def _drop_encoder_bias(t):
    del t["encoder.bias"]


def _transpose_W_dec(t):
    t["W_dec"] = t["W_dec"].T.contiguous()


def _add_W_skip(t):
    t["W_skip"] = torch.zeros(D, D)


def _add_unknown(t):
    t["decoder.bias"] = torch.zeros(D)


BAD_WEIGHTS = [
    (_drop_encoder_bias, "missing key 'encoder.bias'"),
    (_transpose_W_dec, r"'W_dec' has shape \(16, 40\), expected \(40, 16\)"),
    (_add_W_skip, "key 'W_skip'"),
    (_add_unknown, "unexpected key.*'decoder.bias'"),
]


@pytest.mark.parametrize("edit, field", BAD_WEIGHTS, ids=["missing-key", "wrong-shape", "W_skip", "extra-key"])
def test_bad_weights_are_refused_by_name(tmp_path, edit, field):
    folder = copy_fixture(tmp_path, "sparsify-topk")
    edit_weights(folder, edit)
    with pytest.raises(FormatError, match=rf"{re.escape(str(folder))}/sae\.safetensors: .*{field}"):
        sf.load(folder)


BAD_CONFIGS = [
    ({"d_in": 17}, r"sae\.safetensors: 'encoder.weight' has shape \(40, 16\), expected \(40, 17\) from cfg\.json "
                   r"\(d_in=17, num_latents=40\)"),
    ({"num_latents": 48}, r"expected \(48, 16\) from cfg\.json \(d_in=16, num_latents=48\)"),
    ({"skip_connection": True}, r"cfg\.json: field 'skip_connection' is true"),
    ({"transcode": True}, r"cfg\.json: field 'transcode' is true"),
    ({"activation": "abstopk"}, r"cfg\.json: field 'activation' is 'abstopk'"),
    ({"k": 0}, r"cfg\.json: field 'k' must be a positive integer"),
    ({"activation": "groupmax", "k": 3}, r"cfg\.json: field 'k' is 3; groupmax needs k groups dividing"),
]


@pytest.mark.parametrize("changes, field", BAD_CONFIGS,
                         ids=["d_in", "num_latents", "skip", "transcode", "activation", "k", "groupmax-k"])
def test_bad_configs_are_refused_by_name(tmp_path, changes, field):
    folder = copy_fixture(tmp_path, "sparsify-topk")
    edit_config(folder, **changes)
    with pytest.raises(FormatError, match=rf"{re.escape(str(folder))}/.*{field}"):
        sf.load(folder)
