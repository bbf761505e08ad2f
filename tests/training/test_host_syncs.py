"""Host syncs of a training step on the fused backends.

On a GPU, every op whose result the host must read (``.item()``, ``bool(t)``, ``int(t)``, ``nonzero``, a
boolean-mask index, ``masked_select``, ``unique``) waits for all the work queued before it, and the device idles
while the host queues what follows; so does ``tolist``/``numpy``/``cpu`` of a GPU tensor. The counter below sees
those ops through a ``TorchDispatchMode`` (and the three methods through a ``TorchFunctionMode``), so the number
of syncs a step would make on a GPU is checked here on CPU. Not counted: torch.optim's (and SAEAdam's) reads of
their step counters (host tensors on every device), the finiteness check of a batch (batches arrive on the host), and
the read of a pinned host copy made a step earlier (``saefast.training.dead_count.DeadCountAhead._read_host_copy``).
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from helpers import FUSED_BACKENDS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import saefast as sf

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "is_nonzero", "equal",
            "repeat_interleave",  # its output size is data (saefast never passes output_size)
            "lift_fresh"}  # torch.tensor/as_tensor of Python data: on a GPU, a blocking copy from pageable memory
MASK_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
NOT_DEVICE_SYNCS = ("torch/optim/",)  # Adam's step counters live on the host
# The batch's finiteness check (on the host, where batches come from); the trainer's read of AuxK's dead count
# from a pinned host buffer, copied a step earlier (on CUDA it waits on that copy's event, not on the queue).
EXEMPT_FUNCTIONS = {"check_activations", "_read_host_copy",
                    "_step_count"}  # SAEAdam's read of Adam's step counter: a host tensor, as in torch.optim


def _is_sync(func, args) -> bool:
    name = func._overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in MASK_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return False


def _count(counts: collections.Counter) -> None:
    frames = traceback.extract_stack()
    exempt = any(marker in f.filename for f in frames for marker in NOT_DEVICE_SYNCS) or any(
        f.name in EXEMPT_FUNCTIONS for f in frames)
    if not exempt:
        ours = [f for f in frames if "/saefast/" in f.filename]
        counts[ours[-1].name if ours else "<outside saefast>"] += 1


class _DispatchedReads(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            _count(self.counts)
        return func(*args, **(kwargs or {}))


class _MethodReads(TorchFunctionMode):
    """Tensor methods that copy to the host without a dispatched op on a CPU tensor (``tolist``, ``numpy``,
    ``cpu``): on a GPU tensor each is a device-to-host copy the host waits for."""

    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu):
            _count(self.counts)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts the ops that would sync a GPU, keyed by the innermost saefast function that ran them."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self._modes = (_MethodReads(self.counts), _DispatchedReads(self.counts))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _syncs_of_training(model, batches, steps: int, **options) -> collections.Counter[str]:
    """Syncs of ``steps`` training steps of ``model``; the history is logged at the last step only."""
    counter = SyncCounter()
    with counter:
        sf.train(model, batches, steps=steps, progress=False, log_every=10**6, **options)
    return counter.counts


def _batches(d_in: int = 24, n: int = 32, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, d_in, generator=gen) for _ in range(count)]


def _warm(model, backend: str) -> None:
    """Two steps (64 tokens) so that b_dec is set and, with dead_after_tokens = 48, dead latents exist."""
    sf.train(model, _batches(), steps=2, backend=backend, progress=False)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("aux_coef", [0.0, 1 / 32])
def test_a_topk_step_does_not_sync(backend, aux_coef):
    """Only the first step of a stage reads the b_dec flags and (AuxK) the exact dead count; later steps take the
    dead-count bound their previous step copied to the host."""
    cfg = sf.SAEConfig(d_in=24, n_latents=192, k=4, dead_after_tokens=48, aux_coef=aux_coef)
    model = sf.Ensemble.bagging(cfg, members=3, seed=0)
    _warm(model, backend)
    assert bool(model.dead_latents(slice(None)).any()), "the warm-up should leave dead latents"
    counts = _syncs_of_training(model, _batches(), steps=4, backend=backend)
    expected = {"_encode": 1} if aux_coef else {}
    expected["b_dec_ready"] = 1
    expected["_log"] = 1  # the logged step: its metrics in one transfer
    assert dict(counts) == expected


def test_per_member_inputs_take_the_dead_count_bound_too(monkeypatch):
    """Bootstrap bagging encodes member by member; AuxK past the fused limit lists the dead latents of each."""
    from saefast.kernels import topk_encode as kernel

    monkeypatch.setattr(kernel, "MAX_K_WITH_AUX", 8)
    cfg = sf.SAEConfig(d_in=24, n_latents=192, k=4, dead_after_tokens=48, aux_k=12)
    model = sf.Ensemble.bagging(cfg, members=2, seed=0)
    _warm(model, "triton")
    counts = _syncs_of_training(model, _batches(), steps=3, backend="triton", bootstrap=True)
    assert dict(counts) == {"_encode": 1, "b_dec_ready": 1, "_log": 1}


def test_batches_of_dead_after_tokens_or_more_read_the_exact_count():
    """With N ≥ dead_after_tokens the bound would count every latent (and AuxK past the fused limit would encode
    all of them a second time), so every step reads the exact count instead."""
    cfg = sf.SAEConfig(d_in=24, n_latents=64, k=4, dead_after_tokens=32)  # = N
    model = sf.Ensemble.bagging(cfg, members=2, seed=0)
    _warm(model, "triton")
    counts = _syncs_of_training(model, _batches(), steps=3, backend="triton")
    assert dict(counts) == {"_encode": 3, "b_dec_ready": 1, "_log": 1}


def test_boosting_reads_the_b_dec_flags_once_per_stage():
    cfg = sf.SAEConfig(d_in=24, n_latents=32, k=3, aux_coef=0.0, b_dec_init="mean")  # the median iterates on the host
    model = sf.Ensemble.boosting(cfg, members=2, seed=0)
    counts = _syncs_of_training(model, _batches(), steps=3, backend="triton")
    assert dict(counts) == {"b_dec_ready": 2, "_log": 2}  # one logged step per stage


@pytest.mark.parametrize("activation, check", [("batchtopk", "batchtopk_encode"), ("jumprelu", "jumprelu_encode")])
def test_capacity_checks_sync_once_per_step(activation, check):
    """BatchTopK and JumpReLU check their candidate capacity (exact results, never a silent drop): one sync."""
    cfg = sf.SAEConfig(d_in=24, n_latents=64, k=4, activation=activation, dead_after_tokens=48)
    model = sf.SAE(cfg, seed=0)
    _warm(model, "triton")
    counts = _syncs_of_training(model, _batches(), steps=3, backend="triton")
    first_step = {"_encode": 1} if activation == "batchtopk" else {}  # AuxK's exact dead count
    assert dict(counts) == {check: 3, "b_dec_ready": 1, "_log": 1, **first_step}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_evaluate_reads_the_host_only_at_the_end(backend):
    """The metrics are read once the data is done: as many syncs for one batch as for four."""
    model = sf.Ensemble.bagging(sf.SAEConfig(d_in=24, n_latents=64, k=4), members=2, seed=0)

    def syncs(n_batches: int) -> dict[str, int]:
        counter = SyncCounter()
        with sf.use_backend(backend), counter:
            sf.evaluate(model, _batches(n=16, count=n_batches))
        return dict(counter.counts)

    assert syncs(1) == syncs(4)


def test_the_counter_sees_host_reads():
    counter = SyncCounter()
    x = torch.randn(5)
    with counter:
        float(x.sum())
        x[x > 0]
        torch.nonzero(x)
        x.tolist()
    assert sum(counter.counts.values()) == 4


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_the_dead_count_bound_bounds_the_count_and_changes_nothing(backend, monkeypatch):
    """The bound a step issues for the next is ≥ that step's exact largest dead count (strictly, at times: it
    counts latents that then fire), and training on it gives the model that the exact counts give."""
    from saefast.models import SparseDictionary
    from saefast.training.dead_count import DeadCountAhead

    cfg = sf.SAEConfig(d_in=24, n_latents=64, k=4, dead_after_tokens=64, aux_k=6)  # dead: unfired for 2 batches
    seen = []
    encode = SparseDictionary._encode

    def spy(self, x_in, P, members, backend, training, aux, max_dead=None):
        seen.append((max_dead, int(self.dead_latents(members).sum(-1).max())))
        return encode(self, x_in, P, members, backend, training, aux, max_dead)

    monkeypatch.setattr(SparseDictionary, "_encode", spy)
    bounded, exact = sf.Ensemble.bagging(cfg, members=2, seed=0), sf.Ensemble.bagging(cfg, members=2, seed=0)
    batches = _batches(count=8)
    sf.train(bounded, batches, steps=8, backend=backend, progress=False)
    assert seen[0][0] is None and all(bound is not None for bound, _ in seen[1:]) and len(seen) == 8
    assert all(bound >= count for bound, count in seen[1:]), seen
    assert any(bound > count > 0 for bound, count in seen[1:]), seen

    monkeypatch.setattr(DeadCountAhead, "take", lambda self: None)  # the exact count every step
    sf.train(exact, batches, steps=8, backend=backend, progress=False)
    for name, value in exact.state_dict().items():
        torch.testing.assert_close(bounded.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA's own sync detection")
@pytest.mark.parametrize("bootstrap", [False, True])
def test_on_cuda_a_topk_step_does_not_sync(bootstrap):
    """The same check by the CUDA runtime: ``torch.cuda.set_sync_debug_mode`` warns on every call that waits for
    the device, host↔device copies from pageable memory included (the batches here are pageable host tensors:
    the trainer pins them)."""
    import warnings

    cfg = sf.SAEConfig(d_in=64, n_latents=256, k=8, dead_after_tokens=128)
    model = sf.Ensemble.bagging(cfg, members=2, seed=0).cuda()
    batches = _batches(d_in=64, n=64, count=4)
    sf.train(model, batches, steps=2, backend="triton", progress=False)  # compiles; sets b_dec; dead latents
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sf.train(model, batches, steps=6, backend="triton", progress=False, log_every=10**6, bootstrap=bootstrap)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    # The first step of the run reads b_dec's flags and AuxK's exact dead count; the last step logs its metrics.
    assert len(syncs) == 3, syncs
