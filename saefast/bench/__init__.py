"""Benchmark harness: every case on every available implementation, checked against eager before it is timed.

``saefast bench --preset cpu-small --json out.json`` (also ``run_benchmarks`` from Python). Cases:

* ``forward`` — bagging ensemble reconstruction, encode → top-k → decode;
* ``encode`` — the codes alone: per-member top-K values and indices ``[N, J, K]`` (checked as sets of latents
  with their values: near-equal latents may swap places in bf16);
* ``decode`` — the reconstruction alone, from given sparse codes;
* ``train_step`` — one bagging training step: forward + backward + Adam + decoder renormalisation;
* ``boosting_chain`` — boosting inference: every stage encodes the residual of the stages before it;
* ``sharpen`` — SAE-ception sharpened targets of a labelled batch (:func:`saefast.sharpen.targets`);
* ``metrics`` — ensemble dictionary metrics: diversity and the ``[J, J]`` member-to-member relaxed stability
  (:func:`saefast.metrics.member_similarity`, one pass over the cosines; ``eager_loop`` computes the dense
  cosine matrix of every pair of members). Its input is a decoder, not tokens: no tokens/s.

Implementations (:data:`IMPLEMENTATIONS`; ``--backends`` on the command line):

* ``eager_loop`` — the way public trainers run an ensemble: a Python loop over members, each with a dense
  pre-activation GEMM, ``torch.topk``, a scatter into a dense ``[N, M]`` code and a dense decode GEMM;
* ``eager_stacked`` — saefast's eager reference (``backend="torch"``): the member axis stacked, one GEMM;
* ``compile`` — ``torch.compile`` of ``eager_stacked`` (its compile time is left out: it runs in the warm-up);
* ``triton`` — the Triton kernels (CUDA only: under the CPU interpreter timings mean nothing);
* ``native`` — the C++ extension (CPU).

Each result: median ms over ``repeats`` after ``warmup`` (inputs rotate over three batches; backends are
interleaved round by round; CUDA is synchronised around each call), tokens/s, the same median for the case's
floor where it has one (``floor_ms``: the dense encoder GEMM ``x·W_encᵀ`` writing the ``[N, J·M]``
pre-activations, timed in the same rounds — every eager path pays it; a fused backend never writes them and can
go below it), peak memory of the guard call
(CUDA: ``max_memory_allocated``; CPU: the peak of its allocations net of frees, from the PyTorch profiler — not
for ``compile``, whose generated code allocates out of the profiler's sight),
achieved FLOP/s and bytes/s of the case's nominal
(dense-equivalent, the same for every backend) work, and the speedup over
``eager_loop``. The device's peak FLOP/s and bytes/s are measured once per run (a large matmul and a large copy).
A backend whose output differs from ``eager_stacked`` (or that fails) gets an error in the report, no number.
"""


from .cases import CASES, IMPLEMENTATIONS, Case, make_case, unavailable
from .measure import PeakMemory, device_peaks, synchronize, time_interleaved
from .report import format_markdown, plot_report
from .run import git_revision, guard, reference_output, run_benchmarks, token_batches
from .shapes import DTYPES, PRESETS, Shape

__all__ = [
    "CASES",
    "DTYPES",
    "IMPLEMENTATIONS",
    "PRESETS",
    "Case",
    "PeakMemory",
    "Shape",
    "device_peaks",
    "format_markdown",
    "git_revision",
    "guard",
    "make_case",
    "plot_report",
    "reference_output",
    "run_benchmarks",
    "synchronize",
    "time_interleaved",
    "token_batches",
    "unavailable",
]
