"""Memory traffic of one bagging TopK training step: the bytes moved, per component, by the op-by-op kernels
(before the fused backward and optimizer; JumpReLU and ReLU models still train that way) and by the fused plan —
a model (no GPU has measured it), for the ``gpu`` preset's shapes in ``bench/README.md``.

Notation (a :class:`~saefast.bench.shapes.Shape`): ``N`` tokens, ``D`` = d_in, ``J`` members of ``M`` latents,
``K`` = top-k per member; ``P = J·M·D`` parameters per weight matrix (``W_enc`` and ``W_dec`` are both ``[J, M, D]``),
``S = N·J·K`` slots (kept codes), ``R = min(J·M, S)`` decoder rows a step can touch. Element sizes: ``a`` bytes for
activations and for the weights the GEMMs and gathers read (2 when the shape's dtype is bfloat16 or float16, 4 in
float32), ``f = 4`` for gradients, Adam's moments and the fp32 master weights, ``i = 8`` for an int64 latent index;
a code is an fp32 value and an int64 index, ``f + i = 12`` bytes.

Assumptions (stated so the numbers can be checked):

* Compulsory DRAM traffic only: each kernel reads each operand it needs once and writes each result once (perfect
  tiling and caching inside a kernel, nothing kept across kernels); a gather of ``S`` rows moves ``S`` rows (repeats
  are not assumed to hit the cache). Vectors of ``J·M`` or ``J·D`` elements (biases, per-slot scalars aside) count
  only where listed.
* Atomic accumulation resolves in L2: a dense gradient buffer built by scattered atomics costs its zeroing (``P·f``
  written) plus one write-back (``P·f``), not a read-modify-write per slot.
* Not counted in either plan (the same in both, or outside the step's kernels): autocast's bf16 copies of the fp32
  master weights (``P·(f + a)`` per matrix per step), AuxK (its codes and its extra decode), the firing counters,
  the loss's scalar reductions, the sort of the slots' keys a deterministic segmented backward needs.
* Adam is counted at its minimum, one pass per parameter reading ``p, g, m, v`` and writing ``p, m, v``: 28 bytes
  per fp32 parameter. ``torch.optim.Adam``'s foreach implementation makes several passes (a lerp, a mul + addcmul,
  a sqrt, a div, an addcdiv), so the op-by-op real optimizer traffic is larger than this model's.

Today (the ``triton`` backend's kernels, autograd between them):

* ``encoder_gemm``: read ``x`` and ``W_enc`` — ``N·D·a + P·a``;
* ``codes_write``: the top-k codes written — ``S·(f + i)``;
* ``decode_forward``: read the codes, gather ``S`` rows of ``W_dec``, write ``x̂`` — ``S·(f + i) + S·D·a + N·D·a``;
* ``loss``: read ``x̂`` and ``x``, write the output gradient ``G`` — ``2·N·D·a + N·D·f``;
* ``decode_backward_values``: gather ``S`` rows of ``W_dec`` again, read ``G`` and the codes, write the codes'
  gradient — ``S·D·a + N·D·f + S·(f + i) + S·f``;
* ``decode_backward_weight``: read ``S`` rows of ``G`` and the codes, zero and write back the dense fp32 ``dW_dec`` —
  ``S·D·f + S·(f + i) + 2·P·f``;
* ``encoder_backward``: cast ``x`` to fp32 (read ``N·D·a``, write ``N·D·f``), read ``S`` rows of it and the codes'
  gradient with the indices, zero and write back the dense fp32 ``dW_enc`` —
  ``N·D·(a + f) + S·D·f + S·(f + i) + 2·P·f``;
* ``folded_bias_grad``: the folded bias ``b_enc − W_enc·b_dec``'s ``dW_enc`` term, a dense outer product written
  (``P·f``) and added into ``dW_enc`` (read both, write one: ``3·P·f``) — ``4·P·f``;
* ``decoder_projection``: ``g ← g − (g·ŵ)ŵ`` per decoder row, read ``W_dec`` and ``dW_dec``, write ``dW_dec`` —
  ``3·P·f``;
* ``adam``: ``W_enc`` and ``W_dec`` at 28 bytes per parameter, the biases (``J·M`` of ``b_enc``, ``J·D`` of
  ``b_dec``) likewise — ``28·(2·P + J·M + J·D)``;
* ``renormalise``: decoder rows back to unit norm, read and write ``W_dec`` — ``2·P·f``.

Fused plan:

* ``encoder_gemm``, ``codes_write``, ``decode_forward``, ``loss``: as op by op;
* ``fused_backward``: one kernel for the decoder's and the encoder's backward: each touched decoder row read once
  (``R·D·a``), each slot reads its ``G`` row and its ``x`` row once (``S·D·(f + a)``) and its code
  (``S·(f + i)``), ``dW_dec`` and ``dW_enc`` written once each (``2·P·f``, segment-ordered: no zeroing), the folded
  bias's term folded in — ``R·D·a + S·D·(f + a) + S·(f + i) + 2·P·f``;
* ``fused_optimizer``: one pass per parameter reading ``p, g, m, v`` and writing ``p, m, v`` (28 bytes), the
  decoder's pass also projecting its gradient, writing it back (``+f``) and renormalising its rows —
  ``28·P + 32·P + 28·(J·M + J·D)``.
"""

