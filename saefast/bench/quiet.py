"""Keeping a benchmark's output to its results: torch.compile's warnings and the PyTorch profiler's native log lines
are hidden unless asked for (``saefast bench --verbose``, ``run_benchmarks(verbose=True)``).

Two sources of noise, two remedies:

* torch.compile (dynamo, inductor) logs through Python's :mod:`logging` (a graph break on ``Tensor.item()`` is a
  30-line warning with a stack) and issues a few :mod:`warnings` (e.g. TF32 not enabled). :func:`quiet` raises the
  ``torch._dynamo`` / ``torch._inductor`` loggers to ERROR and ignores their ``UserWarning`` for the block, then
  restores both. (Not ``torch._logging.set_logs``: it resets every setting it is not given, so the previous state
  could not be restored.) A ``TORCH_LOGS`` set in the environment is the user's explicit choice and is left alone.
* The profiler that :class:`~saefast.bench.measure.PeakMemory` runs on the CPU (Kineto) prints
  ``USDT: ... profiler_start`` / ``profiler_stop`` (and ``STAGE: ...``) lines from C++ straight to file descriptor
  2 at every start and stop: Python's ``sys.stderr``, logging and warnings never see them, and its level switch
  (``KINETO_LOG_LEVEL``) is read once per process, when the profiler first starts, so a library cannot turn it
  on and off. :func:`native_quiet` therefore redirects descriptor 2 into a temporary file around the profiler's
  start and stop only, and writes back whatever it caught except those informational lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

TORCH_LOGGERS = ("torch._dynamo", "torch._inductor")
"""The loggers (and the modules whose ``UserWarning``) :func:`quiet` silences below ERROR."""

KINETO_NOISE = re.compile(rb"^(?:USDT|STAGE|INFO|VERBOSE):\d{4}-\d\d-\d\d [^\]]*\] ")
"""An informational line of the profiler's native log (its warnings and errors are kept)."""

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("saefast_bench_quiet", default=False)


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Within the block, hide torch.compile's log records below ERROR and ``UserWarning`` s, and make
    :func:`native_quiet` drop the profiler's native log lines; ``verbose=True`` changes nothing. Restores the
    logger levels and warning filters on exit."""
    if verbose:
        yield
        return
    token = _QUIET.set(True)
    loggers = [] if os.environ.get("TORCH_LOGS") else [logging.getLogger(name) for name in TORCH_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings():
            for name in TORCH_LOGGERS:
                warnings.filterwarnings("ignore", category=UserWarning, module=re.escape(name) + r"(\.|$)")
            for logger in loggers:
                logger.setLevel(max(logger.level, logging.ERROR))
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        _QUIET.reset(token)


def is_quiet() -> bool:
    """Whether a :func:`quiet` block (not verbose) is running."""
    return _QUIET.get()


@contextlib.contextmanager
def native_quiet() -> Iterator[None]:
    """Inside a :func:`quiet` block: catch what native code writes to file descriptor 2 during the block and write
    it back without the profiler's informational lines (:data:`KINETO_NOISE`). Elsewhere (or when descriptor 2
    cannot be redirected): nothing. Keep the block short (a profiler's start or stop): other writes to standard
    error during it reach the terminal only at its end."""
    if not is_quiet():
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as caught:
        _flush()
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            _flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = b"".join(line for line in caught.read().splitlines(keepends=True) if not KINETO_NOISE.match(line))
            while kept:
                kept = kept[os.write(2, kept):]


def _flush() -> None:
    """Flush Python's buffered standard error, so that its text lands on the right side of a redirect."""
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
