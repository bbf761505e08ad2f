"""``saefast eval``: one run's evaluations, each optional —

* ``--data STORE``: reconstruction and sparsity on stored activations (:func:`saefast.eval.evaluate`);
* ``--spliced``: the language model's CE and KL with the layer's output replaced by the reconstruction
  (:func:`saefast.eval.spliced_lm`);
* ``--probing``: sparse probing on real labelled text (:func:`saefast.eval.sparse_probing`);
* ``--scr``: spurious-correlation removal (:func:`saefast.eval.spurious_correlation_removal`).

The language model loads once for the last three. Every result also lands in ``RUN/eval.json`` (each evaluation
replacing its own section, so they can run one at a time), which ``saefast compare`` reads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .runs import CLIError, read_run, record_evaluation, stderr_line

PROBING_KS = (1, 2, 5, 10, 20)
SCR_NS = (2, 5, 10, 20, 50, 100)


def _check_options(args: argparse.Namespace, model: Any) -> None:
    """Everything that can be checked before the language model loads."""
    from ..data.labelled import PROBING_DATASETS

    ks = args.probe_k or list(PROBING_KS)
    too_big = [k for k in ks if k > model.n_latents_total]
    if args.probing and too_big:
        raise CLIError(f"--probe-k {too_big[0]} is larger than the model's {model.n_latents_total} latents")
    unknown = [name for name in args.datasets or () if name not in PROBING_DATASETS]
    if unknown:
        raise CLIError(f"unknown --datasets {unknown}; choose from {', '.join(PROBING_DATASETS)}")
    if args.scr_target is not None and len(args.scr_target.split(",")) != 2:
        raise CLIError(f"--scr-target takes two fortune categories, e.g. computers,science; got {args.scr_target!r}")


def run_eval(args: argparse.Namespace) -> int:
    """``saefast eval``: see the module docstring."""
    from ..devices import check_device
    from ..formats import load  # a saefast run, or another library's SAE (detected by its files)
    from ..ops import use_backend

    wants_lm = args.spliced or args.probing or args.scr
    if not args.data and not wants_lm:
        raise CLIError("give --data STORE (reconstruction on stored activations) and/or --spliced, --probing, --scr "
                       "(evaluations through the language model)")
    device = check_device(args.device)
    model = load(args.model, map_location=device)
    _check_options(args, model)
    result: dict[str, Any] = {"model": str(args.model)}
    with use_backend(args.backend):
        if args.data:
            result.update(_eval_store(args, model, device))
        if wants_lm:
            lm, tokenizer, layer = _load_lm(args, model, device)
            if args.spliced:
                result["spliced"] = _eval_spliced(args, model, lm, tokenizer, layer)
            if args.probing:
                result["probing"] = _eval_probing(args, model, lm, tokenizer, layer)
            if args.scr:
                result["scr"] = _eval_scr(args, model, lm, tokenizer, layer)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
        print(f"wrote {args.json}")
    if Path(args.model).is_dir():
        record_evaluation(args.model, result)
    return 0


def _eval_store(args: argparse.Namespace, model: Any, device: Any) -> dict[str, Any]:
    from ..data.store import ActivationStore
    from ..eval import evaluate

    store = ActivationStore(args.data, hook=args.hook)
    if store.d != model.cfg.d_in:
        raise CLIError(f"the model expects d_in={model.cfg.d_in} but {args.data} holds d={store.d} ({store.hook})")
    start = 0 if args.start is None else args.start
    stop = store.n_tokens if args.stop is None else args.stop
    if not 0 <= start < stop <= store.n_tokens:
        raise CLIError(f"--start/--stop must satisfy 0 <= start < stop <= {store.n_tokens}, got {start}, {stop}")
    result = evaluate(model, store.subset(start, stop).batches(args.batch_size, shuffle=False, device=device))
    result.update(data=str(args.data), hook=store.hook, start=start, stop=stop)
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction"):
        print(f"{key:>20}: {result[key]:.6g}")
    print(f"{'tokens':>20}: {result['n_tokens']:,}")
    return result


def _load_lm(args: argparse.Namespace, model: Any, device: Any) -> tuple[Any, Any, str]:
    """The language model, its tokenizer and the module to evaluate at (``--layer``, else the run's hook); the
    module's width must be the model's ``d_in``."""
    from ..data.hf import load_model
    from ..data.hooks import layer_hook, layer_width, resolve_hooks

    lm, tokenizer = load_model(args.lm, device=str(device), progress=False)
    if args.layer is not None:
        layer = layer_hook(lm, args.layer)
    else:
        recorded = (read_run(Path(args.model)) or {}).get("hook")
        if not recorded:
            raise CLIError(f"give --layer N: {args.model} does not record the hook it was trained on")
        layer = resolve_hooks(lm, recorded)[0]
    width = layer_width(lm, layer)
    if width != model.cfg.d_in:
        raise CLIError(f"{args.model} has d_in={model.cfg.d_in} but {args.lm}'s {layer} outputs d={width}; "
                       f"choose the layer it was trained on")
    return lm, tokenizer, layer


def _eval_spliced(args: argparse.Namespace, model: Any, lm: Any, tokenizer: Any, layer: str) -> dict[str, Any]:
    from ..data.harvest import special_token_ids
    from ..data.text import text_source, token_windows
    from ..eval import spliced_lm

    texts = text_source(args.text)
    windows = token_windows(tokenizer, texts, args.context)
    n_windows = -(-args.tokens // args.context)
    if args.skip_windows + n_windows > len(windows):
        raise CLIError(f"--text {args.text} gives {len(windows)} windows of {args.context} tokens; --skip-windows "
                       f"{args.skip_windows} + {n_windows} for --tokens {args.tokens} is more")
    chosen = [windows[i] for i in range(args.skip_windows, args.skip_windows + n_windows)]
    result = spliced_lm(lm, layer, model, chosen, batch_size=args.lm_batch_size,
                        special_ids=special_token_ids(lm, tokenizer), exclude_first=2, progress=not args.no_progress)
    result.update(lm=args.lm, text=args.text, context=args.context, skip_windows=args.skip_windows)
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_score", "kl_score", "ce_increase",
                "explained_variance", "l0"):
        print(f"{key:>20}: {result[key]:.6g}")
    kept = result["kept_clean"]
    print(f"{'spliced at':>20}: {layer}, {result['spliced_positions']:,} positions; {kept['positions']:,} kept clean "
          f"(the first {kept['first_positions']} of each window and token ids {kept['token_ids']}, never harvested)")
    return result


def _activations(args: argparse.Namespace, lm: Any, tokenizer: Any, layer: str, texts: Sequence[str],
                 name: str) -> Any:
    from ..data.examples import cached_example_activations

    return cached_example_activations(lm, tokenizer, layer, texts, cache_dir=args.cache,
                                      max_tokens=args.example_tokens, batch_size=args.lm_batch_size,
                                      progress=not args.no_progress, description=name)


def _eval_probing(args: argparse.Namespace, model: Any, lm: Any, tokenizer: Any, layer: str) -> dict[str, Any]:
    from ..data.labelled import PROBING_DATASETS, DatasetUnavailable, probing_dataset
    from ..eval import sparse_probing
    from ..eval.probing import mean_over_datasets

    ks = tuple(args.probe_k or PROBING_KS)
    report: dict[str, Any] = {"layer": layer, "lm": args.lm, "ks": list(ks), "seed": args.probe_seed,
                              "datasets": {}, "skipped": {}}
    for name in args.datasets or PROBING_DATASETS:
        try:
            dataset = probing_dataset(name, per_class=args.per_class, seed=args.probe_seed)
        except DatasetUnavailable as err:
            stderr_line(f"saefast eval: skipping the {name} probing task: {err}")
            report["skipped"][name] = str(err)
            continue
        acts = _activations(args, lm, tokenizer, layer, dataset.texts, name)
        result = sparse_probing(model, acts, dataset.labels, ks=ks, seed=args.probe_seed)
        result["source"] = dataset.source
        report["datasets"][name] = result
        accuracies = "  ".join(f"k={k} {result['accuracy'][str(k)]:.3f}" for k in ks)
        print(f"{'probing ' + name:>28}: {accuracies}  raw {result['baseline']:.3f} "
              f"({len(dataset.classes)} classes, {len(dataset.texts):,} texts)")
    report.update(mean_over_datasets(report["datasets"]))
    return report


def _eval_scr(args: argparse.Namespace, model: Any, lm: Any, tokenizer: Any, layer: str) -> dict[str, Any]:
    from ..data.labelled import DatasetUnavailable, scr_dataset
    from ..eval import spurious_correlation_removal

    target = tuple(args.scr_target.split(",")) if args.scr_target else ("computers", "science")
    try:
        dataset = scr_dataset(target=target, per_cell=args.scr_per_cell, seed=args.probe_seed)
    except DatasetUnavailable as err:
        stderr_line(f"saefast eval: skipping SCR: {err}")
        return {"skipped": str(err)}
    acts = _activations(args, lm, tokenizer, layer, dataset.texts, dataset.name)
    result = spurious_correlation_removal(model, acts, dataset.target, dataset.spurious, ns=SCR_NS,
                                          seed=args.probe_seed)
    result.update(layer=layer, lm=args.lm, dataset=dataset.name, source=dataset.source,
                  target_names=list(dataset.target_names), spurious_names=list(dataset.spurious_names))
    scores = "  ".join(f"N={n} {s:.3f}" for n, s in result["S"].items())
    print(f"{'SCR ' + dataset.name:>28}: A_biased {result['accuracy_biased']:.3f}, A_oracle "
          f"{result['accuracy_oracle']:.3f}; S {scores}")
    return result
