"""One bagging training step (forward + backward + Adam + decoder renorm): eager loops vs the native extension.

    python bench/bench_step.py --members 8 --d-in 512 --latents 4096 --k 32 --tokens 4096 \
        --json bench/results/cpu_step.json

Backends, all on identical data, timed in one run so that the ratios compare like with like:

* ``eager_loop``    — standalone saefast SAEs trained one after another on the torch backend (how public trainers
  run an ensemble: a Python loop over members, dense pre-activations, ``torch.topk``);
* ``eager_stacked`` — saefast's eager reference with the member axis stacked (one GEMM for all members);
* ``native``        — the same ensemble on ``backend="native"`` (csrc/: tiled GEMM + running top-k, OpenMP
  sparse decode and sparse backward), when the extension is built;
* ``encoder_gemm``  — the floor: the dense encoder GEMM ``x · W_encᵀ`` (``2·N·d·J·M`` FLOP) alone.

Before timing, the native step's loss, codes and gradients are compared with the eager stacked step on the same
batch; a mismatch is an error and gets no number. Timing: median of ``--repeats`` steps after ``--warmup``,
rotating input batches, the backends interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from report import commit, write_json

import saefast as sf
from saefast.dictionary import SparseDictionary


def _one_step(model: SparseDictionary, optimizer: torch.optim.Optimizer, x: torch.Tensor, backend: str) -> None:
    terms, z = model._terms(x, backend=backend)
    terms.loss.backward()
    model._project_decoder_grad(slice(None))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model._normalize_decoder(slice(None))
    model._record_firing(z, slice(None))


def _check_native(cfg: sf.SAEConfig, members: int, x: torch.Tensor) -> str | None:
    """Native vs eager stacked on one batch (loss and every gradient); an error message, or None when they agree."""
    grads = []
    for backend in ("torch", "native"):
        model = sf.Ensemble.bagging(cfg, members)
        model.b_dec_initialized.fill_(True)
        terms, _ = model._terms(x, backend=backend)
        terms.loss.backward()
        grads.append({"loss": terms.loss.detach()} | {n: p.grad for n, p in model.named_parameters()})
    for name, want in grads[0].items():
        got = grads[1][name]
        err = float((got - want).abs().max())
        if err > 1e-4 * max(float(want.abs().max()), 1e-6) + 1e-6:
            return f"native {name} differs from eager by {err:.3e}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the (slow) eager per-member loop")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    J, D, M, N = args.members, args.d_in, args.latents, args.tokens
    sf.cpu.reuse_freed_memory()  # as saefast.train does on the CPU; every backend below runs with it
    cfg = sf.SAEConfig(d_in=D, n_latents=M, k=args.k)
    batches = [torch.randn(N, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = []

    steps = {}
    W_flat = torch.randn(J * M, D) / D**0.5
    bias = torch.zeros(J * M)
    steps["encoder_gemm"] = lambda x: torch.addmm(bias, x, W_flat.T)

    def stacked_step(backend: str):
        model = sf.Ensemble.bagging(cfg, J)
        model.b_dec_initialized.fill_(True)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        return lambda x: _one_step(model, optimizer, x, backend)

    steps["eager_stacked"] = stacked_step("torch")
    error = None
    if sf.native.available():
        error = _check_native(cfg, J, batches[0][:512])
        if error is None:
            steps["native"] = stacked_step("native")
    else:
        error = f"extension not built: {sf.native.why_unavailable()}"
    if not args.skip_loop:
        members = [sf.SAE(cfg, seed=j) for j in range(J)]
        for m in members:
            m.b_dec_initialized.fill_(True)
        member_opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in members]

        def loop_step(x: torch.Tensor) -> None:
            for model, optimizer in zip(members, member_opts):
                _one_step(model, optimizer, x, "torch")

        steps["eager_loop"] = loop_step
    # Round robin (one step of each backend per round), so that a slow phase of this shared machine hits every
    # backend alike; the median over rounds is reported.
    samples = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(batches[i % len(batches)])
            if i >= args.warmup:
                samples[name].append(time.perf_counter() - start)
    timings = {name: statistics.median(times) for name, times in samples.items()}

    base = timings.get("eager_loop")
    for backend in ("eager_loop", "eager_stacked", "native", "encoder_gemm"):
        if backend not in timings:
            if backend == "native":
                results.append({"backend": backend, "ok": False, "error": error})
            continue
        s = timings[backend]
        results.append({
            "backend": backend, "ok": True, "ms": s * 1e3, "tokens_per_s": N / s,
            "speedup_vs_eager_loop": base / s if base else None,
            "ratio_to_encoder_gemm": s / timings["encoder_gemm"], "error": None,
        })
    report = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit(),
        "shape": {"members": J, "d_in": D, "latents": M, "k": args.k, "tokens": N, "dtype": "float32"},
        "encoder_gemm_gflop": 2 * N * D * J * M / 1e9,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    write_json(report, args.json)


if __name__ == "__main__":
    main()
