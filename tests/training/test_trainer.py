"""saefast.training.trainer: ``train`` on synthetic data made of sparse combinations of a known dictionary (the error
falls, the true features are recovered, the history and the schedule are logged), sources that run out, bad batches
and options refused before any step, and training on a fused backend equal to the torch backend. (The learning-rate
schedule: tests/test_config.py; resuming and determinism: tests/training/test_resume.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import BAD, FUSED, NATIVE_CUDA, assert_close, cfg_for, good, rand, with_nan

import saefast as sf
from saefast.data.synthetic import SyntheticSparseData, feature_recovery


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


def test_a_one_shot_iterator_that_runs_out_stops_with_a_warning(data):
    sae = sf.SAE(sf.SAEConfig(d_in=32, n_latents=48, k=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sf.train(sae, iter(data.batches(3, 64)), steps=10, log_every=1, progress=False)
    assert len(history) == 3
    messages = [str(w.message) for w in caught if "stopped early" in str(w.message)]
    assert len(messages) == 1  # once; what happened, what it costs, what to change
    assert "stage 0, step 3 of 10: the batch iterator ran out after 3 batches" in messages[0]
    assert "the learning rate never reached its decay" in messages[0] and "re-iterable source" in messages[0]


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


# ------------------------------------------------------------------------------------------------------
# Bad batches and options: refused before any step
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_x, exc, pattern", BAD[:8])
def test_training_batch_refused_and_named(each_model, no_compute, make_x, exc, pattern):
    before = {k: v.clone() for k, v in each_model.state_dict().items()}
    with pytest.raises(exc, match=rf"batch 0.*{pattern}|{pattern}") as info:
        sf.train(each_model, [make_x()], steps=2, progress=False)
    assert "batch 0" in str(info.value)
    for name, value in each_model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed although the batch was refused"


def test_bad_batch_later_in_training_is_named_by_index():
    model = sf.SAE(cfg_for(), seed=0)
    batches = [good(8), good(8), with_nan()]
    with pytest.raises(ValueError, match=r"batch 2 contains NaN or Inf"):
        sf.train(model, batches, steps=5, progress=False)
    assert not model.training


def test_train_with_a_single_tensor_instead_of_batches():
    with pytest.raises(TypeError, match="iterable of"):
        sf.train(sf.SAE(cfg_for()), good(8), steps=1, progress=False)


def test_train_with_a_non_model():
    with pytest.raises(TypeError, match="SAE or Ensemble"):
        sf.train(torch.nn.Linear(3, 3), [good()], steps=1, progress=False)


def test_train_with_empty_batches():
    with pytest.raises(ValueError, match="batches is empty"):
        sf.train(sf.SAE(cfg_for()), [], steps=1, progress=False)


def test_train_config_errors():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=0, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=1, resume=True, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        sf.train(sf.SAE(cfg_for()), [good()], steps=1, no_such_option=3)


# ------------------------------------------------------------------------------------------------------
# Training on a fused backend equals the torch backend
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), FUSED + NATIVE_CUDA)
@pytest.mark.parametrize(("activation", "kind"), [("topk", "single"), ("topk", "bagging"), ("topk", "boosting"),
                                                  ("batchtopk", "single"), ("batchtopk", "bagging"),
                                                  ("jumprelu", "single"), ("jumprelu", "bagging")])
def test_training_on_a_fused_backend_matches_the_torch_backend(activation, kind, backend, device):
    # Latents die fast, so AuxK runs too. JumpReLU: thresholds and a bandwidth on the scale of the pre-activations,
    # so that the straight-through gradients (of the codes and of the L0 penalty) reach log_threshold.
    extra = dict(jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.2, l0_coef=0.05) if activation == "jumprelu" else {}
    cfg = sf.SAEConfig(d_in=12, n_latents=24, k=3, activation=activation, dead_after_tokens=20, **extra)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 12, generator=g).to(device) for _ in range(3)]

    def build():
        return (sf.SAE(cfg, seed=1) if kind == "single" else sf.Ensemble(cfg, 2, kind, seed=1)).to(device)

    models, histories = [], []
    for which in ("torch", backend):
        model = build()
        histories.append(sf.train(model, batches, steps=4, lr=1e-2, log_every=1, progress=False, backend=which))
        models.append(model)
    if activation == "topk":
        assert any(h["aux"] > 0 for h in histories[0])  # the AuxK path was exercised
    elif activation == "batchtopk":
        assert bool((models[0].threshold >= 0).all())  # the BatchTopK inference threshold was learned
    else:
        assert all(h["sparsity"] > 0 for h in histories[1])  # the fused L0 penalty was trained on
        assert not torch.equal(models[1].log_threshold, build().log_threshold)  # and the thresholds moved
    for a, b in zip(*histories):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["l0"] == pytest.approx(b["l0"], rel=1e-4)
    for name, tensor in models[0].state_dict().items():
        other = models[1].state_dict()[name]
        if tensor.is_floating_point():
            assert_close(other, tensor, atol=1e-4, rtol=1e-3, msg=name)
        else:
            assert torch.equal(other, tensor), name
    x = rand(10, 12, device=device)  # eval mode (train leaves it there): BatchTopK uses its threshold
    with sf.use_backend(backend):
        assert_close(models[0].reconstruct(x), models[0].reconstruct(x, backend="torch"), atol=1e-5)
        codes = models[0].encode(x)
    assert_close(codes.to_dense(), models[0].encode(x, backend="torch").to_dense(), atol=1e-5)
    assert_close(models[0].decode(codes, backend=backend), models[0].decode(codes, backend="torch"), atol=1e-5)
