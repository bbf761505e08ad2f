"""SAEAdam, the trainer's optimizer: torch.optim.Adam's state dict and update, one fused pass per parameter
(:func:`saefast.ops.adam_step_`), the decoder's projection and renormalisation in that pass.

Tolerances: on the ``torch`` backend the fused step runs torch's own ops in torch's order, so training matches the
old sequence (``torch.optim.Adam`` + separate projection and renormalisation) bit for bit. The native and Triton
passes round differently in the last bits (FMA contraction, row sums in fixed lanes: a few fp32 ulps per step, see
``tests/ops/test_adam_step.py``); Adam's step ``m/√v`` carries a relative difference of the gradient over as the
same relative difference of the step, no more, so those ulps do not grow much: after 30 steps at lr 1e-2 the
weights (rows of norm 1) agree within ``1e-5`` absolute and the losses within ``1e-5`` relative (measured: 2e-7 and
2e-7, native and Triton's interpreter; the margin is for other CPUs' instruction sets).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FUSED, assert_close, state_equal

import saefast as sf
from saefast import ops
from saefast.training import SAEAdam, training_step

CFG = sf.SAEConfig(d_in=12, n_latents=40, k=4, dead_after_tokens=10_000)


def batches(n: int, seed: int = 0, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(48, 12, generator=g) + 0.3).to(device) for _ in range(n)]


def ensemble(kind: str = "bagging", device="cpu") -> sf.Ensemble:
    model = sf.Ensemble(CFG, 3 if kind == "bagging" else 2, kind, seed=2).to(device)
    model.b_dec_initialized.fill_(True)
    return model


def train_steps(model, optimizer, xs, backend, members=slice(None), grad_clip=None):
    losses = []
    for x in xs:
        terms, _ = training_step(model, optimizer, x, members, backend=backend, max_dead=0, grad_clip=grad_clip)
        losses.append(float(terms.loss.detach()))
    return losses


def test_training_on_torch_is_the_old_sequence_bit_for_bit():
    """The fused step on the torch backend: the old projection → torch.optim.Adam → renormalisation, exactly."""
    xs = batches(30)
    old, new = ensemble(), ensemble()
    train_steps(old, torch.optim.Adam(old.parameters(), lr=1e-2), xs, "torch")
    train_steps(new, SAEAdam(new, lr=1e-2), xs, "torch")
    state_equal(new, old)


@pytest.mark.parametrize("backend, device", FUSED)
def test_training_on_a_fused_backend_matches_the_old_sequence(backend, device):
    xs = batches(8 if backend == "triton" else 30, device=device)  # triton: its CPU interpreter, ~1 s a step
    old, new = ensemble(device=device), ensemble(device=device)
    old_losses = train_steps(old, torch.optim.Adam(old.parameters(), lr=1e-2), xs, backend)
    new_losses = train_steps(new, SAEAdam(new, lr=1e-2), xs, backend)
    assert new_losses == pytest.approx(old_losses, rel=1e-5)
    for name, tensor in old.state_dict().items():
        if tensor.is_floating_point():
            assert_close(new.state_dict()[name], tensor, atol=1e-5, msg=name)
    norms = new.W_dec.detach().norm(dim=-1)
    assert float((norms - 1).abs().max()) < 1e-6  # the fused pass renormalised the rows


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_with_grad_clip_the_three_passes_run_and_match(backend):
    """Clipping needs the projected gradient's norm first: SAEAdam then takes plain Adam steps between the separate
    projection and renormalisation (bit for bit torch.optim.Adam's on the torch backend)."""
    if backend == "native" and not ops.native.available():
        pytest.skip("native extension not built")
    xs = batches(10)
    old, new = ensemble(), ensemble()
    train_steps(old, torch.optim.Adam(old.parameters(), lr=1e-2), xs, backend, grad_clip=0.05)
    train_steps(new, SAEAdam(new, lr=1e-2), xs, backend, grad_clip=0.05)
    if backend == "torch":
        state_equal(new, old)
    else:
        for name, tensor in old.state_dict().items():
            if tensor.is_floating_point():
                assert_close(new.state_dict()[name], tensor, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not ops.native.available(), reason="native extension not built"))])
