"""The sparse SAE ops behind the models, as ``torch.library`` custom ops, and the choice of backend.

Backends:

* ``torch`` — the eager reference (:mod:`saefast.ref`): dense pre-activations, ``torch.topk``,
  ``embedding_bag`` decode. Runs everywhere; the oracle of the others.
* ``triton`` — the kernels in :mod:`saefast.kernels`: encode→top-k fused (the ``N × J·M`` pre-activation
  matrix is never written), one-launch sparse decode and its sparse backward. CUDA tensors (or any tensors
  under ``TRITON_INTERPRET=1``, which is how the CPU tests run them). Activations ``topk``, ``batchtopk`` and
  ``jumprelu`` (``relu`` needs the torch backend).
* ``native`` — the C++/CUDA extension ``saefast._C`` (``csrc/``, :mod:`saefast.native`): on the CPU, the encoder
  GEMM tiled with a running top-k / threshold (the ``N × J·M`` pre-activations never exist), OpenMP sparse decode
  and sparse backward; the same activations as ``triton``. Also :func:`grouped_mm`. The fastest CPU path.
* ``auto`` — ``triton`` for CUDA tensors when Triton is importable; ``native`` for CPU tensors when the extension
  is built and the activation is fused; else ``torch``.

The choice, most specific first: a ``backend=`` argument (``encode``, ``reconstruct``, ``train``), the innermost
``with saefast.use_backend(name):``, else ``auto``. The Triton ops are registered as ``torch.ops.saefast.*``
with fake (meta) implementations and autograd formulas, so ``torch.compile`` traces through them; the native ops
(``torch.ops.saefast.native_*``, same contracts) get the same autograd formulas here.

BatchTopK on ``triton`` (:func:`batchtopk_encode`, :func:`threshold_encode`) works on *candidates*: the fused
kernel returns each row's top ``kc = min(M, capacity·k)`` pre-activations (``capacity`` defaults to
:data:`BATCHTOPK_CAPACITY`), and the batch top-``N·k`` per member (training) or the threshold ``pre > θ``
(inference) is applied to those alone. That is exact unless a row could have had more qualifying latents than its
``kc`` candidates — training: the row's ``kc``-th (smallest) candidate was kept with a positive value; inference:
it exceeds the member's smallest threshold. Such a batch is never answered approximately: the call recomputes it
exactly on the dense eager path (:mod:`saefast.ref`, building the ``N × J·M`` pre-activations) and warns once
that the capacity was exceeded. Raise ``capacity`` if that warning shows up often.

JumpReLU on ``triton`` (:func:`jumprelu_encode`): the fused kernel returns every pre-activation above ``θ − ε/2``
— all that the forward and the straight-through gradients (of the codes and of the L0 penalty) depend on — and the
activation and L0 are applied to those alone, so the result equals the dense reference. A row with more of them
than the capacity falls back to the dense eager path the same way (one warning).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from . import native, ref
from .codes import SparseCodes

BACKENDS = ("auto", "torch", "triton", "native")

FUSED_ACTIVATIONS = ("topk", "batchtopk", "jumprelu")
"""The activations the ``triton`` backend implements."""

BATCHTOPK_CAPACITY = 4
"""Default candidates per row of the fused BatchTopK, as a multiple of ``k`` (``kc = min(M, capacity·k)``)."""

JUMPRELU_MIN_CAPACITY = 64
"""Default slots per row of the fused JumpReLU: ``min(M, max(JUMPRELU_MIN_CAPACITY, M // JUMPRELU_CAPACITY_DIVISOR))``
(see :func:`jumprelu_capacity`)."""

JUMPRELU_CAPACITY_DIVISOR = 16

_capacity_warned = False

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("saefast_backend", default="auto")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with saefast.use_backend("triton"): ...`` — the backend of every op inside (unless an op names its own)."""
    token = _backend.set(_check_name(name))
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    """The backend chosen by the innermost :func:`use_backend` (``"auto"`` outside any)."""
    return _backend.get()


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it: importing fixes its interpreter mode)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str | None, device: torch.device, activation: str = "topk") -> str:
    """The backend that will run: ``name`` (or the current one) with ``auto`` resolved for ``device``.

    ``triton`` needs Triton, CUDA tensors (or ``TRITON_INTERPRET=1``) and an activation in :data:`FUSED_ACTIVATIONS`;
    ``native`` needs the built extension (CPU tensors, or CUDA ones when built with CUDA) and such an activation.
    ``auto`` picks ``triton`` on CUDA, ``native`` on the CPU, and falls back to ``torch`` where either is missing;
    an explicit ``triton`` or ``native`` that cannot run raises ValueError saying why.
    """
    name = _check_name(current_backend() if name is None else name)
    fused = activation in FUSED_ACTIVATIONS
    if name == "auto":
        if fused and device.type == "cuda" and triton_available():
            return "triton"
        if fused and native.supports(device):
            return "native"
        return "torch"
    if name == "native":
        if not native.available():
            raise ValueError(f"backend 'native' needs the compiled extension saefast._C, which did not load "
                             f"({native.why_unavailable()}); rebuild with `pip install --no-build-isolation -e .` "
                             f"or use backend 'torch'")
        if not native.supports(device):
            raise ValueError(f"backend 'native' was built without kernels for {device.type} tensors; use 'triton' "
                             f"or 'torch'")
        if not fused:
            raise ValueError(f"backend 'native' implements the topk, batchtopk and jumprelu activations, not "
                             f"{activation!r}; use backend 'torch'")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not _interpreting() and not _compiling_only(device):
            raise ValueError(f"backend 'triton' runs on CUDA tensors, got {device.type} ones (set "
                             f"TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)")
        if not fused:
            raise ValueError(f"backend 'triton' implements the topk, batchtopk and jumprelu activations, not "
                             f"{activation!r}; use backend 'torch'")
    return name


