"""saefast.sharpen.runner: the SAE-ception cycle (train the classifier, fit an SAE on a layer, sharpen the layer
towards its class targets, repeat) — results written, the auxiliary loss moving the layer towards its targets, targets
aligned with their examples, a per-token layer, bad configuration."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import MLP, assert_close
from torch import nn

import saefast as sf
from saefast import sharpen
from saefast.interrupts import Interrupted


def blobs(n: int, classes: int = 3, d: int = 8, seed: int = 0):
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(1234)) * 2  # the same for every split
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, d, generator=g), y


SMALL = dict(epochs=8, finetune_epochs=2, sae_steps=40, sae_batch_size=64, batch_size=32, lr=1e-2, top_n=6,
             metric_sample_size=500)


def test_saeception_runs_cycles_and_writes_results(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    runner = sharpen.SAECeption(model, sf.SAEConfig(d_in=16, n_latents=48, activation="relu", l1_coef=1e-3),
                                train=blobs(180), test=blobs(90, seed=1), out=tmp_path, cycles=2, **SMALL)
    history = runner.run()
    assert [row["cycle"] for row in history] == [0, 1, 2]
    assert history[0]["aux_loss"] is None and history[0]["target_cosine_start"] is None
    for row in history:
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["train_accuracy"] <= 1
        for key in ("ari", "silhouette_labels", "silhouette_argmax", "davies_bouldin", "calinski_harabasz",
                    "uncertainty", "csi", "sae_explained_variance", "sae_l0", "layer_silhouette"):
            assert key in row
    for row in history[1:]:
        assert row["aux_loss"] > 0 and -1 <= row["target_cosine_end"] <= 1
    assert history[-1]["test_accuracy"] > 0.6  # blobs are separable: the task is learnt
    saved = json.loads((tmp_path / "history.json").read_text())
    assert len(saved["history"]) == 3 and saved["layer"] == "act1"
    again = sf.load(str(tmp_path / "cycle_2" / "sae"))
    assert torch.equal(again.W_dec, runner.saes[-1].W_dec)
    assert runner.masks[-1].shape == (3, 48) and (runner.masks[-1].sum(1) <= 6).all()


def test_saeception_auxiliary_loss_moves_the_layer_towards_its_targets():
    """Same seeds, same baseline, same targets: only λ differs, and λ > 0 ends closer to the targets."""
    def end_cosine(aux_coef: float) -> float:
        torch.manual_seed(0)
        runner = sharpen.SAECeption(MLP(), sf.SAEConfig(d_in=16, n_latents=48, k=4), train=blobs(180),
                                    test=blobs(60, seed=1), cycles=1, aux_coef=aux_coef, **SMALL)
        history = runner.run()
        return history[1]["target_cosine_start"], history[1]["target_cosine_end"]

    (start_without, end_without), (start_with, end_with) = end_cosine(0.0), end_cosine(5.0)
    assert start_with == start_without
    assert end_with > end_without + 0.01


@pytest.mark.parametrize("members, combine", [(1, "bagging"), (3, "bagging"), (2, "boosting")])
def test_saeception_targets_are_aligned_with_examples(members, combine):
    """Each example's fixed target is the sharpened decode of its own activation under its own label."""
    model = MLP()
    runner = sharpen.SAECeption(model, sf.SAEConfig(d_in=16, n_latents=48, k=4), train=blobs(120),
                                test=blobs(60, seed=1), cycles=0, members=members, combine=combine, **SMALL)
    runner.run()
    assert runner.masks[0].shape == (3, members * 48)
    assert isinstance(runner.saes[0], sf.SAE if members == 1 else sf.Ensemble)
    layer = runner._activations(runner.train_split)
    table = runner._targets(layer, cycle=1)
    perm = torch.randperm(120)[:20]
    direct = sharpen.targets(runner.saes[0], layer.acts[perm], runner.train_split.labels[perm], runner.masks[0])
    assert_close(table[perm], direct, atol=1e-6)


