"""dictionary_learning SAEs load into saefast with their exact function: the fixtures were saved and run by THEIR
code (tests/fixtures/interop/make_dictionary_learning_openai.py, saprmarks/dictionary_learning at the commit in each
versions.json); every bad file is a FormatError naming the file and the key or field."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ALL_BACKENDS, assert_close
from safetensors.torch import load_file

import saefast as sf
from saefast import formats
from saefast.formats import FormatError
from saefast.formats import dictionary_learning as dl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "interop"
ARCHS = {"standard": "relu", "standard_new": "relu", "topk": "topk", "batchtopk": "batchtopk",
         "jumprelu": "jumprelu", "matryoshka": "batchtopk"}


def fixture(arch: str) -> Path:
    return FIXTURES / f"dictionary_learning-{arch}"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within 1e-5 relative to the magnitude of ``expected`` (fp32)."""
    assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5, msg=what)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_their_features_and_reconstruction(arch, backend):
    if ARCHS[arch] == "relu" and backend != "torch":
        pytest.skip("ReLU SAEs run on the torch backend only")
    path = fixture(arch)
    expected = load_file(str(path / "expected.safetensors"))
    x = expected["x"]
    assert formats.detect_format(path) == "dictionary_learning"
    for sae in (sf.load(path), dl.load(path), sf.load(path / "ae.pt")):
        assert isinstance(sae, sf.SAE) and not sae.training
        assert sae.cfg.activation == ARCHS[arch] and not sae.cfg.normalize_decoder
        assert (sae.cfg.d_in, sae.cfg.n_latents) == (16, 40)
        with sf.use_backend(backend):
            assert_matches(sae.encode(x).to_dense(), expected["features"], f"{arch} features on {backend}")
            assert_matches(sae.reconstruct(x), expected["reconstruction"], f"{arch} reconstruction on {backend}")


def test_topk_and_batchtopk_settings_come_from_the_weights():
    assert sf.load(fixture("topk")).cfg.k == 6
    batch = sf.load(fixture("batchtopk"))
    assert batch.cfg.k == 6
    # their scalar threshold becomes saefast's per-latent inference threshold, used in eval mode
    assert torch.equal(batch.threshold, torch.full((40,), 0.15))
    x = load_file(str(fixture("batchtopk") / "expected.safetensors"))["x"]
    pre = (x - batch.b_dec) @ batch.W_enc.T + batch.b_enc
    assert_close(batch.encode(x, backend="torch").to_dense(), pre * (pre > 0.15), atol=1e-6)
    jump = sf.load(fixture("jumprelu"))
    theta = torch.load(fixture("jumprelu") / "ae.pt", weights_only=True)["threshold"]
    assert_close(jump.log_threshold.exp(), theta, atol=0, rtol=1e-6)


def test_unestimated_batchtopk_threshold_is_their_relu(tmp_path):
    """θ = −1 (never estimated): their forward r·[r > −1] is ReLU, so saefast's threshold is 0."""
    path = copy(fixture("batchtopk"), tmp_path)
    state = torch.load(path / "ae.pt", weights_only=True)
    state["threshold"] = torch.tensor(-1.0)
    torch.save(state, path / "ae.pt")
    sae = sf.load(path)
    x = load_file(str(path / "expected.safetensors"))["x"]
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert torch.equal(sae.threshold, torch.zeros(40))
    assert_close(sae.encode(x, backend="torch").to_dense(), torch.relu(pre), atol=1e-6)


def test_float64_weights_stay_float64(tmp_path):
    path = copy(fixture("topk"), tmp_path)
    state = torch.load(path / "ae.pt", weights_only=True)
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, path / "ae.pt")
    sae = sf.load(path)
    assert sae.W_enc.dtype == torch.float64
    expected = load_file(str(path / "expected.safetensors"))
    assert_matches(sae.reconstruct(expected["x"].double(), backend="torch"), expected["reconstruction"].double(),
                   "fp64")


# ----- bad input ---------------------------------------------------------------------------------------------------


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def edit_state(path: Path, change) -> None:
    state = torch.load(path / "ae.pt", weights_only=True)
    change(state)
    torch.save(state, path / "ae.pt")


def edit_config(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config["trainer"])
    (path / "config.json").write_text(json.dumps(config))


class Pickled:
    """Not a tensor or a plain container: torch.load(weights_only=True) refuses it."""


class FancyDict(collections.OrderedDict):
    """A dict subclass that weights_only does not allow."""


