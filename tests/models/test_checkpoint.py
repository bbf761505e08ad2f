"""saefast.models.checkpoint: exact round trips of every model kind and activation (safetensors and JSON, never a
pickle), corruption detected and named, and saves that are atomic (a crash keeps the previous checkpoint). (Resuming
training from a checkpoint: tests/training/test_resume.py; atomic writes: tests/test_files.py.)"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import ACTS, KINDS, make, quiet, state_equal
from helpers import cfg_for as _cfg_for
from helpers import data as _data

import saefast as sf
import saefast.models.checkpoint as ckpt

cfg_for = functools.partial(_cfg_for, d_in=7, n_latents=12, k=2)
data = functools.partial(_data, offset=0.3)


def model_file(path: Path) -> Path:
    return path / json.loads((path / "config.json").read_text())["files"]["model"]["name"]


# ------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ACTS)
def test_round_trip_is_exact(tmp_path, kind, activation):
    cfg = cfg_for(activation, dead_after_tokens=20)
    model = make(kind, cfg)
    batches = [data(10, 7, seed=s) for s in range(2)]
    sf.train(model, batches, steps=2, lr=1e-2, **quiet())
    # non-trivial buffers (large values check the int64 round trip)
    with torch.no_grad():
        model.tokens_since_fired.copy_(torch.randint(0, 2**40, model.tokens_since_fired.shape))
    if activation == "batchtopk":
        assert (model.threshold > 0).all()
    model.save(tmp_path / "m")
    again = sf.load(tmp_path / "m")
    assert type(again) is type(model)
    assert again.cfg == model.cfg
    assert again.seed == model.seed
    if kind != "sae":
        assert again.combine == model.combine and again.members == model.members
    state_equal(again, model)
    assert not again.training
    x = data(9, 7, seed=9)
    assert torch.equal(again.reconstruct(x), model.reconstruct(x))
    assert torch.equal(again.encode(x).to_dense(), model.encode(x).to_dense())
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "config.json" in names
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin", ".tmp")) for n in names), names
    assert all(n == "config.json" or n.endswith((".safetensors", ".json")) for n in names), names


def test_untrained_model_round_trip_and_module_level_save(tmp_path):
    model = sf.Ensemble.bagging(cfg_for("jumprelu"), members=3, seed=11)
    sf.save(model, tmp_path / "c")
    again = sf.load(str(tmp_path / "c"))
    state_equal(again, model)
    assert again.b_dec_initialized.tolist() == [False, False, False]


def test_decode_only_survives_for_boosting_as_sae(tmp_path):
    boost = sf.Ensemble.boosting(cfg_for("topk"), members=3, seed=2)
    sf.train(boost, [data(12, 7, seed=0)], steps=2, lr=1e-2, **quiet())
    big = boost.as_sae()
    big.save(tmp_path / "big")
    again = sf.load(tmp_path / "big")
    assert isinstance(again, sf.SAE) and again.decode_only
    assert again.cfg.groups == 3 and again.n_latents == 36
    state_equal(again, big)
    x = data(5, 7, seed=1)
    with pytest.raises(RuntimeError, match=r"decoder of a boosting ensemble.*encode with the ensemble instead"):
        again.encode(x)
    assert torch.equal(again.decode(boost.encode(x)), big.decode(boost.encode(x)))


def test_bagging_as_sae_round_trip_keeps_groups(tmp_path):
    bag = sf.Ensemble.bagging(cfg_for("topk"), members=2, seed=2)
    big = bag.as_sae()
    big.save(tmp_path / "big")
    again = sf.load(tmp_path / "big")
    assert not again.decode_only and again.cfg.groups == 2
    x = data(5, 7, seed=1)
    assert torch.equal(again.reconstruct(x), big.reconstruct(x))


def test_never_unpickles(tmp_path, monkeypatch):
    model = sf.SAE(cfg_for("relu"), seed=0)
    sf.train(model, [data(8, 7, seed=0)], steps=1, checkpoint_dir=str(tmp_path / "t"), **quiet())
    model.save(tmp_path / "m")

    def forbidden(*a, **k):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    again = sf.load(tmp_path / "m")
    state_equal(again, model)
    _, optim, state = ckpt.load_checkpoint(tmp_path / "t")
    assert optim is not None and state is not None
    for d in (tmp_path / "m", tmp_path / "t"):
        for p in d.iterdir():
            assert p.suffix in (".json", ".safetensors"), p.name


# ------------------------------------------------------------------------------------------------------
# Corruption is detected and named
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = sf.Ensemble.bagging(cfg_for("batchtopk"), members=2, seed=0)
    sf.train(model, [data(10, 7, seed=0)], steps=2, **quiet())
    path = tmp_path / "ck"
    model.save(path)
    return model, path


@pytest.mark.parametrize("where", [0.5, 0.999, 0.02])
def test_flipped_byte_in_weights_is_detected_and_named(saved, where):
    _, path = saved
    f = model_file(path)
    raw = bytearray(f.read_bytes())
    i = int(len(raw) * where)
    raw[i] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(sf.CheckpointError, match=f.name.replace(".", r"\.")):
        sf.load(path)


def test_missing_config_json(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(sf.CheckpointError, match=r"config\.json"):
        sf.load(path)


def test_config_json_not_json(saved):
    _, path = saved
    (path / "config.json").write_text('{"format": "saefast-checkpoint", "version": ')
    with pytest.raises(sf.CheckpointError, match=r"config\.json.*not valid JSON"):
        sf.load(path)
    (path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(sf.CheckpointError, match=r"config\.json"):
        sf.load(path)


def test_config_json_of_something_else(saved):
    _, path = saved
    (path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(sf.CheckpointError, match="not a saefast checkpoint"):
        sf.load(path)


def test_config_json_missing_field(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    del config["files"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(sf.CheckpointError, match="lacks a field"):
        sf.load(path)


def test_missing_weights_file(saved):
    _, path = saved
    f = model_file(path)
    f.unlink()
    with pytest.raises(sf.CheckpointError, match=f"missing file {f.name}".replace(".", r"\.")):
        sf.load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(sf.CheckpointError, match=r"no checkpoint at .* \(not a directory\)"):
        sf.load(tmp_path / "nowhere")


def test_corrupt_optimizer_file_is_named(tmp_path):
    model = sf.SAE(cfg_for("topk"), seed=0)
    sf.train(model, [data(8, 7, seed=0)], steps=2, checkpoint_dir=str(tmp_path), **quiet())
    entry = json.loads((tmp_path / "config.json").read_text())["files"]["optimizer"]
    f = tmp_path / entry["name"]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(sf.CheckpointError, match=entry["name"].replace(".", r"\.")):
        ckpt.load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------------


def test_saving_over_a_checkpoint_leaves_no_stray_files(saved):
    model, path = saved
    old_name = model_file(path).name
    with torch.no_grad():
        model.W_dec.mul_(-1)
    model.save(path)
    names = sorted(p.name for p in path.iterdir())
    assert len(names) == 2 and "config.json" in names, names
    assert old_name not in names
    assert not any(n.startswith(".") or n.endswith(".tmp") for n in names)
    state_equal(sf.load(path), model)
    # saving the same weights again changes nothing
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_crash_while_writing_config_keeps_old_checkpoint(saved, monkeypatch):
    model, path = saved
    old = sf.load(path)
    real = ckpt.atomic_write_bytes

    def crashing(target, data):
        if Path(target).name == "config.json":
            raise OSError("simulated crash")
        return real(target, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", crashing)
    with torch.no_grad():
        model.W_enc.add_(1.0)
        model.threshold.fill_(0.123)
    with pytest.raises(OSError, match="simulated crash"):
        model.save(path)
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    intact = sf.load(path)
    state_equal(intact, old)
    assert not any(p.name.endswith(".tmp") for p in path.iterdir())
    # the next successful save cleans up the orphan written before the crash
    model.save(path)
    assert len(list(path.iterdir())) == 2
    state_equal(sf.load(path), model)