class TinyTokenModel(nn.Module):
    """[B, T] ids → block output [B, T, 8] → masked mean → logits: a stand-in for a transformer classifier."""

    def __init__(self, vocab: int = 20, classes: int = 2):
        super().__init__()
        self.embed, self.block, self.head = nn.Embedding(vocab, 8), nn.Linear(8, 8), nn.Linear(8, classes)
        self.hook_layer = "block"

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.block(self.embed(input_ids)))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def token_split(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    ids = torch.randint(0, 10, (n, 6), generator=g) + 10 * y.view(-1, 1)  # class 1 uses the upper half
    lengths = torch.randint(2, 7, (n,), generator=g)
    mask = (torch.arange(6).view(1, -1) < lengths.view(-1, 1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, y


@pytest.mark.parametrize("skip", [0, 1])
def test_saeception_per_token_layer(skip):
    model = TinyTokenModel()
    train, test = token_split(64, 0), token_split(32, 1)
    runner = sharpen.SAECeption(model, sf.SAEConfig(d_in=8, n_latents=24, k=3), train=train, test=test, cycles=1,
                                skip_positions=skip, **{**SMALL, "top_n": 4})
    history = runner.run()
    layer = runner._activations(runner.train_split)
    counted = train[0]["attention_mask"].bool().clone()
    counted[:, :skip] = False  # every sequence has >= 2 tokens, so each keeps one at least
    assert layer.acts.shape == (64, 6, 8) and torch.equal(layer.positions, counted)
    rows, row_labels, example = layer.rows(runner.train_split.labels)
    assert rows.shape[0] == int(counted.sum()) and torch.equal(rows, layer.acts[counted])
    assert torch.equal(row_labels, train[1][example])
    table = runner._targets(layer, cycle=2)
    assert float(table[~layer.positions].abs().sum()) == 0  # padding positions carry no target
    assert history[1]["aux_loss"] > 0 and history[1]["target_cosine_end"] > history[1]["target_cosine_start"]


def test_saeception_bad_configuration():
    cfg = sf.SAEConfig(d_in=16, n_latents=48, k=4)
    with pytest.raises(ValueError, match="no module 'nope'"):
        sharpen.SAECeption(MLP(), cfg, blobs(30), blobs(30), layer="nope")
    with pytest.raises(ValueError, match="unknown target"):
        sharpen.SharpenConfig(target="sharpest")
    with pytest.raises(ValueError, match="exactly one"):
        sharpen.SharpenConfig(top_n=None)
    with pytest.raises(ValueError, match="disagree"):
        sharpen.Split({"input_ids": torch.zeros(4, 3), "attention_mask": torch.zeros(5, 3)}, torch.zeros(4).long())
    runner = sharpen.SAECeption(TinyTokenModel(), sf.SAEConfig(d_in=8, n_latents=24, k=3), token_split(8, 0),
                                token_split(8, 1), skip_positions=6)
    with pytest.raises(ValueError, match="no counted position"):
        runner._activations(runner.train_split)
    with pytest.raises(ValueError, match="either"):
        sharpen.SAECeption(MLP(), cfg, blobs(30), blobs(30), config=sharpen.SharpenConfig(), cycles=1)


# ------------------------------------------------------------------------------------------------------
# Interrupting and resuming (the command line, with real signals to a subprocess: tests/cli/test_interrupts.py)
# ------------------------------------------------------------------------------------------------------


class DropoutMLP(MLP):
    """:class:`helpers.MLP` with dropout after the hooked layer: its training draws on torch's global RNG."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.out(self.drop(self.act1(self.fc1(x))))


def test_saeception_stopped_mid_cycle_resumes_to_the_uninterrupted_results(tmp_path):
    """A real SIGINT during cycle 1's first task batch abandons cycle 1; resuming (from a fresh model and RNG state)
    gives the uninterrupted run's history, SAEs, masks and model, exactly."""
    cfg = sf.SAEConfig(d_in=16, n_latents=48, activation="relu", l1_coef=1e-3)
    data = dict(train=blobs(120), test=blobs(60, seed=1))
    options = dict(cycles=2, **SMALL)
    torch.manual_seed(0)
    full = sharpen.SAECeption(DropoutMLP(), cfg, **data, out=tmp_path / "full", **options)
    history = full.run()

    out = tmp_path / "stopped"
    torch.manual_seed(0)
    model = DropoutMLP()
    hooks = []

    def signal_once(module, args):
        hooks.pop().remove()
        os.kill(os.getpid(), signal.SIGINT)

    def arm_after_cycle_0(record):
        if record["cycle"] == 0:
            hooks.append(model.register_forward_pre_hook(signal_once))

    runner = sharpen.SAECeption(model, cfg, **data, out=out, log=arm_after_cycle_0, **options)
    with pytest.raises(Interrupted) as info:
        runner.run()
    assert info.value.exit_status == 130 and info.value.saved == f"cycle 0 in {out}" and not hooks
    assert len(json.loads((out / "history.json").read_text())["history"]) == 1
    assert (out / "cycle_0" / "model.safetensors").is_file() and not (out / "cycle_1").exists()

    torch.manual_seed(123)  # another init and RNG state: the saved ones replace them
    again = sharpen.SAECeption(DropoutMLP(), cfg, **data, out=out, resume=True, **options)
    assert again.run() == history
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    for mine, theirs in zip(again.saes, full.saes, strict=True):
        assert torch.equal(mine.W_dec, theirs.W_dec) and torch.equal(mine.b_enc, theirs.b_enc)
    assert all(torch.equal(a, b) for a, b in zip(again.masks, full.masks, strict=True))
    # only the last cycle keeps the model (and RNG) state: what a resume needs, and the sharpened model
    assert sorted(p.parent.name for p in out.glob("cycle_*/model.safetensors")) == ["cycle_2"]


def test_saeception_refuses_to_overwrite_or_resume_the_wrong_run(tmp_path):
    cfg = sf.SAEConfig(d_in=16, n_latents=48, k=4)
    data = dict(train=blobs(60), test=blobs(30, seed=1))
    small = {**SMALL, "epochs": 1, "sae_steps": 5}
    sharpen.SAECeption(MLP(), cfg, **data, out=tmp_path / "run", cycles=0, **small).run()
    with pytest.raises(ValueError, match=r"already holds a sharpen run .*resume=True"):
        sharpen.SAECeption(MLP(), cfg, **data, out=tmp_path / "run", cycles=0, **small).run()
    with pytest.raises(ValueError, match=r"nothing to resume: .*empty holds no completed sharpen cycle"):
        sharpen.SAECeption(MLP(), cfg, **data, out=tmp_path / "empty", resume=True, **small).run()
    with pytest.raises(ValueError, match="pass out="):
        sharpen.SAECeption(MLP(), cfg, **data, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(lr: saved 0.01, requested 0.02; sae.k: saved 4, "
                                         r"requested 5\)"):
        sharpen.SAECeption(MLP(), sf.SAEConfig(d_in=16, n_latents=48, k=5), **data, out=tmp_path / "run",
                           resume=True, **{**small, "lr": 2e-2}).run()
    with pytest.raises(ValueError, match=r"data \(SHA-256 of the splits\): saved '[0-9a-f]{64}'"):
        sharpen.SAECeption(MLP(), cfg, train=blobs(60, seed=5), test=data["test"], out=tmp_path / "run",
                           resume=True, **small).run()
    with pytest.raises(ValueError, match="top_n must be a positive int"):
        sharpen.SharpenConfig(top_n=0)
    # more cycles extend a finished run
    runner = sharpen.SAECeption(MLP(), cfg, **data, out=tmp_path / "run", resume=True, cycles=1, **small)
    assert [row["cycle"] for row in runner.run()] == [0, 1]
