"""Stopping a long job cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill): finish the unit of work under
way, save, then stop with a message that says what was saved and how to resume.

Inside :func:`deferred_interrupts` the first SIGINT or SIGTERM only records itself; the loop polls
:meth:`StopRequest.check` between units of work (a training step, a harvest shard, a sharpening cycle), saves, and
raises :class:`Interrupted`. A second signal while the save runs is not lost either: it raises ``KeyboardInterrupt``
at once, for a user who really wants out (the atomic writes of :mod:`saefast.files` keep the files whole).

``kill -9`` cannot be caught: what survives it is the last periodic save (see :class:`Interval`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals a job turns into a clean stop."""


class Interrupted(KeyboardInterrupt):
    """A job stopped on a signal after saving its state. ``exit_status`` is the shell's ``128 + signal``
    (130 for SIGINT, 143 for SIGTERM); ``saved`` says what was written (empty when nothing could be)."""

    def __init__(self, signum: int, saved: str = ""):
        self.signum = int(signum)
        self.saved = saved
        name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {name}" + (f"; {saved}" if saved else ""))

    @property
    def exit_status(self) -> int:
        """``128 + signal number``: what a shell reports for a process the signal killed."""
        return 128 + self.signum

    def with_saved(self, saved: str) -> Interrupted:
        """The same interruption, saying what was saved."""
        return Interrupted(self.signum, saved)


class StopRequest:
    """Whether a stop was requested (``signum``), and :meth:`check` to act on it between units of work."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """A SIGINT or SIGTERM arrived and the job has not stopped yet."""
        return self.signum is not None

    def check(self, saved: str = "") -> None:
        """Raise :class:`Interrupted` if a stop was requested (after the caller has saved; ``saved`` says what)."""
        if self.signum is not None:
            raise Interrupted(self.signum, saved)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


_active: StopRequest | None = None


@contextlib.contextmanager
def deferred_interrupts(enabled: bool = True) -> Iterator[StopRequest]:
    """Defer SIGINT and SIGTERM to the caller's next :meth:`StopRequest.check` while the block runs.

    Handlers can only be installed from the main thread; elsewhere (or with ``enabled=False``) the request never
    fires and signals behave as usual. Nested blocks share the outer block's request, so an inner loop (a harvest
    run by the demo) sees a signal the outer one received."""
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, request._handle)
    _active = request
    try:
        yield request
    finally:
        _active = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Interval:
    """A wall-clock interval for periodic saves: :meth:`due` is true once ``minutes`` have passed since the last
    :meth:`reset` (never when ``minutes`` is 0 or None). What a ``kill -9`` loses is at most one interval."""

    def __init__(self, minutes: float | None):
        if minutes is not None and minutes < 0:
            raise ValueError(f"an interval must be >= 0 minutes, got {minutes}")
        self.seconds = (minutes or 0) * 60.0
        self.reset()

    def reset(self) -> None:
        """Start the interval again (after a save)."""
        self.start = time.monotonic()

    def due(self) -> bool:
        """The interval has passed."""
        return self.seconds > 0 and time.monotonic() - self.start >= self.seconds
