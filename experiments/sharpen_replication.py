"""SAE-ception replication: a task's cycles for the sharpened targets and the paper's controls, over seeds.

    python experiments/sharpen_replication.py --task digits --seeds 0 1 2 \\
        --targets class complement example random --json experiments/results/sharpen_digits.json

Every (target, seed) run is ``saefast.sharpen_tasks.run_task`` with the task's defaults (the same as
``saefast sharpen --task ...``); the seed fixes the split, the classifier's init, the data order and the SAEs, so
for one seed all targets share the same baseline (cycle 0). Prints a markdown table of the mean ± standard
deviation over seeds of each metric per cycle and target.

Runs made in parallel (one process per seed or target group) are combined afterwards, without retraining:

    python experiments/sharpen_replication.py --merge part1.json part2.json --json combined.json

``--plot PNG`` draws the table (mean ± std over the seeds against the cycle, one line per target), also from
saved results: ``--merge experiments/results/sharpen_digits.json --plot docs/images/sharpen_digits.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from report import commit, write_json  # noqa: E402

from saefast.sharpen import TARGETS  # noqa: E402
from saefast.sharpen.tasks import TASKS, run_task  # noqa: E402

SHOWN = [("test_accuracy", "test acc", 4), ("ari", "ARI", 3), ("silhouette_labels", "sil(y)", 3),
         ("silhouette_argmax", "sil(argmax)", 3), ("davies_bouldin", "DB ↓", 3), ("calinski_harabasz", "CH", 1),
         ("uncertainty", "U (bits)", 3), ("csi", "CSI", 3), ("sae_l0", "L0", 1)]


def summary(runs: list[dict]) -> str:
    """Markdown table: one row per (target, cycle), mean ± std over the seeds."""
    lines = ["| target | cycle | " + " | ".join(title for _, title, _ in SHOWN) + " |",
             "|---|---:|" + "|".join("---:" for _ in SHOWN) + "|"]
    for target in dict.fromkeys(run["target"] for run in runs):
        histories = [run["history"] for run in runs if run["target"] == target]
        for cycle in range(len(histories[0])):
            cells = []
            for key, _, digits in SHOWN:
                values = [h[cycle][key] for h in histories if h[cycle][key] == h[cycle][key]]  # drop nan
                if not values:
                    cells.append("nan")
                    continue
                spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.{digits}f}{spread}")
            lines.append(f"| {target} | {cycle} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOTTED = ["test_accuracy", "ari", "silhouette_labels", "silhouette_argmax", "uncertainty", "csi"]
"""The metrics of :func:`plot`, a panel each."""


def plot(runs: list[dict], path: str, title: str) -> None:
    """PNG of each :data:`PLOTTED` metric against the cycle: per target, the mean over the seeds with a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {key: name for key, name, _ in SHOWN}
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), constrained_layout=True)
    for ax, key in zip(axes.flat, PLOTTED):
        for target in dict.fromkeys(run["target"] for run in runs):
            histories = [run["history"] for run in runs if run["target"] == target]
            cycles = list(range(len(histories[0])))
            values = [[h[c][key] for h in histories] for c in cycles]
            mean = [statistics.mean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.plot(cycles, mean, marker="o", label=target)
            ax.fill_between(cycles, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
        ax.set_title(titles[key])
        ax.set_xlabel("cycle")
        ax.set_xticks(cycles)
    axes.flat[0].legend(title="target")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def merge(paths: list[str], out: str | None, plot_path: str | None = None) -> None:
    """Concatenate the runs of several result files of one task (sorted by target, then seed) and print the summary;
    the commits, torch versions and thread counts of the parts are kept per run."""
    import json

    parts = [json.loads(Path(path).read_text()) for path in paths]
    tasks = {part["task"] for part in parts}
    if len(tasks) != 1:
        raise SystemExit(f"--merge needs results of one task, got {sorted(tasks)}")
    runs = []
    for path, part in zip(paths, parts):
        for run in part["runs"]:
            # (a merged file keeps these per run already)
            kept = {"commit": part["commit"], "torch": part.get("torch"), "threads": part.get("threads"),
                    "source": Path(path).name}
            runs.append({**run, **{key: run.get(key, value) for key, value in kept.items()}})
    seen = [(run["target"], run["seed"]) for run in runs]
    if len(seen) != len(set(seen)):
        raise SystemExit("--merge: some (target, seed) run appears twice")
    order = {target: i for i, target in enumerate(TARGETS)}
    runs.sort(key=lambda run: (order[run["target"]], run["seed"]))
    table = summary(runs)
    print(table)
    task = tasks.pop()
    if out:
        write_json({"task": task, "commit": sorted({run["commit"] for run in runs}), "runs": runs, "table": table},
                   out)
    if plot_path:
        seeds = sorted({run["seed"] for run in runs})
        plot(runs, plot_path, f"SAE-ception on {task}: mean ± std over seeds {', '.join(map(str, seeds))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--json", help="write every run's history here")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="combine the runs of these JSON files (of one task) instead of running")
    parser.add_argument("--plot", metavar="PNG", help="draw the metrics against the cycle, per target, here")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json, args.plot)
        return
    revision = commit()  # of the code that runs, before anything can change the checkout
    runs = []
    for seed in args.seeds:
        for target in args.targets:
            start = time.perf_counter()
            report = run_task(args.task, seed=seed, target=target)
            runs.append({"target": target, "seed": seed, "seconds": time.perf_counter() - start,
                         "info": report["info"], "config": report["config"], "sae": report["sae"],
                         "history": report["history"]})
            print(f"{args.task} target={target} seed={seed}: {runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    table = summary(runs)
    print(table)
    if args.plot:
        plot(runs, args.plot, f"SAE-ception on {args.task}")
    write_json({"task": args.task, "commit": revision, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "runs": runs, "table": table}, args.json)


if __name__ == "__main__":
    main()
