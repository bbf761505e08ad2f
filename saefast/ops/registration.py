"""Registering a Triton launcher as a ``torch.library`` custom op (``torch.ops.saefast.*``).

Custom ops give ``torch.compile`` an opaque node with known output shapes (the fake implementation) instead of a
Python function it would have to trace into; each op file attaches its autograd formula to the op it registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backend import compiling_only


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
