"""Shared fixtures: a fixed torch seed per test, and the models and guard of the bad-input tests.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton is
first imported — hence here, at the top of the first module pytest loads. Plain helper functions and constants
(``assert_close``, random data, backends, configs) are in ``tests/helpers.py``: ``from helpers import ...``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import BAD_INPUT_MODELS  # noqa: E402  (after TRITON_INTERPRET: helpers imports saefast)

from saefast.ops import ref  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state (so tests are independent of their order)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_batchtopk_capacity():
    """Every test starts from BatchTopK's starting capacity (``saefast.ops.encode._AdaptiveCapacity`` is per
    process: a test that grew it must not change which path a later test takes)."""
    from saefast.ops import encode

    encode._adaptive.clear()
    yield


@pytest.fixture(params=sorted(BAD_INPUT_MODELS))
def each_model(request):
    """An SAE, a bagging and a boosting ensemble of ``helpers.cfg_for()`` (the bad-input tests' sizes)."""
    return BAD_INPUT_MODELS[request.param]()


@pytest.fixture
def no_compute(monkeypatch):
    """Fail if any encoder math runs: validation must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("compute ran before the input was validated")

    monkeypatch.setattr(ref, "pre_activations", forbidden)
