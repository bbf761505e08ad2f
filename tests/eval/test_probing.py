"""saefast.eval.probing: sparse probing — pooled codes against a dense reference (SAE, bagging, boosting; ragged
examples, batches across example boundaries), balanced one-vs-rest tasks, top-k latents by hand, chance accuracy on
random data, perfect accuracy on a planted latent, and bad input refused before any compute."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import KINDS, assert_close, make

import saefast as sf
from saefast.data.examples import ExampleActivations
from saefast.eval import one_vs_rest_splits, pooled_codes, probe_accuracy, sparse_probing, top_k_latents

pytest.importorskip("sklearn")


def ragged_examples(n_examples: int, d: int, seed: int, max_rows: int = 5) -> ExampleActivations:
    """``n_examples`` examples of 1..max_rows rows of ``randn`` activations each."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_rows + 1, (n_examples,), generator=g)
    rows = torch.randn(int(counts.sum()), d, generator=g)
    return ExampleActivations(rows, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


def identity_relu_sae(d: int, threshold: float = 0.0) -> sf.SAE:
    """ReLU SAE with latents ``e_i`` then ``−e_i``: code ``relu(±x_i − threshold)``; decodes exactly at 0."""
    sae = sf.SAE(sf.SAEConfig(d_in=d, n_latents=2 * d, k=2 * d, activation="relu"), seed=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.fill_(-threshold)
        sae.b_dec.zero_()
    return sae.eval()


# ------------------------------------------------------------------------------------------------------
# Pooled codes
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("kind", KINDS)
def test_pooled_codes_equal_the_dense_mean_per_example(kind, activation):
    cfg = sf.SAEConfig(d_in=6, n_latents=10, k=3, activation=activation)
    model = make(kind, cfg, seed=2, members=3)
    with torch.no_grad():
        model.b_enc.add_(0.2)  # ReLU / JumpReLU: enough latents fire for the test to mean something
    model.train()
    acts = ragged_examples(9, 6, seed=1)
    with torch.no_grad():
        dense = model.encode(acts.rows).to_dense()
    expected = acts.pooled(dense)  # [E, J·M], the mean of each example's dense codes
    for batch_size in (3, 7, 4096):  # batches that cut examples in two, and one for all rows
        got = pooled_codes(model, acts, batch_size=batch_size)
        assert got.shape == (9, model.n_latents_total) and got.dtype == torch.float32
        assert_close(got, expected, atol=1e-5, msg=f"batch_size={batch_size}")
    assert bool((expected != 0).any())
    assert model.training  # switched to eval for the encode, then back


def test_pooled_codes_by_hand():
    """Identity ReLU SAE: the codes are ``relu(x)`` and ``relu(−x)``, so the pooled codes are their means."""
    rows = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0]])
    acts = ExampleActivations(rows, torch.tensor([0, 2, 3]))
    expected = torch.tensor([[2.0, 0.0, 0.0, 1.0],   # mean of [1, 0, 0, 2] and [3, 0, 0, 0]
                             [0.0, 4.0, 1.0, 0.0]])
    assert_close(pooled_codes(identity_relu_sae(2), acts, batch_size=1), expected)


# ------------------------------------------------------------------------------------------------------
# Tasks, top-k latents, probes
# ------------------------------------------------------------------------------------------------------


def test_one_vs_rest_tasks_are_balanced_stratified_and_deterministic():
    labels = np.array(["a"] * 30 + ["b"] * 50 + ["c"] * 120)
    tasks = one_vs_rest_splits(labels, test_fraction=0.25, seed=3)
    assert [task.label for task in tasks] == ["a", "b", "c"]
    for task in tasks:
        for index, y in ((task.train_index, task.train_y), (task.test_index, task.test_y)):
            assert abs(2 * int(y.sum()) - len(y)) <= 1  # balanced on both sides (to one, for odd sizes)
            assert bool((labels[index[y == 1]] == task.label).all())
            assert bool((labels[index[y == 0]] != task.label).all())
        assert not set(task.train_index) & set(task.test_index)
    n = {task.label: len(task.train_index) + len(task.test_index) for task in tasks}
    assert n == {"a": 60, "b": 100, "c": 160}  # c: its 120 cut to the 80 others
    again = one_vs_rest_splits(labels, test_fraction=0.25, seed=3)
    assert all(np.array_equal(a.test_index, b.test_index) for a, b in zip(tasks, again))
    other = one_vs_rest_splits(labels, test_fraction=0.25, seed=4)
    assert not all(np.array_equal(a.test_index, b.test_index) for a, b in zip(tasks, other))


def test_top_k_latents_by_hand():
    features = torch.tensor([[1.0, 0.0, 5.0, 2.0, 0.0],
                             [3.0, 0.0, 5.0, 2.0, 2.0],
                             [0.0, 1.0, 1.0, 2.0, 1.0],
                             [0.0, 1.0, 1.0, 2.0, 0.0]])
    y = np.array([1, 1, 0, 0])
    # class means [2, 0, 5, 2, 1] and [0, 1, 1, 2, 0.5]: |difference| = [2, 1, 4, 0, 0.5]
    assert top_k_latents(features, y, 5).tolist() == [2, 0, 1, 4, 3]
    assert top_k_latents(features.numpy(), y, 2).tolist() == [2, 0]
    # ties go to the lower index: latents 1 and 4 both differ by 1 here
    features[:, 4] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert top_k_latents(features, y, 3).tolist() == [2, 0, 1]
    assert top_k_latents(features, y, 4).tolist() == [2, 0, 1, 4]
    with pytest.raises(ValueError, match="k must be an int in 1..5"):
        top_k_latents(features, y, 6)
    with pytest.raises(ValueError, match="both values"):
        top_k_latents(features, np.ones(4), 1)