# ------------------------------------------------------------------------------------------------------
# Custom ops (Triton implementations; imported lazily so that saefast never needs triton to import)
# ------------------------------------------------------------------------------------------------------


def _compiling_only(device: torch.device) -> bool:
    """Meta tensors inside :func:`saefast.kernels.compile_only.compile_for` (kernels compiled, never run)."""
    if device.type != "meta":
        return False
    from .kernels import compile_only

    return compile_only.active()


def _triton_op(name: str, impl, fake, mutates_args: tuple[str, ...] = ()):
    """The custom op ``name`` running ``impl`` (a Triton launcher), with ``fake`` as its fake implementation.

    Meta tensors get ``fake`` too (shapes only), except inside :func:`saefast.kernels.compile_only.compile_for`:
    there they go through ``impl``, whose launcher then compiles its kernel for the chosen GPU instead of running it
    — how ``bench/gpu_build.py`` builds every kernel of a whole training step, at its real shapes, without a GPU.
    """
    op = torch.library.custom_op(name, impl, mutates_args=mutates_args)
    op.register_fake(fake)

    def meta(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return (impl if _compiling_only(tensors[0].device) else fake)(*args)

    op.register_kernel("meta", meta)
    return op


def _sparse_decode_impl(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, alpha: torch.Tensor,
                        bias: torch.Tensor | None, mask: torch.Tensor | None, per_member: bool) -> torch.Tensor:
    from .kernels.sparse_decode import sparse_decode

    return sparse_decode(values, indices, W_dec, alpha, bias=bias, mask=mask, per_member=per_member)


def _sparse_decode_fake(values, indices, W_dec, alpha, bias, mask, per_member):
    N, J, _ = values.shape
    shape = (N, J, W_dec.shape[2]) if per_member else (N, W_dec.shape[2])
    return W_dec.new_empty(shape)


_sparse_decode = _triton_op("saefast::sparse_decode", _sparse_decode_impl, _sparse_decode_fake)


def _grad_values_impl(grad_out: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, alpha: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    from .kernels.sparse_decode_backward import sparse_decode_grad_values

    return sparse_decode_grad_values(grad_out, indices, W_dec, alpha, mask=mask)


def _grad_values_fake(grad_out, indices, W_dec, alpha, mask):
    return indices.new_empty(indices.shape, dtype=torch.float32)


_grad_values = _triton_op("saefast::sparse_decode_grad_values", _grad_values_impl, _grad_values_fake)


def _grad_weight_impl(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n_latents: int,
                      alpha: torch.Tensor, mask: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
    from .kernels.sparse_decode_backward import sparse_decode_grad_weight

    return sparse_decode_grad_weight(grad_out, values, indices, n_latents, alpha, mask=mask,
                                     deterministic=deterministic)


def _grad_weight_fake(grad_out, values, indices, n_latents, alpha, mask, deterministic):
    return values.new_empty((values.shape[1], n_latents, grad_out.shape[-1]), dtype=torch.float32)


_grad_weight = _triton_op("saefast::sparse_decode_grad_weight", _grad_weight_impl, _grad_weight_fake)


class _Kernels(NamedTuple):
    """One fused backend's ops (all with the contracts of the Triton kernels)."""

    sparse_decode: Any
    grad_values: Any
    grad_weight: Any
    topk_encode: Any
    threshold_encode: Any
    fused_backward: Any = None
    """``(grad_values, grad_weight)`` in one pass, where the backend has it (native on the CPU)."""


def _kernels(backend: str) -> _Kernels:
    """The ops of a resolved fused backend (``triton`` or ``native``)."""
    return _NATIVE if backend == "native" else _TRITON


def _decode_setup(ctx, inputs, output):
    values, indices, W_dec, alpha, bias, mask, per_member = inputs
    ctx.save_for_backward(values, indices, W_dec, alpha, mask)
    ctx.per_member = per_member
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _decode_backward(kernels: _Kernels, ctx, grad):
    values, indices, W_dec, alpha, mask = ctx.saved_tensors
    grad = grad.float().contiguous()
    grad_values = grad_W = grad_bias = None
    if (ctx.needs_input_grad[0] and ctx.needs_input_grad[2] and kernels.fused_backward is not None
            and grad.device.type == "cpu"):
        grad_values, grad_W = kernels.fused_backward(grad, values, indices, W_dec, alpha, mask)
        grad_values, grad_W = grad_values.to(values.dtype), grad_W.to(W_dec.dtype)
    elif ctx.needs_input_grad[0]:
        grad_values = kernels.grad_values(grad, indices, W_dec, alpha, mask).to(values.dtype)
    if ctx.needs_input_grad[2] and grad_W is None:
        grad_W = kernels.grad_weight(grad, values, indices, W_dec.shape[1], alpha, mask,
                                     torch.are_deterministic_algorithms_enabled()).to(W_dec.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)  # [D] combined, [J, D] per member
    return grad_values, None, grad_W, None, grad_bias, None, None


def _topk_encode_impl(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, dead: torch.Tensor | None,
                      aux_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.topk_encode import topk_encode

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


_topk_encode = _triton_op("saefast::topk_encode", _topk_encode_impl, _topk_encode_fake)


def _encode_setup(ctx, inputs, output):
    x, W_enc, bias, k, dead, aux_k = inputs
    _, indices, _, aux_indices = output
    ctx.save_for_backward(x, W_enc, indices, aux_indices)
    ctx.bias_dtype = bias.dtype


def _scatter_backward(kernels: _Kernels, ctx, x: torch.Tensor, W_enc: torch.Tensor, dpre: torch.Tensor,
                      idx: torch.Tensor, bias_dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """Gradients of an encode that returned the pre-activations at ``(n, j, idx[n, j, s])``, given their gradient
    ``dpre [N, J, S]``: ``dx[n] = Σ_{j,s} dpre·W_enc[j, idx]``, ``dW_enc[j, m] = Σ_{(n,s): idx = m} dpre·x[n]``,
    ``dbias[j, m] = Σ_{(n,s): idx = m} dpre`` — the decode kernels with ``W_enc`` in the decoder's place. A
    per-member input ``x [N, J, D]`` gets ``dx[n, j] = Σ_s dpre·W_enc[j, idx]`` and ``dW_enc`` reads ``x[n, j]``.
    Returns ``(grad_x, grad_W_enc, grad_bias)`` (None where ``ctx.needs_input_grad[0..2]`` is False)."""
    J, M, _ = W_enc.shape
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


def _encode_backward(kernels: _Kernels, ctx, grad_values, grad_indices, grad_aux_values, grad_aux_indices):
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
    grads = _scatter_backward(kernels, ctx, x, W_enc, torch.cat(parts_g, -1), torch.cat(parts_i, -1), ctx.bias_dtype)
    return *grads, None, None, None


def _threshold_encode_impl(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, lower: torch.Tensor,
                           capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ``pre > lower [J, M]`` as ``(values, indices, counts, overflow)`` (:func:`kernels.topk_encode.
    threshold_encode`, never raising: ``overflow`` says a row had more than ``capacity`` and was truncated)."""
    from .kernels.topk_encode import threshold_encode

    return threshold_encode(x, W_enc, bias, lower, capacity, raise_on_overflow=False)


def _threshold_encode_fake(x, W_enc, bias, lower, capacity):
    N, J = x.shape[0], W_enc.shape[0]
    return (x.new_empty((N, J, capacity), dtype=torch.float32), x.new_empty((N, J, capacity), dtype=torch.int64),
            x.new_empty((N, J), dtype=torch.int64), x.new_empty((), dtype=torch.bool))


_threshold_encode = _triton_op("saefast::threshold_encode", _threshold_encode_impl, _threshold_encode_fake)


def _threshold_setup(ctx, inputs, output):
    x, W_enc, bias, lower, capacity = inputs
    _, indices, counts, _ = output
    ctx.save_for_backward(x, W_enc, indices, counts)
    ctx.bias_dtype = bias.dtype


def _threshold_backward(kernels: _Kernels, ctx, grad_values, grad_indices, grad_counts, grad_overflow):
    """The scatter backward of :func:`_scatter_backward` on the returned slots; padding slots get no gradient."""
    x, W_enc, indices, counts = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None, None
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts.unsqueeze(-1)
    dpre = torch.where(valid, grad_values, torch.zeros_like(grad_values))
    return *_scatter_backward(kernels, ctx, x, W_enc, dpre, indices, ctx.bias_dtype), None, None


def _register_autograd(kernels: _Kernels, names: Sequence[str]) -> None:
    """Attach the autograd formulas above, bound to ``kernels``, to the ops called ``names`` (decode, topk encode,
    threshold encode)."""
    decode, topk, threshold = names
    torch.library.register_autograd(decode, functools.partial(_decode_backward, kernels), setup_context=_decode_setup)
    torch.library.register_autograd(topk, functools.partial(_encode_backward, kernels), setup_context=_encode_setup)
    torch.library.register_autograd(threshold, functools.partial(_threshold_backward, kernels),
                                    setup_context=_threshold_setup)


_TRITON = _Kernels(_sparse_decode, _grad_values, _grad_weight, _topk_encode, _threshold_encode)
_register_autograd(_TRITON, ("saefast::sparse_decode", "saefast::topk_encode", "saefast::threshold_encode"))

_NATIVE: _Kernels | None = None
if native.available():
    _native_ops = torch.ops.saefast
    _NATIVE = _Kernels(_native_ops.native_sparse_decode, _native_ops.native_sparse_decode_grad_values,
                       _native_ops.native_sparse_decode_grad_weight, _native_ops.native_topk_encode,
                       _native_ops.native_threshold_encode, _native_ops.native_sparse_decode_backward)
    _register_autograd(_NATIVE, ("saefast::native_sparse_decode", "saefast::native_topk_encode",
                                 "saefast::native_threshold_encode"))


# ------------------------------------------------------------------------------------------------------
# The functions the models call (dispatch on the backend)
# ------------------------------------------------------------------------------------------------------


def folded_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``b_enc − W_enc·b_dec`` ``[J, M]``, so that ``pre = x·W_encᵀ + bias`` equals ``W_enc(x − b_dec) + b_enc``."""
    J, _, D = W_enc.shape
    return b_enc - torch.einsum("jd,jmd->jm", b_dec.expand(J, D), W_enc)


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
    dead: torch.Tensor | None = None, aux_k: int = 0, backend: str = "triton", max_dead: int | None = None,
) -> tuple[SparseCodes, SparseCodes | None]:
    """TopK codes of ``x [N, D]``: ``values = ReLU(top-k of pre[n, j, :])`` with ``pre = W_enc(x − b_dec) + b_enc``,
    and (``dead [J, M]`` given) the AuxK codes: ``ReLU`` of the top ``aux_k`` pre-activations among dead latents
    (fewer where a member has fewer dead latents: those slots are 0). Differentiable in every input tensor.

    ``backend`` is an already resolved one (``torch``, ``triton`` or ``native``); see :func:`resolve_backend`.

    ``triton`` keeps its running top-k in registers, which bounds ``k`` (512 for fp16/bf16, 256 for fp32:
    :func:`saefast.kernels.topk_encode.max_k`) and, in the same pass, AuxK (``max(k, aux_k) ≤ 256``). Past them
    the codes come from :func:`topk_over_latents` (chunks of latents, a running ``torch.topk``), and AuxK from the
    same over the dead latents alone (:func:`dead_latents`) — e.g. AuxK's default ``aux_k = d/2``; the results
    are the same. ``max_dead``: the largest number of dead latents in a member, when the caller knows it (saves
    :func:`dead_latents` a host sync); it may be larger than the true count.
    """
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
        from .kernels.topk_encode import max_k

        if aux_k and max(k, aux_k) > max_k(W_enc.dtype, with_aux=True):
            fused_aux_k = 0
        if k > max_k(W_enc.dtype, with_aux=False):
            fused_k = 0
    x, W_enc, bias = x.contiguous(), W_enc.contiguous(), bias.contiguous()
    if fused_k:
        values, indices, aux_values, aux_indices = _kernels(backend).topk_encode(
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


CHUNK_LATENTS = 2048
"""Latents per chunk of :func:`topk_over_latents`."""


def dead_latents(dead: torch.Tensor, max_dead: int | None = None) -> torch.Tensor:
    """The dead latents of each member, ``[J, L]`` int64 in ascending order, padded with −1 to ``L`` = the largest
    count, or to ``max_dead`` when given (≥ every member's count; without it, one host sync: ``L`` is a shape)."""
    counts = dead.sum(-1)
    if max_dead is None:
        L = int(counts.max()) if dead.numel() else 0
    elif isinstance(max_dead, bool) or not isinstance(max_dead, int) or not 0 <= max_dead <= dead.shape[-1]:
        raise ValueError(f"max_dead must be an int in [0, {dead.shape[-1]}], got {max_dead!r}")
    else:
        L = max_dead
    order = torch.argsort((~dead).to(torch.int8), dim=-1, stable=True)[:, :L]  # dead first, ascending
    return torch.where(torch.arange(L, device=dead.device) < counts.unsqueeze(-1), order, -1)


def topk_over_latents(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                      latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``pre[n, j, m] = x[n]·W_enc[j, m] + bias[j, m]`` (fp32 products and sums) over the latents
    ``latents[j]`` (``[J, L]`` int64, −1 = padding; default: all ``M``), as ``(values [N, J, k] fp32 sorted
    descending, indices [N, J, k] int64)``: the contract of the fused kernel's top-k (or AuxK) outputs — slots past
    a member's number of latents hold ``-inf`` and index 0 — for any ``k``.

    The latents are swept in chunks of :data:`CHUNK_LATENTS` with a running ``torch.topk``, so at most
    ``N·J·(k + CHUNK_LATENTS)`` pre-activations exist at once, never the ``N × J·M`` matrix. Differentiable through
    torch autograd in ``x``, ``W_enc`` and ``bias`` (only the selected entries get gradient). Among equal values the
    order is ``torch.topk``'s.
    """
    N, D = x.shape
    J, M, _ = W_enc.shape
    L = M if latents is None else latents.shape[1]
    xf = x.float()
    values = torch.full((N, J, 0), float("-inf"), dtype=torch.float32, device=x.device)
    indices = torch.zeros((N, J, 0), dtype=torch.int64, device=x.device)
    for start in range(0, L, CHUNK_LATENTS):
        stop = min(start + CHUNK_LATENTS, L)
        if latents is None:
            chunk = torch.arange(start, stop, device=x.device).expand(J, -1)
            W, b = W_enc[:, start:stop], bias[:, start:stop]
        else:
            chunk = latents[:, start:stop]
            rows = chunk.clamp_min(0)
            W = W_enc.gather(1, rows.unsqueeze(-1).expand(-1, -1, D))
            b = bias.gather(1, rows).masked_fill(chunk < 0, float("-inf"))
        pre = torch.einsum("nd,jcd->njc", xf, W.float()) + b.float()
        values = torch.cat([values, pre], -1)
        indices = torch.cat([indices, chunk.clamp_min(0).unsqueeze(0).expand(N, -1, -1)], -1)
        top = values.topk(min(k, values.shape[-1]), dim=-1)
        values, indices = top.values, indices.gather(-1, top.indices)
    if values.shape[-1] < k:  # fewer latents than k: the kernel's padding
        pad = k - values.shape[-1]
        values = torch.cat([values, values.new_full((N, J, pad), float("-inf"))], -1)
        indices = torch.cat([indices, indices.new_zeros((N, J, pad))], -1)
    return values, indices


def _candidates(M: int, k: int, capacity: int) -> int:
    """Candidates per row of the fused BatchTopK: ``kc = min(M, capacity·k)``."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    return min(M, capacity * k)


def _warn_capacity(what: str, kc: int, capacity: int, knob: str = "saefast.ops.BATCHTOPK_CAPACITY") -> None:
    global _capacity_warned
    if not _capacity_warned:
        _capacity_warned = True
        warnings.warn(
            f"saefast: fused {what} exceeded its capacity ({kc} candidates per row, capacity={capacity}): a row may "
            f"have more qualifying latents than candidates, so the batch was recomputed exactly on the dense eager "
            f"path (slower). Raise the capacity ({knob}) if this recurs. Shown once.",
            RuntimeWarning, stacklevel=3,
        )


def _dense_aux(pre: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> SparseCodes | None:
    if dead is None or aux_k == 0:
        return None
    return ref.topk_codes(pre.masked_fill(~dead.unsqueeze(0), float("-inf")), aux_k)


def batchtopk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
    dead: torch.Tensor | None = None, aux_k: int = 0, capacity: int | None = None, backend: str = "triton",
    max_dead: int | None = None,
) -> tuple[SparseCodes, torch.Tensor, SparseCodes | None]:
    """BatchTopK (training) codes of ``x [N, D]``: per member the ``N·k`` largest of ``ReLU(pre[:, j, :])`` over the
    batch, exactly :func:`saefast.ref.batchtopk_activation`. Returns ``(codes, smallest_kept [J], aux_codes)``;
    ``aux_codes`` (and ``max_dead``) as in :func:`topk_encode`. Differentiable in every input tensor.

    ``triton``: candidates are each row's top ``kc = min(M, capacity·k)`` (``capacity`` default
    :data:`BATCHTOPK_CAPACITY`) from the fused kernel; the codes are ``[N, J, kc]`` with 0 in the unkept slots.
    If a row's ``kc``-th candidate is kept with a positive value, that row might hold more qualifying latents:
    the batch is then recomputed on the dense eager path (a one-time warning), so the result is always exact.
    """
    M = W_enc.shape[1]
    if backend == "torch":
        return _batchtopk_dense(x, W_enc, b_enc, b_dec, k, dead, aux_k)
    capacity = BATCHTOPK_CAPACITY if capacity is None else capacity
    kc = _candidates(M, k, capacity)
    cand, aux = topk_encode(x, W_enc, b_enc, b_dec, kc, dead, aux_k, backend=backend,
                            max_dead=max_dead)  # ReLU'd, sorted descending
    N, J, _ = cand.values.shape
    flat = cand.values.transpose(0, 1).reshape(J, N * kc)
    kept = flat.detach().topk(N * k, dim=-1, sorted=False)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, kept.indices, True).view(J, N, kc).transpose(0, 1)
    if kc < M:
        last = cand.values.detach()[..., -1]
        if bool((keep[..., -1] & (last > 0)).any()):
            _warn_capacity("BatchTopK", kc, capacity)
            return _batchtopk_dense(x, W_enc, b_enc, b_dec, k, dead, aux_k)
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
    capacity: int | None = None, backend: str = "triton",
) -> SparseCodes:
    """BatchTopK inference codes ``z = pre·[pre > θ]`` (θ ``[J, M]`` ≥ 0), exactly
    :func:`saefast.ref.threshold_activation`. Differentiable in ``x``, ``W_enc``, ``b_enc``, ``b_dec``.

    ``triton``: the threshold is applied to each row's top ``kc = min(M, capacity·k)`` candidates (``[N, J, kc]``
    codes, 0 in the slots below threshold). Latents outside the candidates are ≤ the ``kc``-th candidate, so a
    row whose ``kc``-th candidate exceeds the member's smallest threshold might miss some: the batch is then
    recomputed on the dense eager path (a one-time warning).
    """
    M = W_enc.shape[1]
    if backend != "torch":
        capacity = BATCHTOPK_CAPACITY if capacity is None else capacity
        kc = _candidates(M, k, capacity)
        cand, _ = topk_encode(x, W_enc, b_enc, b_dec, kc, backend=backend)
        N = cand.values.shape[0]
        # ReLU'd candidates: with θ ≥ 0, ReLU(pre) > θ ⇔ pre > θ, and then ReLU(pre) = pre.
        raw = cand.values
        theta = threshold.to(raw.dtype).unsqueeze(0).expand(N, -1, -1).gather(-1, cand.indices)
        if kc < M and bool((raw.detach()[..., -1] > threshold.to(raw.dtype).min(-1).values).any()):
            _warn_capacity("BatchTopK threshold", kc, capacity)
        else:
            return SparseCodes(torch.where(raw > theta, raw, torch.zeros_like(raw)), cand.indices, M)
    pre = ref.pre_activations(x, W_enc, b_enc, b_dec)
    return SparseCodes.from_dense(ref.threshold_activation(pre, threshold.to(pre.dtype)))


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
    bandwidth: float, capacity: int | None = None, backend: str = "triton",
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
    M = W_enc.shape[1]
    theta = log_threshold.exp()
    if backend == "torch":
        return _jumprelu_dense(x, W_enc, b_enc, b_dec, theta, bandwidth)
    cap = jumprelu_capacity(M, capacity)
    bias = folded_bias(W_enc, b_enc, b_dec).float()
    lower = _jumprelu_lower(theta, bandwidth)  # rounding slack: only adds exact zeros
    x, W_enc = _autocast_operands(backend, x, W_enc)
    values, indices, counts, overflow = _kernels(backend).threshold_encode(
        x.contiguous(), W_enc.contiguous(), bias.contiguous(), lower.contiguous(), cap)
    if bool(overflow):
        _warn_capacity("JumpReLU", cap, cap, knob="jumprelu_encode(capacity=...), saefast.ops.JUMPRELU_MIN_CAPACITY")
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


def per_member_inputs(encode, x: torch.Tensor, *args, **kwargs):
    """Run the encode op ``encode`` (:func:`topk_encode`, :func:`batchtopk_encode`, :func:`threshold_encode` or
    :func:`jumprelu_encode`) on a shared input ``x [N, D]`` — one call, as is — or on one input per member,
    ``x [N, J, D]`` (bootstrap resamples, the residuals of boosting chains).

    On ``native``, per-member inputs are one call: its encoder is a grouped GEMM (member ``j`` multiplies its own
    ``x[:, j]``). Elsewhere they run member by member: ``encode(x[:, j], *args_j, **kwargs_j)`` for
    ``j = 0 .. J−1``, where
    every tensor argument stacked on the member axis (leading size ``J``: ``W_enc [J, M, D]``, ``b_enc``, ``b_dec``,
    ``dead``, ``threshold``, ``log_threshold``) is sliced to ``[j : j+1]`` and everything else (a shared ``[1, D]``
    ``b_dec``, ints, floats, None, ``backend``) passes unchanged. The results are concatenated on the member axis:
    :class:`SparseCodes` by :meth:`SparseCodes.cat` (``K`` padded to the largest), per-member ``[J]`` tensors
    (``smallest_kept``, ``l0``) by ``torch.cat``; AuxK codes are None when every member's are.
    Each call reads its member's input ``x[:, j]``, so ``pre[n, j] = W_enc[j](x[n, j] − b_dec[j]) + b_enc[j]``.
    """
    if x.dim() == 2 or kwargs.get("backend") == "native":  # the native ops take [N, J, D] in one grouped call
        return encode(x, *args, **kwargs)
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


def decode_members(codes: SparseCodes, W_dec: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """Per-member decoder output (no bias) ``y[n, j] = Σ_s values[n,j,s]·W_dec[j, indices[n,j,s]]``, ``[N, J, D]``."""
    if backend == "torch":
        return ref.decode_members_sparse(codes, W_dec)
    J = W_dec.shape[0]
    ones = torch.ones(J, dtype=torch.float32, device=W_dec.device)
    values, indices = codes.values.contiguous(), codes.indices.contiguous()
    return _kernels(backend).sparse_decode(values, indices, W_dec.contiguous(), ones, None, None, True)


def decode(codes: SparseCodes, W_dec: torch.Tensor, b_dec: torch.Tensor, alpha: float | torch.Tensor,
           mask: torch.Tensor | None = None, backend: str = "triton") -> torch.Tensor:
    """Ensemble decode ``x̂ = Σ_j α_j (Σ_s mask·values·W_dec[j, indices] + b_dec[j])`` ``[N, D]``, in one launch.

    ``b_dec`` is ``[J, D]`` or ``[1, D]`` (shared: added once, unscaled — the single-SAE case) and ``mask``
    ``[N, J, K]`` bool (False drops a slot; feature sharpening) or None. Same contract as :func:`ref.decode_sparse`.
    """
    J = W_dec.shape[0]
    alpha_t = ref.member_weights(alpha, J, torch.float32, W_dec.device).contiguous()
    if backend == "torch":
        values = codes.values if mask is None else codes.values * mask
        return ref.decode_sparse(SparseCodes(values, codes.indices, codes.n_latents), W_dec, b_dec, alpha_t)
    bias = b_dec[0] if b_dec.shape[0] == 1 else (alpha_t.view(J, 1).to(b_dec.dtype) * b_dec).sum(0)
    values, indices = codes.values.contiguous(), codes.indices.contiguous()
    return _kernels(backend).sparse_decode(values, indices, W_dec.contiguous(), alpha_t, bias.contiguous(),
                                           None if mask is None else mask.contiguous(), False)


# ------------------------------------------------------------------------------------------------------
# Decoder-norm gradient projection (between backward and the optimizer step)
# ------------------------------------------------------------------------------------------------------


def _remove_parallel_grad_impl(W: torch.Tensor, grad: torch.Tensor) -> None:
    from .kernels.decoder_grad_projection import remove_parallel_grad_ as fused

    fused(W, grad)


def _remove_parallel_grad_fake(W, grad):
    return None


_remove_parallel_grad = _triton_op("saefast::remove_parallel_grad_", _remove_parallel_grad_impl,
                                   _remove_parallel_grad_fake, mutates_args=("grad",))


def remove_parallel_grad_(W: torch.Tensor, grad: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """In place ``g_r ← g_r − (g_r·ŵ_r) ŵ_r`` with ``ŵ_r = W_r / max(‖W_r‖, 1e-12)``, for every decoder row ``r`` of
    ``W [..., D]`` and its gradient ``grad`` (same shape), so an optimizer step cannot change a unit row's norm to
    first order; returns ``grad``.

    ``triton``: one fused pass (:mod:`saefast.kernels.decoder_grad_projection`); ``native``: the same on the CPU
    (``csrc/cpu/decoder_grad_projection.cpp``; CUDA tensors take the torch path: the extension has no CUDA kernel
    for it); ``torch``: :func:`saefast.ref.remove_parallel_grad_`, which builds three ``[R, D]`` temporaries. The
    fused passes need ``grad`` viewable as ``[R, D]`` rows (contiguous, or a member slice of a contiguous tensor).
    """
    if backend == "triton":
        _remove_parallel_grad(W, grad)
    elif backend == "native" and W.device.type == "cpu" and native.available():
        torch.ops.saefast.native_remove_parallel_grad_(W, grad)
    else:
        ref.remove_parallel_grad_(W, grad)
    return grad


# ------------------------------------------------------------------------------------------------------
# Grouped matmul (the native extension's, or a loop of torch.mm on the torch backend)
# ------------------------------------------------------------------------------------------------------


def _op_view(t: torch.Tensor, trans: bool) -> torch.Tensor:
    return t.t() if trans else t


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


if native.available():
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
    name = _check_name(current_backend() if backend is None else backend)
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
