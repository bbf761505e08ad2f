"""One fused Adam step per parameter, and for decoder rows the projection → Adam → renormalisation in one pass.

``p ← p − (lr/bc1)·m/(√v/√bc2 + ε)`` after ``m ← lerp(m, g, 1 − β1)``, ``v ← β2·v + (1 − β2)·g²`` (torch.optim.Adam),
with ``unit_rows`` the gradient projected off each row first and the row renormalised after.
Kernels: ``kernels/saefast_triton/adam_step.py`` (``triton``), ``csrc/cpu/adam_step.cpp`` (``native``); oracle
:func:`saefast.ops.ref.adam_step_`. The optimizer that drives it is :class:`saefast.training.optimizer.SAEAdam`.
"""

from __future__ import annotations

import torch

from . import native, ref
from .backend import resolve_backend
from .registration import triton_custom_op


def _adam_step_impl(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    lr: float, beta1: float, beta2: float, eps: float, bias_correction1: float,
                    bias_correction2: float, unit_rows: bool) -> None:
    from ..kernels.adam_step import adam_step_ as fused

    fused(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, bias_correction1, bias_correction2, unit_rows)


def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, bias_correction1, bias_correction2,
                    unit_rows):
    return None


_triton_adam_step = triton_custom_op("saefast::adam_step_", _adam_step_impl, _adam_step_fake,
                                     mutates_args=("param", "grad", "exp_avg", "exp_avg_sq"))


@native.on_load
def _register_native() -> None:
    torch.library.register_fake("saefast::native_adam_step_")(_adam_step_fake)


def _check(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
           beta1: float, beta2: float, unit_rows: bool) -> None:
    """What every backend requires (the fused ones check fp32 and contiguity themselves): ValueError if not."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"adam_step_: param, grad, exp_avg and exp_avg_sq must have one shape; got {name} "
                             f"{tuple(t.shape)} for param {tuple(param.shape)}")
        if t.device != param.device:
            raise ValueError(f"adam_step_: {name} is on {t.device} but param is on {param.device}")
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_floating_point():
            raise ValueError(f"adam_step_: {name} must be a floating tensor (float32 for the fused backends); got "
                             f"{t.dtype}")
    if int(step) < 1:
        raise ValueError(f"adam_step_: step is the step count after incrementing, ≥ 1; got {step}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"adam_step_: betas must be in [0, 1); got ({beta1}, {beta2})")
    if unit_rows and param.dim() < 1:
        raise ValueError("adam_step_: unit_rows needs rows [..., D]; got a 0-d tensor")


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
               lr: float, beta1: float, beta2: float, eps: float, unit_rows: bool = False,
               backend: str | None = None) -> None:
    """In place, ``torch.optim.Adam``'s update of one parameter (amsgrad, weight decay and maximize off) at step
    count ``step`` (≥ 1, already incremented)::

        m ← lerp(m, g, 1 − β1)                      # exp_avg
        v ← β2·v + (1 − β2)·g²                      # exp_avg_sq
        p ← p − (lr / bc1) · m / (√v / √bc2 + ε)    # bc1 = 1 − β1^step, bc2 = 1 − β2^step, in double on the host

    With ``unit_rows`` (decoder rows ``[..., D]``), each row ``w`` in the same pass: first
    ``g ← g − (g·ŵ)ŵ`` with ``ŵ = w / max(‖w‖, 1e-12)`` (written back to ``grad``;
    :func:`saefast.ops.remove_parallel_grad_`), then the step, then ``w ← w / max(‖w‖, 1e-12)``
    (:func:`saefast.ops.ref.normalize_rows_`): what the training step did as three passes over the decoder.

    ``native``: ``csrc/cpu/adam_step.cpp`` (CPU; CUDA tensors take the torch path: the extension has no CUDA
    kernel for it); ``triton``: :mod:`saefast.kernels.adam_step`; both need fp32 tensors, contiguous (a whole
    parameter or a member slice of one), and read and write each of ``p, g, m, v`` once. ``torch``:
    :func:`saefast.ops.ref.adam_step_`, torch's own ops in torch's order (~10 passes), any float dtype and strides.
    ValueError for mismatched shapes or devices, non-float tensors, ``step < 1``, betas outside ``[0, 1)``.
    """
    _check(param, grad, exp_avg, exp_avg_sq, step, beta1, beta2, unit_rows)
    backend = resolve_backend(backend, param.device)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    args = (param, grad, exp_avg, exp_avg_sq, float(lr), float(beta1), float(beta2), float(eps),
            float(bias_correction1), float(bias_correction2), bool(unit_rows))
    if backend == "triton":
        _triton_adam_step(*args)
    elif backend == "native" and param.device.type == "cpu" and native.available():
        torch.ops.saefast.native_adam_step_(*args)
    else:
        ref.adam_step_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, unit_rows)
