"""The ``saefast`` subcommands: each ``run_<command>(args)`` does one job and returns the exit status."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes

KINDS = ("single", "bagging", "boosting")
DTYPES = ("bfloat16", "float16", "float32")


class CLIError(ValueError):
    """Bad command-line input (reported as one line, exit status 2)."""


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def run_harvest(args: argparse.Namespace) -> int:
    """``saefast harvest``."""
    from ..data.harvest import harvest
    from ..data.hf import load_model
    from ..data.hooks import layer_hook, resolve_hooks
    from ..data.text import text_source

    if args.tokens < 1:
        raise CLIError(f"--tokens must be >= 1, got {args.tokens}")
    if args.layer is not None and args.hook:
        raise CLIError("give either --layer or --hook, not both")
    texts = text_source(args.text)  # fails fast on a missing file, before the model loads
    model, tokenizer = load_model(args.model, device=args.device, progress=not args.no_progress)
    if args.hook:
        hooks = resolve_hooks(model, args.hook)
    else:
        layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
        hooks = [layer_hook(model, layer)]
    store = harvest(model, args.out, hooks, args.tokens, tokenizer=tokenizer, texts=texts, context=args.context,
                    batch_size=args.batch_size, dtype=_dtype(args.dtype), shard_tokens=args.shard_tokens,
                    exclude_special=not args.keep_special, progress=not args.no_progress,
                    metadata={"model": args.model, "text": args.text})
    print(f"wrote {store.n_tokens:,} tokens × {len(hooks)} hook(s) ({', '.join(hooks)}; d={store.d}) to {args.out}")
    return 0


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON or TOML file: top-level run options plus optional ``[sae]`` and ``[train]`` tables."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        if file.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise CLIError("TOML config files need Python 3.11+; use JSON") from None
            return tomllib.loads(file.read_text())
        return json.loads(file.read_text())
    except (json.JSONDecodeError, ValueError) as err:
        if isinstance(err, CLIError):
            raise
        raise CLIError(f"config file {path} is not valid {file.suffix.lstrip('.') or 'JSON'}: {err}") from None


TRAIN_DEFAULTS = {"kind": "single", "members": 4, "chains": 1, "bootstrap": False, "latents": None, "k": 32,
                  "activation": "topk", "steps": 1000, "lr": 1e-3, "batch_size": 1024, "seed": 0, "data_seed": 0,
                  "hook": None, "device": "cpu", "checkpoint_every": 0, "backend": "auto"}


def parse_train_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Merge defaults < config file < flags into (run options, SAEConfig extras, TrainConfig extras)."""
    options = dict(TRAIN_DEFAULTS)
    sae_extra: dict[str, Any] = {}
    train_extra: dict[str, Any] = {}
    if args.config:
        file = read_config_file(args.config)
        sae_extra = dict(file.pop("sae", {}))
        train_extra = dict(file.pop("train", {}))
        unknown = set(file) - set(options) - {"data", "out"}
        if unknown:
            raise CLIError(f"unknown key(s) in {args.config}: {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(options))}, data, out, [sae], [train])")
        options.update(file)
    for key in options:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    options["data"] = args.data or options.get("data")
    options["out"] = args.out or options.get("out")
    for key in ("data", "out"):
        if not options[key]:
            raise CLIError(f"--{key} is required (or set {key!r} in the config file)")
    if options["kind"] not in KINDS:
        raise CLIError(f"--kind must be one of {', '.join(KINDS)}, got {options['kind']!r}")
    if int(options["chains"]) > 1 and options["kind"] != "boosting":
        raise CLIError(f"--chains applies to --kind boosting (independent boosting chains), not {options['kind']}")
    if options["bootstrap"] and options["kind"] == "boosting":
        raise CLIError("--bootstrap applies to --kind single or bagging (a boosting stage reads the residual)")
    for key in ("members", "chains", "k", "steps", "batch_size"):
        if int(options[key]) < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be >= 1, got {options[key]}")
    return options, sae_extra, train_extra


