"""The paper's comparison on real activations: single vs expanded vs bagging vs boosting, over seeds.

    python experiments/ensemble_replication.py --out /tmp/replication --seeds 0 1000 2000 \\
        --results experiments/results/replication

SmolLM2-135M, the residual stream after block 15 (of 30: the middle of the network, the demo's layer), on the
standard library's pydoc text (offline). Per seed, on the same activations:

* a single SAE (M latents, top-k);
* a bagging and a boosting ensemble of J_max members (M latents each); their first J members are the J-member
  ensembles (bagging members are independent, boosting stages sequential, so the first J are exactly what a J-member
  run trains);
* for each J, the expanded SAE with J·M latents and J·k active (the ensemble's L0) and with k active.

Each run is then evaluated as ``saefast eval`` does — reconstruction on held-out rows, the spliced CE/KL on held-out
text after the harvest's windows, sparse probing on three labelled datasets, SCR — into ``RUN/eval.json``, and
``saefast compare`` over every run gives the table with 95 % intervals over the seeds. Everything is resumable: a
trained run or an evaluation already on disk is kept.

The results directory gets ``comparison.json``, ``comparison.md``, ``comparison.png``, each run's ``eval.json``
(``runs/NAME.json``) and ``meta.json`` (settings, commit, timings). Reproduce the table from the runs with
``saefast compare OUT/runs/*``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from report import commit  # noqa: E402

from saefast import SAE, Ensemble, SAEConfig  # noqa: E402
from saefast.cli.compare import run_record  # noqa: E402
from saefast.cli.demo import DemoConfig, LanguageModel, prepare_activations, spliced_windows  # noqa: E402
from saefast.cli.runs import read_evaluation, record_evaluation  # noqa: E402
from saefast.data.examples import cached_example_activations  # noqa: E402
from saefast.data.harvest import special_token_ids  # noqa: E402
from saefast.data.labelled import PROBING_DATASETS, DatasetUnavailable, probing_dataset, scr_dataset  # noqa: E402
from saefast.eval import evaluate, sparse_probing, spliced_lm, spurious_correlation_removal  # noqa: E402
from saefast.eval.comparison import (  # noqa: E402
    compare_records,
    comparison_markdown,
    format_comparison,
    plot_comparison,
)
from saefast.eval.probing import mean_over_datasets  # noqa: E402
from saefast.files import atomic_write_bytes  # noqa: E402
from saefast.models import load  # noqa: E402
from saefast.training import train  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/saefast_replication", help="runs, activations and caches (large)")
    p.add_argument("--results", default="experiments/results/replication", help="where the small results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000],
                   help="member j of seed s starts from SAE(seed=s + j): space the seeds by more than J")
    p.add_argument("--members", type=int, nargs="+", default=[2, 4, 8], help="ensemble sizes J")
    p.add_argument("--latents", type=int, default=1152, help="latents per member M (default: 2·d)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per model (per stage for boosting)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--train-tokens", type=int, default=65_536)
    p.add_argument("--eval-tokens", type=int, default=8_192)
    p.add_argument("--spliced-tokens", type=int, default=4_096)
    p.add_argument("--per-class", type=int, default=300, help="texts per class of each probing dataset")
    p.add_argument("--scr-per-cell", type=int, default=200)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args()


def planned_runs(args: argparse.Namespace, d: int) -> list[tuple[str, Any]]:
    """``(name, builder)`` of every model to train, per seed; heads are taken after training."""
    cfg = SAEConfig(d_in=d, n_latents=args.latents, k=args.k, activation="topk")
    top = max(args.members)
    plan = []
    for seed in args.seeds:
        plan.append((f"single-s{seed}", lambda s=seed: SAE(cfg, seed=s)))
        for combine in ("bagging", "boosting"):
            plan.append((f"{combine}-J{top}-s{seed}", lambda s=seed, c=combine: Ensemble(cfg, top, c, seed=s)))
        for j in args.members:
            plan.append((f"expanded-jk-J{j}-s{seed}",
                         lambda s=seed, j=j: SAE(cfg.replace(n_latents=j * args.latents, k=j * args.k), seed=s)))
            plan.append((f"expanded-k-J{j}-s{seed}",
                         lambda s=seed, j=j: SAE(cfg.replace(n_latents=j * args.latents), seed=s)))
    return plan


def train_all(args: argparse.Namespace, store: Any, runs: Path) -> dict[str, float]:
    """Train every planned model not yet on disk (its seed also orders its batches); save the ensembles' heads."""
    seconds: dict[str, float] = {}  # this invocation's
    train_store = store.subset(0, args.train_tokens)
    for name, build in planned_runs(args, store.d):
        out = runs / name
        if (out / "config.json").is_file():
            continue
        model = build()
        seed = int(name.rsplit("-s", 1)[1])
        batches = train_store.batches(args.batch_size, seed=seed, epochs=None, drop_last=True)
        start = time.perf_counter()
        train(model, batches, steps=args.steps, lr=args.lr, seed=seed, progress=not args.no_progress,
              log_every=args.steps)
        seconds[name] = time.perf_counter() - start
        print(f"trained {name} in {seconds[name]:.0f} s", flush=True)
        model.save(out)
        (out / "train_seconds.txt").write_text(f"{seconds[name]:.3f}\n")  # kept for meta.json on a rerun
    for seed in args.seeds:
        for combine in ("bagging", "boosting"):
            full = load(runs / f"{combine}-J{max(args.members)}-s{seed}")
            for j in args.members:
                if j != max(args.members) and not (runs / f"{combine}-J{j}-s{seed}" / "config.json").is_file():
                    full.head(j).save(runs / f"{combine}-J{j}-s{seed}")
    return seconds


