"""Grouped matmul: ``G`` matrix products of different sizes in one call (ragged members, per-member inputs).

``native`` runs it through the extension (``csrc/cpu/grouped_mm.cpp``, ``csrc/cuda/grouped_mm.cu``); there is no
Triton grouped matmul, so ``auto`` and ``triton`` take the extension where it runs, else ``torch`` (a loop of
``torch.mm``, the reference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import native
from .backend import requested_backend, resolve_backend


def _op_view(t: torch.Tensor, trans: bool) -> torch.Tensor:
    return t.t() if trans else t


def _grouped_mm_fake(a, b, trans_a, trans_b):
    out = []
    for lhs, rhs in zip(a, b):
        rows = lhs.shape[1] if trans_a else lhs.shape[0]
        cols = rhs.shape[0] if trans_b else rhs.shape[1]
        out.append(lhs.new_empty((rows, cols)))
    return out


def _grouped_mm_setup(ctx, inputs, output):
    a, b, trans_a, trans_b = inputs
    ctx.save_for_backward(*a, *b)
    ctx.groups, ctx.trans_a, ctx.trans_b = len(a), trans_a, trans_b


def _grouped_mm_backward(ctx, grads):
    """``C = op(A)·op(B)``: ``d op(A) = dC·op(B)ᵀ``, ``d op(B) = op(A)ᵀ·dC`` — two more grouped matmuls."""
    saved = ctx.saved_tensors
    G = ctx.groups
    a, b = saved[:G], saved[G:]
    live = [g for g in range(G) if grads[g] is not None]
    grad_a, grad_b = [None] * G, [None] * G
    if live and ctx.needs_input_grad[0]:
        lhs = [grads[g].contiguous() for g in live]
        rhs = [_op_view(b[g], ctx.trans_b).t() for g in live]
        for g, d in zip(live, torch.ops.saefast.grouped_mm(lhs, rhs, False, False)):
            grad_a[g] = _op_view(d, ctx.trans_a)
    if live and ctx.needs_input_grad[1]:
        lhs = [_op_view(a[g], ctx.trans_a).t() for g in live]
        rhs = [grads[g].contiguous() for g in live]
        for g, d in zip(live, torch.ops.saefast.grouped_mm(lhs, rhs, False, False)):
            grad_b[g] = _op_view(d, ctx.trans_b)
    return grad_a, grad_b, None, None


@native.on_load
def _register_native() -> None:
    torch.library.register_fake("saefast::grouped_mm")(_grouped_mm_fake)
    torch.library.register_autograd("saefast::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], trans_a: bool = False, trans_b: bool = False,
               backend: str | None = None) -> list[torch.Tensor]:
    """``C_g = op(a_g) · op(b_g)`` for ``G`` groups of different sizes in one call (``op`` = transpose when
    ``trans_a`` / ``trans_b``); differentiable in every ``a_g`` and ``b_g``.

    Each ``a_g``, ``b_g`` is 2-D with any strides (a transposed view costs no copy); all share one float dtype and
    device; rows, columns and the inner dimension may differ per group (ragged members, per-member inputs, the
    transposed products of the backward). ``native`` (``auto`` where the extension runs on the device) runs the
    groups' row blocks in parallel through the extension, bit-identically for any thread count; ``torch`` is a loop
    of ``torch.mm``, the reference.
    """
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"grouped_mm: a has {len(a)} groups but b has {len(b)}")
    if not a:
        return []
    name = requested_backend(backend)
    device = a[0].device
    if name in ("auto", "triton"):  # no Triton grouped matmul: the extension where it runs, else torch
        name = "native" if native.supports(device) else "torch"
    if name == "native":
        resolve_backend("native", device)
        return list(torch.ops.saefast.grouped_mm(a, b, trans_a, trans_b))
    for g, (lhs, rhs) in enumerate(zip(a, b)):
        if lhs.dim() != 2 or rhs.dim() != 2:
            raise ValueError(f"grouped_mm: group {g} needs 2-D a and b; got shapes {tuple(lhs.shape)} and "
                             f"{tuple(rhs.shape)}")
    return [_op_view(lhs, trans_a) @ _op_view(rhs, trans_b) for lhs, rhs in zip(a, b)]
