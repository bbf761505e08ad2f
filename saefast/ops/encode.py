"""The encoders: pre-activations → activation → sparse codes, fused so that the ``N × J·M`` pre-activations never
reach memory on the ``triton`` and ``native`` backends.

* :func:`topk_encode` (and AuxK's top-k among dead latents), :func:`batchtopk_encode` (training) and
  :func:`threshold_encode` (BatchTopK inference) on the fused top-k;
* :func:`jumprelu_encode` on the fused threshold encode; :func:`relu_encode` (``torch`` only, dense codes).

Kernels: ``kernels/saefast_triton/topk_encode.py`` (``triton``), ``csrc/cpu/encode.cpp`` (``native``); oracle:
:mod:`saefast.ops.ref`. The backward gives gradient only to the selected latents, through the sparse decode
kernels with ``W_enc`` in the decoder's place. BatchTopK and JumpReLU work on a bounded number of candidates per
row; a batch those might not cover exactly is recomputed on the dense eager path, so the result never differs from
the reference. BatchTopK's default capacity then adapts to the batches, silently (:class:`_AdaptiveCapacity`); a
capacity given by the caller, and JumpReLU's, warn once instead.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import native, ref
from .backend import resolve_backend
from .codes import SparseCodes
from .decode import decode_kernels
from .registration import FusedKernels, triton_custom_op
from .topk_chunks import dead_latents, topk_over_latents

BATCHTOPK_CAPACITY = 4
"""Starting candidates per row of the fused BatchTopK, as a multiple of ``k`` (``kc = min(M, capacity·k)``); the
default capacity adapts from there (see :class:`_AdaptiveCapacity`). Set ``saefast.ops.encode.BATCHTOPK_CAPACITY``
(this module's name: ``saefast.ops.BATCHTOPK_CAPACITY`` is a copy) to change the start."""

JUMPRELU_MIN_CAPACITY = 64
"""Default slots per row of the fused JumpReLU: ``min(M, max(JUMPRELU_MIN_CAPACITY, M // JUMPRELU_CAPACITY_DIVISOR))``
(see :func:`jumprelu_capacity`)."""

JUMPRELU_CAPACITY_DIVISOR = 16

_capacity_warned = False

_CAPACITY_HEADROOM = 1.5
"""A grown BatchTopK capacity gives the largest row seen at least this much room (batches vary)."""

_CAPACITY_WINDOW = 50
"""Calls after which a grown BatchTopK capacity is cut back to what they needed (with the headroom)."""

_DENSE_FRACTION = 16
"""A BatchTopK capacity grown past ``M / _DENSE_FRACTION`` candidates runs the dense path instead. Measured on
``native`` (forward + backward, N = 1024, M = 4096, k = 16): the fused path costs 0.6× the dense one at
``kc = 4k``, 0.75× at ``M/16``, about 1× at ``M/8``; an overflowing batch (fused, then dense) 1.3×."""


class _AdaptiveCapacity:
    """The default capacity of the fused BatchTopK (training, ``what="batchtopk"``) or its threshold encode
    (inference, ``"threshold"``) for one ``(M, k, device type)``, as a multiple of ``k``.

    Why: BatchTopK keeps the batch's ``N·k`` largest activations, not ``k`` per row, so a row with a large norm keeps
    many more than ``k`` (by design). On inputs whose norms vary a lot (real activations; a fresh model's rows are
    uneven too) that is often more than the ``4k`` candidates of :data:`BATCHTOPK_CAPACITY`, and every such batch
    ran the fused path, found the overflow, and then ran the dense path as well.

    So: start at :data:`BATCHTOPK_CAPACITY`. A batch that overflows runs the exact dense path (nothing is ever
    dropped) and, from that batch's exact need (the most latents a row kept), the capacity doubles until ``kc``
    gives that need :data:`_CAPACITY_HEADROOM` room. Grown past ``M / _DENSE_FRACTION`` candidates, the fused path
    would cost about as much as the dense one, so the dense path runs directly. Every :data:`_CAPACITY_WINDOW`
    calls, a grown capacity is cut back to what those calls needed (with the headroom; never below the start), so
    an early transient does not cost for the rest of the run. The results are the same whatever the capacity (it
    only decides how much work the fused path does), so none of this warns. Shared by the models of a process
    with the same ``(M, k)``: a performance hint, never a result."""

    __slots__ = ("start", "capacity", "window_calls", "window_need")

    def __init__(self, start: int):
        self.start = self.capacity = start
        self.window_calls = self.window_need = 0

    def candidates(self, M: int, k: int) -> int | None:
        """``kc`` for the next call, or None: run the dense path (grown past ``M / _DENSE_FRACTION``)."""
        kc = min(M, self.capacity * k)
        return None if self.capacity > self.start and kc > M // _DENSE_FRACTION else kc

    def _fit(self, need: int, k: int) -> int:
        capacity = self.start
        while capacity * k < max(_CAPACITY_HEADROOM * need, need + 1):
            capacity *= 2
        return capacity

    def overflowed(self, need: int, k: int) -> None:
        """A batch's rows needed ``need`` candidates (its exact maximum), more than the fused path had: grow."""
        self.capacity = max(self.capacity, self._fit(need, k))
        self.window_calls = self.window_need = 0

    def observed(self, need: int, k: int) -> None:
        """A call that fitted (or ran dense) needed ``need`` candidates; at the end of a window, cut back."""
        self.window_calls += 1
        self.window_need = max(self.window_need, need)
        if self.window_calls >= _CAPACITY_WINDOW:
            self.capacity = min(self.capacity, self._fit(self.window_need, k))
            self.window_calls = self.window_need = 0


_adaptive: dict[tuple[str, int, int, str], _AdaptiveCapacity] = {}


def _adaptive_capacity(what: str, M: int, k: int, device: torch.device) -> _AdaptiveCapacity:
    key = (what, M, k, device.type)
    state = _adaptive.get(key)
    if state is None or state.start != BATCHTOPK_CAPACITY:  # (a changed BATCHTOPK_CAPACITY starts afresh)
        state = _adaptive[key] = _AdaptiveCapacity(_candidates_multiple(BATCHTOPK_CAPACITY))
    return state


def _topk_encode_impl(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, dead: torch.Tensor | None,
                      aux_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.topk_encode import topk_encode

    values, indices, aux_values, aux_indices = topk_encode(x, W_enc, bias, k, dead=dead, aux_k=aux_k)
    if aux_values is None:  # custom ops return tensors: an empty [N, J, 0] stands for "no AuxK"
        aux_values = values.new_empty((*values.shape[:2], 0))
        aux_indices = indices.new_empty((*indices.shape[:2], 0))
    return values, indices, aux_values, aux_indices


def _topk_encode_fake(x, W_enc, bias, k, dead, aux_k):
    N, J = x.shape[0], W_enc.shape[0]
    a = aux_k if dead is not None else 0
    return (x.new_empty((N, J, k), dtype=torch.float32), x.new_empty((N, J, k), dtype=torch.int64),
            x.new_empty((N, J, a), dtype=torch.float32), x.new_empty((N, J, a), dtype=torch.int64))


def _threshold_encode_impl(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, lower: torch.Tensor,
                           capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``pre > lower [J, M]`` as ``(values, indices, counts, overflow)`` (:func:`saefast.kernels.topk_encode.
    threshold_encode`, never raising: ``overflow`` says a row had more than ``capacity`` and was truncated)."""
    from ..kernels.topk_encode import threshold_encode

    return threshold_encode(x, W_enc, bias, lower, capacity, raise_on_overflow=False)


def _threshold_encode_fake(x, W_enc, bias, lower, capacity):
    N, J = x.shape[0], W_enc.shape[0]
    return (x.new_empty((N, J, capacity), dtype=torch.float32), x.new_empty((N, J, capacity), dtype=torch.int64),
            x.new_empty((N, J), dtype=torch.int64), x.new_empty((), dtype=torch.bool))


_triton_topk_encode = triton_custom_op("saefast::topk_encode", _topk_encode_impl, _topk_encode_fake)
_triton_threshold_encode = triton_custom_op("saefast::threshold_encode", _threshold_encode_impl,
                                            _threshold_encode_fake)


class EncodeKernels(NamedTuple):
    """One fused backend's encoders (the contracts of :mod:`saefast.kernels.topk_encode`)."""

    topk_encode: Callable[..., Any]
    threshold_encode: Callable[..., Any]


encode_kernels = FusedKernels(EncodeKernels(_triton_topk_encode, _triton_threshold_encode))
"""``encode_kernels(backend)``: the encoders of a resolved fused backend (``triton`` or ``native``)."""


def _encode_setup(ctx, inputs, output):
    x, W_enc, bias, k, dead, aux_k = inputs
    _, indices, _, aux_indices = output
    ctx.save_for_backward(x, W_enc, indices, aux_indices)
    ctx.bias_dtype = bias.dtype


def _scatter_backward(backend: str, ctx, x: torch.Tensor, W_enc: torch.Tensor, dpre: torch.Tensor,
                      idx: torch.Tensor, bias_dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """Gradients of an encode that returned the pre-activations at ``(n, j, idx[n, j, s])``, given their gradient
    ``dpre [N, J, S]``: ``dx[n] = Σ_{j,s} dpre·W_enc[j, idx]``, ``dW_enc[j, m] = Σ_{(n,s): idx = m} dpre·x[n]``,
    ``dbias[j, m] = Σ_{(n,s): idx = m} dpre`` — the decode kernels with ``W_enc`` in the decoder's place. A
    per-member input ``x [N, J, D]`` gets ``dx[n, j] = Σ_s dpre·W_enc[j, idx]`` and ``dW_enc`` reads ``x[n, j]``.
    Returns ``(grad_x, grad_W_enc, grad_bias)`` (None where ``ctx.needs_input_grad[0..2]`` is False)."""
    J, M, _ = W_enc.shape
    kernels = decode_kernels(backend)
    per_member = x.dim() == 3
    dpre = dpre.float().contiguous()
    idx = idx.contiguous()
    ones = torch.ones(J, dtype=torch.float32, device=x.device)
    grad_x = grad_W = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = kernels.sparse_decode(dpre, idx, W_enc, ones, None, None, per_member).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_W = kernels.grad_weight(x.float().contiguous(), dpre, idx, M, ones, None,
                                     torch.are_deterministic_algorithms_enabled())
        grad_W = grad_W.to(W_enc.dtype)
    if ctx.needs_input_grad[2]:
        flat = (idx + torch.arange(J, device=idx.device).view(1, J, 1) * M).reshape(-1)
        grad_bias = torch.zeros(J * M, dtype=torch.float32, device=x.device).index_add_(0, flat, dpre.reshape(-1))
        grad_bias = grad_bias.view(J, M).to(bias_dtype)
    return grad_x, grad_W, grad_bias


def _encode_backward(backend: str, ctx, grad_values, grad_indices, grad_aux_values, grad_aux_indices):
    """Only the selected latents get gradient (see :func:`_scatter_backward`), the top-k and AuxK slots together."""
    x, W_enc, indices, aux_indices = ctx.saved_tensors
    parts_g, parts_i = [], []
    if grad_values is not None:
        parts_g.append(grad_values)
        parts_i.append(indices)
    if grad_aux_values is not None and aux_indices.shape[-1] > 0:
        parts_g.append(grad_aux_values)
        parts_i.append(aux_indices)
    if not parts_g:
        return None, None, None, None, None, None
    grads = _scatter_backward(backend, ctx, x, W_enc, torch.cat(parts_g, -1), torch.cat(parts_i, -1), ctx.bias_dtype)
    return *grads, None, None, None


def _threshold_setup(ctx, inputs, output):
    x, W_enc, bias, lower, capacity = inputs
    _, indices, counts, _ = output
    ctx.save_for_backward(x, W_enc, indices, counts)
    ctx.bias_dtype = bias.dtype


def _threshold_backward(backend: str, ctx, grad_values, grad_indices, grad_counts, grad_overflow):
    """The scatter backward of :func:`_scatter_backward` on the returned slots; padding slots get no gradient."""
    x, W_enc, indices, counts = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None, None
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts.unsqueeze(-1)
    dpre = torch.where(valid, grad_values, torch.zeros_like(grad_values))
    return *_scatter_backward(backend, ctx, x, W_enc, dpre, indices, ctx.bias_dtype), None, None


def _register_autograd(backend: str, prefix: str) -> None:
    """Attach the formulas above, for ``backend``'s kernels, to its ops ``saefast::<prefix>topk_encode`` and
    ``saefast::<prefix>threshold_encode``."""
    torch.library.register_autograd(f"saefast::{prefix}topk_encode", functools.partial(_encode_backward, backend),
                                    setup_context=_encode_setup)
    torch.library.register_autograd(f"saefast::{prefix}threshold_encode",
                                    functools.partial(_threshold_backward, backend), setup_context=_threshold_setup)


_register_autograd("triton", "")


@native.on_load
def _register_native() -> None:
    torch.library.register_fake("saefast::native_topk_encode")(_topk_encode_fake)
    torch.library.register_fake("saefast::native_threshold_encode")(_threshold_encode_fake)
    encode_kernels.native = EncodeKernels(torch.ops.saefast.native_topk_encode,
                                          torch.ops.saefast.native_threshold_encode)
    _register_autograd("native", "native_")


def folded_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``b_enc − W_enc·b_dec`` ``[J, M]``, so that ``pre = x·W_encᵀ + bias`` equals ``W_enc(x − b_dec) + b_enc``."""
    J, _, D = W_enc.shape
    if W_enc.device.type == "cpu":
        return _FoldedBias.apply(W_enc, b_enc, b_dec)
    return b_enc - torch.einsum("jd,jmd->jm", b_dec.expand(J, D), W_enc)


class _FoldedBias(torch.autograd.Function):
    """:func:`folded_bias` on the CPU: one GEMV per member, forward and backward.

    Per member because a batched GEMV picks its kernel from ``J``, so a member's bias gradient would change in the
    last bits with the number of members in the call, and member-parallel training would not give the
    single-process model bit for bit. As a Function because autograd through ``W_enc[j]`` builds, per member, a
    zero gradient of the whole ``W_enc`` and adds it in: ``J`` times the parameter's traffic. Backward:
    ``dW_enc[j] = −g_j ⊗ b_dec[j]``, ``db_enc = g``, ``db_dec[j] = −W_enc[j]ᵀ g_j`` (summed over ``j`` when shared).
    """

    @staticmethod
    def forward(ctx, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        J, _, D = W_enc.shape
        shared = b_dec.expand(J, D)
        ctx.save_for_backward(W_enc, b_dec)
        return b_enc - torch.stack([torch.mv(W_enc[j], shared[j]) for j in range(J)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        W_enc, b_dec = ctx.saved_tensors
        J, _, D = W_enc.shape
        grad_W = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_W = torch.neg(grad).unsqueeze(-1) * b_dec.expand(J, D).unsqueeze(1)
        if ctx.needs_input_grad[2]:
            grad_b_dec = folded_bias_grad_b_dec(W_enc, grad, b_dec.shape[0])
        return grad_W, grad if ctx.needs_input_grad[1] else None, grad_b_dec


def folded_bias_grad_b_dec(W_enc: torch.Tensor, grad: torch.Tensor, b_dec_rows: int) -> torch.Tensor:
    """The gradient of :func:`folded_bias` w.r.t. ``b_dec`` given its gradient ``grad [J, M]``:
    ``db_dec[j] = −W_enc[j]ᵀ grad[j]`` ``[J, D]``, summed over ``j`` to ``[1, D]`` when ``b_dec`` is shared
    (``b_dec_rows = 1``). One GEMV per member on the CPU (see :func:`folded_bias`), one batched product elsewhere."""
    J = W_enc.shape[0]
    if W_enc.device.type == "cpu":
        grad_b_dec = torch.stack([torch.mv(W_enc[j].t(), grad[j]) for j in range(J)]).neg_()
    else:
        grad_b_dec = torch.einsum("jmd,jm->jd", W_enc, grad).neg_()
    return grad_b_dec.sum(0, keepdim=True) if b_dec_rows != J else grad_b_dec


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
    dead: torch.Tensor | None = None, aux_k: int = 0, backend: str | None = None, max_dead: int | None = None,
) -> tuple[SparseCodes, SparseCodes | None]:
    """TopK codes of ``x [N, D]``: ``values = ReLU(top-k of pre[n, j, :])`` with ``pre = W_enc(x − b_dec) + b_enc``,
    and (``dead [J, M]`` given) the AuxK codes: ``ReLU`` of the top ``aux_k`` pre-activations among dead latents
    (fewer where a member has fewer dead latents: those slots are 0). Differentiable in every input tensor.

    ``x`` may also be ``[N, J, D]``, one input per member, on ``torch`` and ``native`` (see
    :func:`per_member_inputs`). ``backend``: see :func:`saefast.ops.resolve_backend` (None: the current choice).

    ``triton`` keeps its running top-k in registers, which bounds ``k`` (512 for fp16/bf16, 256 for fp32:
    :func:`saefast.kernels.topk_encode.max_k`) and, in the same pass, AuxK (``max(k, aux_k) ≤ 256``). Past them
    the codes come from :func:`topk_over_latents` (chunks of latents, a running ``torch.topk``), and AuxK from the
    same over the dead latents alone (:func:`dead_latents`) — e.g. AuxK's default ``aux_k = d/2``; the results
    are the same. ``max_dead``: the largest number of dead latents in a member, when the caller knows it (saves
    :func:`dead_latents` a host sync); it may be larger than the true count.
    """
    backend = resolve_backend(backend, x.device, "topk")
    M = W_enc.shape[1]
    if backend == "torch":
        pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
        codes = ref.topk_codes(pre, k)
        if dead is None or aux_k == 0:
            return codes, None
        masked = pre.masked_fill(~dead.unsqueeze(0), float("-inf"))
        return codes, ref.topk_codes(masked, aux_k)
    aux_k = aux_k if dead is not None else 0
    fused_k, fused_aux_k = k, aux_k
    bias = folded_bias(W_enc, b_enc, b_dec).float()
    x, W_enc = _autocast_operands(backend, x, W_enc)
    if backend == "triton":
        from ..kernels.topk_encode import max_k

        if aux_k and max(k, aux_k) > max_k(W_enc.dtype, with_aux=True):
            fused_aux_k = 0
        if k > max_k(W_enc.dtype, with_aux=False):
            fused_k = 0
    x, W_enc, bias = x.contiguous(), W_enc.contiguous(), bias.contiguous()
    if fused_k:
        values, indices, aux_values, aux_indices = encode_kernels(backend).topk_encode(
            x, W_enc, bias, k, dead if fused_aux_k else None, fused_aux_k)
    else:
        values, indices = topk_over_latents(x, W_enc, bias, k)
        aux_values = aux_indices = values.new_empty((*values.shape[:2], 0))
    if aux_k and not fused_aux_k:
        aux_values, aux_indices = topk_over_latents(x, W_enc, bias, aux_k, dead_latents(dead, max_dead))
    codes = SparseCodes(torch.relu(values), indices, M)
    if aux_values.shape[-1] == 0:
        return codes, None
    return codes, SparseCodes(torch.relu(aux_values), aux_indices, M)


def _autocast_operands(backend: str, x: torch.Tensor, W_enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder GEMM's operands as ``torch.autocast`` would give them to a matmul: in the autocast dtype when it
    is enabled for their device (the trainer's bf16 autocast on CUDA), else as they are. Custom ops are not
    autocast-aware, so without this the Triton encode would run fp32 FMA dots under autocast where the torch
    backend runs bf16 tensor-core ones. The cast is differentiable (fp32 master weights get fp32 gradients);
    the kernel accumulates in fp32 either way. Triton only: the native CPU kernels take fp32."""
    device_type = x.device.type
    if backend != "triton" or device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, W_enc
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), W_enc.to(dtype)


def _candidates_multiple(capacity: Any) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    return capacity


def _candidates(M: int, k: int, capacity: int) -> int:
    """Candidates per row of the fused BatchTopK: ``kc = min(M, capacity·k)``."""
    return min(M, _candidates_multiple(capacity) * k)


def _warn_capacity(what: str, happened: str, knob: str, stacklevel: int = 3) -> None:
    """Once per process: the fused ``what`` overflowed (``happened`` says how) and the batch ran the dense path;
    ``knob`` says what to change."""
    global _capacity_warned
    if not _capacity_warned:
        _capacity_warned = True
        warnings.warn(
            f"saefast: fused {what} exceeded its capacity: {happened}, so the batch was recomputed on the exact dense "
            f"path, which builds the [N, J, M] pre-activations: such a step costs about twice a fused one, more for "
            f"large M (the results are the same). If it recurs, {knob}. Shown once.",
            RuntimeWarning, stacklevel=stacklevel + 1,
        )


def _warn_batchtopk_capacity(what: str, kc: int, capacity: int) -> None:
    _warn_capacity(what, f"a row had more qualifying latents than its {kc} candidates (capacity={capacity})",
                   "pass a larger capacity=, or none: the default capacity adapts to the batches", stacklevel=4)


def _dense_aux(pre: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> SparseCodes | None:
    if dead is None or aux_k == 0:
        return None
    return ref.topk_codes(pre.masked_fill(~dead.unsqueeze(0), float("-inf")), aux_k)


def batchtopk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
    dead: torch.Tensor | None = None, aux_k: int = 0, capacity: int | None = None, backend: str | None = None,
    max_dead: int | None = None,
) -> tuple[SparseCodes, torch.Tensor, SparseCodes | None]:
    """BatchTopK (training) codes of ``x [N, D]``: per member the ``N·k`` largest of ``ReLU(pre[:, j, :])`` over the
    batch, exactly :func:`saefast.ops.ref.batchtopk_activation`. Returns ``(codes, smallest_kept [J], aux_codes)``;
    ``aux_codes`` (and ``max_dead``) as in :func:`topk_encode`. Differentiable in every input tensor.

    ``triton``, ``native``: candidates are each row's top ``kc = min(M, capacity·k)`` from the fused kernel; the
    codes are ``[N, J, kc]`` with 0 in the unkept slots. If a row's ``kc``-th candidate is kept with a positive
    value, that row might hold more qualifying latents: the batch is then recomputed on the dense eager path, so
    the result is always exact. ``capacity=None`` (default) adapts: it starts at :data:`BATCHTOPK_CAPACITY` and
    grows after an overflow (shrinking back later), with no warning (see :class:`_AdaptiveCapacity`); an int fixes
    it, and an overflow then warns once.
    """
    backend = resolve_backend(backend, x.device, "batchtopk")
    M = W_enc.shape[1]
    if backend == "torch":
        return _batchtopk_dense(x, W_enc, b_enc, b_dec, k, dead, aux_k)
    adaptive = _adaptive_capacity("batchtopk", M, k, x.device) if capacity is None else None
    if adaptive is None:
        kc = _candidates(M, k, capacity)
    else:
        kc = adaptive.candidates(M, k)
        if kc is None:  # grown past M / _DENSE_FRACTION candidates: the dense path is as cheap
            dense = _batchtopk_dense(x, W_enc, b_enc, b_dec, k, dead, aux_k)
            adaptive.observed(dense[0].k, k)  # (the packing already read its row maximum)
            return dense
    cand, aux = topk_encode(x, W_enc, b_enc, b_dec, kc, dead, aux_k, backend=backend,
                            max_dead=max_dead)  # ReLU'd, sorted descending
    N, J, _ = cand.values.shape
    flat = cand.values.transpose(0, 1).reshape(J, N * kc)
    kept = flat.detach().topk(N * k, dim=-1, sorted=False)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, kept.indices, True).view(J, N, kc).transpose(0, 1)
    if kc < M:
        positive = keep & (cand.values.detach() > 0)
        # One host read: the overflow flag (low bit) and the most candidates a row kept.
        packed = int(positive.sum(-1).max() * 2 + positive[..., -1].any()) if N else 0
        need, overflow = packed >> 1, bool(packed & 1)
        if overflow:
            dense = _batchtopk_dense(x, W_enc, b_enc, b_dec, k, dead, aux_k)
            if adaptive is None:
                _warn_batchtopk_capacity("BatchTopK", kc, capacity)
            else:
                adaptive.overflowed(dense[0].k, k)
            return dense
        if adaptive is not None:
            adaptive.observed(need, k)
    values = torch.where(keep, cand.values, torch.zeros_like(cand.values))
    positive = kept.values.masked_fill(kept.values <= 0, float("inf"))
    smallest = positive.min(dim=-1).values
    smallest = torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)
    return SparseCodes(values, cand.indices, M), smallest, aux


def _batchtopk_dense(x, W_enc, b_enc, b_dec, k, dead, aux_k) -> tuple[SparseCodes, torch.Tensor, SparseCodes | None]:
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    z, smallest = ref.batchtopk_activation(pre, k)
    return SparseCodes.from_dense(z), smallest, _dense_aux(pre, dead, aux_k)


def threshold_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, threshold: torch.Tensor, k: int,
    capacity: int | None = None, backend: str | None = None,
) -> SparseCodes:
    """BatchTopK inference codes ``z = pre·[pre > θ]`` (θ ``[J, M]`` ≥ 0), exactly
    :func:`saefast.ops.ref.threshold_activation`. Differentiable in ``x``, ``W_enc``, ``b_enc``, ``b_dec``.

    ``triton``, ``native``: the threshold is applied to each row's top ``kc = min(M, capacity·k)`` candidates
    (``[N, J, kc]`` codes, 0 in the slots below threshold). Latents outside the candidates are ≤ the ``kc``-th
    candidate, so a row whose ``kc``-th candidate exceeds the member's smallest threshold might miss some: the batch
    is then recomputed on the dense eager path. ``capacity`` as in :func:`batchtopk_encode` (None adapts, silently;
    an int is fixed and warns once on overflow).
    """
    backend = resolve_backend(backend, x.device, "batchtopk")
    M = W_enc.shape[1]
    adaptive = None
    if backend != "torch":
        adaptive = _adaptive_capacity("threshold", M, k, x.device) if capacity is None else None
        kc = _candidates(M, k, capacity) if adaptive is None else adaptive.candidates(M, k)
        if kc is not None:
            cand, _ = topk_encode(x, W_enc, b_enc, b_dec, kc, backend=backend)
            N = cand.values.shape[0]
            # ReLU'd candidates: with θ ≥ 0, ReLU(pre) > θ ⇔ pre > θ, and then ReLU(pre) = pre.
            raw = cand.values
            theta = threshold.to(raw.dtype).unsqueeze(0).expand(N, -1, -1).gather(-1, cand.indices)
            # need: the most candidates of a row above its member's smallest threshold (all kc: it may miss some)
            need = 0
            if kc < M and N:
                need = int((raw.detach() > threshold.to(raw.dtype).min(-1).values.unsqueeze(-1)).sum(-1).max())
            if need < kc or kc == M:
                if adaptive is not None:
                    adaptive.observed(need, k)
                return SparseCodes(torch.where(raw > theta, raw, torch.zeros_like(raw)), cand.indices, M)
            if adaptive is None:
                _warn_batchtopk_capacity("BatchTopK threshold", kc, capacity)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    codes = SparseCodes.from_dense(ref.threshold_activation(pre, threshold.to(pre.dtype)))
    if adaptive is not None:  # the exact need: the most latents of a row above its member's smallest threshold
        need = int((pre.detach() > threshold.to(pre.dtype).min(-1).values.view(1, -1, 1)).sum(-1).max())
        if kc is None:
            adaptive.observed(need, k)
        else:
            adaptive.overflowed(need, k)
    return codes


