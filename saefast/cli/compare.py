"""``saefast compare RUN…``: the paper-style table of evaluated runs, with 95 % intervals over seeds.

Each RUN is a trained model directory (``saefast train --out``, or a demo's ``model_<kind>``) that ``saefast eval``
has evaluated (``RUN/eval.json``). Runs that differ only in their seed form one row (:mod:`saefast.eval.comparison`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .runs import EVAL_FILE, CLIError, read_evaluation


def run_record(path: Path) -> Any:
    """The :class:`~saefast.eval.comparison.RunRecord` of one evaluated run directory."""
    from ..eval.comparison import RunRecord, headline_metrics
    from ..formats import load  # a saefast run, or another library's SAE folder
    from ..models import Ensemble

    model = load(path)  # a folder that holds no SAE fails here, naming what it lacks
    evaluation = read_evaluation(path)
    if evaluation is None:
        raise CLIError(f"{path} has no {EVAL_FILE}: evaluate it first, e.g. saefast eval --model {path} --data STORE "
                       f"--spliced --probing --scr")
    cfg = model.cfg
    k = cfg.k if cfg.activation in ("topk", "batchtopk") else None
    decoder = model.W_dec.detach().reshape(-1, cfg.d_in).float()
    if isinstance(model, Ensemble):
        family, members = model.combine, model.members * model.chains
    else:
        family, members = "SAE", 1
    return RunRecord(path=str(path), family=family, members=members, latents=cfg.n_latents, k=k,
                     seed=int(getattr(model, "seed", 0)), values=headline_metrics(evaluation), decoder=decoder,
                     member_seeds=list(model.member_seeds()))


def run_compare(args: argparse.Namespace) -> int:
    """``saefast compare``: print the table; write JSON, markdown and the PNG when asked."""
    from ..eval.comparison import (
        compare_records,
        comparison_markdown,
        format_comparison,
        plot_comparison,
    )

    paths = [Path(run) for run in args.runs]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise CLIError(f"no such run directory: {', '.join(missing)}")
    report = compare_records([run_record(path) for path in paths], level=args.level)
    print(format_comparison(report))
    for group in report["groups"]:
        if group["warning"]:
            print(f"warning: {group['family']} J={group['members']}: {group['warning']}", file=sys.stderr)
    decided = [c for c in report["claims"] if c["verdict"] != "not distinguishable"]
    if report["claims"]:
        print(f"{len(decided)} of {len(report['claims'])} ensemble-vs-baseline comparisons are decided by the "
              f"{args.level:.0%} intervals; the rest are not distinguishable")
    if args.json:
        public = {**report, "groups": [{key: value for key, value in g.items()} for g in report["groups"]]}
        atomic_write_bytes(args.json, json.dumps(public, indent=2).encode())
        print(f"wrote {args.json}")
    if args.markdown:
        atomic_write_bytes(args.markdown, comparison_markdown(report).encode())
        print(f"wrote {args.markdown}")
    if args.png:
        plot_comparison(report, args.png)
        print(f"wrote {args.png}")
    return 0
