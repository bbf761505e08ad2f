"""Progress reporting that suits where the output goes: a live ``tqdm`` bar on a terminal, a plain line now and then
in a log.

A ``tqdm`` bar redraws itself with ``\\r`` several times a second; in a file or a pipe (a job's log, CI) every redraw
stays, so a few lines of content become a hundred kilobytes of bar. :func:`progress_bar` returns a real ``tqdm``
bar when standard error is a terminal (or a Jupyter kernel), and otherwise a :class:`PlainProgress`, which writes one
self-contained line, e.g. ::

    train sae: 120/300 step (40%), 12.3 step/s, 15s left, loss=0.1200 fvu=0.3000

at most every :data:`INTERVAL` seconds (the environment variable ``SAEFAST_PROGRESS_INTERVAL`` overrides it) and
once more when the work ends. Both offer the small interface the loops use: ``update(n)``, ``set_postfix(**kw)``,
``close()``, ``with``, and iteration over a wrapped iterable.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import IO, Any, Protocol

from tqdm.auto import tqdm

INTERVAL = 30.0
"""Seconds between two plain progress lines (when standard error is not a terminal)."""

INTERVAL_ENV = "SAEFAST_PROGRESS_INTERVAL"
"""Environment variable that overrides :data:`INTERVAL` (seconds, a number ``>= 0``; 0 prints at every update)."""


class Progress(Protocol):
    """What the loops use of a progress reporter: a ``tqdm`` bar or a :class:`PlainProgress`."""

    def update(self, n: float = 1) -> Any:
        """Count ``n`` more units done."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> Any:
        """Values (``loss=...``) shown after the count."""

    def close(self) -> Any:
        """End the report (a last line or the bar's final state)."""


def progress_interval() -> float:
    """Seconds between two plain progress lines: ``$SAEFAST_PROGRESS_INTERVAL`` if set to a number ``>= 0``,
    else :data:`INTERVAL` (a bad value warns and falls back to the default rather than stopping a job)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        warnings.warn(f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0; using {INTERVAL:g}", stacklevel=3)
        return INTERVAL
    return value


def is_interactive(stream: IO[str] | None = None) -> bool:
    """Whether a live bar suits ``stream`` (default: standard error): it is a terminal, or this is a Jupyter
    kernel (whose widget bar does not pile up in a log)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # a broken IPython only means "not a notebook"
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, initial: float = 0, interval: float | None = None,
                 file: IO[str] | None = None, **tqdm_kwargs: Any) -> Any:
    """A progress reporter for ``total`` units of work (or over ``iterable``) that suits where the output goes.

    ``enabled=False``: a reporter that prints nothing. Standard error (or ``file``) a terminal: a ``tqdm`` bar, with
    ``tqdm_kwargs`` (``unit_scale``, ``leave``, ``dynamic_ncols``, ...) passed on. Otherwise a :class:`PlainProgress`
    that prints a plain line at most every ``interval`` seconds (default :func:`progress_interval`) and once when
    closed. All three offer ``update``, ``set_postfix``, ``close``, ``with`` and iteration (over ``iterable``)."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if enabled and is_interactive(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, enabled=enabled,
                         interval=progress_interval() if interval is None else interval, file=file,
                         unit_scale=bool(tqdm_kwargs.get("unit_scale", False)),
                         leave=tqdm_kwargs.get("leave", True) is not False)


class PlainProgress:
    """Progress as an occasional plain line on standard error (or ``file``), for logs: no ``\\r``, no redraws.

    A line is written when :meth:`update` finds ``interval`` seconds gone since the start or the last line, and
    once at :meth:`close` (with ``leave=False``, the closing line only if a line was written before: a short task
    says nothing, as its vanishing ``tqdm`` bar would). ``enabled=False`` writes nothing."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, enabled: bool = True, interval: float = INTERVAL,
                 file: IO[str] | None = None, unit_scale: bool = False, leave: bool = True):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.enabled = enabled
        self.interval = float(interval)
        self.file = file
        self.unit_scale = unit_scale
        self.leave = leave
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.last_n = initial
        self.lines = 0
        self.closed = False

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress reporter wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units done; write a line if ``interval`` seconds have gone since the last one."""
        self.n += n
        if self.enabled and not self.closed and time.monotonic() - self.last >= self.interval:
            self._write()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values (``loss=..., fvu=...``) shown at the end of the next line, replacing the previous ones."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """Write the closing line (see the class) once; later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        if self.enabled and (self.leave or self.lines):
            self._write()

    def line(self) -> str:
        """The progress line as it stands: ``desc: n/total unit (pct%), rate unit/s, eta left, postfix``."""
        now = time.monotonic()
        elapsed = now - self.start
        done = self.n - self.initial
        parts = [f"{self._count(self.n)}/{self._count(self.total)} {self.unit}" if self.total is not None
                 else f"{self._count(self.n)} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        # the current speed (since the last line) while running, the average over the whole run at the end
        recent, since = self.n - self.last_n, now - self.last
        rate = recent / since if recent > 0 and since > 0 and not self.closed else done / max(elapsed, 1e-9)
        if done > 0 and elapsed > 0:
            parts.append(f"{self._count(rate, rate=True)} {self.unit}/s")
            if self.total is not None and not self.closed and self.total > self.n:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.closed or (self.total is not None and self.n >= self.total):
            parts.append(f"{_duration(elapsed)} elapsed")
        if self.postfix:
            parts.append(" ".join(f"{key}={value}" for key, value in self.postfix.items()))
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _write(self) -> None:
        stream = sys.stderr if self.file is None else self.file
        print(self.line(), file=stream, flush=True)
        self.last, self.last_n = time.monotonic(), self.n
        self.lines += 1

    def _count(self, value: float | None, rate: bool = False) -> str:
        if value is None:
            return "?"
        if self.unit_scale and abs(value) >= 1000:
            return tqdm.format_sizeof(value, divisor=1000)
        if rate:
            return f"{value:.3g}" if value < 100 else f"{value:.0f}"
        return f"{value:g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
