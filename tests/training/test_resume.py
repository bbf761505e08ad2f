"""Resuming training from its checkpoints (saefast.training.trainer with saefast.models.checkpoint): a run stopped
and resumed in a new model ends bit for bit where the uninterrupted run ends — SAEs of every activation, bagging,
boosting across a stage boundary, bootstrap bagging, multi-chain boosting, after a SIGINT/SIGTERM or a crash — and a
checkpoint of another model or other options is refused, naming each difference; and training on the CPU is
deterministic."""

from __future__ import annotations

import functools
import os
import signal

import pytest
from helpers import ACTS, KINDS, make, quiet, state_equal
from helpers import cfg_for as _cfg_for
from helpers import data as _data

import saefast as sf
from saefast.interrupts import Interrupted
from saefast.models.checkpoint import read_config

cfg_for = functools.partial(_cfg_for, d_in=7, n_latents=12, k=2)
mode_cfg = functools.partial(_cfg_for, d_in=8, n_latents=12, k=2)  # the sizes of tests/models/test_ensemble_modes.py
data = functools.partial(_data, offset=0.3)


# ------------------------------------------------------------------------------------------------------
# Resume: SAEs and ensembles
# ------------------------------------------------------------------------------------------------------


def _resume_case(tmp_path, build, batches, steps, every, stop_after, lr=1e-2, **options):
    """Uninterrupted run vs. a run stopped after ``stop_after`` batches and resumed in a NEW model: equal bit for bit,
    and so are their final checkpoints. ``options``: more ``sf.train`` options for every run. Returns the histories."""
    full = build()
    hist_full = sf.train(full, batches, steps=steps, lr=lr, checkpoint_dir=str(tmp_path / "full"),
                         checkpoint_every=every, log_every=1, **quiet(**options))
    first = build()
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(first, iter(batches[:stop_after]), steps=steps, lr=lr, checkpoint_dir=str(tmp_path / "run"),
                 checkpoint_every=every, log_every=1, **quiet(**options))
    resumed = build()
    hist = sf.train(resumed, batches, steps=steps, lr=lr, checkpoint_dir=str(tmp_path / "run"),
                    checkpoint_every=every, log_every=1, resume=True, **quiet(**options))
    state_equal(resumed, full)
    # the final checkpoints agree too
    state_equal(sf.load(tmp_path / "run"), sf.load(tmp_path / "full"))
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
    state_equal(a, b)


def test_resume_rejects_a_different_model(tmp_path):
    batches = [data(16, 7, seed=s) for s in range(2)]
    sf.train(sf.SAE(cfg_for("topk"), seed=1), batches, steps=2, checkpoint_dir=str(tmp_path), **quiet())
    with pytest.raises(ValueError, match="different model: config.activation: 'topk' in the checkpoint, 'relu' now"):
        sf.train(sf.SAE(cfg_for("relu"), seed=1), batches, steps=2, checkpoint_dir=str(tmp_path), resume=True,
                 **quiet())


def test_resume_names_each_changed_setting_and_its_two_values(tmp_path):
    batches = [data(16, 7, seed=s) for s in range(4)]
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(sf.SAE(cfg_for("topk"), seed=1), iter(batches[:2]), steps=4, lr=1e-2, checkpoint_dir=str(tmp_path),
                 checkpoint_every=1, **quiet())
    with pytest.raises(ValueError, match=r"lr: 0.01 in the checkpoint, 0.001 now; decay: 'linear' in the "
                                         r"checkpoint, 'cosine' now; resume with"):
        sf.train(sf.SAE(cfg_for("topk"), seed=1), batches, steps=4, lr=1e-3, decay="cosine",
                 checkpoint_dir=str(tmp_path), resume=True, **quiet())
    with pytest.raises(ValueError, match="different model: seeds: \\[1\\] in the checkpoint, \\[2\\] now"):
        sf.train(sf.SAE(cfg_for("topk"), seed=2), batches, steps=4, lr=1e-2, checkpoint_dir=str(tmp_path),
                 resume=True, **quiet())
    with pytest.raises(ValueError, match="steps: 4 in the checkpoint, 6 now"):  # the schedule depends on steps
        sf.train(sf.SAE(cfg_for("topk"), seed=1), batches, steps=6, lr=1e-2, checkpoint_dir=str(tmp_path),
                 resume=True, **quiet())


def test_resume_never_extends_a_finished_run_silently(tmp_path):
    batches = [data(16, 7, seed=s) for s in range(4)]
    sae = sf.SAE(cfg_for("topk"), seed=1)
    history = sf.train(sae, batches, steps=3, checkpoint_dir=str(tmp_path), **quiet())
    with pytest.raises(ValueError, match="finished all its 3 steps; it cannot be extended to steps=5"):
        sf.train(sf.SAE(cfg_for("topk"), seed=1), batches, steps=5, checkpoint_dir=str(tmp_path), resume=True,
                 **quiet())
    # The same steps: nothing left to train, the finished weights and history come back unchanged.
    again = sf.SAE(cfg_for("topk"), seed=1)
    assert sf.train(again, batches, steps=3, checkpoint_dir=str(tmp_path), resume=True, **quiet()) == history
    state_equal(again, sae)


# ------------------------------------------------------------------------------------------------------
# Resume: bootstrap bagging and multi-chain boosting
# ------------------------------------------------------------------------------------------------------


def test_resume_bootstrap_bagging_equals_uninterrupted(tmp_path):
    cfg = mode_cfg("topk", dead_after_tokens=16)
    batches = [data(16, 8, seed=70 + s, offset=0.4) for s in range(6)]
    _resume_case(tmp_path, lambda: sf.Ensemble.bagging(cfg, members=3, seed=1), batches, steps=6, every=2,
                 stop_after=3, bootstrap=True, seed=5)


