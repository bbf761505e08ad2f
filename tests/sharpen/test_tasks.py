"""saefast.sharpen.tasks: the digits task is the paper's setting (an MLP 64-16-16-10 hooked at its first layer, a
ReLU SAE of 256 latents). (The ``saefast sharpen`` command that runs it: tests/cli/test_cli.py.)"""

from __future__ import annotations

import pytest


def test_digits_task_is_the_papers_setting():
    pytest.importorskip("sklearn")
    from saefast.sharpen.tasks import digits_task

    task = digits_task(seed=0)
    shapes = [tuple(p.shape) for p in task.model.parameters()]
    assert shapes == [(16, 64), (16,), (16, 16), (16,), (10, 16), (10,)]  # MLP 64-16-16-10
    assert task.model.hook_layer == "act1" and len(task.train) + len(task.test) == 1797
    assert (task.sae.d_in, task.sae.n_latents, task.sae.activation) == (16, 256, "relu")
    assert task.config.top_n == 25 and task.config.cycles == 2