@pytest.mark.parametrize("arch, change, pattern", [
    ("topk", lambda s: s.pop("encoder.bias"), r"ae\.pt: missing key 'encoder\.bias'"),
    ("jumprelu", lambda s: s.pop("threshold"), r"ae\.pt: missing key 'threshold'"),
    ("standard", lambda s: s.__setitem__("bias", torch.zeros(15)), r"ae\.pt: 'bias' has shape \[15\], expected \[16\]"),
    ("matryoshka", lambda s: s.__setitem__("W_dec", torch.zeros(16, 40)),
     r"ae\.pt: 'W_dec' has shape \[16, 40\], expected \[40, 16\]"),
    ("batchtopk", lambda s: s.__setitem__("k", torch.tensor(6.0)), r"ae\.pt: 'k' has dtype torch\.float32"),
    ("batchtopk", lambda s: s.__setitem__("k", torch.tensor(41)), r"ae\.pt: 'k' = 41 must be in \[1, 40\]"),
    ("topk", lambda s: s.__setitem__("encoder.bias", torch.zeros(40, dtype=torch.int64)),
     r"ae\.pt: 'encoder\.bias' has dtype torch\.int64"),
    ("topk", lambda s: s.__setitem__("b_dec", s["b_dec"].double()), r"ae\.pt: 'b_dec' is torch\.float64"),
    ("topk", lambda s: s.__setitem__("extra", torch.zeros(1)), r"ae\.pt: unexpected key 'extra'"),
    ("jumprelu", lambda s: s["threshold"].__setitem__(3, -0.1), r"ae\.pt: 'threshold'\[3\] = -0\.1.* not > 0"),
    ("matryoshka", lambda s: s.__setitem__("group_sizes", torch.tensor([10, 20])),
     r"ae\.pt: 'group_sizes' must be positive integers summing to n_latents=40"),
])
def test_bad_weights_name_file_and_key(tmp_path, arch, change, pattern):
    path = copy(fixture(arch), tmp_path)
    edit_state(path, change)
    with pytest.raises(FormatError, match=pattern):
        sf.load(path)


@pytest.mark.parametrize("arch, change, pattern", [
    ("topk", lambda t: t.__setitem__("k", 5), r"config\.json: field 'trainer\.k' = 5 disagrees .*ae\.pt"),
    ("batchtopk", lambda t: t.__setitem__("dict_size", 64), r"config\.json: field 'trainer\.dict_size' = 64"),
    ("standard", lambda t: t.__setitem__("activation_dim", 8), r"config\.json: field 'trainer\.activation_dim' = 8"),
    ("matryoshka", lambda t: t.__setitem__("group_sizes", [20, 20]), r"config\.json: field 'trainer\.group_sizes'"),
    ("standard", lambda t: t.__setitem__("dict_class", "GatedAutoEncoder"),
     r"config\.json: field 'trainer\.dict_class' = 'GatedAutoEncoder' is an architecture saefast cannot read"),
    ("jumprelu", lambda t: t.__setitem__("dict_class", "AutoEncoderTopK"),
     r"ae\.pt: missing key 'decoder\.weight' of the AutoEncoderTopK state dict"),
])
def test_config_disagreeing_with_weights_names_the_field(tmp_path, arch, change, pattern):
    path = copy(fixture(arch), tmp_path)
    edit_config(path, change)
    with pytest.raises(FormatError, match=pattern):
        sf.load(path)


def test_config_without_trainer_or_dict_class(tmp_path):
    path = copy(fixture("topk"), tmp_path)
    edit_config(path, lambda t: t.pop("dict_class"))
    assert not dl.detect(path)
    with pytest.raises(FormatError, match=r"config\.json: missing field 'trainer\.dict_class'"):
        dl.load(path)
    (path / "config.json").write_text(json.dumps({"buffer": {}}))
    with pytest.raises(FormatError, match=r"config\.json: missing field 'trainer'"):
        dl.load(path)
    (path / "config.json").unlink()
    with pytest.raises(FormatError, match=r"config\.json: missing"):
        dl.load(path)


@pytest.mark.parametrize("payload", [
    lambda s: {**s, "note": Pickled()},
    lambda s: FancyDict(s),
], ids=["custom-class", "ordereddict-subclass"])
def test_pickled_objects_are_refused_unread(tmp_path, payload):
    path = copy(fixture("topk"), tmp_path)
    state = torch.load(path / "ae.pt", weights_only=True)
    torch.save(payload(state), path / "ae.pt")
    with pytest.raises(FormatError, match=r"ae\.pt: holds pickled objects .*(Pickled|FancyDict).*weights_only=True"):
        sf.load(path)


def test_training_backups_and_garbage_are_refused(tmp_path):
    path = copy(fixture("topk"), tmp_path)
    state = torch.load(path / "ae.pt", weights_only=True)
    torch.save({"step": 10, "ae": state, "optimizer": {"state": {}, "param_groups": []}, "config": {},
                "norm_factor": 2.0}, path / "ae.pt")
    with pytest.raises(FormatError, match=r"ae\.pt: is a mid-training backup"):
        sf.load(path)
    (path / "ae.pt").write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match=r"ae\.pt: not a readable torch \.pt file"):
        sf.load(path)
    torch.save([torch.zeros(1)], path / "ae.pt")
    with pytest.raises(FormatError, match=r"ae\.pt: expected a state dict"):
        sf.load(path)
