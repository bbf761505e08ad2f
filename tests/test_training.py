"""Training on synthetic data made of sparse combinations of a known dictionary."""

import warnings

import pytest
import torch

import saefast as sf
from saefast.synthetic import SyntheticSparseData, feature_recovery


@pytest.fixture(scope="module")
def data():
    return SyntheticSparseData(d_in=32, n_features=64, active=3, seed=0)


@pytest.fixture(scope="module")
def batches(data):
    return data.batches(20, 256)


def test_topk_sae_lowers_mse_and_recovers_the_true_features(data, batches):
    cfg = sf.SAEConfig(d_in=32, n_latents=128, k=3)
    sae = sf.SAE(cfg, seed=0)
    held_out = data.sample(1024)
    before = sf.evaluate(sae, held_out)["mse"]
    history = sf.train(sae, batches, steps=300, lr=3e-3, progress=False, log_every=100)
    after = sf.evaluate(sae, held_out)
    assert after["mse"] < 0.5 * before
    assert after["explained_variance"] > 0.9
    assert history[-1]["fvu"] < history[0]["fvu"]
    recovered = feature_recovery(data.features, sae.W_dec)
    assert (recovered > 0.9).float().mean() >= 0.9, recovered


def test_every_bagging_member_recovers_most_features(data, batches):
    cfg = sf.SAEConfig(d_in=32, n_latents=128, k=3)
    bag = sf.Ensemble.bagging(cfg, members=2, seed=1)
    sf.train(bag, batches, steps=300, lr=3e-3, progress=False)
    for j in range(2):
        assert (feature_recovery(data.features, bag.W_dec[j]) > 0.9).float().mean() >= 0.85


def test_boosting_second_stage_reduces_the_error_of_the_first(data, batches):
    cfg = sf.SAEConfig(d_in=32, n_latents=24, k=2)  # too small alone: a residual is left for stage 2
    boost = sf.Ensemble.boosting(cfg, members=2, seed=0)
    sf.train(boost, batches, steps=150, lr=3e-3, progress=False)
    x = data.sample(1024)
    first = boost.member(0).reconstruct(x)
    assert sf.metrics.mse(x, boost.reconstruct(x)) < 0.8 * sf.metrics.mse(x, first)


@pytest.mark.parametrize("activation", ["batchtopk", "relu", "jumprelu"])
def test_other_activations_lower_the_error(activation, data, batches):
    cfg = sf.SAEConfig(d_in=32, n_latents=64, k=3, activation=activation, l1_coef=3e-3, l0_coef=3e-3)
    sae = sf.SAE(cfg, seed=0)
    x = data.sample(512)
    before = sf.evaluate(sae, x)["fvu"]
    sf.train(sae, batches, steps=100, lr=3e-3, progress=False)
    assert sf.evaluate(sae, x)["fvu"] < 0.5 * before


def test_history_records_metrics_and_the_schedule(batches):
    cfg = sf.SAEConfig(d_in=32, n_latents=48, k=3)
    history = sf.train(sf.SAE(cfg), batches, steps=10, lr=1e-3, log_every=4, warmup_steps=2, progress=False)
    assert [h["step"] for h in history] == [4, 8, 10]
    for key in ("loss", "fvu", "aux", "l0", "dead_fraction", "lr", "tokens"):
        assert key in history[0]
    assert history[-1]["tokens"] == 10 * 256
    assert history[0]["l0"] == pytest.approx(3.0)


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = sf.TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay="linear", decay_fraction=0.2)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10:80] == [1.0] * 70
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(1 / 21)
    cosine = sf.TrainConfig(steps=100, lr=1.0, warmup_steps=0, decay="cosine", decay_fraction=0.5)
    assert cosine.lr_at(0) == 1.0 and cosine.lr_at(99) < 0.01


def test_a_one_shot_iterator_that_runs_out_stops_with_a_warning(data):
    sae = sf.SAE(sf.SAEConfig(d_in=32, n_latents=48, k=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sf.train(sae, iter(data.batches(3, 64)), steps=10, log_every=1, progress=False)
    assert len(history) == 3
    assert any("ran out after 3 batches" in str(w.message) for w in caught)


def test_a_source_that_counts_its_own_epochs_stops_with_a_warning(data):
    class TwoEpochs:
        """Re-iterable that yields nothing once its two epochs are used (as store.batches(epochs=2) does)."""

        def __init__(self, batches):
            self.batches, self.epochs = batches, 0

        def __iter__(self):
            self.epochs += 1
            return iter(self.batches if self.epochs <= 2 else [])

    sae = sf.SAE(sf.SAEConfig(d_in=32, n_latents=48, k=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sf.train(sae, TwoEpochs(data.batches(3, 64)), steps=10, log_every=1, progress=False)
    assert len(history) == 6
    assert any("ran out after 6 batches" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="batches is empty"):
        sf.train(sae, [], steps=2, progress=False)


def test_tuple_batches_and_bf16_inputs_are_accepted(data):
    sae = sf.SAE(sf.SAEConfig(d_in=32, n_latents=48, k=3))
    batches = [(data.sample(64).bfloat16(), torch.zeros(64)) for _ in range(2)]
    history = sf.train(sae, batches, steps=4, log_every=2, progress=False)
    assert len(history) == 2 and sae.W_enc.dtype == torch.float32


def test_dead_latents_feed_the_auxk_loss(data, batches):
    # Only 3 tokens until "dead": with 256-token batches every latent that misses a batch is dead at once.
    cfg = sf.SAEConfig(d_in=32, n_latents=128, k=3, dead_after_tokens=3)
    history = sf.train(sf.SAE(cfg), batches, steps=6, log_every=1, progress=False)
    assert history[0]["aux"] == 0.0  # nothing has had time to die before the first step
    assert any(h["dead_fraction"] > 0 and h["aux"] > 0 for h in history[1:])
