"""Triton kernels of saefast, installed as ``saefast.kernels`` (source folder ``kernels/saefast_triton/``).

``kernels/`` itself has no ``__init__.py`` on purpose: a regular package there would shadow PyPI's ``kernels``
(a dependency of transformers ≥ 5) for anything run from the repository root.

One file per kernel family, each launcher documenting its exact contract against :mod:`saefast.ref`:

* ``topk_encode.py`` — ``topk_encode``: encoder GEMM fused with a running per-member top-k (and the AuxK top-k
  among dead latents) so the ``N × J·M`` pre-activations never reach memory; ``threshold_encode``: the JumpReLU
  form (every ``pre > θ`` into a capacity-bounded sparse output with counts and an overflow flag).
* ``sparse_decode.py`` — ``sparse_decode``: ``x̂ = bias + Σ_j α_j Σ_k mask·z·W_dec[j, idx]`` for all members in
  one launch (combined ``[N, D]`` or per member ``[N, J, D]``).
* ``sparse_decode_backward.py`` — ``sparse_decode_grad_values`` (gather-dot) and ``sparse_decode_grad_weight``
  (transposed sparse–dense product; atomic or deterministic segment reduction). The encoder backward reuses
  both with ``W_enc`` in the decoder's place.
* ``sparse_sae_backward.py`` — ``sparse_sae_backward``: the whole sparse backward of a TopK/BatchTopK training
  step (decoder, encoder and bias gradients, AuxK's slots included) in one pass over the slots bucketed by latent.
* ``adam_step.py`` — ``adam_step_``: one Adam step per parameter, for decoder rows with the gradient projection
  and the renormalisation in the same pass.

* ``compile_only.py`` — ``compile_for(arch)``: launches on ``meta`` tensors compile the kernel for ``sm_<arch>``
  instead of running it, recording ptxas's resource usage (``bench/gpu_build.py``: GPU builds without a GPU).

The torch-facing side (custom ops, autograd, backend choice) is :mod:`saefast.ops`. Importing this package does
not import Triton; each module does, so set ``TRITON_INTERPRET=1`` before importing one to run on a CPU.
"""