def run_train(args: argparse.Namespace) -> int:
    """``saefast train``."""
    import torch

    from ..config import SAEConfig, TrainConfig
    from ..data.store import ActivationStore
    from ..models import SAE, Ensemble
    from ..ops import resolve_backend
    from ..training import train

    options, sae_extra, train_extra = parse_train_options(args)
    store = ActivationStore(options["data"], hook=options["hook"])
    latents = options["latents"] or 4 * store.d
    cfg = SAEConfig(d_in=store.d, n_latents=int(latents), k=int(options["k"]), activation=options["activation"],
                    **sae_extra)
    device = torch.device(options["device"])
    resolve_backend(options["backend"], device, cfg.activation)  # an unusable backend fails before training starts
    if options["kind"] == "single":
        model = SAE(cfg, seed=int(options["seed"]))
    else:
        model = Ensemble(cfg, int(options["members"]), options["kind"], seed=int(options["seed"]),
                         chains=int(options["chains"]))
    model.to(device)
    out = Path(options["out"])
    train_options = {"steps": int(options["steps"]), "lr": float(options["lr"]), "seed": int(options["seed"]),
                     "progress": not args.no_progress, "checkpoint_dir": str(out),
                     "checkpoint_every": int(options["checkpoint_every"]), "resume": args.resume,
                     "backend": options["backend"], **train_extra}
    if options["bootstrap"]:  # the flag or the file's top level; a [train] table may also set it
        train_options["bootstrap"] = True
    config = TrainConfig(**train_options)
    batches = store.batches(int(options["batch_size"]), seed=int(options["data_seed"]), epochs=None,
                            drop_last=store.n_tokens >= int(options["batch_size"]), device=device)
    resumed = args.resume and (out / "config.json").is_file()
    if (out / "config.json").is_file() and not args.resume:
        raise CLIError(f"{out} already holds a trained model; pass --resume to continue it or choose another --out")
    start = time.perf_counter()
    history = train(model, batches, config=config)
    seconds = time.perf_counter() - start
    stages = model.members if options["kind"] == "boosting" else 1
    # A resumed run trained only part of the steps in this process: its rate would be meaningless.
    tokens_per_s = None if resumed else config.steps * stages * int(options["batch_size"]) / seconds
    run = {"kind": options["kind"], "members": getattr(model, "members", 1), "chains": getattr(model, "chains", 1),
           "bootstrap": config.bootstrap, "data": str(options["data"]),
           "hook": store.hook, "sae": cfg.to_dict(), "train": dict(train_options),
           "batch_size": int(options["batch_size"]), "data_seed": int(options["data_seed"]),
           "seconds": seconds, "tokens_per_s": tokens_per_s, "resumed": resumed,
           "final": history[-1] if history else None}
    atomic_write_bytes(out / "run.json", json.dumps(run, indent=2).encode())
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=2).encode())
    final = history[-1] if history else {}
    print(f"trained {options['kind']} ({run['members']} × {cfg.n_latents} latents, k={cfg.k}) on {store.hook}: "
          f"fvu {final.get('fvu', float('nan')):.4f}, l0 {final.get('l0', float('nan')):.1f}, "
          + ("resumed" if resumed else f"{tokens_per_s:,.0f} tokens/s") + f" → {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``saefast eval``."""
    import torch

    from ..data.store import ActivationStore
    from ..eval import evaluate
    from ..models import load
    from ..ops import use_backend

    model = load(args.model, map_location=args.device)
    store = ActivationStore(args.data, hook=args.hook)
    if store.d != model.cfg.d_in:
        raise CLIError(f"the model expects d_in={model.cfg.d_in} but {args.data} holds d={store.d} ({store.hook})")
    start = 0 if args.start is None else args.start
    stop = store.n_tokens if args.stop is None else args.stop
    if not 0 <= start < stop <= store.n_tokens:
        raise CLIError(f"--start/--stop must satisfy 0 <= start < stop <= {store.n_tokens}, got {start}, {stop}")
    view = store.subset(start, stop)
    batches = view.batches(args.batch_size, shuffle=False, device=torch.device(args.device))
    with use_backend(args.backend):
        result = evaluate(model, batches)
    result.update(model=str(args.model), data=str(args.data), hook=store.hook, start=start, stop=stop)
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction"):
        print(f"{key:>20}: {result[key]:.6g}")
    print(f"{'tokens':>20}: {result['n_tokens']:,}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
        print(f"wrote {args.json}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``saefast demo``."""
    from .demo import DemoConfig, format_table, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig.large() if args.large else DemoConfig()
    for key in ("model", "layer", "text", "steps", "members", "k", "seed"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    if args.latents is not None:
        config.n_latents = args.latents
    if args.tokens is not None:
        config.train_tokens = args.tokens
    if args.no_stability:
        config.stability = False
    config.validate()
    print(f"saefast demo — real activations: {config.model}, layer {config.layer}, text {config.text!r}; "
          f"{config.train_tokens:,} training + {config.eval_tokens:,} held-out tokens", flush=True)
    report = run_demo(config, args.out, cache_dir=args.cache, progress=not args.no_progress)
    data = report["data"]
    print(("reused cached activations from " if data["reused_cached_activations"] else "harvested activations to ")
          + data["store"])
    print(format_table(report["rows"]))
    print(f"wrote {args.out}/results.json and {args.out}/members.png")
    return 0


def run_sharpen(args: argparse.Namespace) -> int:
    """``saefast sharpen``."""
    from ..sharpen.tasks import format_history, run_task

    overrides = {key: getattr(args, key) for key in ("cycles", "top_n", "top_percent", "aux_coef", "target", "members",
                                                    "combine", "epochs", "finetune_epochs", "sae_steps", "backend")
                 if getattr(args, key) is not None}
    if args.top_percent is not None:
        overrides["top_n"] = None
    overrides["progress"] = not args.no_progress
    print(f"saefast sharpen — task {args.task}, {overrides.get('cycles', 2)} cycle(s) after the baseline", flush=True)

    def log(row: dict[str, Any]) -> None:
        print(f"cycle {row['cycle']}: test accuracy {row['test_accuracy']:.4f}, ARI {row['ari']:.3f}, "
              f"U {row['uncertainty']:.3f} bits, silhouette {row['silhouette_labels']:.3f}", flush=True)

    report = run_task(args.task, out=args.out, seed=args.seed, log=log, **overrides)
    print(format_history(report["history"]))
    print(f"wrote {args.out}/results.json, {args.out}/history.png and each cycle's SAE and masks")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """``saefast bench``."""
    from ..bench import CASES, IMPLEMENTATIONS, format_markdown, plot_report, run_benchmarks

    def progress(what: str) -> None:
        if not args.no_progress:
            print(f"  {what}", file=sys.stderr, flush=True)

    report = run_benchmarks(args.preset, cases=args.cases or CASES, backends=args.backends or IMPLEMENTATIONS,
                            warmup=args.warmup, repeats=args.repeats, device=args.device, progress=progress)
    table = format_markdown(report)
    print(table)
    for path, data in ((args.json, json.dumps(report, indent=2).encode()), (args.markdown, (table + "\n").encode())):
        if path:
            atomic_write_bytes(path, data)
            print(f"wrote {path}")
    if args.png:
        plot_report(report, args.png)
        print(f"wrote {args.png}")
    return 0
