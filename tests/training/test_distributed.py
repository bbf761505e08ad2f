"""Distributed training on the CPU (gloo, torchrun): member-parallel is the single-process model bit for bit,
data-parallel is it to float rounding, the 2-D mesh, sharded checkpoints that resume on another world size after a
rank is killed mid-write, and setup errors reported once, by rank 0, naming the failing rank.

Every process runs one thread (``OMP_NUM_THREADS=1``), the single-process references too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import saefast as sf
from saefast.data.store import write_store
from saefast.distributed import Layout, TokenShards, make_layout, mesh_shape, parse_parallel
from saefast.models import sharded
from saefast.training.parallel import member_indices, select_members

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

HERE = Path(__file__).parent
TRAIN = ["train", "--kind", "bagging", "--members", "2", "--latents", "192", "--k", "8", "--steps", "40",
         "--batch-size", "512", "--seed", "0", "--no-progress"]
MEMBER_PARALLEL_ATOL = 0.0
DATA_PARALLEL_ATOL = 1e-5
"""Data-parallel sums each gradient over the ranks in another order than one process does; after 40 steps the
weights differ by ~1e-6 (measured), well inside this."""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}


def _single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saefast", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _torchrun(args: list[str], nproc: int = 2, extra_env: dict[str, str] | None = None,
              script: str | None = None) -> subprocess.CompletedProcess:
    target = [str(HERE / script)] if script else ["-m", "saefast"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *target, *args], capture_output=True, text=True,
                          env={**_env(), **(extra_env or {})}, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "store"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 48, generator=generator) @ torch.randn(48, 48, generator=generator)
    write_store(path, x, shard_tokens=2000)
    return path


@pytest.fixture(scope="module")
def single_run(store, tmp_path_factory) -> Path:
    """The contract's single-process run that the distributed ones are compared with."""
    out = tmp_path_factory.mktemp("single") / "run"
    done = _single([*TRAIN, "--data", str(store), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


def _max_difference(a: Path, b: Path) -> float:
    first, second = sf.load(a).state_dict(), sf.load(b).state_dict()
    assert set(first) == set(second)
    return max((first[n].double() - second[n].double()).abs().max().item() for n in first)


@pytest.mark.parametrize("parallel, atol", [("members", MEMBER_PARALLEL_ATOL), ("data", DATA_PARALLEL_ATOL)])
def test_torchrun_train_equals_the_single_process_run(store, single_run, tmp_path, parallel, atol):
    out = tmp_path / "run"
    done = _torchrun([*TRAIN, "--data", str(store), "--out", str(out), "--parallel", parallel])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("trained bagging") == 1  # rank 0 reports, the other rank stays quiet
    assert _max_difference(single_run, out) <= atol
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["parallel"]["ranks"] == 2
    history = json.loads((out / "history.json").read_text())
    single_history = json.loads((single_run / "history.json").read_text())
    assert [r["step"] for r in history] == [r["step"] for r in single_history]
    assert history[-1]["fvu_per_member"] == pytest.approx(single_history[-1]["fvu_per_member"], abs=1e-5)


@pytest.mark.parametrize("kind, parallel, nproc", [
    ("bagging", "members", 2), ("bootstrap", "members", 2), ("boosting", "members", 2),
    ("bagging", "data", 2), ("boosting", "data", 2), ("sae", "data", 2), ("bagging", "members,data", 4),
])
def test_sf_train_parallel_in_a_process_group(tmp_path, kind, parallel, nproc):
    """``sf.train(parallel=...)`` with the caller's process group: members exact, data and the mesh close, and
    every rank ends with the whole model (AuxK, geometric-median b_dec and gradient clipping all in play)."""
    out = tmp_path / "models.safetensors"
    done = _torchrun([kind, "topk", parallel, str(out)], nproc=nproc, script="api_worker.py")
    assert done.returncode == 0, done.stderr
    tensors = load_file(out)
    assert int(tensors["ranks_agree"]) == 1
    atol = MEMBER_PARALLEL_ATOL if parallel == "members" else DATA_PARALLEL_ATOL
    for name in [n.split(".", 1)[1] for n in tensors if n.startswith("reference.")]:
        difference = (tensors[f"reference.{name}"].double() - tensors[f"parallel.{name}"].double()).abs().max()
        assert difference <= atol, (name, float(difference))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_data_parallel_penalties_and_batchtopk(tmp_path, activation):
    """ReLU's L1 and JumpReLU's L0 are per-token means: data-parallel divides them by the global batch and matches
    one process. BatchTopK keeps the top N_r·k per rank (documented), so it only has to agree across the ranks."""
    out = tmp_path / "models.safetensors"
    done = _torchrun(["bagging", activation, "data", str(out)], script="api_worker.py")
    assert done.returncode == 0, done.stderr
    tensors = load_file(out)
    assert int(tensors["ranks_agree"]) == 1
    if activation != "batchtopk":
        for name in [n.split(".", 1)[1] for n in tensors if n.startswith("reference.")]:
            difference = (tensors[f"reference.{name}"].double() - tensors[f"parallel.{name}"].double()).abs().max()
            assert difference <= DATA_PARALLEL_ATOL, (name, float(difference))


def test_kill_9_during_a_checkpoint_resumes_on_other_world_sizes(store, single_run, tmp_path):
    """Rank 1 dies half-way through writing its shard of the third checkpoint: the manifest still names the second,
    whole. The run resumes from it in one process (bit-exact) and data-parallel on two (close)."""
    killed = tmp_path / "killed"
    done = _torchrun([*TRAIN, "--data", str(store), "--out", str(killed), "--parallel", "members",
                      "--checkpoint-every", "10"], extra_env={"SAEFAST_TEST_KILL_AT": "3"}, script="torchrun_cli.py")
    assert done.returncode != 0
    manifest = sharded.read_manifest(killed)
    assert manifest["tag"] == sharded.generation_tag(0, 20) and manifest["layout"]["member_shards"] == 2
    assert (killed / "shards" / sharded.generation_tag(0, 30)).is_dir()  # the half-written generation
    assert not (killed / "config.json").exists()
    assert sf.load(killed).n_stacked == 2  # the sharded checkpoint loads as one model
    again = tmp_path / "again"
    shutil.copytree(killed, again)
    done = _single([*TRAIN, "--data", str(store), "--out", str(killed), "--resume"])
    assert done.returncode == 0, done.stderr
    assert _max_difference(single_run, killed) == 0.0
    done = _torchrun([*TRAIN, "--data", str(store), "--out", str(again), "--resume", "--parallel", "data"])
    assert done.returncode == 0, done.stderr
    assert not (again / "shards" / sharded.generation_tag(0, 30)).exists()  # the unpublished one is cleared
    assert _max_difference(single_run, again) <= DATA_PARALLEL_ATOL


@pytest.mark.parametrize("rank1, flags, message", [
    ({"--data": "/nonexistent/store"}, [], "rank 1: "),
    ({"--latents": "96"}, [], "rank 1: model.config.n_latents=96 (rank 0: 192)"),
    ({}, ["--members", "3"], "rank 0: member-parallel bagging needs the 3 members to divide evenly"),
])
def test_errors_on_any_rank_are_reported_once_by_rank_0(store, tmp_path, rank1, flags, message):
    args = [*TRAIN, "--data", str(store), "--out", str(tmp_path / "run"), "--parallel", "members", *flags]
    done = _torchrun(args, extra_env={"SAEFAST_TEST_RANK1_ARGS": json.dumps(rank1)}, script="torchrun_cli.py")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("saefast train: error:")]
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    if "--data" in rank1:
        assert "/nonexistent/store" in lines[0]


def test_parallel_without_a_launcher_says_how_to_start_one(store, tmp_path):
    done = _single([*TRAIN, "--data", str(store), "--out", str(tmp_path / "run"), "--parallel", "members"])
    assert done.returncode == 2
    assert "torchrun" in done.stderr and "--nproc" in done.stderr
    with pytest.raises(ValueError, match="needs a torch.distributed process group"):
        sf.train(sf.Ensemble.bagging(sf.SAEConfig(d_in=8, n_latents=16, k=2), 2), [torch.randn(8, 8)], steps=1,
                 parallel="members", progress=False)


def test_nproc_starts_torchrun(store, single_run, tmp_path):
    out = tmp_path / "run"
    done = _single([*TRAIN, "--data", str(store), "--out", str(out), "--parallel", "members", "--nproc", "2"])
    assert done.returncode == 0, done.stderr
    assert _max_difference(single_run, out) == 0.0


# -- the pieces, in one process ---------------------------------------------------------------------------------

def test_mesh_shapes_and_bad_settings():
    assert mesh_shape("members", 4) == (4, 1) and mesh_shape("data", 4) == (1, 4)
    assert mesh_shape("members,data", 4) == (2, 2) and mesh_shape("members,data", 8, member_shards=2) == (2, 4)
    assert parse_parallel(None) == (False, False) and parse_parallel(["data", "members"]) == (True, True)
    with pytest.raises(ValueError, match="needs member_shards"):
        mesh_shape("members,data", 8)
    with pytest.raises(ValueError, match="must divide"):
        mesh_shape("members,data", 8, member_shards=3)
    with pytest.raises(ValueError, match="parallel must be one of"):
        parse_parallel("tokens")
    assert make_layout(None, torch.device("cpu")) == Layout(1, 1, 0, 0)
    assert not TokenShards(None).split


def test_member_shards_are_the_members_of_the_full_model():
    cfg = sf.SAEConfig(d_in=8, n_latents=16, k=2)
    bagging = sf.Ensemble.bagging(cfg, 4, seed=5)
    part = select_members(bagging, 2, 1)
    assert part.member_seeds() == bagging.member_seeds()[2:]
    assert torch.equal(part.W_dec, bagging.W_dec[2:])
    chains = sf.Ensemble.boosting(cfg, 3, seed=5, chains=4)
    assert member_indices(chains, 2, 1) == [2, 3, 6, 7, 10, 11]
    part = select_members(chains, 2, 1)
    assert part.chain_seeds == chains.chain_seeds[2:] and part.member_seeds() == [chains.member_seeds()[i] for i in
                                                                                   [2, 3, 6, 7, 10, 11]]
    with pytest.raises(ValueError, match="not divide evenly"):
        member_indices(sf.Ensemble.boosting(cfg, 3, chains=1), 2, 0)
    with pytest.raises(ValueError, match="single SAE"):
        member_indices(sf.SAE(cfg), 2, 0)


def test_sharded_checkpoints_reshard_on_load(tmp_path):
    """Shards written by a 2-chain-shard layout give any member set back, and the full model, bit for bit."""
    cfg = sf.SAEConfig(d_in=8, n_latents=16, k=2)
    full = sf.Ensemble.boosting(cfg, 3, seed=5, chains=4)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_()
    shards = [member_indices(full, 2, s) for s in range(2)]
    for s in range(2):
        sharded.write_shard(tmp_path, "t", s, select_members(full, 2, s), None)
    sharded.write_manifest(tmp_path, "t", full, shards, {"stage": 1, "step": 2}, {"member_shards": 2})
    loaded = sf.load(tmp_path)
    for name, tensor in full.state_dict().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    _, weights, _ = sharded.load_members(tmp_path, member_indices(full, 4, 3))
    part = select_members(full, 4, 3)
    for name, tensor in part.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    (sharded.shard_path(tmp_path, "t", 1) / "config.json").write_text("{}")
    with pytest.raises(sf.CheckpointError, match="missing or corrupt"):
        sharded.load_members(tmp_path, [0])


def test_sigterm_on_one_rank_stops_every_rank_after_a_checkpoint(store, tmp_path):
    """A SIGTERM that reaches one rank only is agreed on at the end of a step: every rank saves its shard of the
    same step and stops (exit 143, one message, the torchrun command to resume); the resumed run is the
    uninterrupted one bit for bit."""
    args = ["train", "--kind", "bagging", "--members", "2", "--latents", "64", "--k", "4", "--steps", "600",
            "--batch-size", "128", "--no-progress", "--data", str(store)]
    reference = tmp_path / "reference"
    assert _single([*args, "--out", str(reference)]).returncode == 0
    out = tmp_path / "run"
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "saefast", *args, "--out", str(out), "--parallel", "members",
                               "--checkpoint-every", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env())
    manifest = out / "shards" / sharded.MANIFEST
    deadline = time.monotonic() + 120
    while not manifest.exists() and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = subprocess.run(["pgrep", "-f", f"saefast train .*--out {out} "], capture_output=True, text=True)
    workers = sorted(int(pid) for pid in ranks.stdout.split() if int(pid) != launch.pid)
    assert len(workers) == 2, ranks.stdout
    os.kill(workers[-1], signal.SIGTERM)  # one rank only (the launcher is left alone)
    _, stderr = launch.communicate(timeout=120)
    stops = [line for line in stderr.splitlines() if line.startswith("saefast train: stopped by SIGTERM")]
    assert len(stops) == 1, stderr
    assert "resume with: torchrun --standalone --nproc_per_node=2 -m saefast train" in stops[0]
    state = sharded.read_manifest(out)["train_state"]
    assert 5 <= state["step"] < 600
    assert len(list((out / "shards" / sharded.generation_tag(0, state["step"])).iterdir())) == 2
    done = _single([*args, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr
    assert _max_difference(reference, out) == 0.0
