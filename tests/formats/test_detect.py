"""saefast.load detects a folder's format from its files (saefast's own checkpoints here; each foreign format has
its own test file), and an unknown folder, a missing path or an unknown format are clear errors."""

from __future__ import annotations

import pytest
import torch

import saefast as sf
from saefast import formats


def test_saefast_checkpoints_are_detected_and_loaded(tmp_path):
    model = sf.Ensemble(sf.SAEConfig(d_in=8, n_latents=16, k=2), 2)
    model.save(tmp_path / "run")
    assert formats.detect_format(tmp_path / "run") == "saefast"
    loaded = sf.load(tmp_path / "run")
    x = torch.randn(4, 8)
    assert torch.equal(loaded.reconstruct(x), model.eval().reconstruct(x))
    model.save(tmp_path / "again", format="saefast")
    assert formats.detect_format(tmp_path / "again") == "saefast"


def test_unknown_folders_and_formats_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not an SAE")
    with pytest.raises(formats.FormatError, match=r"is not an SAE saefast can read.*notes\.txt"):
        sf.load(tmp_path)
    with pytest.raises(sf.CheckpointError, match="no checkpoint at .*nowhere"):
        sf.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown format 'safetensorz'"):
        sf.load(tmp_path, format="safetensorz")
    sae = sf.SAE(sf.SAEConfig(d_in=8, n_latents=16, k=2))
    with pytest.raises(ValueError, match="cannot write format 'onnx'"):
        sae.save(tmp_path / "out", format="onnx")
