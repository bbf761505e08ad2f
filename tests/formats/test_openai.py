"""openai/sparse_autoencoder state dicts load into saefast with their exact function: the fixtures were saved and run
by THEIR code (tests/fixtures/interop/make_dictionary_learning_openai.py, openai/sparse_autoencoder at the commit in
each versions.json: ``Autoencoder.state_dict()``, reloaded with ``Autoencoder.from_state_dict``); every bad file is a
FormatError naming the file and the key."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ALL_BACKENDS, assert_close
from safetensors.torch import load_file

import saefast as sf
from saefast import formats
from saefast.formats import FormatError
from saefast.formats import openai as oa

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "interop"


def fixture(arch: str) -> Path:
    return FIXTURES / f"openai-{arch}"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within 1e-5 relative to the magnitude of ``expected`` (fp32)."""
    assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5, msg=what)


def test_relu_features_and_reconstruction():
    path = fixture("relu")
    expected = load_file(str(path / "expected.safetensors"))
    x = expected["x"]
    assert formats.detect_format(path) == "openai" and formats.detect_format(path / "state_dict.pt") == "openai"
    for sae in (sf.load(path), sf.load(path / "state_dict.pt"), oa.load(path)):
        assert sae.cfg.activation == "relu" and not sae.cfg.normalize_decoder and not sae.training
        with sf.use_backend("torch"):  # ReLU SAEs run on the torch backend only
            assert_matches(sae.encode(x).to_dense(), expected["features"], "relu features")
            assert_matches(sae.reconstruct(x), expected["reconstruction"], "relu reconstruction")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_features_and_reconstruction_of_layer_normalised_inputs(backend):
    """Their from_state_dict runs TopK autoencoders on LN(x) and de-normalises the output: the SAE is the inner
    autoencoder, and a warning says how to use it."""
    path = fixture("topk")
    expected = load_file(str(path / "expected.safetensors"))
    x_n, mu, std = oa.layer_norm(expected["x"])
    with pytest.warns(UserWarning, match="layer-normalised"):
        loaded = [sf.load(path), oa.load(path / "state_dict.pt")]
    for sae in loaded:
        assert (sae.cfg.activation, sae.cfg.k) == ("topk", 6)
        with sf.use_backend(backend):
            assert_matches(sae.encode(x_n).to_dense(), expected["features"], f"topk features on {backend}")
            assert_matches(sae.reconstruct(x_n) * std + mu, expected["reconstruction"],
                           f"topk reconstruction on {backend}")


def test_other_pt_files_are_not_detected(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model.pt")
    assert not oa.detect(tmp_path / "model.pt")
    (tmp_path / "notes.pt").write_bytes(b"not a zip")
    assert not oa.detect(tmp_path / "notes.pt")


# ----- bad input ---------------------------------------------------------------------------------------------------


class Pickled:
    """Not a tensor or a plain container: torch.load(weights_only=True) refuses it."""


class FancyDict(collections.OrderedDict):
    """A dict subclass that weights_only does not allow."""


def edited(tmp_path: Path, arch: str, change) -> Path:
    path = tmp_path / f"openai-{arch}"
    shutil.copytree(fixture(arch), path)
    state = torch.load(path / "state_dict.pt", weights_only=True)
    changed = change(state)
    state = state if changed is None else changed
    torch.save(state, path / "state_dict.pt")
    return path / "state_dict.pt"


def set_(key, value):
    return lambda s: s.__setitem__(key, value)


def drop(key):
    return lambda s: s.__delitem__(key)


@pytest.mark.parametrize("arch, change, pattern", [
    ("relu", drop("latent_bias"), r"state_dict\.pt: missing key 'latent_bias'"),
    ("relu", drop("encoder.weight"), r"state_dict\.pt: missing key 'encoder\.weight'"),
    ("relu", set_("decoder.weight", torch.zeros(40, 16)),
     r"state_dict\.pt: 'decoder\.weight' has shape \[40, 16\], expected \[16, 40\]"),
    ("relu", set_("pre_bias", torch.zeros(16, dtype=torch.int32)),
     r"state_dict\.pt: 'pre_bias' has dtype torch\.int32"),
    ("relu", set_("latents_mean_square", torch.zeros(3)), r"state_dict\.pt: 'latents_mean_square' has shape \[3\]"),
    ("relu", set_("activation", "Identity"), r"state_dict\.pt: 'activation' = 'Identity' is an activation saefast"),
    ("relu", set_("something", torch.zeros(1)), r"state_dict\.pt: unexpected key 'something'"),
    ("relu", set_("decoder.linear.weight", torch.zeros(40, 16)), r"state_dict\.pt: key 'decoder\.linear\.weight'"),
    ("topk", set_("activation.k", 5),
     r"state_dict\.pt: 'activation\.k' = 5 disagrees with 'activation_state_dict\.k' = 6"),
    ("topk", set_("activation_state_dict", {"k": 6, "postact_fn": "Identity"}),
     r"state_dict\.pt: 'activation_state_dict\.postact_fn' = 'Identity'"),
    ("topk", set_("activation_state_dict", {"k": 41, "postact_fn": "ReLU"}),
     r"state_dict\.pt: 'activation_state_dict\.k' = 41 must be an int in \[1, 40\]"),
    ("topk", set_("activation_state_dict", {"postact_fn": "ReLU"}),
     r"state_dict\.pt: missing key 'activation_state_dict\.k'"),
    ("topk", set_("activation", "ReLU"), r"state_dict\.pt: 'activation' is 'ReLU' but the state dict has TopK"),
    ("relu", lambda s: {**s, "note": Pickled()}, r"state_dict\.pt: holds pickled objects .*Pickled.*weights_only=True"),
    ("relu", lambda s: FancyDict(s), r"state_dict\.pt: holds pickled objects .*FancyDict"),
])
def test_bad_state_dicts_name_file_and_key(tmp_path, arch, change, pattern):
    path = edited(tmp_path, arch, change)
    with pytest.raises(FormatError, match=pattern):
        sf.load(path, format="openai")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FormatError, match=r"state_dict\.pt: missing"):
        oa.load(tmp_path)
    (tmp_path / "state_dict.pt").write_bytes(b"garbage")
    with pytest.raises(FormatError, match=r"state_dict\.pt: not a readable torch \.pt file"):
        oa.load(tmp_path)
