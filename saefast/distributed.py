"""torch.distributed for saefast: the process group, the (members × data) device mesh, and the collectives every
distributed job shares — agreeing on errors and settings, the token-axis reductions, the bucketed gradient
all-reduce.

saefast splits work along the two axes it keeps explicit (see ``docs/guides/scaling.md``):

* the **member axis** ``J``: a bagging member or a boosting chain trains without talking to the others, so member
  shards need no gradient communication at all;
* the **token axis** ``N``: every rank of a data group reads a disjoint share of every global batch; gradients are
  summed over the group once per step, and the statistics that steer training (FVU denominators, firing counts,
  ``b_dec``) are reduced over the group so every rank holds the same values.

A job started by ``torchrun`` gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the rendezvous in its environment;
:func:`init_from_env` joins the group (NCCL on CUDA, gloo on the CPU). Control messages (errors, settings, stop
flags) always travel over a gloo group, so they never need a device synchronisation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .validation import changed_fields

PARALLEL_MODES = ("members", "data", "members,data")
"""What ``--parallel`` / ``sf.train(parallel=...)`` accept."""

BUCKET_BYTES = 25 << 20
"""Gradient bytes per all-reduce bucket (as DDP's default): large enough to reach the link's bandwidth, small
enough that buckets pipeline."""


class DistributedError(RuntimeError):
    """Something failed on one or more ranks; the message names each failing rank and its error."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is global rank 0 (the one that prints, logs and writes manifests). After the group is gone, the
    launcher's ``RANK`` still answers, so that only rank 0 reports how a distributed command ended."""
    return rank() == 0 if active() else int(os.environ.get("RANK", "0")) == 0


def local_device(device: str | torch.device) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher (modulo the GPUs there are,
    so that several ranks can share one GPU for a test), anything else stays."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
    return device


def _backend(device: torch.device) -> str:
    """NCCL for one rank per GPU; gloo on the CPU, and where ranks share a GPU (NCCL refuses that)."""
    if device.type != "cuda":
        return "gloo"
    return "gloo" if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count() else "nccl"


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group ``torchrun`` set up in the environment (NCCL for a CUDA ``device``, else gloo), once.
    Ranks that outnumber the node's GPUs share them (``cuda:LOCAL_RANK mod GPUs``) over gloo: a test set-up.
    Returns whether a multi-process group is active. A single process without a launcher gets no group."""
    if active():
        return world_size() > 1
    if not launched_by_torchrun():
        return False
    device = local_device(device)
    backend = _backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return world_size() > 1


@contextlib.contextmanager
def torchrun_group(device: str | torch.device = "cpu") -> Iterator[bool]:
    """Under ``torchrun``, join its process group for the block (:func:`init_from_env`); on leaving it, normally or
    on an error the ranks agreed on, wait for every rank and destroy the group — a rank that closed its connections
    while another still finished its last collective would abort that one. Yields whether a multi-process group
    is active (False for a plain process, which this leaves alone)."""
    was_active = active()
    joined = launched_by_torchrun() and init_from_env(device)
    try:
        yield joined
    finally:
        if active() and not was_active:
            try:
                barrier()
            except RuntimeError:  # a rank is gone (killed): nobody left to wait for
                pass
            dist.destroy_process_group()
            _CONTROL.clear()


_CONTROL: dict[str, Any] = {}


def control_group() -> Any:
    """A gloo group over every rank for control messages (objects, flags, barriers), created once: the default
    group on a gloo job, a new gloo group beside NCCL."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = "gloo"
    if key not in _CONTROL:
        _CONTROL[key] = dist.new_group(backend="gloo")
    return _CONTROL[key]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` without a group)."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


def barrier() -> None:
    """Wait until every rank gets here (on the control group; nothing without a group)."""
    if active():
        dist.barrier(group=control_group())


def describe(error: BaseException) -> str:
    """One line: the error's first line (its type when it has no message)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text


def agree_on_errors(error: BaseException | None) -> None:
    """Called by every rank with what failed there (or None): if any rank failed, raise on every rank a
    :class:`DistributedError` naming each failing rank and its message; the first failing rank's exception is the
    cause on that rank. A no-op without a process group (the error, if any, is re-raised as it is)."""
    if not active():
        if error is not None:
            raise error
        return
    messages = gather_objects(None if error is None else describe(error))
    failed = [(r, message) for r, message in enumerate(messages) if message is not None]
    if failed:
        text = "; ".join(f"rank {r}: {message}" for r, message in failed)
        raise DistributedError(text) from error


def settings_differences(settings: dict[str, Any]) -> list[str]:
    """Gather every rank's ``settings`` (nested dicts allowed) and list, for each rank whose settings differ from
    rank 0's, ``"rank r: a.b=<value> (rank 0: <value>)"``. Empty when all agree (or without a group)."""
    everyone = gather_objects(settings)
    return [f"rank {r}: {name}={theirs!r} (rank 0: {first!r})"
            for r, other in enumerate(everyone[1:], start=1)
            for name, first, theirs in changed_fields(everyone[0], other)]


def parse_parallel(parallel: str | Sequence[str] | None) -> tuple[bool, bool]:
    """``"members"`` / ``"data"`` / ``"members,data"`` (or a sequence of the axes) → (split members, split data)."""
    if parallel is None:
        return False, False
    axes = parallel.split(",") if isinstance(parallel, str) else list(parallel)
    axes = [axis.strip() for axis in axes if axis.strip()]
    unknown = [axis for axis in axes if axis not in ("members", "data")]
    if unknown or not axes or len(set(axes)) != len(axes):
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    return "members" in axes, "data" in axes


@dataclass
class Layout:
    """How the ranks split one training job: a ``member_shards × data_shards`` mesh (axis names ``members``,
    ``data``). Ranks with the same member coordinate hold the same members and share out the tokens; ranks with the
    same data coordinate hold different members and read the same tokens."""

    member_shards: int
    """``P_m``: ranks the member axis is split over."""
    data_shards: int
    """``P_d``: ranks the token axis is split over."""
    member_rank: int
    """This rank's member shard."""
    data_rank: int
    """This rank's share of every batch."""
    mesh: Any = field(repr=False, default=None)
    """The :class:`torch.distributed.device_mesh.DeviceMesh` (None for a single process)."""

    @property
    def data_group(self) -> Any:
        """The ranks that hold this rank's members (gradients and token statistics are summed over it)."""
        return None if self.mesh is None or self.data_shards == 1 else self.mesh.get_group("data")

    @property
    def member_group(self) -> Any:
        """The ranks that read this rank's tokens and hold the other member shards (metrics gather over it)."""
        return None if self.mesh is None or self.member_shards == 1 else self.mesh.get_group("members")

    @property
    def writes_shard(self) -> bool:
        """Whether this rank writes its member shard of a checkpoint (the first rank of each data group)."""
        return self.data_rank == 0

    def describe(self) -> str:
        """``"2 member shards × 1 data shard"``."""
        return (f"{self.member_shards} member shard{'s' * (self.member_shards != 1)} × {self.data_shards} data "
                f"shard{'s' * (self.data_shards != 1)}")


def mesh_shape(parallel: str | Sequence[str] | None, ranks: int, member_shards: int | None = None) -> tuple[int, int]:
    """``(P_m, P_d)`` for ``parallel`` over ``ranks``: ``"members"``: ``P × 1``; ``"data"``: ``1 × P``;
    ``"members,data"``: ``member_shards × P/member_shards`` (``member_shards`` required unless ``P`` is a square,
    where it defaults to ``√P``). Ranks are laid out row-major, as :func:`init_device_mesh` does: rank
    ``r = member_rank·P_d + data_rank``, so a data group is ``P_d`` consecutive ranks (one node, when ``P_d`` divides
    the GPUs per node)."""
    split_members, split_data = parse_parallel(parallel)
    if not (split_members or split_data):
        return 1, 1
    if split_members and split_data:
        if member_shards is None:
            root = int(round(ranks ** 0.5))
            if root * root != ranks:
                raise ValueError(f"parallel='members,data' on {ranks} ranks needs member_shards (--member-shards): "
                                 f"how many of the {ranks} ranks split the members")
            member_shards = root
        if isinstance(member_shards, bool) or not isinstance(member_shards, int) or member_shards < 1 \
                or ranks % member_shards:
            raise ValueError(f"member_shards must divide the {ranks} ranks, got {member_shards!r}")
        return member_shards, ranks // member_shards
    if member_shards is not None:
        raise ValueError(f"member_shards applies to parallel='members,data', not {parallel!r}")
    return (ranks, 1) if split_members else (1, ranks)


def make_layout(parallel: str | Sequence[str] | None, device: torch.device, member_shards: int | None = None) -> Layout:
    """The ``members × data`` :class:`~torch.distributed.device_mesh.DeviceMesh` for ``parallel`` over the default
    group's ranks (shape: :func:`mesh_shape`). Without a group: the trivial ``1 × 1`` layout, or a ValueError that
    says how to start one when ``parallel`` asks for ranks."""
    if not active():
        if parallel is not None:
            raise ValueError(f"parallel={parallel!r} needs a torch.distributed process group: start the job with "
                             f"torchrun (e.g. torchrun --nproc_per_node=2 -m saefast train ... --parallel "
                             f"{parallel}) or call torch.distributed.init_process_group first")
        return Layout(1, 1, 0, 0)
    shape = mesh_shape(parallel, world_size(), member_shards)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(device).type, shape, mesh_dim_names=("members", "data"))
    coordinate = mesh.get_coordinate()
    return Layout(shape[0], shape[1], int(coordinate[0]), int(coordinate[1]), mesh)


class TokenShards:
    """The token axis split over a data group: sums over the group, so a statistic of a rank's share of the batch
    becomes the statistic of the global batch. With ``group=None`` (one data shard) every sum is the identity."""

    def __init__(self, group: Any = None):
        self.group = group

    @property
    def split(self) -> bool:
        """Whether the tokens are shared out over more than one rank."""
        return self.group is not None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks tensor`` (a new tensor; no gradient flows through it)."""
        if self.group is None:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise ``max`` over the ranks (bool tensors: any)."""
        if self.group is None:
            return tensor
        as_int = tensor.dtype == torch.bool
        out = tensor.detach().to(torch.uint8 if as_int else tensor.dtype).clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out.bool() if as_int else out

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(1/P_d)·Σ_ranks tensor``."""
        if self.group is None:
            return tensor
        return self.sum(tensor) / dist.get_world_size(self.group)

    def count(self, n_tokens: int, device: torch.device) -> int:
        """The global batch size from this rank's ``n_tokens`` (one small all-reduce)."""
        if self.group is None:
            return int(n_tokens)
        return int(self.sum(torch.tensor([n_tokens], dtype=torch.int64, device=device)).item())

    def sum_(self, tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Sum ``tensors`` (gradients, or views of them on the member axis) over the group, in place: they are
        packed into flat buckets of about ``bucket_bytes``, each all-reduced asynchronously, then unpacked — one
        round of collectives per step whatever the number of parameters."""
        if self.group is None or not tensors:
            return
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for t in tensors:
            if buckets[-1] and size + t.numel() * t.element_size() > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel() * t.element_size()
        flats, works = [], []
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            flats.append(flat)
            works.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        for bucket, flat, work in zip(buckets, flats, works):
            work.wait()
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


LOCAL = TokenShards(None)
"""One process holds the whole batch: every reduction is the identity."""


def exchange(values: Sequence[int]) -> list[list[int]]:
    """Every rank's small list of ints (the same length everywhere), in rank order, in one gloo all-gather:
    the per-step handshake of a distributed loop (token counts, stop and checkpoint flags)."""
    mine = torch.tensor(list(values), dtype=torch.int64)
    if not active():
        return [mine.tolist()]
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine, group=control_group())
    return [t.tolist() for t in out]
