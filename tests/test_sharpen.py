"""saefast.sharpen: class statistics, masks and sharpened targets against hand-derived cases and the eager
oracle (every backend, SAE and ensembles), the auxiliary loss's gradient, and the SAE-ception cycle runner."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_close
from torch import nn

import saefast as sf
from saefast import sharpen

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch",
            pytest.param("native", marks=pytest.mark.skipif(not sf.native.supports(torch.device("cpu")),
                                                            reason="native extension not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET"))]


def identity_sae(activation: str = "relu", k: int = 2, b_dec: float = 0.5) -> sf.SAE:
    """d = M = 4, W_enc = W_dec = I, b_enc = 0: ``z = h(x − b_dec)``, ``x̂ = z + b_dec``."""
    sae = sf.SAE(sf.SAEConfig(d_in=4, n_latents=4, k=k, activation=activation), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.fill_(b_dec)
    return sae.eval()


# codes (x − b_dec) of the hand case: class 0 = rows 0, 1; class 1 = row 2
HAND_CODES = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
HAND_LABELS = torch.tensor([0, 0, 1])


def trained(model, d: int = 12, n: int = 240, steps: int = 15):
    x = torch.randn(n, d)
    sf.train(model, [x], steps=steps, lr=3e-3, progress=False, backend="torch")
    return model.eval()


MODELS = {
    "sae": lambda cfg: sf.SAE(cfg, seed=1),
    "bagging": lambda cfg: sf.Ensemble.bagging(cfg, 3, seed=1),
    "boosting": lambda cfg: sf.Ensemble.boosting(cfg, 2, seed=1),
}


# --------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_class_stats_hand_case(activation):
    sae = identity_sae(activation, k=2)
    stats = sharpen.class_stats(sae, [(HAND_CODES + 0.5, HAND_LABELS)])
    assert_close(stats.sums, torch.tensor([[4.0, 0, 2, 0], [0, 5, 0, 0]]))
    assert stats.fires.tolist() == [[2, 0, 1, 0], [0, 1, 0, 0]]
    assert stats.counts.tolist() == [2, 1]
    assert_close(stats.means(), torch.tensor([[2.0, 0, 1, 0], [0, 5, 0, 0]]))
    assert_close(stats.firing_rates(), torch.tensor([[1.0, 0, 0.5, 0], [0, 1, 0, 0]]))


def test_class_stats_streaming_order_and_growth():
    """Batches in any order and split give the same statistics; classes grow to the largest label seen."""
    model = trained(sf.Ensemble.bagging(sf.SAEConfig(d_in=12, n_latents=40, k=5), 2, seed=3))
    x, y = torch.randn(90, 12), torch.randint(0, 4, (90,))
    y[-1] = 6  # class 6 appears only in the last batch; 4 and 5 never
    whole = sharpen.class_stats(model, [(x, y)])
    perm = torch.randperm(90)
    shuffled = sharpen.class_stats(model, [(x[perm[:50]], y[perm[:50]]), (x[perm[50:]], y[perm[50:]])])
    assert whole.n_classes == shuffled.n_classes == 7
    assert_close(shuffled.sums, whole.sums, atol=1e-9)
    assert torch.equal(shuffled.fires, whole.fires) and torch.equal(shuffled.counts, whole.counts)
    assert whole.counts[4:6].tolist() == [0, 0] and whole.n_latents_total == 80
    merged = sharpen.class_stats(model, [(x[:30], y[:30])]).merge(sharpen.class_stats(model, [(x[30:], y[30:])]))
    assert_close(merged.sums, whole.sums, atol=1e-9)
    # the dense reference: per-class sum of dense codes
    dense = model.encode(x, backend="torch").to_dense().double()
    expected = torch.zeros(7, 80, dtype=torch.float64).index_add_(0, y, dense)
    assert_close(whole.sums, expected, atol=1e-9)


def test_class_stats_from_store_keeps_labels_aligned(tmp_path):
    model = trained(sf.SAE(sf.SAEConfig(d_in=12, n_latents=32, k=4), seed=0))
    x = torch.randn(200, 12).to(torch.bfloat16).float()  # exactly representable in the store's bf16
    y = torch.randint(0, 3, (200,))
    store = sf.write_store(tmp_path / "s", x, shard_tokens=64, extras={"labels": y})
    from_store = sharpen.class_stats(model, store, batch_size=48)
    assert_close(from_store.sums, sharpen.class_stats(model, [(x, y)]).sums, atol=1e-6)
    no_labels = sf.write_store(tmp_path / "n", x, shard_tokens=64)
    with pytest.raises(ValueError, match="no 'labels' column"):
        sharpen.class_stats(model, no_labels)


@pytest.mark.parametrize("batches, match", [
    ([], "empty"),
    ([torch.randn(4, 4)], "pair"),
    ([(torch.randn(4, 4), torch.tensor([0.0, 1, 0, 1]))], "integer dtype"),
    ([(torch.randn(4, 4), torch.tensor([0, 1, 0]))], "one entry per example"),
    ([(torch.randn(4, 4), torch.tensor([0, -1, 0, 1]))], ">= 0"),
    ([(torch.randn(4, 5), torch.tensor([0, 1, 0, 1]))], "d_in"),
    ([(torch.full((4, 4), float("nan")), torch.tensor([0, 1, 0, 1]))], "NaN"),
])
def test_class_stats_bad_input(batches, match):
    with pytest.raises((TypeError, ValueError), match=match):
        sharpen.class_stats(identity_sae(), batches)


def test_class_stats_label_beyond_n_classes():
    with pytest.raises(ValueError, match="only 2 classes"):
        sharpen.class_stats(identity_sae(), [(torch.randn(3, 4), torch.tensor([0, 1, 2]))], n_classes=2)


# --------------------------------------------------------------------------------------------- masks


def test_class_masks_hand_case():
    stats = sharpen.class_stats(identity_sae(), [(HAND_CODES + 0.5, HAND_LABELS)])
    assert sharpen.class_masks(stats, top_n=1).tolist() == [[True, False, False, False], [False, True, False, False]]
    # only latents with a positive class mean qualify: class 0 has two, class 1 one
    assert sharpen.class_masks(stats, top_n=3).tolist() == [[True, False, True, False], [False, True, False, False]]
    assert torch.equal(sharpen.class_masks(stats, top_percent=25), sharpen.class_masks(stats, top_n=1))
    assert torch.equal(sharpen.class_masks(stats, top_percent=26), sharpen.class_masks(stats, top_n=2))


def test_class_masks_ties_go_to_lower_index_and_unseen_class_is_empty():
    stats = sharpen.ClassStats(torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.0, 0, 0, 0]], dtype=torch.float64),
                               torch.zeros(2, 4, dtype=torch.int64), torch.tensor([1, 0]), 1, 4)
    assert sharpen.class_masks(stats, top_n=2).tolist() == [[False, True, True, False], [False] * 4]


@pytest.mark.parametrize("kwargs, match", [({}, "exactly one"), ({"top_n": 1, "top_percent": 5}, "exactly one"),
                                           ({"top_n": 0}, "top_n"), ({"top_n": 5}, "top_n"),
                                           ({"top_percent": 0}, "top_percent"), ({"top_percent": 101}, "top_percent")])
def test_class_masks_bad_arguments(kwargs, match):
    stats = sharpen.class_stats(identity_sae(), [(HAND_CODES + 0.5, HAND_LABELS)])
    with pytest.raises(ValueError, match=match):
        sharpen.class_masks(stats, **kwargs)


# --------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_hand_case(backend):
    sae = identity_sae("topk", k=2)
    x = HAND_CODES + 0.5
    masks = torch.tensor([[True, False, False, False], [False, True, False, False]])
    kept = torch.tensor([[1.0, 0, 0, 0], [3, 0, 0, 0], [0, 5, 0, 0]])  # z ⊙ mask[y]
    assert_close(sharpen.targets(sae, x, HAND_LABELS, masks, backend=backend), kept + 0.5)
    assert_close(sharpen.targets(sae, x, HAND_LABELS, masks, complement=True, backend=backend),
                 HAND_CODES - kept + 0.5)
    # per-example top-1: each example's largest coefficient, whatever its class
    assert_close(sharpen.example_targets(sae, x, 1, backend=backend),
                 torch.tensor([[0.0, 0, 2, 0], [3, 0, 0, 0], [0, 5, 0, 0]]) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("n, d, m, k", [(37, 12, 40, 5), (64, 12, 24, 3)])
def test_targets_match_eager_oracle(backend, kind, n, d, m, k):
    model = trained(MODELS[kind](sf.SAEConfig(d_in=d, n_latents=m, k=k)), d=d)
    x, y = torch.randn(n, d), torch.randint(0, 5, (n,))
    stats = sharpen.class_stats(model, [(x, y)])
    masks = sharpen.class_masks(stats, top_n=7)
    for complement in (False, True):
        fast = sharpen.targets(model, x, y, masks, complement=complement, backend=backend)
        assert_close(fast, sharpen.targets_reference(model, x, y, masks, complement=complement), atol=2e-5,
                     msg=f"{kind} complement={complement}")
    # top_n >= every slot keeps everything: the example control is then the reconstruction
    assert_close(sharpen.example_targets(model, x, model.n_latents_total, backend=backend),
                 model.reconstruct(x, backend="torch"), atol=2e-5)


def test_bagging_targets_are_the_mean_of_masked_member_decodes():
    """Independent oracle: member j's dense code, masked by its block of the concatenated mask, decoded alone."""
    cfg = sf.SAEConfig(d_in=10, n_latents=16, k=3)
    bag = trained(sf.Ensemble.bagging(cfg, 3, seed=2), d=10)
    x, y = torch.randn(50, 10), torch.randint(0, 3, (50,))
    masks = sharpen.class_masks(sharpen.class_stats(bag, [(x, y)]), top_n=10)
    expected = torch.zeros(50, 10)
    for j in range(3):
        member = bag.member(j).eval()
        z = member.encode(x, backend="torch").to_dense() * masks[y, j * 16:(j + 1) * 16]
        expected += (z @ member.W_dec + member.b_dec) / 3
    assert_close(sharpen.targets(bag, x, y, masks), expected, atol=2e-5)


