"""Bootstrap bagging: every member trains on its own resample (with replacement) of every batch."""

from __future__ import annotations

import hashlib

import torch

from ..devices import to_device
from ..models import SparseDictionary


def bootstrap_indices(n_tokens: int, member_seed: int, step: int, train_seed: int) -> torch.Tensor:
    """Rows of one bootstrap resample: ``n_tokens`` indices drawn uniformly with replacement from
    ``0 .. n_tokens−1``, int64 on the CPU, a pure function of ``(member_seed, step, train_seed)``.

    The generator is seeded with the first 63 bits of BLAKE2b(``"train_seed:member_seed:step"``), so the resample
    of a member depends on nothing else (not on the other members, the device or the process), is the same
    after resuming from a checkpoint, and differs between members, steps and runs."""
    key = f"{int(train_seed)}:{int(member_seed)}:{int(step)}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(n_tokens, (n_tokens,), generator=generator)


def resample(model: SparseDictionary, x: torch.Tensor, members: slice, step: int, train_seed: int) -> torch.Tensor:
    """Bootstrap input of ``members`` at ``step``: ``[N, J, D]`` with ``x_in[:, j] = x[idx_j]``,
    ``idx_j = bootstrap_indices(N, seed_j, step, train_seed)`` (an SAE, one model: ``[N, D]``)."""
    seeds = model.member_seeds()
    if model.single_output:
        idx = bootstrap_indices(x.shape[0], seeds[0], step, train_seed)
        return x[to_device(idx, x.device)]
    idx = torch.stack([bootstrap_indices(x.shape[0], s, step, train_seed) for s in seeds[members]], dim=1)  # [N, J]
    return x[to_device(idx, x.device)]
