"""Throughput of the data path: harvesting activations from SmolLM2-135M and streaming them from the store.

    python bench/bench_data.py --json bench/results/cpu_data.json

* **forward**: one batch of ``--batch-size`` windows of ``--context`` tokens through the whole model vs.
  through :class:`saefast.harvest.Capture`, which stops the forward after the hooked block (``--layer``).
* **harvest**: ``saefast.harvest`` end to end (tokenize, forward, exclude positions, write shards + manifest)
  into a temporary store, tokens/s.
* **reader**: one shuffled epoch of ``store.batches(--read-batch)`` converted to fp32, rows/s, over a bf16
  store of ``--read-rows`` random rows of the model's width, with ``verify="none"`` and with the default lazy
  sha256 check (which hashes every shard on its first read).

Medians of ``--repeats`` after one warm-up, on the same machine in one run; the JSON records versions and commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import commit, write_json

import saefast as sf
from saefast.bench import time_interleaved
from saefast.data.hooks import Capture
from saefast.data.text import token_windows


def _median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (the harness's timer)."""
    return statistics.median(time_interleaved({"call": lambda _: fn()}, [None], 1, repeats)["call"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--harvest-tokens", type=int, default=16_384)
    parser.add_argument("--read-batch", type=int, default=4096)
    parser.add_argument("--read-rows", type=int, default=262_144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model, tokenizer = sf.load_model("smollm2", progress=False)
    hook = sf.layer_hook(model, args.layer)
    windows = token_windows(tokenizer, sf.pydoc_topics(), args.context)
    batch = torch.stack([windows[i] for i in range(args.batch_size)])
    tokens_per_batch = batch.numel()

    with torch.inference_mode():
        full = _median_seconds(lambda: model(input_ids=batch, use_cache=False), args.repeats)
        with Capture(model, [hook]) as capture:
            early = _median_seconds(lambda: capture.run(batch), args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = sf.harvest(model, Path(tmp) / "acts", [hook], args.harvest_tokens, tokenizer=tokenizer,
                           texts=sf.pydoc_topics(), context=args.context, batch_size=args.batch_size,
                           progress=False)
        harvest_seconds = time.perf_counter() - start

        n_tokens, d = store.n_tokens, store.d
        big = sf.write_store(Path(tmp) / "big", torch.randn(args.read_rows, d), dtype=torch.bfloat16)

        def epoch(verify: str) -> float:
            view = sf.ActivationStore(big.path, verify=verify)
            start = time.perf_counter()
            rows = sum(x.shape[0] for x in view.batches(args.read_batch, seed=0))
            assert rows == view.n_tokens
            return view.n_tokens / (time.perf_counter() - start)

        epoch("none")  # warm the page cache: both variants then read from memory
        read_none = statistics.median(epoch("none") for _ in range(args.repeats))
        read_lazy = statistics.median(epoch("lazy") for _ in range(args.repeats))

    report = {
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": commit(),
        "model": "smollm2 (SmolLM2-135M, GGUF Q4_1 dequantized to fp32)",
        "hook": hook,
        "forward_batch": {"windows": args.batch_size, "context": args.context, "tokens": tokens_per_batch},
        "full_forward_ms": 1000 * full,
        "early_stop_forward_ms": 1000 * early,
        "early_stop_speedup": full / early,
        "harvest": {"tokens": n_tokens, "d": d, "seconds": harvest_seconds,
                    "tokens_per_s": n_tokens / harvest_seconds},
        "reader": {"rows": args.read_rows, "dtype": "bfloat16", "batch": args.read_batch,
                   "rows_per_s_verify_none": read_none,
                   "rows_per_s_verify_lazy_first_epoch": read_lazy},
    }
    print(json.dumps(report, indent=2))
    write_json(report, args.json)


if __name__ == "__main__":
    main()
