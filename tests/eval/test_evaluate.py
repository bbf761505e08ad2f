"""saefast.eval.evaluate: bad data (an empty batch, a batch with NaN, the wrong width) is refused with a message that
names the batch and the problem. (The metrics it computes: tests/eval/test_metrics.py; that it reads the host once,
at the end: tests/training/test_host_syncs.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_D as D
from helpers import cfg_for, good, with_nan

import saefast as sf


def test_evaluate_bad_data():
    model = sf.SAE(cfg_for())
    with pytest.raises(ValueError, match="empty batch"):
        sf.evaluate(model, torch.empty(0, D))
    with pytest.raises(ValueError, match=r"batch 1 contains NaN"):
        sf.evaluate(model, [good(3), with_nan()])
    with pytest.raises(ValueError, match="expects d_in"):
        sf.evaluate(model, torch.randn(4, D + 1))
