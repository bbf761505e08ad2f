"""saefast.sharpen.aux_loss: the cosine loss on hand values, and the auxiliary loss on a hooked layer — its gradient
reaches the weights before the layer (the reference implementation detached it), optimizing it moves the layer towards
its targets, tuple outputs are hooked, and errors are named."""

from __future__ import annotations

import pytest
import torch
from helpers import MLP, assert_close
from torch import nn

from saefast import sharpen


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
