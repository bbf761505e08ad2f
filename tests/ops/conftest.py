"""The ops tests run with poisoned kernel outputs: the Triton decode launchers' outputs start as NaN, the native ops'
as NaN / -1 (``saefast._C.set_poison_outputs``), instead of uninitialised memory, so an element a kernel fails to
write cannot pass a comparison."""

from __future__ import annotations

import pytest
import torch
from helpers import NO_EXTENSION, TRITON_OK

from saefast.ops import native


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    if TRITON_OK:
        from saefast.kernels import sparse_decode, sparse_decode_backward

        def nan_empty(shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)  # on the launcher's device

        monkeypatch.setattr(sparse_decode, "empty", nan_empty)
        monkeypatch.setattr(sparse_decode_backward, "empty", nan_empty)
    if NO_EXTENSION or not native.available():
        yield
        return
    from saefast import _C

    _C.set_poison_outputs(True)
    try:
        yield
    finally:
        _C.set_poison_outputs(False)
