"""Time and memory of the feature browser (``saefast.browse``) per million tokens, at a given number of latents.

    python bench/bench_browse.py --json bench/results/browse/cpu.json

A bagging ensemble of ``--members`` × ``--latents`` latents (random init) over a synthetic store of ``--tokens``
fp32 rows of width ``--d`` with token ids; no language model (token strings are ids, no logits). Reports the scan's
tokens/s, the contexts' examples/s, the whole run's seconds, the bytes of the per-latent statistics and the peak
resident memory, and from them the time per million tokens and the statistics for 100 k latents.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from report import commit, write_json

import saefast as sf
from saefast.browse import browse
from saefast.data.store import write_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store", torch.randn(args.tokens, args.d, generator=generator),
                            extras={"token_ids": torch.randint(0, 50_000, (args.tokens,), generator=generator,
                                                               dtype=torch.int32)})
        model = sf.Ensemble.bagging(sf.SAEConfig(d_in=args.d, n_latents=args.latents, k=args.k), args.members)
        start = time.perf_counter()
        summary = browse(model, store, Path(tmp) / "site", progress=False)
        seconds = time.perf_counter() - start
    latents = args.members * args.latents
    per_latent = summary["statistics_bytes"] / latents
    report = {"device": f"cpu ({platform.machine()}), {os.cpu_count()} cores", "torch": torch.__version__,
              "commit": commit(), "members": args.members, "latents_per_member": args.latents, "d": args.d,
              "k": args.k, "tokens": args.tokens, "seconds": seconds, "scan_seconds": summary["scan_seconds"],
              "context_seconds": summary["context_seconds"],
              "scan_seconds_per_million_tokens": summary["scan_seconds"] * 1e6 / args.tokens,
              "context_seconds_per_latent": summary["context_seconds"] / (args.members * args.latents),
              "statistics_bytes": summary["statistics_bytes"], "statistics_bytes_per_latent": per_latent,
              "statistics_bytes_at_100k_latents": per_latent * 100_000,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    for key, value in report.items():
        print(f"{key}: {value}")
    write_json(report, args.json)


if __name__ == "__main__":
    main()
