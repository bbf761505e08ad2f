"""Training SAEs and ensembles: :func:`train` (the loop: data, schedule, logging, checkpoints, resume) over
:func:`training_step` (one optimizer step, also what the benchmarks time) and its optimizer :class:`SAEAdam`."""

from .bootstrap import bootstrap_indices
from .memory import reuse_freed_memory
from .optimizer import SAEAdam
from .step import training_step
from .trainer import BatchStream, DataExhausted, differences, train

__all__ = ["BatchStream", "DataExhausted", "SAEAdam", "bootstrap_indices", "differences", "reuse_freed_memory",
           "train", "training_step"]
