"""The backend policy: which implementation runs an op, decided in one place.

* ``torch`` — the eager reference (:mod:`saefast.ops.ref`); every activation; runs anywhere.
* ``triton`` — the kernels of :mod:`saefast.kernels`; CUDA tensors (or any under ``TRITON_INTERPRET=1``).
* ``native`` — the C++/CUDA extension ``saefast._C`` (:mod:`saefast.ops.native`); the fast CPU path.
* ``auto`` — ``triton`` on CUDA when Triton is importable, ``native`` where the extension runs, else ``torch``.

The fused backends implement the activations in :data:`FUSED_ACTIVATIONS`. The choice, most specific first: a
``backend=`` argument, the innermost ``with saefast.use_backend(name):``, else ``auto``. Models resolve it once
per call (:func:`resolve_backend`) and hand the resolved name down.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import native

BACKENDS = ("auto", "torch", "triton", "native")
"""Op backends: ``auto`` and the three implementations."""

FUSED_ACTIVATIONS = ("topk", "batchtopk", "jumprelu")
"""The activations the ``triton`` and ``native`` backends implement (``relu`` runs on ``torch``)."""

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("saefast_backend", default="auto")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def requested_backend(name: str | None) -> str:
    """``name``, or the current :func:`use_backend` choice when None; ValueError for an unknown name."""
    return _check_name(current_backend() if name is None else name)


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


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def compiling_only(device: torch.device) -> bool:
    """Meta tensors inside :func:`saefast.kernels.compile_only.compile_for` (kernels compiled, never run)."""
    if device.type != "meta":
        return False
    from ..kernels import compile_only

    return compile_only.active()


def resolve_backend(name: str | None, device: torch.device, activation: str | None = None) -> str:
    """The backend that will run: ``name`` (None: the current one) with ``auto`` resolved for ``device``.

    ``activation`` is the SAE activation the op computes, or None for an op that has none (decode, the decoder
    gradient projection). ``triton`` needs Triton, CUDA tensors (or ``TRITON_INTERPRET=1``) and a fused activation;
    ``native`` needs the built extension (CPU tensors, or CUDA ones when built with CUDA) and a fused activation.
    ``auto`` picks ``triton`` on CUDA, ``native`` where the extension runs, and falls back to ``torch``; an explicit
    ``triton`` or ``native`` that cannot run raises ValueError saying why.
    """
    name = requested_backend(name)
    fused = activation is None or activation in FUSED_ACTIVATIONS
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
        if device.type != "cuda" and not interpreting() and not compiling_only(device):
            raise ValueError(f"backend 'triton' runs on CUDA tensors, got {device.type} ones (set "
                             f"TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)")
        if not fused:
            raise ValueError(f"backend 'triton' implements the topk, batchtopk and jumprelu activations, not "
                             f"{activation!r}; use backend 'torch'")
    return name
