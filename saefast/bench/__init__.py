"""Benchmark harness: every case on every available implementation, checked against eager before it is timed.

``saefast bench --preset cpu-small --json out.json`` (or :func:`run_benchmarks`). The cases and implementations are
in :mod:`.cases`, the sizes in :mod:`.shapes`, the timing and memory measurements in :mod:`.measure`, the modelled
memory traffic of a training step (no GPU has measured it) in :mod:`.traffic`; what each reported number means is in
``bench/README.md``. An implementation whose output differs from the eager reference's (or that fails) gets an error
in the report, not a number. The ``data`` case (:mod:`.data`, ``saefast bench --cases data``) measures the
activation-store reader instead: rows/s against the machine's copy bandwidth and the disk.
"""


from .cases import CASES, IMPLEMENTATIONS, Case, make_case, unavailable
from .data import DATA_DIMS, format_data_markdown, run_data_benchmark
from .measure import PeakMemory, device_peaks, synchronize, time_interleaved
from .report import format_markdown, plot_report
from .run import git_revision, guard, reference_output, run_benchmarks, token_batches
from .shapes import DTYPES, PRESETS, Shape

__all__ = [
    "CASES",
    "DATA_DIMS",
    "DTYPES",
    "IMPLEMENTATIONS",
    "PRESETS",
    "Case",
    "PeakMemory",
    "Shape",
    "device_peaks",
    "format_data_markdown",
    "format_markdown",
    "git_revision",
    "guard",
    "make_case",
    "plot_report",
    "reference_output",
    "run_data_benchmark",
    "run_benchmarks",
    "synchronize",
    "time_interleaved",
    "token_batches",
    "unavailable",
]
