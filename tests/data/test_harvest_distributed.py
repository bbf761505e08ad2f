"""saefast.data.harvest with ``distributed=True``: two CPU processes (gloo) share out the shards of a harvest and
write the store a single process writes, byte for byte; each rank resumes from its own last complete shard; errors
on some ranks are named on every rank. (The single-process harvest: tests/data/test_harvest.py.)

The ranks are spawned with ``torch.multiprocessing`` (one thread each); they run a scenario, check what each rank
sees, and leave the stores for the test to compare with the one-process store, which rank 0 writes in the same
conditions (so the float math is the same).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import ByteTokenizer, tiny_llama

import saefast.data.store.merge as merge_module
from saefast.data.harvest import PARTS, harvest
from saefast.data.store import ActivationStore, StoreError
from saefast.distributed import DistributedError, barrier

transformers = pytest.importorskip("transformers")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

CONTEXT = 16
BOS = 1
HOOK = "model.layers.1"
TOKENS = 460
SETTINGS = dict(context=CONTEXT, batch_size=3, shard_tokens=60, dtype=torch.float32, progress=False)
"""≤ 42 rows a batch, so a shard every 2 batches: 6 shards (3 a rank), of uneven sizes (BOS tokens dropped)."""
TEXTS = ["the quick brown fox jumps over the lazy dog " * 9, "sparse autoencoders on activations " * 8]


def windows() -> list[torch.Tensor]:
    """Random token windows with a BOS (not stored) at random places, so windows keep unequal numbers of rows."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (40, CONTEXT), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < 0.08] = BOS
    return list(ids)


class Forwards:
    """Counts the token windows the model runs on (not the 2-token probe); raises Crash after ``crash_after``."""

    def __init__(self, model, crash_after: int | None = None):
        self.windows, self.crash_after = 0, crash_after
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[-1] == CONTEXT:
            if self.crash_after is not None and self.windows >= self.crash_after:
                raise RuntimeError(f"simulated crash after {self.windows} windows")
            self.windows += ids.shape[0]


def run(tmp_path: Path, scenario) -> None:
    """Run ``scenario(rank, tmp_path)`` on 2 gloo ranks of a process group."""
    torch.multiprocessing.spawn(_rank_main, args=(scenario.__name__, str(tmp_path)), nprocs=2, join=True)


