"""The Triton path against eager PyTorch for the three SAE-ensemble hot spots, with peak memory.

    python bench/bench_kernels.py --preset llm --json bench/results/gpu_kernels.json     # on a GPU
    python bench/bench_kernels.py --preset tiny                                         # smoke run (any device)

Cases, both backends on identical inputs (``saefast.ops`` with ``backend="torch"`` vs ``"triton"``):

* ``encode``  — TopK codes of ``x [N, d]`` for ``J`` stacked encoders: eager builds the dense ``N × J·M``
  pre-activations and runs ``torch.topk``; Triton fuses the GEMM with a running top-k.
* ``decode``  — ``x̂ = Σ_j α (Σ_k z·W_dec[j, idx] + b_dec_j)``: eager ``embedding_bag``; Triton one launch.
* ``step``    — forward + backward of a per-member reconstruction loss through encode and decode (what a
  training step costs before the optimizer): gradients for x, W_enc, b_enc, W_dec, b_dec.

Before timing, each Triton output is compared with eager on the same input (codes as sets of latents with
their values; reconstructions and gradients to a dtype-dependent tolerance); a mismatch is reported as an
error and gets no timing. Timing: median of ``--repeats`` after ``--warmup`` (CUDA events on a GPU);
peak memory: ``torch.cuda.max_memory_allocated`` around each case (GPU only). The JSON records device,
versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from report import commit, write_json

from saefast import ops
from saefast.codes import SparseCodes

PRESETS = {
    # The LLM scale: Gemma-2-2B-like width, 16k latents per member, 8 members, bf16.
    "llm": dict(N=8192, D=2304, J=8, M=16384, K=64, dtype="bfloat16"),
    "pythia": dict(N=8192, D=768, J=8, M=16128, K=128, dtype="bfloat16"),
    "small": dict(N=4096, D=512, J=8, M=4096, K=32, dtype="float32"),
    # Runs anywhere (the CPU under TRITON_INTERPRET=1): checks the script, not the speed.
    "tiny": dict(N=64, D=48, J=2, M=96, K=8, dtype="float32"),
}


def _inputs(N, D, J, M, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    W_dec = torch.randn(J, M, D, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.clone()
    b_enc = 0.01 * torch.randn(J, M, generator=g)
    b_dec = 0.1 * torch.randn(J, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, W_enc, b_enc, W_dec, b_dec)]


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, warmup, repeats):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        return run

    def run_cpu(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)
    return run_cpu


def _peak(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cases(shape: dict, device: torch.device):
    N, D, J, M, K = (shape[key] for key in ("N", "D", "J", "M", "K"))
    dtype = getattr(torch, shape["dtype"])
    x, W_enc, b_enc, W_dec, b_dec = _inputs(N, D, J, M, dtype, device)
    alpha = 1.0 / J

    def encode(backend):
        return lambda: ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend=backend)[0]

    codes = ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend="torch")[0]
    codes = SparseCodes(codes.values.to(dtype), codes.indices, M)

    def decode(backend):
        return lambda: ops.decode(codes, W_dec, b_dec, alpha, backend=backend)

    def step(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, W_dec, b_dec)]

        def run():
            lx, lWe, lbe, lWd, lbd = leaves
            z, _ = ops.topk_encode(lx, lWe, lbe, lbd, K, backend=backend)
            z = SparseCodes(z.values.to(dtype), z.indices, M)
            y = ops.decode_members(z, lWd, backend) + lbd.unsqueeze(0)
            loss = (y.float() - lx.float().unsqueeze(1)).pow(2).sum() / N
            return torch.autograd.grad(loss, leaves)
        return run

    return {"encode": encode, "decode": decode, "step": step}


def _check(case: str, got, want, dtype: torch.dtype) -> str | None:
    """None when the Triton result agrees with eager, else what differs."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if case == "encode":
        a, b = got.indices.sort(-1), want.indices.sort(-1)
        same = (a.values == b.values).float().mean().item()
        if same < 0.999:  # ties and rounding may swap a few near-equal latents
            return f"selected latents differ in {100 * (1 - same):.2f}% of slots"
        diff = (got.values.gather(-1, a.indices) - want.values.gather(-1, b.indices)).abs().max().item()
        scale = want.values.abs().max().item()
        return None if diff <= tol * max(scale, 1.0) else f"values differ by {diff:.3g} (scale {scale:.3g})"
    pairs = [(got, want)] if case == "decode" else list(zip(got, want))
    for index, (a, b) in enumerate(pairs):
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        if not diff <= tol * max(scale, 1.0):
            return f"output {index} differs by {diff:.3g} (scale {scale:.3g})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llm")
    parser.add_argument("--cases", default="encode,decode,step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (inside ops' kernels)
    shape = PRESETS[args.preset]
    timer = _timer(device)
    cases = _cases(shape, device)
    results = []
    for case in args.cases.split(","):
        make = cases[case]
        eager_fn = make("torch")
        eager_out = eager_fn()
        row = {"case": case, "shape": shape}
        try:
            triton_fn = make("triton")
            error = _check(case, triton_fn(), eager_out, getattr(torch, shape["dtype"]))
        except Exception as err:  # a backend that fails gets an error in the report, not a number
            error = f"{type(err).__name__}: {err}"
        eager_ms = timer(eager_fn, args.warmup, args.repeats)
        row["eager"] = {"ms": eager_ms, "peak_mem_bytes": _peak(eager_fn, device),
                        "tokens_per_s": shape["N"] / eager_ms * 1000}
        if error is None:
            triton_ms = timer(triton_fn, args.warmup, args.repeats)
            row["triton"] = {"ms": triton_ms, "peak_mem_bytes": _peak(triton_fn, device),
                             "tokens_per_s": shape["N"] / triton_ms * 1000, "speedup_vs_eager": eager_ms / triton_ms}
        row["error"] = error
        results.append(row)
        print(json.dumps(row))
    import triton

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "commit": commit(),
              "preset": args.preset, "results": results}
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
