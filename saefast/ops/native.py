"""The native extension ``saefast._C`` (csrc/), loaded on first use.

Loading it registers ``torch.ops.saefast.grouped_mm`` and the ``native_*`` sparse ops (CPU kernels always; CUDA
kernels when it was built against a CUDA torch). Nothing loads it at import: the first call of :func:`available`
(or :func:`supports`, :func:`load`, which backend resolution makes) does, so reading an activation store or
printing ``saefast harvest --help`` never touches it. Each op file registers what it adds to an op (fake shapes,
autograd) with :func:`on_load`.

A missing or broken extension is never an error: :func:`available` is False, :func:`why_unavailable` says why,
one ``RuntimeWarning`` says so, and the ``torch`` (and ``triton``) backends keep working.
"""

from __future__ import annotations

import importlib
import threading
import types
import warnings
from collections.abc import Callable

import torch

_C: types.ModuleType | None = None
_error: str | None = None
_tried = False
_lock = threading.RLock()
_on_load: list[Callable[[], None]] = []


def load() -> bool:
    """Load ``saefast._C`` once and run the :func:`on_load` callbacks; whether it is loaded."""
    global _C, _error, _tried
    if _tried:  # the common case, lock-free (and traceable by torch.compile)
        return _C is not None
    with _lock:
        if _tried:
            return _C is not None
        _tried = True
        try:
            # By name: saefast._C is compiled, not a module of the Python import graph (nor of its layer checks).
            extension = importlib.import_module("saefast._C")  # registers the ops
        except ImportError as exc:  # not built (SAEFAST_NO_EXTENSION=1, a pure-Python install), or for another torch
            _error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"saefast: the native extension saefast._C could not be loaded ({_error}); the 'native' backend is "
                f"unavailable and every op runs on the torch (or triton) backend. Rebuild it with "
                f"`pip install --no-build-isolation -e .`.",
                RuntimeWarning, stacklevel=3,
            )
            return False
        _C = extension
        for callback in _on_load:
            callback()
        return True


def on_load(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` right after the extension loads (now, if it already has); usable as a decorator."""
    with _lock:
        _on_load.append(callback)
        if _C is not None:
            callback()
    return callback


def available() -> bool:
    """Whether the extension loads (its CPU ops then exist)."""
    return load()


def why_unavailable() -> str | None:
    """The import error that kept the extension from loading, or None when it loads."""
    load()
    return _error


def has_cuda() -> bool:
    """Whether the extension has its CUDA kernels."""
    return load() and bool(_C.with_cuda())


def supports(device: torch.device) -> bool:
    """Whether the native ops run on ``device`` (CPU when built; CUDA when built with CUDA)."""
    return (device.type == "cpu" and available()) or (device.type == "cuda" and has_cuda())
