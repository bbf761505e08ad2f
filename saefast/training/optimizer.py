"""The trainer's optimizer: ``torch.optim.Adam`` whose step runs one fused pass per parameter
(:func:`saefast.ops.adam_step_`), and for the decoder the gradient projection → Adam → renormalisation in that pass."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from ..models import ALL_MEMBERS, SparseDictionary

_PLAIN_ADAM = {"amsgrad": False, "weight_decay": 0, "maximize": False, "differentiable": False,
               "capturable": False, "decoupled_weight_decay": False}
"""The Adam settings the fused step implements (an SAEAdam never sets others; a loaded state dict might)."""


def _scalar_dtype() -> torch.dtype:
    """The dtype of Adam's step counter (torch.optim.optimizer._get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _step_count(step: torch.Tensor) -> float:
    """Adam's step counter: a host tensor on every device (torch.optim.Adam's, not fused or capturable), so reading
    it never waits on a GPU."""
    return float(step.item())


class SAEAdam(torch.optim.Adam):
    """Adam over ``model.parameters()`` whose step is one fused kernel pass per parameter, restricted to ``members``.

    For each parameter ``p`` with a gradient, at step count ``t`` (its ``state["step"]`` after incrementing)::

        m ← lerp(m, g, 1 − β1);   v ← β2·v + (1 − β2)·g²
        p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

    exactly ``torch.optim.Adam``'s update (amsgrad, weight decay and maximize off). :meth:`step` with
    ``normalize_decoder=True`` (and ``model.cfg.normalize_decoder``) also does, in the same pass over each decoder
    row ``w`` of ``W_dec``, ``g ← g − (g·ŵ)ŵ`` before the update and ``w ← w / ‖w‖`` after it — what
    :func:`saefast.training.training_step` did as three passes (``project_decoder_grad_``, ``optimizer.step()``,
    ``normalize_decoder_``). Only the ``members`` views of each parameter (and of its moments) are read or written:
    the rest — other stages of a boosting chain — stays untouched bit for bit.

    Backends (:func:`saefast.ops.adam_step_`): ``native`` on the CPU, ``triton`` on CUDA, ``torch`` (torch's own
    ops, in the order of its single-tensor Adam) elsewhere or for non-fp32 / non-contiguous parameters. On the CPU the
    fused native step is faster than the three-pass sequence with ``torch.optim.Adam(fused=True)``, so ``auto``
    picks it there: for the ``cpu`` bench preset's parameters (``W_enc``, ``W_dec`` 8 × 4096 × 512 fp32 and the
    biases), 2 threads, median of 9 interleaved rounds: 61 ms, against 105 ms for the native projection +
    ``Adam(fused=True)`` + renormalisation, 266 ms with ``Adam(foreach=True)`` and 305 ms with the default
    (single-tensor) ``Adam`` (a run on the shared machine when it ran faster: 25, 37, 106 and 136 ms).

    The state is ``torch.optim.Adam``'s, key for key (``step`` a 0-d fp32 CPU tensor, ``exp_avg``, ``exp_avg_sq``),
    and so is the state dict: checkpoints written with either optimizer load into the other.
    """

    def __init__(self, model: SparseDictionary, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, backend: str | None = None):
        super().__init__(model.parameters(), lr=lr, betas=betas, eps=eps)
        self.model = model
        self.backend = backend

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, members: slice = ALL_MEMBERS,
             normalize_decoder: bool = False, backend: str | None = None) -> float | None:
        """One Adam step of the parameters of ``members`` (see the class docstring); with ``normalize_decoder``
        the decoder rows' projection and renormalisation in the same pass. ``backend``: this call's backend
        (default: the one given at construction, else the current one), resolved per device like every op's."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        backend = self.backend if backend is None else backend
        model = self.model
        unit_decoder = normalize_decoder and model.cfg.normalize_decoder
        for group in self.param_groups:
            unsupported = {k: group.get(k) for k, plain in _PLAIN_ADAM.items() if group.get(k, plain) != plain}
            if unsupported:
                raise ValueError(f"SAEAdam implements plain Adam; this parameter group sets {unsupported}")
            beta1, beta2 = group["betas"]
            lr, eps = float(group["lr"]), float(group["eps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SAEAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:  # as torch.optim.Adam initialises it (_init_group, not fused or capturable)
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                views = [model.member_part(t, members)
                         for t in (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                resolved = ops.resolve_backend(backend, p.device)
                if resolved != "torch" and not all(v.dtype == torch.float32 and v.is_contiguous() for v in views):
                    resolved = "torch"  # the fused passes take fp32 tensors laid out as a whole or a member slice
                ops.adam_step_(*views, _step_count(state["step"]), lr, float(beta1), float(beta2), eps,
                               unit_rows=unit_decoder and p is model.W_dec, backend=resolved)
        return loss
