"""Compile-only launches: build every kernel for an NVIDIA GPU on a machine that has none.

Inside ``with compile_for(arch) as builds:`` the launchers of :mod:`saefast.kernels` accept tensors on the
``meta`` device (shapes, strides and dtypes; no memory, so LLM-scale shapes cost nothing), choose their block
sizes exactly as for CUDA tensors of those shapes, and instead of launching a kernel ask Triton to compile it for
``sm_<arch>`` (ptxas included). Each launch appends a :class:`Build` to ``builds``: the kernel, its
specialisation (constexprs, pointer dtypes), grid, and the resource usage of the cubin as ``cuobjdump -res-usage``
reads it (registers per thread, stack frame and local memory — where register spills go — and shared memory).
Outputs stay unwritten; nothing runs.

This checks what the CPU interpreter cannot: that a kernel compiles for the real target at the block sizes the
GPU path picks (the interpreter accepts ``tl.dot`` tiles and register loads no GPU build would), and whether it
spills. Triton must have been imported *without* ``TRITON_INTERPRET=1`` (the interpreter compiles nothing), so
this runs in its own process, not in the test session (``bench/gpu_build.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_builds: list[Build] | None = None
"""The records of the active :func:`compile_for`, or None outside one."""


@dataclasses.dataclass
class Build:
    """One compiled launch: what ptxas made of ``kernel`` at this specialisation for ``sm_<arch>``."""

    kernel: str
    arch: int
    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    dtypes: list[str]
    """Pointer arguments' element types, in argument order."""
    num_warps: int
    registers: int
    """Per thread (255 at most; with ``32·num_warps`` threads, ≤ 65536 per block)."""
    stack_bytes: int
    """Per-thread stack frame: register spills (and local arrays) live here; 0 means no spills."""
    local_bytes: int
    shared_bytes: int
    """Shared memory the launch needs: Triton's dynamic allocation plus the cubin's static one."""

    @property
    def spills(self) -> bool:
        """Whether registers spilled: a stack frame or local memory (slow off-chip traffic)."""
        return self.stack_bytes > 0 or self.local_bytes > 0


def active() -> bool:
    """Whether launches are being compiled instead of run (inside :func:`compile_for`)."""
    return _builds is not None


def launch(kernel, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``, or inside :func:`compile_for` its compilation for the chosen target."""
    if _builds is None:
        kernel[grid](*args, **meta)
        return
    compiled = kernel.warmup(*args, grid=grid, **meta)
    import triton

    arch = triton.runtime.driver.active.arch
    static_shared, registers, stack, local = _resource_usage(compiled.asm["cubin"])
    constexprs = {name: value for name, value in meta.items() if name in kernel.arg_names}
    dtypes = [str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)]
    _builds.append(Build(kernel.fn.__name__, arch, tuple(int(g) for g in grid), constexprs, dtypes,
                         compiled.metadata.num_warps, registers, stack, local,
                         compiled.metadata.shared + static_shared))


def _resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """``(static shared, registers, stack, local)`` bytes of the one kernel in ``cubin`` (``cuobjdump -res-usage``)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], check=True,
                                capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report))
    if len(fields) != 4:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{report}")
    return int(fields["SHARED"]), int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"])


class _CompileOnlyDriver:
    """The part of a Triton driver that compiling needs: a CUDA target of the chosen architecture, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        # JIT caches are per device: one "device" per architecture keeps their builds apart.
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@contextlib.contextmanager
def compile_for(arch: int) -> Iterator[list[Build]]:
    """Compile, for ``sm_<arch>`` (e.g. 80, 90), every kernel launched inside; yields the list of builds."""
    global _builds
    import triton
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError("compile_for needs Triton imported without TRITON_INTERPRET=1 (the interpreter compiles "
                           "nothing): run it in a process of its own")
    if _builds is not None:
        raise RuntimeError("compile_for does not nest")
    if isinstance(arch, bool) or not isinstance(arch, int) or arch < 70:
        raise ValueError(f"arch must be an NVIDIA compute capability as an int >= 70 (e.g. 80, 90); got {arch!r}")
    builds: list[Build] = []
    driver = triton.runtime.driver
    previous = getattr(driver, "_active", None)  # None: not created yet (creating it needs a GPU)
    driver.set_active(_CompileOnlyDriver(arch))
    _builds = builds
    try:
        yield builds
    finally:
        _builds = None
        driver.set_active(previous)
