"""One process with T threads against T processes with one thread each, for member- and data-parallel bagging.

    python bench/bench_distributed.py --json bench/results/distributed/cpu.json \
        --markdown bench/results/distributed/cpu.md

Every configuration is a real ``saefast train`` run on the same synthetic store (fp32 rows, ``--d`` wide):

* ``1 proc × T threads``: the single-process run (``OMP_NUM_THREADS=T``);
* ``T procs × 1 thread, members``: ``torchrun --nproc_per_node=T ... --parallel members``;
* ``T procs × 1 thread, data``: ``torchrun --nproc_per_node=T ... --parallel data`` (gloo all-reduce of the
  gradients, ``S = 4·J·(2·M·d + M + d)`` bytes per step).

The time is the training loop's own (``run.json``'s ``seconds``: from the first batch to the last step, including
the final checkpoint; not the interpreter start or the process-group rendezvous), per step. Configurations run
interleaved, round after round (a slow phase of a shared machine hits all of them), and the median of
``--repeats`` rounds is reported with the ratio to the single process; the JSON records versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import commit, write_json

from saefast.data.store import write_store

SHAPES = {
    "cpu-small": {"members": 4, "latents": 1024, "d": 256, "k": 16, "batch": 1024, "steps": 30},
    "cpu": {"members": 8, "latents": 4096, "d": 512, "k": 32, "batch": 4096, "steps": 8},
}
"""The ``saefast bench`` presets' bagging shapes (J members × M latents, width d, top-k, tokens per step)."""


def _train(store: Path, out: Path, shape: dict, threads: int, parallel: str | None, nproc: int) -> float:
    """Seconds per step of one ``saefast train`` run."""
    args = ["train", "--data", str(store), "--out", str(out), "--kind", "bagging", "--members", str(shape["members"]),
            "--latents", str(shape["latents"]), "--k", str(shape["k"]), "--batch-size", str(shape["batch"]),
            "--steps", str(shape["steps"]), "--checkpoint-minutes", "0", "--no-progress"]
    launcher = [sys.executable, "-m", "saefast"]
    if parallel:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "saefast"]
        args += ["--parallel", parallel]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    return run["seconds"] / run["steps_this_session"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--procs", type=int, default=2, help="T: threads of the single process = processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    T = args.procs
    configs = {f"1 proc × {T} threads": (T, None), f"{T} procs × 1 thread, members": (1, "members"),
               f"{T} procs × 1 thread, data": (1, "data")}
    report = {"device": f"cpu ({platform.machine()}), {os.cpu_count()} cores", "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(), "procs": T, "repeats": args.repeats,
              "shapes": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            shape = SHAPES[name]
            store = Path(tmp) / f"store-{name}"
            generator = torch.Generator().manual_seed(0)
            rows_needed = shape["batch"] * shape["steps"]
            write_store(store, torch.randn(rows_needed, shape["d"], generator=generator), shard_tokens=65536)
            times: dict[str, list[float]] = {label: [] for label in configs}
            for round_ in range(args.repeats):
                for label, (threads, parallel) in configs.items():
                    out = Path(tmp) / f"run-{name}-{round_}-{len(times[label])}-{parallel}"
                    times[label].append(_train(store, out, shape, threads, parallel, T))
            J, M, d = shape["members"], shape["latents"], shape["d"]
            medians = {label: statistics.median(values) for label, values in times.items()}
            base = medians[f"1 proc × {T} threads"]
            report["shapes"][name] = {
                **shape, "allreduce_bytes_per_step": 4 * J * (2 * M * d + M + d),
                "seconds_per_step": times, "median_ms_per_step": {k: 1e3 * v for k, v in medians.items()},
                "speedup_vs_single_process": {k: base / v for k, v in medians.items()},
            }
            for label, median in medians.items():
                rows.append(f"| {name} (J = {J} × {M:,}, d = {d}, N = {shape['batch']:,}) | {label} | "
                            f"{1e3 * median:,.1f} | {base / median:.2f}× |")
    table = ["| shape | configuration | ms per step (median) | speed vs 1 process |", "|---|---|---:|---:|", *rows]
    text = "\n".join(table)
    print(text)
    write_json(report, args.json)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(
            f"Measured at {report['commit']} on {report['device']}, torch {report['torch']}, median of "
            f"{args.repeats} interleaved rounds (`python bench/bench_distributed.py`).\n\n{text}\n")


if __name__ == "__main__":
    main()