def _rank_main(rank: int, scenario: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        globals()[scenario](rank, Path(tmp))
    finally:
        dist.destroy_process_group()
    # A rank whose scenario passed leaves without the interpreter's teardown: about 1 exit in 12 of the errors
    # scenario aborted there ("terminate called without an active exception", in a thread with no Python frame,
    # after the group was destroyed), at b533e0f as now; a barrier before destroying the group did not help.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def assert_same_store(path: Path, reference: Path) -> None:
    """The same manifest and shard files byte for byte; the same rows, token ids and batches when read."""
    assert (path / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    for shard in manifest(reference)["shards"]:
        for entry in shard["files"].values():
            assert (path / entry["file"]).read_bytes() == (reference / entry["file"]).read_bytes(), entry["file"]
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in reference.iterdir())  # parts removed
    store, ref = ActivationStore(path, verify="eager"), ActivationStore(reference)
    assert store.complete and store.n_tokens == ref.n_tokens == TOKENS
    assert torch.equal(store.read(0, TOKENS, dtype=None), ref.read(0, TOKENS, dtype=None))
    assert torch.equal(store.read_extra("token_ids", 0, TOKENS), ref.read_extra("token_ids", 0, TOKENS))
    assert store.metadata == ref.metadata and store.state == ref.state
    for a, b in zip(store.batches(64, seed=3), ref.batches(64, seed=3)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ the same store


def same_store(rank: int, tmp: Path) -> None:
    model, tokenizer = tiny_llama(), ByteTokenizer()
    from_windows = harvest(model, tmp / "windows", HOOK, TOKENS, windows=iter(windows()), distributed=True,
                           **SETTINGS)  # an iterator: the windows the plan reads are kept for the shares
    from_texts = harvest(model, tmp / "texts", HOOK, TOKENS, tokenizer=tokenizer, texts=TEXTS, distributed=True,
                         metadata={"run": "texts"}, **SETTINGS)
    assert from_windows.n_tokens == from_texts.n_tokens == TOKENS  # every rank gets the store
    if rank == 0:  # the single-process stores, in the same conditions
        harvest(model, tmp / "windows-1", HOOK, TOKENS, windows=windows(), **SETTINGS)
        harvest(model, tmp / "texts-1", HOOK, TOKENS, tokenizer=tokenizer, texts=TEXTS, metadata={"run": "texts"},
                **SETTINGS)
    barrier()


def test_two_ranks_write_the_single_process_store_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run(tmp_path, same_store)
    for name in ("windows", "texts"):
        assert len(manifest(tmp_path / name)["shards"]) == 6
        assert len({shard["tokens"] for shard in manifest(tmp_path / name)["shards"]}) > 1  # uneven shards
        assert_same_store(tmp_path / name, tmp_path / f"{name}-1")
    assert not (tmp_path / "windows" / PARTS).exists()


# ------------------------------------------------------------------------------------------ resume, errors


def resume(rank: int, tmp: Path) -> None:
    out = tmp / "s"
    model = tiny_llama()
    part = out / PARTS / f"rank{rank}-of-2"

    # 1. rank 1 crashes in its 4th batch (its first shard written): both ranks say so; rank 0's part is complete
    forwards = Forwards(model, crash_after=9 if rank == 1 else None)
    with pytest.raises(DistributedError, match=r"^rank 1: simulated crash after 9 windows$"):
        harvest(model, out, HOOK, TOKENS, windows=windows(), distributed=True, **SETTINGS)
    assert (manifest(part)["complete"], len(manifest(part)["shards"])) == ((True, 3) if rank == 0 else (False, 1))
    assert not (out / "manifest.json").exists()
    barrier()
    if rank == 0:  # a single process does not take over a split harvest
        with pytest.raises(StoreError, match="split over 2 processes; resume it with as many"):
            harvest(model, out, HOOK, TOKENS, windows=windows(), **SETTINGS)
    else:  # leftovers of the crash: a temp file and a shard file the part's manifest does not list
        (part / ".shard00001.model.layers.1.npy.x1y2.tmp").write_bytes(b"half")
        (part / "shard00001.model.layers.1.npy").write_bytes(b"half a shard")
    barrier()

    # 2. the same call resumes each rank from its own last shard; then rank 0's join fails before the manifest
    forwards.windows, forwards.crash_after = 0, None
    said: list[str] = []
    real_write = merge_module.atomic_write_bytes

    def failing_write(path, data):
        raise OSError("disk full (simulated)")

    merge_module.atomic_write_bytes = failing_write
    try:
        with pytest.raises(DistributedError, match=r"^rank 0: disk full \(simulated\)$"):
            harvest(model, out, HOOK, TOKENS, windows=windows(), distributed=True, log=said.append, **SETTINGS)
    finally:
        merge_module.atomic_write_bytes = real_write
    assert forwards.windows == (0 if rank == 0 else 12)  # rank 1: the windows of its 2 unwritten shards
    assert said == ([f"resuming the harvest in {out} at 305 of {TOKENS} tokens (split over 2 ranks)"]
                    if rank == 0 else [])
    assert not (part / "shard00001.model.layers.1.npy.x1y2.tmp").exists()
    assert not (out / "manifest.json").exists() and manifest(part)["complete"]

    # 3. re-running joins the finished parts without running the model
    forwards.windows = 0
    store = harvest(model, out, HOOK, TOKENS, windows=windows(), distributed=True, **SETTINGS)
    assert forwards.windows == 0 and store.complete and not (out / PARTS).exists()
    if rank == 0:
        harvest(model, tmp / "one", HOOK, TOKENS, windows=windows(), **SETTINGS)
    barrier()


def test_each_rank_resumes_from_its_own_last_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run(tmp_path, resume)
    assert_same_store(tmp_path / "s", tmp_path / "one")


def errors(rank: int, tmp: Path) -> None:
    model = tiny_llama()
    # bad input, the same on every rank, is raised as in one process
    with pytest.raises(ValueError, match="not enough text: the input gives"):
        harvest(model, tmp / "a", HOOK, 10_000, windows=windows(), distributed=True, **SETTINGS)
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        harvest(model, tmp / "a", HOOK, 0, windows=windows(), distributed=True, **SETTINGS)
    # a rank that cannot write its part: every rank names it, before any compute
    blocked = tmp / "b" / PARTS / "rank1-of-2"
    if rank == 0:
        blocked.parent.mkdir(parents=True)
        blocked.write_text("not a folder")
    barrier()
    forwards = Forwards(model)
    with pytest.raises(DistributedError, match=rf"^rank 1: cannot write an activation store at {blocked}"):
        harvest(model, tmp / "b", HOOK, TOKENS, windows=windows(), distributed=True, **SETTINGS)
    assert forwards.windows == 0
    # ranks that disagree (another model on rank 1) are refused before they write
    other = tiny_llama(seed=rank)
    with pytest.raises(ValueError, match=r"the ranks disagree on the harvest: rank 1: store.*fingerprint"):
        harvest(other, tmp / "c", HOOK, TOKENS, windows=windows(), distributed=True, **SETTINGS)
    assert not (tmp / "c").exists()
    barrier()
    # a store in progress by one process is not taken over by two
    if rank == 0:
        with pytest.raises(RuntimeError, match="simulated crash"):
            Forwards(model, crash_after=6)
            harvest(model, tmp / "d", HOOK, TOKENS, windows=windows(), **SETTINGS)
    barrier()
    with pytest.raises(StoreError, match="in progress by a single process; resume it the same way"):
        harvest(tiny_llama(), tmp / "d", HOOK, TOKENS, windows=windows(), distributed=True, **SETTINGS)


def test_errors_name_the_failing_ranks_and_bad_input_reads_as_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run(tmp_path, errors)


def test_distributed_needs_a_process_group(tmp_path):
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
        harvest(tiny_llama(), tmp_path / "s", HOOK, 10, windows=windows(), distributed=True, **SETTINGS)
