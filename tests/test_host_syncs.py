"""Host syncs of a training step on the fused backends.

On a GPU, every op whose result the host must read (``.item()``, ``bool(t)``, ``int(t)``, ``nonzero``, a
boolean-mask index, ``masked_select``, ``unique``) waits for all the work queued before it, and the device idles
while the host queues what follows. The counter below sees those ops through a ``TorchDispatchMode``, so the
number of syncs a step would make on a GPU is checked here on CPU. Not counted: torch.optim's reads of its step
counters (host tensors on every device), and the finiteness check of a batch (batches arrive on the host).
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import saefast as sf

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "is_nonzero", "equal"}
MASK_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
NOT_DEVICE_SYNCS = ("torch/optim/",)  # Adam's step counters live on the host
EXEMPT_FUNCTIONS = {"check_activations"}  # the batch's finiteness check, on the host where batches come from


def _is_sync(func, args) -> bool:
    name = func._overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return True  # the output size is data (counted even with output_size: saefast never passes it)
    if name in MASK_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return False


class SyncCounter(TorchDispatchMode):
    """Counts the ops that would sync a GPU, keyed by the innermost saefast function that ran them."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            frames = traceback.extract_stack()
            exempt = any(marker in f.filename for f in frames for marker in NOT_DEVICE_SYNCS) or any(
                f.name in EXEMPT_FUNCTIONS for f in frames)
            if not exempt:
                ours = [f for f in frames if "/saefast/" in f.filename]
                self.counts[ours[-1].name if ours else "<outside saefast>"] += 1
        return func(*args, **(kwargs or {}))


def _syncs_of_training(model, batches, steps: int, **options) -> collections.Counter[str]:
    """Syncs of ``steps`` training steps of ``model`` (logging only at the last step, and not counted)."""
    counter = SyncCounter()
    options = {"progress": False, "log_every": 10**6, **options}
    original_log = sf.train.__globals__["_Trainer"]._log

    def log_uncounted(self, *args, **kwargs):
        with torch.utils._python_dispatch._disable_current_modes():
            return original_log(self, *args, **kwargs)

    trainer = sf.train.__globals__["_Trainer"]
    trainer._log = log_uncounted
    try:
        with counter:
            sf.train(model, batches, steps=steps, **options)
    finally:
        trainer._log = original_log
    return counter.counts


def _batches(d_in: int = 24, n: int = 32, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, d_in, generator=gen) for _ in range(count)]


def _warm(model, backend: str) -> None:
    """Two steps so that b_dec is set and (dead_after_tokens = 8 < N) dead latents exist."""
    sf.train(model, _batches(), steps=2, backend=backend, progress=False)


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("aux_coef", [0.0, 1 / 32])
def test_a_topk_step_syncs_only_for_the_auxk_dead_count(backend, aux_coef):
    cfg = sf.SAEConfig(d_in=24, n_latents=64, k=4, dead_after_tokens=8, aux_coef=aux_coef)
    model = sf.Ensemble.bagging(cfg, members=3, seed=0)
    _warm(model, backend)
    assert bool(model._dead(slice(None)).any()), "the warm-up should leave dead latents"
    counts = _syncs_of_training(model, _batches(), steps=3, backend=backend)
    expected = {"_fused_codes": 3} if aux_coef else {}
    expected["_b_dec_ready"] = 1  # once per stage
    assert dict(counts) == expected


def test_per_member_inputs_share_the_one_dead_count_sync(monkeypatch):
    """Bootstrap bagging encodes member by member; AuxK past the fused limit lists the dead latents of each."""
    from saefast.kernels import topk_encode as kernel

    monkeypatch.setattr(kernel, "MAX_K_WITH_AUX", 8)
    cfg = sf.SAEConfig(d_in=24, n_latents=64, k=4, dead_after_tokens=8, aux_k=12)
    model = sf.Ensemble.bagging(cfg, members=2, seed=0)
    _warm(model, "triton")
    counts = _syncs_of_training(model, _batches(), steps=2, backend="triton", bootstrap=True)
    assert dict(counts) == {"_fused_codes": 2, "_b_dec_ready": 1}


def test_boosting_reads_the_b_dec_flags_once_per_stage():
    cfg = sf.SAEConfig(d_in=24, n_latents=32, k=3, aux_coef=0.0, b_dec_init="mean")  # the median iterates on the host
    model = sf.Ensemble.boosting(cfg, members=2, seed=0)
    counts = _syncs_of_training(model, _batches(), steps=3, backend="triton")
    assert dict(counts) == {"_b_dec_ready": 2}


@pytest.mark.parametrize("activation, per_step", [("batchtopk", {"_fused_codes": 1, "batchtopk_encode": 1}),
                                                  ("jumprelu", {"jumprelu_encode": 1})])
def test_capacity_checks_sync_once_per_step(activation, per_step):
    """BatchTopK and JumpReLU check their candidate capacity (exact results, never a silent drop): one sync."""
    cfg = sf.SAEConfig(d_in=24, n_latents=64, k=4, activation=activation, dead_after_tokens=8)
    model = sf.SAE(cfg, seed=0)
    _warm(model, "triton")
    counts = _syncs_of_training(model, _batches(), steps=2, backend="triton")
    assert dict(counts) == {**{name: 2 * n for name, n in per_step.items()}, "_b_dec_ready": 1}


def test_the_counter_sees_host_reads():
    counter = SyncCounter()
    x = torch.randn(5)
    with counter:
        float(x.sum())
        x[x > 0]
        torch.nonzero(x)
    assert sum(counter.counts.values()) == 3
