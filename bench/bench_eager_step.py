"""Eager baselines of one bagging training step: a per-member Python loop vs the stacked member axis.

    python bench/bench_eager_step.py --members 8 --d-in 512 --latents 4096 --k 32 --tokens 4096 --json out.json

The per-member loop trains standalone saefast SAEs one after another (how public trainers run ensembles);
the stacked version is saefast's eager reference with the member axis. Both use the same eager ops and
run forward + backward + Adam on identical data; the ratio is taken in one run. Timing is the median of
``--repeats`` steps after ``--warmup`` steps, rotating input batches.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

import saefast as sf
from saefast.dictionary import SparseDictionary


def _one_step(model: SparseDictionary, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    terms, z = model._terms(x)
    terms.loss.backward()
    model._project_decoder_grad(slice(None))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model._normalize_decoder(slice(None))
    model._record_firing(z, slice(None))


def _time(step, batches: list[torch.Tensor], warmup: int, repeats: int) -> float:
    for i in range(warmup):
        step(batches[i % len(batches)])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    cfg = sf.SAEConfig(d_in=args.d_in, n_latents=args.latents, k=args.k)
    batches = [torch.randn(args.tokens, args.d_in) for _ in range(3)]
    bag = sf.Ensemble.bagging(cfg, args.members)
    bag.b_dec_initialized.fill_(True)
    bag_opt = torch.optim.Adam(bag.parameters(), lr=1e-4)
    members = [sf.SAE(cfg, seed=j) for j in range(args.members)]
    member_opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in members]

    def loop_step(x: torch.Tensor) -> None:
        for model, optimizer in zip(members, member_opts):
            _one_step(model, optimizer, x)

    stacked = _time(lambda x: _one_step(bag, bag_opt, x), batches, args.warmup, args.repeats)
    loop = _time(loop_step, batches, args.warmup, args.repeats)
    encoder_flops = 2 * args.tokens * args.d_in * args.members * args.latents
    result = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": _commit(),
        "shape": vars(args) | {"json": None},
        "results": [
            {"backend": "eager_loop", "ms": loop * 1e3, "tokens_per_s": args.tokens / loop},
            {"backend": "eager_stacked", "ms": stacked * 1e3, "tokens_per_s": args.tokens / stacked,
             "speedup_vs_eager_loop": loop / stacked},
        ],
        "encoder_gemm_gflop": encoder_flops / 1e9,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
