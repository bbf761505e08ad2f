"""Row gather from many sources into one batch, converting on the way: how the activation store assembles a batch
from the memory-mapped blocks of its shard files, each row read once and written once.

``out[n] = sources[source_index[n]][row_index[n]]`` in ``out``'s dtype. Kernel: ``csrc/cpu/gather_rows.cpp``
(``native``, on the calling thread); oracle: :func:`saefast.ops.ref.gather_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import native

GATHER_BACKENDS = ("auto", "torch", "native")
"""Backends of :func:`gather_rows_`: ``auto`` is ``native`` where the extension loads, else ``torch``."""

CONVERTIBLE = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the native kernel converts among (any dtype copies into itself)."""

FALLBACK_CHUNK_BYTES = 1 << 18
"""Rows the torch path gathers at a time when converting: a chunk this size stays in cache between its steps."""


def _check(sources: Sequence[torch.Tensor], source_index: torch.Tensor, row_index: torch.Tensor,
           out: torch.Tensor) -> None:
    """ValueError naming the problem, before any row is written."""
    if len(sources) == 0:
        raise ValueError("gather_rows_: sources is empty")
    first = sources[0]
    if first.dim() < 1:
        raise ValueError("gather_rows_: sources must have a row axis; got a 0-d tensor")
    for s, t in enumerate(sources):
        if t.dtype != first.dtype or t.shape[1:] != first.shape[1:] or t.device != first.device:
            raise ValueError(f"gather_rows_: every source must have one dtype, row shape and device; source {s} is "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}, source 0 is {first.dtype} "
                             f"{tuple(first.shape)} on {first.device}")
    for name, index in (("source_index", source_index), ("row_index", row_index)):
        if index.dtype != torch.int64 or index.dim() != 1:
            raise ValueError(f"gather_rows_: {name} must be a 1-d int64 tensor; got {index.dtype} "
                             f"{tuple(index.shape)}")
    n = len(source_index)
    if len(row_index) != n:
        raise ValueError(f"gather_rows_: source_index and row_index must have one length; got {n} and "
                         f"{len(row_index)}")
    if tuple(out.shape) != (n, *first.shape[1:]):
        raise ValueError(f"gather_rows_: out must be {(n, *first.shape[1:])}; got {tuple(out.shape)}")
    if out.dtype != first.dtype and not (out.dtype.is_floating_point and first.dtype.is_floating_point):
        raise ValueError(f"gather_rows_: converts only between floating dtypes; got {first.dtype} into {out.dtype}")


def _check_indices(sources: Sequence[torch.Tensor], source_index: torch.Tensor, row_index: torch.Tensor) -> None:
    """ValueError naming an index out of range (the torch path's check; the native kernel checks its own, before
    it writes a row, so the indices are scanned once); ``source_index`` is not empty."""
    lo, hi = int(source_index.min()), int(source_index.max())
    if lo < 0 or hi >= len(sources):
        raise ValueError(f"gather_rows_: source_index holds {lo if lo < 0 else hi}, outside [0, {len(sources)})")
    rows = torch.tensor([len(t) for t in sources], dtype=torch.int64)[source_index]
    bad = ((row_index < 0) | (row_index >= rows)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"gather_rows_: row_index[{i}] = {int(row_index[i])} is outside [0, {int(rows[i])}) of "
                         f"source {int(source_index[i])}")


def _native_runs(sources: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    return (out.device.type == "cpu" and sources[0].device.type == "cpu" and out.is_contiguous()
            and all(t.is_contiguous() for t in sources)
            and (out.dtype == sources[0].dtype or (out.dtype in CONVERTIBLE and sources[0].dtype in CONVERTIBLE))
            and native.available())


def _gather_torch(sources: Sequence[torch.Tensor], source_index: torch.Tensor, row_index: torch.Tensor,
                  out: torch.Tensor) -> None:
    """Per source: its rows gathered (in cache-sized chunks when converting) and scattered to their positions."""
    order = torch.argsort(source_index, stable=True)
    counts = torch.bincount(source_index, minlength=len(sources)).tolist()
    row_bytes = max(1, sources[0][0:1].numel() * sources[0].element_size())
    chunk = max(1, FALLBACK_CHUNK_BYTES // row_bytes)
    start = 0
    for s, count in enumerate(counts):
        positions = order[start : start + count]
        start += count
        for c in range(0, count, chunk):
            part = positions[c : c + chunk]
            out.index_copy_(0, part, sources[s].index_select(0, row_index[part]).to(out.dtype))


def gather_rows_(sources: Sequence[torch.Tensor], source_index: torch.Tensor, row_index: torch.Tensor,
                 out: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """In place, ``out[n] = sources[source_index[n]][row_index[n]]`` converted to ``out.dtype``; returns ``out``.

    ``sources``: tensors ``[R_s, *row]`` of one dtype, row shape and device; ``source_index``, ``row_index``: 1-d
    int64 of length ``N``; ``out``: ``[N, *row]``, the sources' dtype or, for floating sources, another floating
    dtype (bf16 and fp16 widen exactly; narrowing rounds to nearest even, as ``Tensor.to``). ``native``
    (``csrc/cpu/gather_rows.cpp``): each row read once and written once with the conversion in the same pass, on
    the calling thread (callers run it from several threads); it needs CPU tensors, contiguous, and conversions
    among fp32/bf16/fp16. ``torch`` runs anything else. ``backend``: one of :data:`GATHER_BACKENDS` (None:
    ``auto``). ValueError for mismatched shapes, dtypes or devices and for an index out of range, before any
    row is written.
    """
    backend = "auto" if backend is None else backend
    if backend not in GATHER_BACKENDS:
        raise ValueError(f"gather_rows_: backend must be one of {GATHER_BACKENDS}; got {backend!r}")
    _check(sources, source_index, row_index, out)
    runs = _native_runs(sources, out)
    if backend == "native" and not runs:
        raise ValueError("gather_rows_: backend 'native' needs the extension saefast._C "
                         f"({native.why_unavailable() or 'loaded'}), CPU tensors, contiguous, and a conversion among "
                         f"float32, bfloat16 and float16; use 'torch' or 'auto'")
    if backend != "torch" and runs:
        torch.ops.saefast.native_gather_rows_(list(sources), source_index, row_index, out)
    elif len(source_index):
        _check_indices(sources, source_index, row_index)
        _gather_torch(sources, source_index, row_index, out)
    return out
