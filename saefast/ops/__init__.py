"""The sparse SAE ops behind the models, on three backends (``torch``, ``triton``, ``native``).

One file per op, mirroring ``kernels/saefast_triton/`` and ``csrc/cpu/``; each holds its custom op registration,
fake shapes, autograd formula and backend table:

* :mod:`.encode` — TopK / BatchTopK / JumpReLU / ReLU encoders (fused encode → top-k or → threshold);
* :mod:`.decode` — the sparse decode of all members in one launch, and its sparse backward;
* :mod:`.decoder_grad_projection` — the decoder-norm gradient projection;
* :mod:`.sparse_sae_backward` — the training forward's outputs as one op whose backward is one fused sparse pass;
* :mod:`.adam_step` — one fused Adam step (with the projection and renormalisation of decoder rows);
* :mod:`.grouped_mm` — grouped matmul (native extension);
* :mod:`.gather_rows` — rows gathered from many sources into one batch, converted on the way (the store's batches).

:mod:`.backend` decides which backend runs (once, in one place); :mod:`.ref` is the eager oracle every kernel is
tested against; :mod:`.native` loads the C++/CUDA extension on first use; :mod:`.codes` is the sparse code type.
"""

from . import codes, native, ref
from .adam_step import adam_step_
from .backend import (
    BACKENDS,
    FUSED_ACTIVATIONS,
    current_backend,
    requested_backend,
    resolve_backend,
    triton_available,
    use_backend,
)
from .codes import SparseCodes
from .decode import decode, decode_members_sparse
from .decoder_grad_projection import remove_parallel_grad_
from .encode import (
    BATCHTOPK_CAPACITY,
    JUMPRELU_CAPACITY_DIVISOR,
    JUMPRELU_MIN_CAPACITY,
    batchtopk_encode,
    folded_bias,
    jumprelu_capacity,
    jumprelu_encode,
    per_member_inputs,
    relu_encode,
    threshold_encode,
    topk_encode,
)
from .gather_rows import gather_rows_
from .grouped_mm import grouped_mm
from .sparse_sae_backward import fused_backward_runs, sparse_sae_outputs
from .topk_chunks import CHUNK_LATENTS, dead_latents, topk_over_latents

__all__ = [
    "BACKENDS",
    "BATCHTOPK_CAPACITY",
    "CHUNK_LATENTS",
    "FUSED_ACTIVATIONS",
    "JUMPRELU_CAPACITY_DIVISOR",
    "JUMPRELU_MIN_CAPACITY",
    "SparseCodes",
    "adam_step_",
    "batchtopk_encode",
    "codes",
    "current_backend",
    "dead_latents",
    "decode",
    "decode_members_sparse",
    "folded_bias",
    "fused_backward_runs",
    "gather_rows_",
    "grouped_mm",
    "jumprelu_capacity",
    "jumprelu_encode",
    "native",
    "per_member_inputs",
    "ref",
    "relu_encode",
    "remove_parallel_grad_",
    "requested_backend",
    "resolve_backend",
    "sparse_sae_outputs",
    "threshold_encode",
    "topk_encode",
    "topk_over_latents",
    "triton_available",
    "use_backend",
]
