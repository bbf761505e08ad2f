"""Sharpened-target generation (``saefast.sharpen.targets``): the fused one-pass path vs the eager dense one.

    python bench/bench_sharpen.py --preset cpu --json bench/results/cpu_sharpen.json

Backends, for a bagging ensemble of J members (the concatenated dictionary of ``L = J·M`` latents) and a batch of
``N`` examples of ``C`` classes with ``top_n`` latents per class mask:

* ``eager_dense`` — :func:`saefast.sharpen.targets_reference`: dense pre-activations, ``torch.topk``, the dense
  ``N × L`` code, multiplied by the dense ``masks[y]`` (``N × L``), dense decode GEMM. What a plain PyTorch user
  writes.
* ``torch_sparse`` — :func:`~saefast.sharpen.targets` on the eager ``torch`` backend: same encoder, then the mask
  gathered at the ``[N, J, K]`` slots and a sparse decode (no ``N × L`` code or mask).
* ``native`` — the same on the C++ extension: the tiled encoder GEMM with a running top-k (the ``N × L``
  pre-activations never exist), slot-mask gather, masked sparse decode. CPU.
* ``triton`` — the same on the Triton kernels (CUDA only).
* ``encoder_gemm`` — ``x @ W_encᵀ`` alone: the floor every path pays.

Each backend's targets are checked against ``eager_dense`` before timing; timing is the median of ``--repeats``
after ``--warmup``, the backends interleaved round by round (the machine may be noisy).
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
from saefast import native, sharpen

PRESETS = {
    # the shape of bench_step.py: J = 8 members of 4,096 latents on d = 512, K = 32, N = 4,096
    "cpu": dict(members=8, d=512, m=4096, k=32, n=4096, classes=10, top_n=256),
    # one SAE on SmolLM2-135M's width
    "cpu-single": dict(members=1, d=576, m=8192, k=32, n=4096, classes=10, top_n=64),
    "tiny": dict(members=2, d=64, m=256, k=8, n=256, classes=4, top_n=16),
    # LLM scale, for a GPU
    "llm": dict(members=8, d=2304, m=16384, k=64, n=8192, classes=10, top_n=1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    revision = commit()  # of the code that runs, before anything can change the checkout
    shape = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    cfg = sf.SAEConfig(d_in=shape["d"], n_latents=shape["m"], k=shape["k"])
    model = (sf.Ensemble.bagging(cfg, shape["members"], seed=0) if shape["members"] > 1 else sf.SAE(cfg, seed=0))
    model = model.to(device).eval()
    x = torch.randn(shape["n"], shape["d"], device=device)
    labels = torch.randint(0, shape["classes"], (shape["n"],), device=device)
    stats = sharpen.class_stats(model, [(x, labels)], backend="torch")
    masks = sharpen.class_masks(stats, top_n=shape["top_n"])
    W_enc = model.W_enc.reshape(-1, shape["d"])

    backends = {"eager_dense": lambda: sharpen.targets_reference(model, x, labels, masks),
                "torch_sparse": lambda: sharpen.targets(model, x, labels, masks, backend="torch")}
    if device.type == "cpu" and native.supports(device):
        backends["native"] = lambda: sharpen.targets(model, x, labels, masks, backend="native")
    if device.type == "cuda":
        backends["triton"] = lambda: sharpen.targets(model, x, labels, masks, backend="triton")
    backends["encoder_gemm"] = lambda: x @ W_enc.t()

    want = backends["eager_dense"]()
    scale = float(want.abs().max())
    errors = {}
    for name, fn in backends.items():
        if name == "encoder_gemm":
            continue
        err = float((fn() - want).abs().max()) / scale
        if err > 1e-4:
            errors[name] = f"differs from eager_dense by {err:.3e} (relative to max |t|)"
    samples = {name: [] for name in backends if name not in errors}
    for i in range(args.warmup + args.repeats):
        for name in samples:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            backends[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                samples[name].append(time.perf_counter() - start)
    base = statistics.median(samples["eager_dense"])
    results = []
    for name in backends:
        entry = {"backend": name, "ok": name not in errors, "error": errors.get(name)}
        if name in samples:
            ms = statistics.median(samples[name]) * 1e3
            entry |= {"ms": ms, "tokens_per_s": shape["n"] / ms * 1e3, "speedup_vs_eager_dense": base * 1e3 / ms,
                      "samples_ms": [s * 1e3 for s in samples[name]]}
        results.append(entry)
    report = {"preset": args.preset, "shape": shape, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "commit": revision, "results": results}
    print(json.dumps(report, indent=2))
    write_json(report, args.json)


if __name__ == "__main__":
    main()
