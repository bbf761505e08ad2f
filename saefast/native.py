"""The native extension ``saefast._C`` (csrc/): loading it, and the Python half of its ops.

Importing this module tries to load the compiled extension, which registers ``torch.ops.saefast.grouped_mm``,
``native_sparse_decode``, ``native_sparse_decode_grad_values``, ``native_sparse_decode_grad_weight``,
``native_topk_encode`` and ``native_threshold_encode`` (CPU kernels always; CUDA kernels when it was built against a
CUDA torch). Their fake (meta) implementations — so ``torch.compile`` traces through them — are registered here;
their autograd formulas live in :mod:`saefast.ops` next to the Triton ones, which share the same contracts.

A missing or broken extension is never an import error: :func:`available` is False, :func:`why_unavailable` says
why, one ``RuntimeWarning`` says so at import, and the ``torch`` (and ``triton``) backends keep working.
"""

from __future__ import annotations

import warnings

import torch

_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as exc:  # not built (SAEFAST_NO_EXTENSION=1, a pure-Python install) or built for another torch
    _C = None
    _error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"saefast: the native extension saefast._C could not be loaded ({_error}); the 'native' backend is "
        f"unavailable and every op runs on the torch (or triton) backend. Rebuild it with "
        f"`pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=2,
    )


def available() -> bool:
    """Whether the extension loaded (its CPU ops then exist)."""
    return _C is not None


def why_unavailable() -> str | None:
    """The import error that kept the extension from loading, or None when it loaded."""
    return _error


def has_cuda() -> bool:
    """Whether the loaded extension has its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda())


def supports(device: torch.device) -> bool:
    """Whether the native ops run on ``device`` (CPU when built; CUDA when built with CUDA)."""
    return (device.type == "cpu" and available()) or (device.type == "cuda" and has_cuda())


if _C is not None:

    @torch.library.register_fake("saefast::grouped_mm")
    def _(a, b, trans_a, trans_b):
        out = []
        for lhs, rhs in zip(a, b):
            rows = lhs.shape[1] if trans_a else lhs.shape[0]
            cols = rhs.shape[0] if trans_b else rhs.shape[1]
            out.append(lhs.new_empty((rows, cols)))
        return out

    @torch.library.register_fake("saefast::native_sparse_decode")
    def _(values, indices, W_dec, alpha, bias, mask, per_member):
        N, J, _ = values.shape
        return W_dec.new_empty((N, J, W_dec.shape[2]) if per_member else (N, W_dec.shape[2]))

    @torch.library.register_fake("saefast::native_sparse_decode_grad_values")
    def _(grad_out, indices, W_dec, alpha, mask):
        return indices.new_empty(indices.shape, dtype=torch.float32)

    @torch.library.register_fake("saefast::native_sparse_decode_grad_weight")
    def _(grad_out, values, indices, n_latents, alpha, mask, deterministic):
        return values.new_empty((values.shape[1], n_latents, grad_out.shape[-1]), dtype=torch.float32)

    @torch.library.register_fake("saefast::native_sparse_decode_backward")
    def _(grad_out, values, indices, W_dec, alpha, mask):
        return (indices.new_empty(indices.shape, dtype=torch.float32),
                W_dec.new_empty(W_dec.shape, dtype=torch.float32))

    @torch.library.register_fake("saefast::native_topk_encode")
    def _(x, W_enc, bias, k, dead, aux_k):
        N, J = x.shape[0], W_enc.shape[0]
        a = aux_k if dead is not None else 0
        return (x.new_empty((N, J, k), dtype=torch.float32), x.new_empty((N, J, k), dtype=torch.int64),
                x.new_empty((N, J, a), dtype=torch.float32), x.new_empty((N, J, a), dtype=torch.int64))

    @torch.library.register_fake("saefast::native_threshold_encode")
    def _(x, W_enc, bias, lower, capacity):
        N, J = x.shape[0], W_enc.shape[0]
        return (x.new_empty((N, J, capacity), dtype=torch.float32),
                x.new_empty((N, J, capacity), dtype=torch.int64),
                x.new_empty((N, J), dtype=torch.int64), x.new_empty((), dtype=torch.bool))