def test_relu_sae_targets_and_dense_codes_never_needed_by_fast_path():
    sae = trained(sf.SAE(sf.SAEConfig(d_in=8, n_latents=32, activation="relu", l1_coef=1e-2), seed=0), d=8)
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    masks = sharpen.class_masks(sharpen.class_stats(sae, [(x, y)]), top_percent=20)
    assert_close(sharpen.targets(sae, x, y, masks), sharpen.targets_reference(sae, x, y, masks), atol=2e-5)


def test_targets_bad_input():
    sae = identity_sae()
    x = HAND_CODES + 0.5
    masks = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="only 2 classes"):
        sharpen.targets(sae, x, torch.tensor([0, 1, 2]), masks)
    with pytest.raises(ValueError, match=r"bool tensor \[n_classes, 4\]"):
        sharpen.targets(sae, x, HAND_LABELS, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool tensor \[n_classes, 4\]"):
        sharpen.targets(sae, x, HAND_LABELS, torch.ones(2, 4))
    with pytest.raises(TypeError, match="integer dtype"):
        sharpen.targets(sae, x, HAND_LABELS.float(), masks)
    with pytest.raises(ValueError, match="NaN"):
        sharpen.targets(sae, torch.full((3, 4), float("inf")), HAND_LABELS, masks)
    with pytest.raises(ValueError, match="top_n"):
        sharpen.example_targets(sae, x, 0)
    with pytest.raises(ValueError, match="multi|chain"):
        boost = sf.Ensemble.boosting(sf.SAEConfig(d_in=4, n_latents=4, k=2), 2, chains=2)
        sharpen.targets(boost, x, HAND_LABELS, torch.ones(2, 16, dtype=torch.bool))


def test_random_targets_are_seeded_unit_vectors():
    t = sharpen.random_targets(50, 7, seed=3)
    assert t.shape == (50, 7)
    assert_close(t.norm(dim=1), torch.ones(50), atol=1e-6)
    assert torch.equal(t, sharpen.random_targets(50, 7, seed=3))
    assert not torch.equal(t, sharpen.random_targets(50, 7, seed=4))


# --------------------------------------------------------------------------------------------- auxiliary loss


class MLP(nn.Module):
    def __init__(self, d: int = 8, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.fc1, self.act1, self.out = nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        self.hook_layer = "act1"

    def forward(self, x):
        return self.out(self.act1(self.fc1(x)))


def test_cosine_loss_hand_values():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.0, 5.0]])  # cos = 1, −1, 0
    assert_close(sharpen.cosine_loss(h, t), torch.tensor((0 + 2 + 1) / 3))
    assert_close(sharpen.cosine_loss(h, t, torch.tensor([True, True, False])), torch.tensor(1.0))
    with pytest.raises(ValueError, match="differ in shape"):
        sharpen.cosine_loss(h, t[:2])