def test_resume_refuses_to_switch_bootstrap(tmp_path):
    cfg = mode_cfg("relu")
    batches = [data(16, 8, seed=s, offset=0.4) for s in range(4)]
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(sf.Ensemble.bagging(cfg, members=2), iter(batches[:2]), steps=4, checkpoint_dir=str(tmp_path),
                 checkpoint_every=2, bootstrap=True, **quiet())
    with pytest.raises(ValueError, match="bootstrap: True in the checkpoint, False now"):
        sf.train(sf.Ensemble.bagging(cfg, members=2), batches, steps=4, checkpoint_dir=str(tmp_path),
                 resume=True, **quiet())
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 1 now"):
        sf.train(sf.Ensemble.bagging(cfg, members=2), batches, steps=4, checkpoint_dir=str(tmp_path),
                 resume=True, bootstrap=True, seed=1, **quiet())


@pytest.mark.parametrize("stop_after", [3, 5])
def test_resume_multi_chain_boosting_equals_uninterrupted(tmp_path, stop_after):
    # steps=2 per stage, a checkpoint every step: 3 resumes mid stage 1, 5 mid stage 2
    cfg = mode_cfg("topk")
    batches = [data(16, 8, seed=80 + s, scale=2.0, offset=0.4) for s in range(6)]
    _resume_case(tmp_path, lambda: sf.Ensemble.boosting(cfg, members=3, seed=2, chains=2), batches, steps=2,
                 every=1, stop_after=stop_after)


def test_resume_rejects_a_different_number_of_chains(tmp_path):
    cfg = mode_cfg("relu")
    batches = [data(16, 8, seed=s, offset=0.4) for s in range(4)]
    with pytest.warns(UserWarning, match="stopped early"):
        sf.train(sf.Ensemble.boosting(cfg, members=2, seed=1, chains=2), iter(batches[:1]), steps=2,
                 checkpoint_dir=str(tmp_path), checkpoint_every=1, **quiet())
    for other in (sf.Ensemble.boosting(cfg, members=2, seed=1), sf.Ensemble.boosting(cfg, members=2, seed=1, chains=3)):
        with pytest.raises(ValueError, match="different model"):
            sf.train(other, batches, steps=2, checkpoint_dir=str(tmp_path), resume=True, **quiet())


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
    state_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


# ------------------------------------------------------------------------------------------------------
# Signals and periodic checkpoints (the CLI's real-signal tests: tests/cli/test_cli_robustness.py)
# ------------------------------------------------------------------------------------------------------


def _signal_at(batches, index, signum):
    """The batches, sending ``signum`` to this process while batch ``index`` is being handed out."""
    for i, batch in enumerate(batches):
        if i == index:
            os.kill(os.getpid(), signum)
        yield batch


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_resumes_to_the_same_model(tmp_path, signum):
    cfg = mode_cfg("topk", dead_after_tokens=16)
    batches = [data(16, 8, seed=90 + s, offset=0.4) for s in range(6)]
    full = sf.Ensemble.bagging(cfg, members=2, seed=3)
    sf.train(full, batches, steps=6, lr=1e-2, log_every=1, **quiet())
    with pytest.raises(Interrupted) as stop:  # no checkpoint_every: the signal alone makes the checkpoint
        sf.train(sf.Ensemble.bagging(cfg, members=2, seed=3), _signal_at(batches, 2, signum), steps=6, lr=1e-2,
                 log_every=1, checkpoint_dir=str(tmp_path), checkpoint_minutes=0, **quiet())
    assert stop.value.exit_status == 128 + signum
    assert f"checkpoint at step 3 of 6 saved in {tmp_path}" in str(stop.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    resumed = sf.Ensemble.bagging(cfg, members=2, seed=3)
    sf.train(resumed, batches, steps=6, lr=1e-2, log_every=1, checkpoint_dir=str(tmp_path), resume=True, **quiet())
    state_equal(resumed, full)


def test_a_signal_without_checkpoint_dir_stops_after_the_step_saving_nothing():
    cfg = cfg_for("topk")
    batches = [data(16, 7, seed=s) for s in range(4)]
    with pytest.raises(Interrupted) as stop:
        sf.train(sf.SAE(cfg, seed=1), _signal_at(batches, 1, signal.SIGINT), steps=4, **quiet())
    assert stop.value.saved == "" and isinstance(stop.value, KeyboardInterrupt)


def test_periodic_checkpoints_in_wall_time_survive_a_crash(tmp_path):
    cfg = cfg_for("topk")
    batches = [data(16, 7, seed=s) for s in range(5)]
    full = sf.SAE(cfg, seed=1)
    sf.train(full, batches, steps=5, lr=1e-2, **quiet())

    def crash_at(index):
        for i, batch in enumerate(batches):
            if i == index:
                raise RuntimeError("simulated crash")
            yield batch

    # An interval of ~0 makes every step's checkpoint due; the crash (no save) loses only the step under way.
    with pytest.raises(RuntimeError, match="simulated crash"):
        sf.train(sf.SAE(cfg, seed=1), crash_at(3), steps=5, lr=1e-2, checkpoint_dir=str(tmp_path),
                 checkpoint_minutes=1e-9, **quiet())
    assert read_config(tmp_path)["train_state"]["step"] == 3
    resumed = sf.SAE(cfg, seed=1)
    sf.train(resumed, batches, steps=5, lr=1e-2, checkpoint_dir=str(tmp_path), resume=True, **quiet())
    state_equal(resumed, full)
