"""Checkpoints: exact round trips, resuming, corruption detection, atomic writes, determinism."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import saefast as sf
import saefast.checkpoint as ckpt

ACTS = ["topk", "batchtopk", "relu", "jumprelu"]
KINDS = ["sae", "bagging", "boosting"]


def cfg_for(activation: str, d_in: int = 7, n_latents: int = 12, k: int = 2, **kw) -> sf.SAEConfig:
    return sf.SAEConfig(d_in=d_in, n_latents=n_latents, k=k, activation=activation, **kw)


def data(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g) + 0.3


def make(kind: str, cfg: sf.SAEConfig, seed: int = 3):
    if kind == "sae":
        return sf.SAE(cfg, seed=seed)
    return sf.Ensemble(cfg, members=2, combine=kind, seed=seed)


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert sa[name].shape == sb[name].shape, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


def model_file(path: Path) -> Path:
    return path / json.loads((path / "config.json").read_text())["files"]["model"]["name"]


def quiet(**kw):
    return dict(progress=False, **kw)


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
    assert_same_state(again, model)
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
    assert_same_state(again, model)
    assert again.b_dec_initialized.tolist() == [False, False, False]


def test_decode_only_survives_for_boosting_as_sae(tmp_path):
    boost = sf.Ensemble.boosting(cfg_for("topk"), members=3, seed=2)
    sf.train(boost, [data(12, 7, seed=0)], steps=2, lr=1e-2, **quiet())
    big = boost.as_sae()
    big.save(tmp_path / "big")
    again = sf.load(tmp_path / "big")
    assert isinstance(again, sf.SAE) and again.decode_only
    assert again.cfg.groups == 3 and again.n_latents == 36
    assert_same_state(again, big)
    x = data(5, 7, seed=1)
    with pytest.raises(RuntimeError):
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
    assert_same_state(again, model)
    _, optim, state = ckpt.load_checkpoint(tmp_path / "t")
    assert optim is not None and state is not None
    for d in (tmp_path / "m", tmp_path / "t"):
        for p in d.iterdir():
            assert p.suffix in (".json", ".safetensors"), p.name


# ------------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------------


def _resume_case(tmp_path, build, batches, steps, every, stop_after, lr=1e-2):
    """Uninterrupted run vs. a run stopped after ``stop_after`` batches and resumed in a NEW model."""
    full = build()
    hist_full = sf.train(full, batches, steps=steps, lr=lr, checkpoint_dir=str(tmp_path / "full"),
                         checkpoint_every=every, log_every=1, **quiet())
    first = build()
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(first, iter(batches[:stop_after]), steps=steps, lr=lr, checkpoint_dir=str(tmp_path / "run"),
                 checkpoint_every=every, log_every=1, **quiet())
    resumed = build()
    hist = sf.train(resumed, batches, steps=steps, lr=lr, checkpoint_dir=str(tmp_path / "run"),
                    checkpoint_every=every, log_every=1, resume=True, **quiet())
    assert_same_state(resumed, full)
    # the final checkpoints agree too
    assert_same_state(sf.load(tmp_path / "run"), sf.load(tmp_path / "full"))
    return hist_full, hist


@pytest.mark.parametrize("activation", ACTS)
def test_resume_sae_equals_uninterrupted(tmp_path, activation):
    cfg = cfg_for(activation, dead_after_tokens=16)
    batches = [data(16, 7, seed=20 + s, scale=1.5) for s in range(6)]
    full_hist, hist = _resume_case(tmp_path, lambda: sf.SAE(cfg, seed=1), batches, steps=6, every=3, stop_after=3)
    keys = ("stage", "step", "lr", "loss", "fvu", "aux", "sparsity", "l0", "dead_fraction")
    assert [{k: h[k] for k in keys} for h in hist] == [{k: h[k] for k in keys} for h in full_hist]


def test_resume_bagging_equals_uninterrupted(tmp_path):
    cfg = cfg_for("topk", dead_after_tokens=16)
    batches = [data(16, 7, seed=30 + s) for s in range(6)]
    _resume_case(tmp_path, lambda: sf.Ensemble.bagging(cfg, members=3, seed=1), batches, steps=6, every=3,
                 stop_after=4)  # the batch after the checkpoint is consumed again on resume


@pytest.mark.parametrize("stop_after", [3, 4, 7])
def test_resume_boosting_across_stage_boundary(tmp_path, stop_after):
    # steps=4 per stage, checkpoints at (stage 0, step 2), end of stage 0, (stage 1, step 2), end.
    # stop 3: resume mid stage 0 and run through stage 1; 4: resume at the stage boundary;
    # 7: resume mid stage 1 (the optimizer state of stage 1 comes back).
    cfg = cfg_for("relu")
    batches = [data(12, 7, seed=40 + s, scale=2.0) for s in range(8)]
    _resume_case(tmp_path, lambda: sf.Ensemble.boosting(cfg, members=2, seed=5), batches, steps=4, every=2,
                 stop_after=stop_after)


def test_resume_history_token_count_continues(tmp_path):
    cfg = cfg_for("topk")
    batches = [data(16, 7, seed=20 + s) for s in range(6)]
    full_hist, hist = _resume_case(tmp_path, lambda: sf.SAE(cfg, seed=1), batches, steps=6, every=3, stop_after=3)
    assert [h["tokens"] for h in hist] == [h["tokens"] for h in full_hist]


@pytest.mark.parametrize(
    "other",
    [lambda cfg: sf.Ensemble.boosting(cfg, members=2, seed=1), lambda cfg: sf.Ensemble.bagging(cfg, members=3, seed=1)],
    ids=["different-combine-rule", "different-member-count"],
)
def test_resume_rejects_a_different_ensemble(tmp_path, other):
    cfg = cfg_for("relu")
    batches = [data(16, 7, seed=s) for s in range(4)]
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(sf.Ensemble.bagging(cfg, members=2, seed=1), iter(batches[:2]), steps=4,
                 checkpoint_dir=str(tmp_path), checkpoint_every=2, **quiet())
    with pytest.raises(ValueError, match="different model"):
        sf.train(other(cfg), batches, steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True,
                 **quiet())


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    cfg = cfg_for("topk")
    batches = [data(16, 7, seed=s) for s in range(3)]
    a, b = sf.SAE(cfg, seed=1), sf.SAE(cfg, seed=1)
    sf.train(a, batches, steps=3, **quiet())
    sf.train(b, batches, steps=3, checkpoint_dir=str(tmp_path / "empty"), resume=True, **quiet())
    assert_same_state(a, b)


def test_resume_rejects_a_different_model(tmp_path):
    batches = [data(16, 7, seed=s) for s in range(2)]
    sf.train(sf.SAE(cfg_for("topk"), seed=1), batches, steps=2, checkpoint_dir=str(tmp_path), **quiet())
    with pytest.raises(ValueError, match="different model"):
        sf.train(sf.SAE(cfg_for("relu"), seed=1), batches, steps=2, checkpoint_dir=str(tmp_path), resume=True,
                 **quiet())


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
    assert_same_state(sf.load(path), model)
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
    assert_same_state(intact, old)
    assert not any(p.name.endswith(".tmp") for p in path.iterdir())
    # the next successful save cleans up the orphan written before the crash
    model.save(path)
    assert len(list(path.iterdir())) == 2
    assert_same_state(sf.load(path), model)


def test_crash_inside_atomic_write_keeps_target_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        ckpt.atomic_write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    ckpt.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ------------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic_on_cpu(kind):
    cfg = cfg_for("batchtopk" if kind == "sae" else "topk", dead_after_tokens=10)
    batches = [data(10, 7, seed=50 + s) for s in range(3)]
    runs = []
    for _ in range(2):
        model = make(kind, cfg, seed=4)
        hist = sf.train(model, batches, steps=3, lr=1e-2, seed=7, log_every=1, **quiet())
        runs.append((model, hist))
    assert_same_state(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