def test_auxiliary_loss_gradient_reaches_the_weights():
    """The reference implementation detached the hooked activation, so its auxiliary loss did nothing."""
    model = MLP()
    x = torch.randn(32, 8)
    target = torch.randn(32, 16)
    with sharpen.AuxiliaryLoss(model, "act1", coef=0.5) as aux:
        model(x)
        loss = aux(target)
        loss.backward()
        assert_close(loss, 0.5 * sharpen.cosine_loss(model.act1(model.fc1(x)), target), atol=1e-6)
    assert model.fc1.weight.grad is not None and float(model.fc1.weight.grad.abs().sum()) > 0
    assert model.out.weight.grad is None  # the loss lives at act1: nothing after it is involved
    # and optimizing it alone moves the layer towards the targets
    model = MLP()
    target = torch.relu(torch.randn(32, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with sharpen.AuxiliaryLoss(model, "act1") as aux:
        model(x)
        before = float(aux(target).detach())
        for _ in range(100):
            model(x)
            loss = aux(target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model(x)
        assert float(aux(target).detach()) < 0.5 * before


def test_auxiliary_loss_hooks_tuple_outputs_and_errors():
    class Block(nn.Module):
        def forward(self, x):
            return (2 * x, "cache")

    model = nn.Sequential(nn.Linear(4, 4), Block())
    aux = sharpen.AuxiliaryLoss(model, "1")
    with pytest.raises(RuntimeError, match="no forward"):
        aux(torch.randn(3, 4))
    model(torch.randn(3, 4))
    assert aux.activation.requires_grad and aux.activation.shape == (3, 4)
    aux.remove()
    with pytest.raises(ValueError, match="no module 'nope'"):
        sharpen.AuxiliaryLoss(model, "nope")


# --------------------------------------------------------------------------------------------- cycle runner


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


# --------------------------------------------------------------------------------------------- tasks and CLI


def test_digits_task_is_the_papers_setting():
    pytest.importorskip("sklearn")
    from saefast.sharpen_tasks import digits_task

    task = digits_task(seed=0)
    shapes = [tuple(p.shape) for p in task.model.parameters()]
    assert shapes == [(16, 64), (16,), (16, 16), (16,), (10, 16), (10,)]  # MLP 64-16-16-10
    assert task.model.hook_layer == "act1" and len(task.train) + len(task.test) == 1797
    assert (task.sae.d_in, task.sae.n_latents, task.sae.activation) == (16, 256, "relu")
    assert task.config.top_n == 25 and task.config.cycles == 2


def test_cli_sharpen_runs_the_digits_cycle(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from saefast.cli import main

    out = tmp_path / "run"
    rc = main(["sharpen", "--out", str(out), "--cycles", "1", "--epochs", "3", "--finetune-epochs", "1",
               "--sae-steps", "30", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| cycle | test acc |" in printed and "cycle 1: test accuracy" in printed
    report = json.loads((out / "results.json").read_text())
    assert [row["cycle"] for row in report["history"]] == [0, 1] and report["task"] == "digits"
    assert (out / "history.png").stat().st_size > 0 and (out / "cycle_1" / "masks.safetensors").exists()
    assert main(["sharpen", "--out", str(out), "--top-n", "0"]) == 2
    assert "top_n" in capsys.readouterr().err
