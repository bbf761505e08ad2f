"""Grouped matmul across ensemble members: ``saefast.ops.grouped_mm`` (native) vs a Python loop of ``torch.mm`` and
``torch._grouped_mm``.

    python bench/bench_grouped_mm.py --json bench/results/cpu_grouped_mm.json

Cases (fp32, all groups in one call; the result of every backend is checked against the loop before timing):

* ``ragged_rows`` — the encoder of per-member inputs: G members, each its own number of tokens (ragged rows, as
  bootstrap resamples or boosting chains with unequal batches give), times its own ``[D, M]`` encoder;
  ``torch._grouped_mm`` takes it packed (rows concatenated, ``offs``).
* ``ragged_dicts`` — members with different dictionary sizes (ragged columns): no packed torch form.
* ``many_small`` — 64 small groups, where a Python loop's per-call overhead shows.

Timing: median of ``--repeats`` after ``--warmup``, the backends interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
from report import commit, write_json

from saefast import native, ops
from saefast.bench import time_interleaved


def _cases(g: torch.Generator) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor], bool]]:
    D, M = 512, 4096
    rows = [4096 - 384 * i for i in range(8)]
    ragged_rows = ([torch.randn(n, D, generator=g) for n in rows], [torch.randn(D, M, generator=g) for _ in rows], True)
    widths = [1024 * (1 + i % 4) for i in range(8)]
    ragged_dicts = ([torch.randn(2048, D, generator=g) for _ in widths],
                    [torch.randn(D, w, generator=g) for w in widths], False)
    many_small = ([torch.randn(64 + i, 128, generator=g) for i in range(64)],
                  [torch.randn(128, 256, generator=g) for _ in range(64)], True)
    return {"ragged_rows": ragged_rows, "ragged_dicts": ragged_dicts, "many_small": many_small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    results = []
    for case, (a, b, same_weight_shape) in _cases(torch.Generator().manual_seed(0)).items():
        backends = {"torch_loop": lambda a=a, b=b: ops.grouped_mm(a, b, backend="torch")}
        if native.available():
            backends["native"] = lambda a=a, b=b: ops.grouped_mm(a, b, backend="native")
        if same_weight_shape and hasattr(torch, "_grouped_mm"):
            packed, stacked = torch.cat(a), torch.stack(b)
            offs = torch.tensor([t.shape[0] for t in a]).cumsum(0).to(torch.int32)

            sizes = [t.shape[0] for t in a]

            def grouped(packed=packed, stacked=stacked, offs=offs, sizes=sizes):
                return list(torch._grouped_mm(packed, stacked, offs=offs).split(sizes))

            backends["torch_grouped_mm"] = grouped
        want = backends["torch_loop"]()
        errors = {}
        for name, fn in backends.items():
            try:
                got = fn()
                err = max(float((x - y).abs().max()) for x, y in zip(got, want))
                if err > 1e-3:
                    errors[name] = f"differs from the loop by {err:.3e}"
            except Exception as exc:  # a backend that cannot run this case gets an error, not a number
                errors[name] = f"{type(exc).__name__}: {exc}"
        timed = {name: (lambda _, fn=fn: fn()) for name, fn in backends.items() if name not in errors}
        samples = time_interleaved(timed, [None], args.warmup, args.repeats)
        flops = sum(2 * x.shape[0] * x.shape[1] * y.shape[1] for x, y in zip(a, b))
        base = statistics.median(samples["torch_loop"])
        for name in backends:
            entry = {"case": case, "backend": name, "groups": len(a), "gflop": flops / 1e9, "ok": name not in errors,
                     "error": errors.get(name)}
            if name in samples:
                ms = statistics.median(samples[name]) * 1e3
                entry |= {"ms": ms, "gflop_per_s": flops / ms / 1e6, "speedup_vs_torch_loop": base * 1e3 / ms}
            results.append(entry)
    report = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "commit": commit(), "results": results}
    print(json.dumps(report, indent=2))
    write_json(report, args.json)


if __name__ == "__main__":
    main()