def evaluate_all(args: argparse.Namespace, store: Any, language_model: LanguageModel, runs: Path,
                 cache: Path) -> None:
    """Every section of ``eval.json`` that a run lacks: store, spliced, probing, scr."""
    lm, tokenizer = language_model.get()
    hook = store.hook
    held_out = store.read(args.train_tokens, args.train_tokens + args.eval_tokens)
    config = DemoConfig(layer=args.layer, context=256, train_tokens=args.train_tokens, eval_tokens=args.eval_tokens,
                        spliced_tokens=args.spliced_tokens)
    windows = spliced_windows(config, store, tokenizer)
    datasets = {}
    for name in PROBING_DATASETS:
        try:
            datasets[name] = probing_dataset(name, per_class=args.per_class, seed=0)
        except DatasetUnavailable as err:
            print(f"skipping {name}: {err}", flush=True)
    scr_data = scr_dataset(per_cell=args.scr_per_cell, seed=0)
    acts = {name: cached_example_activations(lm, tokenizer, hook, data.texts, cache_dir=cache, batch_size=16,
                                             progress=not args.no_progress, description=name)
            for name, data in {**datasets, scr_data.name: scr_data}.items()}
    baselines: dict[str, float] = {}
    for run in sorted(p for p in runs.iterdir() if (p / "config.json").is_file()):
        recorded = read_evaluation(run) or {}
        model = load(run)
        result: dict[str, Any] = {"model": str(run)}
        start = time.perf_counter()
        if "explained_variance" not in recorded:
            result.update(evaluate(model, held_out), hook=hook, start=args.train_tokens,
                          stop=args.train_tokens + args.eval_tokens)
        if "spliced" not in recorded:
            result["spliced"] = {**spliced_lm(lm, hook, model, windows, batch_size=8,
                                              special_ids=special_token_ids(lm, tokenizer), exclude_first=2,
                                              progress=not args.no_progress),
                                 "text": "pydoc", "context": 256,
                                 "windows": [int(store.state["windows"]), int(store.state["windows"]) + len(windows)]}
        if "probing" not in recorded:
            report: dict[str, Any] = {"layer": hook, "ks": [1, 2, 5, 10, 20], "seed": 0, "datasets": {},
                                      "skipped": {}}
            for name, data in datasets.items():
                first = name not in baselines
                probe = sparse_probing(model, acts[name], data.labels, seed=0, baseline=first)
                baselines.setdefault(name, probe["baseline"])
                probe["baseline"] = baselines[name]  # the raw-activation probe does not depend on the SAE
                probe["source"] = data.source
                report["datasets"][name] = probe
            report.update(mean_over_datasets(report["datasets"]))
            result["probing"] = report
        if "scr" not in recorded:
            scr = spurious_correlation_removal(model, acts[scr_data.name], scr_data.target, scr_data.spurious,
                                               seed=0, random_control=True)
            scr.update(dataset=scr_data.name, source=scr_data.source, target_names=list(scr_data.target_names),
                       spurious_names=list(scr_data.spurious_names))
            result["scr"] = scr
        if len(result) > 1:
            record_evaluation(run, result)
            print(f"evaluated {run.name} in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    runs, cache = out / "runs", out / "examples"
    runs.mkdir(parents=True, exist_ok=True)
    language_model = LanguageModel("smollm2", not args.no_progress)
    config = DemoConfig(layer=args.layer, context=256, train_tokens=args.train_tokens, eval_tokens=args.eval_tokens)
    store, _ = prepare_activations(config, out / "activations", not args.no_progress, language_model)
    train_all(args, store, runs)
    evaluate_all(args, store, language_model, runs, cache)

    paths = sorted(p for p in runs.iterdir() if (p / "config.json").is_file())
    report = compare_records([run_record(path) for path in paths])
    print(format_comparison(report))
    results = Path(args.results)
    (results / "runs").mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copyfile(path / "eval.json", results / "runs" / f"{path.name}.json")
    atomic_write_bytes(results / "comparison.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(results / "comparison.md", comparison_markdown(report).encode())
    plot_comparison(report, results / "comparison.png")
    meta = {"command": "python " + " ".join(sys.argv), "commit": commit(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.platform(), "settings": vars(args),
            "store": {"hook": store.hook, "d": store.d, "windows_harvested": store.state.get("windows")},
            "train_seconds": {p.name: float((p / "train_seconds.txt").read_text()) for p in paths
                              if (p / "train_seconds.txt").is_file()},
            "this_invocation_seconds": time.perf_counter() - started}
    atomic_write_bytes(results / "meta.json", json.dumps(meta, indent=2).encode())
    print(f"wrote {results}/comparison.json, comparison.md, comparison.png, runs/*.json, meta.json")


if __name__ == "__main__":
    main()
