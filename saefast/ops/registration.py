"""Registering a Triton launcher as a ``torch.library`` custom op (``torch.ops.saefast.*``), and an op's kernels
per fused backend (:class:`FusedKernels`).

Custom ops give ``torch.compile`` an opaque node with known output shapes (the fake implementation) instead of a
Python function it would have to trace into; each op file attaches its autograd formula to the op it registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from . import native
from .backend import compiling_only

Table = TypeVar("Table")


def triton_custom_op(name: str, impl: Callable[..., Any], fake: Callable[..., Any],
                     mutates_args: tuple[str, ...] = ()) -> Any:
    """The custom op ``name`` running ``impl`` (a Triton launcher), with ``fake`` as its fake implementation.

    Meta tensors get ``fake`` too (shapes only), except inside :func:`saefast.kernels.compile_only.compile_for`:
    there they go through ``impl``, whose launcher then compiles its kernel for the chosen GPU instead of running it
    — how ``bench/gpu_build.py`` builds every kernel of a whole training step, at its real shapes, without a GPU.
    """
    op = torch.library.custom_op(name, impl, mutates_args=mutates_args)
    op.register_fake(fake)

    def meta(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return (impl if compiling_only(tensors[0].device) else fake)(*args)

    op.register_kernel("meta", meta)
    return op


class FusedKernels(Generic[Table]):
    """One op's kernels per fused backend: the Triton custom ops from import, the extension's ops once it has loaded
    (its :func:`saefast.ops.native.on_load` callback sets :attr:`native`). ``kernels(backend)`` is the table of a
    resolved fused backend."""

    def __init__(self, triton: Table):
        self.triton = triton
        self.native: Table | None = None

    def __call__(self, backend: str) -> Table:
        if backend != "native":
            return self.triton
        native.load()
        if self.native is None:
            raise ValueError(f"backend 'native' is unavailable: {native.why_unavailable()}")
        return self.native