from __future__ import annotations

from typing import Any

from .shapes import Shape

INDEX_BYTES = 8
"""An int64 latent index."""
FP32 = 4
"""Gradients, Adam's moments, master weights, code values."""


def _sizes(shape: Shape) -> dict[str, int]:
    N, D, J, M, K = shape.tokens, shape.d_in, shape.members, shape.latents, shape.k
    a = 4 if shape.dtype == "float32" else 2
    return {"N": N, "D": D, "J": J, "M": M, "K": K, "P": J * M * D, "S": N * J * K, "R": min(J * M, N * J * K),
            "a": a}


def traffic_per_step(shape: Shape) -> dict[str, Any]:
    """Bytes moved by one bagging TopK training step at ``shape``, per component (see the module docstring for every
    formula and assumption): ``{"op_by_op": {"parts": {component: bytes}, "total": bytes}, "fused": {...}, "sizes":
    {"N", "D", "J", "M", "K", "P", "S", "R", "a"}}``; ``total`` is the sum of ``parts``."""
    z = _sizes(shape)
    N, D, J, M, P, S, R, a = z["N"], z["D"], z["J"], z["M"], z["P"], z["S"], z["R"], z["a"]
    f, code = FP32, FP32 + INDEX_BYTES
    biases = J * M + J * D
    shared = {
        "encoder_gemm": N * D * a + P * a,
        "codes_write": S * code,
        "decode_forward": S * code + S * D * a + N * D * a,
        "loss": 2 * N * D * a + N * D * f,
    }
    op_by_op = dict(shared)
    op_by_op.update({
        "decode_backward_values": S * D * a + N * D * f + S * code + S * f,
        "decode_backward_weight": S * D * f + S * code + 2 * P * f,
        "encoder_backward": N * D * (a + f) + S * D * f + S * code + 2 * P * f,
        "folded_bias_grad": 4 * P * f,
        "decoder_projection": 3 * P * f,
        "adam": 28 * (2 * P + biases),
        "renormalise": 2 * P * f,
    })
    fused = dict(shared)
    fused.update({
        "fused_backward": R * D * a + S * D * (f + a) + S * code + 2 * P * f,
        "fused_optimizer": 28 * P + 32 * P + 28 * biases,
    })
    return {"op_by_op": {"parts": op_by_op, "total": sum(op_by_op.values())},
            "fused": {"parts": fused, "total": sum(fused.values())}, "sizes": z}


def format_traffic(shapes: list[Shape]) -> str:
    """A markdown table of :func:`traffic_per_step` in GB (10⁹ bytes) per step: one row per component, an op-by-op and a
    fused column per shape, the totals and the fused/op-by-op ratio last."""
    reports = [traffic_per_step(shape) for shape in shapes]
    names = list(dict.fromkeys(name for r in reports for plan in ("op_by_op", "fused") for name in r[plan]["parts"]))
    head = "| component | " + " | ".join(f"{s.name} op by op | {s.name} fused" for s in shapes) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(shapes)]

    def gb(value: int | None) -> str:
        return "–" if value is None else f"{value / 1e9:,.2f}"

    for name in names:
        cells = [f"{gb(r['op_by_op']['parts'].get(name))} | {gb(r['fused']['parts'].get(name))}" for r in reports]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{gb(r['op_by_op']['total'])}** | **{gb(r['fused']['total'])}**"
                                               for r in reports) + " |")
    lines.append("| fused / op by op | " + " | ".join(f" | {r['fused']['total'] / r['op_by_op']['total']:.2f}"
                                                   for r in reports) + " |")
    return "\n".join(lines)
