"""Triton kernels of saefast, installed as ``saefast.kernels`` (never as a top-level ``kernels`` module).

One file per kernel, each launcher documenting its exact contract against :mod:`saefast.ref`.
Nothing is here yet: the fused encode→top-k, sparse decode and sparse backward kernels arrive with the
Triton issue; until then every backend is the eager reference.
"""