def jumprelu_capacity(M: int, capacity: int | None = None) -> int:
    """Slots per row of the fused JumpReLU: ``capacity`` if given (``1 ≤ capacity ≤ M``), else
    ``min(M, max(JUMPRELU_MIN_CAPACITY, M // JUMPRELU_CAPACITY_DIVISOR))``."""
    if capacity is None:
        return min(M, max(JUMPRELU_MIN_CAPACITY, M // JUMPRELU_CAPACITY_DIVISOR))
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= M:
        raise ValueError(f"capacity must be an int in [1, {M}], got {capacity!r}")
    return capacity


def jumprelu_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, log_threshold: torch.Tensor,
    bandwidth: float, capacity: int | None = None, backend: str | None = None,
) -> tuple[SparseCodes, torch.Tensor]:
    """JumpReLU codes of ``x [N, D]`` and the per-member L0 ``[J]``, exactly the dense reference:
    ``z = ref.jumprelu_activation(pre, θ, ε)`` and ``ref.jumprelu_l0(pre, θ, ε)`` with ``θ = exp(log_threshold)``
    ``[J, M]`` — forward values and straight-through gradients (in ``x``, ``W_enc``, ``b_enc``, ``b_dec`` and
    ``log_threshold``).

    ``triton``: the forward and every STE gradient involve only entries with ``pre > θ − ε/2`` (kept: ``pre > θ``;
    the band ``θ − ε/2 < pre ≤ θ`` where the rectangle kernel is non-zero); every other entry has ``z = 0`` and no
    gradient. The fused kernel returns exactly those entries (a hair more: the bound is lowered by one ulp, which
    only adds exact zeros), ``[N, J, capacity]`` slots per row (default :func:`jumprelu_capacity`), and the
    activation and L0 are applied to them alone; the dense ``N × J·M`` pre-activations are never built. A row with
    more such entries than ``capacity`` (e.g. early in training, while the thresholds are near 0) makes the call
    recompute the batch on the dense eager path, with a one-time warning: nothing is ever dropped.
    """
    backend = resolve_backend(backend, x.device, "jumprelu")
    M = W_enc.shape[1]
    theta = log_threshold.exp()
    if backend == "torch":
        return _jumprelu_dense(x, W_enc, b_enc, b_dec, theta, bandwidth)
    cap = jumprelu_capacity(M, capacity)
    bias = folded_bias(W_enc, b_enc, b_dec).float()
    lower = _jumprelu_lower(theta, bandwidth)  # rounding slack: only adds exact zeros
    x, W_enc = _autocast_operands(backend, x, W_enc)
    values, indices, counts, overflow = encode_kernels(backend).threshold_encode(
        x.contiguous(), W_enc.contiguous(), bias.contiguous(), lower.contiguous(), cap)
    if bool(overflow):
        _warn_capacity("JumpReLU", f"a row had more pre-activations above θ − ε/2 than its {cap} slots (common in "
                       f"the first steps, while the thresholds are near 0)",
                       "raise saefast.ops.encode.JUMPRELU_MIN_CAPACITY or pass jumprelu_encode(capacity=...)")
        return _jumprelu_dense(x, W_enc, b_enc, b_dec, theta, bandwidth)
    N = values.shape[0]
    valid = torch.arange(cap, device=values.device) < counts.unsqueeze(-1)
    theta_sel = theta.float().unsqueeze(0).expand(N, -1, -1).gather(-1, indices)  # θ's gradient scatters back
    z = ref.jumprelu_activation(values, theta_sel, bandwidth)
    z = torch.where(valid, z, torch.zeros_like(z))  # padding: no value, no gradient of any kind
    l0 = ref.jumprelu_l0(values.masked_fill(~valid, float("-inf")), theta_sel, bandwidth)
    return SparseCodes(z, indices, M), l0


def _jumprelu_lower(theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``θ − ε/2`` lowered by one ulp (fp32, no gradient): every entry the JumpReLU STE can touch is above it."""
    lower = theta.detach().float() - bandwidth / 2
    return torch.nextafter(lower, torch.full_like(lower, float("-inf")))


def _jumprelu_dense(x, W_enc, b_enc, b_dec, theta, bandwidth) -> tuple[SparseCodes, torch.Tensor]:
    """The dense reference, packed so that the band entries (``z = 0`` but a θ-gradient) keep their slots:
    ``SparseCodes.from_dense`` would drop them, and their straight-through gradient with them."""
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    z = ref.jumprelu_activation(pre, theta.to(pre.dtype), bandwidth)
    touched = pre.detach().float() > _jumprelu_lower(theta, bandwidth)
    k = min(max(int(touched.sum(-1).max()) if touched.numel() else 0, 1), pre.shape[-1])
    order = torch.argsort((~touched).to(torch.int8), dim=-1, stable=True)[..., :k]  # touched first, ascending
    return SparseCodes(z.gather(-1, order), order, pre.shape[-1]), ref.jumprelu_l0(pre.float(), theta.float(),
                                                                                   bandwidth)


def relu_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """ReLU codes ``z = max(pre, 0)``, dense ``[N, J, M]`` (most entries are non-zero: no sparse form pays off).
    ``torch`` only; its L1 penalty reads the dense codes."""
    resolve_backend(backend, x.device, "relu")
    return ref.relu_activation(ref.pre_activations(x, W_enc, b_enc, b_dec))


def per_member_inputs(encode, x: torch.Tensor, *args, **kwargs):
    """Run the encode op ``encode`` (:func:`topk_encode`, :func:`batchtopk_encode`, :func:`threshold_encode`,
    :func:`jumprelu_encode` or :func:`relu_encode`) on a shared input ``x [N, D]`` — one call, as is — or on one
    input per member, ``x [N, J, D]`` (bootstrap resamples, the residuals of boosting chains).

    On ``native`` and ``torch``, per-member inputs are one call (a grouped GEMM; one batched einsum). On ``triton``
    they run member by member: ``encode(x[:, j], *args_j, **kwargs_j)`` for ``j = 0 .. J−1``, where every tensor
    argument stacked on the member axis (leading size ``J``: ``W_enc [J, M, D]``, ``b_enc``, ``b_dec``,
    ``dead``, ``threshold``, ``log_threshold``) is sliced to ``[j : j+1]`` and everything else (a shared ``[1, D]``
    ``b_dec``, ints, floats, None, ``backend``) passes unchanged. The results are concatenated on the member axis:
    :class:`SparseCodes` by :meth:`SparseCodes.cat` (``K`` padded to the largest), per-member ``[J]`` tensors
    (``smallest_kept``, ``l0``) by ``torch.cat``; AuxK codes are None when every member's are.
    Each call reads its member's input ``x[:, j]``, so ``pre[n, j] = W_enc[j](x[n, j] − b_dec[j]) + b_enc[j]``.
    """
    if x.dim() == 2 or resolve_backend(kwargs.get("backend"), x.device) != "triton":
        return encode(x, *args, **kwargs)  # native: one grouped GEMM; torch: one batched einsum
    J = x.shape[1]

    def part(value, j):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == J:
            return value[j:j + 1]
        return value

    results = [encode(x[:, j], *(part(a, j) for a in args), **{k: part(v, j) for k, v in kwargs.items()})
               for j in range(J)]

    def join(parts):
        given = [p for p in parts if p is not None]
        if not given:
            return None
        if isinstance(given[0], SparseCodes):  # a member without AuxK codes gets one empty (value-0) slot
            empty = x.new_zeros((x.shape[0], 1, 1), dtype=torch.float32)
            return SparseCodes.cat([SparseCodes(empty, empty.long(), given[0].n_latents) if p is None else p
                                    for p in parts])
        return torch.cat(parts, 0)

    if isinstance(results[0], tuple):
        return tuple(join([r[i] for r in results]) for i in range(len(results[0])))
    return join(results)
