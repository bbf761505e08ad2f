"""saefast.sharpen.stats: per-class statistics of a model's codes (sums, firing counts, class counts) on a hand case,
streamed in any order and split, from an activation store with its labels, and bad input; the class masks (each
class's top latents by mean code) on a hand case, ties and bad arguments."""

from __future__ import annotations

import pytest
import torch
from helpers import HAND_CODES, HAND_LABELS, assert_close, identity_sae, trained

import saefast as sf
from saefast import sharpen

# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------------


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
