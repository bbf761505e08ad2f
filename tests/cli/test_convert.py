"""saefast convert: a saefast run to another format with the harvest's metadata, detection of SRC's format, and the
errors for a bad target, an occupied OUT and a folder that holds no SAE."""

from __future__ import annotations

import torch

import saefast as sf
from saefast.cli import main
from saefast.cli.convert import export_metadata


def test_convert_round_trip_and_errors(tmp_path, capsys):
    sae = sf.SAE(sf.SAEConfig(d_in=8, n_latents=16, k=2), seed=3)
    sae.save(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "saefast"]) == 0
    assert "converted" in capsys.readouterr().out
    x = torch.randn(5, 8)
    assert torch.equal(sf.load(tmp_path / "out").reconstruct(x), sae.eval().reconstruct(x))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "saefast"]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "o2"), "--to", "onnx"]) == 2
    assert "--to onnx: saefast writes saefast, saelens, sparsify" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.bin").write_bytes(b"\0")
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "o3"), "--to", "saefast"]) == 2
    assert "is not an SAE saefast can read" in capsys.readouterr().err


def test_export_metadata_comes_from_the_runs_harvest(tmp_path):
    from helpers import save_tiny_local_llama

    model_dir, text = save_tiny_local_llama(tmp_path)
    acts, run = tmp_path / "acts", tmp_path / "run"
    assert main(["harvest", "--model", str(model_dir), "--text", str(text), "--layer", "1", "--tokens", "300",
                 "--context", "32", "--dtype", "float32", "--no-progress", "--out", str(acts)]) == 0
    assert main(["train", "--data", str(acts), "--latents", "32", "--k", "4", "--steps", "2", "--batch-size", "64",
                 "--no-progress", "--out", str(run)]) == 0
    assert export_metadata(run) == {"hook_name": "model.layers.1", "model_name": str(model_dir), "context_size": 32,
                                     "dtype": "float32"}
    assert export_metadata(tmp_path / "acts") == {}  # not a run: nothing to say


def test_eval_and_compare_take_foreign_folders(tmp_path, capsys):
    """A SAELens and a sparsify folder, written by the real libraries, evaluated and compared like saefast runs."""
    import json

    from helpers import copy_interop_fixture, interop_expected

    from saefast.data.store import write_store

    x = interop_expected("saelens-topk")["x"]
    write_store(tmp_path / "acts", x.repeat(4, 1), dtype=torch.float32)
    folders = [copy_interop_fixture(tmp_path, name) for name in ("saelens-topk", "sparsify-topk")]
    for folder in folders:
        assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "acts")]) == 0
        recorded = json.loads((folder / "eval.json").read_text())
        expected = sf.evaluate(sf.load(folder), x.repeat(4, 1))["explained_variance"]
        assert abs(recorded["explained_variance"] - expected) < 1e-6
    assert main(["compare", *map(str, folders)]) == 0
    assert "SAE" in capsys.readouterr().out