def test_members_outside_a_boosting_stage_are_untouched(backend):
    model = ensemble("boosting")
    xs = batches(4)
    stage0, stage1 = model.stages()
    train_steps(model, SAEAdam(model, lr=1e-2), [model.stage_input(x, 0) for x in xs], backend, stage0)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    optimizer = SAEAdam(model, lr=1e-2)  # a fresh Adam per stage, as the trainer makes
    train_steps(model, optimizer, [model.stage_input(x, 1) for x in xs], backend, stage1)
    for name, p in model.named_parameters():
        after, earlier = model._view(p.detach(), stage0), model._view(before[name], stage0)
        assert torch.equal(after, earlier), name  # stage 0's member: not even renormalised
        assert not torch.equal(model._view(p.detach(), stage1), model._view(before[name], stage1)), name
        state = optimizer.state[p]
        assert not bool(model._view(state["exp_avg"], stage0).any()), name  # its moments stay zero
        assert not bool(model._view(state["exp_avg_sq"], stage0).any()), name


def test_state_dict_is_torch_adams_both_ways():
    xs = batches(6)
    model = ensemble()
    optimizer = SAEAdam(model, lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    train_steps(model, optimizer, xs[:3], "torch")
    saved = copy.deepcopy(optimizer.state_dict())  # a checkpoint's copy (state_dict() shares the moments)
    plain = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    assert set(saved["param_groups"][0]) == set(plain.state_dict()["param_groups"][0])
    for state in saved["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0 and float(state["step"]) == 3

    # SAEAdam → torch.optim.Adam, and on: the same as going on with SAEAdam (torch backend: bit for bit)
    twin = ensemble()
    twin.load_state_dict(model.state_dict())
    plain = torch.optim.Adam(twin.parameters(), lr=1.0)
    plain.load_state_dict(saved)
    train_steps(twin, plain, xs[3:], "torch")
    train_steps(model, optimizer, xs[3:], "torch")
    state_equal(twin, model)

    # torch.optim.Adam → SAEAdam (an old checkpoint resumes)
    again = SAEAdam(model, lr=1.0)
    again.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert again.param_groups[0]["betas"] == (0.8, 0.99) and again.param_groups[0]["eps"] == 1e-7
    train_steps(model, again, xs[:2], "torch")
    train_steps(twin, plain, xs[:2], "torch")
    state_equal(twin, model)


def test_single_sae_steps_whole_tensors():
    model = sf.SAE(CFG, seed=1)
    model.b_dec_initialized.fill_(True)
    old = sf.SAE(CFG, seed=1)
    old.b_dec_initialized.fill_(True)
    xs = batches(5)
    train_steps(old, torch.optim.Adam(old.parameters(), lr=1e-2), xs, "torch")
    train_steps(model, SAEAdam(model, lr=1e-2), xs, "torch")
    state_equal(model, old)


def test_unsupported_adam_settings_raise():
    model = ensemble()
    optimizer = SAEAdam(model, lr=1e-2)
    optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        train_steps(model, optimizer, batches(1), "torch")


@pytest.mark.parametrize("backend, device", FUSED)
def test_train_takes_one_fused_step_per_parameter_on_its_backend(monkeypatch, backend, device):
    calls = []
    fused = ops.adam_step_

    def spy(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, unit_rows=False, backend=None):
        calls.append((backend, tuple(param.shape), unit_rows))
        return fused(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, unit_rows, backend)

    monkeypatch.setattr(ops, "adam_step_", spy)
    projections = []
    monkeypatch.setattr(ops, "remove_parallel_grad_", lambda *a, **k: projections.append(a))
    model = sf.Ensemble.boosting(sf.SAEConfig(d_in=12, n_latents=20, k=3), 2, seed=0).to(device)
    sf.train(model, batches(2, device=device), steps=2, lr=1e-3, backend=backend, progress=False)
    # boosting trains stage by stage: each step one call per parameter on the stage's [1, ...] slice
    per_step = [(backend, (1, 20, 12), False), (backend, (1, 20), False), (backend, (1, 20, 12), True),
                (backend, (1, 12), False)]
    assert calls == per_step * 4
    assert projections == []  # the projection ran inside the fused step