def test_probe_accuracy_separable_at_residual_stream_scale():
    """A task separable with a margin, at a residual-stream scale (entries ~1e3, one dimension ~1e4): the scaler
    lets L-BFGS converge (no warning) and the probe is perfect."""
    g = torch.Generator().manual_seed(0)
    x = 1000 * torch.randn(200, 4, generator=g)
    x[:, 3] *= 10
    y = (x[:, 0] > 0).long().numpy()
    x[:, 0] += 500 * torch.sign(x[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning fails the test
        assert probe_accuracy(x[:150], y[:150], x[150:], y[150:], seed=0) == 1.0


# ------------------------------------------------------------------------------------------------------
# Sparse probing
# ------------------------------------------------------------------------------------------------------


def test_random_data_probes_at_chance():
    """Random activations, random labels, a random SAE: every k (and the baseline) near 0.5. Fixed seeds, so the
    outcome is fixed; 4 classes × ~100 test examples put the mean's standard deviation near 0.025."""
    acts = ragged_examples(800, 16, seed=5)
    labels = torch.randint(0, 4, (800,), generator=torch.Generator().manual_seed(6))
    sae = sf.SAE(sf.SAEConfig(d_in=16, n_latents=64, k=8), seed=1)
    result = sparse_probing(sae, acts, labels, ks=(1, 2, 5, 10, 20), seed=0)
    assert result["ks"] == [1, 2, 5, 10, 20] and result["classes"] == [0, 1, 2, 3]
    assert result["n_examples"] == 800 and result["n_latents_total"] == 64
    for k, accuracy in result["accuracy"].items():
        assert abs(accuracy - 0.5) < 0.1, (k, accuracy)
    assert abs(result["baseline"] - 0.5) < 0.1
    for detail in result["per_class"]:
        assert detail["n_test"] >= 90 and set(detail["accuracy"]) == {"1", "2", "5", "10", "20"}


def test_a_planted_latent_is_found_and_probes_perfectly():
    """Class c adds 4·e_c to its rows; latent c of a thresholded identity SAE (``relu(x_c − 2)``) fires for class c
    only, so the top-1 latent of each task is c and its probe is (about) perfect."""
    classes, d, per_class = 3, 8, 80
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(per_class)
    counts = torch.randint(2, 6, (len(labels),), generator=g)
    example_of_row = torch.repeat_interleave(torch.arange(len(labels)), counts)
    rows = torch.randn(len(example_of_row), d, generator=g)
    rows[torch.arange(len(rows)), labels[example_of_row]] += 4.0
    acts = ExampleActivations(rows, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    sae = identity_relu_sae(d, threshold=2.0)
    result = sparse_probing(sae, acts, labels, ks=(1, 2), seed=0)
    for c, detail in enumerate(result["per_class"]):
        assert detail["class"] == c
        assert detail["latents"]["1"] == [c]
        assert detail["accuracy"]["1"] >= 0.95
    assert result["accuracy"]["1"] >= 0.97 and result["baseline"] >= 0.97
    # the precomputed pooled codes give the same report
    again = sparse_probing(sae, acts, labels, ks=(1, 2), seed=0, pooled=pooled_codes(sae, acts))
    assert again == result


def test_bad_input_is_refused_before_any_compute(monkeypatch):
    sae = sf.SAE(sf.SAEConfig(d_in=6, n_latents=12, k=2), seed=0)
    acts = ragged_examples(20, 6, seed=0)
    labels = [0, 1] * 10

    def forbidden(*args, **kwargs):
        raise AssertionError("encode ran before the input was validated")

    monkeypatch.setattr(sae, "encode", forbidden)
    with pytest.raises(ValueError, match="labels has 19 entries but there are 20 examples"):
        sparse_probing(sae, acts, labels[:19])
    with pytest.raises(ValueError, match=r"at least 2 classes, the labels have 1 \(only 'x'\)"):
        sparse_probing(sae, acts, ["x"] * 20, ks=(1,))
    with pytest.raises(ValueError, match="k=20 is larger than the model's 12 latents"):
        sparse_probing(sae, acts, labels, ks=(1, 20))
    with pytest.raises(ValueError, match="every k must be an int >= 1"):
        sparse_probing(sae, acts, labels, ks=(0,))
    with pytest.raises(ValueError, match="class 7 has 1 example"):
        sparse_probing(sae, acts, [7] + [0, 1] * 9 + [0], ks=(1,))
    with pytest.raises(ValueError, match=r"class 'a' \(one vs rest\): 4 examples are too few for a stratified"):
        sparse_probing(sae, acts, ["b", "b"] + ["a"] * 18, ks=(1,))  # 2 against 2: one test example
    with pytest.raises(ValueError, match="pooled must be the"):
        sparse_probing(sae, acts, labels, ks=(1,), pooled=torch.zeros(20, 11))
    with pytest.raises(ValueError, match="test_fraction"):
        sparse_probing(sae, acts, labels, ks=(1,), test_fraction=1.0)
    with pytest.raises(ValueError, match="d=5 but the model expects d_in=6"):
        sparse_probing(sae, ragged_examples(20, 5, seed=0), labels)
    with pytest.raises(TypeError, match="ExampleActivations"):
        pooled_codes(sae, torch.zeros(4, 6))
    with pytest.raises(ValueError, match="batch_size"):
        pooled_codes(sae, acts, batch_size=0)
