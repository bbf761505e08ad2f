"""Build every Triton kernel of a training step for NVIDIA GPUs, on a machine without one, and report what ptxas made.

    python bench/gpu_build.py [--arch 80 90] [--shape llm small] [--dtype float32 bfloat16 float16]
                              [--json OUT.json] [--markdown OUT.md] [--check]

For each shape, dtype and activation the script runs the ``triton`` backend's ops — encode (with AuxK), decode,
the whole backward (op by op, and the training step's fused sparse backward), the decoder-norm gradient projection,
the deterministic backward, and the fused Adam step (fp32 whatever the dtype: master weights) — on ``meta``
tensors inside :func:`saefast.kernels.compile_only.compile_for`: every launcher picks its GPU block sizes for the
real shapes, and each kernel is compiled for ``sm_<arch>`` instead of run (see that module). Shapes:

* ``llm``: the LLM-scale configuration of the issue: d = 2304, M = 16384 latents per member, J = 8, K = 64,
  N = 8192 tokens; BatchTopK's ``capacity·k`` candidates; JumpReLU's default capacity; AuxK and ``k`` at the
  fused kernel's limits.
* ``small``: the CPU tests' ragged shapes (d = 75, M = 100, J = 3, N = 37, K in {1, 8, 32}): the small-block paths.

``--check`` exits 1 when a build needs more registers than a block can have or more shared memory than the
architecture gives a block (the launch would fail), or spills registers (stack frame or local memory > 0) at the
``llm`` shape (a spill at the small test shapes costs nothing that matters: it is listed, not counted).
Needs no GPU and no CUDA toolkit: Triton ships ptxas and cuobjdump. Triton must not be in interpreter mode, so
this runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # must hold before triton is imported
    sys.exit("bench/gpu_build.py compiles for a GPU: unset TRITON_INTERPRET")

import torch

from saefast import ops
from saefast.kernels.compile_only import compile_for

SHARED_PER_BLOCK = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
"""Largest shared memory a block may opt into, bytes (CUDA programming guide, compute capabilities table)."""
REGISTERS_PER_SM_BLOCK = 65_536

SHAPES = {
    "llm": [dict(N=8192, D=2304, J=8, M=16384, K=64)],
    "small": [dict(N=37, D=75, J=3, M=100, K=K) for K in (1, 8, 32)],
}


def _meta(*shape: int, dtype=torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _backward(loss: torch.Tensor, deterministic: bool) -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def _steps(N: int, D: int, J: int, M: int, K: int, dtype: torch.dtype):
    """``(label, run)`` for each launch site of the triton backend: ``run()`` issues its launches (forward and
    backward) on meta tensors. Mirrors what :class:`saefast.Ensemble` calls in a training step and at inference.

    AuxK is built at the largest ``aux_k`` the fused pass takes (``MAX_K_WITH_AUX``); a larger one (the default
    ``d/2`` at LLM scale) runs on torch ops over the dead latents (:func:`saefast.ops.topk_over_latents`), which
    have no kernel to build. The largest fused ``k`` (:func:`saefast.kernels.topk_encode.max_k`) is built too."""
    from saefast.kernels.topk_encode import MAX_K_WITH_AUX, max_k

    aux_k = min(MAX_K_WITH_AUX, M)
    candidates = min(M, ops.BATCHTOPK_CAPACITY * K)
    capacity = ops.jumprelu_capacity(M)

    def params():
        W_enc, W_dec = _meta(J, M, D, dtype=dtype, grad=True), _meta(J, M, D, dtype=dtype, grad=True)
        b_enc, b_dec = _meta(J, M, dtype=dtype, grad=True), _meta(J, D, dtype=dtype, grad=True)
        return _meta(N, D, dtype=dtype, grad=True), W_enc, b_enc, b_dec, W_dec

    def topk(k: int, with_aux: bool, deterministic: bool):
        def run():
            x, W_enc, b_enc, b_dec, W_dec = params()
            dead = _meta(J, M, dtype=torch.bool) if with_aux else None
            codes, aux = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, aux_k if with_aux else 0, backend="triton")
            loss = ops.decode_members_sparse(codes, W_dec, "triton").float().sum()
            if aux is not None:
                loss = loss + ops.decode_members_sparse(aux, W_dec, "triton").float().sum()
            _backward(loss, deterministic)
            ops.remove_parallel_grad_(W_dec.detach(), W_dec.grad, "triton")
        return run

    def fused_training_step(k: int):
        # the training step's forward and backward (saefast.models.dictionary.training_terms): codes without
        # gradient, then the decode as one node whose backward is the fused sparse pass (AuxK's slots included)
        def run():
            x, W_enc, b_enc, b_dec, W_dec = params()
            with torch.no_grad():
                codes, aux = ops.topk_encode(x, W_enc, b_enc, b_dec, k, _meta(J, M, dtype=torch.bool), aux_k,
                                             backend="triton")
            y, y_aux = ops.sparse_sae_outputs(x, W_enc, b_enc, b_dec, W_dec, codes, aux, backend="triton")
            (y.float().sum() + y_aux.float().sum()).backward()
        return run

    def inference_decode():
        x, W_enc, b_enc, b_dec, W_dec = params()
        codes, _ = ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend="triton")
        mask = _meta(N, J, K, dtype=torch.bool)  # feature sharpening's per-row latent mask
        ops.decode(codes, W_dec, b_dec, 1.0 / J, mask, backend="triton").float().sum().backward()

    def jumprelu():
        x, W_enc, b_enc, b_dec, W_dec = params()
        bias = ops.folded_bias(W_enc, b_enc, b_dec).float()
        values, indices, _, _ = torch.ops.saefast.threshold_encode(x, W_enc, bias, _meta(J, M), capacity)
        ops.decode_members_sparse(ops.SparseCodes(values, indices, M), W_dec, "triton").float().sum().backward()

    def adam():
        # the optimizer step of a training step: SAEAdam's fused pass per parameter (saefast.training.optimizer)
        for shape, unit_rows in (((J, M, D), True), ((J, M, D), False), ((J, M), False), ((J, D), False)):
            tensors = [_meta(*shape) for _ in range(4)]  # fp32 master weights and moments, whatever the dtype
            ops.adam_step_(*tensors, 1, 1e-4, 0.9, 0.999, 1e-8, unit_rows=unit_rows, backend="triton")

    yield f"topk k={K} + AuxK aux_k={aux_k}", topk(min(K, aux_k), True, False)
    yield f"training step, fused sparse backward: topk k={K} + AuxK aux_k={aux_k}", fused_training_step(min(K, aux_k))
    yield f"topk k={K}, deterministic backward", topk(K, False, True)
    yield f"batchtopk candidates {candidates}", topk(candidates, False, False)
    largest = min(M, max_k(dtype, with_aux=False))
    yield f"largest fused k={largest}", topk(largest, False, False)
    yield f"inference decode (alpha=1/J, mask, bias) k={K}", inference_decode
    yield f"jumprelu capacity {capacity}", jumprelu
    yield "Adam step (decoder rows: projection, Adam, renormalisation; elementwise)", adam


def build_all(archs: list[int], shapes: list[str], dtypes: list[torch.dtype]) -> list[dict]:
    """Compile every launch site for every arch / shape / dtype; one row per distinct build."""
    rows: dict[tuple, dict] = {}
    for arch in archs:
        with compile_for(arch) as builds:
            for shape_name in shapes:
                for shape in SHAPES[shape_name]:
                    for dtype in dtypes:
                        for label, run in _steps(**shape, dtype=dtype):
                            first = len(builds)
                            started = time.perf_counter()
                            run()
                            seconds = time.perf_counter() - started
                            for build in builds[first:]:
                                key = (arch, build.kernel, json.dumps(build.constexprs, sort_keys=True, default=str),
                                       tuple(build.dtypes))
                                row = rows.setdefault(key, {**dataclasses.asdict(build), "sites": []})
                                site = f"{shape_name} {_dims(shape)} {str(dtype).removeprefix('torch.')}: {label}"
                                row["sites"].append(site)
                            print(f"sm_{arch} {shape_name} {_dims(shape)} {dtype}: {label}: "
                                  f"{len(builds) - first} launches, {seconds:.1f} s", flush=True)
    return list(rows.values())


def _dims(shape: dict) -> str:
    return "N={N} D={D} J={J} M={M} K={K}".format(**shape)


def problems(row: dict) -> list[str]:
    """What is wrong with one build for its architecture (empty: fine): limits a launch cannot exceed (registers,
    shared memory) anywhere; register spills where they cost throughput, at the ``llm`` shape (a spill at the tests'
    small shapes is reported in the table, not counted)."""
    found = []
    at_scale = any(site.startswith("llm ") for site in row["sites"])
    if at_scale and (row["stack_bytes"] or row["local_bytes"]):
        found.append(f"spills: {row['stack_bytes']} B stack frame, {row['local_bytes']} B local memory per thread")
    threads = 32 * row["num_warps"]
    if row["registers"] > 255 or row["registers"] * threads > REGISTERS_PER_SM_BLOCK:
        found.append(f"{row['registers']} registers x {threads} threads exceed a block's register file")
    limit = SHARED_PER_BLOCK.get(row["arch"])
    if limit is not None and row["shared_bytes"] > limit:
        found.append(f"{row['shared_bytes']} B shared memory > {limit} B per block on sm_{row['arch']}")
    return found


def markdown(rows: list[dict]) -> str:
    lines = ["| arch | kernel | dtypes | constexprs | warps | regs | spill (stack/local B) | shared B | first site |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["sites"][0])):
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {'/'.join(sorted(set(r['dtypes'])))} | {consts} | "
                     f"{r['num_warps']} | {r['registers']} | {r['stack_bytes']}/{r['local_bytes']} | "
                     f"{r['shared_bytes']} | {r['sites'][0]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["llm", "small"])
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"],
                        default=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, help="write the builds (resources, specialisation, sites) here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--check", action="store_true", help="exit 1 if any build spills or exceeds a limit")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows = build_all(args.arch, args.shape, [getattr(torch, d) for d in args.dtype])
    bad = [(r, p) for r in rows for p in problems(r)]
    summary = {
        "triton": __import__("triton").__version__, "torch": torch.__version__,
        "commit": __import__("saefast.bench", fromlist=["git_revision"]).git_revision(),
        "archs": args.arch, "shapes": args.shape, "dtypes": args.dtype,
        "builds": len(rows), "problems": len(bad), "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        _write_atomic(args.json, json.dumps({"summary": summary, "builds": rows}, indent=1, default=str) + "\n")
    if args.markdown:
        _write_atomic(args.markdown, markdown(rows))
    print(markdown(rows))
    print(json.dumps(summary))
    for row, problem in bad:
        print(f"PROBLEM sm_{row['arch']} {row['kernel']} {row['constexprs']} {row['dtypes']}: {problem} "
              f"(at {row['sites'][0]})", file=sys.stderr)
    return 1 if args.check and bad else 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
